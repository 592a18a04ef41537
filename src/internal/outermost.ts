/**
 * The outermost transaction's lifecycle: reserving a connection, BEGIN with the options, the body, deciding the
 * outcome (COMMIT, or ROLLBACK) and giving the connection back or destroying it; the `timeout` option's one
 * deadline for the whole call (the wait for a connection, every attempt, the waits between them, COMMIT); retry of
 * the whole transaction; and `transact`, which picks a nested block or a new transaction. In a test transaction
 * the code's outermost transaction is a block with a virtual commit (`virtualOutermost`).
 */
import * as SqlClient from "@effect/sql/SqlClient"
import type { Connection } from "@effect/sql/SqlConnection"
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Duration from "effect/Duration"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as FiberId from "effect/FiberId"
import * as FiberRef from "effect/FiberRef"
import * as FiberRefs from "effect/FiberRefs"
import * as Option from "effect/Option"
import * as Runtime from "effect/Runtime"
import * as Schedule from "effect/Schedule"
import type * as Scheduler from "effect/Scheduler"
import * as Scope from "effect/Scope"
import type * as Tracer from "effect/Tracer"
import type * as Transaction from "../Transaction.js"
import { classify, databaseInfo, TransactionError } from "../TransactionError.js"
import { type Characteristics, CurrentDialect, type Dialect, PreparedStatements } from "./dialect.js"
import {
  abortedError,
  closeInner,
  controlError,
  declareOutermost,
  finishNested,
  Frame,
  held,
  innermost,
  keepInner,
  makeTx,
  type Mode,
  ownMode,
  nested,
  openNested,
  parentOf,
  provideFrame,
  run,
  type Tx
} from "./blocks.js"
import {
  checkNestedOptions,
  deadlockTimeoutMillisOf,
  millisOf,
  preparedStatementsCount,
  validateOptions
} from "./options.js"
import { sealedError } from "./sandbox.js"
import { hooksOfLast } from "./hooks.js"
import {
  type Observation,
  observeCommitFailure,
  connectionWait,
  observeNested,
  observeOutermost,
  observeRetry
} from "./observability.js"
import { MAX_TIMER_MILLIS } from "./connection.js"
import { takeTurn, type Turns, turnsOf } from "./turns.js"

/**
 * Whether a failed COMMIT may still have been committed: the connection broke before the answer came. A COMMIT
 * cancelled (57014) answered, and the answer is that it rolled back.
 */
export const outcomeUnknown = (cause: unknown) => {
  const { sqlState } = databaseInfo(cause)
  return sqlState === undefined || sqlState.startsWith("08") || (sqlState.startsWith("57") && sqlState !== "57014")
}

const timeoutError = (what: string, timeoutMillis: number, when: string) =>
  new TransactionError({
    reason: "Timeout",
    message:
      `${what} did not finish within its timeout of ${timeoutMillis} ms (${when}); it was rolled back ` +
      "and nothing was committed. Raise the timeout, or make the transaction do less."
  })

/**
 * Ends the outermost block: `COMMIT` when `exit` succeeded, `ROLLBACK` otherwise, and records the outcome. Blocks
 * still open inside it are rolled back (`inner: "rollback"`, the block's body has returned without them) or kept
 * (`"keep"`, savepoints of the manual handle).
 */
