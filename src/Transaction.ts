/**
 * Transactions as Effect values on `@effect/sql`: `withTransaction` opens a transaction, or a savepoint when one
 * is already open, and commits, rolls back and releases exactly.
 *
 * @since 0.1.0
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import type { SqlError } from "@effect/sql/SqlError"
import type * as Cause from "effect/Cause"
import type * as Context from "effect/Context"
import type * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import { dual } from "effect/Function"
import type * as Layer from "effect/Layer"
import type * as Metric from "effect/Metric"
import type * as Option from "effect/Option"
import type * as Schedule from "effect/Schedule"
import type * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import type { YieldWrap } from "effect/Utils"
import * as idempotency from "./internal/idempotency.js"
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
   * A limit on the whole call: the wait for a pooled connection, `BEGIN`, the body, `COMMIT`, and with `retry`
   * every further attempt and the waits between them. When it runs out, the body is interrupted (its running
   * statement, or `COMMIT`, cancelled with PostgreSQL's cancel request, never through the pool) and the
   * transaction rolled back, failing with `Timeout`. A body that finishes early returns at once.
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
  /**
   * How long to wait for a pooled connection before failing with `AcquireTimeout`; the wait can then also be
   * interrupted. Without it, the wait is bounded only by the pool's own `connectTimeout`. `requiresNew` defaults
   * it to 5 seconds.
   */
  readonly acquireTimeout?: Duration.DurationInput | undefined
  /**
   * How long a statement or nested block of this transaction may be kept out of the connection by one and the same
   * block nested deeper (or stream being read) before failing with `WouldDeadlock`: 60 seconds when absent,
   * `"infinity"` for no bound. Such a wait only ends when that block ends, so one that lasts this long is almost
   * always a cycle: the nested block joins the waiting fiber, or the two fibers take a lock in opposite orders.
   * Waiting for another fiber's statement to finish, or behind several blocks in turn, does not count.
   */
  readonly deadlockTimeout?: Duration.DurationInput | undefined
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
 * A savepoint taken through a manual handle: a nested block that stays open until it is released or rolled back.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { Transaction } from "effect-transaction"
 *
 * const describe = (savepoint: Transaction.Savepoint) => `${savepoint.name} at depth ${savepoint.depth}`
 * ```
 */
export interface Savepoint extends Transaction {
  /** The savepoint's name in SQL. */
  readonly name: string
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
 * The current transaction if there is one, without requiring it.
 *
 * @since 0.1.0
 * @category accessors
 * @example
 * ```ts
 * import { Effect, Option } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * const where = Effect.map(Transaction.currentOption, Option.match({
 *   onNone: () => "outside any transaction",
 *   onSome: (tx) => `in transaction ${tx.id}, depth ${tx.depth}, ${tx.readOnly ? "read-only" : "read-write"}`
 * }))
 * ```
 */
export const currentOption: Effect.Effect<Option.Option<Transaction>> = internal.currentOption

/**
 * Whether the current fiber runs inside a transaction that is still open.
 *
 * @since 0.1.0
 * @category accessors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * const audit = Effect.flatMap(Transaction.isActive, (active) => Effect.log(`in a transaction: ${active}`))
 * ```
 */
export const isActive: Effect.Effect<boolean> = internal.isActive

/**
 * Defines a function whose body always runs as one transaction: `Effect.fn` (a named span, call-site stack
 * traces) plus `withTransaction` with the given options. Called inside another transaction, it becomes a nested
 * block (a savepoint) of it. The body is a generator function or a function returning an Effect; the types of
 * arguments, success, errors and requirements are inferred from it, `Current` is provided.
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { Transaction } from "effect-transaction"
 *
 * const transfer = Transaction.fn("transfer", { isolation: "serializable", retry: true })(
 *   function* (from: number, to: number, amount: number) {
 *     const sql = yield* SqlClient.SqlClient
 *     yield* sql`UPDATE accounts SET balance = balance - ${amount} WHERE id = ${from}`
 *     yield* sql`UPDATE accounts SET balance = balance + ${amount} WHERE id = ${to}`
 *   }
 * )
 *
 * // Without a generator: a function that returns an Effect.
 * const close = Transaction.fn("close")((id: number) =>
 *   Effect.flatMap(SqlClient.SqlClient, (sql) => sql`UPDATE accounts SET closed = true WHERE id = ${id}`)
 * )
 *
 * const program = Effect.zipRight(transfer(1, 2, 10), close(1))
 * ```
 */
