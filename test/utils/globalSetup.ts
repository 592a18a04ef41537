import * as Cause from "effect/Cause"
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

const isAlive = (pid: number) => {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM"
  }
}

/**
 * Drops the databases of earlier runs on this machine that were killed before their teardown: named after a test
 * process that no longer exists, with nobody connected. Only on a server of this machine, where the pids mean
 * something.
 */
const dropAbandoned = async (adminUrl: string) => {
  const host = new URL(adminUrl).hostname
  if (!["127.0.0.1", "localhost", "::1", "[::1]", ""].includes(host)) return
  const client = new pg.Client({ connectionString: adminUrl })
  client.on("error", () => undefined)
  await client.connect()
  try {
    const { rows } = await client.query<{ datname: string }>(
      `SELECT datname FROM pg_database d WHERE datname ~ '^etx_test_[0-9]+_'
         AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)`
    )
    const abandoned = rows.filter(({ datname }) => !isAlive(Number(/^etx_test_(\d+)_/.exec(datname)![1])))
    for (const { datname } of abandoned) {
      await client.query(`DROP DATABASE IF EXISTS ${client.escapeIdentifier(datname)} WITH (FORCE)`)
    }
    if (abandoned.length > 0) console.log(`[tests] dropped ${abandoned.length} database(s) of killed runs`)
  } finally {
    await client.end()
  }
}

/** A URL without its passwords (in the user part and in the query), to show in a message. */
const displayUrl = (url: string) => {
  try {
    const parsed = new URL(url)
    if (parsed.password !== "") parsed.password = "***"
    for (const key of [...parsed.searchParams.keys()]) {
      if (/pass/i.test(key)) parsed.searchParams.set(key, "***")
    }
    return parsed.toString()
  } catch {
    return "(not a valid URL)"
  }
}

/** What went wrong, also when it is an AggregateError (a host with several addresses) with an empty message. */
const reasonOf = (error: unknown): string => {
  if (error instanceof AggregateError && error.message === "") return error.errors.map(reasonOf).join("; ")
  if (error instanceof Error)
    return error.message !== "" ? error.message : String((error as NodeJS.ErrnoException).code ?? error.name)
  return String(error)
}

/**
 * Ends the run before any test file is collected, with `lines` as its first words. (Thrown from here, the error
 * would come after vitest's "No test files found" and a code frame of the set-up file.)
 */
const abort = (lines: ReadonlyArray<string>): never => {
  console.error(`\n${lines.map((line) => `[tests] ${line}`).join("\n")}\n`)
  process.exit(1)
}

/** Checks that DATABASE_URL answers, within 10 seconds. */
const checkReachable = async (url: string) => {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10_000 })
  client.on("error", () => undefined)
  try {
    await client.connect()
    await client.query("SELECT 1")
  } catch (error) {
    abort([
      `Cannot use the PostgreSQL server at DATABASE_URL=${displayUrl(url)}: ${reasonOf(error)}`,
      "Start that server or correct DATABASE_URL, or unset DATABASE_URL to run the tests on an embedded PostgreSQL."
    ])
  } finally {
    await client.end().catch(() => undefined)
  }
}

/** One server for the whole run: DATABASE_URL when set, otherwise an embedded PostgreSQL. */
export default async function setup(project: TestProject) {
  const runPrefix = `etx_test_${process.pid}_`
  const scope = Effect.runSync(Scope.make())
  let adminUrl = process.env.DATABASE_URL
  if (adminUrl === undefined || adminUrl === "") {
    const exit = await Effect.runPromiseExit(Scope.extend(EmbeddedPostgres.start(), scope))
    if (Exit.isFailure(exit)) {
      const error = Cause.squash(exit.cause)
      abort([
        `Could not start an embedded PostgreSQL: ${reasonOf(error)}`,
        "Or set DATABASE_URL to run the tests on an existing server."
      ])
    }
    const server = (exit as Exit.Success<EmbeddedPostgres.Server, never>).value
    adminUrl = server.url
    console.log(`[tests] embedded PostgreSQL on port ${server.port} (set DATABASE_URL to use another server)`)
  } else {
    await checkReachable(adminUrl)
    console.log(`[tests] PostgreSQL from DATABASE_URL (${displayUrl(adminUrl)})`)
    await dropAbandoned(adminUrl)
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
