/**
 * Typed, classified failures of a transaction.
 *
 * @since 0.1.0
 */
import type { SqlError } from "@effect/sql/SqlError"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Predicate from "effect/Predicate"

/**
 * Every reason a `TransactionError` can carry.
 *
 * Failures of the transaction itself:
 * - `BeginFailed`: no connection could be reserved, or `BEGIN` failed.
 * - `CommitFailed`: `COMMIT` failed or was turned into a rollback.
 * - `RollbackFailed`: `ROLLBACK` failed; the connection was destroyed, nothing was committed.
 * - `SavepointFailed`: `SAVEPOINT`, `RELEASE` or `ROLLBACK TO` of a nested block failed.
 * - `TransactionClosed`: the transaction or nested block had already ended.
 * - `OptionConflict`: a nested block asked for options its outer transaction cannot honour.
 * - `InvalidOption`: an option or argument value that is not allowed; nothing was sent.
 * - `Timeout`: the transaction's `timeout` ran out; it was rolled back.
 * - `AcquireTimeout`: no pooled connection became free within `acquireTimeout`; nothing was sent.
 * - `Unsupported`: the call cannot work in this kind of transaction (the message names the alternative).
 * - `WouldDeadlock`: the fiber waited for the connection held by a block only it can end (one it opened with
 *   `Transaction.begin`), and failed at once; or a block nested deeper kept it out longer than `deadlockTimeout`
 *   (most often a cycle: that block waits for this fiber). The message names both blocks.
 * - `KeyReused`: an idempotency key was used before for a different request (`Transaction.idempotent`).
 * - `ReplayFailed`: an outcome recorded by `Transaction.idempotent` no longer decodes with the schema given.
 *
 * What the database said, by SQLSTATE (from a control statement, or from any `SqlError` through `classify`):
 * - `SerializationFailure` (40001) and `Deadlock` (40P01): retryable by running the whole transaction again.
 * - `UniqueViolation` (23505), `ForeignKeyViolation` (23503), `CheckViolation` (23514), `NotNullViolation`
 *   (23502), `ExclusionViolation` (23P01): the data breaks a constraint (`constraint` names it).
 * - `LockTimeout` (55P03), `StatementTimeout` (57014), `IdleInTransactionTimeout` (25P03).
 * - `ReadOnlyTransaction` (25006): a write in a read-only transaction.
 * - `ConnectionLost` (class 08, 57P01 to 57P03, or a driver error that says the connection failed).
 * - `Unknown`: anything else; `sqlState` and `cause` say more.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { TransactionError } from "effect-transaction"
 *
 * const retryable: ReadonlyArray<TransactionError.Reason> = ["SerializationFailure", "Deadlock"]
 * console.log(TransactionError.reasons.filter((reason) => !retryable.includes(reason)))
 * ```
 */
export const reasons = [
  "BeginFailed",
  "CommitFailed",
  "RollbackFailed",
  "SavepointFailed",
  "TransactionClosed",
  "OptionConflict",
  "InvalidOption",
  "Timeout",
  "AcquireTimeout",
  "Unsupported",
  "WouldDeadlock",
  "KeyReused",
  "ReplayFailed",
  "SerializationFailure",
  "Deadlock",
  "UniqueViolation",
  "ForeignKeyViolation",
  "CheckViolation",
  "NotNullViolation",
  "ExclusionViolation",
  "LockTimeout",
  "StatementTimeout",
  "IdleInTransactionTimeout",
  "ReadOnlyTransaction",
  "ConnectionLost",
  "Unknown"
] as const

/**
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { TransactionError } from "effect-transaction"
 *
 * const isControl = (reason: TransactionError.Reason) => reason.endsWith("Failed")
 * ```
 */
export type Reason = (typeof reasons)[number]

/**
 * The one error type of the engine. `reason` says what failed, `message` says what happened and what to do,
 * `sqlState` and `constraint` carry the database's own classification when there is one.
 *
 * @since 0.1.0
 * @category errors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * declare const transfer: Effect.Effect<void>
 *
 * const program = transfer.pipe(
 *   Transaction.withTransaction({ isolation: "serializable" }),
 *   Effect.catchTag("TransactionError", (error) =>
 *     error.isRetryable ? Effect.logWarning(`try again: ${error.message}`) : Effect.fail(error)
 *   )
 * )
 * ```
 */
