import { execFile, execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { assert, beforeAll, describe, layer } from "@effect/vitest"
import { NodeContext } from "@effect/platform-node"
import { PgClient } from "@effect/sql-pg"
import { Effect, Redacted } from "effect"
import { MigratorCli } from "effect-transaction"
import * as TestDatabase from "./utils/TestDatabase.js"

const root = path.resolve(import.meta.dirname, "..")
/** The package as it is published: built into a folder of its own, with its package.json beside dist/. */
const built = path.join(root, ".tmp", "bin-test")
const bin = path.join(built, "dist", "bin.js")

beforeAll(() => {
  fs.rmSync(built, { recursive: true, force: true })
  fs.mkdirSync(built, { recursive: true })
  fs.copyFileSync(path.join(root, "package.json"), path.join(built, "package.json"))
  // node_modules resolve from the repository root, as they would from an app's.
  fs.symlinkSync(path.join(root, "node_modules"), path.join(built, "node_modules"))
  execFileSync(path.join(root, "node_modules", ".bin", "tsc"), [
    "-p",
    path.join(root, "tsconfig.build.json"),
    "--outDir",
    path.join(built, "dist")
  ])
}, 120_000)

interface Result {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

/** Runs the built bin in `cwd` with `DATABASE_URL` (unless `url` is `null`). */
const cli = (cwd: string, args: ReadonlyArray<string>, url: string | null) =>
  Effect.async<Result>((resume) => {
    const { DATABASE_URL: _, ...env } = process.env
    execFile(
      process.execPath,
      [bin, ...args],
      { cwd, env: url === null ? env : { ...env, DATABASE_URL: url }, timeout: 60_000 },
      (error, stdout, stderr) =>
        resume(Effect.succeed({ code: error === null ? 0 : Number(error.code ?? 1), stdout, stderr }))
    )
  })

/** A project folder: inside the repository (tsx resolves from there) or outside it (nothing resolves). */
const project = (inside: boolean) =>
  Effect.acquireRelease(
    Effect.sync(() =>
      fs.mkdtempSync(inside ? path.join(root, ".tmp", "cli-project-") : path.join(os.tmpdir(), "etx-cli-project-"))
    ),
    (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
  )

const createUsers = `import { SqlClient } from "@effect/sql"
import { NodeContext } from "@effect/platform-node"
import { PgClient } from "@effect/sql-pg"
import { Effect, Redacted } from "effect"
import { MigratorCli } from "effect-transaction"

export const up = Effect.flatMap(SqlClient.SqlClient, (sql) => sql\`CREATE TABLE cli_users (id serial PRIMARY KEY, email text NOT NULL)\`)
export const down = Effect.flatMap(SqlClient.SqlClient, (sql) => sql\`DROP TABLE cli_users\`)
`

const emailIndex =
  "-- migrate:up transaction:false\nCREATE UNIQUE INDEX CONCURRENTLY cli_users_email ON cli_users (email);\n" +
  "-- migrate:down\nDROP INDEX cli_users_email;\n"

describe("effect-transaction migrate (the built bin)", () => {
  layer(TestDatabase.layer(), { excludeTestServices: true })((it) => {
    it.scoped("new writes the next-numbered file with an empty up and down", () =>
      Effect.gen(function* () {
        const dir = yield* project(false)
        const first = yield* cli(dir, ["migrate", "new", "create users"], null)
        assert.strictEqual(first.code, 0, first.stderr)
        assert.match(first.stdout, /Created migrations\/0001_create_users\.ts/)
        const second = yield* cli(dir, ["migrate", "new", "add_index", "--sql"], null)
        assert.strictEqual(second.code, 0, second.stderr)
        assert.deepStrictEqual(fs.readdirSync(path.join(dir, "migrations")), [
          "0001_create_users.ts",
          "0002_add_index.sql"
        ])
        const sql = fs.readFileSync(path.join(dir, "migrations", "0002_add_index.sql"), "utf8")
        assert.match(sql, /^-- migrate:up\n[\s\S]*-- migrate:down\n/)
        const ts = fs.readFileSync(path.join(dir, "migrations", "0001_create_users.ts"), "utf8")
        assert.match(ts, /export const up = /)
        assert.match(ts, /export const down = /)
      })
    )

    it.scoped("status, up, validate and down: exit codes 1 when pending, 0 when up to date, 2 on a problem", () =>
      Effect.gen(function* () {
        const { url } = yield* TestDatabase.TestDatabase
        const dir = yield* project(true)
        const migrations = path.join(dir, "db")
        fs.mkdirSync(migrations)
        fs.writeFileSync(path.join(migrations, "0001_create_users.ts"), createUsers)
        fs.writeFileSync(path.join(migrations, "0002_email_index.sql"), emailIndex)
        const args = ["--directory", "db", "--table", "cli_migrations"]

        const pending = yield* cli(dir, ["migrate", "status", ...args], url)
        assert.strictEqual(pending.code, 1, pending.stderr)
        assert.match(pending.stdout, /0001\s+create_users\s+pending/)
        assert.match(pending.stdout, /2 migrations pending/)

        const dry = yield* cli(dir, ["migrate", "up", "--dry-run", ...args], url)
        assert.strictEqual(dry.code, 0, dry.stderr)
        assert.match(dry.stdout, /0001_create_users: ran and rolled back \(dry run\)/)
        assert.match(dry.stdout, /0002_email_index: not run: it runs outside a transaction/)

        const up = yield* cli(dir, ["migrate", "up", ...args], url)
        assert.strictEqual(up.code, 0, up.stderr)
        assert.match(up.stdout, /0001_create_users: applied/)
        assert.match(up.stdout, /0002_email_index: applied \(\d+ ms, no transaction\)/)

        const upToDate = yield* cli(dir, ["migrate", "status", ...args], url)
        assert.strictEqual(upToDate.code, 0, upToDate.stderr)
        assert.match(upToDate.stdout, /0002\s+email_index\s+applied\s+\d{4}-/)
        assert.strictEqual((yield* cli(dir, ["migrate", "validate", ...args], url)).code, 0)

        fs.appendFileSync(path.join(migrations, "0002_email_index.sql"), "-- edited\n")
        const changed = yield* cli(dir, ["migrate", "validate", ...args], url)
        assert.strictEqual(changed.code, 2)
        assert.match(changed.stderr, /0002_email_index \(db\/0002_email_index\.sql\) was changed after it was applied/)
        fs.writeFileSync(path.join(migrations, "0002_email_index.sql"), emailIndex)

        const down = yield* cli(dir, ["migrate", "down", "--step", "1", ...args], url)
        assert.strictEqual(down.code, 0, down.stderr)
        assert.match(down.stdout, /0002_email_index: reverted/)
        const afterDown = yield* cli(dir, ["migrate", "status", ...args], url)
        assert.strictEqual(afterDown.code, 1)
        assert.match(afterDown.stdout, /0002\s+email_index\s+pending/)
      })
    )

    it.scoped("no database, bad arguments and TypeScript without a loader end with code 2 and say what to do", () =>
      Effect.gen(function* () {
        const { url } = yield* TestDatabase.TestDatabase
        const outside = yield* project(false)
        fs.mkdirSync(path.join(outside, "migrations"))
        fs.writeFileSync(path.join(outside, "migrations", "0001_create_users.ts"), createUsers)
        const noLoader = yield* cli(outside, ["migrate", "status"], url)
        assert.strictEqual(noLoader.code, 2)
        assert.match(noLoader.stderr, /cannot load \.ts files by itself\. Install tsx in the project/)

        const inside = yield* project(true)
        const noDatabase = yield* cli(inside, ["migrate", "status"], null)
        assert.strictEqual(noDatabase.code, 2)
        assert.match(noDatabase.stderr, /No database: pass --url postgres:\/\/\.\.\. or set DATABASE_URL/)

        const both = yield* cli(inside, ["migrate", "down", "--step", "1", "--to", "0"], url)
        assert.strictEqual(both.code, 2)
        assert.match(both.stderr, /Give either step or to, not both/)

        const unknown = yield* cli(inside, ["migrate", "up", "--bogus"], url)
        assert.strictEqual(unknown.code, 2)
      })
    )

    it.scoped("a migration that throws ends the command with code 1 and says which migration and why", () =>
      Effect.gen(function* () {
        const { url } = yield* TestDatabase.TestDatabase
        const dir = yield* project(true)
        fs.mkdirSync(path.join(dir, "migrations"))
        fs.writeFileSync(
          path.join(dir, "migrations", "0001_throws.ts"),
          'import { Effect } from "effect"\nexport const up = Effect.gen(function* () { throw new Error("boom in migration") })\n'
        )
        const result = yield* cli(dir, ["migrate", "up", "--table", "cli_throws"], url)
        assert.strictEqual(result.code, 1)
        assert.match(
          result.stderr,
          /0001_throws \(migrations\/0001_throws\.ts\) failed and was rolled back.*boom in migration/
        )
      })
    )

    it.scoped("a program runs the same commands in process, with its own database layer (MigratorCli.run)", () =>
      Effect.gen(function* () {
        const { url } = yield* TestDatabase.TestDatabase
        const dir = yield* project(false)
        fs.writeFileSync(path.join(dir, "0001_own.sql"), "-- migrate:up\nCREATE TABLE own_cli (id int);\n")
        const run = MigratorCli.run({ name: "my-app", database: PgClient.layer({ url: Redacted.make(url) }) })
        const args = ["--directory", dir, "--table", "own_cli_migrations"]
        const pending = yield* run(["migrate", "validate", ...args]).pipe(Effect.provide(NodeContext.layer))
        assert.strictEqual(pending, 1)
        assert.strictEqual(yield* run(["migrate", "up", ...args]).pipe(Effect.provide(NodeContext.layer)), 0)
        assert.strictEqual(yield* run(["migrate", "validate", ...args]).pipe(Effect.provide(NodeContext.layer)), 0)
      })
    )
  })
})
