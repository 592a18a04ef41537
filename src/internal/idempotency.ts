/**
 * Exactly-once transactions: the keyed record of an outcome (its table, created on first use), the lock that makes
 * concurrent calls with one key take turns, and running an effect at most once per key, replaying the recorded
 * result to every later call.
 */
import { createHash } from "node:crypto"
import * as SqlClient from "@effect/sql/SqlClient"
import type { SqlError } from "@effect/sql/SqlError"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Predicate from "effect/Predicate"
import * as Schema from "effect/Schema"
import type * as Transaction from "../Transaction.js"
import { classify, TransactionError } from "../TransactionError.js"
import { withTransaction } from "./transaction.js"

export const table = "effect_transaction_idempotency"

const defaultExpiry = Duration.days(7)

/** The table's DDL: what the shipped migration runs, and what first use runs when the table is missing. */
export const createTable = `CREATE TABLE IF NOT EXISTS ${table} (
  scope text NOT NULL,
  key text NOT NULL,
  request_hash text,
  state text NOT NULL CHECK (state IN ('succeeded', 'failed')),
  result jsonb,
  created_at timestamp with time zone NOT NULL DEFAULT now(),
  expires_at timestamp with time zone NOT NULL,
  PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS ${table}_expires_at ON ${table} (expires_at)`

export const dropTable = `DROP TABLE IF EXISTS ${table}`

/**
 * Creates the table under a lock, so that processes starting together do not race: in a transaction of its own, or,
 * inside a transaction, in a nested block of it (another connection could not be had safely while this one is held;
 * the table then commits, or rolls back, with that transaction).
 */
const ensureTable = () =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.zipRight(
      sql`SELECT pg_advisory_xact_lock(hashtextextended(${"effect-transaction/idempotency-table"}, 0))`,
      sql.unsafe(createTable)
    )
  ).pipe(Effect.mapError(classify), withTransaction)

/** A stable JSON text of any value (object keys sorted), hashed: the fingerprint of a request. */
const fingerprint = (request: unknown) => {
  const stable = (value: unknown): unknown =>
    Array.isArray(value)
      ? value.map(stable)
      : Predicate.isRecord(value) && !(value instanceof Date)
        ? Object.fromEntries(
            Object.keys(value)
              .sort()
              .map((key) => [key, stable(value[key])])
          )
        : typeof value === "bigint"
          ? `${value}n`
          : value
  return createHash("sha256")
    .update(JSON.stringify(stable(request)) ?? "undefined")
    .digest("hex")
}

/** Failures that say nothing final about the request: retrying may succeed, so nothing is recorded. */
const isTransient = (error: unknown) => {
  if (!(error instanceof TransactionError) && !Predicate.isTagged(error, "SqlError")) return false
  const classified = classify(error)
  return (
    classified.isRetryable ||
    classified.reason === "ConnectionLost" ||
    classified.reason === "Timeout" ||
    classified.reason === "LockTimeout" ||
    classified.reason === "StatementTimeout" ||
    classified.reason === "IdleInTransactionTimeout" ||
    classified.reason === "AcquireTimeout"
  )
}

class MissingTable {
  readonly _tag = "MissingTable"
}

const isMissingTable = (error: unknown) => Predicate.isTagged(error, "SqlError") && classify(error).sqlState === "42P01"

/** The errors of this module's own statements: the table missing, or a classified `TransactionError`. */
const ours = (error: SqlError) => (isMissingTable(error) ? new MissingTable() : classify(error))

interface Row {
  readonly state: "succeeded" | "failed"
  readonly request_hash: string | null
  readonly result: unknown
}

const replayFailed = (what: string, scope: string, key: string, cause: unknown) =>
  new TransactionError({
    reason: "ReplayFailed",
    message:
      `The ${what} recorded for idempotency key "${key}" (scope "${scope}") no longer decodes with the schema given ` +
      "now: the schema changed since it was recorded. Keep schemas backward compatible, or use a new scope for the " +
      "new shape.",
    cause
  })