export const fn: (
  name: string,
  options?: Options
) => {
  <Eff extends YieldWrap<Effect.Effect<unknown, unknown, unknown>>, AEff, Args extends Array<unknown>>(
    body: (...args: Args) => Generator<Eff, AEff, never>
  ): (
    ...args: Args
  ) => Effect.Effect<
    AEff,
    | ([Eff] extends [never]
        ? never
        : [Eff] extends [YieldWrap<Effect.Effect<infer _A, infer E, infer _R>>]
          ? E
          : never)
    | TransactionError,
    | Exclude<
        [Eff] extends [never]
          ? never
          : [Eff] extends [YieldWrap<Effect.Effect<infer _A, infer _E, infer R>>]
            ? R
            : never,
        Current
      >
    | SqlClient.SqlClient
  >
  <Args extends Array<unknown>, A, E, R>(
    body: (...args: Args) => Effect.Effect<A, E, R>
  ): (...args: Args) => Effect.Effect<A, E | TransactionError, Exclude<R, Current> | SqlClient.SqlClient>
} = (name, options) => {
  const traced = Effect.fn(name)
  // One implementation serves both overloads; their types are checked in test/types.
  return ((body: (...args: Array<unknown>) => Effect.Effect<unknown, unknown, unknown>) =>
    traced(body, (effect) => internal.withTransaction(effect, options))) as ReturnType<typeof fn>
}

/**
 * Runs an effect in a new, independent transaction on another pooled connection, even inside a transaction: it
 * commits or rolls back on its own, and its commit survives a rollback of the caller's transaction (an audit
 * record, a job claim). It does not see the caller's uncommitted writes. The caller keeps its connection while it
 * waits for a second one, so many fibers doing this at once can exhaust the pool: `acquireTimeout` (5 seconds
 * unless given) bounds the wait, which then fails with `AcquireTimeout`. The options are those of
 * `withTransaction`.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { Transaction } from "effect-transaction"
 *
 * const audit = (event: string) =>
 *   Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO audit ${sql.insert({ event })}`).pipe(
 *     Transaction.requiresNew({ acquireTimeout: "2 seconds" })
 *   )
 *
 * declare const placeOrder: Effect.Effect<void, Error, SqlClient.SqlClient>
 *
 * // The attempt is audited even when placing the order fails and rolls back.
 * const program = Effect.zipRight(audit("order attempted"), placeOrder).pipe(Transaction.withTransaction())
 * ```
 */
export const requiresNew: {
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
  <A, E, R>(self: Effect.Effect<A, E, R>, options?: Options) => internal.requiresNew(self, options)
)

/**
 * What went wrong in an `afterCommit` or `afterRollback` hook, as given to `HookFailureHandler`.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Cause } from "effect"
 * import type { Transaction } from "effect-transaction"
 *
 * const summary = (failure: Transaction.HookFailure) =>
 *   `${failure.kind} of transaction ${failure.transactionId}: ${Cause.pretty(failure.cause)}`
 * ```
 */
export interface HookFailure {
  readonly kind: "afterCommit" | "afterRollback"
  /** The `id` of the transaction whose hook failed. */
  readonly transactionId: number
  /** The hook's position among the hooks of its kind that ran, from 0, in registration order. */
  readonly index: number
  /** The hook's failure, defect or interruption. */
  readonly cause: Cause.Cause<unknown>
  /** What happened and what to do, ready to log. */
  readonly message: string
}

/**
 * The tag's identifier for the hook failure handler.
 *
 * @since 0.1.0
 * @category tags
 * @example
 * ```ts
 * import type { Context, Effect } from "effect"
 * import type { Transaction } from "effect-transaction"
 *
 * type Handler = Context.Tag.Service<typeof Transaction.HookFailureHandler>
 * declare const handler: Handler
 * const report: (failure: Transaction.HookFailure) => Effect.Effect<void> = handler
 * ```
 */
export interface HookFailureHandler {
  readonly _: unique symbol
}

