/**
 * The `migrate` commands (`up`, `down`, `status`, `validate`, `new`) on @effect/cli, the exit codes they end with,
 * and the TypeScript loader a migrations directory of `.ts` files needs under Node.js.
 */
import { createRequire } from "node:module"
import * as nodePath from "node:path"
import { pathToFileURL } from "node:url"
import * as Args from "@effect/cli/Args"
import * as Command from "@effect/cli/Command"
import type * as CliApp from "@effect/cli/CliApp"
import * as Options from "@effect/cli/Options"
import * as ValidationError from "@effect/cli/ValidationError"
import * as FileSystem from "@effect/platform/FileSystem"
import * as Path from "@effect/platform/Path"
import type * as SqlClient from "@effect/sql/SqlClient"
import * as Cause from "effect/Cause"
import * as Console from "effect/Console"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import type * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Predicate from "effect/Predicate"
import type * as Redacted from "effect/Redacted"
import * as Migrator from "../Migrator.js"
import type * as MigratorCli from "../MigratorCli.js"
import { parseFileName } from "./migrationFiles.js"
import { report as migratorReport } from "./migrator.js"

/** Ends the program with `code`, after `message` (already printed, or printed by the runner). */
export class Exit extends Data.TaggedError("MigratorCliExit")<{ readonly code: number; readonly message: string }> {}

const tsLoaderState: { registered: boolean | undefined } = { registered: undefined }

/**
 * Registers tsx's ESM loader, resolved from the current directory (the app), once: Node.js 20 cannot import `.ts`
 * files by itself. Returns whether a loader is in place.
 */
export const registerTypeScript = Effect.promise(async () => {
  if (tsLoaderState.registered !== undefined) return tsLoaderState.registered
  try {
    const require = createRequire(nodePath.join(process.cwd(), "package.json"))
    // require.resolve finds the CommonJS build of the API; its ES module build sits beside it.
    const resolved = require.resolve("tsx/esm/api").replace(/\.cjs$/, ".mjs")
    const api = (await import(pathToFileURL(resolved).href)) as { register: () => unknown }
    api.register()
    tsLoaderState.registered = true
  } catch {
    tsLoaderState.registered = false
  }
  return tsLoaderState.registered
})

const hasTypeScript = (directory: string) =>
  Effect.gen(function* () {
    const fs = yield* FileSystem.FileSystem
    const entries = yield* Effect.orElseSucceed(fs.readDirectory(directory), () => [] as Array<string>)
    return entries.some((file) => /\.m?ts$/.test(file) && parseFileName(file) !== undefined)
  })

const loaderFor = (directory: string) =>
  Effect.gen(function* () {
    if ((yield* hasTypeScript(directory)) && !(yield* registerTypeScript)) {
      return yield* new Exit({
        code: 2,
        message:
          `${directory} holds TypeScript migrations, and this Node.js cannot load .ts files by itself. Install tsx in ` +
          "the project (npm install --save-dev tsx): the CLI registers it when it is there. Or compile the " +
          "migrations to JavaScript."
      })
    }
    return Migrator.fromDirectory(directory)
  })

const pad = (text: string, width: number) => text.padEnd(width)

const statusTable = (statuses: ReadonlyArray<Migrator.MigrationStatus>, inProgress: boolean) => {
  const rows = [
    ["id", "name", "state", "applied at"],
    ...statuses.map((status) => [
      String(status.id).padStart(4, "0"),
      status.name,
      status.state === "running" && inProgress ? "running (in progress)" : status.state,
      status.appliedAt === undefined ? "" : status.appliedAt.toISOString()
    ])
  ]
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => row[column]!.length)))
  return rows
    .map((row) =>
      row
        .map((cell, column) => pad(cell, widths[column]!))
        .join("  ")
        .trimEnd()
    )
    .join("\n")
}

const ranLine = (ran: Migrator.Ran) => {
  const what = {
    applied: "applied",
    reverted: "reverted",
    "dry-run": "ran and rolled back (dry run)",
    "dry-run-skipped": "not run: it runs outside a transaction, so a dry run cannot roll it back"
  }[ran.outcome]
  return `${String(ran.id).padStart(4, "0")}_${ran.name}: ${what}${
    ran.outcome === "dry-run-skipped" ? "" : ` (${ran.durationMillis} ms${ran.transaction ? "" : ", no transaction"})`
  }`
}

/**
 * The template of `migrate new`. Until it is written, a migration fails (its SQL sections are empty; its TypeScript
 * up and down fail), so an unwritten one is never recorded as applied or reverted.
 */
