/**
 * Typed, classified failures of a transaction.
 *
 * @since 0.1.0
 */
import type { SqlError } from "@effect/sql/SqlError"
import * as Data from "effect/Data"
import * as Predicate from "effect/Predicate"

/**
 * Every reason a `TransactionError` can carry.
 *
 * - `BeginFailed`: no connection could be reserved, or `BEGIN` failed.
 * - `CommitFailed`: `COMMIT` failed or was turned into a rollback; nothing was committed.
 * - `RollbackFailed`: `ROLLBACK` failed; the connection was destroyed, nothing was committed.
 * - `SavepointFailed`: `SAVEPOINT`, `RELEASE` or `ROLLBACK TO` of a nested block failed.
 * - `SerializationFailure`: SQLSTATE 40001, retryable by running the whole transaction again.
 * - `Deadlock`: SQLSTATE 40P01, retryable by running the whole transaction again.
 * - `TransactionClosed`: the transaction or nested block had already ended.
 * - `OptionConflict`: a nested block asked for options its outer transaction cannot honour.
 * - `InvalidOption`: an option value that is not allowed.
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
  "SerializationFailure",
  "Deadlock",
  "TransactionClosed",
  "OptionConflict",
  "InvalidOption"
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
    if (Predicate.isString(code) && /^[0-9A-Z]{5}$/.test(code)) {
      const constraint = (current as { readonly constraint?: unknown }).constraint
      return { sqlState: code, constraint: Predicate.isString(constraint) ? constraint : undefined, message }
    }
    current = (current as { readonly cause?: unknown }).cause
  }
  return { sqlState: undefined, constraint: undefined, message }
}
