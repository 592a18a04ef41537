/**
 * The wait for a pooled connection, against scripted clients whose pool answers when the test says so: an
 * interrupted wait never loses the connection nor releases it twice, whichever moment the interrupt lands, and
 * whether the client's reservation adds the connection's release from the pool's callback (as @effect/sql-pg's
 * does, which lets the wait run in the caller's fiber) or from the waiting fiber (which keeps it in a fiber of its
 * own). The same waits against PostgreSQL are in Ownership.test.ts.
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
const scriptedClient = (releaseIn: "callback" | "fiber") => {
  const waiting: Array<() => void> = []
  const state = { released: 0, handedOut: 0, chained: false }
  const conn = {} as Connection
  // With `chained`, a release hands the connection to the next waiter inside the release, as node-postgres' pool does.
  const release = Effect.sync(() => {
    state.released++
    if (state.chained && waiting.length > 0) waiting.shift()!()
  })
  const reserve: Effect.Effect<Connection, never, Scope.Scope> =
    releaseIn === "callback"
      ? // As @effect/sql-pg: the release is added to the fiber's scope in the pool's callback, then the fiber resumes.
        Effect.async<Connection, never, Scope.Scope>((resume) => {
          const fiber = Option.getOrThrow(Fiber.getCurrentFiber())
          const scope = Context.unsafeGet(fiber.currentContext, Scope.Scope)
          waiting.push(() => {
            state.handedOut++
            resume(Effect.as(Scope.addFinalizer(scope, release), conn))
          })
        })
      : // As Effect.acquireRelease: the fiber adds the release once it has resumed with the connection.
        Effect.acquireRelease(
          Effect.async<Connection>((resume) => {
            waiting.push(() => {
              state.handedOut++
              resume(Effect.succeed(conn))
            })
          }),
          () => release
        )
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

/** Forks a reservation and waits until it is waiting for the pool. */
const waitingReservation = (scripted: ReturnType<typeof scriptedClient>) =>
  Effect.gen(function* () {
    const before = scripted.waiting()
    const fiber = yield* Effect.fork(reserved(scripted.client))
    while (scripted.waiting() === before) yield* Effect.yieldNow()
    return fiber
  })

for (const releaseIn of ["callback", "fiber"] as const) {
  describe(`a reservation whose release is added in the ${releaseIn === "callback" ? "pool's callback" : "waiting fiber"}`, () => {
    it.effect("answered: the connection is released once, when the transaction's scope closes", () =>
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

    it.effect("interrupted while it waits: the connection that comes later is released once", () =>
      bounded(
        Effect.gen(function* () {
          const scripted = scriptedClient(releaseIn)
          // The first reservations show how the client adds its release; the next ones may wait in the caller's fiber.
          yield* reserveAndRelease(scripted)
          yield* reserveAndRelease(scripted)
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

    it.effect("interrupted after the pool answered, before the fiber took the connection: released once", () =>
      bounded(
        Effect.gen(function* () {
          const scripted = scriptedClient(releaseIn)
          yield* reserveAndRelease(scripted)
          yield* reserveAndRelease(scripted)
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

    it.effect("thousands of interrupted waiters, each answered inside the release of the one before: none lost", () =>
      bounded(
        Effect.gen(function* () {
          const scripted = scriptedClient(releaseIn)
          yield* reserveAndRelease(scripted)
          yield* reserveAndRelease(scripted)
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
