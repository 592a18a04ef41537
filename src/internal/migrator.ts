/**
 * The migrator: the table of applied migrations (`@effect/sql`'s, with columns added), the session lock that
 * processes migrating at once take turns on, validation of files against the table, and running migrations up and
 * down, each in its own transaction of this library's engine (or outside one, when a migration opts out).
 */
import type * as SqlMigrator from "@effect/sql/Migrator"
import * as SqlClient from "@effect/sql/SqlClient"
import type { Connection } from "@effect/sql/SqlConnection"
import type { SqlError } from "@effect/sql/SqlError"
import * as PgClient from "@effect/sql-pg/PgClient"
import * as Reactivity from "@effect/experimental/Reactivity"
import * as Clock from "effect/Clock"
import * as Data from "effect/Data"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import * as Predicate from "effect/Predicate"
import * as Schedule from "effect/Schedule"
import * as Scope from "effect/Scope"
import type * as Migrator from "../Migrator.js"
import * as Transaction from "../Transaction.js"
import * as TransactionError from "../TransactionError.js"
import { load, type Migration } from "./migrationFiles.js"

export class MigrationError extends Data.TaggedError("MigrationError")<{
  readonly reason: Migrator.MigrationErrorReason
  readonly message: string
  readonly migration?: { readonly id: number; readonly name: string } | undefined
  readonly cause?: unknown
}> {}

const defaults = {
  table: "effect_sql_migrations",
  lockTimeout: Duration.seconds(5),
  lockRetries: 4,
  waitTimeout: Duration.minutes(10),
  pollInterval: Duration.millis(200)
}

const label = (migration: { readonly id: number; readonly name: string }) =>
  `${String(migration.id).padStart(4, "0")}_${migration.name}`

const describe = (migration: Migration) =>
  migration.file === undefined ? label(migration) : `${label(migration)} (${migration.file})`

// ---------------------------------------------------------------------------
// the table
// ---------------------------------------------------------------------------

interface Row {
  readonly id: number
  readonly name: string
  readonly createdAt: Date
  readonly checksum: string | undefined
  readonly state: "applied" | "running" | "failed"
  readonly batch: number | undefined
}

const addedColumns = [
  ["checksum", "text"],
  ["state", "text NOT NULL DEFAULT 'applied'"],
  ["batch", "integer"],
  ["duration_ms", "integer"]
] as const

/** `schema.table` or `table`, each part quoted. */
const quoteIdentifier = (name: string) =>
  name
    .split(".")
    .map((part) => `"${part.replace(/"/g, '""')}"`)
    .join(".")

/**
 * The table's name with its schema: an unqualified name is resolved once, against the search path the migrator starts
 * with, so that a migration that changes `search_path` cannot move where runs are recorded.
 */
const qualify = (sql: SqlClient.SqlClient, table: string) =>
  table.includes(".")
    ? Effect.succeed(table)
    : Effect.map(
        sql<{ schema: string | null }>`SELECT current_schema() AS schema`,
        ([row]) => `${row?.schema ?? "public"}.${table}`
      )

const lockKey = (table: string) => `effect-transaction/Migrator:${table}`

/** Whether another session holds the migration lock right now (a migration is in progress). */
const lockHeld = (sql: SqlClient.SqlClient, table: string) =>
  Effect.map(
    sql<{ free: boolean }>`SELECT pg_try_advisory_xact_lock(hashtextextended(${lockKey(table)}, 0)) AS free`,
    ([row]) => row?.free !== true
  )

/** Creates the table, or adds this library's columns to `@effect/sql`'s (nullable or defaulted, so it still reads it). */
const ensureTable = (sql: SqlClient.SqlClient, table: string) =>
  Effect.gen(function* () {
    yield* sql`CREATE TABLE IF NOT EXISTS ${sql(table)} (
      migration_id integer PRIMARY KEY,
      created_at timestamp with time zone NOT NULL DEFAULT now(),
      name text NOT NULL
    )`
    const present = yield* sql<{ column_name: string }>`SELECT attname AS column_name FROM pg_attribute
      WHERE attrelid = to_regclass(${quoteIdentifier(table)}) AND attnum > 0 AND NOT attisdropped`
    const missing = addedColumns.filter(([column]) => !present.some((row) => row.column_name === column))
    if (missing.length > 0) {
      yield* sql.unsafe(
        `ALTER TABLE ${quoteIdentifier(table)} ${missing
          .map(([column, type]) => `ADD COLUMN IF NOT EXISTS ${column} ${type}`)
          .join(", ")}`
      )
    }
  })