/**
 * Receives every failure of an `afterCommit` or `afterRollback` hook. A failing hook never changes the outcome of
 * the transaction or of `withTransaction`: the default handler logs the failure at level Error with its cause;
 * provide your own to count, alert or collect. It is read from the context of the fiber that ends the transaction.
 *
 * @since 0.1.0
 * @category tags
 * @example
 * ```ts
 * import { Effect, Layer } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * // For the whole app:
 * const HookFailuresToMetrics = Layer.succeed(Transaction.HookFailureHandler, (failure) =>
 *   Effect.logError(`hook failed: ${failure.kind}`, failure.cause)
 * )
 *
 * // Around one program:
 * declare const program: Effect.Effect<void>
 * const failures: Array<Transaction.HookFailure> = []
 * const observed = program.pipe(
 *   Effect.provideService(Transaction.HookFailureHandler, (failure) => Effect.sync(() => failures.push(failure)))
 * )
 * ```
 */
export const HookFailureHandler: Context.Reference<HookFailureHandler, (failure: HookFailure) => Effect.Effect<void>> =
  internal.HookFailureHandler

/**
 * The tag's identifier for the metrics switch.
 *
 * @since 0.1.0
 * @category tags
 * @example
 * ```ts
 * import type { Context } from "effect"
 * import type { Transaction } from "effect-transaction"
 *
 * const on: Context.Tag.Service<typeof Transaction.MetricsEnabled> = true
 * ```
 */
export interface MetricsEnabled {
  readonly _: unique symbol
}

/**
 * Whether transactions record their metrics (`Transaction.metrics`); on by default. Spans follow Effect's own
 * switch instead: `Effect.withTracerEnabled(false)` (or `Layer.setTracerEnabled(false)`) turns them off. With both
 * off, a transaction does no observability work at all. Read from the context of the fiber that calls
 * `withTransaction`.
 *
 * @since 0.1.0
 * @category tags
 * @example
 * ```ts
 * import { Effect, Layer } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * declare const program: Effect.Effect<void>
 *
 * // No metrics and no spans for this program:
 * const quiet = program.pipe(Effect.provideService(Transaction.MetricsEnabled, false), Effect.withTracerEnabled(false))
 *
 * // No metrics for the whole app:
 * const NoMetrics = Layer.succeed(Transaction.MetricsEnabled, false)
 * ```
 */
export const MetricsEnabled: Context.Reference<MetricsEnabled, boolean> = internal.MetricsEnabled

/**
 * The tag's identifier for the prepared statements setting.
 *
 * @since 0.1.0
 * @category tags
 * @example
 * ```ts
 * import type { Context } from "effect"
 * import type { Transaction } from "effect-transaction"
 *
 * const statements: Context.Tag.Service<typeof Transaction.PreparedStatements> = 100
 * ```
 */
export interface PreparedStatements {
  readonly _: unique symbol
}

/**
 * How many statements each pooled connection keeps prepared for the transactions of this library; 0 (the default)
 * keeps none. With a positive number, a statement with parameters that a transaction runs is parsed once per
 * connection, under a name, and only bound and executed from then on: PostgreSQL skips parsing and, after five
 * runs, planning it (it keeps a generic plan when that costs no more than planning each run). Each connection keeps
 * that many of the statements it ran most recently. Read from the context of the fiber that opens the transaction;
 * statements outside transactions are never prepared. A value that is not a whole number from 0 to 1,000,000 fails
 * the transaction with `InvalidOption` before anything is sent.
 *
 * What to know before turning it on (docs/performance.md has more):
 * - A schema change under a running app (a column's type changed, `SELECT *` from a table that gained a column) can
 *   fail a prepared statement once per connection that kept it, with PostgreSQL's error; it is prepared afresh the
 *   next time it runs. A type change that does not make it fail (`text` to `citext`) keeps the old parameter types
 *   until the connection is replaced.
 * - An app that switches `search_path` between schemas whose tables differ (a schema per tenant) would see such a
 *   failure at every switch: leave it off there.
 * - A connection pooler in transaction mode must support prepared statements (PgBouncer 1.21 or later, with
 *   `max_prepared_statements` set).
 *
 * @since 0.1.0
 * @category tags
 * @example
 * ```ts
 * import { Layer } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * // Each connection keeps up to 200 statements prepared:
 * const Prepared = Layer.succeed(Transaction.PreparedStatements, 200)
 * ```
 */
