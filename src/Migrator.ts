/**
 * Schema migrations with up and down, each in its own transaction of this library's engine, safe when many
 * processes migrate at once. A superset of `@effect/sql`'s Migrator on the same table (`effect_sql_migrations`):
 * its loaders work here, and its Migrator still reads the table after this one has written it.
 *
 * @since 0.1.0
 */
import type * as FileSystem from "@effect/platform/FileSystem"
import type * as Path from "@effect/platform/Path"
import * as SqlMigrator from "@effect/sql/Migrator"
import * as SqlMigratorFileSystem from "@effect/sql/Migrator/FileSystem"
import * as SqlClient from "@effect/sql/SqlClient"
import type { SqlError } from "@effect/sql/SqlError"
import type * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as idempotency from "./internal/idempotency.js"
import * as files from "./internal/migrationFiles.js"
import * as internal from "./internal/migrator.js"

/**
 * Where migrations come from: `@effect/sql`'s loader type, so its loaders (`fromRecord`, `fromGlob`,
 * `fromFileSystem`) and this module's `fromDirectory` are interchangeable.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const loader: Migrator.Loader = Migrator.fromRecord({})
 * ```
 */
export type Loader<R = never> = SqlMigrator.Loader<R>

/**
 * One migration as a loader lists it: id, name, and the effect that loads it.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import type { Migrator } from "effect-transaction"
 *
 * const entry: Migrator.ResolvedMigration = [1, "create_users", Effect.succeed(Effect.void)]
 * ```
 */
export type ResolvedMigration = SqlMigrator.ResolvedMigration

/**
 * A loader for a directory of migration files, in any mix: `0001_create_users.ts` (or `.js`, `.mjs`) exporting
 * `up` (an Effect; a default export works too), optional `down`, and optional `transaction = false`; and
 * `0002_add_index.sql` with a `-- migrate:up` section, an optional `-- migrate:down` section, and
 * `-- migrate:up transaction:false` to run outside a transaction. Files are ordered by their integer id prefix;
 * each file's text is checksummed (line endings normalised), so an applied migration that changes is caught.
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { NodeContext } from "@effect/platform-node"
 * import { Effect } from "effect"
 * import { Migrator } from "effect-transaction"
 *
 * const migrate = Migrator.up({ loader: Migrator.fromDirectory("migrations") }).pipe(
 *   Effect.provide(NodeContext.layer)
 * )
 * ```
 */
export const fromDirectory: (directory: string) => Loader<FileSystem.FileSystem | Path.Path> = files.fromDirectory

/**
 * `@effect/sql`'s loader for a record of effects keyed `"<id>_<name>"`.
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { SqlClient } from "@effect/sql"
 * import { Effect } from "effect"
 * import { Migrator } from "effect-transaction"
 *
 * const loader = Migrator.fromRecord({
 *   "1_create_users": Effect.flatMap(SqlClient.SqlClient, (sql) => sql`CREATE TABLE users (id serial PRIMARY KEY)`)
 * })
 * ```
 */
export const fromRecord: (migrations: Record<string, Effect.Effect<void, unknown, SqlClient.SqlClient>>) => Loader =
  SqlMigrator.fromRecord

/**
 * `@effect/sql`'s loader for a bundler's glob import (`import.meta.glob("./migrations/*.ts")`).
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const loader = Migrator.fromGlob({ "./migrations/0001_create_users.ts": () => import("node:path") })
 * ```
 */
export const fromGlob: (migrations: Record<string, () => Promise<unknown>>) => Loader = SqlMigrator.fromGlob

/**
 * `@effect/sql`'s loader for a directory of `.ts` / `.js` files (no `.sql` files and no checksums: prefer
 * `fromDirectory`).
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const loader = Migrator.fromFileSystem("migrations")
 * ```
 */
export const fromFileSystem: (directory: string) => Loader<FileSystem.FileSystem> = SqlMigratorFileSystem.fromFileSystem

/**
 * Why migrating failed.
 *
 * - `DuplicateId`: two migrations share an id.
 * - `OutOfOrder`: a pending migration's id is lower than an applied one's.
 * - `MissingFile`: an applied migration has no file any more.
 * - `ChecksumMismatch`: an applied migration's file changed.
 * - `PreviouslyFailed`: a migration that ran outside a transaction failed, or never finished.
 * - `ImportFailed` / `InvalidFile`: a migration file could not be loaded, or is not a migration.
 * - `Failed`: a migration failed while running.
 * - `NoDown`: a migration to revert has no down migration.
 * - `InvalidTarget`: `to` names no migration, or `step` is not a whole number of at least 1.
 * - `LockWaitTimeout`: another process held the migration lock longer than `waitTimeout`.
 *
 * @since 0.1.0
 * @category errors
 * @example
 * ```ts
 * import type { Migrator } from "effect-transaction"
 *
 * const needsAPerson = (reason: Migrator.MigrationErrorReason) => reason !== "LockWaitTimeout"
 * ```
 */
