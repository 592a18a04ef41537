/**
 * The connection of one transaction and who may use it. It carries one statement at a time: `withConnection` is
 * the one place that takes it and gives it back (an interrupt or a synchronous throw cannot leave it held, and
 * waiting for it is interruptible); `execute` runs a driver statement on it so that an interrupt or a deadline
 * stops the statement with the database's out-of-band cancel request, never through the pool, and the connection
 * is handed on only once the statement has ended. A connection whose state is unknown is marked broken and is
 * destroyed instead of going back to the pool. Which blocks may use the connection is the policy it is given
 * (blocks.ts decides it); this file knows nothing of transactions.
 */
import type { Connection } from "@effect/sql/SqlConnection"
import type { SqlError } from "@effect/sql/SqlError"
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Equal from "effect/Equal"
import type * as Fiber from "effect/Fiber"
import type * as FiberId from "effect/FiberId"
import * as Option from "effect/Option"
import * as Runtime from "effect/Runtime"
import type * as Scope from "effect/Scope"
import type { Carried, Dialect, InFlight } from "./dialect.js"

/** How long a cancel request may take to reach the database before the connection is given up on. */
export const CANCEL_DEADLINE_MILLIS = 5_000
/** How long a cancelled statement may take to end before the connection is given up on. */
export const STOP_DEADLINE_MILLIS = 10_000

/** Which claims may use the connection now, which will never be able to, and how long one may be kept out. */
export interface Policy<C> {
  readonly mayUse: (claim: C) => boolean
  readonly refused: (claim: C) => boolean
  /** What keeps `claim` out now (a block that must end first), or undefined when `mayUse` lets it in. */
  readonly keptOutBy: (claim: C) => unknown
  /**
   * How long a claim may be kept out by one and the same thing (what `keptOutBy` names, or a stream holding the
   * connection; not one statement, which ends by itself) before its wait ends as `"stuck"`; undefined for no bound.
   */
  readonly stuckAfterMillis: (claim: C) => number | undefined
}

/** The longest delay a timer takes; a longer wait is checked again when it fires. */
export const MAX_TIMER_MILLIS = 2_147_483_647

/** A statement ready to run, and what its end changes (holding the connection) before the caller sees it. */
export interface Prepared<A> {
  readonly statement: Effect.Effect<A, SqlError>
  readonly ended: (exit: Exit.Exit<A, SqlError>) => Exit.Exit<A, SqlError>
}

/** How a claim's wait for the connection ended: it holds the connection, it never can, or it waited too long. */
export type Access = "granted" | "refused" | "stuck"

interface Waiter<C> {
  readonly claim: C
  granted: boolean
  readonly resume: (access: Access) => void
}

type Restore = <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>

/** A reserved connection, used by one claim at a time. */
export class Owned<C> {
  private busy = false
  private readonly waiters: Array<Waiter<C>> = []
  /** Set when the connection's state is unknown: it is destroyed instead of returned to the pool. */
  broken = false
  /** The driver's statements, once the engine has taken over cancelling them (`takeOver`). */
  private inFlight: InFlight | undefined = undefined
  /** The stream holding the connection until it ends, and the fiber that reads it (`hold`). */
  private stream: { readonly reader: FiberId.FiberId } | undefined = undefined

  constructor(
    readonly conn: Connection,
    readonly dialect: Dialect,
    private readonly policy: Policy<C>
  ) {}

  /** Takes the connection at once if it is free and `claim` may use it. */
  private tryTake(claim: C): boolean {
    if (this.busy || !this.policy.mayUse(claim)) return false
    this.busy = true
    return true
  }

  /** Refuses the waiters that never can use it, and hands the free connection to the first one that may. */
  private wake(): void {
    for (let i = 0; i < this.waiters.length; ) {
      const waiter = this.waiters[i]!
      if (this.policy.refused(waiter.claim)) {
        this.waiters.splice(i, 1)
        waiter.resume("refused")
      } else if (!this.busy && this.policy.mayUse(waiter.claim)) {
        this.waiters.splice(i, 1)
        this.busy = true
        waiter.granted = true
        waiter.resume("granted")
      } else {
        i++
      }
    }
  }