export const PreparedStatements: Context.Reference<PreparedStatements, number> = internal.PreparedStatements

/**
 * The Effect metrics every outermost transaction records (docs/observability.md describes each one and its tags).
 * Read them with `Metric.value` or `Metric.snapshot`, or export them with `@effect/opentelemetry`.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Effect, Metric } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * const retriesSoFar = Effect.map(Metric.value(Transaction.metrics.retries), (state) => state.count)
 * ```
 */
export const metrics: {
  /** `effect_transaction.duration`: seconds from the call to its end, tag `outcome`. */
  readonly duration: Metric.Metric.Histogram<number>
  /** `effect_transaction.outcomes`: transactions ended, tags `outcome` and (on failure) `reason`. */
  readonly outcomes: Metric.Metric.Counter<number>
  /** `effect_transaction.retries`: attempts run again, tag `reason`. */
  readonly retries: Metric.Metric.Counter<number>
  /** `effect_transaction.commit_failures`: COMMITs that failed, tag `reason`. */
  readonly commitFailures: Metric.Metric.Counter<number>
  /** `effect_transaction.active`: outermost transactions running now. */
  readonly active: Metric.Metric.Gauge<number>
  /** `effect_transaction.connection_wait`: seconds waiting for a pooled connection before BEGIN. */
  readonly connectionWait: Metric.Metric.Histogram<number>
  /** `effect_transaction.hook_failures`: hooks that failed, tag `kind`. */
  readonly hookFailures: Metric.Metric.Counter<number>
} = internal.metrics

/**
 * Runs `effect` once after the outermost transaction commits, outside it: the connection is back in the pool and
 * the writes are visible to everyone. Registered inside a nested block that rolls back, it is dropped with the
 * block. With `retry`, only the attempt that commits runs its hooks. Hooks run in registration order, before
 * `withTransaction` returns, also when the caller is interrupted during or after a `COMMIT` that succeeded (the
 * interruption takes effect after them); a failing hook goes to `HookFailureHandler` (logged by default) and never
 * fails the transaction or the other hooks. The hook keeps the services of the place it was registered in, and may
 * not require `Current` (it runs outside the transaction). Fails with
 * `TransactionClosed` after the block has ended, and with `Unsupported` inside a transaction this library did not
 * open.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { Transaction } from "effect-transaction"
 *
 * declare const sendWelcomeEmail: (email: string) => Effect.Effect<void, Error>
 *
 * const signUp = (email: string) =>
 *   Effect.gen(function* () {
 *     const sql = yield* SqlClient.SqlClient
 *     yield* sql`INSERT INTO users ${sql.insert({ email })}`
 *     // Sent only if the user row is committed.
 *     yield* Transaction.afterCommit(sendWelcomeEmail(email))
 *   }).pipe(Transaction.withTransaction())
 * ```
 */
export const afterCommit: <X, E, R>(
  effect: Effect.Effect<X, E, R> & HookRequirements<R>
) => Effect.Effect<void, TransactionError, R | Current> = (effect) => internal.registerHook("afterCommit", effect)

/**
 * Runs `effect` once after the outermost transaction rolls back (its body failed, its `timeout` ran out, its
 * COMMIT failed), outside it. With `retry`, only the last attempt's run, when no attempt committed; attempts that
 * were retried keep no hooks. An interruption of the fiber that runs the transaction from outside, before its
 * COMMIT, rolls it back and runs no hooks. Otherwise as `afterCommit`: dropped with a nested block that rolls back, failures go to
 * `HookFailureHandler`.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * declare const uploadFile: (name: string) => Effect.Effect<void>
 * declare const deleteFile: (name: string) => Effect.Effect<void>
 * declare const saveRecord: (name: string) => Effect.Effect<void, Error>
 *
 * // The upload is undone when the record it belongs to is not committed.
 * const attach = (name: string) =>
 *   Effect.gen(function* () {
 *     yield* uploadFile(name)
 *     yield* Transaction.afterRollback(deleteFile(name))
 *     yield* saveRecord(name)
 *   }).pipe(Transaction.withTransaction())
 * ```
 */
export const afterRollback: <X, E, R>(
  effect: Effect.Effect<X, E, R> & HookRequirements<R>
) => Effect.Effect<void, TransactionError, R | Current> = (effect) => internal.registerHook("afterRollback", effect)

