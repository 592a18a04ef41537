/**
 * The code under test behaves in a test as in production: what it reads about its transaction, how its transaction
 * fails, which statements wait, and the driver's own PgClient tag. Each case runs the same code both ways where the
 * two can be compared.
 */
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, layer } from "@effect/vitest"
import { Chunk, Deferred, Effect, Exit, Fiber, Option, Stream } from "effect"
import { TestTransaction, Transaction } from "effect-transaction"
import { committedIds, insert, items, transactionError } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = TestDatabase.layer({ applicationName: "etx-test-production" })

/** What code reads about its transaction: outside one, inside one, in a nested block, and in an afterCommit hook. */
const observe = Effect.gen(function* () {
  const seen = yield* Deferred.make<{ readonly active: boolean; readonly current: boolean }>()
  const outside = { active: yield* Transaction.isActive, current: Option.isSome(yield* Transaction.currentOption) }
  const inside = yield* Effect.gen(function* () {
    const tx = yield* Transaction.Current
    const nested = yield* Effect.map(Transaction.Current, (inner) => inner.depth).pipe(Transaction.withTransaction())
    yield* Transaction.afterCommit(
      Effect.gen(function* () {
        yield* Deferred.succeed(seen, {
          active: yield* Transaction.isActive,
          current: Option.isSome(yield* Transaction.currentOption)
        })
      })
    )
    return { active: yield* Transaction.isActive, depth: tx.depth, nested, id: tx.id }
  }).pipe(Transaction.withTransaction())
  const other = yield* Effect.map(Transaction.Current, (tx) => tx.id).pipe(Transaction.withTransaction())
  return {
    outside,
    inside: { active: inside.active, depth: inside.depth, nested: inside.nested },
    ownIds: inside.id !== other,
    hook: yield* Deferred.await(seen)
  }
})

/** A transaction that catches the error of one of its statements and returns successfully. */
const caughtStatementError = Effect.gen(function* () {
  yield* insert(1)
  yield* Effect.either(insert(1))
}).pipe(Transaction.withTransaction())

describe("the code under test reads its transaction as in production", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("isActive, currentOption, depth and id read the same in a test and in production", () =>
      Effect.gen(function* () {
        yield* items
        const production = yield* observe
        const inTest = yield* TestTransaction.isolate(observe)
        assert.deepStrictEqual(inTest, production)
        assert.deepStrictEqual(production, {
          outside: { active: false, current: false },
          inside: { active: true, depth: 0, nested: 1 },
          ownIds: true,
          hook: { active: false, current: false }
        })
      })
    )

    it.effect("the same in a suite that shares a seeded test transaction", () =>
      Effect.gen(function* () {
        yield* items
        const production = yield* observe
        const inSuite = yield* TestTransaction.isolate(observe).pipe(
          Effect.provide(TestTransaction.layer({ seed: insert(100) }))
        )
        assert.deepStrictEqual(inSuite, production)
      })
    )

    it.effect("a transaction that caught its own statement error fails with CommitFailed 25P02 in both", () =>
      Effect.gen(function* () {
        yield* items
        const production = transactionError(yield* Effect.exit(caughtStatementError))
        const inTest = transactionError(yield* Effect.exit(TestTransaction.isolate(caughtStatementError)))
        assert.strictEqual(production.reason, "CommitFailed")
        assert.strictEqual(inTest.reason, "CommitFailed")
        assert.strictEqual(inTest.sqlState, "25P02")
        assert.match(inTest.message, /INSERT INTO items/)
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )
  })
})

describe("statements of the test itself", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("a test's stream does not wait for another fiber's open transaction, as a plain statement does not", () =>
      Effect.gen(function* () {
        yield* items
        const seen = yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const opened = yield* Deferred.make<void>()
          const release = yield* Deferred.make<void>()
          const app = yield* Effect.fork(
            Effect.zipRight(
              insert(1),
              Effect.zipRight(Deferred.succeed(opened, undefined), Deferred.await(release))
            ).pipe(Transaction.withTransaction())
          )
          yield* Deferred.await(opened)
          const plain = yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM items`.pipe(
            Effect.timeout("2 seconds")
          )
          const streamed = yield* Stream.runCollect(
            sql<{ n: number }>`SELECT count(*)::int AS n FROM items`.stream
          ).pipe(Effect.timeout("2 seconds"))
          yield* Deferred.succeed(release, undefined)
          yield* Fiber.join(app)
          return { plain: plain[0]!.n, streamed: Chunk.toReadonlyArray(streamed)[0]!.n }
        }).pipe(TestTransaction.isolate)
        // Both ran at once, inside the open transaction (they see its row), without waiting for it to end.
        assert.deepStrictEqual(seen, { plain: 1, streamed: 1 })
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )
  })
})

describe("the driver's own PgClient tag in a test", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    const reserveAndWrite = Effect.gen(function* () {
      const pg = yield* PgClient.PgClient
      yield* Effect.scoped(
        Effect.flatMap(pg.reserve, (conn) =>
          conn.execute("INSERT INTO items (id, label) VALUES (10, 'reserved')", [], undefined)
        )
      )
    })

    const failingTransaction = Effect.gen(function* () {
      const pg = yield* PgClient.PgClient
      yield* insert(1)
      return yield* Effect.exit(
        Effect.zipRight(insert(2), Effect.fail("body failed" as const)).pipe(pg.withTransaction)
      )
    })

    it.effect("PgClient.reserve under isolate writes into the test transaction, never for real", () =>
      Effect.gen(function* () {
        yield* items
        yield* TestTransaction.isolate(reserveAndWrite)
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect(
      "PgClient.withTransaction whose body fails rolls back and fails with the body's error, as in production",
      () =>
        Effect.gen(function* () {
          yield* items
          const inTest = yield* TestTransaction.isolate(
            Effect.zipWith(
              failingTransaction,
              Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT id FROM items`),
              (exit, rows) => ({
                exit,
                ids: rows.map((row) => row.id)
              })
            )
          )
          assert.deepStrictEqual(inTest.exit, Exit.fail("body failed"))
          assert.deepStrictEqual(inTest.ids, [1])
          assert.deepStrictEqual(yield* committedIds, [])
          const production = yield* failingTransaction
          assert.deepStrictEqual(production, Exit.fail("body failed"))
          assert.deepStrictEqual(yield* committedIds, [1])
        })
    )

    it.effect("TestTransaction.layer hands out a sandboxed PgClient too", () =>
      Effect.gen(function* () {
        yield* items
        yield* TestTransaction.isolate(Effect.zipRight(reserveAndWrite, failingTransaction)).pipe(
          Effect.provide(TestTransaction.layer())
        )
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )
  })
})