/** @internal */
export const finishOutermost = <A, E>(
  frame: Frame,
  exit: Exit.Exit<A, E>,
  limit: Limit | undefined,
  inner: "rollback" | "keep" = "rollback"
): Effect.Effect<A, E | TransactionError> => {
  const tx = frame.tx
  /** Rolls back, then fails with `failure`; a failed ROLLBACK is added after it and the connection destroyed. */
  const rollback = (failure: Cause.Cause<E | TransactionError>) =>
    Effect.matchCauseEffect(run(tx.conn, tx.dialect.rollback), {
      onFailure: (cause) => {
        // The destroyed session ends, and with it the transaction: nothing is committed.
        tx.outcome ??= "rolledBack"
        tx.owned.broken = true
        const error = controlError(
          "RollbackFailed",
          `ROLLBACK of ${frame.describe()}`,
          "The connection was closed instead of returned to the pool.",
          Cause.squash(cause)
        )
        return Effect.failCause(Cause.sequential(failure, Cause.fail(error)))
      },
      onSuccess: () => {
        tx.outcome ??= "rolledBack"
        return Effect.failCause(failure)
      }
    })
  const end = (): Effect.Effect<A, E | TransactionError> => {
    frame.open = false
    tx.stack.length = 0
    tx.pendingRelease = undefined
    if (frame.opening !== undefined) {
      // BEGIN was never sent (the body ran no statement), or it failed: there is nothing to end.
      tx.outcome = frame.openFailed === undefined && Exit.isSuccess(exit) ? "committed" : "rolledBack"
      return frame.openFailed === undefined ? exit : Effect.fail(frame.openFailed)
    }
    if (Exit.isFailure(exit)) return rollback(exit.cause)
    if (frame.aborted) return rollback(Cause.fail(abortedError(frame)))
    if (limit !== undefined && limit.deadline - Date.now() <= 0) {
      return rollback(Cause.fail(timeoutError(frame.describe(), limit.timeoutMillis, "no time was left for COMMIT")))
    }
    // COMMIT is never abandoned: past the deadline it is cancelled, and its own answer says what happened.
    const commit = tx.owned.execute(tx.dialect.commit(tx.conn), held, limit?.deadline)
    return Effect.matchCauseEffect(Effect.tapError(commit, observeCommitFailure(tx)), {
      onFailure: (cause) => {
        const error = Cause.squash(cause)
        const { sqlState } = databaseInfo(error)
        if (limit !== undefined && sqlState === "57014" && Date.now() >= limit.deadline) {
          return rollback(Cause.fail(timeoutError(frame.describe(), limit.timeoutMillis, "COMMIT was still running")))
        }
        const unknown = outcomeUnknown(error)
        if (unknown) tx.outcome = "unknown"
        return rollback(
          Cause.fail(
            controlError(
              "CommitFailed",
              `COMMIT of ${frame.describe()}`,
              unknown
                ? "The connection failed before the database answered, so whether it committed is unknown: " +
                    "check before running the transaction again."
                : "The transaction was rolled back; nothing was committed.",
              error,
              unknown
            )
          )
        )
      },
      onSuccess: (committed): Effect.Effect<A, E | TransactionError> => {
        if (!committed) return rollback(Cause.fail(abortedError(frame)))
        tx.outcome = "committed"
        return exit
      }
    })
  }
  return tx.owned.withConnection(frame.endClaim, held, () => {
    if (innermost(tx) === frame) return end()
    if (inner === "rollback") return Effect.flatMap(closeInner(frame), end)
    keepInner(frame)
    return end()
  })
}

const reserveFailed = (cause: unknown) =>
  controlError(
    "BeginFailed",
    "Reserving a connection for the transaction",
    "Nothing was sent to the database. Check that the database is reachable and the pool is not exhausted.",
    cause
  )

const acquireTimeoutError = (millis: number, holding: boolean) =>
  new TransactionError({
    reason: "AcquireTimeout",
    message:
      `No pooled connection became free within ${millis} ms, so the transaction did not start and nothing was ` +
      "sent. Every connection of the pool is held by other work" +
      (holding
        ? ", and this fiber already holds one for the transaction it is inside: if many fibers do that at once, " +
          "the pool runs dry and each waits for the others. "
        : ". ") +
      "Raise the pool's maxConnections, keep transactions shorter, or raise acquireTimeout."
  })

