/**
 * Taking turns under contention: among the retrying transactions of one SqlClient in this process, one that has
 * failed `ESCALATE_AFTER` times with a serialization failure or deadlock runs its next attempts alone. While such
 * transactions wait or run, the other retrying transactions start no new attempt; the attempts already running are
 * waited for; then the starving ones run one at a time, in the order they asked. So the transactions of one process
 * cannot keep aborting each other's attempts for ever. Every wait is bounded (`MAX_WAIT_MILLIS`, and the `timeout`
 * deadline), so that a transaction that waits on another one (a fiber it joins) delays it, never blocks it.
 * Transactions without `retry`, and transactions opened while the fiber holds a connection, take no part.
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as FiberId from "effect/FiberId"
import * as Option from "effect/Option"

/** @internal After this many failed attempts, the next attempts run alone. */
export const ESCALATE_AFTER = 4
/** @internal The longest a transaction waits for its turn, or for the attempts before it to end. */
export const MAX_WAIT_MILLIS = 1000
/** The longest a starving transaction waits in the queue before it runs anyway, competing. */
const MAX_QUEUE_MILLIS = 5000

interface Waiter {
  readonly turn: Deferred.Deferred<void>
  handed: boolean
}

/** The turns of the retrying transactions of one client. */
export interface Turns {
  /** Attempts running now that do not run alone. */
  active: number
  /** Set while starving transactions wait or run: done once none does any more. */
  closed: Deferred.Deferred<void> | undefined
  /** Whether a starving transaction's attempt has the turn. */
  running: boolean
  /** The starving transactions waiting for the turn, in order. */
  readonly queue: Array<Waiter>
  /** Done when no attempt is `active` any more, while a starving one waits to run. */
  drained: Deferred.Deferred<void> | undefined
}

const turnsByClient = new WeakMap<SqlClient.SqlClient, Turns>()

/** @internal */
export const turnsOf = (client: SqlClient.SqlClient): Turns => {
  let turns = turnsByClient.get(client)
  if (turns === undefined) {
    turns = { active: 0, closed: undefined, running: false, queue: [], drained: undefined }
    turnsByClient.set(client, turns)
  }
  return turns
}

const deferred = () => Deferred.unsafeMake<void>(FiberId.none)

/** Waits for `done`, at most `millis` and never past `deadline`; whether it was done in time. */
const waitBounded = (done: Deferred.Deferred<void>, millis: number, deadline: number | undefined) => {
  const bound = deadline === undefined ? millis : Math.min(millis, deadline - Date.now())
  return bound <= 0
    ? Effect.succeed(false)
    : Effect.map(Effect.timeoutOption(Deferred.await(done), Duration.millis(bound)), Option.isSome)
}

/** Runs an attempt that competes with the others, counted so that a starving transaction can wait for it. */
const counted = <A, E, R>(turns: Turns, attempt: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  Effect.suspend(() => {
    turns.active++
    return Effect.ensuring(
      attempt,
      Effect.suspend(() => {
        turns.active--
        return turns.active === 0 && turns.drained !== undefined
          ? Deferred.succeed(turns.drained, undefined)
          : Effect.void
      })
    )
  })

/** Hands the turn to the next starving transaction, or opens the gate when none waits. */
const handOn = (turns: Turns): Effect.Effect<void> =>
  Effect.suspend(() => {
    const next = turns.queue.shift()
    if (next !== undefined) {
      next.handed = true
      return Deferred.succeed(next.turn, undefined)
    }
    turns.running = false
    const closed = turns.closed
    turns.closed = undefined
    return closed === undefined ? Effect.void : Deferred.succeed(closed, undefined)
  })

/** Runs an attempt holding the turn: once the attempts running have ended (or `MAX_WAIT_MILLIS` passed). */
const withTurn = <A, E, R>(turns: Turns, attempt: Effect.Effect<A, E, R>, deadline: number | undefined) =>
  Effect.ensuring(
    Effect.suspend(() => {
      if (turns.active === 0) return attempt
      const drained = deferred()
      turns.drained = drained
      return Effect.zipRight(
        Effect.ensuring(
          waitBounded(drained, MAX_WAIT_MILLIS, deadline),
          Effect.sync(() => {
            turns.drained = undefined
          })
        ),
        attempt
      )
    }),
    handOn(turns)
  )

/** A starving transaction's attempt: it takes the turn, or waits for it in the queue. */
const starving = <A, E, R>(turns: Turns, attempt: Effect.Effect<A, E, R>, deadline: number | undefined) =>
  Effect.suspend(() => {
    turns.closed ??= deferred()
    if (!turns.running) {
      turns.running = true
      return withTurn(turns, attempt, deadline)
    }
    const waiter: Waiter = { turn: deferred(), handed: false }
    turns.queue.push(waiter)
    const leave = Effect.suspend(() => {
      if (waiter.handed) return handOn(turns)
      turns.queue.splice(turns.queue.indexOf(waiter), 1)
      return Effect.void
    })
    return Effect.flatMap(
      Effect.onInterrupt(waitBounded(waiter.turn, MAX_QUEUE_MILLIS, deadline), () => leave),
      () =>
        Effect.suspend(() => {
          if (waiter.handed) return withTurn(turns, attempt, deadline)
          // Waited too long (or the deadline is near): it leaves the queue and competes.
          return Effect.zipRight(leave, counted(turns, attempt))
        })
    )
  })

/**
 * Runs one attempt of a retrying transaction with `failures` failed attempts behind it: with the turn once it has
 * failed `ESCALATE_AFTER` times, otherwise once no starving transaction waits or runs.
 */
export const takeTurn = <A, E, R>(
  turns: Turns,
  attempt: Effect.Effect<A, E, R>,
  failures: number,
  deadline: number | undefined
): Effect.Effect<A, E, R> => {
  if (failures >= ESCALATE_AFTER) return starving(turns, attempt, deadline)
  const closed = turns.closed
  if (closed === undefined) return counted(turns, attempt)
  return Effect.zipRight(waitBounded(closed, MAX_WAIT_MILLIS, deadline), counted(turns, attempt))
}
