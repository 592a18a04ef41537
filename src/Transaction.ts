/**
 * Transactions as Effect values on `@effect/sql`: `withTransaction` opens a transaction, or a savepoint when one
 * is already open, and commits, rolls back and releases exactly.
 *
 * @since 0.1.0
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import type * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import { dual } from "effect/Function"
import type * as Layer from "effect/Layer"
import * as internal from "./internal/transaction.js"
import type { TransactionError } from "./TransactionError.js"

/**
 * The isolation levels a transaction can ask for, weakest first.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Transaction } from "effect-transaction"
 *
 * console.log(Transaction.isolationLevels.join(" < "))
 * ```
 */
export const isolationLevels: readonly ["read committed", "repeatable read", "serializable"] = internal.isolationLevels

/**
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { Transaction } from "effect-transaction"
 *
 * const strict: Transaction.IsolationLevel = "serializable"
 * ```
 */
export type IsolationLevel = (typeof isolationLevels)[number]

/**
 * How a transaction runs. These apply when the block is the outermost one; a nested block may repeat them only
 * where the outer transaction already satisfies them, and fails with an `OptionConflict` otherwise.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { Transaction } from "effect-transaction"
 *
 * const report: Transaction.Options = { isolation: "serializable", readOnly: true, deferrable: true }
 * ```
 */
export interface Options {
  /** The isolation level; the database's default (PostgreSQL: read committed) when absent. */
  readonly isolation?: IsolationLevel | undefined
  /** `true` opens a read-only transaction, `false` an explicitly read-write one. */
  readonly readOnly?: boolean | undefined
  /** Wait for a snapshot free of serialization anomalies; only with `serializable` and `readOnly: true`. */
  readonly deferrable?: boolean | undefined
}

/**
 * The transaction, or nested block, the current fiber runs in.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * const whereAmI = Effect.map(Transaction.Current, (tx) => `transaction ${tx.id} at depth ${tx.depth}`)
 * ```
 */
export interface Transaction {
  /** Unique within the process. Nested blocks share the id of their outermost transaction. */
  readonly id: number
  /** 0 for the outermost block, 1 for a block nested in it, and so on. */
  readonly depth: number
  readonly isolation: IsolationLevel | undefined
  readonly readOnly: boolean
  readonly deferrable: boolean
  /** `false` once the block has ended; statements on a closed block fail with `TransactionClosed`. */
  readonly isOpen: boolean
}

/**
 * The tag's identifier for the current transaction.
 *
 * @since 0.1.0
 * @category tags
 * @example
 * ```ts
 * import type { Effect } from "effect"
 * import type { Transaction } from "effect-transaction"
 *
 * // A function that can only be called inside a transaction:
 * declare const debit: (account: string, amount: number) => Effect.Effect<void, never, Transaction.Current>
 * ```
 */
export interface Current {
  readonly _: unique symbol
}

/**
 * The current transaction. Code that requires it cannot run outside a transaction: `withTransaction` provides
 * it, and the compiler rejects the program where nothing does.
 *
 * @since 0.1.0
 * @category tags
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * const depth = Effect.map(Transaction.Current, (tx) => tx.depth)
 * const program = depth.pipe(Transaction.withTransaction()) // Current is provided here
 * ```
 */
export const Current: Context.Tag<Current, Transaction> = internal.Current

/**
 * Runs an effect in a transaction. The outermost block reserves a connection, sends `BEGIN` with the options,
 * and `COMMIT`s on success or `ROLLBACK`s on failure or interruption. A block nested in it becomes a savepoint
 * that is released on success and rolled back on failure, undoing only its own writes. Failures of the control
 * statements are `TransactionError`s, never defects.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { Transaction } from "effect-transaction"
 *
 * const transfer = Effect.gen(function* () {
 *   const sql = yield* SqlClient.SqlClient
 *   yield* sql`UPDATE accounts SET balance = balance - 10 WHERE id = 1`
 *   yield* sql`UPDATE accounts SET balance = balance + 10 WHERE id = 2`
 * })
 *
 * // data-last
 * const a = transfer.pipe(Transaction.withTransaction({ isolation: "serializable" }))
 * // data-first
 * const b = Transaction.withTransaction(transfer, { isolation: "repeatable read" })
 * ```
 */
export const withTransaction: {
  (
    options?: Options
  ): <A, E, R>(
    self: Effect.Effect<A, E, R>
  ) => Effect.Effect<A, E | TransactionError, Exclude<R, Current> | SqlClient.SqlClient>
  <A, E, R>(
    self: Effect.Effect<A, E, R>,
    options?: Options
  ): Effect.Effect<A, E | TransactionError, Exclude<R, Current> | SqlClient.SqlClient>
} = dual(
  (args) => args.length > 0 && Effect.isEffect(args[0]),
  <A, E, R>(self: Effect.Effect<A, E, R>, options?: Options) => internal.withTransaction(self, options)
)

/**
 * Replaces the app's `SqlClient` with one whose `withTransaction` runs through this engine, so that
 * `@effect/sql`'s Migrator, `Model` repositories and third-party code get released savepoints and rollback on
 * commit failure too. Everything else of the client is unchanged. Errors of the engine reach such callers as a
 * `SqlError` whose `cause` is the `TransactionError`.
 *
 * @since 0.1.0
 * @category layers
 * @example
 * ```ts
 * import { Layer } from "effect"
 * import { PgClient } from "@effect/sql-pg"
 * import { Transaction } from "effect-transaction"
 *
 * const SqlLive = Transaction.layer.pipe(Layer.provide(PgClient.layer({ database: "app" })))
 * ```
 */
export const layer: Layer.Layer<SqlClient.SqlClient, never, SqlClient.SqlClient> = internal.layer
