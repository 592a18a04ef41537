import { SqlClient, SqlError } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Deferred, Duration, Effect, Exit, Fiber, Layer, Option, Schedule } from "effect"
import { Transaction, TransactionError } from "effect-transaction"
import {
  committedIds,
  insert,
  items,
  serializationFailure,
  slowCommitTable,
  transactionError
} from "./utils/fixtures.js"
import * as Recorder from "./utils/Recorder.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = TestDatabase.layer({ applicationName: "etx-options" })
const Recorded = Recorder.layer.pipe(Layer.provideMerge(Db))

const failureOf = <A, E>(exit: Exit.Exit<A, E>): unknown =>
  Exit.isFailure(exit) ? Option.getOrUndefined(Cause.failureOption(exit.cause)) : undefined

const show = (setting: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.map(sql.unsafe<Record<string, string>>(`SHOW ${setting}`), (rows) => Object.values(rows[0]!)[0])
  )

describe("timeouts", () => {
  layer(Recorded, { excludeTestServices: true })((it) => {
    it.effect(
      "statementTimeout, lockTimeout and idleTimeout travel with BEGIN in the first statement's round trip",
      () =>
        Effect.gen(function* () {
          const recorder = yield* Recorder.Recorder
          recorder.clear()
          const settings = yield* Effect.all([
            show("statement_timeout"),
            show("lock_timeout"),
            show("idle_in_transaction_session_timeout")
          ]).pipe(
            Transaction.withTransaction({
              isolation: "repeatable read",
              statementTimeout: "2 seconds",
              lockTimeout: 250,
              idleTimeout: "1 minute"
            })
          )
          assert.deepStrictEqual(settings, ["2s", "250ms", "1min"])
          assert.strictEqual(
            recorder.statements[0],
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL statement_timeout = 2000; SET LOCAL lock_timeout = 250; " +
              "SET LOCAL idle_in_transaction_session_timeout = 60000; SHOW statement_timeout"
          )
          // SET LOCAL ends with the transaction.
          assert.strictEqual(yield* show("statement_timeout").pipe(Transaction.withTransaction()), "0")
        })
    )

    it.effect("a lock wait longer than lockTimeout fails with a LockTimeout", () =>
      Effect.gen(function* () {
        yield* items
        yield* insert(1)
        const sql = yield* SqlClient.SqlClient
        const locked = yield* Deferred.make<void>()
        const done = yield* Deferred.make<void>()
        const holder = yield* Effect.fork(
          Effect.gen(function* () {
            yield* sql`SELECT * FROM items WHERE id = 1 FOR UPDATE`
            yield* Deferred.succeed(locked, undefined)
            yield* Deferred.await(done)
          }).pipe(Transaction.withTransaction())
        )
        yield* Deferred.await(locked)
        const exit = yield* Effect.exit(
          sql`UPDATE items SET id = 2 WHERE id = 1`.pipe(Transaction.withTransaction({ lockTimeout: "200 millis" }))
        )
        yield* Deferred.succeed(done, undefined)
        yield* Fiber.join(holder)
        const error = TransactionError.classify(failureOf(exit))
        assert.strictEqual(error.reason, "LockTimeout")
        assert.strictEqual(error.sqlState, "55P03")
        assert.isFalse(error.isRetryable)
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )

    it.effect("a statement longer than statementTimeout fails with a StatementTimeout", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const exit = yield* Effect.exit(
          sql`SELECT pg_sleep(5)`.pipe(Transaction.withTransaction({ statementTimeout: "200 millis" }))
        )
        assert.strictEqual(TransactionError.classify(failureOf(exit)).reason, "StatementTimeout")
      })
    )

    it.effect("a body that overruns timeout is interrupted, rolled back, and fails with Timeout", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const db = yield* TestDatabase.TestDatabase
        const exit = yield* Effect.exit(
          Effect.zipRight(insert(1), sql`SELECT pg_sleep(10)`).pipe(
            Transaction.withTransaction({ timeout: "300 millis" })
          )
        )
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "Timeout")
        assert.match(error.message, /did not finish within its timeout of 300 ms \(its body was still running\)/)
        assert.deepStrictEqual(yield* committedIds, [])
        assert.deepStrictEqual(
          yield* db.outside(
            "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'"
          ),
          []
        )
      })
    )

    it.effect("the timeout covers COMMIT: a slow deferred check fails with Timeout and nothing is committed", () =>
      Effect.gen(function* () {
        yield* slowCommitTable(3)
        const sql = yield* SqlClient.SqlClient
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        const exit = yield* Effect.exit(
          sql`INSERT INTO slow VALUES (1)`.pipe(Transaction.withTransaction({ timeout: "1 second" }))
        )
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "Timeout")
        assert.match(error.message, /COMMIT was still running/)
        assert.deepStrictEqual(recorder.statements.slice(0, 2), ["BEGIN; INSERT INTO slow VALUES (1)", "COMMIT"])
        const db = yield* TestDatabase.TestDatabase
        assert.deepStrictEqual(yield* db.outside("SELECT * FROM slow"), [])
      })
    )

    it.effect("a body idle longer than idleTimeout: the server ends the session, nothing is committed", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.exit(
          Effect.gen(function* () {
            yield* insert(1)
            yield* Effect.sleep("1500 millis")
            yield* insert(2)
          }).pipe(Transaction.withTransaction({ idleTimeout: "300 millis" }))
        )
        assert.isTrue(Exit.isFailure(exit) && !Cause.isDie(exit.cause))
        assert.include(
          ["IdleInTransactionTimeout", "ConnectionLost"],
          TransactionError.classify(failureOf(exit)).reason
        )
        assert.deepStrictEqual(yield* committedIds, [])
        yield* insert(3).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [3])
      })
    )

    it.effect("zero, negative and malformed durations are InvalidOption errors before anything is sent", () =>
      Effect.gen(function* () {
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        for (const options of [
          { timeout: 0 },
          { timeout: -5 },
          { statementTimeout: "-3 seconds" },
          { lockTimeout: "soon" },
          { idleTimeout: Number.POSITIVE_INFINITY }
        ] as ReadonlyArray<Transaction.Options>) {
          const error = transactionError(yield* Effect.exit(Transaction.withTransaction(Effect.void, options)))
          assert.strictEqual(error.reason, "InvalidOption")
          assert.match(error.message, /must be a positive, finite duration/)
        }
        assert.deepStrictEqual(recorder.statements, [])
      })
    )

    it.effect("timeouts and retry on a nested block are OptionConflicts", () =>
      Effect.gen(function* () {
        for (const options of [
          { timeout: "1 second" },
          { statementTimeout: "1 second" },
          { retry: true }
        ] as ReadonlyArray<Transaction.Options>) {
          const exit = yield* Effect.exit(
            Effect.void.pipe(Transaction.withTransaction(options), Transaction.withTransaction())
          )
          const error = transactionError(exit)
          assert.strictEqual(error.reason, "OptionConflict")
          assert.match(error.message, /applies to a whole transaction/)
        }
      })
    )
  })
})