/**
 * Reserves a connection into `scope`. @effect/sql-pg loses a pooled client whose reservation is interrupted while it
 * waits (the pool's answer comes to a fiber that no longer listens), so the wait must not simply be interrupted.
 * Two ways keep the client:
 * - In the caller's fiber, once the client is known to register its release with the reservation's scope as soon
 *   as the connection arrives (`caught`): an interrupted wait leaves that release to the scope's stand-in, which
 *   runs it when the connection comes. Waiting costs nothing more than @effect/sql's own reservation.
 * - In another fiber, which waits while this one may give up (at `acquireTimeout` or the `timeout` deadline, which
 *   an in-fiber wait cannot keep) or be interrupted; a connection that arrives later is released at once, as its
 *   scope has closed by then. A client's first reservations go this way until it is known.
 */
export const reserve = (
  client: SqlClient.SqlClient,
  scope: Scope.Scope,
  acquireMillis: number | undefined,
  holding: boolean,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
  limit: Limit | undefined
): Effect.Effect<Connection, TransactionError> => {
  const remaining = limit === undefined ? undefined : limit.deadline - Date.now()
  if (remaining !== undefined && remaining <= 0) {
    return Effect.fail(timeoutError("The transaction", limit!.timeoutMillis, "no time was left for another attempt"))
  }
  // The `timeout` option bounds the wait for a connection too.
  const byDeadline = remaining !== undefined && (acquireMillis === undefined || remaining < acquireMillis)
  const millis = byDeadline ? remaining : acquireMillis
  const gaveUp = (): TransactionError =>
    byDeadline
      ? timeoutError("The transaction", limit!.timeoutMillis, "it was still waiting for a pooled connection")
      : acquireTimeoutError(millis!, holding)
  return Effect.withFiberRuntime((fiber) => {
    const waited = connectionWait(fiber)
    return millis === undefined && caught.has(client)
      ? reserveInFiber(client, scope, restore, waited)
      : reserveInAnotherFiber(client, scope, restore, waited, millis, gaveUp)
  })
}

const reservationFailed = (cause: Cause.Cause<unknown>): Effect.Effect<never, TransactionError> =>
  Cause.isInterruptedOnly(cause) ? Effect.interrupt : Effect.fail(reserveFailed(Cause.squash(cause)))

/**
 * The clients whose reservation was seen to register the connection's release with the reservation's scope from
 * the pool's callback, before handing the connection to the waiting fiber: what `reserveInFiber` relies on.
 */
const caught = new WeakSet<SqlClient.SqlClient>()

type Restore = <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>

const reserveInFiber = (
  client: SqlClient.SqlClient,
  scope: Scope.Scope,
  restore: Restore,
  waited: (() => void) | undefined
): Effect.Effect<Connection, TransactionError> => {
  const standIn = catching(scope)
  return Effect.matchCauseEffect(restore(Effect.provideService(client.reserve, Scope.Scope, standIn.scope)), {
    onFailure: (cause) => {
      // Interrupted while it waited, or between the pool's answer and the fiber taking it: whatever release the
      // driver has registered, or registers when the connection comes, runs then.
      standIn.abandon()
      waited?.()
      return reservationFailed(cause)
    },
    onSuccess: (conn) => {
      waited?.()
      return Effect.succeed(conn)
    }
  })
}

