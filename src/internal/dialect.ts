import type { Connection } from "@effect/sql/SqlConnection"
import type { SqlError } from "@effect/sql/SqlError"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Predicate from "effect/Predicate"
import type * as Transaction from "../Transaction.js"
import { sendCancelRequest } from "./pgCancel.js"
import { splitStatements } from "./sqlScan.js"

/** Whether a statement the engine stopped waiting for is still running on the connection. */
export interface InFlight {
  readonly running: () => boolean
  /** Calls `listener` once nothing is in flight any more; returns what removes it. */
  readonly onEnded: (listener: () => void) => () => void
  /**
   * Makes control `statements` travel ahead of the next statement, `sql`, in its round trip: run `Carried.sql`
   * instead of `sql`. If one of them fails, the statements after it and `sql` do not run.
   */
  readonly carry: (statements: ReadonlyArray<string>, sql: string) => Carried
}

/** A statement with control statements ahead of it, and how many of those the database has completed. */
export interface Carried {
  readonly sql: string
  readonly completed: () => number
}

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
  /** BEGIN with the characteristics, and the settings that follow it, one statement each. */
  readonly begin: (characteristics: Characteristics) => ReadonlyArray<string>
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
  /**
   * Asks the database, out of band (never over a pooled connection), to cancel what `conn` is running. Succeeds
   * with whether the request reached the database within `deadlineMillis`; never fails.
   */
  readonly cancel: (conn: Connection, deadlineMillis: number) => Effect.Effect<boolean>
  /** Whether `cancel` can reach what `conn` runs; statements on other connections are left to their driver. */
  readonly canCancel: (conn: Connection) => boolean
  /**
   * Takes over the cancelling of `conn`'s statements from its driver, when the driver allows it: an interrupted
   * statement then only stops being waited for, and the returned `InFlight` says when it has really ended. While
   * the connection is taken over, statements with parameters run as statements the connection keeps prepared,
   * up to `prepared` of them per connection (`Transaction.PreparedStatements`; 0 prepares none).
   */
  readonly takeOver: (conn: Connection, prepared: number) => InFlight | undefined
  /**
   * Takes a transaction-scoped advisory lock on `key`: waits for it (`wait`), or returns whether it was free.
   * A string key is hashed to a 64-bit key by the database.
   */
  readonly advisoryLock: (conn: Connection, key: bigint | string, wait: boolean) => Effect.Effect<boolean, SqlError>
  /** Sets a setting until the end of the transaction; undone by rolling back to an earlier savepoint. */
  readonly setLocal: (conn: Connection, name: string, value: string) => Effect.Effect<void, SqlError>
  readonly rollback: string
  /**
   * Waits until the driver has nothing left in flight on the connection (a stream's cursor being closed), or the
   * connection has ended; succeeds with `false` if neither happened within `deadlineMillis`.
   */
  readonly settle: (conn: Connection, deadlineMillis: number) => Effect.Effect<boolean>
  /** Makes sure the connection is closed instead of going back to the pool. */
  readonly destroy: (conn: Connection) => Effect.Effect<void>
  /** Closes the connection's socket now, so that whatever it still runs ends with an error. */
  readonly terminate: (conn: Connection) => Effect.Effect<void>
  /**
   * Whether the session is inside a transaction after the last statement, as the database reported it with that
   * statement's answer (`"failed"`: inside one that an error aborted); undefined when the driver does not say.
   */
  readonly transactionStatus: (conn: Connection) => "idle" | "open" | "failed" | undefined
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
  readonly _txStatus?: unknown
  readonly _ended?: boolean
  readonly host?: unknown
  readonly port?: unknown
  readonly processID?: unknown
  readonly secretKey?: unknown
  readonly connection?: {
    readonly stream?: { readonly destroy?: () => void }
    readonly parsedStatements?: Record<string, string>
  }
}

const pgClientOf = (conn: Connection): PgLikeClient | undefined => {
  const found = (conn as { readonly pg?: unknown }).pg
  const pg = Predicate.isObject(found) ? (takenOver.get(found) ?? found) : found
  return Predicate.isObject(pg) && Predicate.hasProperty(pg, "emit") && Predicate.hasProperty(pg, "end")
    ? (pg as PgLikeClient)
    : undefined
}

/** The driver's own client behind each stand-in `takeOver` gave a connection. */
const takenOver = new WeakMap<object, PgLikeClient>()

