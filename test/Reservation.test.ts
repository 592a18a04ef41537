/**
 * The wait for a pooled connection, against scripted clients whose pool answers when the test says so: an
 * interrupted wait never loses the connection nor releases it twice, whichever moment the interrupt lands, and
 * whether the client's reservation adds the connection's release from the pool's callback (as @effect/sql-pg's
 * does, which lets the wait run in the caller's fiber), from the waiting fiber, or from a fiber the reservation forks
 * (both of which keep the wait in a fiber of its own). The same waits against PostgreSQL are in Ownership.test.ts.
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import type { Connection } from "@effect/sql/SqlConnection"
import { assert, describe, it } from "@effect/vitest"
import { Context, Effect, Exit, Fiber, FiberId, Option, Scope } from "effect"
import { reserve } from "../src/internal/outermost.js"

/** A hang becomes a test failure. */
const bounded = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.timeoutFail(effect, { duration: "10 seconds", onTimeout: () => "hang: the test did not finish within 10 s" })

/** A client with a pool of one connection: each reservation waits until `answer` hands the connection over. */
const scriptedClient = (releaseIn: "callback" | "fiber" | "forked fiber") => {
  const waiting: Array<() => void> = []
  const state = { released: 0, handedOut: 0, chained: false }
  const conn = {} as Connection
  // With `chained`, a release hands the connection to the next waiter inside the release, as node-postgres' pool does.
  const release = Effect.sync(() => {
    state.released++
    if (state.chained && waiting.length > 0) waiting.shift()!()
  })
  /** Waits until `answer` hands the connection over, then `resume`s. */
  const handOut = (resume: () => void) =>
    waiting.push(() => {
      state.handedOut++
      resume()
    })
  const connection = Effect.async<Connection>((resume) => {
    handOut(() => resume(Effect.succeed(conn)))
  })
  const reserve: Effect.Effect<Connection, never, Scope.Scope> =
    releaseIn === "callback"
      ? // As @effect/sql-pg: the release is added to the fiber's scope in the pool's callback, then the fiber resumes.
        Effect.async<Connection, never, Scope.Scope>((resume) => {
          const fiber = Option.getOrThrow(Fiber.getCurrentFiber())
          const scope = Context.unsafeGet(fiber.currentContext, Scope.Scope)
          handOut(() => resume(Effect.as(Scope.addFinalizer(scope, release), conn)))
        })
      : releaseIn === "fiber"
        ? // As Effect.acquireRelease: the fiber adds the release once it has resumed with the connection.
          Effect.acquireRelease(connection, () => release)
        : // The same, in a fiber the reservation forks and joins (as a timeout around it would).
          Effect.flatMap(Effect.fork(Effect.acquireRelease(connection, () => release)), Fiber.join)
  const client = { reserve } as unknown as SqlClient.SqlClient
  const answer = () => {
    const next = waiting.shift()
    assert.isDefined(next, "no reservation was waiting")
    next!()
  }
  return { client, state, answer, waiting: () => waiting.length }
}

/** Reserves into a new scope, as the outermost transaction does: uninterruptibly but for the wait. */
const reserved = (client: SqlClient.SqlClient) =>
  Effect.flatMap(Scope.make(), (scope) =>
    Effect.uninterruptibleMask((restore) =>
      Effect.as(
        Effect.onExit(reserve(client, scope, undefined, false, restore, undefined), (exit) =>
          Exit.isFailure(exit) ? Scope.close(scope, exit) : Effect.void
        ),
        scope
      )
    )
  )

/** One reservation that waits for the pool, is answered, and gives its connection back when its scope closes. */
const reserveAndRelease = (scripted: ReturnType<typeof scriptedClient>) =>
  Effect.gen(function* () {
    const fiber = yield* Effect.fork(reserved(scripted.client))
    yield* Effect.yieldNow()
    scripted.answer()
    const scope = yield* Fiber.join(fiber)
    yield* Scope.close(scope, Exit.void)
  })

/**
 * A scripted client after two answered reservations: the first ones show how the client adds its release, and once
 * that is known the next ones may wait in the caller's fiber.
 */
const knownClient = (releaseIn: Parameters<typeof scriptedClient>[0]) =>
  Effect.gen(function* () {
    const scripted = scriptedClient(releaseIn)
    yield* reserveAndRelease(scripted)
    yield* reserveAndRelease(scripted)
    return scripted
  })