describe("Transaction.setLocal", () => {
  layer(Recorded, { excludeTestServices: true })((it) => {
    const setting = Effect.flatMap(SqlClient.SqlClient, (sql) =>
      Effect.map(
        sql<{ value: string | null }>`SELECT current_setting('app.tenant', true) AS value`,
        (rows) => rows[0]!.value
      )
    )

    it.effect("sets a value, escaped safely, for the rest of the transaction", () =>
      Effect.gen(function* () {
        yield* items
        const nasty = `it's a "tenant" \\ with '; DROP TABLE items; --`
        const seen = yield* Effect.zipRight(Transaction.setLocal("app.tenant", nasty), setting).pipe(
          Transaction.withTransaction()
        )
        assert.strictEqual(seen, nasty)
        // The table is still there, and the setting ended with the transaction.
        assert.deepStrictEqual(yield* committedIds, [])
        assert.include([null, ""], yield* setting.pipe(Transaction.withTransaction()))
      })
    )

    it.effect("a nested block that rolls back undoes its setLocal; one that succeeds keeps it", () =>
      Effect.gen(function* () {
        const values = yield* Effect.gen(function* () {
          yield* Transaction.setLocal("app.tenant", "outer")
          yield* Effect.ignore(
            Effect.zipRight(Transaction.setLocal("app.tenant", "rolled back"), Effect.fail("no")).pipe(
              Transaction.withTransaction()
            )
          )
          const afterRollback = yield* setting
          yield* Transaction.setLocal("app.tenant", "kept").pipe(Transaction.withTransaction())
          return [afterRollback, yield* setting]
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(values, ["outer", "kept"])
      })
    )

    it.effect("a name that is not an identifier is an InvalidOption before anything is sent", () =>
      Effect.gen(function* () {
        const recorder = yield* Recorder.Recorder
        const exit = yield* Effect.exit(
          Effect.suspend(() => {
            recorder.clear()
            return Transaction.setLocal("app.tenant'; DROP TABLE items; --", "x")
          }).pipe(Transaction.withTransaction())
        )
        assert.strictEqual(transactionError(exit).reason, "InvalidOption")
        // The body sent nothing, so neither did the transaction.
        assert.deepStrictEqual(recorder.statements, [])
      })
    )
  })
})

describe("TransactionError.classify", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    const failing = (statement: string) =>
      Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(statement)).pipe(
        Transaction.withTransaction(),
        Effect.flip,
        Effect.map(TransactionError.classify)
      )

    it.effect("maps each SQLSTATE to its reason, with the constraint and isRetryable", () =>
      Effect.gen(function* () {
        yield* TestDatabase.setup(
          "DROP TABLE IF EXISTS children, parents, shapes, checked",
          "CREATE TABLE parents (id int PRIMARY KEY)",
          "CREATE TABLE children (id int, parent_id int CONSTRAINT children_parent_fk REFERENCES parents (id))",
          "CREATE TABLE checked (n int CONSTRAINT positive CHECK (n > 0), label text NOT NULL DEFAULT '')",
          "CREATE TABLE shapes (b box, CONSTRAINT no_overlap EXCLUDE USING gist (b WITH &&))",
          "INSERT INTO parents VALUES (1)",
          "INSERT INTO shapes VALUES ('((0,0),(2,2))')",
          `CREATE OR REPLACE FUNCTION raise_state(state text) RETURNS void LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'raised %', state USING ERRCODE = state; END $$`
        )
        const cases: ReadonlyArray<readonly [string, TransactionError.Reason, string | undefined, boolean]> = [
          ["INSERT INTO parents VALUES (1)", "UniqueViolation", "parents_pkey", false],
          ["INSERT INTO children VALUES (1, 42)", "ForeignKeyViolation", "children_parent_fk", false],
          ["INSERT INTO checked VALUES (-1)", "CheckViolation", "positive", false],
          ["INSERT INTO checked VALUES (1, NULL)", "NotNullViolation", undefined, false],
          ["INSERT INTO shapes VALUES ('((1,1),(3,3))')", "ExclusionViolation", "no_overlap", false],
          ["SELECT raise_state('40001')", "SerializationFailure", undefined, true],
          ["SELECT raise_state('40P01')", "Deadlock", undefined, true],
          ["SELECT raise_state('55P03')", "LockTimeout", undefined, false],
          ["SELECT raise_state('57014')", "StatementTimeout", undefined, false],
          ["SELECT raise_state('25006')", "ReadOnlyTransaction", undefined, false],
          ["SELECT raise_state('08006')", "ConnectionLost", undefined, false],
          ["SELEC 1", "Unknown", undefined, false]
        ]
        for (const [statement, reason, constraint, retryable] of cases) {
          const error = yield* failing(statement)
          assert.isTrue(TransactionError.isTransactionError(error))
          assert.isFalse(TransactionError.isTransactionError(error.cause))
          assert.strictEqual(error.reason, reason, statement)
          assert.strictEqual(error.constraint, constraint, statement)
          assert.strictEqual(error.isRetryable, retryable, statement)
          assert.instanceOf(error.cause, Error)
        }
        const readOnly = yield* Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO parents VALUES (2)`).pipe(
          Transaction.withTransaction({ readOnly: true }),
          Effect.flip,
          Effect.map(TransactionError.classify)
        )
        assert.strictEqual(readOnly.reason, "ReadOnlyTransaction")
      })
    )

    it.effect("an error without SQLSTATE is Unknown, unless the driver says the connection failed", () =>
      Effect.sync(() => {
        assert.strictEqual(TransactionError.classify(new Error("boom")).reason, "Unknown")
        assert.strictEqual(TransactionError.classify("not even an error").reason, "Unknown")
        assert.isFalse(TransactionError.isReason("ConnectionLost")(new Error("boom")))
        const lost = new SqlError.SqlError({
          message: "Failed to execute statement",
          cause: new Error("Connection terminated unexpectedly")
        })
        assert.strictEqual(TransactionError.classify(lost).reason, "ConnectionLost")
        const reset = Object.assign(new Error("write EPIPE"), { code: "EPIPE" })
        assert.strictEqual(TransactionError.databaseInfo(reset).sqlState, undefined)
        assert.strictEqual(TransactionError.classify(reset).reason, "ConnectionLost")
      })
    )

    it.effect("a terminated backend classifies as ConnectionLost", () =>
      Effect.gen(function* () {
        const error = yield* failing("SELECT pg_terminate_backend(pg_backend_pid())")
        assert.strictEqual(error.reason, "ConnectionLost")
      })
    )

    it.effect("withClassifiedErrors and isReason work with catchTag and catchIf", () =>
      Effect.gen(function* () {
        yield* items
        yield* insert(1)
        const duplicate = insert(1).pipe(Transaction.withTransaction())
        const viaTag = yield* duplicate.pipe(
          TransactionError.withClassifiedErrors,
          Effect.catchTag("TransactionError", (error) => Effect.succeed(error.reason))
        )
        assert.strictEqual(viaTag, "UniqueViolation")
        const viaIf = yield* duplicate.pipe(
          Effect.as("inserted"),
          Effect.catchIf(TransactionError.isReason("UniqueViolation"), () => Effect.succeed("duplicate"))
        )
        assert.strictEqual(viaIf, "duplicate")
      })
    )
  })
})

describe("retry", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    const accounts = 10
    const setupBank = TestDatabase.setup(
      "DROP TABLE IF EXISTS accounts",
      "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)",
      `INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, ${accounts}) g`
    )
    /** Moves money between two accounts chosen by `seed`; rows are locked in id order, so no deadlock. */
    const transfer = (seed: number) =>
      Effect.flatMap(SqlClient.SqlClient, (sql) => {
        const from = (seed % accounts) + 1
        const to = ((((seed * 7 + 3) % (accounts - 1)) + from) % accounts) + 1
        const amount = (seed % 13) + 1
        const [first, second] = from < to ? [from, to] : [to, from]
        return Effect.gen(function* () {
          const rows = yield* sql<{ id: number; balance: number }>`
            SELECT id, balance FROM accounts WHERE id IN (${first}, ${second}) ORDER BY id`
          const balance = new Map(rows.map((row) => [row.id, row.balance]))
          const delta = (id: number) => (id === from ? -amount : amount)
          yield* sql`UPDATE accounts SET balance = ${balance.get(first)! + delta(first)} WHERE id = ${first}`
          yield* sql`UPDATE accounts SET balance = ${balance.get(second)! + delta(second)} WHERE id = ${second}`
        })
      })
    const total = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
      Effect.map(
        db.outside<{ total: number }>("SELECT sum(balance)::int AS total FROM accounts"),
        (rows) => rows[0]!.total
      )
    )

    const contention = (retry: Transaction.Options["retry"], count: { retries: number }) =>
      Effect.forEach(
        Array.from({ length: 2000 }, (_, i) => i),
        (i) =>
          Effect.either(
            transfer(i).pipe(
              Transaction.withTransaction({
                isolation: "serializable",
                retry:
                  retry === true
                    ? Schedule.tapInput(Transaction.defaultRetrySchedule, () => Effect.sync(() => count.retries++))
                    : Schedule.tapInput(retry as Schedule.Schedule<unknown, unknown>, () =>
                        Effect.sync(() => count.retries++)
                      )
              })
            )
          ),
        { concurrency: 32 }
      )

    it.effect(
      "contention: 2,000 serializable transfers on 32 fibers all complete with retry",
      () =>
        Effect.gen(function* () {
          yield* setupBank
          const count = { retries: 0 }
          // 32 fibers keep the 8 connections full, so every attempt meets the same contention: allow more attempts.
          const generous = Schedule.exponential("5 millis").pipe(
            Schedule.modifyDelay((delay) => (Duration.greaterThan(delay, "200 millis") ? Duration.millis(200) : delay)),
            Schedule.jittered,
            Schedule.intersect(Schedule.recurs(100))
          )
          const results = yield* contention(generous, count)
          const failed = results.filter((result) => result._tag === "Left")
          console.log(`contention with retry: 2000 transfers, ${failed.length} failed, ${count.retries} retries`)
          assert.strictEqual(failed.length, 0)
          assert.isAbove(count.retries, 0)
          assert.strictEqual(yield* total, accounts * 1000)
        }),
      120_000
    )

    it.effect(
      "contention with retry: true: every one of 2,000 transfers on 32 fibers completes",
      () =>
        Effect.gen(function* () {
          yield* setupBank
          const count = { retries: 0 }
          const results = yield* contention(true, count)
          const failed = results.flatMap((result) => (result._tag === "Left" ? [result.left] : []))
          console.log(`contention with retry: true: 2000 transfers, ${failed.length} gave up, ${count.retries} retries`)
          assert.deepStrictEqual(failed, [])
          assert.isAbove(count.retries, 0)
          assert.strictEqual(yield* total, accounts * 1000)
        }),
      120_000
    )

    it.effect(
      "retry: true stops promptly when a transaction fails whatever the contention, with the attempt count",
      () =>
        Effect.gen(function* () {
          yield* TestDatabase.setup(
            `CREATE OR REPLACE FUNCTION always_conflicts() RETURNS void LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'always' USING ERRCODE = 'serialization_failure'; END $$`
          )
          const sql = yield* SqlClient.SqlClient
          let runs = 0
          const started = Date.now()
          const exit = yield* Effect.sync(() => runs++).pipe(
            Effect.zipRight(sql`SELECT always_conflicts()`),
            Transaction.withTransaction({ retry: true }),
            Effect.exit
          )
          const error = transactionError(exit)
          assert.strictEqual(error.reason, "SerializationFailure")
          assert.strictEqual(error.attempts, 10)
          assert.strictEqual(runs, 10)
          assert.include(error.message, "Gave up after 10 attempts")
          // Back-off of at most 200 ms between attempts: about a second in all.
          assert.isBelow(Date.now() - started, 5000)
        }),
      20_000
    )

    it.effect("a transaction that failed 4 times runs alone: other retrying transactions wait for it", () =>
      Effect.gen(function* () {
        yield* items
        const log: Array<string> = []
        let attempts = 0
        const release = yield* Deferred.make<void>()
        const starving = Effect.gen(function* () {
          attempts++
          if (attempts < 5) {
            yield* serializationFailure
            return
          }
          log.push("starving: running alone")
          yield* Deferred.await(release)
          yield* insert(1)
          log.push("starving: done")
        }).pipe(Transaction.withTransaction({ retry: Schedule.recurs(10) }))
        const fiber = yield* Effect.fork(starving)
        yield* TestDatabase.eventually(
          Effect.sync(() => log.length),
          (n) => n === 1
        )
        // A retrying transaction started now waits for the one running alone...
        const other = yield* Effect.fork(
          Effect.sync(() => log.push("other: running")).pipe(
            Effect.zipRight(insert(2)),
            Transaction.withTransaction({ retry: true })
          )
        )
        // ...and one without retry takes no part.
        yield* insert(3).pipe(Transaction.withTransaction())
        yield* Effect.sleep("50 millis")
        assert.deepStrictEqual(log, ["starving: running alone"])
        yield* Deferred.succeed(release, undefined)
        yield* Fiber.join(fiber)
        yield* Fiber.join(other)
        assert.deepStrictEqual(log, ["starving: running alone", "starving: done", "other: running"])
        assert.deepStrictEqual(yield* committedIds, [1, 2, 3])
      })
    )

    it.effect("the same workload without retry fails with typed serialization failures, never defects", () =>
      Effect.gen(function* () {
        yield* setupBank
        const exits = yield* Effect.forEach(
          Array.from({ length: 500 }, (_, i) => i),
          (i) => Effect.exit(transfer(i).pipe(Transaction.withTransaction({ isolation: "serializable" }))),
          { concurrency: 32 }
        )
        const failures = exits.filter(Exit.isFailure)
        console.log(`contention without retry: 500 transfers, ${failures.length} failed`)
        assert.isAbove(failures.length, 0)
        for (const exit of failures) {
          assert.isFalse(Cause.isDie(exit.cause))
          const error = TransactionError.classify(failureOf(exit))
          assert.strictEqual(error.reason, "SerializationFailure")
          assert.isTrue(error.isRetryable)
        }
        assert.strictEqual(yield* total, accounts * 1000)
      })
    )

    it.effect("a deadlock between two transactions: with retry both complete", () =>
      Effect.gen(function* () {
        yield* setupBank
        const sql = yield* SqlClient.SqlClient
        const bothLocked = yield* Deferred.make<void>()
        let locked = 0
        const lockBoth = (first: number, second: number) =>
          Effect.gen(function* () {
            yield* sql`UPDATE accounts SET balance = balance - 1 WHERE id = ${first}`
            if (++locked === 2) yield* Deferred.succeed(bothLocked, undefined)
            yield* Deferred.await(bothLocked)
            yield* sql`UPDATE accounts SET balance = balance + 1 WHERE id = ${second}`
          }).pipe(Transaction.withTransaction({ retry: true }))
        const [a, b] = yield* Effect.all([Effect.either(lockBoth(1, 2)), Effect.either(lockBoth(2, 1))], {
          concurrency: 2
        })
        assert.strictEqual(a._tag, "Right")
        assert.strictEqual(b._tag, "Right")
        assert.strictEqual(yield* total, accounts * 1000)
      })
    )

    it.effect("a serialization failure raised at COMMIT is retried, and hooks in the body run per attempt", () =>
      Effect.gen(function* () {
        yield* TestDatabase.setup(
          "DROP TABLE IF EXISTS committed_rows",
          "DROP SEQUENCE IF EXISTS commit_attempts",
          "CREATE SEQUENCE commit_attempts",
          "CREATE TABLE committed_rows (id int)",
          `CREATE OR REPLACE FUNCTION fail_twice() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
             IF nextval('commit_attempts') < 3 THEN RAISE EXCEPTION 'conflict at commit' USING ERRCODE = '40001'; END IF;
             RETURN NULL; END $$`,
          `CREATE CONSTRAINT TRIGGER fail_twice AFTER INSERT ON committed_rows DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION fail_twice()`
        )
        const sql = yield* SqlClient.SqlClient
        let bodies = 0
        yield* Effect.zipRight(
          Effect.sync(() => bodies++),
          sql`INSERT INTO committed_rows VALUES (1)`
        ).pipe(Transaction.withTransaction({ retry: true }))
        assert.strictEqual(bodies, 3)
        const db = yield* TestDatabase.TestDatabase
        assert.deepStrictEqual(yield* db.outside("SELECT id FROM committed_rows"), [{ id: 1 }])
      })
    )

    it.effect("when retries run out, the last error comes back with the attempt count", () =>
      Effect.gen(function* () {
        yield* TestDatabase.setup(
          `CREATE OR REPLACE FUNCTION always_conflict() RETURNS void LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'always' USING ERRCODE = '40001'; END $$`
        )
        const sql = yield* SqlClient.SqlClient
        let bodies = 0
        const exit = yield* Effect.exit(
          Effect.zipRight(
            Effect.sync(() => bodies++),
            sql`SELECT always_conflict()`
          ).pipe(Transaction.withTransaction({ retry: Schedule.recurs(2) }))
        )
        const error = transactionError(exit)
        assert.strictEqual(bodies, 3)
        assert.strictEqual(error.reason, "SerializationFailure")
        assert.strictEqual(error.attempts, 3)
        assert.match(error.message, /Gave up after 3 attempts/)
        assert.strictEqual((error.cause as { readonly _tag?: string })._tag, "SqlError")
      })
    )

    it.effect("errors that are not retryable are not retried", () =>
      Effect.gen(function* () {
        let bodies = 0
        const exit = yield* Effect.exit(
          Effect.zipRight(
            Effect.sync(() => bodies++),
            Effect.fail("not retryable")
          ).pipe(Transaction.withTransaction({ retry: true }))
        )
        assert.deepStrictEqual(exit, Exit.fail("not retryable"))
        assert.strictEqual(bodies, 1)
      })
    )
  })
})