  private release(): void {
    this.busy = false
    if (this.waiters.length > 0) this.wake()
  }

  /**
   * Waits, interruptibly, until `claim` may use the connection and takes it, is refused, or has been kept out
   * longer than the policy allows (a wait for one running statement does not count as being kept out).
   */
  private acquire(claim: C): Effect.Effect<Access> {
    if (this.policy.refused(claim)) return refused
    if (this.tryTake(claim)) return granted
    return Effect.async<Access>((resume) => {
      let timer: ReturnType<typeof setTimeout> | undefined
      const waiter: Waiter<C> = {
        claim,
        granted: false,
        resume: (access) => {
          if (timer !== undefined) clearTimeout(timer)
          resume(access === "granted" ? granted : access === "refused" ? refused : stuck)
        }
      }
      // Sampled: the clock restarts whenever what keeps the claim out changes (another block, or nothing but a
      // running statement), so that queueing behind several blocks in turn never adds up to "stuck".
      const limit = this.policy.stuckAfterMillis(claim)
      if (limit !== undefined) {
        let keptOutBy = this.keptOut(claim)
        let since = Date.now()
        const check = () => {
          const index = this.waiters.indexOf(waiter)
          if (index < 0) return
          const now = Date.now()
          const current = this.keptOut(claim)
          if (current === undefined || current !== keptOutBy) {
            keptOutBy = current
            since = now
          } else if (now - since >= limit) {
            this.waiters.splice(index, 1)
            resume(stuck)
            return
          }
          timer = setTimeout(check, Math.min(MAX_TIMER_MILLIS, limit - (now - since)))
        }
        timer = setTimeout(check, Math.min(MAX_TIMER_MILLIS, limit))
      }
      this.waiters.push(waiter)
      return Effect.sync(() => {
        if (timer !== undefined) clearTimeout(timer)
        const index = this.waiters.indexOf(waiter)
        if (index >= 0) this.waiters.splice(index, 1)
        else if (waiter.granted) this.release()
      })
    })
  }

  /** What keeps `claim` out now: what the policy names, or a stream that holds the connection until it ends. */
  private keptOut(claim: C): unknown {
    return this.policy.keptOutBy(claim) ?? (this.busy ? this.stream : undefined)
  }

  /** Whether a stream read by `fiber` holds the connection: a statement of that fiber would wait for ever. */
  heldByStreamOf(fiber: FiberId.FiberId): boolean {
    return this.stream !== undefined && Equal.equals(this.stream.reader, fiber)
  }

  /** Whether a stream holds the connection. */
  get streaming(): boolean {
    return this.stream !== undefined
  }

  /**
   * Runs `use` holding the connection, and gives it back however `use` ends: the only place that takes and
   * releases it. Waiting is interruptible; `use` runs with the caller's interruptibility as `restore` gives it.
   * `use` runs without the connection when the claim is refused or was kept out too long.
   */
  withConnection<A, E, R>(
    claim: C,
    restore: Restore,
    use: (access: Access) => Effect.Effect<A, E, R>
  ): Effect.Effect<A, E, R> {
    return Effect.suspend(() => {
      if (this.policy.refused(claim)) return use("refused")
      if (this.tryTake(claim)) return this.using(use)
      return Effect.flatMap(restore(this.acquire(claim)), (access) =>
        access === "granted" ? this.using(use) : use(access)
      )
    })
  }

  // Callers run uninterruptibly (they take `restore` to open the wait and the statement to interruption), so
  // nothing can come between the end of `use` and the release; a throw inside `use` is a defect, released too.
  private using<A, E, R>(use: (access: Access) => Effect.Effect<A, E, R>): Effect.Effect<A, E, R> {
    return Effect.matchCauseEffect(
      Effect.suspend(() => use("granted")),
      {
        onFailure: (cause) => {
          this.release()
          return Effect.failCause(cause)
        },
        onSuccess: (value) => {
          this.release()
          return Effect.succeed(value)
        }
      }
    )
  }