/** The rows of the table, oldest id first; none when the table does not exist yet. */
const readRows = (sql: SqlClient.SqlClient, table: string) =>
  Effect.gen(function* () {
    const [exists] = yield* sql<{
      present: boolean
    }>`SELECT to_regclass(${quoteIdentifier(table)}) IS NOT NULL AS present`
    if (exists?.present !== true) return [] as ReadonlyArray<Row>
    const rows = yield* sql<Record<string, unknown>>`SELECT * FROM ${sql(table)} ORDER BY migration_id`
    return rows.map(
      (row): Row => ({
        id: Number(row.migration_id),
        name: String(row.name),
        createdAt: row.created_at as Date,
        checksum: typeof row.checksum === "string" ? row.checksum : undefined,
        state: row.state === "running" || row.state === "failed" ? row.state : "applied",
        batch: row.batch === null || row.batch === undefined ? undefined : Number(row.batch)
      })
    )
  })

// ---------------------------------------------------------------------------
// the lock
// ---------------------------------------------------------------------------

/**
 * A connection outside any transaction, for the session lock: with a `PgClient`, a dedicated connection outside the
 * app's pool (so that a pool of one still runs the migrations); otherwise one reserved from the pool.
 */
const lockConnection: Effect.Effect<Connection, SqlError, SqlClient.SqlClient | Scope.Scope> = Effect.flatMap(
  Effect.serviceOption(PgClient.PgClient),
  (pg) =>
    Option.isSome(pg)
      ? Effect.flatMap(
          PgClient.make({ ...pg.value.config, maxConnections: 1, minConnections: 0 }).pipe(
            Effect.provide(Reactivity.layer)
          ),
          (client) => client.reserve
        )
      : Effect.flatMap(SqlClient.SqlClient, (sql) => sql.reserve)
)

/**
 * Runs `effect` holding the migration lock: a session advisory lock, polled with `pg_try_advisory_lock` so that a
 * waiter never sits in a lock queue (where it would stall a `CREATE INDEX CONCURRENTLY` of the holder). Inside an
 * enclosing transaction (a test's, say) there is nobody to take turns with: no lock is taken.
 */
const withLock = <A, E, R>(
  table: string,
  options: Migrator.Options<unknown>,
  effect: Effect.Effect<A, E, R>
): Effect.Effect<A, E | MigrationError | SqlError, R | SqlClient.SqlClient> =>
  Effect.flatMap(Effect.serviceOption(SqlClient.TransactionConnection), (enclosing) =>
    Option.isSome(enclosing)
      ? effect
      : Effect.acquireUseRelease(
          Scope.make(),
          (scope) => Effect.zipRight(Scope.extend(acquireLock(table, options), scope), effect),
          (scope, exit) => Scope.close(scope, exit)
        )
  )

/** Takes the migration lock on a connection of its own, released (with the connection) when the scope closes. */
const acquireLock = (
  table: string,
  options: Migrator.Options<unknown>
): Effect.Effect<void, MigrationError | SqlError, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const connection = yield* lockConnection
    const key = lockKey(table)
    const tryLock = Effect.map(
      connection.execute("SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS locked", [key], undefined),
      (rows) => rows[0]?.locked === true
    )
    const waitTimeout = Duration.decode(options.waitTimeout ?? defaults.waitTimeout)
    const locked = yield* tryLock.pipe(
      Effect.flatMap((locked) =>
        locked
          ? Effect.succeed(true)
          : Effect.logInfo("Another process is migrating; waiting for it to finish").pipe(
              Effect.zipRight(
                tryLock.pipe(
                  Effect.repeat({
                    schedule: Schedule.spaced(options.pollInterval ?? defaults.pollInterval),
                    until: (locked) => locked
                  }),
                  Effect.as(true)
                )
              )
            )
      ),
      Effect.timeoutOption(waitTimeout)
    )
    if (Option.isNone(locked)) {
      return yield* new MigrationError({
        reason: "LockWaitTimeout",
        message:
          `Another process has held the migration lock of ${table} for more than ${Duration.format(waitTimeout)}. ` +
          "It is still migrating, or it hung: find its session with `SELECT * FROM pg_locks l JOIN " +
          "pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory'`, or raise waitTimeout."
      })
    }
    yield* Effect.addFinalizer(() =>
      Effect.ignore(connection.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", [key], undefined))
    )
  })

