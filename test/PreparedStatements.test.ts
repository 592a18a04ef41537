/**
 * `Transaction.PreparedStatements`: a transaction's statements with parameters run as statements its pooled
 * connection keeps prepared, parsed once per connection; whatever ends or breaks a prepared statement (its first run
 * failing, the table's columns changing, a DEALLOCATE) costs at most one failed run, never a connection that keeps
 * failing. One connection, so that every transaction meets the statements the one before it left.
 */
import { SqlClient, SqlError } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Effect, Exit } from "effect"
import { TestTransaction, Transaction, TransactionError } from "effect-transaction"
import * as TestDatabase from "./utils/TestDatabase.js"

interface PreparedRow {
  readonly name: string
  readonly statement: string
  readonly runs: number
}

/** The statements the connection keeps prepared, read on it (a statement without parameters is never prepared). */
const prepared = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  sql<PreparedRow>`SELECT name, statement, (generic_plans + custom_plans)::int AS runs FROM pg_prepared_statements ORDER BY name`.pipe(
    Effect.map((rows) => rows.map((row) => ({ name: row.name, statement: row.statement, runs: row.runs })))
  )
)

const preparedNow = prepared.pipe(Transaction.withTransaction())

/** Each statement the connection keeps, with how often it ran since it was parsed. */
const runsNow = Effect.map(preparedNow, (rows) => rows.map(({ runs, statement }) => ({ runs, statement })))

/** The texts of the statements the connection keeps. */
const textsNow = Effect.map(preparedNow, (rows) => rows.map(({ statement }) => statement))

