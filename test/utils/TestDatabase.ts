import * as SqlClient from "@effect/sql/SqlClient"
import * as PgClient from "@effect/sql-pg/PgClient"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Redacted from "effect/Redacted"
import * as Schedule from "effect/Schedule"
import pg from "pg"
import { inject } from "vitest"

/** The database a test file runs against, created for it and dropped after it. */
export class TestDatabase extends Context.Tag("test/TestDatabase")<
  TestDatabase,
  {
    readonly url: string
    readonly name: string
    /** Runs a query on a separate, autocommitting connection: what another session sees. */
    readonly outside: <R extends pg.QueryResultRow = pg.QueryResultRow>(
      sql: string,
      params?: ReadonlyArray<unknown>
    ) => Effect.Effect<ReadonlyArray<R>>
  }
>() {}

const ignore = () => undefined

const adminQuery = (url: string, sql: string) =>
  Effect.promise(async () => {
    const client = new pg.Client({ connectionString: url })
    client.on("error", ignore)
    await client.connect()
    try {
      await client.query(sql)
    } finally {
      await client.end()
    }
  })

const databaseUrl = (adminUrl: string, name: string) => {
  const url = new URL(adminUrl)
  url.pathname = `/${name}`
  return url.toString()
}

const fresh = Effect.acquireRelease(
  Effect.suspend(() => {
    const adminUrl = inject("adminUrl")
    const name = `${inject("runPrefix")}${process.pid}_${Math.random().toString(36).slice(2, 8)}`
    return Effect.as(adminQuery(adminUrl, `CREATE DATABASE "${name}"`), { adminUrl, name })
  }),
  ({ adminUrl, name }) => adminQuery(adminUrl, `DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`)
)

/** A fresh database for this test file, a `PgClient`/`SqlClient` on it (8 connections) and `TestDatabase`. */
export const layer = (
  config: Partial<PgClient.PgClientConfig> = {}
): Layer.Layer<TestDatabase | PgClient.PgClient | SqlClient.SqlClient> =>
  Layer.unwrapScoped(
    Effect.gen(function* () {
      const { adminUrl, name } = yield* fresh
      const url = databaseUrl(adminUrl, name)
      const pool = new pg.Pool({ connectionString: url, max: 2 })
      // pool.end() resolves before its sockets close; the DROP ... WITH (FORCE) that follows may end them first.
      pool.on("error", ignore)
      yield* Effect.addFinalizer(() => Effect.promise(() => pool.end()))
      const outside = <R extends pg.QueryResultRow>(sql: string, params: ReadonlyArray<unknown> = []) =>
        Effect.promise(() => pool.query<R>(sql, [...params]).then((result) => result.rows))
      return Layer.merge(
        Layer.succeed(TestDatabase, { url, name, outside }),
        PgClient.layer({ url: Redacted.make(url), maxConnections: 8, ...config })
      )
    })
  ).pipe(Layer.orDie)

/** Runs statements outside any transaction of the engine (schema set-up between tests). */
export const setup = (...statements: ReadonlyArray<string>) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.forEach(statements, (statement) => sql.unsafe(statement), { discard: true })
  ).pipe(Effect.orDie)

class NotYet<A> {
  constructor(readonly value: A) {}
}

/** Polls `effect` until `done` holds of its value (every 50 ms, 10 s at most); fails with the last value if not. */
export const eventually = <A, E, R>(effect: Effect.Effect<A, E, R>, done: (value: A) => boolean) =>
  effect.pipe(
    Effect.filterOrFail(done, (value) => new NotYet(value)),
    Effect.retry({ schedule: Schedule.spaced("50 millis"), times: 200, while: (error) => error instanceof NotYet })
  )