  /**
   * Holds the connection until `scope` closes, then runs `finish` and gives it back (for streams, whose rows
   * arrive while the caller goes on). Fails with `onRefused` when the claim is refused or was kept out too long.
   */
  hold<E>(claim: C, restore: Restore, onRefused: (access: Access) => E): Effect.Effect<void, E, Scope.Scope> {
    return Effect.withFiberRuntime((fiber) => {
      const take = Effect.map(
        Effect.suspend(() => (this.tryTake(claim) ? granted : restore(this.acquire(claim)))),
        (access) => {
          if (access === "granted") this.stream = { reader: fiber.id() }
          return access
        }
      )
      return Effect.flatMap(
        Effect.acquireRelease(take, (access) =>
          access === "granted"
            ? Effect.sync(() => {
                this.stream = undefined
                this.release()
              })
            : Effect.void
        ),
        (access) => (access === "granted" ? Effect.void : Effect.fail(onRefused(access)))
      )
    })
  }

  /**
   * Runs one driver statement holding the connection. The driver's own cancel (which @effect/sql-pg sends through
   * a pooled connection) never runs: on a connection the engine took over, the statement runs in the caller's
   * fiber and the driver has no cancel to run; on any other connection it runs in a fiber of its own, which an
   * interrupt does not reach. An interrupt of the caller, or `deadline` (epoch milliseconds) passing, sends the
   * database a cancel request while the statement is still running, and the call returns once the statement has
   * ended; an interrupted caller stays interrupted.
   */
  execute<A>(statement: Effect.Effect<A, SqlError>, restore: Restore, deadline?: number): Effect.Effect<A, SqlError> {
    const inFlight = this.inFlight
    if (inFlight !== undefined) {
      const running =
        deadline === undefined ? restore(statement) : this.cancelAt(statement, restore, deadline, inFlight)
      // Callers run uninterruptibly, so a plain match sees every interrupt (onInterrupt would add a mask).
      return Effect.catchAllCause(running, (cause) =>
        Cause.isInterrupted(cause)
          ? Effect.zipRight(this.stopInFlight(inFlight), Effect.failCause(cause))
          : Effect.failCause(cause)
      )
    }
    if (!this.dialect.canCancel(this.conn)) return restore(statement)
    return Effect.suspend(() => {
      // Started at once: the statement is sent before this returns, and one already answered (a driver that
      // answers synchronously) costs no wait. The driver's statement needs nothing of the caller's context (its
      // span is the caller's, around this call), so it runs in a fiber of the default runtime.
      const fiber = Runtime.runFork(Runtime.defaultRuntime)(Effect.uninterruptible(statement))
      const done = fiber.unsafePoll()
      if (done !== null) return done
      const joined = deadline === undefined ? awaitEnd(fiber) : this.joinBefore(fiber, deadline)
      return Effect.onInterrupt(restore(joined), () => this.stop(fiber))
    })
  }

  /**
   * `withConnection` and `execute` in one step, for the common case: when `claim` may take the connection now and
   * the engine took it over, takes it, runs the statement `prepare` gives, passes its end through `ended` and gives
   * the connection back, however the statement ended (an interrupted one is stopped first). Undefined, with nothing
   * taken, when it cannot: wait with `withConnection`.
   */
  executeNow<A>(claim: C, restore: Restore, prepare: () => Prepared<A>): Effect.Effect<A, SqlError> | undefined {
    const inFlight = this.inFlight
    if (inFlight === undefined || !this.tryTake(claim)) return undefined
    let prepared: Prepared<A>
    try {
      prepared = prepare()
    } catch (defect) {
      this.release()
      return Effect.die(defect)
    }
    const end = (exit: Exit.Exit<A, SqlError>) => {
      try {
        return prepared.ended(exit)
      } finally {
        this.release()
      }
    }
    return Effect.matchCauseEffect(restore(prepared.statement), {
      onFailure: (cause) =>
        Cause.isInterrupted(cause)
          ? Effect.flatMap(Effect.exit(this.stopInFlight(inFlight)), (stopped) =>
              end(Exit.failCause(Exit.isFailure(stopped) ? Cause.sequential(cause, stopped.cause) : cause))
            )
          : end(Exit.failCause(cause)),
      onSuccess: (value) => end(Exit.succeed(value))
    })
  }

