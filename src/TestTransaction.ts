/**
 * A rollback-only test transaction for `@effect/vitest`: the code under test runs against a real database, its
 * own transactions become savepoints that behave like transactions where it commits, and nothing is ever
 * committed.
 *
 * @since 0.1.0
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import type * as Effect from "effect/Effect"
import type * as Layer from "effect/Layer"
import type * as Scope from "effect/Scope"
import * as internal from "./internal/testTransaction.js"
import type * as Transaction from "./Transaction.js"
import type { TransactionError } from "./TransactionError.js"

/**
 * Options of `layer`: how the suite's test transaction begins, and the data every test of the suite starts from.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient, type SqlError } from "@effect/sql"
 * import type { TestTransaction } from "effect-transaction"
 *
 * const options: TestTransaction.LayerOptions<SqlError.SqlError> = {
 *   seed: Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO plans ${sql.insert({ name: "free" })}`)
 * }
 * ```
 */
export interface LayerOptions<E = never, R = never> extends Transaction.BeginOptions {
  /**
   * Runs once, when the layer is built, inside the suite's test transaction: the rows it writes are there for
   * every test, and every test is rolled back to them. Its own transactions behave as in a test.
   */
  readonly seed?: Effect.Effect<unknown, E, R | SqlClient.SqlClient> | undefined
}

/**
 * An `afterCommit` or `afterRollback` hook that `captureHooks` collected instead of running.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import type { TestTransaction } from "effect-transaction"
 *
 * // Run the captured afterCommit hooks, as the commit would have.
 * const runAll = (hooks: ReadonlyArray<TestTransaction.CapturedHook>) =>
 *   Effect.forEach(hooks.filter((hook) => hook.kind === "afterCommit"), (hook) => hook.effect, { discard: true })
 * ```
 */
export interface CapturedHook {
  readonly kind: "afterCommit" | "afterRollback"
  /** The `id` of the transaction that registered it. */
  readonly transactionId: number
  /** The hook, with the services it was registered with, running in the test's transaction. */
  readonly effect: Effect.Effect<unknown, unknown>
}

/**
 * Runs a test in a test transaction that is always rolled back: its own connection and transaction (so tests that
 * run at the same time are isolated from each other), or, inside a suite built with `layer`, a savepoint of the
 * suite's transaction. The effect gets a `SqlClient` whose statements, `sql.reserve` and forked fibers all stay in
 * the test transaction; the code under test's `withTransaction`, `Transaction.fn` and `requiresNew` become blocks
 * of it that check deferred constraints and run their hooks where they would commit. A statement of the test
 * itself that fails does not end the test transaction. The effect's scope closes before the rollback. The options
 * are those of the test transaction's `BEGIN`.
 *
 * @since 0.1.0
 * @category testing
 * @example
 * ```ts
 * import { it } from "@effect/vitest"
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { PgClient } from "@effect/sql-pg"
 * import { TestTransaction, Transaction } from "effect-transaction"
 *
 * const PgLive = PgClient.layer({ database: "app_test" })
 *
 * it.effect("a sign-up is stored", () =>
 *   Effect.gen(function* () {
 *     const sql = yield* SqlClient.SqlClient
 *     yield* sql`INSERT INTO users ${sql.insert({ email: "ada@example.com" })}`.pipe(Transaction.withTransaction())
 *     const rows = yield* sql`SELECT * FROM users`
 *     if (rows.length !== 1) return yield* Effect.fail("expected one user")
 *   }).pipe(TestTransaction.isolate, Effect.provide(PgLive))
 * )
 * ```
 */
export const isolate: <A, E, R>(
  self: Effect.Effect<A, E, R>,
  options?: Transaction.BeginOptions
) => Effect.Effect<A, E | TransactionError, Exclude<R, Scope.Scope> | SqlClient.SqlClient> = internal.isolate

/**
 * A test transaction shared by a suite: built once (by `@effect/vitest`'s `layer` or `it.layer`), it reserves one
 * connection, begins, runs `seed`, and rolls back when the suite ends. It replaces the `SqlClient`, so app layers
 * built on it use the test transaction too. Each test must run in `isolate`, which gives it a savepoint rolled back
 * to the seed after the test; a statement that runs in the suite outside `isolate` fails with an error that says
 * so. The suite's tests share one connection: tests run concurrently take turns on it.
 *
 * @since 0.1.0
 * @category layers
 * @example
 * ```ts
 * import { assert, layer } from "@effect/vitest"
 * import { Effect, Layer } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { PgClient } from "@effect/sql-pg"
 * import { TestTransaction } from "effect-transaction"
 *
 * const Seeded = TestTransaction.layer({
 *   seed: Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO plans ${sql.insert({ name: "free" })}`)
 * }).pipe(Layer.provide(PgClient.layer({ database: "app_test" })))
 *
 * layer(Seeded, { excludeTestServices: true })((it) => {
 *   it.effect("starts from the seed", () =>
 *     Effect.gen(function* () {
 *       const sql = yield* SqlClient.SqlClient
 *       yield* sql`DELETE FROM plans`
 *       assert.strictEqual((yield* sql`SELECT * FROM plans`).length, 0)
 *     }).pipe(TestTransaction.isolate)
 *   )
 *   it.effect("is rolled back to the seed", () =>
 *     Effect.gen(function* () {
 *       const sql = yield* SqlClient.SqlClient
 *       assert.strictEqual((yield* sql`SELECT * FROM plans`).length, 1)
 *     }).pipe(TestTransaction.isolate)
 *   )
 * })
 * ```
 */
export const layer: <E = never, R = never>(
  options?: LayerOptions<E, R>
) => Layer.Layer<SqlClient.SqlClient, E | TransactionError, SqlClient.SqlClient | R> = internal.layer

/**
 * Collects the `afterCommit` and `afterRollback` hooks that the code under test's transactions would run inside
 * `effect`, instead of running them, and returns them with the result: assert on them, or run them
 * (Django's `captureOnCommitCallbacks`).
 *
 * @since 0.1.0
 * @category testing
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { TestTransaction, Transaction } from "effect-transaction"
 *
 * declare const sendWelcome: Effect.Effect<void>
 * const signUp = Transaction.afterCommit(sendWelcome).pipe(Transaction.withTransaction())
 *
 * const test = Effect.gen(function* () {
 *   const [, hooks] = yield* TestTransaction.captureHooks(signUp)
 *   if (hooks.length !== 1 || hooks[0]!.kind !== "afterCommit") return yield* Effect.fail("expected one hook")
 *   yield* hooks[0]!.effect // run it now
 * }).pipe(TestTransaction.isolate)
 * ```
 */
export const captureHooks: <A, E, R>(
  effect: Effect.Effect<A, E, R>
) => Effect.Effect<readonly [A, ReadonlyArray<CapturedHook>], E, R> = internal.captureHooks
