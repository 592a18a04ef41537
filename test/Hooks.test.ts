import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Context, Deferred, Effect, Exit, Fiber, Layer, Logger, Schedule } from "effect"
import { Transaction } from "effect-transaction"
import { committedIds, insert, items, serializationFailure, transactionError, visibleIds } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

/** Collects what the hooks saw, in order. */
const journal = () => {
  const entries: Array<string> = []
  const note = (entry: string) => Effect.sync(() => void entries.push(entry))
  return { entries, note }
}

const failuresHandler = () => {
  const failures: Array<Transaction.HookFailure> = []
  const handler = (failure: Transaction.HookFailure) => Effect.sync(() => void failures.push(failure))
  return { failures, handler }
}

class Mailer extends Context.Tag("test/Mailer")<Mailer, { readonly send: (to: string) => Effect.Effect<void> }>() {}

describe("afterCommit and afterRollback", () => {
  // One connection: a hook that ran before the connection went back to the pool could not run a statement.
  layer(TestDatabase.layer({ maxConnections: 1 }), { excludeTestServices: true })((it) => {
    it.effect("afterCommit runs once after COMMIT, outside the transaction, with the connection back in the pool", () =>
      Effect.gen(function* () {
        yield* items
        const { entries, note } = journal()
        const hook = Effect.gen(function* () {
          yield* note(`active: ${yield* Transaction.isActive}`)
          // Runs on a pooled connection: the pool has one, so the transaction's must have been released.
          yield* note(`sees: ${(yield* visibleIds).join(",")}`)
        })
        yield* Effect.gen(function* () {
          yield* insert(1)
          yield* Transaction.afterCommit(hook)
          yield* Transaction.afterRollback(note("afterRollback"))
          yield* note("body done")
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(entries, ["body done", "active: false", "sees: 1"])
      })
    )

    it.effect("afterRollback runs after a rollback, and afterCommit does not", () =>
      Effect.gen(function* () {
        yield* items
        const { entries, note } = journal()
        const exit = yield* Effect.gen(function* () {
          yield* insert(1)
          yield* Transaction.afterCommit(note("afterCommit"))
          yield* Transaction.afterRollback(
            Effect.flatMap(visibleIds, (ids) => note(`afterRollback sees: [${ids.join(",")}]`))
          )
          return yield* Effect.fail("boom")
        }).pipe(Transaction.withTransaction(), Effect.exit)
        assert.deepStrictEqual(exit, Exit.fail("boom"))
        assert.deepStrictEqual(entries, ["afterRollback sees: []"])
      })
    )

    it.effect("hooks run in registration order after the outermost commit, not when a nested block ends", () =>
      Effect.gen(function* () {
        yield* items
        const { entries, note } = journal()
        yield* Effect.gen(function* () {
          yield* Transaction.afterCommit(note("outer 1"))
          yield* Effect.gen(function* () {
            yield* Transaction.afterCommit(note("nested"))
            yield* Effect.gen(function* () {
              yield* Transaction.afterCommit(note("nested twice"))
            }).pipe(Transaction.withTransaction())
          }).pipe(Transaction.withTransaction())
          yield* note("nested blocks ended")
          yield* Transaction.afterCommit(note("outer 2"))
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(entries, ["nested blocks ended", "outer 1", "nested", "nested twice", "outer 2"])
      })
    )

    it.effect("hooks registered in a nested block that rolls back are dropped", () =>
      Effect.gen(function* () {
        yield* items
        const { entries, note } = journal()
        yield* Effect.gen(function* () {
          yield* Transaction.afterCommit(note("outer afterCommit"))
          yield* Effect.gen(function* () {
            yield* Transaction.afterCommit(note("dropped afterCommit"))
            yield* Transaction.afterRollback(note("dropped afterRollback"))
            // A block nested in the one that fails: it succeeded, but its outer block rolls it back.
            yield* Transaction.afterCommit(note("dropped inner afterCommit")).pipe(Transaction.withTransaction())
            return yield* Effect.fail("nested failure")
          }).pipe(Transaction.withTransaction(), Effect.ignore)
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(entries, ["outer afterCommit"])

        entries.length = 0
        yield* Effect.gen(function* () {
          yield* Effect.gen(function* () {
            yield* Transaction.afterRollback(note("dropped afterRollback"))
            return yield* Effect.fail("nested failure")
          }).pipe(Transaction.withTransaction(), Effect.ignore)
          yield* Transaction.afterRollback(note("outer afterRollback"))
          return yield* Effect.fail("outer failure")
        }).pipe(Transaction.withTransaction(), Effect.ignore)
        assert.deepStrictEqual(entries, ["outer afterRollback"])
      })
    )

    it.effect("with retry, only the attempt that commits runs its hooks; retried attempts keep none", () =>
      Effect.gen(function* () {
        yield* items
        const { entries, note } = journal()
        let attempt = 0
        yield* Effect.gen(function* () {
          attempt++
          const mine = attempt
          yield* Transaction.afterCommit(note(`afterCommit of attempt ${mine}`))
          yield* Transaction.afterRollback(note(`afterRollback of attempt ${mine}`))
          yield* insert(mine)
          if (mine < 3) yield* serializationFailure
        }).pipe(Transaction.withTransaction({ retry: Schedule.recurs(5) }))
        assert.deepStrictEqual(entries, ["afterCommit of attempt 3"])
        assert.deepStrictEqual(yield* committedIds, [3])
      })
    )

    it.effect("with retry, when the schedule gives up, the last attempt's afterRollback hooks run, once", () =>
      Effect.gen(function* () {
        yield* items
        const { entries, note } = journal()
        let attempt = 0
        const exit = yield* Effect.gen(function* () {
          attempt++
          yield* Transaction.afterRollback(note(`afterRollback of attempt ${attempt}`))
          yield* serializationFailure
        }).pipe(Transaction.withTransaction({ retry: Schedule.recurs(2) }), Effect.exit)
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "SerializationFailure")
        assert.strictEqual(error.attempts, 3)
        assert.deepStrictEqual(entries, ["afterRollback of attempt 3"])
      })
    )

    it.effect("interrupting the fiber that runs the transaction rolls it back and runs no hooks", () =>
      Effect.gen(function* () {
        yield* items
        const { entries, note } = journal()
        const registered = yield* Deferred.make<void>()
        const fiber = yield* Effect.fork(
          Effect.gen(function* () {
            yield* insert(1)
            yield* Transaction.afterRollback(note("afterRollback"))
            yield* Deferred.succeed(registered, undefined)
            yield* Effect.never
          }).pipe(Transaction.withTransaction())
        )
        yield* Deferred.await(registered)
        yield* Fiber.interrupt(fiber)
        assert.deepStrictEqual(entries, [])
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("a COMMIT that fails runs afterRollback, not afterCommit", () =>
      Effect.gen(function* () {
        yield* TestDatabase.setup(
          "DROP TABLE IF EXISTS child",
          "DROP TABLE IF EXISTS parent",
          "CREATE TABLE parent (id int PRIMARY KEY)",
          "CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)"
        )
        const { entries, note } = journal()
        const exit = yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          yield* sql`INSERT INTO child VALUES (1, 42)`
          yield* Transaction.afterCommit(note("afterCommit"))
          yield* Transaction.afterRollback(note("afterRollback"))
        }).pipe(Transaction.withTransaction(), Effect.exit)
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "CommitFailed")
        assert.strictEqual(error.sqlState, "23503")
        assert.deepStrictEqual(entries, ["afterRollback"])
      })
    )

    it.effect("a failing hook does not fail the committed transaction or stop the other hooks", () =>
      Effect.gen(function* () {
        yield* items
        const { entries, note } = journal()
        const { failures, handler } = failuresHandler()
        const result = yield* Effect.gen(function* () {
          yield* insert(1)
          yield* Transaction.afterCommit(Effect.fail(new Error("mail server down")))
          yield* Transaction.afterCommit(Effect.die("hook defect"))
          yield* Transaction.afterCommit(note("third hook"))
          return "body result"
        }).pipe(Transaction.withTransaction(), Effect.provideService(Transaction.HookFailureHandler, handler))
        assert.strictEqual(result, "body result")
        assert.deepStrictEqual(yield* committedIds, [1])
        assert.deepStrictEqual(entries, ["third hook"])
        assert.deepStrictEqual(
          failures.map((failure) => [failure.kind, failure.index]),
          [
            ["afterCommit", 0],
            ["afterCommit", 1]
          ]
        )
        assert.strictEqual(String(Cause.squash(failures[0]!.cause)), "Error: mail server down")
        assert.isTrue(Cause.isDie(failures[1]!.cause))
        assert.match(failures[0]!.message, /stays committed/)
        assert.isNumber(failures[0]!.transactionId)
      })
    )

    it.effect("a failing hook is logged with its cause when no handler is provided", () =>
      Effect.gen(function* () {
        const logged: Array<string> = []
        const logger = Logger.make(({ cause, logLevel, message }) => {
          logged.push(`${logLevel.label} ${String(message)} ${Cause.pretty(cause)}`)
        })
        yield* Transaction.afterRollback(Effect.fail(new Error("cleanup failed"))).pipe(
          Effect.zipRight(Effect.fail("boom")),
          Transaction.withTransaction(),
          Effect.ignore,
          Effect.provide(Logger.replace(Logger.defaultLogger, logger))
        )
        assert.strictEqual(logged.length, 1)
        assert.match(logged[0]!, /^ERROR afterRollback hook 1 of 1 of transaction \d+ failed/)
        assert.match(logged[0]!, /cleanup failed/)
      })
    )

    it.effect("a hook keeps the services of the place it was registered in", () =>
      Effect.gen(function* () {
        const { entries, note } = journal()
        const mailer = Mailer.of({ send: (to) => note(`mail to ${to}`) })
        yield* Effect.flatMap(Mailer, (m) => m.send("ada")).pipe(
          Transaction.afterCommit,
          Effect.provideService(Mailer, mailer),
          Transaction.withTransaction()
        )
        assert.deepStrictEqual(entries, ["mail to ada"])
      })
    )

    it.effect("registering a hook after the block ended is a TransactionClosed error", () =>
      Effect.gen(function* () {
        const { entries, note } = journal()
        const ended = yield* Deferred.make<void>()
        const late = yield* Effect.gen(function* () {
          return yield* Effect.fork(Effect.zipRight(Deferred.await(ended), Transaction.afterCommit(note("late hook"))))
        }).pipe(Transaction.withTransaction())
        yield* Deferred.succeed(ended, undefined)
        const exit = yield* Fiber.await(late)
        assert.strictEqual(transactionError(exit).reason, "TransactionClosed")
        assert.deepStrictEqual(entries, [])
      })
    )

    it.effect("afterCommit inside a transaction this library did not open is an Unsupported error", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const exit = yield* Transaction.afterCommit(Effect.void).pipe(
          Transaction.withTransaction(),
          sql.withTransaction,
          Effect.exit
        )
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "Unsupported")
        assert.match(error.message, /Transaction\.layer/)
      })
    )
  })

  layer(Layer.provideMerge(Transaction.layer, TestDatabase.layer()), { excludeTestServices: true })((it) => {
    // The running statement is cancelled through a second pooled connection.
    it.effect("a timed-out transaction runs afterRollback", () =>
      Effect.gen(function* () {
        const { entries, note } = journal()
        const exit = yield* Effect.gen(function* () {
          yield* Transaction.afterRollback(note("afterRollback"))
          yield* Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT pg_sleep(5)`)
        }).pipe(Transaction.withTransaction({ timeout: "200 millis" }), Effect.exit)
        assert.strictEqual(transactionError(exit).reason, "Timeout")
        assert.deepStrictEqual(entries, ["afterRollback"])
      })
    )

    it.effect("with Transaction.layer, hooks registered under sql.withTransaction run at its commit", () =>
      Effect.gen(function* () {
        const { entries, note } = journal()
        const sql = yield* SqlClient.SqlClient
        yield* Transaction.afterCommit(note("afterCommit")).pipe(Transaction.withTransaction(), sql.withTransaction)
        assert.deepStrictEqual(entries, ["afterCommit"])
      })
    )
  })
})