/**
 * What a hook may require: anything but `Current`. A hook runs after its transaction has ended, outside it, so an
 * effect that needs `Current` could never run there; the compiler rejects it with this message.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { Transaction } from "effect-transaction"
 *
 * // `unknown` for an ordinary requirement: the hook is accepted.
 * const accepted: Transaction.HookRequirements<never> = undefined as unknown
 * ```
 */
export type HookRequirements<R> = [Extract<R, Current>] extends [never]
  ? unknown
  : "A hook runs after the transaction has ended, outside it: it cannot require Transaction.Current"

/**
 * The options of `begin`: those of `withTransaction` but `timeout` and `retry`, which need the whole transaction as
 * one effect.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { Transaction } from "effect-transaction"
 *
 * const options: Transaction.BeginOptions = { isolation: "repeatable read", statementTimeout: "5 seconds" }
 * ```
 */
export type BeginOptions = Omit<Options, "timeout" | "retry">

/**
 * A transaction under manual control, from `begin`. `run` runs work in it (in the newest open savepoint);
 * `commit` and `rollback` end it, once; savepoints are taken, rolled back to and released by hand. After the end,
 * every method fails with `TransactionClosed`. Work started with `run` must be finished before `commit`: a
 * statement still to come is refused once the transaction has ended.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * declare const handle: Transaction.Handle
 * const finish = (ok: boolean) => (ok ? handle.commit : handle.rollback)
 * ```
 */
export interface Handle {
  /** The transaction (or, inside another transaction, the nested block) the handle controls. */
  readonly transaction: Transaction
  /** Runs `effect` inside the transaction, in its newest open savepoint. */
  readonly run: <A, E, R>(effect: Effect.Effect<A, E, R>) => Effect.Effect<A, E | TransactionError, Exclude<R, Current>>
  /** Commits (releasing savepoints still open) and runs the `afterCommit` hooks. */
  readonly commit: Effect.Effect<void, TransactionError>
  /** Rolls back and runs the `afterRollback` hooks. */
  readonly rollback: Effect.Effect<void, TransactionError>
  /** Takes a savepoint; work run afterwards goes into it until it is released or rolled back. */
  readonly savepoint: Effect.Effect<Savepoint, TransactionError>
  /** Undoes the work since `savepoint` (including later savepoints) and keeps it open, as SQL's `ROLLBACK TO`. */
  readonly rollbackTo: (savepoint: Savepoint) => Effect.Effect<void, TransactionError>
  /** Ends `savepoint` (and later ones) keeping their work, as SQL's `RELEASE`. */
  readonly release: (savepoint: Savepoint) => Effect.Effect<void, TransactionError>
}

/**
 * Begins a transaction under manual control (ormar's and Kysely's style), for code whose commit point is not the
 * end of one effect. The handle belongs to the current scope: closing the scope without `commit` rolls back.
 * Inside another transaction, the handle controls a nested block (a savepoint) of it instead.
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { Transaction } from "effect-transaction"
 *
 * const importRows = (rows: ReadonlyArray<{ readonly id: number }>) =>
 *   Effect.scoped(
 *     Effect.gen(function* () {
 *       const sql = yield* SqlClient.SqlClient
 *       const tx = yield* Transaction.begin({ isolation: "repeatable read" })
 *       for (const row of rows) {
 *         const before = yield* tx.savepoint
 *         // A row that fails is skipped; the rows before it are kept.
 *         const inserted = yield* tx.run(sql`INSERT INTO items ${sql.insert(row)}`).pipe(Effect.either)
 *         yield* inserted._tag === "Left" ? tx.rollbackTo(before) : tx.release(before)
 *       }
 *       yield* tx.commit
 *     })
 *   )
 * ```
 */
export const begin: (
  options?: BeginOptions
) => Effect.Effect<Handle, TransactionError, SqlClient.SqlClient | Scope.Scope> = internal.begin

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
 * The schedule of `retry: true`: exponential back-off from 5 ms, each delay capped at 200 ms and jittered, for at
 * most 10 attempts in all, so that a transaction that keeps failing gives up within about a second of back-off.
 * Under contention, any retrying transaction also takes turns: once it has failed 4 times, its next attempts run
 * alone among the retrying transactions of its SqlClient in this process (docs/retries.md), so none starves.
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