// ---------------------------------------------------------------------------
// loading and validation
// ---------------------------------------------------------------------------

const loadAll = <R>(loader: SqlMigrator.Loader<R>) =>
  Effect.gen(function* () {
    const resolved = yield* loader.pipe(
      Effect.mapError(
        (error) =>
          new MigrationError({
            reason:
              error.reason === "duplicates"
                ? "DuplicateId"
                : error.reason === "bad-state"
                  ? "InvalidFile"
                  : "ImportFailed",
            message: error.message,
            cause: error
          })
      )
    )
    const seen = new Map<number, string>()
    for (const [id, name] of resolved) {
      const other = seen.get(id)
      if (other !== undefined) {
        return yield* new MigrationError({
          reason: "DuplicateId",
          message: `Two migrations have id ${id}: ${label({ id, name: other })} and ${label({ id, name })}. Renumber one of them.`,
          migration: { id, name }
        })
      }
      seen.set(id, name)
    }
    return yield* Effect.forEach(resolved, (migration) =>
      load(migration).pipe(
        Effect.mapError(
          (failure) =>
            new MigrationError({
              reason: failure.reason,
              message: failure.message,
              migration: { id: migration[0], name: migration[1] },
              cause: failure.cause
            })
        )
      )
    )
  })

const statusesOf = (
  migrations: ReadonlyArray<Migration>,
  rows: ReadonlyArray<Row>
): ReadonlyArray<Migrator.MigrationStatus> => {
  const files = new Map(migrations.map((migration) => [migration.id, migration]))
  const applied = new Map(rows.map((row) => [row.id, row]))
  const highest = rows.reduce((max, row) => Math.max(max, row.id), 0)
  const fromRows = rows.map((row): Migrator.MigrationStatus => {
    const file = files.get(row.id)
    const base = {
      id: row.id,
      name: row.name,
      appliedAt: row.createdAt,
      batch: row.batch,
      file: file?.file,
      checksum: file?.checksum,
      recordedChecksum: row.checksum
    }
    if (row.state !== "applied") return { ...base, state: row.state }
    if (file === undefined) return { ...base, state: "missing-file" }
    if (row.checksum !== undefined && file.checksum !== undefined && row.checksum !== file.checksum) {
      return { ...base, state: "checksum-changed" }
    }
    return { ...base, state: "applied" }
  })
  const fromFiles = migrations
    .filter((migration) => !applied.has(migration.id))
    .map(
      (migration): Migrator.MigrationStatus => ({
        id: migration.id,
        name: migration.name,
        state: migration.id < highest ? "out-of-order" : "pending",
        appliedAt: undefined,
        batch: undefined,
        file: migration.file,
        checksum: migration.checksum,
        recordedChecksum: undefined
      })
    )
  return [...fromRows, ...fromFiles].sort((a, b) => a.id - b.id)
}

const highestApplied = (statuses: ReadonlyArray<Migrator.MigrationStatus>) =>
  statuses
    .filter((status) => status.appliedAt !== undefined)
    .reduce<Migrator.MigrationStatus | undefined>(
      (max, status) => (max === undefined || status.id > max.id ? status : max),
      undefined
    )