const reserveInAnotherFiber = (
  client: SqlClient.SqlClient,
  scope: Scope.Scope,
  restore: Restore,
  waited: (() => void) | undefined,
  millis: number | undefined,
  gaveUp: () => TransactionError
): Effect.Effect<Connection, TransactionError> => {
  // The scope's stand-in tells whether this client's release can be caught, for its next reservations.
  const standIn = catching(scope)
  // Started at once: a reservation the pool answers synchronously costs no wait.
  const waiting = Runtime.runFork(
    Runtime.make({
      context: Context.make(Scope.Scope, standIn.scope),
      fiberRefs: reservationRefs,
      runtimeFlags: Runtime.defaultRuntimeFlags
    })
  )(client.reserve)
  const done = waiting.unsafePoll()
  if (done !== null) {
    waited?.()
    if (Exit.isSuccess(done)) return Effect.succeed(done.value)
    // A reservation that failed may still get its connection later (from a pool it stopped waiting for).
    standIn.abandon()
    return reservationFailed(done.cause)
  }
  // One wait for the reservation's end, or for `millis`: the fiber is observed directly (Fiber.await would ask it
  // to add the observer in a turn of its own) and the timer needs no fiber either.
  return restore(
    Effect.async<Connection, TransactionError>((resume) => {
      let timer: ReturnType<typeof setTimeout> | undefined
      let ended = false
      const end = (result: Effect.Effect<Connection, TransactionError>) => {
        if (ended) return
        ended = true
        if (timer !== undefined) clearTimeout(timer)
        waiting.removeObserver(observer)
        waited?.()
        resume(result)
      }
      const observer = (exit: Exit.Exit<Connection, unknown>) => {
        if (Exit.isFailure(exit)) standIn.abandon()
        else if (standIn.caughtOutside(waiting)) caught.add(client)
        end(Exit.isSuccess(exit) ? Exit.succeed(exit.value) : reservationFailed(exit.cause))
      }
      waiting.addObserver(observer)
      if (millis !== undefined) {
        // A timer fires after at most MAX_TIMER_MILLIS (a longer delay would fire at once): re-armed until then.
        const until = Date.now() + millis
        const arm = () => {
          const left = until - Date.now()
          if (left <= 0) end(Effect.fail(gaveUp()))
          else timer = setTimeout(arm, Math.min(MAX_TIMER_MILLIS, left))
        }
        if (!ended) arm()
      }
      return Effect.sync(() => end(Effect.interrupt))
    })
  )
}

type Finalizer = Scope.Scope.Finalizer

/** How `Scope.addFinalizer` adds a finalizer to a scope: the method each scope has (it is not in Effect's typings). */
interface Adding {
  readonly addFinalizer: (finalizer: Finalizer) => Effect.Effect<void>
}

/** A finalizer the driver added, the fiber running when it did, and the fiber that took it to the scope (null: none). */
interface Added {
  readonly finalizer: Finalizer
  readonly addedIn: Fiber.RuntimeFiber<unknown, unknown> | undefined
  takenIn: Fiber.RuntimeFiber<unknown, unknown> | null
}

/**
 * A stand-in for a reservation's scope that sees each finalizer the driver adds (@effect/sql-pg adds the
 * connection's release in the pool's callback, before it resumes the waiting fiber) and adds it to `scope` only
 * when the fiber that reserves takes the connection. If that fiber stops waiting first (`abandon`), the finalizers
 * it did not take run instead, at once or when the driver adds them.
 */
const catching = (scope: Scope.Scope) => {
  const added: Array<Added> = []
  let abandoned = false
  const addFinalizer = (finalizer: Finalizer): Effect.Effect<void> => {
    if (abandoned) {
      releaseAbandoned(finalizer)
      return Effect.void
    }
    const entry: Added = { finalizer, addedIn: Option.getOrUndefined(Fiber.getCurrentFiber()), takenIn: null }
    added.push(entry)
    // Taken as one step: either the scope has it, or `abandon` runs it, never both.
    return Effect.uninterruptible(
      Effect.withFiberRuntime((fiber) => {
        if (abandoned) return Effect.void
        return Effect.tap((scope as unknown as Adding).addFinalizer(finalizer), () => {
          entry.takenIn = fiber
        })
      })
    )
  }
  // Everything but `addFinalizer` is the scope's own, so that the stand-in behaves as the scope in every other way.
  const standIn = new Proxy(scope, {
    get: (target, property) => {
      if (property === "addFinalizer") return addFinalizer
      const value: unknown = Reflect.get(target, property, target)
      return typeof value === "function" ? value.bind(target) : value
    }
  })
  return {
    scope: standIn,
    abandon: () => {
      if (abandoned) return
      abandoned = true
      for (const entry of added) if (entry.takenIn === null) releaseAbandoned(entry.finalizer)
    },
    /**
     * Whether the driver added every finalizer outside `reserving` (in the pool's callback) and `reserving` itself
     * took each: so that a waiter of the caller's own fiber, interrupted at any point, still sees each one. A
     * release added by another fiber of the reservation (a fork of it, a timeout around it) does not count.
     */
    caughtOutside: (reserving: Fiber.RuntimeFiber<unknown, unknown>) =>
      added.length > 0 && added.every((entry) => entry.addedIn !== reserving && entry.takenIn === reserving)
  }
}