/**
 * Gives @effect/sql-pg's connection a stand-in for its node-postgres client: the same `query`, but no process id,
 * so that the driver has no cancel of its own to run when a statement is interrupted (its cancel takes a pooled
 * connection, and can stay queued and land on another transaction's statement). The engine cancels instead, out
 * of band, and the stand-in tells it whether a query is still in flight. The stand-in also sends the control
 * statements the engine asks to `carry` in the same round trip as the statement they precede, and runs statements
 * as prepared statements of the connection when the transaction asks for them (`send`).
 * A pooled client keeps its stand-in from one reservation to the next.
 */
const takeOver = (conn: Connection, prepared: number): InFlight | undefined => {
  const holder = conn as { pg?: unknown }
  const client = pgClientOf(conn)
  if (client === undefined || typeof (client as { query?: unknown }).query !== "function") return undefined
  let made = standIns.get(client)
  if (made === undefined) {
    if (holder.pg !== client) return undefined
    made = makeStandIn(client as PgQueryClient)
    standIns.set(client, made)
  } else if (holder.pg !== client && holder.pg !== made.standIn) {
    return undefined
  }
  made.disarm()
  made.prepared.limit = prepared
  try {
    holder.pg = made.standIn
  } catch {
    return undefined
  }
  return holder.pg === made.standIn ? made.inFlight : undefined
}

/** The stand-in made for each pooled node-postgres client, the first time a connection of it was taken over. */
const standIns = new WeakMap<object, StandIn>()

interface StandIn {
  readonly standIn: object
  readonly inFlight: InFlight
  readonly prepared: StatementCache
  /** Forgets control statements armed for a statement that never reached the driver. */
  readonly disarm: () => void
}

const makeStandIn = (real: PgQueryClient): StandIn => {
  let running = 0
  const waiting: Array<() => void> = []
  const ended = () => {
    running--
    if (running === 0) for (const resume of waiting.splice(0)) resume()
  }
  let armed: Prefix | undefined
  const prepared = new StatementCache(real)
  const standIn = {
    query: (...args: Array<unknown>) => {
      const last = args.length - 1
      const callback = args[last]
      if (typeof callback !== "function") return real.query(...args)
      running++
      // node-postgres can answer a query twice (an error while binding its values, then ReadyForQuery). It answers
      // with an error, or with null and the result.
      let answered = false
      args[last] = (error: unknown, result: unknown) => {
        if (answered) return
        answered = true
        ended()
        return (callback as (error: unknown, result: unknown) => unknown)(error, result)
      }
      const prefix = armed
      armed = undefined
      const text = textOf(args[0])
      if (text !== undefined) prepared.resetBy(text)
      if (prefix === undefined) {
        const statement = prepared.lookup(text, args)
        return statement === undefined ? real.query(...args) : send(real, undefined, text!, args, statement)
      }
      // The text `carry` made, as it comes back unless something rewrote it on its way.
      if (text === prefix.carried) return send(real, prefix, prefix.sql, args, prepared.lookup(prefix.sql, args))
      if (text === undefined || !text.startsWith(prefix.text)) return real.query(...args)
      const sql = text.slice(prefix.text.length)
      return send(real, prefix, sql, args, prepared.lookup(sql, args))
    }
  }
  takenOver.set(standIn, real)
  return {
    standIn,
    prepared,
    disarm: () => {
      armed = undefined
    },
    inFlight: {
      running: () => running > 0,
      onEnded: (listener) => {
        waiting.push(listener)
        return () => {
          const index = waiting.indexOf(listener)
          if (index >= 0) waiting.splice(index, 1)
        }
      },
      carry: (statements, sql) => {
        const text = `${statements.join("; ")}; `
        const prefix: Prefix = { text, statements, sql, carried: text + sql, completed: 0, preparing: false }
        armed = prefix
        return { sql: prefix.carried, completed: () => prefix.completed }
      }
    }
  }
}

interface PgQueryClient extends PgLikeClient {
  readonly query: (...args: Array<unknown>) => unknown
}

/** Control statements armed to travel ahead of the statement whose text starts with `text`. */
interface Prefix {
  readonly text: string
  readonly statements: ReadonlyArray<string>
  /** The statement the control statements precede, and `text` followed by it. */
  readonly sql: string
  readonly carried: string
  completed: number
  /** Set while node-postgres prepares the query that carries them (`preparing`). */
  preparing: boolean
}