/** The problem a status stands for, as the error to fail with; `undefined` when there is none. */
const problemOf = (
  status: Migrator.MigrationStatus,
  statuses: ReadonlyArray<Migrator.MigrationStatus>,
  table: string,
  allowOutOfOrder: boolean,
  inProgress = false
): MigrationError | undefined => {
  const migration = { id: status.id, name: status.name }
  const name = status.file === undefined ? label(status) : `${label(status)} (${status.file})`
  switch (status.state) {
    case "applied":
    case "pending":
      return undefined
    case "out-of-order": {
      if (allowOutOfOrder) return undefined
      const highest = highestApplied(statuses)!
      return new MigrationError({
        reason: "OutOfOrder",
        message:
          `${name} is pending, but ${label(highest)} with a higher id is already applied (branches merged out of ` +
          "order, most likely). Renumber it above the highest applied id, or run it anyway with allowOutOfOrder " +
          "(--allow-out-of-order) if it does not depend on the order.",
        migration
      })
    }
    case "missing-file":
      return new MigrationError({
        reason: "MissingFile",
        message:
          `${name} is recorded as applied in ${table}, but no migration file has id ${status.id}. Restore the file ` +
          "(check out the branch that has it), or, if it was removed on purpose, delete its row from the table.",
        migration
      })
    case "checksum-changed":
      return new MigrationError({
        reason: "ChecksumMismatch",
        message:
          `${name} was changed after it was applied: its checksum is ${status.checksum}, and was ` +
          `${status.recordedChecksum} when it was applied. Restore the file as it was, and put the change in a new ` +
          "migration.",
        migration
      })
    case "failed":
    case "running":
      if (status.state === "running" && inProgress) return undefined
      return new MigrationError({
        reason: "PreviouslyFailed",
        message:
          `${name} ran outside a transaction and ${status.state === "failed" ? "failed" : "never finished (its process died)"}, ` +
          "so part of it may be applied. Inspect the schema and complete or undo its work by hand (an index left " +
          `INVALID by CREATE INDEX CONCURRENTLY must be dropped), then delete its row (DELETE FROM ${table} WHERE ` +
          `migration_id = ${status.id}) to run it again, or set its state to 'applied' if it is complete.`,
        migration
      })
  }
}

const problemsOf = (
  statuses: ReadonlyArray<Migrator.MigrationStatus>,
  table: string,
  allowOutOfOrder: boolean,
  inProgress = false
): ReadonlyArray<MigrationError> =>
  statuses.flatMap((status) => {
    const problem = problemOf(status, statuses, table, allowOutOfOrder, inProgress)
    return problem === undefined ? [] : [problem]
  })

/** Fails with the first problem, its message followed by the others'. */
const failOnProblems = (problems: ReadonlyArray<MigrationError>) =>
  problems.length === 0
    ? Effect.void
    : Effect.fail(
        problems.length === 1
          ? problems[0]!
          : new MigrationError({
              reason: problems[0]!.reason,
              migration: problems[0]!.migration,
              message: `${problems.length} problems, nothing was run:\n${problems.map((problem) => `- ${problem.message}`).join("\n")}`
            })
      )

// ---------------------------------------------------------------------------
// running
// ---------------------------------------------------------------------------

const isLockTimeout = (error: unknown) =>
  (Predicate.isTagged(error, "SqlError") || error instanceof TransactionError.TransactionError) &&
  TransactionError.classify(error).reason === "LockTimeout"

type Direction = "up" | "down"

const detailOf = (error: unknown) =>
  (Predicate.isTagged(error, "SqlError") || error instanceof TransactionError.TransactionError
    ? TransactionError.classify(error).message
    : error instanceof Error
      ? error.message
      : String(error)
  ).replace(/\.$/, "")

const failed = (migration: Migration, transaction: boolean, direction: Direction) => (error: unknown) => {
  const what = direction === "up" ? `Migration ${describe(migration)}` : `Reverting ${describe(migration)}`
  return new MigrationError({
    reason: "Failed",
    message: transaction
      ? `${what} failed and was rolled back; nothing of it is ${direction === "up" ? "applied" : "reverted"}: ${detailOf(error)}.`
      : direction === "up"
        ? `${what} failed outside a transaction; what it did before failing stays: ${detailOf(error)}. It is ` +
          "recorded as failed: inspect the schema, then delete its row to run it again."
        : `${what} failed outside a transaction; what it undid before failing stays: ${detailOf(error)}. It is ` +
          "recorded as failed: complete the revert by hand and delete its row, or redo what was undone and set its " +
          "state to 'applied'.",
    migration: { id: migration.id, name: migration.name },
    cause: error
  })
}

/** A migration that sent COMMIT or ROLLBACK itself: what ran before that may be committed. */
class EndedItsTransaction {
  readonly _tag = "EndedItsTransaction"
}

const elapsed = (start: number) => Effect.map(Clock.currentTimeMillis, (now) => Math.round(now - start))