const template = (sql: boolean) =>
  sql
    ? "-- migrate:up\n\n\n-- migrate:down\n\n"
    : `import { SqlClient } from "@effect/sql"
import { Effect } from "effect"

export const up = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  return yield* Effect.fail(new Error("up is not written yet: replace this line, e.g. with yield* sql\`CREATE TABLE ...\`"))
})

export const down = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  return yield* Effect.fail(new Error("down is not written yet: replace this line, e.g. with yield* sql\`DROP TABLE ...\`"))
})
`

export const makeCommand = <E>(options: MigratorCli.Options<E>) => {
  /** The options every subcommand takes. */
  const shared = {
    url: Options.redacted("url").pipe(
      Options.withDescription("The database URL (default: the DATABASE_URL environment variable)"),
      Options.optional
    ),
    directory: Options.text("directory").pipe(
      Options.withDescription("The migrations directory"),
      Options.withDefault(options.directory ?? "migrations")
    ),
    table: Options.text("table").pipe(
      Options.withDescription("The table of applied migrations"),
      Options.withDefault(options.table ?? "effect_sql_migrations")
    )
  }
  type Shared = {
    readonly url: Option.Option<Redacted.Redacted>
    readonly directory: string
    readonly table: string
  }

  /** Runs `effect` with the database and the migrations of the command line. */
  const withDatabase = <A, E2>(
    config: Shared,
    use: (
      base: Migrator.Options<FileSystem.FileSystem | Path.Path>
    ) => Effect.Effect<A, E2, SqlClient.SqlClient | FileSystem.FileSystem | Path.Path>
  ) =>
    Effect.gen(function* () {
      const loader = yield* loaderFor(config.directory)
      const database: Layer.Layer<SqlClient.SqlClient, E> =
        typeof options.database === "function" ? options.database(Option.getOrUndefined(config.url)) : options.database
      return yield* Effect.provide(use({ loader, table: config.table }), database)
    })

  const up = Command.make(
    "up",
    {
      ...shared,
      to: Options.integer("to").pipe(Options.withDescription("Apply up to this id, included"), Options.optional),
      dryRun: Options.boolean("dry-run").pipe(
        Options.withDescription("Run the pending migrations in a transaction that rolls back, and print them")
      ),
      allowOutOfOrder: Options.boolean("allow-out-of-order").pipe(
        Options.withDescription("Run pending migrations with an id lower than an applied one")
      )
    },
    (args) =>
      withDatabase(args, (base) =>
        Migrator.up({
          ...base,
          to: Option.getOrUndefined(args.to),
          dryRun: args.dryRun,
          allowOutOfOrder: args.allowOutOfOrder
        })
      ).pipe(
        Effect.flatMap((ran) =>
          ran.length === 0
            ? Console.log("Nothing to apply: the database is up to date.")
            : Effect.forEach(ran, (migration) => Console.log(ranLine(migration)), { discard: true })
        )
      )
  ).pipe(Command.withDescription("Apply the pending migrations"))

  const down = Command.make(
    "down",
    {
      ...shared,
      step: Options.integer("step").pipe(Options.withDescription("Revert this many migrations"), Options.optional),
      to: Options.integer("to").pipe(
        Options.withDescription("Revert every migration with a higher id (0: all)"),
        Options.optional
      )
    },
    (args) =>
      withDatabase(args, (base) =>
        Migrator.down({ ...base, step: Option.getOrUndefined(args.step), to: Option.getOrUndefined(args.to) })
      ).pipe(
        Effect.flatMap((ran) =>
          ran.length === 0
            ? Console.log("Nothing to revert.")
            : Effect.forEach(ran, (migration) => Console.log(ranLine(migration)), { discard: true })
        )
      )
  ).pipe(Command.withDescription("Revert the last batch of migrations (or --step N, or --to ID)"))

  /** Prints the table and the problems; ends with 0 (up to date), 1 (pending) or 2 (a problem). */
  const report = (config: Shared, check: boolean) =>
    withDatabase(config, (base) => migratorReport(base)).pipe(
      Effect.flatMap(({ statuses, problems, inProgress }) =>
        Effect.gen(function* () {
          if (!check || problems.length > 0) {
            yield* Console.log(statuses.length === 0 ? "No migrations." : statusTable(statuses, inProgress))
          }
          const pending = statuses.filter((status) => status.state === "pending").length
          if (problems.length > 0) {
            return yield* new Exit({
              code: 2,
              message: `\n${problems.length} problem${problems.length === 1 ? "" : "s"}:\n${problems.map((problem) => `- ${problem.message}`).join("\n")}`
            })
          }
          if (pending > 0 || inProgress) {
            return yield* new Exit({
              code: 1,
              message: inProgress
                ? "\nAnother process is migrating right now."
                : `\n${pending} migration${pending === 1 ? "" : "s"} pending.`
            })
          }
          yield* Console.log(check ? "Migrations are valid and up to date." : "\nUp to date.")
        })
      )
    )

  const status = Command.make("status", shared, (config) => report(config, false)).pipe(
    Command.withDescription(
      "Show every migration and its state; exit 0 when up to date, 1 when pending, 2 on a problem"
    )
  )

  const validate = Command.make("validate", shared, (config) => report(config, true)).pipe(
    Command.withDescription(
      "Check files against the database (for CI); exit 0 when up to date, 1 when pending, 2 on a problem"
    )
  )

  const create = Command.make(
    "new",
    {
      ...shared,
      name: Args.text({ name: "name" }).pipe(Args.withDescription("What the migration does, e.g. add_ledger")),
      sql: Options.boolean("sql").pipe(Options.withDescription("Write a .sql migration instead of a .ts one"))
    },
    (args) =>
      Effect.gen(function* () {
        const directory = args.directory
        const fs = yield* FileSystem.FileSystem
        const path = yield* Path.Path
        const slug = args.name
          .trim()
          .toLowerCase()
          .replace(/[^a-z0-9]+/g, "_")
          .replace(/^_+|_+$/g, "")
        if (slug === "") {
          return yield* new Exit({ code: 2, message: `"${args.name}" is not a usable name: use letters and digits.` })
        }
        yield* fs.makeDirectory(directory, { recursive: true })
        const ids = (yield* fs.readDirectory(directory)).flatMap((file) => {
          const parsed = parseFileName(file)
          return parsed === undefined ? [] : [parsed.id]
        })
        const id = Math.max(0, ...ids) + 1
        const file = path.join(directory, `${String(id).padStart(4, "0")}_${slug}.${args.sql ? "sql" : "ts"}`)
        yield* fs.writeFileString(file, template(args.sql), { flag: "wx" })
        yield* Console.log(`Created ${file}`)
      })
  ).pipe(Command.withDescription("Write the next-numbered migration file, with an empty up and down"))

  const migrate = Command.make("migrate").pipe(
    Command.withDescription("Apply, revert and check schema migrations"),
    Command.withSubcommands([up, down, status, validate, create])
  )
  return Command.make(options.name ?? "effect-transaction").pipe(Command.withSubcommands([migrate]))
}

