import * as SqlClient from "@effect/sql/SqlClient"
import type { Connection } from "@effect/sql/SqlConnection"
import { SqlError } from "@effect/sql/SqlError"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Stream from "effect/Stream"

/**
 * Records the SQL every reserved connection receives (the connections transactions run on), and can make chosen
 * statements fail before they reach the database.
 */
export class Recorder extends Context.Tag("test/Recorder")<
  Recorder,
  {
    readonly statements: Array<string>
    /** The backend pids of the connections reserved so far. */
    readonly pids: Array<number>
    /** Return true to make the statement fail with a simulated SqlError instead of sending it. */
    failWhen: (sql: string) => boolean
    readonly clear: () => void
  }
>() {}

const record = (conn: Connection, log: Context.Tag.Service<Recorder>): Connection => {
  const run = <A>(sql: string, effect: () => Effect.Effect<A, SqlError>): Effect.Effect<A, SqlError> =>
    Effect.suspend(() => {
      log.statements.push(sql)
      return log.failWhen(sql)
        ? Effect.fail(new SqlError({ message: `simulated failure of ${sql}`, cause: new Error("simulated") }))
        : effect()
    })
  const inner = conn as { pg?: unknown }
  return {
    // The driver's client, read and replaced on the recorded connection itself.
    get pg() {
      return inner.pg
    },
    set pg(client: unknown) {
      inner.pg = client
    },
    execute: (sql, params, transform) => run(sql, () => conn.execute(sql, params, transform)),
    executeRaw: (sql, params) => run(sql, () => conn.executeRaw(sql, params)),
    executeValues: (sql, params) => run(sql, () => conn.executeValues(sql, params)),
    executeUnprepared: (sql, params, transform) => run(sql, () => conn.executeUnprepared(sql, params, transform)),
    executeStream: (sql, params, transform) =>
      Stream.unwrap(
        Effect.sync(() => {
          log.statements.push(sql)
          return conn.executeStream(sql, params, transform)
        })
      )
  } as Connection
}

/** Replaces the `SqlClient` with one whose reserved connections are recorded. */
export const layer: Layer.Layer<SqlClient.SqlClient | Recorder, never, SqlClient.SqlClient> = Layer.effectContext(
  Effect.map(SqlClient.SqlClient, (client) => {
    const log: Context.Tag.Service<Recorder> = {
      statements: [],
      pids: [],
      failWhen: () => false,
      clear() {
        log.statements.length = 0
        log.failWhen = () => false
      }
    }
    const reserve = Effect.map(client.reserve, (conn) => {
      const pid = ((conn as { readonly pg?: { readonly processID?: number } }).pg?.processID ?? -1) as number
      log.pids.push(pid)
      return record(conn, log)
    })
    const wrapped = Object.assign(
      function (this: unknown, ...args: Array<unknown>) {
        return (client as unknown as (...args: Array<unknown>) => unknown).apply(this, args)
      } as unknown as SqlClient.SqlClient,
      client,
      { reserve }
    )
    return Context.make(SqlClient.SqlClient, wrapped).pipe(Context.add(Recorder, log))
  })
)
