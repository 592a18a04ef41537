/**
 * The `migrate` command line (`up`, `down`, `status`, `validate`, `new`), built with `@effect/cli`: the
 * `effect-transaction` bin runs it on `--url` or `DATABASE_URL`, and a program can run it with its own database
 * layer.
 *
 * @since 0.1.0
 */
import type * as CliApp from "@effect/cli/CliApp"
import type * as SqlClient from "@effect/sql/SqlClient"
import type * as Effect from "effect/Effect"
import type * as Layer from "effect/Layer"
import type * as Redacted from "effect/Redacted"
import * as internal from "./internal/migratorCli.js"

/**
 * What the command line runs on.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import { PgClient } from "@effect/sql-pg"
 * import { Redacted } from "effect"
 * import type { MigratorCli } from "effect-transaction"
 *
 * const options: MigratorCli.Options<unknown> = {
 *   name: "my-app",
 *   database: (url) => PgClient.layer({ url: url ?? Redacted.make("postgres://localhost/app") })
 * }
 * ```
 */
export interface Options<E> {
  /** The database: a layer, or a function from the `--url` option (undefined when not given) to one. */
  readonly database:
    | Layer.Layer<SqlClient.SqlClient, E>
    | ((url: Redacted.Redacted | undefined) => Layer.Layer<SqlClient.SqlClient, E>)
  /** The program's name, shown in help. Default `effect-transaction`. */
  readonly name?: string | undefined
  /** The program's version, shown by `--version`. */
  readonly version?: string | undefined
  /** The default of `--directory`. Default `migrations`. */
  readonly directory?: string | undefined
  /** The default of `--table`. Default `effect_sql_migrations`. */
  readonly table?: string | undefined
}

/**
 * Runs the command line on `argv` (without the node and script paths) and returns the exit code: 0 when it did what
 * was asked (for `status` and `validate`: up to date), 1 when migrations are pending or a migration failed, 2 on a
 * problem (invalid files, a checksum mismatch, no database, bad arguments). Messages go to the console.
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { NodeContext, NodeRuntime } from "@effect/platform-node"
 * import { PgClient } from "@effect/sql-pg"
 * import { Effect, Layer, Redacted } from "effect"
 * import { MigratorCli, Transaction } from "effect-transaction"
 *
 * const Database = Transaction.layer.pipe(Layer.provideMerge(PgClient.layer({ url: Redacted.make("postgres://localhost/app") })))
 * MigratorCli.run({ name: "my-app", database: Database })(process.argv.slice(2)).pipe(
 *   Effect.provide(NodeContext.layer),
 *   Effect.flatMap((code) => Effect.sync(() => (process.exitCode = code))),
 *   NodeRuntime.runMain
 * )
 * ```
 */
export const run: <E>(
  options: Options<E>
) => (argv: ReadonlyArray<string>) => Effect.Effect<number, never, CliApp.CliApp.Environment> = internal.run