/**
 * Runs the release of a connection nobody waits for any more, through `immediate`: released in the pool's callback,
 * the connection goes straight to the pool's next waiter, which may have given up too.
 */
const releaseAbandoned = (finalizer: Finalizer) =>
  immediate.scheduleTask(() => {
    Effect.runFork(finalizer(Exit.interrupt(FiberId.none)))
  }, 0)

/**
 * Runs a reservation's tasks as soon as they are scheduled, in the pool's callback, rather than in a later turn of
 * the scheduler: the connection then reaches the transaction one turn sooner. A task scheduled while another runs
 * waits for it to end (a trampoline), so that handovers do not nest: a reservation whose transaction gave up
 * releases the connection it gets at once, the pool hands it to the next waiter in the same call, and with hundreds
 * of such waiters nested calls would overflow the stack and lose the connection.
 */
const immediate: Scheduler.Scheduler = (() => {
  const queue: Array<() => void> = []
  let running = false
  const drain = (): void => {
    running = true
    try {
      for (let next = queue.shift(); next !== undefined; next = queue.shift()) next()
    } finally {
      running = false
      // Only a task that threw leaves others queued: they still run, in the next microtask.
      if (queue.length > 0) queueMicrotask(() => (running || queue.length === 0 ? undefined : drain()))
    }
  }
  return {
    scheduleTask: (task) => {
      queue.push(task)
      if (!running) drain()
    },
    shouldYield: () => false
  }
})()

/** The fiber refs a reservation runs with: the defaults, and the `immediate` scheduler. */
const reservationRefs = FiberRefs.updateAs(FiberRefs.empty(), {
  fiberId: FiberId.none,
  fiberRef: FiberRef.currentScheduler,
  value: immediate
})

/** Reserves a connection into `scope` and opens the outermost block on it; BEGIN travels with its first statement. */
/** @internal */
export const open = (
  client: SqlClient.SqlClient,
  dialect: Dialect,
  options: Transaction.Options,
  scope: Scope.Scope,
  holding: boolean,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
  limit?: Limit,
  mode: Mode = ownMode
): Effect.Effect<Frame, TransactionError> => {
  const characteristics: Characteristics = {
    isolation: options.isolation,
    readOnly: options.readOnly,
    deferrable: options.deferrable,
    statementTimeoutMillis: options.statementTimeout === undefined ? undefined : millisOf(options.statementTimeout),
    lockTimeoutMillis: options.lockTimeout === undefined ? undefined : millisOf(options.lockTimeout),
    idleTimeoutMillis: options.idleTimeout === undefined ? undefined : millisOf(options.idleTimeout)
  }
  const acquireMillis = options.acquireTimeout === undefined ? undefined : millisOf(options.acquireTimeout)
  return Effect.withFiberRuntime((fiber) => {
    const prepared = preparedStatementsCount(Context.get(fiber.currentContext, PreparedStatements))
    if (prepared instanceof TransactionError) return Effect.fail(prepared)
    return Effect.flatMap(reserve(client, scope, acquireMillis, holding, restore, limit), (conn) => {
      const tx = makeTx(client, conn, dialect, characteristics, mode)
      // A connection the engine reserved: its statements' cancels are the engine's, not the driver's.
      tx.owned.takeOver(prepared)
      const frame = new Frame(tx, undefined, 0, undefined, dialect.begin(characteristics))
      frame.deadlockTimeoutMillis = deadlockTimeoutMillisOf(options)
      tx.stack.push(frame)
      return Effect.succeed(frame)
    })
  })
}

