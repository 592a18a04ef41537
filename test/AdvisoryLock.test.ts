import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Deferred, Effect, Exit, Fiber, Layer, Option } from "effect"
import { Transaction, type TransactionError } from "effect-transaction"
import * as Recorder from "./utils/Recorder.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = Recorder.layer.pipe(Layer.provideMerge(TestDatabase.layer()))

/** Holds `key` in a transaction of its own until `release` completes. */
const holdLock = (key: number | bigint | string, locked: Deferred.Deferred<void>, release: Deferred.Deferred<void>) =>
  Effect.zipRight(
    Transaction.advisoryLock(key),
    Effect.zipRight(Deferred.succeed(locked, undefined), Deferred.await(release))
  ).pipe(Transaction.withTransaction())

const heldLocks = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.map(
    sql<{ n: number }>`SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()`,
    (rows) => rows[0]!.n
  )
)

describe("advisory locks", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("tryAdvisoryLock is false while another transaction holds the key, true once it has ended", () =>
      Effect.gen(function* () {
        for (const [key, other] of [
          [42, 43],
          [2n ** 62n, 2n ** 62n + 1n],
          ["job:1", "job:2"]
        ] as const) {
          const locked = yield* Deferred.make<void>()
          const release = yield* Deferred.make<void>()
          const holder = yield* Effect.fork(holdLock(key, locked, release))
          yield* Deferred.await(locked)
          const whileHeld = yield* Effect.all([
            Transaction.tryAdvisoryLock(key),
            Transaction.tryAdvisoryLock(other)
          ]).pipe(Transaction.withTransaction())
          assert.deepStrictEqual(whileHeld, [false, true], String(key))
          yield* Deferred.succeed(release, undefined)
          yield* Fiber.join(holder)
          assert.isTrue(yield* Transaction.tryAdvisoryLock(key).pipe(Transaction.withTransaction()))
        }
      })
    )

    it.effect("advisoryLock waits until the holder's transaction ends", () =>
      Effect.gen(function* () {
        const order: Array<string> = []
        const locked = yield* Deferred.make<void>()
        const release = yield* Deferred.make<void>()
        const holder = yield* Effect.fork(
          holdLock("report", locked, release).pipe(Effect.zipRight(Effect.sync(() => order.push("holder committed"))))
        )
        yield* Deferred.await(locked)
        const waiter = yield* Effect.fork(
          Transaction.advisoryLock("report").pipe(
            Effect.zipRight(Effect.sync(() => order.push("waiter got the lock"))),
            Transaction.withTransaction()
          )
        )
        yield* Effect.sleep("200 millis")
        order.push("released")
        yield* Deferred.succeed(release, undefined)
        yield* Fiber.join(holder)
        yield* Fiber.join(waiter)
        // The holder's COMMIT frees the lock; which of the two fibers resumes first after that is up to the driver.
        assert.strictEqual(order[0], "released")
        assert.sameMembers(order.slice(1), ["holder committed", "waiter got the lock"])
      })
    )

    it.effect("a lock taken in a nested block that rolls back is released with it; a kept one lasts", () =>
      Effect.gen(function* () {
        const counts = yield* Effect.gen(function* () {
          yield* Effect.ignore(
            Effect.zipRight(Transaction.advisoryLock(7), Effect.fail("no")).pipe(Transaction.withTransaction())
          )
          const afterRollback = yield* heldLocks
          yield* Transaction.advisoryLock(8).pipe(Transaction.withTransaction())
          return [afterRollback, yield* heldLocks]
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(counts, [0, 1])
        assert.strictEqual(yield* heldLocks.pipe(Transaction.withTransaction()), 0)
      })
    )

    it.effect("keys that are not 64-bit integers are InvalidOption errors before anything is sent", () =>
      Effect.gen(function* () {
        const recorder = yield* Recorder.Recorder
        for (const key of [1.5, Number.NaN, 2 ** 60, 2n ** 63n, -(2n ** 63n) - 1n]) {
          const exit = yield* Effect.exit(
            Effect.suspend(() => {
              recorder.clear()
              return Transaction.advisoryLock(key)
            }).pipe(Transaction.withTransaction())
          )
          const failure = Exit.isFailure(exit) ? Option.getOrUndefined(Cause.failureOption(exit.cause)) : undefined
          assert.strictEqual((failure as TransactionError.TransactionError | undefined)?.reason, "InvalidOption")
          // The body sent nothing, so neither did the transaction.
          assert.deepStrictEqual(recorder.statements, [])
        }
      })
    )
  })
})
