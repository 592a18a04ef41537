/**
 * Exactly-once transactions: the keyed record of an outcome (its table, created on first use), the lock that makes
 * concurrent calls with one key take turns, the fingerprint of a request, and running an effect at most once per key,
 * replaying the recorded outcome to every later call.
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

/** The longest key and scope, in UTF-8 bytes: together they must fit a btree index entry (2,704 bytes). */
const maxKeyBytes = 2000
const maxScopeBytes = 200

/** The table's DDL: what the shipped migration runs, and what first use runs when the table is missing. */
export const createTable = `CREATE TABLE IF NOT EXISTS ${table} (
  scope text NOT NULL,
  key text NOT NULL,
  request_hash text,
  state text NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
  result jsonb,
  created_at timestamp with time zone NOT NULL DEFAULT clock_timestamp(),
  expires_at timestamp with time zone NOT NULL,
  PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS ${table}_expires_at ON ${table} (expires_at)`

export const dropTable = `DROP TABLE IF EXISTS ${table}`

/**
 * Creates the table under a lock, so that processes starting together do not race: in a transaction of its own, or,
 * inside a transaction, in a nested block of it (another connection could not be had safely while this one is held;
 * the table then commits, or rolls back, with that transaction, and other sessions that need it wait until then).
 */
const ensureTable = () =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.zipRight(
      sql`SELECT pg_advisory_xact_lock(hashtextextended(${"effect-transaction/idempotency-table"}, 0))`,
      sql.unsafe(createTable)
    )
  ).pipe(Effect.mapError(classify), withTransaction)

class NotFingerprintable {
  constructor(readonly reason: string) {}
}

/**
 * A canonical text of a request, every value tagged with its kind (so that a Date and its ISO string, a bigint and
 * its digits, a Map and an empty object all differ), object keys sorted; functions, symbols and cycles have none.
 */
const canonical = (value: unknown, seen: Set<unknown> = new Set()): unknown => {
  switch (typeof value) {
    case "string":
    case "boolean":
      return value
    case "number":
      return Number.isFinite(value) ? value : { $number: String(value) }
    case "bigint":
      return { $bigint: value.toString() }
    case "undefined":
      return { $undefined: true }
    case "function":
    case "symbol":
      throw new NotFingerprintable(`it holds a ${typeof value}`)
  }
  if (value === null) return null
  if (seen.has(value)) throw new NotFingerprintable("it holds a cycle")
  seen.add(value)
  try {
    if (value instanceof Date) return { $date: Number.isNaN(value.getTime()) ? "invalid" : value.toISOString() }
    if (Array.isArray(value)) return value.map((item) => canonical(item, seen))
    const sortedEntries = (entries: Iterable<readonly [unknown, unknown]>) =>
      [...entries]
        .map(([k, v]) => [JSON.stringify(canonical(k, seen)), canonical(v, seen)] as const)
        .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    if (value instanceof Map) return { $map: sortedEntries(value.entries()) }
    if (value instanceof Set) return { $set: sortedEntries([...value].map((item) => [item, true] as const)) }
    const record = value as Record<string, unknown>
    // A data type's tag often lives on its prototype (Option, Either): it is part of the value.
    const tag = typeof record._tag === "string" ? { $tag: record._tag } : {}
    return { ...tag, $object: sortedEntries(Object.keys(record).map((k) => [k, record[k]] as const)) }
  } finally {
    seen.delete(value)
  }
}

const fingerprint = (request: unknown) =>
  createHash("sha256")
    .update(JSON.stringify(canonical(request)))
    .digest("hex")

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

interface Lookup {
  readonly isolation: string
  readonly state: "running" | "succeeded" | "failed" | null
  readonly request_hash: string | null
  readonly result: unknown
}

const invalidOption = (message: string, cause?: unknown) =>
  new TransactionError({ reason: "InvalidOption", message: `Transaction.idempotent: ${message}`, cause })

const replayFailed = (message: string, cause: unknown) =>
  new TransactionError({ reason: "ReplayFailed", message, cause })

/**
 * Encodes an outcome to the JSON that is stored, and checks that it decodes again from that JSON: a schema whose
 * encoded form is not JSON (`Schema.DateFromSelf`, a bigint) would otherwise record an outcome no later call can
 * replay.
 */