/** Gives the connection back to the pool, or destroys it when its state is unknown. */
/** @internal */
export const closeConnection = (tx: Tx | undefined, scope: Scope.CloseableScope, exit: Exit.Exit<unknown, unknown>) =>
  tx?.owned.broken === true
    ? Effect.zipRight(tx.dialect.destroy(tx.conn), Scope.close(scope, exit))
    : Scope.close(scope, exit)

/** The deadline of a transaction with the `timeout` option: the whole call, retries included. */
interface Limit {
  readonly deadline: number
  readonly timeoutMillis: number
}

const limitOf = (options: Transaction.Options): Limit | undefined => {
  const timeoutMillis = options.timeout === undefined ? undefined : millisOf(options.timeout)
  return timeoutMillis === undefined ? undefined : { deadline: Date.now() + timeoutMillis, timeoutMillis }
}

/**
 * Runs `body` until `limit`'s deadline, failing with `Timeout` then. Fibers the body forks stay children of the
 * caller, as without a limit (a body run in a fiber of its own would take its unjoined children down with it).
 */
const bounded = <A, E, R>(
  body: Effect.Effect<A, E, R>,
  limit: Limit | undefined,
  frame: Frame
): Effect.Effect<A, E | TransactionError, R> =>
  limit === undefined
    ? body
    : Effect.transplant((graft) =>
        Effect.timeoutFail(graft(body), {
          duration: Duration.millis(Math.max(0, limit.deadline - Date.now())),
          onTimeout: () => timeoutError(frame.describe(), limit.timeoutMillis, "its body was still running")
        })
      )

const outermost = <A, E, R>(
  client: SqlClient.SqlClient,
  dialect: Dialect,
  options: Transaction.Options,
  holding: boolean,
  effect: Effect.Effect<A, E, R>,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
  limit: Limit | undefined,
  opened: (frame: Frame) => void,
  span: Tracer.Span | undefined
): Effect.Effect<A, E | TransactionError, R> =>
  Effect.flatMap(Scope.make(), (scope) => {
    let frame: Frame | undefined
    return open(client, dialect, options, scope, holding, restore, limit).pipe(
      Effect.flatMap((begun) => {
        frame = begun
        begun.tx.span = span
        opened(begun)
        const body = bounded(restore(provideFrame(effect, begun, span)), limit, begun)
        return Effect.flatMap(Effect.exit(body), (exit) => finishOutermost(begun, exit, limit))
      }),
      Effect.onExit((exit) => closeConnection(frame?.tx, scope, exit))
    )
  })

/** Runs `effect` in a transaction of `client`, or in a savepoint when one is already open in the fiber. */
export const transact = <A, E, R>(
  client: SqlClient.SqlClient | undefined,
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options
): Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current>> =>
  Effect.withFiberRuntime((fiber) => {
    const invalid = validateOptions(options)
    if (invalid !== undefined) return Effect.fail(invalid)
    const context = fiber.currentContext
    const found = parentOf(context, client)
    // A fiber that outlived the transaction it was forked in (a daemon) opens a transaction of its own: the one
    // it inherited has ended, and there is nothing left to nest in. Statements on the ended one stay errors.
    const parent =
      found !== undefined && found.tx.mode === ownMode && found.tx.outcome !== undefined ? undefined : found
    if (parent !== undefined) {
      if (parent.tx.mode.virtual) {
        if (parent.sealed) return Effect.fail(sealedError())
        if (parent.test) return virtualOutermost(parent, effect, options)
      }
      const incompatible = checkNestedOptions(parent, options)
      if (incompatible !== undefined) return Effect.fail(incompatible)
      const inside = observeNested(
        (span) => Effect.uninterruptibleMask((restore) => nested(parent, effect, restore, span)),
        parent
      )
      const afterNested = parent.tx.mode.afterNested
      return afterNested === undefined ? inside : Effect.ensuring(inside, afterNested(parent))
    }
    return outermostRetrying(client ?? Context.unsafeGet(context, SqlClient.SqlClient), context, effect, options, false)
  }) as Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current>>