/**
 * Runs one direction of a migration and records it: in a transaction that also writes its row (retried when a lock
 * is not granted within lockTimeout), or outside one, its row marked `failed` when it fails. A defect of the
 * migration is a failure like any other. A migration that ends its transaction itself is caught: it is recorded as
 * failed, since part of it may be committed.
 */
const runStep = (
  sql: SqlClient.SqlClient,
  options: Migrator.Options<unknown>,
  migration: Migration,
  direction: Direction,
  rows: {
    readonly before?: Effect.Effect<unknown, SqlError> | undefined
    readonly done: (durationMillis: number) => Effect.Effect<unknown, SqlError>
    readonly failed: Effect.Effect<unknown, SqlError>
  }
): Effect.Effect<Migrator.Ran, MigrationError | SqlError, SqlClient.SqlClient> => {
  const effect = Effect.catchAllDefect(direction === "up" ? migration.up : migration.down!, (defect) =>
    Effect.fail(defect)
  )
  const ran = (durationMillis: number): Migrator.Ran => ({
    id: migration.id,
    name: migration.name,
    transaction: migration.transaction,
    durationMillis,
    outcome: direction === "up" ? "applied" : "reverted"
  })
  const xid = Effect.map(sql<{ xid: string }>`SELECT txid_current()::text AS xid`, ([row]) => row?.xid)
  return Effect.logInfo(`${direction === "up" ? "Applying" : "Reverting"} ${label(migration)}`).pipe(
    Effect.zipRight(Clock.currentTimeMillis),
    Effect.flatMap((start) =>
      migration.transaction
        ? Effect.gen(function* () {
            const before = yield* xid
            yield* effect
            if ((yield* xid) !== before) return yield* Effect.fail(new EndedItsTransaction())
            const duration = yield* elapsed(start)
            yield* rows.done(duration)
            return ran(duration)
          }).pipe(
            Transaction.withTransaction({ lockTimeout: options.lockTimeout ?? defaults.lockTimeout }),
            Effect.retry({
              while: isLockTimeout,
              schedule: Schedule.exponential("250 millis").pipe(
                Schedule.intersect(Schedule.recurs(options.lockRetries ?? defaults.lockRetries))
              )
            }),
            Effect.catchIf(
              (error): error is EndedItsTransaction => error instanceof EndedItsTransaction,
              () =>
                Effect.zipRight(
                  Effect.ignore(rows.failed),
                  Effect.fail(
                    new MigrationError({
                      reason: "Failed",
                      message:
                        `${direction === "up" ? "Migration" : "Reverting"} ${describe(migration)} sent COMMIT or ` +
                        "ROLLBACK itself, so it did not run as one transaction: what ran before that may be " +
                        "committed. It is recorded as failed: inspect the schema, then delete its row to run it " +
                        "again. Take COMMIT and ROLLBACK out of it, or mark it to run outside a transaction.",
                      migration: { id: migration.id, name: migration.name }
                    })
                  )
                )
            ),
            Effect.mapError((error) =>
              error instanceof MigrationError ? error : failed(migration, true, direction)(error)
            )
          )
        : Effect.gen(function* () {
            if (rows.before !== undefined) yield* rows.before
            yield* Effect.onExit(Effect.mapError(effect, failed(migration, false, direction)), (exit) =>
              Exit.isSuccess(exit) ? Effect.void : Effect.ignore(rows.failed)
            )
            const duration = yield* elapsed(start)
            yield* rows.done(duration)
            return ran(duration)
          })
    )
  )
}

const applyOne = (
  sql: SqlClient.SqlClient,
  table: string,
  options: Migrator.Options<unknown>,
  migration: Migration,
  batch: number
) => {
  const insert = (state: "applied" | "running" | "failed", durationMillis: number | null) =>
    sql`INSERT INTO ${sql(table)} ${sql.insert({
      migration_id: migration.id,
      name: migration.name,
      checksum: migration.checksum ?? null,
      state,
      batch,
      duration_ms: durationMillis
    })} ON CONFLICT (migration_id) DO UPDATE SET state = excluded.state, duration_ms = excluded.duration_ms,
      created_at = now()`
  return runStep(sql, options, migration, "up", {
    before: insert("running", null),
    done: (duration) => insert("applied", duration),
    failed: insert("failed", null)
  })
}