/**
 * The options of `idempotent`.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Schema } from "effect"
 * import type { Transaction } from "effect-transaction"
 *
 * const options: Transaction.IdempotentOptions<number, number, never, never, never, never> = {
 *   key: "payment:8e3f",
 *   success: Schema.Number,
 *   expiresAfter: "1 day"
 * }
 * ```
 */
export interface IdempotentOptions<A, I, RA, EF, IF, RF> {
  /** Names the request: calls with the same key (in the same scope) run the effect once. At most 2,000 bytes. */
  readonly key: string
  /**
   * Encodes the result to store it (as JSON: use schemas that encode to JSON, such as `Schema.Date` rather than
   * `Schema.DateFromSelf`), and decodes it for every later call.
   */
  readonly success: Schema.Schema<A, I, RA>
  /**
   * The typed failures that are final: recorded (the effect's writes rolled back) and replayed to later calls, as
   * this schema decodes them (so they join the error channel). Other failures, defects, interruptions and retryable
   * errors record nothing: the next call runs the effect. Like `success`, it must encode to JSON.
   */
  readonly failure?: Schema.Schema<EF, IF, RF> | undefined
  /**
   * Any value describing the request, fingerprinted (kinds included: a Date differs from its ISO string): the same
   * key with a different request fails with `KeyReused`. Functions, symbols and cycles cannot be fingerprinted.
   */
  readonly request?: unknown
  /** A namespace for keys, e.g. per endpoint. Default `"default"`. */
  readonly scope?: string | undefined
  /** How long the outcome is kept; after that the key is free again. Default 7 days. */
  readonly expiresAfter?: Duration.DurationInput | undefined
}

/**
 * Runs the effect as a transaction at most once per key: its result (or its final failure) is stored, encoded, in
 * the same transaction as its writes, and every later call with the key gets the stored outcome back without running
 * the effect. Concurrent calls with one key take turns (the later ones wait, then replay); calls with different keys
 * do not wait for each other. Inside a transaction, it is a nested block sharing that transaction's fate. Its table
 * (`effect_transaction_idempotency`) is created on first use, or by the migration `Migrator.idempotencyTable`.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { SqlClient } from "@effect/sql"
 * import { Effect, Schema } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * const charge = (paymentId: string, cents: number) =>
 *   Effect.flatMap(SqlClient.SqlClient, (sql) =>
 *     Effect.map(sql<{ id: number }>`INSERT INTO charges (cents) VALUES (${cents}) RETURNING id`, (rows) => rows[0]!.id)
 *   ).pipe(Transaction.idempotent({ key: paymentId, success: Schema.Number, request: { cents } }))
 * ```
 */
export const idempotent: {
  <A, I, RA, EF = never, IF = never, RF = never>(
    options: IdempotentOptions<A, I, RA, EF, IF, RF>
  ): <A2 extends A, E, R>(
    self: Effect.Effect<A2, E, R>
  ) => Effect.Effect<A, E | EF | TransactionError, Exclude<R, Current> | RA | RF | SqlClient.SqlClient>
  <A2 extends A, E, R, A, I, RA, EF = never, IF = never, RF = never>(
    self: Effect.Effect<A2, E, R>,
    options: IdempotentOptions<A, I, RA, EF, IF, RF>
  ): Effect.Effect<A, E | EF | TransactionError, Exclude<R, Current> | RA | RF | SqlClient.SqlClient>
} = dual(
  2,
  <A, E, R, I, RA, EF, IF, RF>(self: Effect.Effect<A, E, R>, options: IdempotentOptions<A, I, RA, EF, IF, RF>) =>
    idempotency.idempotent(self, options)
)

/**
 * Deletes the expired records of `idempotent` and returns how many there were. Run it now and then (a daily job);
 * expired records are ignored until then.
 *
 * @since 0.1.0
 * @category combinators
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Transaction } from "effect-transaction"
 *
 * const purge = Effect.flatMap(Transaction.purgeIdempotencyRecords, (n) => Effect.log(`${n} expired records deleted`))
 * ```
 */
export const purgeIdempotencyRecords: Effect.Effect<number, TransactionError, SqlClient.SqlClient> =
  idempotency.purgeExpired