export const outermostRetrying = <A, E, R>(
  client: SqlClient.SqlClient,
  context: Context.Context<never>,
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options,
  holding: boolean
): Effect.Effect<A, E | TransactionError, R> => {
  const dialect = Context.get(context, CurrentDialect)
  return wholeCall(
    client,
    dialect,
    options,
    holding ? undefined : turnsOf(client),
    (restore, limit, observation, opened) =>
      outermost(client, dialect, options, holding, effect, restore, limit, opened, observation?.span)
  )
}

/**
 * One call of a transaction, whatever opens it: observed (its span and metrics), run in as many attempts as
 * `retry` allows before the deadline of `timeout`, then the hooks of its last attempt. `attempt` runs one attempt
 * uninterruptibly (`restore` gives the caller's interruptibility back) and reports the block it opens.
 */
const wholeCall = <A, E, R>(
  client: SqlClient.SqlClient,
  dialect: Dialect,
  options: Transaction.Options,
  turns: Turns | undefined,
  attempt: (
    restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
    limit: Limit | undefined,
    observation: Observation | undefined,
    opened: (frame: Frame) => void
  ) => Effect.Effect<A, E | TransactionError, R>
): Effect.Effect<A, E | TransactionError, R> =>
  Effect.suspend(() => {
    const limit = limitOf(options)
    let last: Frame | undefined
    const opened = (frame: Frame) => {
      last = frame
    }
    return observeOutermost(
      client,
      dialect,
      options,
      () => last,
      (observation) => {
        const once = Effect.uninterruptibleMask((restore) => {
          last = undefined
          if (observation !== undefined) observation.attempts++
          return attempt(restore, limit, observation, opened)
        })
        return attempts(once, options, limit, turns, observation)
      },
      hooksOfLast
    )
  })

/** The attempts of a transaction: one, or as many as `retry` allows before the deadline of `timeout`. */
const attempts = <A, E, R>(
  once: Effect.Effect<A, E | TransactionError, R>,
  options: Transaction.Options,
  limit: Limit | undefined,
  turns?: Turns,
  observation?: Observation
): Effect.Effect<A, E | TransactionError, R> => {
  if (options.retry === undefined || options.retry === false) return once
  const schedule = options.retry === true ? defaultRetrySchedule : options.retry
  return retrying(
    once,
    turns === undefined ? undefined : { turns, deadline: limit?.deadline },
    observation,
    limit === undefined
      ? schedule
      : // No wait runs past the deadline; an attempt that would start after it fails with Timeout instead.
        Schedule.modifyDelay(schedule, (_, delay) =>
          Duration.min(delay, Duration.millis(Math.max(0, limit.deadline - Date.now())))
        )
  )
}

/** @internal */
export const defaultRetrySchedule: Schedule.Schedule<unknown, unknown> = Schedule.exponential("5 millis").pipe(
  Schedule.modifyDelay((delay) => Duration.min(delay, Duration.millis(200))),
  Schedule.jittered,
  Schedule.intersect(Schedule.recurs(9))
)

const isRetryable = (error: unknown) =>
  error instanceof TransactionError
    ? error.isRetryable
    : ((sqlState) => sqlState === "40001" || sqlState === "40P01")(databaseInfo(error).sqlState)

/**
 * Runs the whole transaction again on a serialization failure or deadlock, wherever it surfaced. When the
 * schedule gives up, the last failure comes back as a `TransactionError` with the attempt count, the original
 * error as `cause`.
 */