export const idempotent = <A, E, R, I, RA, EF, IF, RF>(
  self: Effect.Effect<A, E, R>,
  options: Transaction.IdempotentOptions<A, I, RA, EF, IF, RF>
): Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current> | RA | RF | SqlClient.SqlClient> => {
  const scope = options.scope ?? "default"
  const { key } = options
  const requestHash = options.request === undefined ? null : fingerprint(options.request)
  const expiresAfter = Duration.decode(options.expiresAfter ?? defaultExpiry)
  const invalid =
    typeof key !== "string" || key === ""
      ? "key must be a non-empty string"
      : typeof scope !== "string" || scope === ""
        ? "scope must be a non-empty string"
        : !Duration.isFinite(expiresAfter) || Duration.toMillis(expiresAfter) <= 0
          ? "expiresAfter must be a positive, finite duration"
          : undefined
  if (invalid !== undefined) {
    return Effect.fail(
      new TransactionError({ reason: "InvalidOption", message: `Transaction.idempotent: ${invalid}.` })
    )
  }

  const record = (sql: SqlClient.SqlClient, state: "succeeded" | "failed", encoded: unknown) =>
    sql`INSERT INTO ${sql(table)} (scope, key, request_hash, state, result, expires_at)
      VALUES (${scope}, ${key}, ${requestHash}, ${state}, ${JSON.stringify(encoded ?? null)}::jsonb,
        now() + ${`${Duration.toMillis(expiresAfter)} milliseconds`}::interval)
      ON CONFLICT (scope, key) DO UPDATE SET request_hash = excluded.request_hash, state = excluded.state,
        result = excluded.result, created_at = now(), expires_at = excluded.expires_at`.pipe(Effect.mapError(ours))

  const attempt: Effect.Effect<
    Either.Either<A, E | TransactionError>,
    E | TransactionError | MissingTable,
    Exclude<R, Transaction.Current> | RA | RF | SqlClient.SqlClient
  > = Effect.gen(function* () {
    const sql = (yield* SqlClient.SqlClient).withoutTransforms()
    // Calls with the same key take turns: the second waits here until the first has committed or rolled back.
    yield* sql`SELECT pg_advisory_xact_lock(hashtextextended(${`${scope.length}:${scope}:${key}`}, 0))`.pipe(
      Effect.mapError(ours)
    )
    const [row] = yield* sql<Row>`SELECT state, request_hash, result FROM ${sql(table)}
      WHERE scope = ${scope} AND key = ${key} AND expires_at > now()`.pipe(Effect.mapError(ours))
    if (row !== undefined) {
      if (row.request_hash !== requestHash) {
        return yield* new TransactionError({
          reason: "KeyReused",
          message:
            `Idempotency key "${key}" (scope "${scope}") was used before for a different request` +
            `${requestHash === null || row.request_hash === null ? " (one call gave a request and the other did not)" : ""}. ` +
            "A key names one request: give each request its own key (for example the client's request id).",
          cause: { recorded: row.request_hash, given: requestHash }
        })
      }
      if (row.state === "succeeded") {
        return Either.right(
          yield* Schema.decodeUnknown(options.success)(row.result).pipe(
            Effect.mapError((error) => replayFailed("result", scope, key, error))
          )
        )
      }
      if (options.failure === undefined) {
        return yield* replayFailed("failure", scope, key, "no failure schema was given")
      }
      return Either.left(
        (yield* Schema.decodeUnknown(options.failure)(row.result).pipe(
          Effect.mapError((error) => replayFailed("failure", scope, key, error))
        )) as unknown as E
      )
    }
    // With a failure schema the effect runs in a block of its own, so that a final failure undoes its writes and
    // is still recorded; without one, any failure rolls the whole transaction back, and the block is not needed.
    const body: Effect.Effect<A, E | TransactionError, R | SqlClient.SqlClient> =
      options.failure === undefined ? self : withTransaction(self)
    const outcome = yield* Effect.either(body)
    if (Either.isRight(outcome)) {
      const encoded = yield* Schema.encode(options.success)(outcome.right).pipe(
        Effect.mapError(
          (error) =>
            new TransactionError({
              reason: "InvalidOption",
              message: `Transaction.idempotent: the result does not encode with the success schema: ${error.message}`,
              cause: error
            })
        )
      )
      yield* record(sql, "succeeded", encoded)
      return outcome
    }
    const error = outcome.left
    if (options.failure === undefined || isTransient(error) || !Schema.is(options.failure)(error)) {
      return yield* Effect.fail(error)
    }
    const encoded = yield* Schema.encode(options.failure)(error as unknown as EF).pipe(
      Effect.mapError(
        (cause) =>
          new TransactionError({
            reason: "InvalidOption",
            message: `Transaction.idempotent: the failure does not encode with the failure schema: ${cause.message}`,
            cause
          })
      )
    )
    yield* record(sql, "failed", encoded)
    return outcome
  }).pipe(withTransaction)

  const run = (retried: boolean): Effect.Effect<Either.Either<A, E | TransactionError>, unknown, unknown> =>
    Effect.catchIf(
      attempt,
      (error): error is MissingTable => error instanceof MissingTable,
      () =>
        retried
          ? Effect.die(new Error(`Transaction.idempotent: the table ${table} is still missing after it was created`))
          : Effect.zipRight(ensureTable(), run(true))
    )

  return Effect.flatMap(run(false), (outcome) => outcome) as Effect.Effect<
    A,
    E | TransactionError,
    Exclude<R, Transaction.Current> | RA | RF | SqlClient.SqlClient
  >
}

export const purgeExpired: Effect.Effect<number, TransactionError, SqlClient.SqlClient> = Effect.flatMap(
  SqlClient.SqlClient,
  (sql) =>
    Effect.map(
      sql<{ n: number }>`WITH gone AS (DELETE FROM ${sql(table)} WHERE expires_at <= now() RETURNING 1)
        SELECT count(*)::int AS n FROM gone`,
      (rows) => rows[0]?.n ?? 0
    ).pipe(
      Effect.catchIf(isMissingTable, () => Effect.succeed(0)),
      Effect.mapError(classify)
    )
)
