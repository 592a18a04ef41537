#!/usr/bin/env node
/**
 * The `effect-transaction` command: `effect-transaction migrate up|down|status|validate|new`, on the database at
 * `--url` or `DATABASE_URL`.
 */
import { createRequire } from "node:module"
import * as NodeContext from "@effect/platform-node/NodeContext"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import type * as SqlClient from "@effect/sql/SqlClient"
import type { SqlError } from "@effect/sql/SqlError"
import * as PgClient from "@effect/sql-pg/PgClient"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Layer from "effect/Layer"
import * as Redacted from "effect/Redacted"
import { Exit as CliExit } from "./internal/migratorCli.js"
import * as MigratorCli from "./MigratorCli.js"
import * as Transaction from "./Transaction.js"

const { version } = createRequire(import.meta.url)("../package.json") as { readonly version: string }

const database = (url: Redacted.Redacted | undefined): Layer.Layer<SqlClient.SqlClient, SqlError | CliExit> => {
  const fromEnvironment = process.env.DATABASE_URL
  const resolved =
    url ?? (fromEnvironment !== undefined && fromEnvironment !== "" ? Redacted.make(fromEnvironment) : undefined)
  return resolved === undefined
    ? Layer.fail<SqlError | CliExit>(
        new CliExit({ code: 2, message: "No database: pass --url postgres://... or set DATABASE_URL." })
      )
    : Transaction.layer.pipe(Layer.provideMerge(PgClient.layer({ url: resolved })))
}

MigratorCli.run({ database, version })(process.argv.slice(2)).pipe(
  Effect.provide(NodeContext.layer),
  NodeRuntime.runMain({
    disableErrorReporting: true,
    teardown: (exit, onExit) => {
      if (Exit.isSuccess(exit)) return onExit(exit.value as number)
      // Only an interruption (Ctrl-C, SIGTERM) ends here: every failure became a message and a code.
      console.error("Interrupted. A migration running in a transaction was rolled back; see `migrate status`.")
      onExit(130)
    }
  })
)