const describeError = (error: unknown): string => {
  if (Predicate.isTagged(error, "MigratorCliExit")) return (error as Exit).message
  if (Predicate.isTagged(error, "MigrationError")) return (error as Migrator.MigrationError).message
  if (Predicate.isTagged(error, "SqlError")) {
    const cause = (error as { readonly cause?: unknown }).cause
    return `${(error as unknown as Error).message}${cause instanceof Error ? `: ${cause.message}` : ""}`
  }
  return error instanceof Error ? error.message : String(error)
}

export const run =
  <E>(options: MigratorCli.Options<E>) =>
  (argv: ReadonlyArray<string>): Effect.Effect<number, never, CliApp.CliApp.Environment> =>
    Command.run(makeCommand(options), {
      name: options.name ?? "effect-transaction",
      version: options.version ?? "0.0.0"
    })(["node", options.name ?? "effect-transaction", ...argv]).pipe(
      Effect.as(0),
      Effect.catchAll((error) =>
        ValidationError.isValidationError(error)
          ? Effect.succeed(2)
          : Predicate.isTagged(error, "MigratorCliExit")
            ? Effect.as(
                (error as Exit).code === 1
                  ? Console.log((error as Exit).message)
                  : Console.error((error as Exit).message),
                (error as Exit).code
              )
            : Effect.as(
                Console.error(describeError(error)),
                Predicate.isTagged(error, "MigrationError") && (error as Migrator.MigrationError).reason === "Failed"
                  ? 1
                  : 2
              )
      ),
      // A defect (a bug, here or in a migration) still ends with a message and a code, never silently.
      Effect.catchAllCause((cause) =>
        Cause.isInterruptedOnly(cause)
          ? Effect.failCause(cause)
          : Effect.as(Console.error(`Unexpected failure:\n${Cause.pretty(cause)}`), 2)
      )
    )
