import { readFileSync } from "node:fs"
import { Migrator, SqlClient, SqlError } from "@effect/sql"
import { assert, describe, it, layer } from "@effect/vitest"
import { Cause, Deferred, Effect, Exit, Fiber, Layer, Option, Stream } from "effect"
import { Transaction, TransactionError } from "effect-transaction"
import { CurrentDialect, type Dialect, postgres } from "../src/internal/dialect.js"
import { committedIds, idleInTransaction, insert, items, transactionError } from "./utils/fixtures.js"
import * as Recorder from "./utils/Recorder.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = TestDatabase.layer()
const Recorded = Recorder.layer.pipe(Layer.provideMerge(Db))

describe("Transaction.withTransaction", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("commits the body's writes", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.zipRight(insert(1), insert(2)).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [1, 2])
      })
    )

    it.effect("rolls back every write when the body fails", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.exit(Transaction.withTransaction(Effect.zipRight(insert(1), Effect.fail("boom"))))
        assert.deepStrictEqual(exit, Exit.fail("boom"))
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("both dual forms run the body in one transaction", () =>
      Effect.gen(function* () {
        yield* items
        const txid = Effect.flatMap(SqlClient.SqlClient, (sql) => sql<{ id: string }>`SELECT txid_current() AS id`)
        const twice = Effect.map(Effect.zip(txid, txid), ([a, b]) => a[0]!.id === b[0]!.id)
        assert.isTrue(yield* twice.pipe(Transaction.withTransaction()))
        assert.isTrue(yield* Transaction.withTransaction(twice, { isolation: "repeatable read" }))
        assert.isFalse(yield* twice)
      })
    )

    it.effect("nested transaction partial rollback", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.gen(function* () {
          yield* insert(1)
          const inner = yield* Effect.exit(
            Effect.zipRight(insert(2), Effect.fail("inner failed")).pipe(Transaction.withTransaction())
          )
          assert.deepStrictEqual(inner, Exit.fail("inner failed"))
          yield* insert(3)
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [1, 3])
      })
    )

    it.effect("the outer block goes on after a statement error aborted a nested block (25P02)", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.gen(function* () {
          yield* insert(1)
          const duplicate = yield* Effect.exit(
            Effect.zipRight(insert(2), insert(1)).pipe(Transaction.withTransaction())
          )
          assert.isTrue(Exit.isFailure(duplicate))
          yield* insert(3)
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [1, 3])
      })
    )

    it.effect("deeply nested blocks keep the writes of those that succeeded", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.gen(function* () {
          yield* insert(1)
          yield* Effect.gen(function* () {
            yield* insert(2)
            yield* Effect.ignore(Effect.zipRight(insert(3), Effect.fail("no")).pipe(Transaction.withTransaction()))
            yield* insert(4).pipe(Transaction.withTransaction())
          }).pipe(Transaction.withTransaction())
          yield* Effect.ignore(
            Effect.zipRight(insert(5).pipe(Transaction.withTransaction()), Effect.fail("no")).pipe(
              Transaction.withTransaction()
            )
          )
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [1, 2, 4])
      })
    )

    it.effect("a caught statement error makes the commit fail instead of silently rolling back", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.exit(
          Effect.gen(function* () {
            yield* insert(1)
            yield* Effect.ignore(insert(1))
            return "looked fine"
          }).pipe(Transaction.withTransaction())
        )
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "CommitFailed")
        assert.strictEqual(error.sqlState, "25P02")
        assert.match(error.message, /nothing of it was kept/)
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("a nested block that caught its own statement error is rolled back and fails", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.gen(function* () {
          yield* insert(1)
          const exit = yield* Effect.exit(
            Effect.zipRight(insert(2), Effect.ignore(insert(1))).pipe(Transaction.withTransaction())
          )
          const error = transactionError(exit)
          assert.strictEqual(error.reason, "SavepointFailed")
          assert.strictEqual(error.sqlState, "25P02")
          yield* insert(3)
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [1, 3])
      })
    )

    it.effect("a SAVEPOINT refused by an aborted transaction is a typed error", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.exit(
          Effect.gen(function* () {
            yield* insert(1)
            yield* Effect.ignore(insert(1))
            yield* insert(2).pipe(Transaction.withTransaction())
          }).pipe(Transaction.withTransaction())
        )
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "SavepointFailed")
        assert.strictEqual(error.sqlState, "25P02")
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )
  })
})

