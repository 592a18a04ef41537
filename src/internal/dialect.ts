import type { SqlClient } from "@effect/sql/SqlClient"
import type { Connection } from "@effect/sql/SqlConnection"
import type { SqlError } from "@effect/sql/SqlError"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Predicate from "effect/Predicate"

/** The transaction characteristics the outermost block was opened with. */
export interface Characteristics {
  readonly isolation: "read committed" | "repeatable read" | "serializable" | undefined
  readonly readOnly: boolean | undefined
  readonly deferrable: boolean | undefined
  readonly statementTimeoutMillis?: number | undefined
  readonly lockTimeoutMillis?: number | undefined
  readonly idleTimeoutMillis?: number | undefined
}

/**
 * What the engine needs to know about a database: the text of its control statements, how to tell a commit that
 * became a rollback, and how to throw away a connection whose state is unknown.
 */
export interface Dialect {
  readonly name: string
  readonly begin: (characteristics: Characteristics) => string
  readonly savepoint: (name: string) => string
  readonly release: (name: string) => string
  /** Rolls back to the savepoint and releases it, leaving the outer block as it was before the savepoint. */
  readonly rollbackTo: (name: string) => string
  /** Rolls back to the savepoint and keeps it, so that work can go on inside it. */
  readonly rewind: (name: string) => string
  /**
   * Checks the deferred constraints now, as COMMIT would, without changing when they are checked afterwards (the
   * check runs in the named savepoint, rolled back after it; the checks themselves stay pending).
   */
  readonly checkDeferred: (name: string) => string
  /** Joins control statements so that they travel in one round trip. */
  readonly batch: (statements: ReadonlyArray<string>) => string
  /** Runs COMMIT; succeeds with `false` when the database ended the transaction with a rollback instead. */
  readonly commit: (conn: Connection) => Effect.Effect<boolean, SqlError>
  /** Asks the database, over another pooled connection, to cancel what `conn` is running. */
  readonly cancel: (client: SqlClient, conn: Connection) => Effect.Effect<void>
  /**
   * Takes a transaction-scoped advisory lock on `key`: waits for it (`wait`), or returns whether it was free.
   * A string key is hashed to a 64-bit key by the database.
   */
  readonly advisoryLock: (conn: Connection, key: bigint | string, wait: boolean) => Effect.Effect<boolean, SqlError>
  /** Sets a setting until the end of the transaction; undone by rolling back to an earlier savepoint. */
  readonly setLocal: (conn: Connection, name: string, value: string) => Effect.Effect<void, SqlError>
  readonly rollback: string
  /** Waits until a statement the driver is still running on the connection (one that was interrupted) has ended. */
  readonly settle: (conn: Connection) => Effect.Effect<void>
  /** Makes sure the connection is closed instead of going back to the pool. */
  readonly destroy: (conn: Connection) => Effect.Effect<void>
}

interface PgLikeClient {
  readonly emit: (event: "error", error: Error) => boolean
  readonly listenerCount: (event: "error") => number
  readonly once: (event: "drain" | "end", listener: () => void) => void
  readonly off: (event: "drain" | "end", listener: () => void) => void
  readonly end: () => Promise<void>
  readonly readyForQuery?: boolean
  readonly _queryQueue?: ReadonlyArray<unknown>
  readonly _ending?: boolean
}

const pgClientOf = (conn: Connection): PgLikeClient | undefined => {
  const pg = (conn as { readonly pg?: unknown }).pg
  return Predicate.isObject(pg) && Predicate.hasProperty(pg, "emit") && Predicate.hasProperty(pg, "end")
    ? (pg as PgLikeClient)
    : undefined
}

