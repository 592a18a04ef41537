/**
 * The database of the testing examples: a throwaway embedded PostgreSQL with the bank's migrations applied. Your own
 * suite would use its test database instead, e.g. PgClient.layer({ url: Redacted.make(process.env.DATABASE_URL!) }),
 * with the same migrations.
 */
import * as path from "node:path"
import { NodeContext } from "@effect/platform-node"
import { Effect, Layer } from "effect"
import { EmbeddedPostgres, Migrator } from "effect-transaction"

/** The bank's migrations: run by Database below, or as the seed of a suite (seeded-suite.test.ts). */
export const migrate = Migrator.up({
  loader: Migrator.fromDirectory(path.join(import.meta.dirname, "migrations"))
}).pipe(Effect.provide(NodeContext.layer))

/** A fresh embedded PostgreSQL, its schema not yet created. */
export const EmptyDatabase = EmbeddedPostgres.layer()

/** A fresh embedded PostgreSQL with the bank's schema. */
export const Database = Layer.tap(EmptyDatabase, (context) => Effect.provide(migrate, context))