export type MigrationErrorReason =
  | "DuplicateId"
  | "OutOfOrder"
  | "MissingFile"
  | "ChecksumMismatch"
  | "PreviouslyFailed"
  | "ImportFailed"
  | "InvalidFile"
  | "Failed"
  | "NoDown"
  | "InvalidTarget"
  | "LockWaitTimeout"

/**
 * The migrator's error: a `reason`, a message that says what to do, the migration concerned, and the cause. Its tag
 * is `@effect/sql`'s (`MigrationError`), so `Effect.catchTag("MigrationError", ...)` catches both.
 *
 * @since 0.1.0
 * @category errors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Migrator } from "effect-transaction"
 *
 * const migrate = Migrator.up({ loader: Migrator.fromRecord({}) }).pipe(
 *   Effect.catchTag("MigrationError", (error) => Effect.logError(error.reason, error.message))
 * )
 * ```
 */
export const MigrationError: typeof internal.MigrationError = internal.MigrationError

/**
 * The type of `MigrationError`.
 *
 * @since 0.1.0
 * @category errors
 * @example
 * ```ts
 * import type { Migrator } from "effect-transaction"
 *
 * const describe = (error: Migrator.MigrationError) => `${error.reason}: ${error.message}`
 * ```
 */
export type MigrationError = internal.MigrationError

/**
 * The options every command takes.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const options: Migrator.Options = { loader: Migrator.fromRecord({}), lockTimeout: "3 seconds" }
 * ```
 */
export interface Options<R = never> {
  readonly loader: Loader<R>
  /** The table of applied migrations. Default `effect_sql_migrations`, `@effect/sql`'s. */
  readonly table?: string | undefined
  /** PostgreSQL's `lock_timeout` for each migration's transaction. Default 5 seconds. */
  readonly lockTimeout?: Duration.DurationInput | undefined
  /** How many times a migration that hit `lockTimeout` is tried again (with back-off). Default 4. */
  readonly lockRetries?: number | undefined
  /** How long to wait while another process holds the migration lock. Default 10 minutes. */
  readonly waitTimeout?: Duration.DurationInput | undefined
  /** How often a waiting process tries the lock again. Default 200 milliseconds. */
  readonly pollInterval?: Duration.DurationInput | undefined
  /** Run pending migrations whose id is lower than an applied one's, instead of failing. Default `false`. */
  readonly allowOutOfOrder?: boolean | undefined
}

/**
 * The options of `up`.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const options: Migrator.UpOptions = { loader: Migrator.fromRecord({}), to: 7, dryRun: true }
 * ```
 */
export interface UpOptions<R = never> extends Options<R> {
  /** Apply pending migrations up to this id, included. */
  readonly to?: number | undefined
  /** Run the pending migrations in one transaction that always rolls back, and report what ran. */
  readonly dryRun?: boolean | undefined
}

/**
 * The options of `down`: by default the last batch (what the last `up` applied) is reverted.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const options: Migrator.DownOptions = { loader: Migrator.fromRecord({}), step: 2 }
 * ```
 */
export interface DownOptions<R = never> extends Options<R> {
  /** Revert this many of the newest applied migrations. */
  readonly step?: number | undefined
  /** Revert every applied migration with a higher id than this one (0: all). */
  readonly to?: number | undefined
}

/**
 * What happened to one migration: applied, reverted, run in a dry run (and rolled back), or left out of a dry run
 * (it runs outside a transaction, so it cannot be rolled back).
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { Migrator } from "effect-transaction"
 *
 * const line = (ran: Migrator.Ran) => `${ran.id}_${ran.name}: ${ran.outcome} in ${ran.durationMillis} ms`
 * ```
 */
export interface Ran {
  readonly id: number
  readonly name: string
  readonly transaction: boolean
  readonly durationMillis: number
  readonly outcome: "applied" | "reverted" | "dry-run" | "dry-run-skipped"
}

/**
 * The state of a migration, from its file and its row in the table.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { Migrator } from "effect-transaction"
 *
 * const isProblem = (state: Migrator.State) => state !== "applied" && state !== "pending"
 * ```
 */
export type State = "applied" | "pending" | "out-of-order" | "missing-file" | "checksum-changed" | "failed" | "running"

/**
 * One line of `status`.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { Migrator } from "effect-transaction"
 *
 * const line = (status: Migrator.MigrationStatus) => `${status.id} ${status.name} ${status.state}`
 * ```
 */
export interface MigrationStatus {
  readonly id: number
  readonly name: string
  readonly state: State
  readonly appliedAt: Date | undefined
  readonly batch: number | undefined
  /** The file, for migrations loaded by `fromDirectory`. */
  readonly file: string | undefined
  /** The file's checksum now, when known. */
  readonly checksum: string | undefined
  /** The checksum recorded when it was applied, when known. */
  readonly recordedChecksum: string | undefined
}