/** PostgreSQL, through `@effect/sql-pg` (node-postgres). */
export const postgres: Dialect = {
  name: "postgresql",
  // The timeouts travel in the same round trip as BEGIN.
  begin: (characteristics) => {
    const { deferrable, isolation, readOnly } = characteristics
    let sql = "BEGIN"
    if (isolation !== undefined) sql += ` ISOLATION LEVEL ${isolation.toUpperCase()}`
    if (readOnly !== undefined) sql += readOnly ? " READ ONLY" : " READ WRITE"
    if (deferrable !== undefined) sql += deferrable ? " DEFERRABLE" : " NOT DEFERRABLE"
    const timeouts: ReadonlyArray<readonly [string, number | undefined]> = [
      ["statement_timeout", characteristics.statementTimeoutMillis],
      ["lock_timeout", characteristics.lockTimeoutMillis],
      ["idle_in_transaction_session_timeout", characteristics.idleTimeoutMillis]
    ]
    for (const [name, millis] of timeouts) {
      if (millis !== undefined) sql += `; SET LOCAL ${name} = ${Math.max(1, Math.ceil(millis))}`
    }
    return sql
  },
  savepoint: (name) => `SAVEPOINT ${name}`,
  release: (name) => `RELEASE SAVEPOINT ${name}`,
  rollbackTo: (name) => `ROLLBACK TO SAVEPOINT ${name}; RELEASE SAVEPOINT ${name}`,
  rewind: (name) => `ROLLBACK TO SAVEPOINT ${name}`,
  checkDeferred: (name) =>
    `SAVEPOINT ${name}; SET CONSTRAINTS ALL IMMEDIATE; ROLLBACK TO SAVEPOINT ${name}; RELEASE SAVEPOINT ${name}`,
  batch: (statements) => statements.join("; "),
  // PostgreSQL answers COMMIT of an aborted transaction with the command tag ROLLBACK and no error.
  commit: (conn) =>
    Effect.map(conn.executeRaw("COMMIT", []), (result) => {
      const last = Array.isArray(result) ? result[result.length - 1] : result
      const command = Predicate.isObject(last) ? (last as { readonly command?: unknown }).command : undefined
      return command !== "ROLLBACK"
    }),
  // PostgreSQL turns off statement_timeout before COMMIT runs deferred triggers, so a slow COMMIT is cancelled
  // from another connection; it still commits if the cancel arrives after the commit record is written.
  cancel: (client, conn) => {
    const pid = (pgClientOf(conn) as { readonly processID?: unknown } | undefined)?.processID
    return typeof pid === "number" ? Effect.ignore(client.unsafe("SELECT pg_cancel_backend($1)", [pid])) : Effect.void
  },
  advisoryLock: (conn, key, wait) => {
    const fn = wait ? "pg_advisory_xact_lock" : "pg_try_advisory_xact_lock"
    const sql =
      typeof key === "string" ? `SELECT ${fn}(hashtextextended($1, 0)) AS locked` : `SELECT ${fn}($1::bigint) AS locked`
    return Effect.map(
      conn.execute(sql, [typeof key === "string" ? key : key.toString()], undefined),
      (rows) => wait || (rows[0] as { readonly locked?: unknown } | undefined)?.locked === true
    )
  },
  setLocal: (conn, name, value) =>
    Effect.asVoid(conn.execute("SELECT set_config($1, $2, true)", [name, value], undefined)),
  rollback: "ROLLBACK",
  // node-postgres queues a query sent while another runs; an interrupted query keeps running until the server
  // answers its cancellation, and the client says "drain" when nothing is left in flight.
  settle: (conn) => {
    const client = pgClientOf(conn)
    const busy = (c: PgLikeClient) => c.readyForQuery === false || (c._queryQueue?.length ?? 0) > 0
    if (client === undefined || client._ending === true || !busy(client)) return Effect.void
    return Effect.async<void>((resume) => {
      const done = () => {
        client.off("drain", done)
        client.off("end", done)
        resume(Effect.void)
      }
      client.once("drain", done)
      client.once("end", done)
      return Effect.sync(() => {
        client.off("drain", done)
        client.off("end", done)
      })
    })
  },
  // @effect/sql-pg releases a reserved client with the error it saw on it, and node-postgres' pool closes a
  // client released with an error. Without a listener, ending the client has the same effect on release.
  destroy: (conn) =>
    Effect.sync(() => {
      const client = pgClientOf(conn)
      if (client === undefined) return
      const error = new Error("effect-transaction: connection state unknown, discarded")
      if (client.listenerCount("error") > 0) client.emit("error", error)
      else client.end().catch(() => undefined)
    })
}

/** The dialect the engine uses; PostgreSQL unless a layer provides another. */
export class CurrentDialect extends Context.Reference<CurrentDialect>()("effect-transaction/Dialect", {
  defaultValue: (): Dialect => postgres
}) {}
