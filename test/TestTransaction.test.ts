import { SqlClient } from "@effect/sql"
import { assert, describe, it, layer } from "@effect/vitest"
import { Cause, Chunk, Context, Deferred, Effect, Exit, Fiber, Layer, Option, Stream } from "effect"
import { TestTransaction, Transaction } from "effect-transaction"
import { transactionControlOf } from "../src/internal/transaction.js"
import { committedIds, idleInTransaction, insert, transactionError, visibleIds } from "./utils/fixtures.js"
import * as Recorder from "./utils/Recorder.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = Recorder.layer.pipe(Layer.provideMerge(TestDatabase.layer()))

const backendPid = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.map(sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`, (rows) => rows[0]!.pid)
)

/** The items table and a deferred foreign key, committed once, empty. */
const schema = TestDatabase.setup(
  "DROP TABLE IF EXISTS items, parents, children",
  "CREATE TABLE items (id int PRIMARY KEY, label text)",
  "CREATE TABLE parents (id int PRIMARY KEY)",
  "CREATE TABLE children (id int PRIMARY KEY, parent int REFERENCES parents DEFERRABLE INITIALLY DEFERRED)"
)

const sqlError = <A, E>(exit: Exit.Exit<A, E>) => {
  assert.isTrue(Exit.isFailure(exit), "expected a failure")
  const failure = Exit.isFailure(exit) ? Cause.failureOption(exit.cause) : Option.none()
  return Option.getOrThrow(failure) as { readonly _tag: string; readonly message: string; readonly cause: unknown }
}

describe("TestTransaction.isolate", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("the test's writes are visible inside it and never committed", () =>
      Effect.gen(function* () {
        yield* schema
        const seen = yield* Effect.gen(function* () {
          yield* insert(1)
          yield* insert(2).pipe(Transaction.withTransaction())
          return yield* visibleIds
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(seen, [1, 2])
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("the code's transactions are savepoints of the test transaction; nothing is committed", () =>
      Effect.gen(function* () {
        yield* schema
        const log = yield* Recorder.Recorder
        log.clear()
        const depths = yield* Effect.gen(function* () {
          const outer = yield* Effect.gen(function* () {
            yield* insert(1)
            const inner = yield* Effect.map(Transaction.Current, (tx) => tx.depth).pipe(Transaction.withTransaction())
            return [(yield* Transaction.Current).depth, inner]
          }).pipe(Transaction.withTransaction({ isolation: "serializable" }))
          return outer
        }).pipe(TestTransaction.isolate)
        // As in production: the code's outermost transaction reads depth 0, its nested block 1.
        assert.deepStrictEqual(depths, [0, 1])
        // The code's inner transaction (etx_2) ran no statement, so it sent nothing.
        assert.deepStrictEqual(log.statements, [
          "BEGIN; SAVEPOINT etx_1; INSERT INTO items (id, label) VALUES ($1, $2)",
          "SAVEPOINT etx_3; SET CONSTRAINTS ALL IMMEDIATE; ROLLBACK TO SAVEPOINT etx_3; RELEASE SAVEPOINT etx_3",
          "ROLLBACK"
        ])
        assert.isFalse(log.statements.some((statement) => /COMMIT/.test(statement)))
      })
    )

    it.effect("a failing statement of the test does not end the test transaction", () =>
      Effect.gen(function* () {
        yield* schema
        const seen = yield* Effect.gen(function* () {
          yield* insert(1)
          const duplicate = yield* Effect.exit(insert(1))
          assert.isTrue(Exit.isFailure(duplicate))
          yield* insert(2)
          return yield* visibleIds
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(seen, [1, 2])
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("a value that cannot be sent fails its statement, first in a transaction or not; the test goes on", () =>
      Effect.gen(function* () {
        yield* schema
        const circular: Record<string, unknown> = {}
        circular.self = circular
        const unsendable = Effect.flatMap(SqlClient.SqlClient, (sql) =>
          sql.unsafe("INSERT INTO items (id, label) VALUES ($1, $2)", [9, circular as never])
        )
        const seen = yield* Effect.gen(function* () {
          // The first statement of the test, of the code's transaction, then of a nested block: each carries the
          // savepoint that opens its block.
          for (const exit of [
            yield* Effect.exit(unsendable),
            yield* Effect.exit(unsendable.pipe(Transaction.withTransaction())),
            yield* Effect.exit(
              Effect.zipRight(insert(1), Effect.exit(unsendable.pipe(Transaction.withTransaction()))).pipe(
                Effect.flatten,
                Transaction.withTransaction()
              )
            )
          ]) {
            const error = sqlError(exit)
            assert.strictEqual(error._tag, "SqlError")
            assert.include(String(error.cause), "circular structure")
          }
          yield* insert(2).pipe(Transaction.withTransaction())
          return yield* visibleIds
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(seen, [2])
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("requiresNew, sql.reserve and forked fibers stay on the test's connection", () =>
      Effect.gen(function* () {
        yield* schema
        const pids = yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const test = yield* backendPid
          const viaRequiresNew = yield* Effect.zipRight(insert(1), backendPid).pipe(
            Transaction.requiresNew(),
            Transaction.withTransaction()
          )
          const viaReserve = yield* Effect.scoped(
            Effect.gen(function* () {
              const conn = yield* sql.reserve
              yield* conn.execute("INSERT INTO items (id, label) VALUES (2, 'reserved')", [], undefined)
              const rows = yield* conn.execute("SELECT pg_backend_pid() AS pid", [], undefined)
              return (rows[0] as { pid: number }).pid
            })
          )
          const forked = yield* Fiber.join(yield* Effect.fork(Effect.zipRight(insert(3), backendPid)))
          return { test, viaRequiresNew, viaReserve, forked, ids: yield* visibleIds }
        }).pipe(TestTransaction.isolate)
        assert.strictEqual(pids.viaRequiresNew, pids.test)
        assert.strictEqual(pids.viaReserve, pids.test)
        assert.strictEqual(pids.forked, pids.test)
        assert.deepStrictEqual(pids.ids, [1, 2, 3])
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("COMMIT, ROLLBACK and BEGIN sent by the code are refused with a message; the test goes on", () =>
      Effect.gen(function* () {
        yield* schema
        const messages = yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          yield* insert(1)
          const refused: Array<string> = []
          for (const statement of ["COMMIT", "rollback", "BEGIN", "SELECT 1; END", "START TRANSACTION"]) {
            const error = sqlError(yield* Effect.exit(sql.unsafe(statement)))
            assert.strictEqual(error._tag, "SqlError")
            refused.push((error.cause as Error).message)
          }
          // Not control statements: a DO block's BEGIN ... END, and ROLLBACK TO.
          yield* sql.unsafe("DO $$ BEGIN PERFORM 1; END $$")
          yield* insert(2)
          return { refused, ids: yield* visibleIds }
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(messages.ids, [1, 2])
        assert.strictEqual(messages.refused.length, 5)
        assert.match(messages.refused[0]!, /sent "COMMIT" itself/)
        assert.match(messages.refused[0]!, /Use Transaction\.withTransaction/)
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("deferred constraints are checked where the code commits, and fail as COMMIT would", () =>
      Effect.gen(function* () {
        yield* schema
        const outcome = yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          // A child whose parent never comes: COMMIT would fail.
          const orphan = yield* Effect.exit(
            sql`INSERT INTO children VALUES (1, 42)`.pipe(Transaction.withTransaction())
          )
          // A child inserted before its parent, in one transaction: COMMIT succeeds.
          yield* Effect.zipRight(sql`INSERT INTO children VALUES (2, 7)`, sql`INSERT INTO parents VALUES (7)`).pipe(
            Transaction.withTransaction()
          )
          // After the check, the constraint is deferred again: the next transaction may still insert out of order.
          yield* Effect.zipRight(sql`INSERT INTO children VALUES (3, 8)`, sql`INSERT INTO parents VALUES (8)`).pipe(
            Transaction.withTransaction()
          )
          const children = yield* sql<{ id: number }>`SELECT id FROM children ORDER BY id`
          return { orphan, children: children.map((row) => row.id) }
        }).pipe(TestTransaction.isolate)
        const error = transactionError(outcome.orphan)
        assert.strictEqual(error.reason, "CommitFailed")
        assert.strictEqual(error.sqlState, "23503")
        assert.match(error.message, /checked by TestTransaction where the code under test commits/)
        assert.deepStrictEqual(outcome.children, [2, 3])
      })
    )

    it.effect("afterCommit hooks run at the virtual commit, afterRollback at the virtual rollback, in the test", () =>
      Effect.gen(function* () {
        yield* schema
        const seen = yield* Effect.gen(function* () {
          const seen: Array<string> = []
          yield* Effect.gen(function* () {
            yield* insert(1)
            yield* Transaction.afterCommit(Effect.map(visibleIds, (ids) => seen.push(`afterCommit sees ${ids}`)))
          }).pipe(Transaction.withTransaction())
          yield* Effect.gen(function* () {
            yield* insert(2)
            yield* Transaction.afterRollback(Effect.map(visibleIds, (ids) => seen.push(`afterRollback sees ${ids}`)))
            return yield* Effect.fail("no")
          }).pipe(Transaction.withTransaction(), Effect.ignore)
          return seen
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(seen, ["afterCommit sees 1", "afterRollback sees 1"])
      })
    )

    it.effect("captureHooks collects the hooks instead of running them", () =>
      Effect.gen(function* () {
        const result = yield* Effect.gen(function* () {
          let sent = 0
          const send = Effect.sync(() => sent++)
          const [value, hooks] = yield* TestTransaction.captureHooks(
            Effect.zipRight(Transaction.afterCommit(send), Effect.succeed("done")).pipe(Transaction.withTransaction())
          )
          const before = sent
          yield* Effect.forEach(hooks, (hook) => hook.effect)
          return { value, kinds: hooks.map((hook) => hook.kind), before, after: sent }
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(result, { value: "done", kinds: ["afterCommit"], before: 0, after: 1 })
      })
    )

    it.effect("isolation options of the code are recorded, not applied, and never fail", () =>
      Effect.gen(function* () {
        const seen = yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          return yield* Effect.gen(function* () {
            const nested = yield* Effect.map(Transaction.Current, (tx) => tx.isolation).pipe(
              Transaction.withTransaction({ isolation: "serializable", readOnly: true })
            )
            const tx = yield* Transaction.Current
            const [row] = yield* sql<{ level: string }>`SELECT current_setting('transaction_isolation') AS level`
            return { declared: tx.isolation, readOnly: tx.readOnly, nested, actual: row!.level }
          }).pipe(
            Transaction.withTransaction({ isolation: "serializable", readOnly: true, statementTimeout: "1 second" })
          )
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(seen, {
          declared: "serializable",
          readOnly: true,
          nested: "serializable",
          actual: "read committed"
        })
      })
    )

    it.effect("a fiber that outlives its test gets an error naming the fix, and writes nothing", () =>
      Effect.gen(function* () {
        yield* schema
        const leaked = yield* Effect.gen(function* () {
          return yield* Effect.forkDaemon(Effect.zipRight(Effect.sleep("100 millis"), insert(9)))
        }).pipe(TestTransaction.isolate)
        const error = sqlError(yield* Fiber.await(leaked))
        assert.match(String((error.cause as Error).message), /outlived the block or the test/)
        assert.match(String((error.cause as Error).message), /Effect\.forkDaemon/)
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.scoped("works with it.scoped: the test's scoped resources close inside its transaction", () =>
      Effect.gen(function* () {
        yield* schema
        const seen = yield* Effect.gen(function* () {
          const tx = yield* Transaction.begin()
          yield* tx.run(insert(1))
          // The handle's scope closes with the test's, before the rollback: it rolls back its own block first.
          yield* Effect.addFinalizer(() => Effect.ignore(insert(2)))
          return yield* tx.run(visibleIds)
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(seen, [1])
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("streams of the test run in a savepoint too: a failing one does not end the test transaction", () =>
      Effect.gen(function* () {
        yield* schema
        const seen = yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          yield* insert(1)
          yield* insert(2)
          const streamed = yield* Stream.runCollect(sql<{ id: number }>`SELECT id FROM items ORDER BY id`.stream)
          const failed = yield* Effect.exit(Stream.runDrain(sql`SELECT 1 / (id - 1) FROM items`.stream))
          assert.isTrue(Exit.isFailure(failed))
          yield* insert(3)
          return { streamed: Chunk.toReadonlyArray(streamed).map((row) => row.id), ids: yield* visibleIds }
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(seen, { streamed: [1, 2], ids: [1, 2, 3] })
      })
    )

    it.effect("without a SqlClient, the suite layer dies with a message naming the fix", () =>
      Effect.gen(function* () {
        const unprovided = TestTransaction.layer() as Layer.Layer<SqlClient.SqlClient>
        const exit = yield* Effect.exit(
          Effect.mapInputContext(Effect.scoped(Layer.build(unprovided)), (_: Context.Context<never>) => Context.empty())
        )
        assert.isTrue(Exit.isFailure(exit) && Cause.isDie(exit.cause))
        assert.match(Exit.isFailure(exit) ? Cause.pretty(exit.cause) : "", /TestTransaction\.layer needs a SqlClient/)
      })
    )

    it.effect("the test transaction's options are validated and applied; inside a suite they are refused", () =>
      Effect.gen(function* () {
        const level = yield* Effect.flatMap(
          SqlClient.SqlClient,
          (sql) => sql<{ level: string }>`SELECT current_setting('transaction_isolation') AS level`
        ).pipe((test) => TestTransaction.isolate(test, { isolation: "serializable" }))
        assert.strictEqual(level[0]!.level, "serializable")
        const invalid = yield* Effect.exit(
          TestTransaction.isolate(Effect.void, { isolation: "snapshot" } as unknown as Transaction.BeginOptions)
        )
        assert.strictEqual(transactionError(invalid).reason, "InvalidOption")
        const nested = yield* Effect.exit(
          TestTransaction.isolate(TestTransaction.isolate(Effect.void, { readOnly: true }))
        )
        assert.strictEqual(transactionError(nested).reason, "OptionConflict")
      })
    )

    it.effect("a nested block joining a fiber that needs the code's transaction ends at its deadlockTimeout", () =>
      Effect.gen(function* () {
        yield* schema
        const started = Date.now()
        const exit = yield* Effect.gen(function* () {
          const needsOuter = yield* Effect.fork(Effect.zipRight(Effect.sleep("20 millis"), insert(1)))
          yield* Effect.zipRight(insert(2), Fiber.join(needsOuter)).pipe(Transaction.withTransaction())
        }).pipe(Transaction.withTransaction({ deadlockTimeout: "300 millis" }), Effect.exit, TestTransaction.isolate)
        assert.isBelow(Date.now() - started, 5_000)
        const error = sqlError(exit)
        assert.match(error.message, /waited 300 ms \(deadlockTimeout\)/)
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("a code transaction waiting to start while another is open ends at its own deadlockTimeout", () =>
      Effect.gen(function* () {
        yield* schema
        const started = Date.now()
        const exit = yield* Effect.gen(function* () {
          const go = yield* Deferred.make<void>()
          const first = yield* Effect.fork(
            Effect.zipRight(insert(1), Deferred.await(go)).pipe(
              Transaction.withTransaction({ deadlockTimeout: "400 millis" })
            )
          )
          yield* Effect.sleep("20 millis")
          yield* Effect.zipRight(insert(2), Deferred.succeed(go, undefined)).pipe(
            Transaction.withTransaction({ deadlockTimeout: "400 millis" }),
            Effect.ensuring(Deferred.succeed(go, undefined))
          )
          yield* Fiber.join(first)
        }).pipe(Effect.exit, TestTransaction.isolate)
        assert.isBelow(Date.now() - started, 5_000)
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "WouldDeadlock")
        assert.match(error.message, /waited 400 ms \(deadlockTimeout\)/)
        assert.match(error.message, /take turns on the test's one connection/)
      })
    )

    it.effect(
      "a test's own statement while the test holds a Transaction.begin handle open runs, as in production",
      () =>
        Effect.gen(function* () {
          yield* schema
          const seen = yield* Effect.gen(function* () {
            const handle = yield* Transaction.begin()
            yield* handle.run(insert(1))
            // Production would run it on another pooled connection; here it runs in the open block.
            yield* insert(2)
            yield* handle.commit
            return yield* visibleIds
          }).pipe(Effect.scoped, TestTransaction.isolate)
          assert.deepStrictEqual(seen, [1, 2])
          assert.deepStrictEqual(yield* committedIds, [])
        })
    )

    it.effect("without a SqlClient, isolate dies with a message naming the fix", () =>
      Effect.gen(function* () {
        const unprovided = TestTransaction.isolate(Effect.void) as Effect.Effect<void, unknown, never>
        const exit = yield* Effect.exit(
          Effect.mapInputContext(unprovided, (_: Context.Context<never>) => Context.empty())
        )
        assert.isTrue(Exit.isFailure(exit) && Cause.isDie(exit.cause))
        assert.match(Exit.isFailure(exit) ? Cause.pretty(exit.cause) : "", /needs a SqlClient/)
      })
    )
  })
})

describe("transaction control statements", () => {
  it("are found outside quotes, dollar-quoted bodies and comments", () => {
    const cases: Array<[string, string | undefined]> = [
      ["COMMIT", "COMMIT"],
      ["  commit;", "COMMIT"],
      ["SELECT 1; ROLLBACK", "ROLLBACK"],
      ["ROLLBACK TO SAVEPOINT a; RELEASE SAVEPOINT a", undefined],
      ["DO $$ BEGIN RAISE NOTICE 'x'; END $$", undefined],
      ["CREATE FUNCTION f() RETURNS int AS $body$ BEGIN RETURN 1; END; $body$ LANGUAGE plpgsql", undefined],
      ["SELECT ';commit'", undefined],
      ["/* c */ BEGIN", "BEGIN"],
      ["-- x\nEND", "END"],
      ["start transaction", "START TRANSACTION"],
      ["SELECT 1 AS commit", undefined],
      ["PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"],
      ["abort", "ABORT"],
      ["ENDLESS", undefined]
    ]
    for (const [sql, expected] of cases) assert.strictEqual(transactionControlOf(sql), expected, sql)
  })
})