describe("savepoint hygiene", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    const transactionIdLocks = Effect.flatMap(SqlClient.SqlClient, (sql) =>
      Effect.map(
        sql<{ n: number }>`SELECT count(*)::int AS n FROM pg_locks
          WHERE pid = pg_backend_pid() AND locktype = 'transactionid'`,
        (rows) => rows[0]!.n
      )
    )

    it.effect("100 sequential nested blocks hold at most 1 + depth transactionid locks", () =>
      Effect.gen(function* () {
        yield* items
        const [insideLast, afterLast] = yield* Effect.gen(function* () {
          let insideLast = 0
          for (let i = 1; i <= 100; i++) {
            insideLast = yield* Effect.zipRight(insert(i), transactionIdLocks).pipe(Transaction.withTransaction())
          }
          return [insideLast, yield* transactionIdLocks] as const
        }).pipe(Transaction.withTransaction())
        // Inside the last nested block (depth 1): the top-level xid and the block's own.
        assert.strictEqual(insideLast, 2)
        // Back in the outermost block (depth 0): every savepoint was released.
        assert.strictEqual(afterLast, 1)
        assert.strictEqual((yield* committedIds).length, 100)
      })
    )

    it.effect("@effect/sql's own withTransaction leaves every savepoint open (the defect this fixes)", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const afterLast = yield* Effect.gen(function* () {
          for (let i = 1; i <= 100; i++) yield* sql.withTransaction(insert(i))
          return yield* transactionIdLocks
        }).pipe(sql.withTransaction)
        assert.strictEqual(afterLast, 101)
      })
    )
  })
})