const insertItem = (id: number, label: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO items (id, label) VALUES (${id}, ${label})`)

const readItem = (id: number) =>
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) => sql<{ id: number; label: string }>`SELECT id, label FROM items WHERE id = ${id}`
  )

const insertText = "INSERT INTO items (id, label) VALUES ($1, $2)"
const readText = "SELECT id, label FROM items WHERE id = $1"

/** The SQLSTATE of the database error a failed statement carries. */
const codeOf = (exit: Exit.Exit<unknown, unknown>): unknown => {
  if (!Exit.isFailure(exit)) return "succeeded"
  const failure = Cause.squash(exit.cause)
  let error: unknown = failure
  while (error instanceof SqlError.SqlError || (error as { cause?: unknown })?.cause !== undefined) {
    const code = (error as { code?: unknown }).code
    if (typeof code === "string") return code
    error = (error as { cause?: unknown }).cause
  }
  return (error as { code?: unknown })?.code
}

/** A fresh table, and no prepared statement left (DEALLOCATE through a transaction, which the engine sees). */
const reset = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.zipRight(sql`DEALLOCATE ALL`.pipe(Transaction.withTransaction()), sql`DROP TABLE IF EXISTS items`)
).pipe(
  Effect.zipRight(
    Effect.flatMap(SqlClient.SqlClient, (sql) => sql`CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL)`)
  ),
  Effect.orDie
)

describe("Transaction.PreparedStatements", () => {
  layer(TestDatabase.layer({ maxConnections: 1 }), { excludeTestServices: true })((it) => {
    it.effect("a transaction's statements with parameters are parsed once per connection, then bound and run", () =>
      Effect.gen(function* () {
        yield* reset
        for (let id = 1; id <= 3; id++) {
          const rows = yield* Effect.zipRight(insertItem(id, `item ${id}`), readItem(id)).pipe(
            Transaction.withTransaction()
          )
          assert.deepStrictEqual(rows, [{ id, label: `item ${id}` }])
        }
        assert.deepStrictEqual(yield* runsNow, [
          { runs: 3, statement: insertText },
          { runs: 3, statement: readText }
        ])
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("by default nothing is prepared", () =>
      Effect.gen(function* () {
        yield* reset
        yield* Effect.zipRight(insertItem(1, "one"), readItem(1)).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* preparedNow, [])
      })
    )

    it.effect("a count that is not a whole number from 0 to 1,000,000 is an InvalidOption, and nothing is sent", () =>
      Effect.gen(function* () {
        yield* reset
        for (const bad of [-1, 2.5, Number.NaN, Number.POSITIVE_INFINITY, 1_000_001]) {
          const exit = yield* Effect.exit(
            insertItem(1, "one").pipe(
              Transaction.withTransaction(),
              Effect.provideService(Transaction.PreparedStatements, bad)
            )
          )
          const error = Exit.isFailure(exit) ? Cause.squash(exit.cause) : undefined
          assert.instanceOf(error, TransactionError.TransactionError)
          assert.strictEqual((error as TransactionError.TransactionError).reason, "InvalidOption")
          assert.include((error as TransactionError.TransactionError).message, `is ${bad}:`)
        }
        // Nothing ran, and the pool's only connection still serves.
        assert.deepStrictEqual(yield* readItem(1).pipe(Transaction.withTransaction()), [])
        yield* insertItem(1, "one").pipe(
          Transaction.withTransaction(),
          Effect.provideService(Transaction.PreparedStatements, 0)
        )
        assert.deepStrictEqual(yield* readItem(1), [{ id: 1, label: "one" }])
      })
    )

    it.effect("a statement outside transactions is never prepared", () =>
      Effect.gen(function* () {
        yield* reset
        yield* Effect.zipRight(insertItem(1, "one"), readItem(1))
        assert.deepStrictEqual(yield* preparedNow, [])
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("a statement whose result columns changed fails once with the database's error, then runs again", () =>
      Effect.gen(function* () {
        yield* reset
        const db = yield* TestDatabase.TestDatabase
        const readAll = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT * FROM items WHERE id = ${1}`)
        yield* insertItem(1, "one").pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* readAll.pipe(Transaction.withTransaction()), [{ id: 1, label: "one" }])
        yield* db.outside("ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 7")
        const changed = yield* Effect.exit(readAll.pipe(Transaction.withTransaction()))
        assert.strictEqual(codeOf(changed), "0A000")
        assert.deepStrictEqual(yield* readAll.pipe(Transaction.withTransaction()), [{ id: 1, label: "one", extra: 7 }])
        assert.deepStrictEqual(yield* readAll.pipe(Transaction.withTransaction()), [{ id: 1, label: "one", extra: 7 }])
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("a statement whose first run failed is prepared afresh the next time", () =>
      Effect.gen(function* () {
        yield* reset
        const readOther = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT n FROM other WHERE n = ${1}`)
        const missing = yield* Effect.exit(readOther.pipe(Transaction.withTransaction()))
        assert.strictEqual(codeOf(missing), "42P01")
        yield* Effect.flatMap(SqlClient.SqlClient, (sql) => sql`CREATE TABLE other AS SELECT 1 AS n`)
        for (let run = 0; run < 3; run++) {
          assert.deepStrictEqual(yield* readOther.pipe(Transaction.withTransaction()), [{ n: 1 }])
        }
        assert.deepStrictEqual(yield* runsNow, [{ runs: 3, statement: "SELECT n FROM other WHERE n = $1" }])
        yield* Effect.flatMap(SqlClient.SqlClient, (sql) => sql`DROP TABLE other`)
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("a prepared statement's own failure (a duplicate key) keeps it prepared", () =>
      Effect.gen(function* () {
        yield* reset
        yield* insertItem(1, "one").pipe(Transaction.withTransaction())
        const before = yield* preparedNow
        const duplicate = yield* Effect.exit(insertItem(1, "again").pipe(Transaction.withTransaction()))
        assert.strictEqual(codeOf(duplicate), "23505")
        yield* insertItem(2, "two").pipe(Transaction.withTransaction())
        const after = yield* preparedNow
        assert.strictEqual(after.length, 1)
        assert.strictEqual(after[0]!.name, before[0]!.name)
        assert.strictEqual(after[0]!.runs, 3)
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("DEALLOCATE ALL in a transaction: the statements are prepared again", () =>
      Effect.gen(function* () {
        yield* reset
        yield* Effect.zipRight(insertItem(1, "one"), readItem(1)).pipe(Transaction.withTransaction())
        // After a comment too: the engine sees the statement for what it is.
        yield* Effect.flatMap(SqlClient.SqlClient, (sql) =>
          sql.unsafe("-- start again\n/* all */ DEALLOCATE ALL")
        ).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* preparedNow, [])
        assert.deepStrictEqual(yield* readItem(1).pipe(Transaction.withTransaction()), [{ id: 1, label: "one" }])
        assert.deepStrictEqual(yield* runsNow, [{ runs: 1, statement: readText }])
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect(
      "statements deallocated behind the engine's back: one failed statement in all, then all prepared again",
      () =>
        Effect.gen(function* () {
          yield* reset
          const sql = yield* SqlClient.SqlClient
          const reads = [1, 2, 3].map((k) =>
            Effect.flatMap(SqlClient.SqlClient, (sql) =>
              sql.unsafe(`SELECT ${k} AS k, label FROM items WHERE id = $1`, [1])
            )
          )
          yield* insertItem(1, "one").pipe(Transaction.withTransaction())
          yield* Effect.all(reads).pipe(Transaction.withTransaction())
          // Outside any transaction: the pool's only connection, not through the engine.
          yield* sql`DEALLOCATE ALL`
          const lost = yield* Effect.exit(Effect.all(reads).pipe(Transaction.withTransaction()))
          assert.strictEqual(codeOf(lost), "26000")
          for (let run = 0; run < 2; run++) {
            const rows = yield* Effect.all(reads).pipe(Transaction.withTransaction())
            assert.deepStrictEqual(rows, [[{ k: 1, label: "one" }], [{ k: 2, label: "one" }], [{ k: 3, label: "one" }]])
          }
          assert.strictEqual((yield* preparedNow).length, 3)
        }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("a column's type changed under a prepared statement: it fails at most once, then is prepared again", () =>
      Effect.gen(function* () {
        yield* reset
        const db = yield* TestDatabase.TestDatabase
        yield* db.outside("CREATE TABLE coded (id int PRIMARY KEY, code int NOT NULL)")
        yield* db.outside("INSERT INTO coded VALUES (1, 7)")
        const byCode = (code: number | string) =>
          Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT id FROM coded WHERE code = ${code}`).pipe(
            Transaction.withTransaction()
          )
        const addCoded = (id: number, code: number | string) =>
          Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO coded (id, code) VALUES (${id}, ${code})`).pipe(
            Transaction.withTransaction()
          )
        assert.deepStrictEqual(yield* byCode(7), [{ id: 1 }])
        yield* addCoded(2, 8)
        yield* db.outside("ALTER TABLE coded ALTER COLUMN code TYPE text")
        const failures: Array<unknown> = []
        for (let run = 0; run < 4; run++) {
          const exit = yield* Effect.exit(byCode("7"))
          if (Exit.isFailure(exit)) failures.push(codeOf(exit))
          else assert.deepStrictEqual(exit.value, [{ id: 1 }])
        }
        for (let id = 3; id < 7; id++) {
          const exit = yield* Effect.exit(addCoded(id, `code ${id}`))
          if (Exit.isFailure(exit)) failures.push(codeOf(exit))
        }
        assert.isAtMost(failures.length, 2, `failures: ${failures.join(", ")}`)
        yield* db.outside("DROP TABLE coded")
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("a statement whose runs keep failing holds one name, not one per run", () =>
      Effect.gen(function* () {
        yield* reset
        yield* insertItem(1, "one").pipe(
          Transaction.withTransaction(),
          Effect.provideService(Transaction.PreparedStatements, 0)
        )
        for (let run = 0; run < 5; run++) {
          const duplicate = yield* Effect.exit(insertItem(1, "again").pipe(Transaction.withTransaction()))
          assert.strictEqual(codeOf(duplicate), "23505")
        }
        yield* readItem(1).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* textsNow, [insertText, readText])
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 2))
    )

    it.effect("a value that cannot be sent fails its statement, and the statement runs prepared afterwards", () =>
      Effect.gen(function* () {
        yield* reset
        const circular: Record<string, unknown> = {}
        circular.self = circular
        const readLabel = (label: unknown) =>
          Effect.flatMap(SqlClient.SqlClient, (sql) =>
            sql.unsafe<{ id: number }>("SELECT id FROM items WHERE label = $1", [label as string])
          )
        const afterRead = (label: unknown) =>
          Effect.zipRight(readItem(1), readLabel(label)).pipe(Transaction.withTransaction())
        yield* insertItem(1, "one").pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* afterRead("one"), [{ id: 1 }])
        const before = yield* preparedNow
        // As a later statement, and as the first one, which carries BEGIN: the statement's own failure each time.
        for (const bad of [
          yield* Effect.exit(afterRead(circular)),
          yield* Effect.exit(readLabel(circular).pipe(Transaction.withTransaction()))
        ]) {
          assert.isTrue(Exit.isFailure(bad))
          const failure = Exit.isFailure(bad) ? Cause.squash(bad.cause) : undefined
          assert.instanceOf(failure, SqlError.SqlError)
          assert.include(String((failure as SqlError.SqlError).cause), "circular structure")
        }
        assert.deepStrictEqual(yield* afterRead("one"), [{ id: 1 }])
        assert.deepStrictEqual(yield* afterRead("one"), [{ id: 1 }])
        // The same connection throughout: the statements it kept before are still there.
        const after = yield* preparedNow
        assert.includeDeepMembers(
          after.map(({ name }) => name),
          before.filter(({ statement }) => statement === insertText).map(({ name }) => name)
        )
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("the same new statement twice at once on one connection: both run, the statement is parsed once", () =>
      Effect.gen(function* () {
        yield* reset
        yield* Effect.all([insertItem(1, "one"), insertItem(2, "two")], { discard: true }).pipe(
          Transaction.withTransaction()
        )
        const rows = yield* Effect.all([readItem(1), readItem(2), readItem(1)], { concurrency: "unbounded" }).pipe(
          Transaction.withTransaction()
        )
        assert.deepStrictEqual(rows, [[{ id: 1, label: "one" }], [{ id: 2, label: "two" }], [{ id: 1, label: "one" }]])
        assert.deepStrictEqual(yield* textsNow, [insertText, readText])
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 10))
    )

    it.effect("nested blocks and a test transaction run their statements prepared too, and roll back as before", () =>
      Effect.gen(function* () {
        yield* reset
        yield* Effect.gen(function* () {
          yield* insertItem(1, "one")
          yield* Effect.exit(
            Effect.zipRight(insertItem(2, "two"), Effect.fail("undo")).pipe(Transaction.withTransaction())
          )
          yield* insertItem(3, "three").pipe(Transaction.withTransaction())
        }).pipe(Transaction.withTransaction())
        const sql = yield* SqlClient.SqlClient
        assert.deepStrictEqual(yield* sql`SELECT id FROM items ORDER BY id`, [{ id: 1 }, { id: 3 }])
        // The test transaction opens the connection: the setting is the one where its layer is built.
        const inTestText = "SELECT label FROM items WHERE id = $1 AND label IS NOT NULL"
        const [inTest, preparedInTest] = yield* Effect.zip(
          Effect.zipRight(
            insertItem(5, "five"),
            Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(inTestText, [5]))
          ).pipe(Transaction.withTransaction()),
          prepared
        ).pipe(TestTransaction.isolate, Effect.provide(TestTransaction.layer()))
        assert.deepStrictEqual(inTest, [{ label: "five" }])
        assert.include(
          preparedInTest.map(({ statement }) => statement),
          inTestText
        )
        assert.deepStrictEqual(yield* sql`SELECT id FROM items ORDER BY id`, [{ id: 1 }, { id: 3 }])
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 100))
    )
  })

  // A connection of its own, which never runs with a setting above 2.
  layer(TestDatabase.layer({ maxConnections: 1 }), { excludeTestServices: true })((it) => {
    it.effect("each connection keeps at most as many statements as the setting says, the most recently used", () =>
      Effect.gen(function* () {
        yield* reset
        const select = (k: number) =>
          Effect.flatMap(SqlClient.SqlClient, (sql) =>
            sql.unsafe<{ k: number; id: number }>(`SELECT ${k} AS k, $1::int AS id`, [k])
          ).pipe(Transaction.withTransaction())
        for (let round = 0; round < 2; round++) {
          for (let k = 1; k <= 4; k++) assert.deepStrictEqual(yield* select(k), [{ k, id: k }])
        }
        const statements = yield* preparedNow
        assert.deepStrictEqual(
          statements
            .map(({ runs, statement }) => ({ runs, statement }))
            .sort((a, b) => (a.statement < b.statement ? -1 : 1)),
          [
            { runs: 1, statement: "SELECT 3 AS k, $1::int AS id" },
            { runs: 1, statement: "SELECT 4 AS k, $1::int AS id" }
          ]
        )
        // Names are reused: never more than two.
        assert.strictEqual(new Set(statements.map(({ name }) => name)).size, 2)
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 2))
    )

    it.effect("a statement run often stays prepared while statements run once come and go", () =>
      Effect.gen(function* () {
        yield* reset
        const hot = Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe("SELECT $1::int AS hot", [1]))
        const once = (k: number) =>
          Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(`SELECT $1::int AS once_${k}`, [k]))
        for (let k = 1; k <= 6; k++) {
          const [hotRows, onceRows] = yield* Effect.all([hot, once(k)]).pipe(Transaction.withTransaction())
          assert.deepStrictEqual(hotRows, [{ hot: 1 }])
          assert.deepStrictEqual(onceRows, [{ [`once_${k}`]: k }])
        }
        const statements = yield* preparedNow
        assert.strictEqual(statements.length, 2)
        assert.deepStrictEqual(
          statements.find(({ statement }) => statement === "SELECT $1::int AS hot")?.runs,
          6,
          "parsed once, bound six times"
        )
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 2))
    )

    it.effect("a statement that only mentions DISCARD or DEALLOCATE does not make the connection keep more", () =>
      Effect.gen(function* () {
        yield* reset
        const db = yield* TestDatabase.TestDatabase
        yield* db.outside("ALTER TABLE items ADD COLUMN discard boolean NOT NULL DEFAULT false")
        yield* insertItem(1, "one").pipe(Transaction.withTransaction())
        for (let run = 0; run < 6; run++) {
          yield* Effect.zipRight(
            readItem(1),
            Effect.flatMap(
              SqlClient.SqlClient,
              (sql) => sql`UPDATE items SET discard = ${run % 2 === 0} WHERE id = ${1}`
            )
          ).pipe(Transaction.withTransaction())
          // DISCARD TEMP fails nothing here and leaves prepared statements alone; a failed DISCARD ALL too.
          yield* Effect.flatMap(SqlClient.SqlClient, (sql) => sql`DISCARD TEMP`).pipe(Transaction.withTransaction())
        }
        const statements = yield* preparedNow
        assert.isAtMost(statements.length, 2)
      }).pipe(Effect.provideService(Transaction.PreparedStatements, 2))
    )
  })
})