export class TransactionError extends Data.TaggedError("TransactionError")<{
  readonly reason: Reason
  readonly message: string
  readonly sqlState?: string | undefined
  readonly constraint?: string | undefined
  /** With `retry`: how many times the transaction ran before this error was given up on. */
  readonly attempts?: number | undefined
  /**
   * `CommitFailed` only: the connection failed before the database answered `COMMIT`, so the transaction may
   * have committed. Check before running it again.
   */
  readonly outcomeUnknown?: boolean | undefined
  readonly cause?: unknown
}> {
  /**
   * Whether running the whole transaction again may succeed.
   *
   * @since 0.1.0
   */
  get isRetryable(): boolean {
    return this.reason === "SerializationFailure" || this.reason === "Deadlock"
  }
}

/**
 * Whether a value is a `TransactionError`.
 *
 * @since 0.1.0
 * @category guards
 * @example
 * ```ts
 * import { TransactionError } from "effect-transaction"
 *
 * declare const error: unknown
 * if (TransactionError.isTransactionError(error)) console.log(error.reason)
 * ```
 */
export const isTransactionError = (u: unknown): u is TransactionError => u instanceof TransactionError

/**
 * What the database said about a failure: the SQLSTATE, the constraint and the server's message, read from a
 * `SqlError`'s cause (or from any driver error that carries them).
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { TransactionError } from "effect-transaction"
 *
 * const describe = (info: TransactionError.DatabaseInfo) => `${info.sqlState ?? "?"}: ${info.message}`
 * ```
 */
export interface DatabaseInfo {
  readonly sqlState: string | undefined
  readonly constraint: string | undefined
  readonly message: string
}

/**
 * Reads the SQLSTATE, constraint name and server message out of a `SqlError` (or a raw driver error).
 *
 * @since 0.1.0
 * @category accessors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { TransactionError } from "effect-transaction"
 *
 * const insert = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO users (email) VALUES (${"a@b.c"})`)
 * const program = insert.pipe(
 *   Effect.catchTag("SqlError", (error) =>
 *     TransactionError.databaseInfo(error).sqlState === "23505" ? Effect.void : Effect.fail(error)
 *   )
 * )
 * ```
 */
export const databaseInfo = (error: SqlError | unknown): DatabaseInfo => {
  let current: unknown = error
  let message = String(error)
  for (let i = 0; i < 5 && Predicate.isObject(current); i++) {
    const found = (current as { readonly message?: unknown }).message
    if (Predicate.isString(found) && found.length > 0) message = found
    const code = (current as { readonly code?: unknown }).code
    // Five characters like a SQLSTATE, but not a Node error code such as EPIPE.
    if (Predicate.isString(code) && /^[0-9A-Z]{5}$/.test(code) && !/^E[A-Z]+$/.test(code)) {
      const constraint = (current as { readonly constraint?: unknown }).constraint
      return { sqlState: code, constraint: Predicate.isString(constraint) ? constraint : undefined, message }
    }
    current = (current as { readonly cause?: unknown }).cause
  }
  return { sqlState: undefined, constraint: undefined, message }
}

/**
 * The reason a SQLSTATE stands for (`Unknown` when it is not one this library classifies, or absent).
 *
 * @since 0.1.0
 * @category accessors
 * @example
 * ```ts
 * import { TransactionError } from "effect-transaction"
 *
 * console.log(TransactionError.reasonOfSqlState("23505")) // "UniqueViolation"
 * ```
 */
export const reasonOfSqlState = (sqlState: string | undefined): Reason => {
  if (sqlState === undefined) return "Unknown"
  switch (sqlState) {
    case "40001":
      return "SerializationFailure"
    case "40P01":
      return "Deadlock"
    case "23505":
      return "UniqueViolation"
    case "23503":
      return "ForeignKeyViolation"
    case "23514":
      return "CheckViolation"
    case "23502":
      return "NotNullViolation"
    case "23P01":
      return "ExclusionViolation"
    case "55P03":
      return "LockTimeout"
    case "57014":
      return "StatementTimeout"
    case "25P03":
      return "IdleInTransactionTimeout"
    case "25006":
      return "ReadOnlyTransaction"
    case "57P01":
    case "57P02":
    case "57P03":
      return "ConnectionLost"
  }
  return sqlState.startsWith("08") ? "ConnectionLost" : "Unknown"
}

