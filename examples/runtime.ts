/**
 * Runs an example program on DATABASE_URL when set, or else on a throwaway embedded PostgreSQL, with
 * Transaction.layer in place. Exits with status 1 when the program fails.
 */
import type { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Cause, Effect, Exit, Layer, Redacted } from "effect"
import { EmbeddedPostgres, Transaction } from "effect-transaction"

export const runExample = <A, E>(
  program: Effect.Effect<A, E, SqlClient.SqlClient>,
  options: { readonly maxConnections?: number } = {}
): void => {
  const url = process.env.DATABASE_URL
  const Database =
    url !== undefined && url !== ""
      ? PgClient.layer({ url: Redacted.make(url), maxConnections: options.maxConnections ?? 10 })
      : EmbeddedPostgres.layer({ client: { maxConnections: options.maxConnections ?? 10 } })
  Effect.runPromiseExit(Effect.provide(program, Transaction.layer.pipe(Layer.provideMerge(Database)))).then((exit) => {
    if (Exit.isFailure(exit)) {
      console.error(Cause.pretty(exit.cause))
      process.exit(1)
    }
  })
}
