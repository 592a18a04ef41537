/**
 * The database of the testing examples: a throwaway embedded PostgreSQL with the bank's schema. Your own suite
 * would use its test database instead, e.g. PgClient.layer({ url: Redacted.make(process.env.DATABASE_URL!) }),
 * with its migrations applied.
 */
import { SqlClient } from "@effect/sql"
import { Effect, Layer } from "effect"
import { EmbeddedPostgres } from "effect-transaction"
import { schema } from "./app.js"

export const Database = Layer.tap(EmbeddedPostgres.layer(), (context) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => Effect.forEach(schema, (ddl) => sql.unsafe(ddl))).pipe(
    Effect.provide(context)
  )
)
