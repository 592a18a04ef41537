import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Deferred, Effect, Exit, Fiber, Layer, Option } from "effect"
import { Transaction, type TransactionError } from "effect-transaction"
import * as Recorder from "./utils/Recorder.js"
import { committedIds } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

// node-postgres warns (once per process) when a query is sent while another is running on the same client. This file
// records that warning instead of printing it: its last test provokes it on purpose, through @effect/sql's own
// withTransaction, to show the engine does not.
const overlaps: Array<string> = []
const emitWarning = process.emitWarning
process.emitWarning = ((warning: string | Error, ...rest: Array<never>) => {
  const message = typeof warning === "string" ? warning : warning.message
  if (message.includes("already executing a query")) overlaps.push(message)
  else emitWarning.call(process, warning, ...rest)
}) as typeof process.emitWarning
const overlapWarnings = () => overlaps

const Db = TestDatabase.layer({ applicationName: "etx-concurrency" })

const items = TestDatabase.setup(
  "DROP TABLE IF EXISTS items",
  "CREATE TABLE items (id int PRIMARY KEY, owner text NOT NULL DEFAULT '')"
)

const insert = (id: number, owner = "") =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO items (id, owner) VALUES (${id}, ${owner})`)

const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i)

const sessions = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
  db.outside<{ pid: number; state: string }>(
    "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'etx-concurrency'"
  )
)

/** A hang becomes a test failure instead of a time-out of the whole file. */
const noDeadlock = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.timeoutFail(effect, { duration: "15 seconds", onTimeout: () => "deadlock: the program did not finish" })

const failureOf = <A, E>(exit: Exit.Exit<A, E>) =>
  Exit.isFailure(exit) ? Option.getOrUndefined(Cause.failureOption(exit.cause)) : undefined

describe("fibers inside a transaction", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("forked fibers run their statements on the transaction's connection", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const pids = yield* Effect.gen(function* () {
          const pids = yield* Effect.forEach(
            range(1, 20),
            (id) => Effect.zipRight(insert(id), sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`),
            { concurrency: "unbounded" }
          )
          const forked = yield* Effect.fork(sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`)
          return [...pids, yield* Fiber.join(forked)].map((rows) => rows[0]!.pid)
        }).pipe(Transaction.withTransaction())
        assert.strictEqual(new Set(pids).size, 1)
        assert.deepStrictEqual(yield* committedIds, range(1, 20))
      })
    )

    it.effect("the writes of forked fibers roll back with their transaction", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.exit(
          Effect.forEach(range(1, 10), (id) => insert(id), { concurrency: "unbounded" }).pipe(
            Effect.zipRight(Effect.fail("boom")),
            Transaction.withTransaction()
          )
        )
        assert.deepStrictEqual(exit, Exit.fail("boom"))
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("two concurrent nested blocks where one fails keep every row of the other", () =>
      Effect.gen(function* () {
        yield* items
        const [kept, failed] = yield* Effect.all(
          [
            Effect.forEach(range(1, 5), (id) => insert(id), { discard: true }).pipe(Transaction.withTransaction()),
            Effect.forEach(range(6, 10), (id) => insert(id), { discard: true }).pipe(
              Effect.zipRight(Effect.fail("second block fails")),
              Transaction.withTransaction()
            )
          ],
          { concurrency: 2, mode: "either" }
        ).pipe(Transaction.withTransaction())
        assert.isTrue(kept._tag === "Right")
        assert.isTrue(failed._tag === "Left")
        assert.deepStrictEqual(yield* committedIds, range(1, 5))
      })
    )

    it.effect("concurrent nested blocks behave as if run one after another", () =>
      Effect.gen(function* () {
        yield* TestDatabase.setup("DROP TABLE IF EXISTS seq", "CREATE TABLE seq (n int PRIMARY KEY)")
        const sql = yield* SqlClient.SqlClient
        // Read the maximum, then write the next number: two interleaved blocks would write the same number.
        const next = Effect.gen(function* () {
          const [row] = yield* sql<{ n: number }>`SELECT coalesce(max(n), 0)::int AS n FROM seq`
          yield* Effect.yieldNow()
          yield* sql`INSERT INTO seq VALUES (${row!.n + 1})`
        }).pipe(Transaction.withTransaction())
        yield* Effect.forEach(range(1, 30), () => next, { concurrency: "unbounded", discard: true }).pipe(
          Transaction.withTransaction(),
          noDeadlock
        )
        const db = yield* TestDatabase.TestDatabase
        const rows = yield* db.outside<{ n: number }>("SELECT n FROM seq ORDER BY n")
        assert.deepStrictEqual(
          rows.map((row) => row.n),
          range(1, 30)
        )
      })
    )
  })
})

describe("the SQL concurrent blocks send", () => {
  layer(Recorder.layer.pipe(Layer.provideMerge(Db)), { excludeTestServices: true })((it) => {
    it.effect("two concurrent nested blocks run one after the other, each with its own savepoint", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        const block = (ids: ReadonlyArray<number>, fails: boolean) =>
          Effect.forEach(ids, (id) => insert(id), { discard: true }).pipe(
            Effect.zipRight(fails ? Effect.fail("fails") : Effect.void),
            Transaction.withTransaction(),
            Effect.either
          )
        yield* Effect.all([block([1, 2], false), block([3, 4], true), block([5], false)], {
          concurrency: "unbounded"
        }).pipe(Transaction.withTransaction())
        const insertSql = "INSERT INTO items (id, owner) VALUES ($1, $2)"
        assert.deepStrictEqual(recorder.statements, [
          `BEGIN; SAVEPOINT etx_1; ${insertSql}`,
          insertSql,
          `RELEASE SAVEPOINT etx_1; SAVEPOINT etx_2; ${insertSql}`,
          insertSql,
          "ROLLBACK TO SAVEPOINT etx_2; RELEASE SAVEPOINT etx_2",
          `SAVEPOINT etx_3; ${insertSql}`,
          "COMMIT"
        ])
        assert.deepStrictEqual(yield* committedIds, [1, 2, 5])
      })
    )

    it.effect("an outer block ending before its forked nested block rolls that block back before COMMIT", () =>
      Effect.gen(function* () {
        yield* items
        const recorder = yield* Recorder.Recorder
        recorder.clear()
        const inBlock = yield* Deferred.make<void>()
        const straggler = yield* Effect.gen(function* () {
          yield* insert(1)
          const fiber = yield* Effect.forkDaemon(
            Effect.zipRight(insert(2), Deferred.succeed(inBlock, undefined)).pipe(
              Effect.zipRight(Effect.never),
              Transaction.withTransaction()
            )
          )
          yield* Deferred.await(inBlock)
          return fiber
        }).pipe(Transaction.withTransaction())
        assert.isTrue(Exit.isInterrupted(yield* Fiber.interrupt(straggler)))
        const insertSql = "INSERT INTO items (id, owner) VALUES ($1, $2)"
        assert.deepStrictEqual(recorder.statements, [
          `BEGIN; ${insertSql}`,
          `SAVEPOINT etx_1; ${insertSql}`,
          "ROLLBACK TO SAVEPOINT etx_1; RELEASE SAVEPOINT etx_1",
          "COMMIT"
        ])
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )
  })
})

describe("no deadlock in the ordinary patterns", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("parallel nested blocks", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.forEach(range(1, 12), (id) => insert(id).pipe(Transaction.withTransaction()), {
          concurrency: "unbounded",
          discard: true
        }).pipe(Transaction.withTransaction(), noDeadlock)
        assert.deepStrictEqual(yield* committedIds, range(1, 12))
      })
    )

    it.effect("a nested block that forks children and joins them", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.gen(function* () {
          const children = yield* Effect.forEach(range(1, 6), (id) =>
            Effect.fork(id % 2 === 0 ? insert(id).pipe(Transaction.withTransaction()) : insert(id))
          )
          yield* Fiber.joinAll(children)
        }).pipe(Transaction.withTransaction(), Transaction.withTransaction(), noDeadlock)
        assert.deepStrictEqual(yield* committedIds, range(1, 6))
      })
    )

    it.effect("statements of the parent fiber while a child's nested block runs", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const order: Array<string> = []
        yield* Effect.gen(function* () {
          const started = yield* Deferred.make<void>()
          const child = yield* Effect.fork(
            Effect.gen(function* () {
              yield* insert(1)
              yield* Deferred.succeed(started, undefined)
              yield* sql`SELECT pg_sleep(0.2)`
              yield* insert(2)
              order.push("child block ends")
            }).pipe(Transaction.withTransaction())
          )
          yield* Deferred.await(started)
          // Waits until the child's block has ended: the block owns the connection.
          yield* insert(3)
          order.push("parent statement ran")
          yield* Fiber.join(child)
        }).pipe(Transaction.withTransaction(), noDeadlock)
        assert.deepStrictEqual(order, ["child block ends", "parent statement ran"])
        assert.deepStrictEqual(yield* committedIds, [1, 2, 3])
      })
    )

    it.effect("nested blocks three levels deep in parallel", () =>
      Effect.gen(function* () {
        yield* items
        const level = (base: number, depth: number): Effect.Effect<void, unknown, SqlClient.SqlClient> =>
          Effect.zipRight(
            insert(base),
            depth === 3
              ? Effect.void
              : Effect.forEach([1, 2], (i) => level(base * 10 + i, depth + 1), {
                  concurrency: "unbounded",
                  discard: true
                })
          ).pipe(Transaction.withTransaction())
        yield* Effect.forEach([1, 2, 3], (i) => level(i, 1), { concurrency: "unbounded", discard: true }).pipe(
          Transaction.withTransaction(),
          noDeadlock
        )
        // 3 blocks at depth 1, 6 at depth 2, 12 at depth 3.
        assert.strictEqual((yield* committedIds).length, 21)
      })
    )

    it.effect("a failing block among parallel ones rolls back alone, whatever the interleaving", () =>
      Effect.gen(function* () {
        yield* items
        const outcomes = yield* Effect.forEach(
          range(1, 20),
          (id) =>
            Effect.zipRight(insert(id), id % 3 === 0 ? Effect.fail(id) : Effect.void).pipe(
              Transaction.withTransaction(),
              Effect.either
            ),
          { concurrency: "unbounded" }
        ).pipe(Transaction.withTransaction(), noDeadlock)
        assert.strictEqual(outcomes.filter((outcome) => outcome._tag === "Left").length, 6)
        assert.deepStrictEqual(
          yield* committedIds,
          range(1, 20).filter((id) => id % 3 !== 0)
        )
      })
    )
  })
})

describe("lifetime", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("a nested block still running when its outer block ends is rolled back and closed", () =>
      Effect.gen(function* () {
        yield* items
        const inBlock = yield* Deferred.make<void>()
        const goOn = yield* Deferred.make<void>()
        const straggler = yield* Effect.gen(function* () {
          yield* insert(1)
          const fiber = yield* Effect.forkDaemon(
            Effect.gen(function* () {
              yield* insert(2)
              yield* Deferred.succeed(inBlock, undefined)
              yield* Deferred.await(goOn)
              yield* insert(3)
            }).pipe(Transaction.withTransaction())
          )
          yield* Deferred.await(inBlock)
          return fiber
        }).pipe(Transaction.withTransaction())
        yield* Deferred.succeed(goOn, undefined)
        const exit = yield* Fiber.await(straggler)
        const failure = failureOf(exit) as { readonly _tag: string; readonly cause?: unknown } | undefined
        assert.strictEqual(failure?._tag, "SqlError")
        assert.strictEqual(
          (failure?.cause as TransactionError.TransactionError | undefined)?.reason,
          "TransactionClosed"
        )
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )

    it.effect("a daemon fiber that outlives its transaction opens a transaction of its own afterwards", () =>
      Effect.gen(function* () {
        yield* items
        const goOn = yield* Deferred.make<void>()
        const fiber = yield* Effect.forkDaemon(Deferred.await(goOn)).pipe(
          Effect.flatMap((waiting) =>
            Effect.forkDaemon(
              Effect.zipRight(
                Fiber.join(waiting),
                Effect.zipRight(insert(7), Transaction.isActive).pipe(Transaction.withTransaction())
              )
            )
          ),
          Transaction.withTransaction()
        )
        yield* Deferred.succeed(goOn, undefined)
        assert.isTrue(yield* Fiber.join(fiber))
        assert.deepStrictEqual(yield* committedIds, [7])
      })
    )
  })
})

describe("interruption, time-outs and lost connections", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    const noneIdleInTransaction = Effect.map(sessions, (rows) =>
      rows.filter((row) => row.state.startsWith("idle in transaction"))
    )
    const running = (query: string) =>
      Effect.flatMap(TestDatabase.TestDatabase, (db) =>
        db.outside("SELECT pid FROM pg_stat_activity WHERE query = $1 AND state = 'active'", [query])
      )

    it.effect("Effect.timeout around a transaction cancels the running statement and rolls back", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const result = yield* Effect.zipRight(insert(1), sql`SELECT pg_sleep(30)`).pipe(
          Transaction.withTransaction(),
          Effect.timeout("300 millis"),
          Effect.either
        )
        assert.strictEqual(result._tag, "Left")
        assert.deepStrictEqual(yield* running("SELECT pg_sleep(30)"), [])
        assert.deepStrictEqual(yield* noneIdleInTransaction, [])
        assert.deepStrictEqual(yield* committedIds, [])
        yield* insert(2).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [2])
      })
    )

    it.effect("interrupting concurrent statements of one transaction never overlaps them on the connection", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const fiber = yield* Effect.fork(
          Effect.forEach(range(1, 8), (id) => Effect.zipRight(insert(id), sql`SELECT pg_sleep(0.05)`), {
            concurrency: "unbounded",
            discard: true
          }).pipe(Transaction.withTransaction())
        )
        yield* Effect.sleep("120 millis")
        yield* Fiber.interrupt(fiber)
        assert.deepStrictEqual(yield* committedIds, [])
        assert.deepStrictEqual(yield* noneIdleInTransaction, [])
        yield* insert(9).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [9])
      })
    )

    it.effect("a backend terminated mid-transaction: typed errors, the connection is dropped, the pool recovers", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const db = yield* TestDatabase.TestDatabase
        const exit = yield* Effect.exit(
          Effect.gen(function* () {
            yield* insert(1)
            const [{ pid }] = (yield* sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`) as [{ pid: number }]
            yield* db.outside("SELECT pg_terminate_backend($1)", [pid])
            yield* insert(2)
          }).pipe(Transaction.withTransaction())
        )
        assert.isTrue(Exit.isFailure(exit))
        const failures = Exit.isFailure(exit) ? Array.from(Cause.failures(exit.cause)) : []
        assert.strictEqual(failures[0]?._tag, "SqlError")
        assert.strictEqual((failures[1] as TransactionError.TransactionError | undefined)?.reason, "RollbackFailed")
        assert.isFalse(Exit.isFailure(exit) && Cause.isDie(exit.cause))
        assert.deepStrictEqual(yield* committedIds, [])
        // Every remaining session is usable: eight transactions at once, one per pooled connection.
        yield* Effect.forEach(range(10, 17), (id) => insert(id).pipe(Transaction.withTransaction()), {
          concurrency: "unbounded",
          discard: true
        })
        assert.deepStrictEqual(yield* committedIds, range(10, 17))
        assert.deepStrictEqual(yield* noneIdleInTransaction, [])
      })
    )
  })
})

describe("node-postgres sees one statement at a time", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("concurrent fibers sharing a transaction raise no overlapping-query warning (and @effect/sql's do)", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const burst = Effect.forEach(range(1, 40), (id) => insert(id), { concurrency: "unbounded", discard: true })
        yield* burst.pipe(Transaction.withTransaction())
        yield* Effect.forEach(range(41, 60), (id) => insert(id).pipe(Transaction.withTransaction()), {
          concurrency: "unbounded",
          discard: true
        }).pipe(Transaction.withTransaction())
        yield* Effect.yieldNow()
        assert.deepStrictEqual(overlapWarnings(), [])
        // The same burst through @effect/sql's own withTransaction: the warning this library prevents.
        yield* items
        yield* sql.withTransaction(burst)
        yield* Effect.sleep("10 millis")
        assert.strictEqual(overlapWarnings().length, 1)
      })
    )
  })
})