const revertOne = (sql: SqlClient.SqlClient, table: string, options: Migrator.Options<unknown>, migration: Migration) =>
  runStep(sql, options, migration, "down", {
    done: () => sql`DELETE FROM ${sql(table)} WHERE migration_id = ${migration.id}`,
    failed: sql`UPDATE ${sql(table)} SET state = 'failed' WHERE migration_id = ${migration.id}`
  })

class DryRunDone {
  constructor(readonly ran: ReadonlyArray<Migrator.Ran>) {}
}

/** Runs the pending migrations in one transaction that always rolls back. */
const dryRun = (pending: ReadonlyArray<Migration>) =>
  Effect.forEach(
    pending,
    (migration): Effect.Effect<Migrator.Ran, MigrationError, SqlClient.SqlClient> =>
      migration.transaction
        ? Effect.gen(function* () {
            const start = yield* Clock.currentTimeMillis
            yield* migration.up.pipe(
              Effect.catchAllDefect((defect) => Effect.fail(defect)),
              Transaction.withTransaction(),
              Effect.mapError((error) => {
                const failure = failed(migration, true, "up")(error)
                return new MigrationError({ ...failure, message: `Dry run: ${failure.message}` })
              })
            )
            return {
              id: migration.id,
              name: migration.name,
              transaction: true,
              durationMillis: yield* elapsed(start),
              outcome: "dry-run"
            } satisfies Migrator.Ran
          })
        : Effect.succeed({
            id: migration.id,
            name: migration.name,
            transaction: false,
            durationMillis: 0,
            outcome: "dry-run-skipped"
          } satisfies Migrator.Ran)
  ).pipe(
    Effect.flatMap((ran) => Effect.fail(new DryRunDone(ran))),
    Transaction.withTransaction(),
    Effect.catchIf(
      (error): error is DryRunDone => error instanceof DryRunDone,
      (done) => Effect.succeed(done.ran)
    ),
    Effect.mapError((error) =>
      error instanceof MigrationError
        ? error
        : new MigrationError({
            reason: "Failed",
            message: `The dry run could not run: ${error instanceof Error ? error.message : String(error)}`,
            cause: error
          })
    )
  )

const withoutTransforms = Effect.map(SqlClient.SqlClient, (sql) => sql.withoutTransforms())

/** What to check before running anything: the target exists, nothing is wrong with files or table. */
const checkTarget = (migrations: ReadonlyArray<Migration>, to: number | undefined, applied: ReadonlyArray<Row>) =>
  to === undefined || to === 0 || migrations.some((m) => m.id === to) || applied.some((row) => row.id === to)
    ? Effect.void
    : Effect.fail(
        new MigrationError({
          reason: "InvalidTarget",
          message: `No migration has id ${to}. Give the id of an existing migration (see \`migrate status\`).`
        })
      )

export const up = <R>(
  options: Migrator.UpOptions<R>
): Effect.Effect<ReadonlyArray<Migrator.Ran>, MigrationError | SqlError, SqlClient.SqlClient | R> =>
  Effect.gen(function* () {
    const sql = yield* withoutTransforms
    const name = options.table ?? defaults.table
    const migrations = yield* loadAll(options.loader)
    return yield* withLock(
      name,
      options,
      Effect.gen(function* () {
        const table = yield* qualify(sql, name)
        if (options.dryRun !== true) yield* ensureTable(sql, table)
        const rows = yield* readRows(sql, table)
        yield* checkTarget(migrations, options.to, rows)
        const statuses = statusesOf(migrations, rows)
        yield* failOnProblems(problemsOf(statuses, table, options.allowOutOfOrder === true))
        const applied = new Set(rows.map((row) => row.id))
        const pending = migrations.filter(
          (migration) => !applied.has(migration.id) && (options.to === undefined || migration.id <= options.to)
        )
        if (options.dryRun === true) return yield* dryRun(pending)
        const batch = rows.reduce((max, row) => Math.max(max, row.batch ?? 0), 0) + 1
        return yield* Effect.forEach(pending, (migration) => applyOne(sql, table, options, migration, batch))
      })
    )
  })

