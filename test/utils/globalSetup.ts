import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Scope from "effect/Scope"
import pg from "pg"
import type { TestProject } from "vitest/node"
import * as EmbeddedPostgres from "../../src/EmbeddedPostgres.js"

declare module "vitest" {
  export interface ProvidedContext {
    /** A URL of a database on the server the tests use; each test file creates its own database there. */
    readonly adminUrl: string
    /** A prefix shared by the databases this run creates, so that teardown finds any left behind. */
    readonly runPrefix: string
  }
}

/** One server for the whole run: DATABASE_URL when set, otherwise an embedded PostgreSQL. */
export default async function setup(project: TestProject) {
  const runPrefix = `etx_test_${process.pid}_`
  const scope = Effect.runSync(Scope.make())
  let adminUrl = process.env.DATABASE_URL
  if (adminUrl === undefined || adminUrl === "") {
    const server = await Effect.runPromise(Scope.extend(EmbeddedPostgres.start(), scope))
    adminUrl = server.url
    console.log(`[tests] embedded PostgreSQL on port ${server.port} (set DATABASE_URL to use another server)`)
  } else {
    console.log("[tests] PostgreSQL from DATABASE_URL")
  }
  project.provide("adminUrl", adminUrl)
  project.provide("runPrefix", runPrefix)
  return async () => {
    const client = new pg.Client({ connectionString: adminUrl })
    client.on("error", () => undefined)
    await client.connect()
    const { rows } = await client.query<{ datname: string }>(
      "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
      [runPrefix]
    )
    for (const { datname } of rows) {
      await client.query(`DROP DATABASE IF EXISTS ${client.escapeIdentifier(datname)} WITH (FORCE)`)
    }
    await client.end()
    if (rows.length > 0) console.log(`[tests] dropped ${rows.length} database(s) left behind`)
    await Effect.runPromise(Scope.close(scope, Exit.void))
  }
}