describe("failures of control statements", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    const deferredFk = TestDatabase.setup(
      "DROP TABLE IF EXISTS children",
      "DROP TABLE IF EXISTS parents",
      "CREATE TABLE parents (id int PRIMARY KEY)",
      `CREATE TABLE children (id int PRIMARY KEY, parent_id int NOT NULL
         CONSTRAINT children_parent_fk REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)`
    )
    const orphan = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO children VALUES (1, 42)`)

    /** An insert whose label node-postgres cannot serialize: it fails before the database runs it. */
    const unsendable = Effect.flatMap(SqlClient.SqlClient, (sql) => {
      const circular: Record<string, unknown> = {}
      circular.self = circular
      return sql.unsafe("INSERT INTO items (id, label) VALUES ($1, $2)", [9, circular as never])
    })
    /** The error an exit failed with is the statement's own (a SqlError saying why), not a TransactionError. */
    const failedWithUnsendable = (exit: Exit.Exit<unknown, unknown>) => {
      assert.isTrue(Exit.isFailure(exit))
      const error = Exit.isFailure(exit) ? Cause.squash(exit.cause) : undefined
      assert.instanceOf(error, SqlError.SqlError)
      assert.include(String((error as SqlError.SqlError).cause), "circular structure")
    }

    it.effect("a value that cannot be sent in the first statement fails that statement, not BEGIN", () =>
      Effect.gen(function* () {
        yield* items
        failedWithUnsendable(yield* Effect.exit(unsendable.pipe(Transaction.withTransaction())))
        failedWithUnsendable(
          yield* Effect.exit(Effect.zipRight(unsendable, insert(1)).pipe(Transaction.withTransaction()))
        )
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
        // Inside a nested block, whose SAVEPOINT travels with it: the block fails, the outer one goes on.
        yield* Effect.gen(function* () {
          yield* insert(1)
          failedWithUnsendable(yield* Effect.exit(unsendable.pipe(Transaction.withTransaction())))
          yield* insert(2)
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [1, 2])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("a deferred foreign-key violation at COMMIT is a typed, catchable error", () =>
      Effect.gen(function* () {
        yield* deferredFk
        const caught = yield* orphan.pipe(
          Transaction.withTransaction(),
          Effect.as("committed"),
          Effect.catchTag("TransactionError", (error) => Effect.succeed(error))
        )
        assert.instanceOf(caught, TransactionError.TransactionError)
        const error = caught as TransactionError.TransactionError
        assert.strictEqual(error.reason, "CommitFailed")
        assert.strictEqual(error.sqlState, "23503")
        assert.strictEqual(error.constraint, "children_parent_fk")
        assert.match(error.message, /COMMIT of transaction \d+ failed: .*children_parent_fk.*nothing was committed/)
        const outside = yield* TestDatabase.TestDatabase
        assert.deepStrictEqual(yield* outside.outside("SELECT * FROM children"), [])
        assert.strictEqual(yield* idleInTransaction, 0)
        // The connection went back to the pool usable.
        const sql = yield* SqlClient.SqlClient
        yield* sql`INSERT INTO parents VALUES (42)`.pipe(Effect.zipRight(orphan), Transaction.withTransaction())
        assert.strictEqual((yield* outside.outside("SELECT * FROM children")).length, 1)
      })
    )

    it.effect("@effect/sql's own withTransaction turns the same COMMIT failure into a defect", () =>
      Effect.gen(function* () {
        yield* deferredFk
        const sql = yield* SqlClient.SqlClient
        const exit = yield* Effect.exit(sql.withTransaction(orphan))
        assert.isTrue(Exit.isFailure(exit) && Cause.isDie(exit.cause) && !Cause.isFailType(exit.cause))
      })
    )

    it.effect("a serialization failure raised at COMMIT is retryable and catchable", () =>
      Effect.gen(function* () {
        yield* TestDatabase.setup(
          "DROP TABLE IF EXISTS doctors",
          "CREATE TABLE doctors (name text PRIMARY KEY, on_call boolean NOT NULL)",
          "INSERT INTO doctors VALUES ('alice', true), ('bob', true)"
        )
        const sql = yield* SqlClient.SqlClient
        const aliceRead = yield* Deferred.make<void>()
        const bobUpdated = yield* Deferred.make<void>()
        const aliceCommitted = yield* Deferred.make<void>()
        // Classic write skew, in a fixed order: both read that two doctors are on call, both take one off, alice
        // commits first. Bob's UPDATE runs before alice's COMMIT, so the conflict can only surface at bob's COMMIT.
        const alice = Effect.gen(function* () {
          yield* sql`SELECT count(*) FROM doctors WHERE on_call`
          yield* Deferred.succeed(aliceRead, undefined)
          yield* sql`UPDATE doctors SET on_call = false WHERE name = 'alice'`
          yield* Deferred.await(bobUpdated)
        }).pipe(
          Transaction.withTransaction({ isolation: "serializable" }),
          Effect.zipRight(Deferred.succeed(aliceCommitted, undefined))
        )
        const bob = Effect.gen(function* () {
          yield* Deferred.await(aliceRead)
          yield* sql`SELECT count(*) FROM doctors WHERE on_call`
          yield* sql`UPDATE doctors SET on_call = false WHERE name = 'bob'`
          yield* Deferred.succeed(bobUpdated, undefined)
          yield* Deferred.await(aliceCommitted)
        }).pipe(Transaction.withTransaction({ isolation: "serializable" }))
        const first = yield* Effect.fork(alice)
        const second = yield* Effect.exit(bob)
        yield* Fiber.join(first)
        const error = transactionError(second)
        assert.strictEqual(error.reason, "SerializationFailure")
        assert.strictEqual(error.sqlState, "40001")
        assert.isTrue(error.isRetryable)
        const outside = yield* TestDatabase.TestDatabase
        assert.deepStrictEqual(yield* outside.outside("SELECT name FROM doctors WHERE on_call"), [{ name: "bob" }])
      })
    )

    it.effect("a dead connection: the body's error comes back with a typed RollbackFailed, and the pool recovers", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const exit = yield* Effect.exit(
          Effect.zipRight(insert(1), sql`SELECT pg_terminate_backend(pg_backend_pid())`).pipe(
            Transaction.withTransaction()
          )
        )
        assert.isTrue(Exit.isFailure(exit))
        const failures = Exit.isFailure(exit) ? Array.from(Cause.failures(exit.cause)) : []
        assert.strictEqual(failures[0]?._tag, "SqlError")
        const rollback = failures[1] as TransactionError.TransactionError
        assert.strictEqual(rollback.reason, "RollbackFailed")
        assert.match(rollback.message, /connection was closed instead of returned to the pool/)
        assert.deepStrictEqual(yield* committedIds, [])
        yield* insert(2).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [2])
      })
    )
  })

  layer(Recorded, { excludeTestServices: true })((it) => {
    const backends = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
      db.outside<{ pid: number; state: string }>(
        "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
      )
    )

    /** Succeeds once the backend `pid` has left the server (a closed connection's backend exits asynchronously). */
    const gone = (pid: number) =>
      Effect.as(
        TestDatabase.eventually(backends, (rows) => rows.every((row) => row.pid !== pid)),
        true
      )

    it.effect("a connection whose ROLLBACK failed is closed, never returned to the pool", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        recorder.failWhen = (sql) => sql === "ROLLBACK"
        const exit = yield* Effect.exit(Transaction.withTransaction(Effect.zipRight(insert(1), Effect.fail("boom"))))
        recorder.failWhen = () => false
        assert.isTrue(Exit.isFailure(exit))
        const failures = Exit.isFailure(exit) ? Array.from(Cause.failures(exit.cause)) : []
        assert.deepStrictEqual(failures[0], "boom")
        assert.strictEqual((failures[1] as TransactionError.TransactionError).reason, "RollbackFailed")
        const pid = recorder.pids[recorder.pids.length - 1]!
        // The simulated failure left that session inside its transaction: it must be gone, not pooled.
        assert.isTrue(yield* gone(pid))
        assert.deepStrictEqual(yield* committedIds, [])
        yield* insert(2).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [2])
      })
    )

    it.effect("a failed BEGIN is a typed error and the connection is closed", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        recorder.failWhen = (sql) => sql.startsWith("BEGIN")
        const exit = yield* Effect.exit(Transaction.withTransaction(insert(1)))
        recorder.failWhen = () => false
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "BeginFailed")
        assert.match(error.message, /No transaction was opened/)
        // BEGIN travels with the body's first statement.
        assert.deepStrictEqual(recorder.statements, ["BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)"])
        assert.isTrue(yield* gone(recorder.pids[recorder.pids.length - 1]!))
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("a COMMIT and then a ROLLBACK that fail: both errors in order, and the connection is closed", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        recorder.failWhen = (sql) => sql === "COMMIT" || sql === "ROLLBACK"
        const exit = yield* Effect.exit(insert(1).pipe(Transaction.withTransaction()))
        recorder.failWhen = () => false
        const failures = Exit.isFailure(exit) ? Array.from(Cause.failures(exit.cause)) : []
        const [commit, rollback] = failures as Array<TransactionError.TransactionError>
        assert.strictEqual(commit?.reason, "CommitFailed")
        assert.match(commit?.message ?? "", /whether it committed is unknown/)
        assert.strictEqual(rollback?.reason, "RollbackFailed")
        assert.deepStrictEqual(recorder.statements, [
          "BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT",
          "ROLLBACK"
        ])
        assert.isTrue(yield* gone(recorder.pids[recorder.pids.length - 1]!))
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )
  })
})

describe("the SQL a transaction sends", () => {
  layer(Recorded, { excludeTestServices: true })((it) => {
    it.effect("BEGIN, SAVEPOINT, RELEASE with the next control statement, ROLLBACK TO + RELEASE, COMMIT", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        yield* Effect.gen(function* () {
          yield* insert(1)
          yield* insert(2).pipe(Transaction.withTransaction())
          yield* insert(3).pipe(Transaction.withTransaction())
          yield* Effect.ignore(Effect.zipRight(insert(4), Effect.fail("no")).pipe(Transaction.withTransaction()))
          yield* Effect.gen(function* () {
            yield* insert(5).pipe(Transaction.withTransaction())
          }).pipe(Transaction.withTransaction())
          yield* insert(6)
        }).pipe(Transaction.withTransaction({ isolation: "repeatable read" }))
        const insertSql = "INSERT INTO items (id, label) VALUES ($1, $2)"
        // Each line is one round trip: BEGIN, SAVEPOINT and a pending RELEASE travel with the next statement.
        assert.deepStrictEqual(recorder.statements, [
          `BEGIN ISOLATION LEVEL REPEATABLE READ; ${insertSql}`,
          `SAVEPOINT etx_1; ${insertSql}`,
          `RELEASE SAVEPOINT etx_1; SAVEPOINT etx_2; ${insertSql}`,
          `RELEASE SAVEPOINT etx_2; SAVEPOINT etx_3; ${insertSql}`,
          "ROLLBACK TO SAVEPOINT etx_3; RELEASE SAVEPOINT etx_3",
          `SAVEPOINT etx_4; SAVEPOINT etx_5; ${insertSql}`,
          // etx_5's release is covered by releasing etx_4, which travels with the next statement.
          `RELEASE SAVEPOINT etx_4; ${insertSql}`,
          "COMMIT"
        ])
        assert.deepStrictEqual(yield* committedIds, [1, 2, 3, 5, 6])
      })
    )

    it.effect("a flat transaction sends nothing but BEGIN, its statements and COMMIT", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        yield* insert(1).pipe(Transaction.withTransaction())
        yield* Effect.ignore(Effect.zipRight(insert(2), Effect.fail("no")).pipe(Transaction.withTransaction()))
        assert.deepStrictEqual(recorder.statements, [
          "BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT",
          "BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)",
          "ROLLBACK"
        ])
      })
    )

    it.effect("a last nested block's RELEASE is folded into COMMIT", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        yield* insert(1).pipe(Transaction.withTransaction(), Transaction.withTransaction())
        assert.deepStrictEqual(recorder.statements, [
          "BEGIN; SAVEPOINT etx_1; INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT"
        ])
      })
    )
  })
})

describe("round trips: BEGIN and SAVEPOINT travel with the first statement", () => {
  layer(Recorded, { excludeTestServices: true })((it) => {
    it.effect("a transaction whose body sends no statement sends nothing, and still commits and runs its hooks", () =>
      Effect.gen(function* () {
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        const ran: Array<string> = []
        const outcome = yield* Effect.gen(function* () {
          yield* Transaction.afterCommit(Effect.sync(() => ran.push("afterCommit")))
          yield* Effect.void.pipe(Transaction.withTransaction())
          return "done"
        }).pipe(Transaction.withTransaction({ isolation: "serializable", statementTimeout: "1 second" }))
        const failed = yield* Effect.exit(
          Effect.zipRight(
            Transaction.afterRollback(Effect.sync(() => ran.push("afterRollback"))),
            Effect.fail("no")
          ).pipe(Transaction.withTransaction())
        )
        assert.strictEqual(outcome, "done")
        assert.deepStrictEqual(failed, Exit.fail("no"))
        assert.deepStrictEqual(ran, ["afterCommit", "afterRollback"])
        assert.deepStrictEqual(recorder.statements, [])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("a nested block whose body sends no statement sends no SAVEPOINT, whether it succeeds or fails", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        yield* Effect.gen(function* () {
          yield* insert(1)
          yield* Effect.void.pipe(Transaction.withTransaction())
          yield* Effect.ignore(Effect.fail("no").pipe(Transaction.withTransaction()))
          yield* insert(2)
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(recorder.statements, [
          "BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)",
          "INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT"
        ])
        assert.deepStrictEqual(yield* committedIds, [1, 2])
      })
    )

    it.effect("a first statement without parameters, of several statements, for values or a stream", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        yield* sql.unsafe("INSERT INTO items (id, label) VALUES (1, 'one')").pipe(Transaction.withTransaction())
        const several = "INSERT INTO items (id, label) VALUES (2, 'two'); INSERT INTO items (id, label) VALUES (3, 'x')"
        yield* sql.unsafe(several).pipe(Transaction.withTransaction())
        // Several statements: BEGIN goes first on its own, and they run only if it succeeded; all in one transaction.
        const undone = yield* Effect.exit(
          Effect.zipRight(sql.unsafe(several.replace("2,", "4,").replace("3,", "5,")), Effect.fail("no")).pipe(
            Transaction.withTransaction()
          )
        )
        assert.deepStrictEqual(undone, Exit.fail("no"))
        const values = yield* sql`SELECT id, label FROM items WHERE id = ${1}`.values.pipe(
          Transaction.withTransaction()
        )
        assert.deepStrictEqual(values, [[1, "one"]])
        const streamed = yield* Stream.runCollect(sql<{ id: number }>`SELECT id FROM items ORDER BY id`.stream).pipe(
          Transaction.withTransaction()
        )
        assert.deepStrictEqual(
          Array.from(streamed, (row) => row.id),
          [1, 2, 3]
        )
        assert.deepStrictEqual(yield* committedIds, [1, 2, 3])
        assert.deepStrictEqual(recorder.statements, [
          "BEGIN; INSERT INTO items (id, label) VALUES (1, 'one')",
          "COMMIT",
          `BEGIN; ${several}`,
          "COMMIT",
          `BEGIN; ${several.replace("2,", "4,").replace("3,", "5,")}`,
          "ROLLBACK",
          "BEGIN; SELECT id, label FROM items WHERE id = $1",
          "COMMIT",
          // A stream's cursor goes after BEGIN has been answered.
          "BEGIN",
          "SELECT id FROM items ORDER BY id",
          "COMMIT"
        ])
      })
    )

    it.effect("a BEGIN the database refuses: BeginFailed, and the statement behind it never runs", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        // BEGIN itself fails, or a statement of its round trip after it does.
        for (const begin of [["BEGIN ISOLATION LEVEL NONSENSE"], ["BEGIN", "SELECT 1/0"]]) {
          const refusing: Dialect = { ...postgres, begin: () => begin }
          for (const first of [insert(1), sql.unsafe("INSERT INTO items (id, label) VALUES (2, 'two')")]) {
            let seen: unknown
            const exit = yield* Effect.exit(
              Effect.tapError(first, (error) => Effect.sync(() => (seen = error))).pipe(
                Transaction.withTransaction(),
                Effect.provideService(CurrentDialect, refusing)
              )
            )
            const error = transactionError(exit)
            assert.strictEqual(error.reason, "BeginFailed")
            assert.match(error.message, /No transaction was opened/)
            // The statement failed with the same error inside the body (compared by value: the transaction's span
            // wraps the error it fails with).
            const inBody = (seen as { cause?: TransactionError.TransactionError }).cause
            assert.strictEqual(inBody?.reason, error.reason)
            assert.strictEqual(inBody?.message, error.message)
          }
        }
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("a SAVEPOINT the database refuses: the nested block fails with SavepointFailed and nothing is kept", () =>
      Effect.gen(function* () {
        yield* items
        const refusing: Dialect = { ...postgres, savepoint: (name) => `SAVEPOINT ${name} NONSENSE` }
        const exit = yield* Effect.exit(
          Effect.gen(function* () {
            yield* insert(1)
            const nested = yield* Effect.exit(insert(2).pipe(Transaction.withTransaction()))
            assert.strictEqual(transactionError(nested).reason, "SavepointFailed")
          }).pipe(Transaction.withTransaction(), Effect.provideService(CurrentDialect, refusing))
        )
        // The failed SAVEPOINT aborted the outer block, which is rolled back.
        assert.strictEqual(transactionError(exit).sqlState, "25P02")
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )
  })
})

describe("inside a transaction opened by other code", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("nests as a released savepoint on that transaction's connection", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const locks = sql<{ n: number }>`SELECT count(*)::int AS n FROM pg_locks
          WHERE pid = pg_backend_pid() AND locktype = 'transactionid'`
        const openSubtransactions = yield* Effect.gen(function* () {
          yield* insert(1).pipe(Transaction.withTransaction())
          yield* Effect.ignore(Effect.zipRight(insert(2), Effect.fail("no")).pipe(Transaction.withTransaction()))
          yield* insert(3)
          return (yield* locks)[0]!.n - 1
        }).pipe(sql.withTransaction)
        assert.strictEqual(openSubtransactions, 0)
        assert.deepStrictEqual(yield* committedIds, [1, 3])
        // The nested block's writes belong to the outer transaction: they go when it rolls back.
        const exit = yield* Effect.exit(
          Effect.zipRight(insert(4).pipe(Transaction.withTransaction()), Effect.fail("outer fails")).pipe(
            sql.withTransaction
          )
        )
        assert.deepStrictEqual(exit, Exit.fail("outer fails"))
        assert.deepStrictEqual(yield* committedIds, [1, 3])
      })
    )
  })
})

describe("options", () => {
  layer(Recorded, { excludeTestServices: true })((it) => {
    const show = (setting: string) =>
      Effect.flatMap(SqlClient.SqlClient, (sql) =>
        Effect.map(sql.unsafe<Record<string, string>>(`SHOW ${setting}`), (rows) => Object.values(rows[0]!)[0])
      )

    it.effect("isolation, readOnly and deferrable reach the database", () =>
      Effect.gen(function* () {
        const settings = Effect.all([
          show("transaction_isolation"),
          show("transaction_read_only"),
          show("transaction_deferrable")
        ])
        assert.deepStrictEqual(yield* settings.pipe(Transaction.withTransaction()), ["read committed", "off", "off"])
        assert.deepStrictEqual(yield* settings.pipe(Transaction.withTransaction({ isolation: "repeatable read" })), [
          "repeatable read",
          "off",
          "off"
        ])
        assert.deepStrictEqual(
          yield* settings.pipe(
            Transaction.withTransaction({ isolation: "serializable", readOnly: true, deferrable: true })
          ),
          ["serializable", "on", "on"]
        )
      })
    )

    it.effect("a read-only transaction refuses writes", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.exit(insert(1).pipe(Transaction.withTransaction({ readOnly: true })))
        const failure = Exit.isFailure(exit) ? Cause.failureOption(exit.cause) : Option.none()
        assert.strictEqual(TransactionError.databaseInfo(Option.getOrThrow(failure)).sqlState, "25006")
      })
    )

    it.effect("a nested block asking for stricter isolation is an OptionConflict naming both sides", () =>
      Effect.gen(function* () {
        const exit = yield* Effect.exit(
          Effect.void.pipe(
            Transaction.withTransaction({ isolation: "serializable" }),
            Transaction.withTransaction({ isolation: "read committed" })
          )
        )
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "OptionConflict")
        assert.match(error.message, /"serializable".*"read committed"/)
      })
    )

    it.effect("a read-write nested block inside a read-only transaction is an OptionConflict", () =>
      Effect.gen(function* () {
        const exit = yield* Effect.exit(
          Effect.void.pipe(
            Transaction.withTransaction({ readOnly: false }),
            Transaction.withTransaction({ readOnly: true })
          )
        )
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "OptionConflict")
        assert.match(error.message, /read-write.*read-only/)
      })
    )

    it.effect("a read-only nested block inside a read-write transaction is an OptionConflict, not ignored", () =>
      Effect.gen(function* () {
        const exit = yield* Effect.exit(
          Effect.void.pipe(Transaction.withTransaction({ readOnly: true }), Transaction.withTransaction())
        )
        assert.strictEqual(transactionError(exit).reason, "OptionConflict")
      })
    )

    it.effect("compatible options on a nested block are accepted", () =>
      Effect.gen(function* () {
        const inner = show("transaction_isolation").pipe(
          Transaction.withTransaction({ isolation: "repeatable read", readOnly: true })
        )
        const result = yield* inner.pipe(Transaction.withTransaction({ isolation: "serializable", readOnly: true }))
        assert.strictEqual(result, "serializable")
      })
    )

    it.effect("an unknown isolation level is an InvalidOption before anything is sent", () =>
      Effect.gen(function* () {
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        const options = { isolation: "snapshot" } as unknown as Transaction.Options
        const error = transactionError(yield* Effect.exit(Transaction.withTransaction(Effect.void, options)))
        assert.strictEqual(error.reason, "InvalidOption")
        assert.match(error.message, /"snapshot".*read committed, repeatable read, serializable/)
        assert.deepStrictEqual(recorder.statements, [])
      })
    )

    it.effect("deferrable without a serializable read-only transaction is an InvalidOption", () =>
      Effect.gen(function* () {
        const error = transactionError(
          yield* Effect.exit(Transaction.withTransaction(Effect.void, { deferrable: true }))
        )
        assert.strictEqual(error.reason, "InvalidOption")
      })
    )
  })
})

describe("interruption and lifetime", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("an interrupted body rolls back, its running statement is cancelled, the connection returns idle", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const started = yield* Deferred.make<void>()
        const fiber = yield* Effect.fork(
          Effect.gen(function* () {
            yield* insert(1)
            yield* Deferred.succeed(started, undefined)
            yield* sql`SELECT pg_sleep(30)`
          }).pipe(Transaction.withTransaction())
        )
        yield* Deferred.await(started)
        yield* Effect.sleep("100 millis")
        const exit = yield* Fiber.interrupt(fiber)
        assert.isTrue(Exit.isInterrupted(exit))
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
        const db = yield* TestDatabase.TestDatabase
        const sleeping = yield* db.outside(
          "SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'"
        )
        assert.deepStrictEqual(sleeping, [])
      })
    )

    it.effect(
      "a statement from a fiber that outlived its transaction is a TransactionClosed error, never autocommitted",
      () =>
        Effect.gen(function* () {
          yield* items
          const release = yield* Deferred.make<void>()
          const straggler = yield* Effect.gen(function* () {
            return yield* Effect.forkDaemon(Effect.zipRight(Deferred.await(release), insert(99)))
          }).pipe(Transaction.withTransaction())
          yield* Deferred.succeed(release, undefined)
          const exit = yield* Fiber.await(straggler)
          assert.isTrue(Exit.isFailure(exit))
          const failure = Exit.isFailure(exit) ? Option.getOrThrow(Cause.failureOption(exit.cause)) : undefined
          assert.strictEqual(failure?._tag, "SqlError")
          const cause = (failure as { cause: unknown }).cause as TransactionError.TransactionError
          assert.strictEqual(cause.reason, "TransactionClosed")
          assert.match(cause.message, /transaction \d+ after it ended/)
          assert.deepStrictEqual(yield* committedIds, [])
        })
    )

    it.effect("Current describes the block the fiber runs in", () =>
      Effect.gen(function* () {
        const outer = yield* Effect.gen(function* () {
          const outer = yield* Transaction.Current
          const inner = yield* Transaction.Current.pipe(Transaction.withTransaction())
          return { outer, inner, outerOpen: outer.isOpen, innerOpen: inner.isOpen }
        }).pipe(Transaction.withTransaction({ isolation: "serializable" }))
        assert.strictEqual(outer.outer.depth, 0)
        assert.strictEqual(outer.inner.depth, 1)
        assert.strictEqual(outer.inner.id, outer.outer.id)
        assert.strictEqual(outer.inner.isolation, "serializable")
        assert.isTrue(outer.outerOpen)
        assert.isFalse(outer.innerOpen)
        assert.isFalse(outer.outer.isOpen)
      })
    )
  })
})

describe("Transaction.layer", () => {
  const Wrapped = Transaction.layer.pipe(Layer.provideMerge(Recorded))

  layer(Wrapped, { excludeTestServices: true })((it) => {
    it.effect("sql.withTransaction goes through the engine: released savepoints", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        yield* Effect.gen(function* () {
          yield* sql.withTransaction(insert(1))
          yield* sql.withTransaction(insert(2))
          yield* insert(3)
        }).pipe(sql.withTransaction)
        assert.deepStrictEqual(recorder.statements, [
          "BEGIN; SAVEPOINT etx_1; INSERT INTO items (id, label) VALUES ($1, $2)",
          "RELEASE SAVEPOINT etx_1; SAVEPOINT etx_2; INSERT INTO items (id, label) VALUES ($1, $2)",
          "RELEASE SAVEPOINT etx_2; INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT"
        ])
        assert.deepStrictEqual(yield* committedIds, [1, 2, 3])
      })
    )

    it.effect("sql.withTransaction reports a COMMIT failure as a SqlError carrying the TransactionError", () =>
      Effect.gen(function* () {
        yield* TestDatabase.setup(
          "DROP TABLE IF EXISTS children",
          "DROP TABLE IF EXISTS parents",
          "CREATE TABLE parents (id int PRIMARY KEY)",
          "CREATE TABLE children (id int, parent_id int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)"
        )
        const sql = yield* SqlClient.SqlClient
        const exit = yield* Effect.exit(sql.withTransaction(sql`INSERT INTO children VALUES (1, 1)`))
        assert.isTrue(Exit.isFailure(exit) && !Cause.isDie(exit.cause))
        const failure = Exit.isFailure(exit) ? Option.getOrThrow(Cause.failureOption(exit.cause)) : undefined
        assert.strictEqual(failure?._tag, "SqlError")
        const cause = (failure as { cause: unknown }).cause as TransactionError.TransactionError
        assert.strictEqual(cause.reason, "CommitFailed")
        assert.strictEqual(cause.sqlState, "23503")
      })
    )

    it.effect("the body's own errors pass through sql.withTransaction untouched", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const inner = Effect.fail("inner").pipe(Transaction.withTransaction())
        const exit = yield* Effect.exit(sql.withTransaction(Effect.zipRight(Effect.void, inner)))
        assert.deepStrictEqual(exit, Exit.fail("inner"))
        const optionConflict = Effect.void.pipe(Transaction.withTransaction({ isolation: "serializable" }))
        const conflict = yield* Effect.exit(sql.withTransaction(optionConflict))
        assert.strictEqual(transactionError(conflict).reason, "OptionConflict")
      })
    )

    it.effect("@effect/sql's Migrator runs its migrations through the engine", () =>
      Effect.gen(function* () {
        const recorder = yield* Recorder.Recorder
        yield* TestDatabase.setup("DROP TABLE IF EXISTS effect_sql_migrations", "DROP TABLE IF EXISTS migrated")
        recorder.clear()
        const migrate = Migrator.make({})({
          loader: Migrator.fromRecord({
            "1_create": Effect.flatMap(SqlClient.SqlClient, (sql) => sql`CREATE TABLE migrated (id int)`),
            "2_seed": Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO migrated VALUES (1)`)
          })
        })
        assert.deepStrictEqual(yield* migrate, [
          [1, "create"],
          [2, "seed"]
        ])
        assert.match(recorder.statements[0]!, /^BEGIN; /)
        assert.strictEqual(recorder.statements[recorder.statements.length - 1], "COMMIT")
        const db = yield* TestDatabase.TestDatabase
        assert.deepStrictEqual(yield* db.outside("SELECT id FROM migrated"), [{ id: 1 }])
      })
    )

    it.effect("the wrapped client still runs statements, unsafe queries and reserve", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const [row] = yield* sql<{ n: number }>`SELECT ${1}::int AS n`
        assert.strictEqual(row!.n, 1)
        assert.deepStrictEqual(yield* sql.unsafe<{ n: number }>("SELECT 2 AS n"), [{ n: 2 }])
        assert.strictEqual(sql.safe, sql)
        const rows = yield* Effect.scoped(
          Effect.flatMap(sql.reserve, (conn) => conn.execute("SELECT 3 AS n", [], undefined))
        )
        assert.deepStrictEqual(rows, [{ n: 3 }])
      })
    )
  })
})

it("the dialect-free parts of the module load without a database", () => {
  assert.deepStrictEqual(Transaction.isolationLevels, ["read committed", "repeatable read", "serializable"])
})

describe("documentation", () => {
  it("docs/errors.md describes every TransactionError reason", () => {
    const page = readFileSync(new URL("../docs/errors.md", import.meta.url), "utf8")
    const missing = TransactionError.reasons.filter((reason) => !page.includes(`| \`${reason}\``))
    assert.deepStrictEqual(missing, [])
  })
})