/** Forks a reservation and waits until it is waiting for the pool. */
const waitingReservation = (scripted: ReturnType<typeof scriptedClient>) =>
  Effect.gen(function* () {
    const before = scripted.waiting()
    const fiber = yield* Effect.fork(reserved(scripted.client))
    while (scripted.waiting() === before) yield* Effect.yieldNow()
    return fiber
  })

const where = { callback: "the pool's callback", fiber: "the waiting fiber", "forked fiber": "a fiber it forks" }

for (const releaseIn of ["callback", "fiber", "forked fiber"] as const) {
  describe(`a reservation whose release is added in ${where[releaseIn]}`, () => {
    it.live("answered: the connection is released once, when the transaction's scope closes", () =>
      bounded(
        Effect.gen(function* () {
          const scripted = scriptedClient(releaseIn)
          for (let i = 1; i <= 3; i++) {
            yield* reserveAndRelease(scripted)
            assert.strictEqual(scripted.state.released, i)
          }
        })
      )
    )

    it.live("interrupted while it waits: the connection that comes later is released once", () =>
      bounded(
        Effect.gen(function* () {
          const scripted = yield* knownClient(releaseIn)
          for (let i = 0; i < 3; i++) {
            const fiber = yield* waitingReservation(scripted)
            const exit = yield* Fiber.interrupt(fiber)
            assert.isTrue(Exit.isInterrupted(exit), `the interrupted wait ended with ${String(exit)}`)
            const released = scripted.state.released
            scripted.answer()
            yield* Effect.yieldNow()
            assert.strictEqual(scripted.state.released, released + 1, "the late connection was not released once")
          }
          assert.strictEqual(scripted.state.released, scripted.state.handedOut)
        })
      )
    )

    it.live("interrupted after the pool answered, before the fiber took the connection: released once", () =>
      bounded(
        Effect.gen(function* () {
          const scripted = yield* knownClient(releaseIn)
          for (let i = 0; i < 3; i++) {
            const fiber = yield* waitingReservation(scripted)
            // The answer and the interrupt reach the fiber in the same turn, the answer first.
            scripted.answer()
            fiber.unsafeInterruptAsFork(FiberId.none)
            const exit = yield* Fiber.await(fiber)
            if (Exit.isSuccess(exit)) yield* Scope.close(exit.value, Exit.void)
            yield* Effect.yieldNow()
            assert.strictEqual(scripted.state.released, scripted.state.handedOut, "released more or less than once")
          }
        })
      )
    )

    it.live("thousands of interrupted waiters, each answered inside the release of the one before: none lost", () =>
      bounded(
        Effect.gen(function* () {
          const scripted = yield* knownClient(releaseIn)
          const fibers: Array<Fiber.RuntimeFiber<Scope.CloseableScope, unknown>> = []
          for (let i = 0; i < 5000; i++) fibers.push(yield* waitingReservation(scripted))
          yield* Effect.forEach(fibers, Fiber.interrupt, { discard: true })
          const before = scripted.state.released
          scripted.state.chained = true
          scripted.answer()
          yield* Effect.yieldNow()
          assert.strictEqual(scripted.waiting(), 0)
          assert.strictEqual(scripted.state.released - before, 5000)
        })
      )
    )
  })
}

describe("a reservation whose release is added in the pool's callback, failing by itself", () => {
  // Only a release added in the pool's callback can be seen after the reservation gave up: one the reservation's
  // fiber adds is never added at all, and the driver itself has lost the connection.
  it.live("a reservation that fails by itself (its own timeout) releases the connection that comes later", () =>
    bounded(
      Effect.gen(function* () {
        const scripted = yield* knownClient("callback")
        const timingOut = {
          reserve: Effect.timeoutFail(scripted.client.reserve, {
            duration: "10 millis",
            onTimeout: () => "gave up"
          })
        } as unknown as SqlClient.SqlClient
        for (const acquireTimeout of [undefined, 5000]) {
          const exit = yield* Effect.exit(
            Effect.flatMap(Scope.make(), (scope) =>
              Effect.uninterruptibleMask((restore) =>
                reserve(timingOut, scope, acquireTimeout, false, restore, undefined)
              )
            )
          )
          assert.isTrue(Exit.isFailure(exit), "the reservation was meant to time out")
          const released = scripted.state.released
          scripted.answer()
          yield* Effect.sleep("20 millis")
          assert.strictEqual(scripted.state.released, released + 1, "the late connection was not released once")
        }
      })
    )
  )
})
