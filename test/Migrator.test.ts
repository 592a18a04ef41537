import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { NodeContext } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import * as SqlMigrator from "@effect/sql/Migrator"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, layer } from "@effect/vitest"
import { Effect, type Exit, Layer, Redacted } from "effect"
import { Migrator, TestTransaction, Transaction } from "effect-transaction"
import pg from "pg"
import { typedFailure } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = Layer.mergeAll(TestDatabase.layer(), NodeContext.layer)

/** The MigrationError an exit failed with (fails the test otherwise). */
const migrationError = <A, E>(exit: Exit.Exit<A, E>) => typedFailure(exit, Migrator.MigrationError)

const run = (statement: string) => Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(statement))

/** A migration that runs `statements` in order. */
const statements = (...list: ReadonlyArray<string>) => Effect.forEach(list, run, { discard: true })

/** Rows of `table` as another session sees them. */
const rowsOf = (table: string) =>
  Effect.flatMap(TestDatabase.TestDatabase, (db) =>
    db.outside<{ migration_id: number; name: string; state: string; batch: number | null; checksum: string | null }>(
      `SELECT migration_id, name, state, batch, checksum FROM ${table} ORDER BY migration_id`
    )
  )

const tableExists = (name: string) =>
  Effect.flatMap(TestDatabase.TestDatabase, (db) =>
    Effect.map(
      db.outside<{ present: boolean }>("SELECT to_regclass($1) IS NOT NULL AS present", [name]),
      (rows) => rows[0]!.present
    )
  )

/** A temporary directory of migration files, removed when the test's scope closes. */
const directory = (files: Record<string, string>) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "etx-migrations-"))
      for (const [name, text] of Object.entries(files)) fs.writeFileSync(path.join(dir, name), text)
      return dir
    }),
    (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
  )

const tsMigration = (up: string, extra = "") => `import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
export const up = Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(${JSON.stringify(up)}))
${extra}
`