/** The text of a query as `client.query` is given it: a string, or a config object (not a submittable). */
const textOf = (query: unknown): string | undefined => {
  if (typeof query === "string") return query
  if (!Predicate.isObject(query) || typeof (query as { submit?: unknown }).submit === "function") return undefined
  const text = (query as { text?: unknown }).text
  return typeof text === "string" ? text : undefined
}

/** The parts of node-postgres' Query that `send` changes. */
interface PgQuery {
  name: string | undefined
  values: unknown
  queryMode: unknown
  prepare: (connection: PgWire) => void
  handleCommandComplete: (message: unknown, connection: PgWire) => void
}

interface PgWire {
  readonly parse: (message: { readonly text: string }) => void
  readonly bind: (message: object) => void
  readonly execute: (message: object) => void
  readonly close: (message: { readonly type: "S"; readonly name: string }) => void
  /** node-postgres' record of the named statements the session has parsed, and of those whose Parse is in flight. */
  readonly parsedStatements?: Record<string, string>
  readonly submittedNamedStatements?: Record<string, string>
}

/**
 * Sends the query `args` describe (its text being `text`), after `prefix`'s control statements when there are some,
 * and as `statement`, prepared under its name, when it is given.
 *
 * With control statements it is one round trip when the query is one statement: the extended protocol lets
 * Parse/Bind/Execute of each control statement go ahead of the query's own messages with a single Sync at the end,
 * and after an error PostgreSQL skips every message until that Sync, so nothing after a failed control statement
 * runs. The answers to the control statements are counted and kept from the query's result. A text of several
 * statements (which the extended protocol refuses) waits for the control statements' answer and is sent only if they
 * all succeeded: two round trips.
 */
const send = (
  real: PgQueryClient,
  prefix: Prefix | undefined,
  text: string,
  args: Array<unknown>,
  statement: Prepared | undefined
): unknown => {
  const callback = args[args.length - 1] as (error: unknown, result?: unknown) => void
  const first = args[0]
  // A string is given on as one (node-postgres copies a config object, property by property).
  const config = typeof first === "string" ? text : { ...(first as object), text }
  const values = args.length > 2 ? args[1] : undefined
  const Query = (real.constructor as { readonly Query?: new (...args: Array<unknown>) => PgQuery }).Query
  const given = values ?? (typeof config === "string" ? undefined : (config as { readonly values?: unknown }).values)
  const hasValues = Array.isArray(given) && given.length > 0
  if (Query !== undefined && (hasValues || (prefix !== undefined && splitStatements(text).length === 1))) {
    let run: Run | undefined
    const deliver =
      statement === undefined
        ? callback
        : (error: unknown, result?: unknown) => {
            // One answer counts: node-postgres can answer twice (see the stand-in's `query`), and with control
            // statements ahead `answeredOnce` picks which answer comes here.
            if (run !== undefined) statement.owner.answered(statement, run, error)
            run = undefined
            return callback(error, result)
          }
    const answer = prefix === undefined ? deliver : answeredOnce(prefix, deliver)
    const query = new Query(config, values, answer)
    // Without values node-postgres would use the simple protocol, which cannot follow messages awaiting a Sync.
    if (!Array.isArray(query.values) || query.values.length === 0) query.queryMode = "extended"
    const prepare = query.prepare
    query.prepare = function (connection) {
      if (prefix !== undefined) {
        for (const control of prefix.statements) {
          connection.parse({ text: control })
          connection.bind({})
          connection.execute({})
        }
      }
      // Known before node-postgres prepares: a value it cannot send fails the query from inside `prepare`.
      run = statement === undefined ? undefined : statement.owner.use(statement, connection)
      if (run === undefined) {
        preparing(prefix, () => prepare.call(this, connection))
        return
      }
      this.name = statement!.name
      try {
        preparing(prefix, () => prepare.call(this, connection))
      } finally {
        // The record is the engine's to keep for its names: node-postgres would mark the name parsed on the first
        // ParseComplete of the round trip, which may be a control statement's.
        this.name = undefined
        delete connection.submittedNamedStatements?.[statement!.name]
      }
    }
    if (prefix !== undefined) {
      const complete = query.handleCommandComplete
      query.handleCommandComplete = function (message, connection) {
        if (prefix.completed < prefix.statements.length) prefix.completed++
        else complete.call(this, message, connection)
      }
    }
    return real.query(query)
  }
  if (prefix === undefined) return real.query(...args)
  return real.query(prefix.statements.join("; "), (error: unknown) => {
    if (error !== null && error !== undefined) return callback(error)
    prefix.completed = prefix.statements.length
    return args.length > 2 ? real.query(config, values, callback) : real.query(config, callback)
  })
}