  /**
   * Takes over cancelling from the driver, for a connection the engine reserved itself: statements then run in
   * the caller's fiber, with no fiber of their own. Not for a connection of a transaction other code opened, whose
   * own statements would lose their driver's cancel. Up to `prepared` of its statements are kept prepared.
   */
  takeOver(prepared: number): void {
    this.inFlight = this.dialect.takeOver(this.conn, prepared)
  }

  /**
   * Makes control `statements` travel ahead of the statement `sql` in its round trip, on a connection the engine
   * took over; `undefined` elsewhere (send them on their own first).
   */
  carry(statements: ReadonlyArray<string>, sql: string): Carried | undefined {
    return this.inFlight?.carry(statements, sql)
  }

  /** Runs a statement that `deadline` cancels, out of band, if it is still running then. */
  private cancelAt<A>(
    statement: Effect.Effect<A, SqlError>,
    restore: Restore,
    deadline: number,
    inFlight: InFlight
  ): Effect.Effect<A, SqlError> {
    return Effect.suspend(() => {
      let cancelling: Promise<boolean> | undefined
      const timer = setTimeout(
        () => {
          if (inFlight.running()) cancelling = Effect.runPromise(this.dialect.cancel(this.conn, CANCEL_DEADLINE_MILLIS))
        },
        Math.max(0, deadline - Date.now())
      )
      // A cancel request already on its way must have landed before the connection is handed on.
      const settled = Effect.suspend(() => {
        clearTimeout(timer)
        if (cancelling === undefined) return Effect.void
        return Effect.flatMap(
          Effect.promise(() => cancelling!),
          (delivered) =>
            delivered
              ? Effect.void
              : Effect.sync(() => {
                  this.broken = true
                })
        )
      })
      return Effect.ensuring(restore(statement), settled)
    })
  }

  /** Stops a statement the caller stopped waiting for: a cancel request, then its end; or the socket closed. */
  private stopInFlight(inFlight: InFlight): Effect.Effect<void> {
    return Effect.suspend(() => {
      if (!inFlight.running()) return Effect.void
      return Effect.flatMap(this.dialect.cancel(this.conn, CANCEL_DEADLINE_MILLIS), (sent) =>
        Effect.flatMap(sent ? endedWithin(inFlight, STOP_DEADLINE_MILLIS) : Effect.succeed(false), (ended) =>
          ended
            ? Effect.void
            : Effect.suspend(() => {
                this.broken = true
                return Effect.zipRight(
                  this.dialect.terminate(this.conn),
                  Effect.asVoid(endedWithin(inFlight, STOP_DEADLINE_MILLIS))
                )
              })
        )
      )
    })
  }

  /** Joins the statement; if `deadline` passes first, cancels it and then joins it, for its own answer. */
  private joinBefore<A>(fiber: Fiber.RuntimeFiber<A, SqlError>, deadline: number): Effect.Effect<A, SqlError> {
    const remaining = deadline - Date.now()
    return Effect.flatMap(awaitWithin(fiber, Math.max(0, remaining)), (exit) =>
      Option.isSome(exit) ? exit.value : Effect.zipRight(this.stop(fiber), awaitEnd(fiber))
    )
  }

  /**
   * Stops a running statement: a cancel request aimed at this connection's backend while the statement is still
   * the one running on it, then waits for the statement's end. If the request cannot be sent, or the statement
   * does not end in time, the socket is closed (the statement ends with an error) and the connection is destroyed.
   */
  stop<A>(fiber: Fiber.RuntimeFiber<A, SqlError>): Effect.Effect<void> {
    return Effect.suspend(() => {
      if (fiber.unsafePoll() !== null) return Effect.void
      return Effect.flatMap(this.dialect.cancel(this.conn, CANCEL_DEADLINE_MILLIS), (sent) =>
        sent ? this.awaitOrTerminate(fiber) : this.terminate(fiber)
      )
    })
  }