export const down = <R>(
  options: Migrator.DownOptions<R>
): Effect.Effect<ReadonlyArray<Migrator.Ran>, MigrationError | SqlError, SqlClient.SqlClient | R> =>
  Effect.gen(function* () {
    const sql = yield* withoutTransforms
    const name = options.table ?? defaults.table
    if (options.step !== undefined && options.to !== undefined) {
      return yield* new MigrationError({
        reason: "InvalidTarget",
        message: "Give either step or to, not both."
      })
    }
    if (options.step !== undefined && (!Number.isInteger(options.step) || options.step < 1)) {
      return yield* new MigrationError({
        reason: "InvalidTarget",
        message: `step must be a whole number of at least 1, not ${options.step}.`
      })
    }
    const migrations = yield* loadAll(options.loader)
    return yield* withLock(
      name,
      options,
      Effect.gen(function* () {
        const table = yield* qualify(sql, name)
        const rows = yield* readRows(sql, table)
        yield* checkTarget(migrations, options.to, rows)
        const newestFirst = [...rows].reverse()
        // The last batch is the highest batch number (an out-of-order migration has a lower id but a later batch);
        // rows written by @effect/sql's Migrator have none, and go one at a time.
        const lastBatch = rows.reduce<number | undefined>(
          (max, row) => (row.batch !== undefined && (max === undefined || row.batch > max) ? row.batch : max),
          undefined
        )
        const range =
          options.step !== undefined
            ? newestFirst.slice(0, options.step)
            : options.to !== undefined
              ? newestFirst.filter((row) => row.id > options.to!)
              : lastBatch === undefined
                ? newestFirst.slice(0, 1)
                : newestFirst.filter((row) => row.batch === lastBatch)
        const files = new Map(migrations.map((migration) => [migration.id, migration]))
        const statuses = statusesOf(migrations, rows)
        const problems = range.flatMap((row) => {
          const status = statuses.find((candidate) => candidate.id === row.id)!
          const problem = problemOf(status, statuses, table, true)
          if (problem !== undefined) return [problem]
          if (files.get(row.id)!.down === undefined) {
            return [
              new MigrationError({
                reason: "NoDown",
                message: `${describe(files.get(row.id)!)} has no down migration, so it cannot be reverted. Add one (export const down = ..., or a "-- migrate:down" section with statements), or revert fewer migrations.`,
                migration: { id: row.id, name: row.name }
              })
            ]
          }
          return []
        })
        yield* failOnProblems(problems)
        return yield* Effect.forEach(range, (row) => revertOne(sql, table, options, files.get(row.id)!))
      })
    )
  })

export const status = <R>(
  options: Migrator.Options<R>
): Effect.Effect<ReadonlyArray<Migrator.MigrationStatus>, MigrationError | SqlError, SqlClient.SqlClient | R> =>
  Effect.map(statusWithLock(options), ({ statuses }) => statuses)

/** The statuses, and whether a migration is in progress right now (the lock is held). */
const statusWithLock = <R>(options: Migrator.Options<R>) =>
  Effect.gen(function* () {
    const sql = yield* withoutTransforms
    const name = options.table ?? defaults.table
    const migrations = yield* loadAll(options.loader)
    const table = yield* qualify(sql, name)
    const statuses = statusesOf(migrations, yield* readRows(sql, table))
    const inProgress = statuses.some((status) => status.state === "running") ? yield* lockHeld(sql, name) : false
    return { statuses, inProgress, table }
  })

export const validate = <R>(
  options: Migrator.Options<R>
): Effect.Effect<ReadonlyArray<Migrator.MigrationStatus>, MigrationError | SqlError, SqlClient.SqlClient | R> =>
  Effect.gen(function* () {
    const { statuses, inProgress, table } = yield* statusWithLock(options)
    yield* failOnProblems(problemsOf(statuses, table, options.allowOutOfOrder === true, inProgress))
    return statuses
  })

/** `status` with its problems, for the command line. */
export const report = <R>(options: Migrator.Options<R>) =>
  Effect.map(statusWithLock(options), ({ statuses, inProgress, table }) => ({
    statuses,
    inProgress,
    problems: problemsOf(statuses, table, options.allowOutOfOrder === true, inProgress)
  }))

export const problems = (
  statuses: ReadonlyArray<Migrator.MigrationStatus>,
  options: { readonly table?: string | undefined; readonly allowOutOfOrder?: boolean | undefined } = {}
) => problemsOf(statuses, options.table ?? defaults.table, options.allowOutOfOrder === true)