/**
 * Runs node-postgres' `prepare` of a query that carries `prefix`'s control statements, noting that it runs: a value
 * the driver cannot send fails the query from inside it, after the control statements were already sent.
 */
const preparing = (prefix: Prefix | undefined, prepare: () => void): void => {
  if (prefix === undefined) {
    prepare()
    return
  }
  prefix.preparing = true
  try {
    prepare()
  } finally {
    prefix.preparing = false
  }
}

/**
 * The answer to a query carrying `prefix`'s control statements. A failure from inside `prepare` (a value the driver
 * cannot send) comes before the database has answered the control statements sent ahead of it, which it still runs:
 * that failure is held until node-postgres answers again (at ReadyForQuery, or at the database or connection error
 * that ended the round trip), when the count of completed control statements is final, and is then the statement's
 * own. An error as that second answer, with control statements left uncompleted, is what stopped them, and is the
 * answer instead.
 */
const answeredOnce = (
  prefix: Prefix,
  deliver: (error: unknown, result?: unknown) => unknown
): ((error: unknown, result?: unknown) => unknown) => {
  let held: { readonly error: unknown } | undefined
  return (error, result) => {
    if (held !== undefined) {
      const failed = error !== null && error !== undefined && prefix.completed < prefix.statements.length
      const answer = failed ? error : held.error
      held = undefined
      return deliver(answer)
    }
    if (prefix.preparing && error !== null && error !== undefined) {
      held = { error }
      return undefined
    }
    return deliver(error, result)
  }
}

/** A word that may begin a statement ending prepared statements of the session: checked before splitting the text. */
const resetWord = /\b(?:DISCARD|DEALLOCATE)\b/i
/** A statement that ends prepared statements of the session (some or all of them), after any comments. */
const resetStatement = /^(?:\s|--[^\n]*(?:\n|$)|\/\*[\s\S]*?\*\/)*(?:DISCARD|DEALLOCATE)\b/i

/** How a run used its prepared statement: bound to it as parsed before, or parsed it first. */
type Run = "bound" | "parsed"

/** A statement a pooled connection keeps prepared under a name of its own. */
interface Prepared {
  readonly owner: StatementCache
  readonly name: string
  readonly text: string
  /**
   * `new`: never parsed under its name. `parsing`: the run that parses it is in flight (another run sends it unnamed
   * meanwhile). `parsed`: the session has it. `stale`: the session may or may not have it, or have it as it no longer
   * fits the tables, or have another statement under its name; the next run closes the name and parses it again, in
   * the round trip that runs it. `evicted`: its name went to another statement; a run that still holds it sends it
   * unnamed.
   */
  state: "new" | "parsing" | "parsed" | "stale" | "evicted"
}

/**
 * The statements one pooled node-postgres client keeps prepared, by their text: the `limit` statements with
 * parameters that its transactions ran most recently. A statement is parsed under its name the first time it runs,
 * and only bound and executed from then on; a new statement past `limit` takes the name of the one used least
 * recently, closing it and parsing itself under it in the same round trip. After a run that failed in
 * a way that may have ended or outdated the prepared statement (any failure but the statement's own: a constraint,
 * a serialization failure or deadlock, a cancel, an exception raised by a function or trigger, a lock not available),
 * the next run closes the name and parses the statement again under it, in the same round trip: the session never
 * holds more than the largest `limit` it ran with, and a schema change costs at most one failed run per statement
 * and connection.
 */
class StatementCache {
  /** `Transaction.PreparedStatements` as the transaction holding the connection read it; 0 names nothing. */
  limit = 0
  /** By text, the most recently used last. */
  private readonly byText = new Map<string, Prepared>()
  /** Names of another cache on the same session (another copy of this library) never collide with these. */
  private readonly prefix = `etx${Math.floor(Math.random() * 36 ** 4).toString(36)}_`

  constructor(private readonly real: PgQueryClient) {}