describe("Migrator", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect(
      "applies pending migrations in id order, each recorded in @effect/sql's table with checksum and batch",
      () =>
        Effect.gen(function* () {
          const table = "m_basic"
          const loader = Migrator.fromRecord({
            "2_add_column": statements("ALTER TABLE basic_users ADD COLUMN email text"),
            "1_create_users": statements("CREATE TABLE basic_users (id serial PRIMARY KEY)")
          })
          const ran = yield* Migrator.up({ loader, table })
          assert.deepStrictEqual(
            ran.map((migration) => [migration.id, migration.name, migration.outcome, migration.transaction]),
            [
              [1, "create_users", "applied", true],
              [2, "add_column", "applied", true]
            ]
          )
          const rows = yield* rowsOf(table)
          assert.deepStrictEqual(
            rows.map((row) => [row.migration_id, row.name, row.state, row.batch]),
            [
              [1, "create_users", "applied", 1],
              [2, "add_column", "applied", 1]
            ]
          )
          assert.deepStrictEqual(yield* Migrator.up({ loader, table }), [])
          // @effect/sql's own Migrator reads the same table and finds nothing to do.
          const theirs = yield* SqlMigrator.make({})({ loader, table })
          assert.deepStrictEqual(theirs, [])
        })
    )

    it.effect("switching from @effect/sql's Migrator: its rows stay applied and only new migrations run", () =>
      Effect.gen(function* () {
        const table = "m_switch"
        const first = { "1_create": statements("CREATE TABLE switch_a (id int)") }
        yield* SqlMigrator.make({})({ loader: Migrator.fromRecord(first), table })
        const ran = yield* Migrator.run({
          loader: Migrator.fromRecord({ ...first, "2_more": statements("CREATE TABLE switch_b (id int)") }),
          table
        })
        assert.deepStrictEqual(ran, [[2, "more"]])
        const rows = yield* rowsOf(table)
        assert.deepStrictEqual(
          rows.map((row) => [row.migration_id, row.state, row.batch]),
          [
            [1, "applied", null],
            [2, "applied", 1]
          ]
        )
      })
    )

    it.effect("a failing migration is rolled back alone and fails with Failed; the ones before it stay applied", () =>
      Effect.gen(function* () {
        const table = "m_failing"
        const exit = yield* Effect.exit(
          Migrator.up({
            table,
            loader: Migrator.fromRecord({
              "1_ok": statements("CREATE TABLE failing_ok (id int)"),
              "2_broken": statements("CREATE TABLE failing_half (id int)", "SELECT * FROM no_such_table"),
              "3_never": statements("CREATE TABLE failing_never (id int)")
            })
          })
        )
        const error = migrationError(exit)
        assert.strictEqual(error.reason, "Failed")
        assert.deepStrictEqual(error.migration, { id: 2, name: "broken" })
        assert.match(error.message, /0002_broken failed and was rolled back/)
        assert.match(error.message, /no_such_table/)
        assert.isTrue(yield* tableExists("failing_ok"))
        assert.isFalse(yield* tableExists("failing_half"))
        assert.isFalse(yield* tableExists("failing_never"))
        assert.deepStrictEqual(
          (yield* rowsOf(table)).map((row) => row.migration_id),
          [1]
        )
      })
    )

    it.scoped("duplicate ids fail before anything runs, naming both migrations", () =>
      Effect.gen(function* () {
        const table = "m_duplicates"
        const dir = yield* directory({
          "0001_a.sql": "-- migrate:up\nCREATE TABLE dup_a (id int);\n",
          "0001_b.sql": "-- migrate:up\nCREATE TABLE dup_b (id int);\n"
        })
        const error = migrationError(yield* Effect.exit(Migrator.up({ loader: Migrator.fromDirectory(dir), table })))
        assert.strictEqual(error.reason, "DuplicateId")
        assert.match(error.message, /0001_a\.sql and 0001_b\.sql/)
        assert.isFalse(yield* tableExists(table))
        assert.isFalse(yield* tableExists("dup_a"))
      })
    )

    it.effect("a pending id lower than an applied one fails naming both; allowOutOfOrder runs it", () =>
      Effect.gen(function* () {
        const table = "m_order"
        yield* Migrator.up({
          table,
          loader: Migrator.fromRecord({ "5_later": statements("CREATE TABLE order_5 (id int)") })
        })
        const loader = Migrator.fromRecord({
          "3_merged_late": statements("CREATE TABLE order_3 (id int)"),
          "5_later": statements("CREATE TABLE order_5 (id int)"),
          "6_next": statements("CREATE TABLE order_6 (id int)")
        })
        const error = migrationError(yield* Effect.exit(Migrator.up({ loader, table })))
        assert.strictEqual(error.reason, "OutOfOrder")
        assert.match(error.message, /0003_merged_late is pending, but 0005_later/)
        assert.isFalse(yield* tableExists("order_6"), "nothing ran")
        const statuses = yield* Migrator.status({ loader, table })
        assert.deepStrictEqual(
          statuses.map((status) => [status.id, status.state]),
          [
            [3, "out-of-order"],
            [5, "applied"],
            [6, "pending"]
          ]
        )
        const ran = yield* Migrator.up({ loader, table, allowOutOfOrder: true })
        assert.deepStrictEqual(
          ran.map((migration) => migration.id),
          [3, 6]
        )
      })
    )

    it.effect("an applied migration whose file is missing fails validation", () =>
      Effect.gen(function* () {
        const table = "m_missing"
        yield* Migrator.up({
          table,
          loader: Migrator.fromRecord({ "1_gone": statements("CREATE TABLE missing_1 (id int)") })
        })
        const loader = Migrator.fromRecord({ "2_new": statements("CREATE TABLE missing_2 (id int)") })
        const error = migrationError(yield* Effect.exit(Migrator.validate({ loader, table })))
        assert.strictEqual(error.reason, "MissingFile")
        assert.match(
          error.message,
          /0001_gone is recorded as applied in public\.m_missing, but no migration file has id 1/
        )
        assert.strictEqual(migrationError(yield* Effect.exit(Migrator.up({ loader, table }))).reason, "MissingFile")
        assert.isFalse(yield* tableExists("missing_2"))
      })
    )

    it.scoped(
      "a changed applied file fails with ChecksumMismatch, naming the file and both checksums; CRLF is no change",
      () =>
        Effect.gen(function* () {
          const table = "m_checksum"
          const dir = yield* directory({ "0001_create.sql": "-- migrate:up\nCREATE TABLE checksum_t (id int);\n" })
          const loader = Migrator.fromDirectory(dir)
          yield* Migrator.up({ loader, table })
          const [row] = yield* rowsOf(table)
          assert.match(row!.checksum ?? "", /^[0-9a-f]{64}$/)
          fs.writeFileSync(path.join(dir, "0001_create.sql"), "-- migrate:up\r\nCREATE TABLE checksum_t (id int);\r\n")
          assert.deepStrictEqual(yield* Migrator.up({ loader, table }), [])
          fs.writeFileSync(path.join(dir, "0001_create.sql"), "-- migrate:up\nCREATE TABLE checksum_t (id bigint);\n")
          const error = migrationError(yield* Effect.exit(Migrator.validate({ loader, table })))
          assert.strictEqual(error.reason, "ChecksumMismatch")
          assert.include(error.message, path.join(dir, "0001_create.sql"))
          assert.include(error.message, row!.checksum!)
          const statuses = yield* Migrator.status({ loader, table })
          assert.strictEqual(statuses[0]!.state, "checksum-changed")
          assert.include(error.message, statuses[0]!.checksum!)
        })
    )

    it.scoped(
      ".ts and .sql files mix in one directory; down sections revert; transaction:false runs CREATE INDEX CONCURRENTLY",
      () =>
        Effect.gen(function* () {
          const table = "m_files"
          const dir = yield* directory({
            "0001_create.ts": tsMigration(
              "CREATE TABLE files_t (id int PRIMARY KEY, label text)",
              "export const down = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`DROP TABLE files_t`)"
            ),
            "0002_seed.sql":
              "-- migrate:up\nINSERT INTO files_t VALUES (1, 'a; b');\nINSERT INTO files_t VALUES (2, $$c;$$);\n" +
              "-- migrate:down\nDELETE FROM files_t;\n",
            "0003_index.sql":
              "-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY files_label ON files_t (label);\n" +
              "CREATE INDEX CONCURRENTLY files_label_2 ON files_t (label, id);\n" +
              "-- migrate:down\nDROP INDEX CONCURRENTLY files_label;\nDROP INDEX CONCURRENTLY files_label_2;\n",
            "README.md": "not a migration",
            "0004_types.d.ts": "export {}"
          })
          const loader = Migrator.fromDirectory(dir)
          const ran = yield* Migrator.up({ loader, table })
          assert.deepStrictEqual(
            ran.map((migration) => [migration.id, migration.transaction]),
            [
              [1, true],
              [2, true],
              [3, false]
            ]
          )
          const db = yield* TestDatabase.TestDatabase
          const indexes = yield* db.outside<{ indexname: string }>(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'files_t' ORDER BY indexname"
          )
          assert.deepStrictEqual(
            indexes.map((row) => row.indexname),
            ["files_label", "files_label_2", "files_t_pkey"]
          )
          assert.deepStrictEqual(
            (yield* db.outside<{ label: string }>("SELECT label FROM files_t ORDER BY id")).map((row) => row.label),
            ["a; b", "c;"]
          )
          const reverted = yield* Migrator.down({ loader, table })
          assert.deepStrictEqual(
            reverted.map((migration) => [migration.id, migration.outcome]),
            [
              [3, "reverted"],
              [2, "reverted"],
              [1, "reverted"]
            ]
          )
          assert.isFalse(yield* tableExists("files_t"))
          assert.deepStrictEqual(yield* rowsOf(table), [])
        })
    )

    it.effect(
      "a migration outside a transaction that fails is recorded failed and stops later runs until resolved",
      () =>
        Effect.gen(function* () {
          const table = "m_nontx"
          const index = (sql: string) => Effect.flatMap(SqlClient.SqlClient, (client) => client.unsafe(sql))
          yield* run("CREATE TABLE nontx_t (id int)")
          yield* run("INSERT INTO nontx_t VALUES (1), (1)")
          const loader = Migrator.fromRecord({})
          const migrations = (yield* loader).concat([
            [
              1,
              "unique_index",
              Effect.succeed({
                up: index("CREATE UNIQUE INDEX CONCURRENTLY nontx_u ON nontx_t (id)"),
                transaction: false
              })
            ]
          ])
          const exit = yield* Effect.exit(Migrator.up({ loader: Effect.succeed(migrations), table }))
          const error = migrationError(exit)
          assert.strictEqual(error.reason, "Failed")
          assert.match(error.message, /failed outside a transaction; what it did before failing stays/)
          assert.deepStrictEqual(
            (yield* rowsOf(table)).map((row) => [row.migration_id, row.state]),
            [[1, "failed"]]
          )
          const again = migrationError(yield* Effect.exit(Migrator.up({ loader: Effect.succeed(migrations), table })))
          assert.strictEqual(again.reason, "PreviouslyFailed")
          assert.match(again.message, /INVALID by CREATE INDEX CONCURRENTLY must be dropped/)
          assert.match(again.message, /DELETE FROM public\.m_nontx WHERE migration_id = 1/)
        })
    )

    it.effect("down reverts the last batch by default, or step migrations, or down to an id", () =>
      Effect.gen(function* () {
        const table = "m_down"
        const migration = (n: number) =>
          [
            n,
            `t${n}`,
            Effect.succeed({
              up: run(`CREATE TABLE down_${n} (id int)`),
              down: run(`DROP TABLE down_${n}`)
            })
          ] as const
        const upTo = (n: number) => Effect.succeed(Array.from({ length: n }, (_, i) => migration(i + 1)))
        yield* Migrator.up({ loader: upTo(2), table })
        yield* Migrator.up({ loader: upTo(4), table })
        yield* Migrator.up({ loader: upTo(6), table })
        const ids = (ran: ReadonlyArray<Migrator.Ran>) => ran.map((m) => m.id)
        assert.deepStrictEqual(ids(yield* Migrator.down({ loader: upTo(6), table })), [6, 5])
        assert.deepStrictEqual(ids(yield* Migrator.down({ loader: upTo(6), table, step: 1 })), [4])
        assert.deepStrictEqual(ids(yield* Migrator.down({ loader: upTo(6), table, to: 1 })), [3, 2])
        assert.deepStrictEqual(
          (yield* rowsOf(table)).map((row) => row.migration_id),
          [1]
        )
        assert.strictEqual(
          migrationError(yield* Effect.exit(Migrator.down({ loader: upTo(6), table, to: 99 }))).reason,
          "InvalidTarget"
        )
        assert.strictEqual(
          migrationError(yield* Effect.exit(Migrator.down({ loader: upTo(6), table, step: 0 }))).reason,
          "InvalidTarget"
        )
      })
    )

    it.effect("down refuses up front, changing nothing, when a migration in range has no down", () =>
      Effect.gen(function* () {
        const table = "m_nodown"
        const loader = Effect.succeed([
          [
            1,
            "reversible",
            Effect.succeed({ up: run("CREATE TABLE nodown_1 (id int)"), down: run("DROP TABLE nodown_1") })
          ],
          [2, "one_way", Effect.succeed({ up: run("CREATE TABLE nodown_2 (id int)") })],
          [
            3,
            "reversible_too",
            Effect.succeed({ up: run("CREATE TABLE nodown_3 (id int)"), down: run("DROP TABLE nodown_3") })
          ]
        ] as const)
        yield* Migrator.up({ loader, table })
        const error = migrationError(yield* Effect.exit(Migrator.down({ loader, table, to: 0 })))
        assert.strictEqual(error.reason, "NoDown")
        assert.match(error.message, /0002_one_way has no down migration/)
        assert.isTrue(yield* tableExists("nodown_3"), "the newest was not reverted either")
        assert.strictEqual((yield* rowsOf(table)).length, 3)
      })
    )

    it.effect("a dry run runs the pending migrations in a transaction that rolls back, and reports them", () =>
      Effect.gen(function* () {
        const table = "m_dry"
        const loader = Effect.succeed([
          [1, "create", Effect.succeed({ up: run("CREATE TABLE dry_t (id int)") })],
          [2, "index", Effect.succeed({ up: run("CREATE INDEX CONCURRENTLY dry_i ON dry_t (id)"), transaction: false })]
        ] as const)
        const ran = yield* Migrator.up({ loader, table, dryRun: true })
        assert.deepStrictEqual(
          ran.map((migration) => [migration.id, migration.outcome]),
          [
            [1, "dry-run"],
            [2, "dry-run-skipped"]
          ]
        )
        assert.isFalse(yield* tableExists("dry_t"))
        assert.isFalse(yield* tableExists(table), "a dry run creates no table either")
        const failing = Effect.succeed([[1, "bad", Effect.succeed({ up: run("SELECT * FROM dry_nowhere") })]] as const)
        const error = migrationError(yield* Effect.exit(Migrator.up({ loader: failing, table, dryRun: true })))
        assert.strictEqual(error.reason, "Failed")
      })
    )

    it.effect("invalid migration files fail with a message that says what is wrong", () =>
      Effect.gen(function* () {
        const table = "m_invalid"
        const cases: ReadonlyArray<readonly [string, string, RegExp]> = [
          ["0001_x.sql", "-- creates nothing yet\n", /no "-- migrate:up" line/],
          [
            "0001_x.sql",
            "SELECT 1;\n-- migrate:up\nSELECT 2;\n",
            /a statement stands before the first "-- migrate:up"/
          ],
          ["0001_x.sql", "-- migrate:up transaction:maybe\nSELECT 1;\n", /unknown flags "transaction:maybe"/],
          ["0001_x.ts", "export const upp = 1\n", /exports no "up" Effect/],
          ["0001_x.ts", "throw new Error('boom at import')\n", /boom at import/]
        ]
        for (const [file, text, message] of cases) {
          const error = yield* Effect.scoped(
            Effect.flatMap(directory({ [file]: text }), (dir) =>
              Effect.map(Effect.exit(Migrator.up({ loader: Migrator.fromDirectory(dir), table })), migrationError)
            )
          )
          assert.match(error.message, message, file)
          assert.oneOf(error.reason, ["InvalidFile", "ImportFailed"])
        }
        assert.isFalse(yield* tableExists(table))
      })
    )

    it.effect(
      "a migration that waits on a lock past lockTimeout is tried again, and fails with Failed when it stays",
      () =>
        Effect.gen(function* () {
          const table = "m_locks"
          yield* run("CREATE TABLE locks_t (id int)")
          const db = yield* TestDatabase.TestDatabase
          const holder = new pg.Client({ connectionString: db.url })
          yield* Effect.promise(() => holder.connect())
          yield* Effect.promise(() => holder.query("BEGIN; LOCK TABLE locks_t IN ACCESS EXCLUSIVE MODE"))
          const loader = Migrator.fromRecord({ "1_alter": statements("ALTER TABLE locks_t ADD COLUMN label text") })
          const error = migrationError(
            yield* Effect.exit(Migrator.up({ loader, table, lockTimeout: "100 millis", lockRetries: 1 }))
          )
          assert.strictEqual(error.reason, "Failed")
          assert.match(error.message, /lock timeout/i)
          // Released while the migrator retries: the retry goes through.
          const migrating = yield* Effect.fork(
            Migrator.up({ loader, table, lockTimeout: "200 millis", lockRetries: 6 })
          )
          yield* Effect.sleep("400 millis")
          yield* Effect.promise(() => holder.query("COMMIT").then(() => holder.end()))
          const ran = yield* migrating
          assert.deepStrictEqual(
            ran.map((migration) => migration.id),
            [1]
          )
        })
    )

    it.effect("waiting longer than waitTimeout for another process's lock fails with LockWaitTimeout", () =>
      Effect.gen(function* () {
        const table = "m_wait"
        const db = yield* TestDatabase.TestDatabase
        const holder = new pg.Client({ connectionString: db.url })
        yield* Effect.promise(() => holder.connect())
        yield* Effect.promise(() =>
          holder.query("SELECT pg_advisory_lock(hashtextextended($1, 0))", [`effect-transaction/Migrator:${table}`])
        )
        const loader = Migrator.fromRecord({ "1_t": statements("CREATE TABLE wait_t (id int)") })
        const error = migrationError(
          yield* Effect.exit(Migrator.up({ loader, table, waitTimeout: "500 millis", pollInterval: "50 millis" }))
        )
        assert.strictEqual(error.reason, "LockWaitTimeout")
        assert.match(error.message, /held the migration lock of m_wait for more than 500ms/)
        assert.isFalse(yield* tableExists(table), "the table is created only under the lock")
        yield* Effect.promise(() => holder.end())
        assert.strictEqual((yield* Migrator.up({ loader, table })).length, 1)
      })
    )

    it.effect("several migrators with separate pools on a fresh database: each migration is applied exactly once", () =>
      Effect.gen(function* () {
        const table = "m_race"
        const db = yield* TestDatabase.TestDatabase
        const loader = Migrator.fromRecord(
          Object.fromEntries(
            Array.from({ length: 5 }, (_, i) => [
              `${i + 1}_step`,
              // Not idempotent: applied twice, CREATE TABLE fails.
              statements(`CREATE TABLE race_${i + 1} (id int)`, "SELECT pg_sleep(0.05)")
            ])
          )
        )
        const migrator = Migrator.up({ loader, table, pollInterval: "20 millis" }).pipe(
          Effect.provide(Layer.fresh(PgClient.layer({ url: Redacted.make(db.url), maxConnections: 2 })))
        )
        const results = yield* Effect.all(
          Array.from({ length: 4 }, () => migrator),
          { concurrency: "unbounded" }
        )
        assert.strictEqual(results.flat().length, 5, "five migrations applied in all")
        assert.deepStrictEqual(
          (yield* rowsOf(table)).map((row) => row.migration_id),
          [1, 2, 3, 4, 5]
        )
      })
    )

    it.effect("a CREATE INDEX CONCURRENTLY migration completes while other processes wait on the lock", () =>
      Effect.gen(function* () {
        const table = "m_cic"
        const db = yield* TestDatabase.TestDatabase
        yield* run("CREATE TABLE cic_t AS SELECT g AS id FROM generate_series(1, 20000) g")
        const loader = Effect.succeed([
          [
            1,
            "index",
            Effect.succeed({
              up: statements("SELECT pg_sleep(0.3)", "CREATE INDEX CONCURRENTLY cic_i ON cic_t (id)"),
              transaction: false
            })
          ]
        ] as const)
        const migrator = Migrator.up({ loader, table, pollInterval: "20 millis", waitTimeout: "20 seconds" }).pipe(
          Effect.provide(Layer.fresh(PgClient.layer({ url: Redacted.make(db.url), maxConnections: 2 })))
        )
        const results = yield* Effect.all(
          Array.from({ length: 3 }, () => migrator),
          { concurrency: "unbounded" }
        ).pipe(Effect.timeoutFail({ duration: "15 seconds", onTimeout: () => new Error("the migrators deadlocked") }))
        assert.strictEqual(results.flat().length, 1)
        const [index] = yield* db.outside<{ valid: boolean }>(
          "SELECT indisvalid AS valid FROM pg_index WHERE indexrelid = 'cic_i'::regclass"
        )
        assert.isTrue(index!.valid)
      })
    )

    it.effect("a pool of one connection still migrates (the lock has a connection of its own)", () =>
      Effect.gen(function* () {
        const table = "m_pool1"
        const db = yield* TestDatabase.TestDatabase
        const ran = yield* Migrator.up({
          table,
          loader: Migrator.fromRecord({
            "1_a": statements("CREATE TABLE pool1_a (id int)"),
            "2_b": statements("CREATE TABLE pool1_b (id int)")
          })
        }).pipe(
          Effect.provide(
            Layer.fresh(
              Transaction.layer.pipe(
                Layer.provideMerge(PgClient.layer({ url: Redacted.make(db.url), maxConnections: 1 }))
              )
            )
          ),
          Effect.timeoutFail({ duration: "10 seconds", onTimeout: () => new Error("pool of one: hung") })
        )
        assert.strictEqual(ran.length, 2)
      })
    )

    it.effect("inside a test transaction, migrations run as savepoints of it and nothing is committed", () =>
      Effect.gen(function* () {
        const table = "m_sandbox"
        const loader = Migrator.fromRecord({ "1_t": statements("CREATE TABLE sandbox_t (id int)") })
        const seen = yield* Effect.gen(function* () {
          const ran = yield* Migrator.up({ loader, table })
          const statuses = yield* Migrator.status({ loader, table })
          return [ran.length, statuses.map((status) => status.state)] as const
        }).pipe(TestTransaction.isolate)
        assert.deepStrictEqual(seen, [1, ["applied"]])
        assert.isFalse(yield* tableExists("sandbox_t"))
        assert.isFalse(yield* tableExists(table))
      })
    )

    it.effect("a thrown error or defect in a migration is a Failed MigrationError, and nothing of it is applied", () =>
      Effect.gen(function* () {
        const table = "m_defect"
        const loader = Effect.succeed([
          [
            1,
            "throws",
            Effect.succeed({
              up: Effect.zipRight(run("CREATE TABLE defect_t (id int)"), Effect.die(new Error("boom")))
            })
          ]
        ] as const)
        const error = migrationError(yield* Effect.exit(Migrator.up({ loader, table })))
        assert.strictEqual(error.reason, "Failed")
        assert.match(error.message, /0001_throws failed and was rolled back; nothing of it is applied: boom\./)
        assert.isFalse(yield* tableExists("defect_t"))
      })
    )

    it.effect("down with no option reverts the newest batch, also when it holds a migration merged out of order", () =>
      Effect.gen(function* () {
        const table = "m_batch_order"
        const migration = (n: number) =>
          [
            n,
            `t${n}`,
            Effect.succeed({
              up: run(`CREATE TABLE batch_order_${n} (id int)`),
              down: run(`DROP TABLE batch_order_${n}`)
            })
          ] as const
        yield* Migrator.up({ loader: Effect.succeed([migration(1), migration(3)]), table })
        yield* Migrator.up({
          loader: Effect.succeed([migration(1), migration(2), migration(3)]),
          table,
          allowOutOfOrder: true
        })
        const reverted = yield* Migrator.down({
          loader: Effect.succeed([migration(1), migration(2), migration(3)]),
          table
        })
        assert.deepStrictEqual(
          reverted.map((ran) => ran.id),
          [2]
        )
        assert.deepStrictEqual(
          (yield* rowsOf(table)).map((row) => row.migration_id),
          [1, 3]
        )
      })
    )

    it.effect("a table name with capitals is found again: nothing is applied twice", () =>
      Effect.gen(function* () {
        const table = "MyMigrations"
        const loader = Migrator.fromRecord({ "1_a": statements("CREATE TABLE capitals_a (id int)") })
        assert.strictEqual((yield* Migrator.up({ loader, table })).length, 1)
        assert.deepStrictEqual(yield* Migrator.up({ loader, table }), [])
        assert.deepStrictEqual(
          (yield* Migrator.status({ loader, table })).map((status) => status.state),
          ["applied"]
        )
      })
    )

    it.effect("a migration that sends COMMIT or ROLLBACK itself fails and is recorded failed, not applied", () =>
      Effect.gen(function* () {
        for (const [n, control] of [
          [1, "COMMIT"],
          [2, "ROLLBACK"]
        ] as const) {
          const table = `m_control_${n}`
          const loader = Effect.succeed([
            [
              1,
              "control",
              Effect.succeed({ up: statements(`CREATE TABLE control_${n} (id int)`, control, "SELECT 1") })
            ]
          ] as const)
          const error = migrationError(yield* Effect.exit(Migrator.up({ loader, table })))
          assert.strictEqual(error.reason, "Failed")
          assert.match(error.message, /sent COMMIT or ROLLBACK itself, so it did not run as one transaction/)
          assert.deepStrictEqual(
            (yield* rowsOf(table)).map((row) => row.state),
            ["failed"]
          )
          assert.strictEqual(
            migrationError(yield* Effect.exit(Migrator.up({ loader, table }))).reason,
            "PreviouslyFailed"
          )
        }
      })
    )

    it.effect("a migration still running in another process is no problem while that process holds the lock", () =>
      Effect.gen(function* () {
        const table = "m_live"
        const loader = Migrator.fromRecord({ "1_slow": statements("SELECT 1") })
        yield* Migrator.up({ loader: Migrator.fromRecord({}), table })
        const db = yield* TestDatabase.TestDatabase
        yield* db.outside(`INSERT INTO ${table} (migration_id, name, state) VALUES (1, 'slow', 'running')`)
        const holder = new pg.Client({ connectionString: db.url })
        yield* Effect.promise(() => holder.connect())
        yield* Effect.promise(() =>
          holder.query("SELECT pg_advisory_lock(hashtextextended($1, 0))", [`effect-transaction/Migrator:${table}`])
        )
        const statuses = yield* Migrator.validate({ loader, table })
        assert.deepStrictEqual(
          statuses.map((status) => status.state),
          ["running"]
        )
        yield* Effect.promise(() => holder.end())
        const error = migrationError(yield* Effect.exit(Migrator.validate({ loader, table })))
        assert.strictEqual(error.reason, "PreviouslyFailed")
        assert.match(error.message, /never finished \(its process died\)/)
      })
    )

    it.effect("a down outside a transaction that fails is recorded failed, so status no longer says up to date", () =>
      Effect.gen(function* () {
        const table = "m_down_fail"
        const loader = Effect.succeed([
          [
            1,
            "index",
            Effect.succeed({
              up: statements("CREATE TABLE down_fail_t (id int)"),
              down: statements("DROP TABLE down_fail_t", "DROP TABLE down_fail_missing"),
              transaction: false
            })
          ]
        ] as const)
        yield* Migrator.up({ loader, table })
        const error = migrationError(yield* Effect.exit(Migrator.down({ loader, table })))
        assert.strictEqual(error.reason, "Failed")
        assert.match(error.message, /what it undid before failing stays/)
        assert.notMatch(error.message, /\.\./)
        assert.deepStrictEqual(
          (yield* rowsOf(table)).map((row) => row.state),
          ["failed"]
        )
      })
    )

    it.scoped("an empty down section is no down: down refuses instead of recording a revert that changed nothing", () =>
      Effect.gen(function* () {
        const table = "m_empty_down"
        const dir = yield* directory({
          "0001_widgets.sql":
            "-- migrate:up\nCREATE TABLE empty_down_widgets (id int);\n-- migrate:down\n-- nothing yet\n"
        })
        const loader = Migrator.fromDirectory(dir)
        yield* Migrator.up({ loader, table })
        const error = migrationError(yield* Effect.exit(Migrator.down({ loader, table })))
        assert.strictEqual(error.reason, "NoDown")
        assert.isTrue(yield* tableExists("empty_down_widgets"))
      })
    )

    it.effect("a migration that changes search_path does not move where runs are recorded", () =>
      Effect.gen(function* () {
        const table = "m_search_path"
        yield* run("CREATE SCHEMA IF NOT EXISTS sp_other")
        const loader = Migrator.fromRecord({
          "1_path": statements("SET LOCAL search_path TO sp_other"),
          "2_table": statements("CREATE TABLE sp_t (id int)")
        })
        yield* Migrator.up({ loader, table })
        assert.deepStrictEqual(
          (yield* rowsOf(`public.${table}`)).map((row) => row.migration_id),
          [1, 2]
        )
      })
    )

    it.scoped("the directory loader names both files of a duplicate id, and skips test and declaration files", () =>
      Effect.gen(function* () {
        const table = "m_dup_files"
        const dir = yield* directory({
          "0001_a.sql": "-- migrate:up\nSELECT 1;\n",
          "0001_a.ts": tsMigration("SELECT 1"),
          "0002_b.test.ts": "throw new Error('a test file was imported')\n",
          "0003_c.d.ts": "export {}\n"
        })
        const error = migrationError(yield* Effect.exit(Migrator.up({ loader: Migrator.fromDirectory(dir), table })))
        assert.match(error.message, /Two migration files have id 1: 0001_a\.(sql|ts) and 0001_a\.(sql|ts)/)
        fs.rmSync(path.join(dir, "0001_a.ts"))
        const ran = yield* Migrator.up({ loader: Migrator.fromDirectory(dir), table })
        assert.deepStrictEqual(
          ran.map((migration) => migration.id),
          [1]
        )
      })
    )
  })
})