const retrying = <A, E, R>(
  once: Effect.Effect<A, E | TransactionError, R>,
  taking: { readonly turns: Turns; readonly deadline: number | undefined } | undefined,
  observation: Observation | undefined,
  schedule: Schedule.Schedule<unknown, TransactionError>
): Effect.Effect<A, E | TransactionError, R> =>
  Effect.suspend(() => {
    let attempts = 0
    let reason = ""
    return Effect.suspend(() => {
      attempts++
      return taking === undefined ? once : takeTurn(taking.turns, once, attempts - 1, taking.deadline)
    }).pipe(
      // A serialization failure can arrive as a defect (Model repositories turn SqlError into one with orDie):
      // it is retried all the same, and comes back as the defect it was if the schedule gives up.
      Effect.catchAllDefect((defect) =>
        isRetryable(defect) ? Effect.fail(new RetryableDefect(defect)) : Effect.die(defect)
      ),
      Effect.retry({
        schedule: Schedule.mapInput(
          observation === undefined
            ? schedule
            : Schedule.modifyDelay(schedule, (_, delay) => {
                observeRetry(observation, reason, Duration.toMillis(delay))
                return delay
              }),
          (error: E | TransactionError | RetryableDefect) => {
            const classified = classify(error instanceof RetryableDefect ? error.defect : error)
            reason = classified.reason
            return classified
          }
        ),
        while: (error) => isRetryable(error instanceof RetryableDefect ? error.defect : error)
      }),
      Effect.catchAll((error) =>
        error instanceof RetryableDefect
          ? Effect.die(error.defect)
          : Effect.fail(isRetryable(error) ? gaveUp(error, attempts) : error)
      )
    )
  })

/** A retryable failure that reached the retry loop as a defect. */
class RetryableDefect {
  constructor(readonly defect: unknown) {}
}

const gaveUp = (error: unknown, attempts: number): TransactionError => {
  const classified = classify(error)
  return new TransactionError({
    reason: classified.reason,
    message: `${classified.message} Gave up after ${attempts} attempt${attempts === 1 ? "" : "s"}.`,
    sqlState: classified.sqlState,
    constraint: classified.constraint,
    attempts,
    cause: error instanceof TransactionError ? error.cause : error
  })
}

/** @internal */
export const withTransaction = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options = {}
): Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current> | SqlClient.SqlClient> =>
  // `transact` reads the SqlClient from the fiber's context.
  transact(undefined, effect, options) as Effect.Effect<
    A,
    E | TransactionError,
    Exclude<R, Transaction.Current> | SqlClient.SqlClient
  >

/**
 * In a test transaction, the code under test's outermost transaction: a block nested in the test's block (or, for
 * requiresNew, in the caller's block), which takes the options of an outermost transaction. Isolation, read-only,
 * deferrable and the SET LOCAL timeouts cannot change inside the test transaction; they are recorded (Current
 * reports them) and not applied. `timeout` and `retry` apply to the block.
 */
export const virtualOutermost = <A, E, R>(
  parent: Frame,
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options
): Effect.Effect<A, E | TransactionError, R> => {
  // Observed as the transaction it stands for, with a span and metrics as in production.
  return wholeCall(parent.tx.client, parent.tx.dialect, options, undefined, (restore, limit, observation, opened) => {
    if (limit !== undefined && limit.deadline <= Date.now()) {
      return Effect.fail(timeoutError("The transaction", limit.timeoutMillis, "no time was left for another attempt"))
    }
    const declared = {
      what: "A transaction of the code under test",
      deadlockTimeoutMillis: deadlockTimeoutMillisOf(options)
    }
    return Effect.flatMap(openNested(parent, restore, declared), (frame) => {
      opened(frame)
      declareOutermost(frame, options)
      const body = bounded(restore(provideFrame(effect, frame, observation?.span)), limit, frame)
      return Effect.flatMap(Effect.exit(body), (exit) => finishNested(frame, exit))
    })
  })
}