  private awaitOrTerminate<A>(fiber: Fiber.RuntimeFiber<A, SqlError>): Effect.Effect<void> {
    return Effect.flatMap(awaitWithin(fiber, STOP_DEADLINE_MILLIS), (ended) =>
      Option.isSome(ended) ? Effect.void : this.terminate(fiber)
    )
  }

  private terminate<A>(fiber: Fiber.RuntimeFiber<A, SqlError>): Effect.Effect<void> {
    return Effect.suspend(() => {
      if (fiber.unsafePoll() !== null) return Effect.void
      this.broken = true
      return Effect.zipRight(this.dialect.terminate(this.conn), Effect.asVoid(Effect.exit(awaitEnd(fiber))))
    })
  }

  /** Waits until the driver has nothing left in flight (a closed stream); gives the connection up if it hangs. */
  settle(): Effect.Effect<void> {
    return Effect.flatMap(this.dialect.settle(this.conn, STOP_DEADLINE_MILLIS), (settled) =>
      settled
        ? Effect.void
        : Effect.suspend(() => {
            this.broken = true
            return this.dialect.terminate(this.conn)
          })
    )
  }
}

/**
 * Waits for the fiber's end and ends as it did. The fiber is observed directly: `Fiber.await` asks the fiber to add
 * the observer with a message that it handles in a turn of its own, and `Fiber.join` also merges its fiber refs.
 */
export const awaitEnd = <A, E>(fiber: Fiber.RuntimeFiber<A, E>): Effect.Effect<A, E> =>
  Effect.async<A, E>((resume) => {
    const observer = (exit: Exit.Exit<A, E>) => resume(exit)
    fiber.addObserver(observer)
    return Effect.sync(() => fiber.removeObserver(observer))
  })

/**
 * The fiber's exit if it ends within `millis`. A plain timer, not a race of fibers: the wait keeps the caller's
 * interruptibility, so an interrupted caller (or one in a finalizer) still waits out the deadline it was given.
 */
const awaitWithin = <A, E>(
  fiber: Fiber.RuntimeFiber<A, E>,
  millis: number
): Effect.Effect<Option.Option<Exit.Exit<A, E>>> =>
  Effect.async<Option.Option<Exit.Exit<A, E>>>((resume) => {
    let done = false
    const observer = (exit: Exit.Exit<A, E>) => finish(Option.some(exit))
    const finish = (result: Option.Option<Exit.Exit<A, E>>) => {
      if (done) return
      done = true
      clearTimeout(timer)
      fiber.removeObserver(observer)
      resume(Effect.succeed(result))
    }
    const timer = setTimeout(() => finish(Option.none()), millis)
    fiber.addObserver(observer)
    return Effect.sync(() => {
      done = true
      clearTimeout(timer)
      fiber.removeObserver(observer)
    })
  })

/** Whether nothing is in flight any more within `millis`; a plain timer, as for `awaitWithin`. */
const endedWithin = (inFlight: InFlight, millis: number): Effect.Effect<boolean> =>
  Effect.async<boolean>((resume) => {
    if (!inFlight.running()) return resume(Effect.succeed(true))
    let done = false
    const finish = (ended: boolean) => {
      if (done) return
      done = true
      clearTimeout(timer)
      stopListening()
      resume(Effect.succeed(ended))
    }
    const timer = setTimeout(() => finish(false), millis)
    const stopListening = inFlight.onEnded(() => finish(true))
    return Effect.sync(() => {
      done = true
      clearTimeout(timer)
      stopListening()
    })
  })

const granted: Exit.Exit<Access> = Exit.succeed("granted")
const refused: Exit.Exit<Access> = Exit.succeed("refused")
const stuck: Exit.Exit<Access> = Exit.succeed("stuck")