/**
 * Applies the pending migrations, each in its own transaction (or outside one, for a migration that opts out),
 * after checking files against the table: it fails before running anything on a duplicate id, a pending id lower
 * than an applied one, an applied migration whose file is missing or changed, or one left failed. Many processes may
 * run it at once: one applies each migration, the others wait for the lock, then find nothing pending.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { SqlClient } from "@effect/sql"
 * import { Effect } from "effect"
 * import { Migrator } from "effect-transaction"
 *
 * const migrate = Migrator.up({
 *   loader: Migrator.fromRecord({
 *     "1_create_users": Effect.flatMap(SqlClient.SqlClient, (sql) => sql`CREATE TABLE users (id serial PRIMARY KEY)`)
 *   })
 * })
 * ```
 */
export const up: <R = never>(
  options: UpOptions<R>
) => Effect.Effect<ReadonlyArray<Ran>, MigrationError | SqlError, SqlClient.SqlClient | R> = internal.up

/**
 * Reverts applied migrations, newest first, each in its own transaction: the last batch by default, or `step`
 * migrations, or down `to` an id. Refuses up front, changing nothing, when a migration in range has no down
 * migration or no file.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const revertLast = Migrator.down({ loader: Migrator.fromDirectory("migrations"), step: 1 })
 * ```
 */
export const down: <R = never>(
  options: DownOptions<R>
) => Effect.Effect<ReadonlyArray<Ran>, MigrationError | SqlError, SqlClient.SqlClient | R> = internal.down

/**
 * The state of every migration, from the files and the table, changing nothing.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Migrator } from "effect-transaction"
 *
 * const pending = Effect.map(Migrator.status({ loader: Migrator.fromDirectory("migrations") }), (statuses) =>
 *   statuses.filter((status) => status.state === "pending")
 * )
 * ```
 */
export const status: <R = never>(
  options: Options<R>
) => Effect.Effect<ReadonlyArray<MigrationStatus>, MigrationError | SqlError, SqlClient.SqlClient | R> = internal.status

/**
 * `status`, failing with the first problem (its message lists them all) when there is one: for CI.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const check = Migrator.validate({ loader: Migrator.fromDirectory("migrations") })
 * ```
 */
export const validate: <R = never>(
  options: Options<R>
) => Effect.Effect<ReadonlyArray<MigrationStatus>, MigrationError | SqlError, SqlClient.SqlClient | R> =
  internal.validate

/**
 * The problems among statuses, as the errors `validate` and `up` would fail with.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Migrator } from "effect-transaction"
 *
 * const report = Effect.map(Migrator.status({ loader: Migrator.fromDirectory("migrations") }), (statuses) =>
 *   Migrator.problems(statuses).map((error) => error.message)
 * )
 * ```
 */
export const problems: (
  statuses: ReadonlyArray<MigrationStatus>,
  options?: { readonly table?: string | undefined; readonly allowOutOfOrder?: boolean | undefined }
) => ReadonlyArray<MigrationError> = internal.problems

/**
 * `up`, with `@effect/sql`'s result shape (`[id, name]` of each applied migration): the drop-in for
 * `@effect/sql`'s `Migrator.make({})(options)` and `@effect/sql-pg`'s `PgMigrator.run(options)`.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Migrator } from "effect-transaction"
 *
 * const migrate = Migrator.run({ loader: Migrator.fromRecord({}) })
 * ```
 */
export const run = <R = never>(
  options: UpOptions<R>
): Effect.Effect<
  ReadonlyArray<readonly [id: number, name: string]>,
  MigrationError | SqlError,
  SqlClient.SqlClient | R
> => Effect.map(internal.up(options), (ran) => ran.map((migration) => [migration.id, migration.name] as const))

/**
 * A layer that applies the pending migrations when it is built (at the app's start), like `@effect/sql-pg`'s
 * `PgMigrator.layer`.
 *
 * @since 0.1.0
 * @category layers
 * @example
 * ```ts
 * import { NodeContext } from "@effect/platform-node"
 * import { Layer } from "effect"
 * import { Migrator } from "effect-transaction"
 *
 * const MigrationsLive = Migrator.layer({ loader: Migrator.fromDirectory("migrations") }).pipe(
 *   Layer.provide(NodeContext.layer)
 * )
 * ```
 */
export const layer = <R = never>(
  options: UpOptions<R>
): Layer.Layer<never, MigrationError | SqlError, SqlClient.SqlClient | R> => Layer.effectDiscard(internal.up(options))

/**
 * The migration that creates the table of `Transaction.idempotent` (`effect_transaction_idempotency`), for projects
 * that create every table through migrations (otherwise `idempotent` creates it on first use). Add it as a file of
 * your migrations directory.
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * // migrations/0010_idempotency.ts
 * import { Migrator } from "effect-transaction"
 *
 * export const { up, down } = Migrator.idempotencyTable
 * ```
 */
export const idempotencyTable: {
  readonly up: Effect.Effect<void, SqlError, SqlClient.SqlClient>
  readonly down: Effect.Effect<void, SqlError, SqlClient.SqlClient>
} = {
  up: Effect.flatMap(SqlClient.SqlClient, (sql) => Effect.asVoid(sql.unsafe(idempotency.createTable))),
  down: Effect.flatMap(SqlClient.SqlClient, (sql) => Effect.asVoid(sql.unsafe(idempotency.dropTable)))
}