const toJson = <T, I, RS>(schema: Schema.Schema<T, I, RS>, value: T, what: string) =>
  Effect.gen(function* () {
    const encoded = yield* Schema.encode(schema)(value).pipe(
      Effect.mapError((error) => invalidOption(`the ${what} does not encode with its schema: ${error.message}`, error))
    )
    const json = yield* Effect.try({
      try: () => JSON.stringify(encoded ?? null),
      catch: (cause) =>
        invalidOption(
          `the ${what}'s encoded form is not JSON (${String(cause)}): give a schema that encodes to JSON ` +
            "(Schema.Date, not Schema.DateFromSelf; Schema.BigInt, not Schema.BigIntFromSelf).",
          cause
        )
    })
    yield* Schema.decodeUnknown(schema)(JSON.parse(json)).pipe(
      Effect.mapError((error) =>
        invalidOption(
          `the ${what}'s encoded form does not survive JSON (${error.message}): give a schema that encodes to JSON ` +
            "(Schema.Date, not Schema.DateFromSelf; Schema.Option, not Schema.OptionFromSelf).",
          error
        )
      )
    )
    return json
  })

export const idempotent = <A, E, R, I, RA, EF, IF, RF>(
  self: Effect.Effect<A, E, R>,
  options: Transaction.IdempotentOptions<A, I, RA, EF, IF, RF>
): Effect.Effect<A, E | EF | TransactionError, Exclude<R, Transaction.Current> | RA | RF | SqlClient.SqlClient> =>
  Effect.suspend(() => {
    const scope = options.scope ?? "default"
    const { key } = options
    const expiresAfter = Duration.decode(options.expiresAfter ?? defaultExpiry)
    const bytes = (text: string) => Buffer.byteLength(text, "utf8")
    const invalid =
      typeof key !== "string" || key === ""
        ? "key must be a non-empty string."
        : bytes(key) > maxKeyBytes
          ? `key must be at most ${maxKeyBytes} bytes long; hash a longer one.`
          : typeof scope !== "string" || scope === "" || bytes(scope) > maxScopeBytes
            ? `scope must be a non-empty string of at most ${maxScopeBytes} bytes.`
            : key.includes("\u0000") || scope.includes("\u0000")
              ? "key and scope cannot hold the NUL character."
              : !Duration.isFinite(expiresAfter) || Duration.toMillis(expiresAfter) <= 0
                ? "expiresAfter must be a positive, finite duration."
                : undefined
    if (invalid !== undefined) return Effect.fail(invalidOption(invalid))
    let requestHash: string | null = null
    if (options.request !== undefined) {
      try {
        requestHash = fingerprint(options.request)
      } catch (error) {
        if (!(error instanceof NotFingerprintable)) throw error
        return Effect.fail(invalidOption(`request cannot be fingerprinted: ${error.reason}.`))
      }
    }
    const interval = `${Duration.toMillis(expiresAfter)} milliseconds`
    const where = `for idempotency key "${key}" (scope "${scope}")`
    /** Decodes a recorded outcome; one that no longer decodes is `ReplayFailed`. */
    const replay = <T, IT, RT>(schema: Schema.Schema<T, IT, RT>, recorded: unknown, what: "result" | "failure") =>
      Schema.decodeUnknown(schema)(recorded).pipe(
        Effect.mapError((error) =>
          replayFailed(
            `The ${what} recorded ${where} no longer decodes with the ${what === "result" ? "success" : "failure"} ` +
              "schema given now: the schema changed since it was recorded. Keep schemas backward compatible, or use " +
              "a new scope for the new shape.",
            error
          )
        )
      )

    const attempt: Effect.Effect<
      Either.Either<A, E | EF | TransactionError>,
      E | TransactionError | MissingTable,
      Exclude<R, Transaction.Current> | RA | RF | SqlClient.SqlClient
    > = Effect.gen(function* () {
      const sql = (yield* SqlClient.SqlClient).withoutTransforms()
      // Calls with the same key take turns: the second waits here until the first has committed or rolled back.
      yield* sql`SELECT pg_advisory_xact_lock(hashtextextended(${`${scope.length}:${scope}:${key}`}, 0))`.pipe(
        Effect.mapError(ours)
      )
      const [found] = yield* sql<Lookup>`SELECT current_setting('transaction_isolation') AS isolation,
          r.state, r.request_hash, r.result
        FROM (SELECT 1) AS one LEFT JOIN ${sql(table)} AS r
          ON r.scope = ${scope} AND r.key = ${key} AND r.expires_at > clock_timestamp()`.pipe(Effect.mapError(ours))
      if (found !== undefined && (found.state === "succeeded" || found.state === "failed")) {
        if (found.request_hash !== requestHash) {
          return yield* new TransactionError({
            reason: "KeyReused",
            message:
              `Idempotency key "${key}" (scope "${scope}") was used before for a different request` +
              `${requestHash === null || found.request_hash === null ? " (one call gave a request and the other did not)" : ""}. ` +
              "A key names one request: give each request its own key (for example the client's request id).",
            cause: { recorded: found.request_hash, given: requestHash }
          })
        }
        if (found.state === "succeeded") return Either.right(yield* replay(options.success, found.result, "result"))
        if (options.failure === undefined) {
          return yield* replayFailed(
            `A final failure was recorded ${where}, and this call gives no failure schema to decode it with. Give ` +
              "the failure schema of the call that recorded it.",
            found.result
          )
        }
        return Either.left(yield* replay(options.failure, found.result, "failure"))
      }
      // Above read committed, the snapshot predates the lock: a record another call committed while this one waited
      // is invisible. Claiming the key raises a serialization failure then, before the effect runs (with retry, the
      // next attempt replays the record).
      if (found?.isolation !== "read committed") {
        yield* sql`INSERT INTO ${sql(table)} (scope, key, request_hash, state, expires_at)
          VALUES (${scope}, ${key}, ${requestHash}, 'running', clock_timestamp())
          ON CONFLICT (scope, key) DO UPDATE SET state = 'running', request_hash = excluded.request_hash,
            result = NULL, expires_at = excluded.expires_at
          WHERE ${sql(table)}.expires_at <= clock_timestamp()`.pipe(Effect.mapError(ours))
      }
      const record = (state: "succeeded" | "failed", json: string) =>
        sql`INSERT INTO ${sql(table)} (scope, key, request_hash, state, result, created_at, expires_at)
          VALUES (${scope}, ${key}, ${requestHash}, ${state}, ${json}::jsonb, clock_timestamp(),
            clock_timestamp() + ${interval}::interval)
          ON CONFLICT (scope, key) DO UPDATE SET request_hash = excluded.request_hash, state = excluded.state,
            result = excluded.result, created_at = excluded.created_at, expires_at = excluded.expires_at`.pipe(
          Effect.mapError(ours)
        )
      // With a failure schema the effect runs in a block of its own, so that a final failure undoes its writes and
      // is still recorded; without one, any failure rolls the whole transaction back, and the block is not needed.
      const body: Effect.Effect<A, E | TransactionError, R | SqlClient.SqlClient> =
        options.failure === undefined ? self : withTransaction(self)
      const outcome = yield* Effect.either(body)
      if (Either.isRight(outcome)) {
        yield* record("succeeded", yield* toJson(options.success, outcome.right, "result"))
        return outcome
      }
      const error = outcome.left
      if (options.failure === undefined || isTransient(error) || !Schema.is(options.failure)(error)) {
        return yield* Effect.fail(error)
      }
      yield* record("failed", yield* toJson(options.failure, error as unknown as EF, "failure"))
      return outcome
    }).pipe(withTransaction)

    const run = (retried: boolean): Effect.Effect<Either.Either<A, E | EF | TransactionError>, unknown, unknown> =>
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
      E | EF | TransactionError,
      Exclude<R, Transaction.Current> | RA | RF | SqlClient.SqlClient
    >
  })

export const purgeExpired: Effect.Effect<number, TransactionError, SqlClient.SqlClient> = Effect.flatMap(
  SqlClient.SqlClient,
  (sql) =>
    Effect.map(
      sql<{ n: number }>`WITH gone AS (DELETE FROM ${sql(table)} WHERE expires_at <= clock_timestamp() RETURNING 1)
        SELECT count(*)::int AS n FROM gone`,
      (rows) => rows[0]?.n ?? 0
    ).pipe(
      Effect.catchIf(isMissingTable, () => Effect.succeed(0)),
      Effect.mapError(classify)
    )
)
