/**
 * Transactions as Effect values on `@effect/sql`: `withTransaction` opens a transaction, or a savepoint when one
 * is already open, and commits, rolls back and releases exactly.
 *
 * @since 0.1.0
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import type { SqlError } from "@effect/sql/SqlError"
import type * as Context from "effect/Context"
import type * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import { dual } from "effect/Function"
import type * as Layer from "effect/Layer"
import type * as Schedule from "effect/Schedule"
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
  /**
   * A limit on the whole transaction, from `BEGIN` to the end of `COMMIT`. When it runs out, the body is
   * interrupted (its running statement cancelled) and the transaction rolled back, failing with `Timeout`.
   */
  readonly timeout?: Duration.DurationInput | undefined
  /** PostgreSQL's `statement_timeout` for every statement of the transaction (`SET LOCAL`). */
  readonly statementTimeout?: Duration.DurationInput | undefined
  /** PostgreSQL's `lock_timeout`: how long a statement may wait for a lock (`SET LOCAL`). */
  readonly lockTimeout?: Duration.DurationInput | undefined
  /**
   * PostgreSQL's `idle_in_transaction_session_timeout` (`SET LOCAL`): the server ends the session when the
   * transaction sits idle longer, for example while the body waits on something else.
   */
  readonly idleTimeout?: Duration.DurationInput | undefined
  /**
   * Run the whole transaction again when it fails with a serialization failure or a deadlock, at a statement or at
   * `COMMIT`. `true` uses `defaultRetrySchedule`; a `Schedule` (fed the classified error) decides itself.
   */
  readonly retry?: boolean | Schedule.Schedule<unknown, TransactionError> | undefined
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

/**
 * The retry policy of `retry: true`: exponential back-off from 10 ms, each delay capped at one second and
 * jittered, for at most 10 attempts in all.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Effect, Schedule } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * declare const transfer: Effect.Effect<void>
 *
 * // The default policy, logging every retry.
 * const retry = Schedule.tapInput(Transaction.defaultRetrySchedule, (error) => Effect.logWarning("retrying", error))
 * const program = transfer.pipe(Transaction.withTransaction({ isolation: "serializable", retry }))
 * ```
 */
export const defaultRetrySchedule: Schedule.Schedule<unknown, unknown> = internal.defaultRetrySchedule

/**
 * Sets a PostgreSQL setting for the rest of the transaction (`set_config(name, value, true)`, like `SET LOCAL`):
 * a row-level-security tenant id, a `search_path`, an application setting read with `current_setting`. The value
 * is sent as a parameter, never spliced into SQL. A nested block that rolls back undoes its own `setLocal`.
 * Requires a transaction; the name must be an identifier or a two-part custom name (`app.tenant_id`), otherwise
 * it fails with `InvalidOption` before anything is sent.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { Transaction } from "effect-transaction"
 *
 * const ordersOf = (tenant: string) =>
 *   Effect.gen(function* () {
 *     yield* Transaction.setLocal("app.tenant_id", tenant) // read by the table's row-level security policy
 *     const sql = yield* SqlClient.SqlClient
 *     return yield* sql`SELECT * FROM orders`
 *   }).pipe(Transaction.withTransaction())
 * ```
 */
export const setLocal: (name: string, value: string) => Effect.Effect<void, TransactionError | SqlError, Current> =
  internal.setLocal

/**
 * Takes a transaction-scoped advisory lock (`pg_advisory_xact_lock`), waiting until it is free. It is held until
 * the transaction ends; taken inside a nested block that rolls back, it is released with the block. Keys are
 * integers (`number` up to 2^53, `bigint` up to 2^63 - 1) or strings, which the database hashes to 64 bits. Requires a
 * transaction. Bound the wait with the `lockTimeout` option.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * declare const chargeInvoice: (id: number) => Effect.Effect<void>
 *
 * // One charge per invoice at a time, across every process that uses the same key.
 * const charge = (id: number) =>
 *   Effect.zipRight(Transaction.advisoryLock(`invoice:${id}`), chargeInvoice(id)).pipe(Transaction.withTransaction())
 * ```
 */
export const advisoryLock = (
  key: number | bigint | string
): Effect.Effect<void, TransactionError | SqlError, Current> => Effect.asVoid(internal.advisoryLock(key, true))

/**
 * Tries to take a transaction-scoped advisory lock (`pg_try_advisory_xact_lock`) without waiting: `true` when it
 * was taken (and is held until the transaction ends), `false` when another transaction holds it. Keys as for
 * `advisoryLock`.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * declare const runNightlyReport: Effect.Effect<void>
 *
 * // Only one instance runs the report; the others skip it.
 * const nightly = Effect.flatMap(Transaction.tryAdvisoryLock("nightly-report"), (mine) =>
 *   mine ? runNightlyReport : Effect.log("another instance is running it")
 * ).pipe(Transaction.withTransaction())
 * ```
 */
export const tryAdvisoryLock = (
  key: number | bigint | string
): Effect.Effect<boolean, TransactionError | SqlError, Current> => internal.advisoryLock(key, false)