  /** The statement `args` would run as, if it is one to keep prepared. */
  lookup(text: string | undefined, args: ReadonlyArray<unknown>): Prepared | undefined {
    if (this.limit <= 0 || text === undefined || !preparable(args)) return undefined
    const found = this.byText.get(text)
    if (found !== undefined) {
      this.byText.delete(text)
      this.byText.set(text, found)
      return found
    }
    if (this.byText.size < this.limit) {
      const made: Prepared = { owner: this, name: `${this.prefix}${this.byText.size + 1}`, text, state: "new" }
      this.byText.set(text, made)
      return made
    }
    for (const least of this.byText.values()) {
      if (least.state === "parsing") continue
      this.byText.delete(least.text)
      least.state = "evicted"
      const made: Prepared = { owner: this, name: least.name, text, state: "stale" }
      this.byText.set(text, made)
      return made
    }
    return undefined
  }

  /**
   * How a query about to be prepared on `connection` uses `statement`: bound to it, or parsing it first (node-postgres
   * parses a named statement unless its record says the session has it); unnamed while another run parses it.
   */
  use(statement: Prepared, connection: PgWire): Run | undefined {
    const parsed = connection.parsedStatements
    if (
      statement.state === "parsing" ||
      statement.state === "evicted" ||
      parsed === undefined ||
      connection.submittedNamedStatements === undefined
    ) {
      return undefined
    }
    if (statement.state === "parsed") {
      parsed[statement.name] = statement.text
      return "bound"
    }
    delete parsed[statement.name]
    // Closing a name the session does not have is no error.
    if (statement.state === "stale") connection.close({ type: "S", name: statement.name })
    statement.state = "parsing"
    return "parsed"
  }

  /** Records how a run that used `statement` ended. */
  answered(statement: Prepared, run: Run, error: unknown): void {
    // Its name is another statement's now, and so is the record of it.
    if (statement.state === "evicted") return
    if (error === null || error === undefined) {
      if (run === "parsed" && statement.state === "parsing") {
        statement.state = "parsed"
        const parsed = this.real.connection?.parsedStatements
        if (parsed !== undefined) parsed[statement.name] = statement.text
      }
      return
    }
    if (run === "bound" && isDatabaseError(error) && ownFailure(error.code)) return
    // The session lost its prepared statements (DEALLOCATE or DISCARD behind the engine's back): all of them.
    if (isDatabaseError(error) && error.code === "26000") this.outdateAll()
    else this.outdate(statement)
  }

  /** Outdates every statement when `text` has a statement that ends prepared statements of the session. */
  resetBy(text: string): void {
    if (this.byText.size === 0 || !resetWord.test(text)) return
    if (splitStatements(text).some((statement) => resetStatement.test(statement))) this.outdateAll()
  }

  private outdate(statement: Prepared): void {
    statement.state = "stale"
    const parsed = this.real.connection?.parsedStatements
    if (parsed !== undefined) delete parsed[statement.name]
  }

  private outdateAll(): void {
    for (const statement of this.byText.values()) if (statement.state !== "new") this.outdate(statement)
  }
}

/**
 * Whether a run's failure with SQLSTATE `code` is the statement's own, raised while it ran, which leaves the prepared
 * statement as it was: a constraint (class 23), a serialization failure or deadlock (40), a cancel (57014), an
 * exception raised in a function or trigger (P0001), a lock not available (55P03). Anything else, a type mismatch
 * after the table changed among them, may come from the prepared statement itself.
 */
const ownFailure = (code: string): boolean =>
  code.startsWith("23") || code.startsWith("40") || code === "57014" || code === "P0001" || code === "55P03"

/** Whether a query given as `args` can run as a named statement: a text with parameters, nothing else of its own. */
const preparable = (args: ReadonlyArray<unknown>): boolean => {
  const first = args[0]
  if (typeof first === "string") return args.length > 2 && Array.isArray(args[1]) && args[1].length > 0
  if (!Predicate.isObject(first)) return false
  const config = first as Record<string, unknown>
  if (config.name !== undefined || config.rows !== undefined || config.portal !== undefined) return false
  if (config.queryMode !== undefined) return false
  const values = args.length > 2 ? args[1] : config.values
  return Array.isArray(values) && values.length > 0
}

const isDatabaseError = (error: unknown): error is { readonly code: string } =>
  Predicate.isObject(error) &&
  typeof (error as { readonly code?: unknown }).code === "string" &&
  typeof (error as { readonly severity?: unknown }).severity === "string"

const plainBegin: ReadonlyArray<string> = ["BEGIN"]

