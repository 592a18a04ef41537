/**
 * TestTransaction does not rely on recognising control statements alone: after every statement it checks the
 * transaction status the database sent with the answer. Here the recognition is switched off, so that a COMMIT
 * gets through, and the check must catch it.
 */
import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Effect, Exit } from "effect"
import { TestTransaction, Transaction } from "effect-transaction"
import { vi } from "vitest"
import { committedIds, insert, items } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

vi.mock("../src/internal/sqlScan.js", async (importOriginal) => {
  const original = await importOriginal<typeof import("../src/internal/sqlScan.js")>()
  return { ...original, transactionControlOf: () => undefined }
})

const Db = TestDatabase.layer({ applicationName: "etx-test-status" })

const failureText = <A, E>(exit: Exit.Exit<A, E>) => (Exit.isFailure(exit) ? Cause.pretty(exit.cause) : "")

const commit = Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe("COMMIT"))

describe("a statement that ends the test transaction behind TestTransaction's back", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("fails that statement and the test, even when the test catches the error", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.gen(function* () {
          yield* insert(1)
          const escaped = yield* Effect.exit(commit)
          const after = yield* Effect.exit(insert(2))
          return { escaped: failureText(escaped), after: failureText(after) }
        }).pipe(
          Effect.tap(({ escaped, after }) =>
            Effect.sync(() => {
              assert.match(escaped, /TestTransaction: the test transaction ended: after the statement "COMMIT"/)
              assert.match(after, /which had ended: the test transaction ended/)
            })
          ),
          TestTransaction.isolate,
          Effect.exit
        )
        assert.match(failureText(exit), /may have been committed for real/)
        // What the check cannot undo: the row before the COMMIT was committed. Nothing after it was.
        assert.deepStrictEqual(yield* committedIds, [1])
        // The pool is healthy: the next test gets a test transaction of its own.
        yield* TestTransaction.isolate(insert(3))
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )

    it.effect("the same from inside the code's own transaction", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.zipRight(insert(1), commit).pipe(
          Transaction.withTransaction(),
          Effect.zipRight(insert(2)),
          TestTransaction.isolate,
          Effect.exit
        )
        assert.match(failureText(exit), /the test transaction ended: after the statement "COMMIT"/)
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )

    it.effect("the test fails with the ended transaction first when the code swallowed the error; no hook runs", () =>
      Effect.gen(function* () {
        yield* items
        const ran: Array<string> = []
        const exit = yield* Effect.gen(function* () {
          yield* Transaction.afterRollback(Effect.sync(() => ran.push("afterRollback")))
          yield* Transaction.afterCommit(Effect.sync(() => ran.push("afterCommit")))
          yield* insert(1)
          yield* Effect.ignore(commit)
        }).pipe(Transaction.withTransaction(), TestTransaction.isolate, Effect.exit)
        assert.isTrue(Exit.isFailure(exit))
        const first = Exit.isFailure(exit) ? Cause.failures(exit.cause).pipe((all) => [...all][0]) : undefined
        assert.match(String((first as { message?: string }).message), /^TestTransaction: the test transaction ended/)
        assert.deepStrictEqual(ran, [])
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )

    it.effect("in a suite that shares a test transaction, later tests fail instead of running outside it", () =>
      Effect.gen(function* () {
        yield* items
        const later = yield* Effect.gen(function* () {
          yield* Effect.exit(TestTransaction.isolate(Effect.zipRight(insert(1), commit)))
          return yield* Effect.exit(TestTransaction.isolate(insert(2)))
        }).pipe(Effect.provide(TestTransaction.layer()))
        assert.match(failureText(later), /which had ended: the test transaction ended/)
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )
  })
})