const advice: Partial<Record<Reason, string>> = {
  SerializationFailure: "Another transaction changed data this one depends on: run the whole transaction again.",
  Deadlock: "Two transactions waited on each other's locks: run the whole transaction again.",
  UniqueViolation: "A row with the same key exists already.",
  ForeignKeyViolation: "A referenced row is missing, or a row still referenced was deleted.",
  CheckViolation: "A value is outside what a CHECK constraint allows.",
  NotNullViolation: "A required column got no value.",
  ExclusionViolation: "The row conflicts with another under an exclusion constraint.",
  LockTimeout: "A lock was not granted within lock_timeout: another transaction holds it.",
  StatementTimeout: "A statement ran longer than statement_timeout, or was cancelled.",
  IdleInTransactionTimeout: "The session sat idle inside a transaction longer than its idle timeout and was ended.",
  ReadOnlyTransaction: "The transaction is read-only: open it without readOnly: true to write.",
  ConnectionLost: "The connection to the database failed; the transaction was not committed."
}

/** A driver error without SQLSTATE that says the connection itself failed. */
const connectionFailed = (error: unknown): boolean => {
  let current: unknown = error
  for (let i = 0; i < 5 && Predicate.isObject(current); i++) {
    const { code, message } = current as { readonly code?: unknown; readonly message?: unknown }
    if (Predicate.isString(code) && /^(ECONNRESET|ECONNREFUSED|EPIPE|ETIMEDOUT|EHOSTUNREACH|ENOTFOUND)$/.test(code)) {
      return true
    }
    if (Predicate.isString(message) && /connection terminated|not queryable|connection error|socket/i.test(message)) {
      return true
    }
    current = (current as { readonly cause?: unknown }).cause
  }
  return false
}

/**
 * Classifies any failure by what the database said: a `SqlError` (or an error whose `cause` chain holds the
 * driver's error) becomes a `TransactionError` whose `reason` follows the SQLSTATE, with `constraint` and
 * `isRetryable`, and the original error as `cause`. A `TransactionError` is returned as it is.
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { TransactionError } from "effect-transaction"
 *
 * const register = (email: string) =>
 *   Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO users (email) VALUES (${email})`).pipe(
 *     Effect.mapError(TransactionError.classify),
 *     Effect.catchIf(
 *       (error) => error.reason === "UniqueViolation",
 *       () => Effect.fail("email taken" as const)
 *     )
 *   )
 * ```
 */
export const classify = (error: unknown): TransactionError => {
  if (error instanceof TransactionError) return error
  const info = databaseInfo(error)
  const reason =
    info.sqlState === undefined && connectionFailed(error) ? "ConnectionLost" : reasonOfSqlState(info.sqlState)
  const hint = advice[reason]
  return new TransactionError({
    reason,
    message: `${info.message}${info.sqlState === undefined ? "" : ` (SQLSTATE ${info.sqlState})`}${
      info.constraint === undefined ? "" : ` [constraint ${info.constraint}]`
    }.${hint === undefined ? "" : ` ${hint}`}`,
    sqlState: info.sqlState,
    constraint: info.constraint,
    cause: error
  })
}

/**
 * Runs an effect with its `SqlError`s classified into `TransactionError`s, so that `Effect.catchTag` and a
 * `reason` check (or `isReason`) can handle them.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { TransactionError } from "effect-transaction"
 *
 * const insert = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO tags (name) VALUES (${"new"})`)
 * const ignoreDuplicates = insert.pipe(
 *   TransactionError.withClassifiedErrors,
 *   Effect.catchIf(TransactionError.isReason("UniqueViolation"), () => Effect.void)
 * )
 * ```
 */
export const withClassifiedErrors = <A, E, R>(
  self: Effect.Effect<A, E, R>
): Effect.Effect<A, Exclude<E, SqlError> | TransactionError, R> =>
  Effect.mapError(self, (error) =>
    Predicate.isTagged(error, "SqlError") ? classify(error) : (error as Exclude<E, SqlError>)
  )

/**
 * A predicate for `Effect.catchIf` and friends: whether a failure classifies as one of `reasons`, by its own
 * `reason` or by its SQLSTATE.
 *
 * @since 0.1.0
 * @category guards
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { TransactionError } from "effect-transaction"
 *
 * const lockOrSkip = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT * FROM jobs FOR UPDATE NOWAIT`).pipe(
 *   Effect.catchIf(TransactionError.isReason("LockTimeout"), () => Effect.succeed([]))
 * )
 * ```
 */
export const isReason =
  (...wanted: ReadonlyArray<Reason>) =>
  (error: unknown): boolean => {
    const classified = classify(error)
    // A COMMIT that failed on a deferred foreign key is a CommitFailed with SQLSTATE 23503: both reasons match.
    return (
      wanted.includes(classified.reason) ||
      (classified.sqlState !== undefined && wanted.includes(reasonOfSqlState(classified.sqlState)))
    )
  }