/** PostgreSQL, through `@effect/sql-pg` (node-postgres). */
export const postgres: Dialect = {
  name: "postgresql",
  // The timeouts travel in the same round trip as BEGIN.
  begin: (characteristics) => {
    const { deferrable, isolation, readOnly } = characteristics
    if (
      isolation === undefined &&
      readOnly === undefined &&
      deferrable === undefined &&
      characteristics.statementTimeoutMillis === undefined &&
      characteristics.lockTimeoutMillis === undefined &&
      characteristics.idleTimeoutMillis === undefined
    ) {
      return plainBegin
    }
    let sql = "BEGIN"
    if (isolation !== undefined) sql += ` ISOLATION LEVEL ${isolation.toUpperCase()}`
    if (readOnly !== undefined) sql += readOnly ? " READ ONLY" : " READ WRITE"
    if (deferrable !== undefined) sql += deferrable ? " DEFERRABLE" : " NOT DEFERRABLE"
    const statements = [sql]
    const timeouts: ReadonlyArray<readonly [string, number | undefined]> = [
      ["statement_timeout", characteristics.statementTimeoutMillis],
      ["lock_timeout", characteristics.lockTimeoutMillis],
      ["idle_in_transaction_session_timeout", characteristics.idleTimeoutMillis]
    ]
    for (const [name, millis] of timeouts) {
      if (millis !== undefined) statements.push(`SET LOCAL ${name} = ${Math.max(1, Math.ceil(millis))}`)
    }
    return statements
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
  // PostgreSQL turns off statement_timeout before COMMIT runs deferred triggers, so a slow COMMIT is cancelled by
  // a cancel request; it still commits if the request arrives after the commit record is written.
  canCancel: (conn) => typeof pgClientOf(conn)?.processID === "number",
  takeOver,
  cancel: (conn, deadlineMillis) => {
    const client = pgClientOf(conn)
    if (client === undefined) return Effect.succeed(false)
    const { host, port, processID, secretKey } = client
    if (typeof host !== "string" || typeof processID !== "number" || typeof secretKey !== "number") {
      return Effect.succeed(false)
    }
    return sendCancelRequest({ host, port: Number(port ?? 5432), processID, secretKey }, deadlineMillis)
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
  // node-postgres says "drain" when nothing is left in flight. After an unexpected disconnect it marks the client
  // `_ended` and says "end" once, perhaps before this looks: an ended client has nothing in flight.
  settle: (conn, deadlineMillis) => {
    const client = pgClientOf(conn)
    const busy = (c: PgLikeClient) =>
      c._ending !== true && c._ended !== true && (c.readyForQuery === false || (c._queryQueue?.length ?? 0) > 0)
    if (client === undefined || !busy(client)) return Effect.succeed(true)
    return Effect.async<boolean>((resume) => {
      const done = (settled: boolean) => () => {
        clearTimeout(timer)
        client.off("drain", drained)
        client.off("end", drained)
        resume(Effect.succeed(settled))
      }
      const drained = done(true)
      const timer = setTimeout(done(false), deadlineMillis)
      client.once("drain", drained)
      client.once("end", drained)
      return Effect.sync(() => {
        clearTimeout(timer)
        client.off("drain", drained)
        client.off("end", drained)
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
    }),
  // node-postgres ends every query in flight with an error when its socket closes, and reports the error to the
  // pool, which then discards the client.
  terminate: (conn) =>
    Effect.sync(() => {
      const client = pgClientOf(conn)
      if (client === undefined) return
      const stream = client.connection?.stream
      if (stream?.destroy !== undefined) stream.destroy()
      else client.end().catch(() => undefined)
    }),
  // node-postgres keeps the indicator of the last ReadyForQuery.
  transactionStatus: (conn) => {
    const status = pgClientOf(conn)?._txStatus
    return typeof status === "string" ? transactionStatuses[status] : undefined
  }
}

/** PostgreSQL's transaction status indicator, sent with every ReadyForQuery: idle, in a transaction, or failed. */
const transactionStatuses: Record<string, "idle" | "open" | "failed"> = { I: "idle", T: "open", E: "failed" }

/** @internal How many statements each pooled connection keeps prepared for the engine's transactions. */
export const PreparedStatements = Context.Reference<Transaction.PreparedStatements>()(
  "effect-transaction/Transaction/PreparedStatements",
  { defaultValue: () => 0 }
)

/** The dialect the engine uses; PostgreSQL unless a layer provides another. */
export class CurrentDialect extends Context.Reference<CurrentDialect>()("effect-transaction/Dialect", {
  defaultValue: (): Dialect => postgres
}) {}
