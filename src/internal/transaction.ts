import * as SqlClient from "@effect/sql/SqlClient"
import type { Connection } from "@effect/sql/SqlConnection"
import { SqlError } from "@effect/sql/SqlError"
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Duration from "effect/Duration"
import * as Equal from "effect/Equal"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import type * as FiberId from "effect/FiberId"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Schedule from "effect/Schedule"
import * as Scope from "effect/Scope"
import * as Stream from "effect/Stream"
import type * as Transaction from "../Transaction.js"
import { classify, databaseInfo, TransactionError } from "../TransactionError.js"
import { type Characteristics, CurrentDialect, type Dialect } from "./dialect.js"
import { Owned, type Policy } from "./connection.js"

/** @internal */
export const isolationLevels = ["read committed", "repeatable read", "serializable"] as const

/** @internal */
export const Current = Context.GenericTag<Transaction.Current, Transaction.Transaction>(
  "effect-transaction/Transaction/Current"
)

// ---------------------------------------------------------------------------
// state
// ---------------------------------------------------------------------------

let nextTransactionId = 1

/** What a fiber asks the connection for: a statement or a new nested block of `frame`, or the end of a block. */
interface Claim {
  readonly frame: Frame
  /** A statement or a new nested block needs its block innermost; ending a block only needs a free connection. */
  readonly kind: "statement" | "end"
}

/** A statement may run only in the innermost open block, and never once its block has closed. */
const blockPolicy = (stack: ReadonlyArray<Frame>): Policy<Claim> => ({
  mayUse: (claim) => claim.kind === "end" || stack[stack.length - 1] === claim.frame,
  refused: (claim) => claim.kind === "statement" && !claim.frame.open
})

/**
 * One outermost transaction. Its connection carries one statement at a time (`busy`), and only for the innermost
 * open block (the top of `stack`): a nested block owns the connection until it ends, so the fibers of outer or
 * sibling blocks wait, and the result is as if the blocks had run one after another.
 */
interface Tx {
  readonly id: number
  readonly client: SqlClient.SqlClient
  readonly conn: Connection
  readonly dialect: Dialect
  readonly characteristics: Characteristics
  /** The open blocks, outermost first. */
  readonly stack: Array<Frame>
  /** The connection and who holds it. */
  readonly owned: Owned<Claim>
  /** Counter for savepoint names, unique within the transaction. */
  savepoints: number
  /** A savepoint whose block succeeded; its RELEASE travels with the next control statement. */
  pendingRelease: string | undefined
  /** A transaction opened by other code (not this engine) that a block nested in: its end is not ours to see. */
  foreign: boolean
  /** How the outermost block ended, once it has: which hooks run. */
  outcome: "committed" | "rolledBack" | "unknown" | undefined
  /** A test transaction of TestTransaction: never committed; the code under test runs in blocks nested in it. */
  sandbox: boolean
}

const makeTx = (
  client: SqlClient.SqlClient,
  conn: Connection,
  dialect: Dialect,
  characteristics: Characteristics
): Tx => {
  const stack: Array<Frame> = []
  return {
    id: nextTransactionId++,
    client,
    conn,
    dialect,
    characteristics,
    stack,
    owned: new Owned(conn, dialect, blockPolicy(stack)),
    savepoints: 0,
    pendingRelease: undefined,
    foreign: false,
    outcome: undefined,
    sandbox: false
  }
}

/** One block: the outermost transaction (depth 0) or a nested savepoint. */
/** @internal */
export class Frame implements Transaction.Transaction {
  open = true
  /** Closed because an outer block ended first; its savepoint was rolled back by that block. */
  abandoned = false
  /** A statement inside this block failed, so the database refuses further work until it is rolled back. */
  aborted = false
  /** The statement that aborted the block, and its error, when one did. */
  abortedBy: { readonly sql: string; readonly error: unknown } | undefined = undefined
  /** Hooks registered in this block; handed to the parent when it succeeds, dropped when it rolls back. */
  hooks: Array<Hook> = []
  /**
   * In a test transaction: the block one test runs in. Its own statements run as if autocommitted, each in a
   * savepoint, and a block opened in it is the code under test's outermost transaction (`declared` is set).
   */
  test = false
  /** In a test transaction: the suite's root once seeded; only TestTransaction.isolate may open a block in it. */
  sealed = false
  /**
   * In a test transaction: the block stands for an outermost transaction of the code under test, which asked for
   * these characteristics. It is checked and runs its hooks at its end, its "virtual commit".
   */
  declared: Characteristics | undefined = undefined
  /** The fiber that opened the block with the manual handle: only a call on the handle ends it. */
  openedBy: FiberId.FiberId | undefined = undefined
  /** How a block with `declared` characteristics ended: its virtual commit or rollback. */
  outcome: "committed" | "rolledBack" | undefined = undefined
  readonly connection: Connection
  readonly statementClaim: Claim = { frame: this, kind: "statement" }
  readonly endClaim: Claim = { frame: this, kind: "end" }

  constructor(
    readonly tx: Tx,
    readonly parent: Frame | undefined,
    readonly depth: number,
    readonly savepoint: string | undefined
  ) {
    this.connection = guardConnection(this)
  }

  get id() {
    return this.tx.id
  }
  /** What the transaction this block belongs to gives: the real one's, or, in a test, the code's declared ones. */
  get characteristics(): Characteristics {
    for (let frame: Frame | undefined = this; frame !== undefined; frame = frame.parent) {
      if (frame.declared !== undefined) return frame.declared
    }
    return this.tx.characteristics
  }
  get isolation() {
    return this.characteristics.isolation
  }
  get readOnly() {
    return this.characteristics.readOnly === true
  }
  get deferrable() {
    return this.characteristics.deferrable === true
  }
  get isOpen() {
    return this.open
  }
  get name() {
    return this.savepoint ?? ""
  }
  describe() {
    return this.depth === 0 || this.savepoint === undefined
      ? `transaction ${this.tx.id}`
      : `nested block ${this.savepoint} of transaction ${this.tx.id}`
  }
}

// ---------------------------------------------------------------------------
// who may use the connection
// ---------------------------------------------------------------------------

const closedTransactionError = (frame: Frame, what: string) =>
  new TransactionError({
    reason: "TransactionClosed",
    message: frame.tx.sandbox
      ? `${what} on ${frame.describe()} after it ended, in a test under TestTransaction. A fiber forked by the ` +
        "test (or by the code under test) outlived the block or the test it belongs to: join or interrupt it " +
        "before the test returns. Effect.fork is interrupted with its parent; Effect.forkDaemon and Effect.forkIn " +
        "are not."
      : `${what} on ${frame.describe()} after it ended. ` +
        "A fiber forked inside a transaction outlived it: join or interrupt such fibers before the block returns, " +
        "or run the work in its own transaction (Transaction.requiresNew opens one from such a fiber)."
  })

/** Errors of code that runs in a test transaction as it never would in production. */
/** @internal */
export const sandboxError = (message: string) => new TransactionError({ reason: "Unsupported", message })

/** @internal */
export const sealedError = () =>
  sandboxError(
    "TestTransaction: a statement or transaction ran in a suite built with TestTransaction.layer, but outside " +
      "TestTransaction.isolate, so it would not be rolled back after its test and later tests would see its " +
      "writes. Wrap each test's effect in TestTransaction.isolate; put shared set-up in the layer's seed option."
  )

const controlKeywords = /^(COMMIT|END|ABORT|BEGIN|START\s+TRANSACTION|PREPARE\s+TRANSACTION|ROLLBACK(?!\s+TO\b))\b/i

/**
 * The transaction control statement among the statements of `sql` (COMMIT, ROLLBACK but not ROLLBACK TO, BEGIN,
 * ...), if any: those end the test transaction, so the code under test must not send them itself. Quoted text,
 * dollar-quoted bodies and comments are skipped.
 */
export const transactionControlOf = (sql: string): string | undefined => {
  let atStart = true
  let i = 0
  while (i < sql.length) {
    const c = sql[i]!
    if (/\s/.test(c)) {
      i++
    } else if (c === "-" && sql[i + 1] === "-") {
      const end = sql.indexOf("\n", i)
      i = end < 0 ? sql.length : end + 1
    } else if (c === "/" && sql[i + 1] === "*") {
      const end = sql.indexOf("*/", i + 2)
      i = end < 0 ? sql.length : end + 2
    } else if (c === ";") {
      atStart = true
      i++
    } else {
      if (atStart) {
        const keyword = controlKeywords.exec(sql.slice(i, i + 40))
        if (keyword !== null) return keyword[1]!.toUpperCase()
        atStart = false
      }
      if (c === "'" || c === '"') {
        const end = sql.indexOf(c, i + 1)
        i = end < 0 ? sql.length : end + 1
      } else if (c === "$") {
        const tag = /^\$[A-Za-z_]*\$/.exec(sql.slice(i))
        if (tag === null) {
          i++
        } else {
          const end = sql.indexOf(tag[0], i + tag[0].length)
          i = end < 0 ? sql.length : end + tag[0].length
        }
      } else {
        i++
      }
    }
  }
  return undefined
}

const controlStatementError = (sql: string) =>
  new SqlError({
    message: "TestTransaction refused a transaction control statement",
    cause: sandboxError(
      `TestTransaction: the code under test sent ${JSON.stringify(sql.trim().slice(0, 60))} itself. In a test ` +
        "that would end or break the test transaction and let its writes escape, so it was not sent. Use " +
        "Transaction.withTransaction (or sql.withTransaction with Transaction.layer) instead of sending BEGIN, " +
        "COMMIT or ROLLBACK yourself."
    )
  })

const closedError = (frame: Frame) =>
  new SqlError({
    message: `${frame.describe()} has already ended`,
    cause: closedTransactionError(frame, "A statement was run")
  })

const innermost = (tx: Tx) => tx.stack[tx.stack.length - 1]

/** Holding the connection is uninterruptible unless a caller's `restore` says otherwise (the end of a block). */
const held: Restore = (effect) => effect

type Restore = <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>

// ---------------------------------------------------------------------------
// the guarded connection every statement inside a block runs on
// ---------------------------------------------------------------------------

/** Marks the block aborted; the first statement that did it is kept for the error its end reports. */
const markAborted = (frame: Frame, sql?: string, cause?: Cause.Cause<unknown>) =>
  Effect.sync(() => {
    frame.aborted = true
    if (sql !== undefined && frame.abortedBy === undefined && cause !== undefined && !Cause.isInterruptedOnly(cause)) {
      frame.abortedBy = { sql, error: Cause.squash(cause) }
    }
  })

/** Sends a deferred RELEASE before a statement, so open savepoints never outnumber open blocks. */
const flushPendingRelease = (frame: Frame): Effect.Effect<void, SqlError> => {
  const tx = frame.tx
  const name = tx.pendingRelease!
  tx.pendingRelease = undefined
  return Effect.asVoid(
    Effect.tapError(tx.conn.executeUnprepared(tx.dialect.release(name), [], undefined), () => markAborted(frame))
  )
}

/** Runs a statement of `frame`, holding the connection; a failed or interrupted one aborts the block. */
const runHeld = <A>(
  frame: Frame,
  sql: string,
  run: () => Effect.Effect<A, SqlError>,
  restore: Restore
): Effect.Effect<A, SqlError> => {
  const tx = frame.tx
  const statement =
    tx.pendingRelease === undefined
      ? tx.owned.execute(run(), restore)
      : Effect.zipRight(
          flushPendingRelease(frame),
          Effect.suspend(() => tx.owned.execute(run(), restore))
        )
  return Effect.onError(statement, (cause) => markAborted(frame, sql, cause))
}

/** `sql` preceded by the release still pending, if any, so that both travel in one round trip; clears it. */
const withPendingRelease = (tx: Tx, sql: string | undefined): string | undefined => {
  const pending = tx.pendingRelease
  tx.pendingRelease = undefined
  if (pending === undefined) return sql
  const release = tx.dialect.release(pending)
  return sql === undefined ? release : tx.dialect.batch([release, sql])
}

/**
 * Runs a statement of a test's own block (holding the connection) in a savepoint of its own, as if autocommitted:
 * if it fails, only it is undone and the test goes on. The savepoint's release travels with the next control
 * statement.
 */
const runAtomic = <A>(
  frame: Frame,
  statement: () => Effect.Effect<A, SqlError>,
  restore: Restore
): Effect.Effect<A, SqlError> => {
  const tx = frame.tx
  const name = `etx_${++tx.savepoints}`
  const open = withPendingRelease(tx, tx.dialect.savepoint(name))!
  return Effect.matchCauseEffect(
    Effect.zipRight(
      run(tx.conn, open),
      Effect.suspend(() => tx.owned.execute(statement(), restore))
    ),
    {
      onFailure: (cause) => Effect.zipRight(undoStatement(frame, name), Effect.failCause(cause)),
      onSuccess: (value) => {
        tx.pendingRelease = name
        return Effect.succeed(value)
      }
    }
  )
}

const undoStatement = (frame: Frame, name: string) =>
  Effect.catchAllCause(run(frame.tx.conn, frame.tx.dialect.rollbackTo(name)), () => markAborted(frame))

/** Why a statement may not run in a test transaction at all, if it may not. */
const refusedInSandbox = (frame: Frame, sql: string): SqlError | undefined => {
  if (frame.sealed) return new SqlError({ message: "TestTransaction refused a statement", cause: sealedError() })
  return transactionControlOf(sql) === undefined ? undefined : controlStatementError(sql)
}

/**
 * The block a fiber would wait for for ever: one it opened itself with the manual handle, open inside `frame`, so
 * that `frame`'s statement could run only once this very fiber had ended it.
 */
const selfBlocking = (frame: Frame, fiber: FiberId.FiberId): Frame | undefined => {
  const stack = frame.tx.stack
  for (let i = stack.length - 1; i >= 0 && stack[i] !== frame; i--) {
    const block = stack[i]!
    if (block.openedBy !== undefined && Equal.equals(block.openedBy, fiber)) return block
  }
  return undefined
}

const wouldDeadlockError = (frame: Frame, what: string, holder: Frame) =>
  new TransactionError({
    reason: "WouldDeadlock",
    message:
      `${what} in ${frame.describe()} would wait for the connection, which ${holder.describe()} holds until it ends; ` +
      "this same fiber opened that block with Transaction.begin and is the one that would end it, so it would " +
      "wait for ever. Nothing was sent. Run the work through the handle (handle.run), or commit or roll back the " +
      "handle first."
  })

/** Fails at once when the current fiber would wait for a block only it can end. */
const unlessSelfBlocking = <A, E>(
  frame: Frame,
  what: string,
  onError: (error: TransactionError) => E,
  effect: Effect.Effect<A, E>
): Effect.Effect<A, E> =>
  innermost(frame.tx) === frame || frame.tx.stack.length === 0
    ? effect
    : Effect.withFiberRuntime((fiber) => {
        const holder = selfBlocking(frame, fiber.id())
        return holder === undefined ? effect : Effect.fail(onError(wouldDeadlockError(frame, what, holder)))
      })

/** Called by @effect/sql when the statement runs, so the checks see the block as it is at that moment. */
const guarded = <A>(frame: Frame, sql: string, run: () => Effect.Effect<A, SqlError>): Effect.Effect<A, SqlError> =>
  Effect.uninterruptibleMask((restore) => {
    const tx = frame.tx
    if (!frame.open) return Effect.fail(closedError(frame))
    if (tx.sandbox) {
      const refused = refusedInSandbox(frame, sql)
      if (refused !== undefined) return Effect.fail(refused)
    }
    if (frame.test) {
      // A test's own statement stands for an autocommitted one, which production would run on another pooled
      // connection: it does not wait for the code under test's open transactions to end (that could deadlock
      // where production cannot), only for the connection to be free, and runs inside whatever block is open.
      return tx.owned.withConnection(frame.endClaim, restore, () =>
        frame.open ? runAtomic(frame, run, restore) : Effect.fail(closedError(frame))
      )
    }
    return unlessSelfBlocking(
      frame,
      "A statement",
      (error) => new SqlError({ message: error.message, cause: error }),
      tx.owned.withConnection(frame.statementClaim, restore, (ok) =>
        ok ? runHeld(frame, sql, run, restore) : Effect.fail(closedError(frame))
      )
    )
  })

/**
 * Holds the connection for a stream until the stream's scope closes, and returns what the stream runs after its
 * own finalizers (@effect/sql-pg closes its cursor there, and a statement sent before that would take the answer
 * the cursor waits for). A test's own stream runs in a savepoint, released or rolled back when it ends.
 */
const holdForStream = (
  frame: Frame,
  sql: string,
  started: () => boolean,
  restore: Restore
): Effect.Effect<(exit: Exit.Exit<unknown, unknown>) => Effect.Effect<void>, SqlError, Scope.Scope> => {
  const tx = frame.tx
  const refused = tx.sandbox ? refusedInSandbox(frame, sql) : undefined
  if (refused !== undefined) return Effect.fail(refused)
  return Effect.flatMap(
    tx.owned.hold(frame.test ? frame.endClaim : frame.statementClaim, restore, () => closedError(frame)),
    () => {
      if (!frame.open) return Effect.fail(closedError(frame))
      let done = false
      const name = frame.test ? `etx_${++tx.savepoints}` : undefined
      const finish = (exit: Exit.Exit<unknown, unknown>): Effect.Effect<void> =>
        Effect.suspend(() => {
          if (done) return Effect.void
          done = true
          return Effect.zipRight(
            tx.owned.settle(),
            name === undefined
              ? Effect.void
              : Exit.isSuccess(exit)
                ? Effect.sync(() => {
                    tx.pendingRelease = name
                  })
                : undoStatement(frame, name)
          )
        })
      const sql = withPendingRelease(tx, name === undefined ? undefined : tx.dialect.savepoint(name))
      const prepare = sql === undefined ? Effect.void : run(tx.conn, sql)
      // Hands the connection back if the stream never started (it was interrupted first).
      return Effect.as(
        Effect.zipRight(
          Effect.addFinalizer((exit) => (started() ? Effect.void : finish(exit))),
          Effect.tapError(prepare, () => markAborted(frame))
        ),
        finish
      )
    }
  )
}

const guardConnection = (frame: Frame): Connection => {
  const conn = frame.tx.conn
  return {
    execute: (sql, params, transformRows) => guarded(frame, sql, () => conn.execute(sql, params, transformRows)),
    executeRaw: (sql, params) => guarded(frame, sql, () => conn.executeRaw(sql, params)),
    executeValues: (sql, params) => guarded(frame, sql, () => conn.executeValues(sql, params)),
    executeUnprepared: (sql, params, transformRows) =>
      guarded(frame, sql, () => conn.executeUnprepared(sql, params, transformRows)),
    // A stream holds the connection until it has ended.
    executeStream: (sql, params, transformRows) =>
      Stream.suspend(() => {
        let started = false
        const rows = Stream.suspend(() => {
          started = true
          const stream = conn.executeStream(sql, params, transformRows)
          return frame.test ? stream : Stream.tapErrorCause(stream, (cause) => markAborted(frame, sql, cause))
        })
        return Stream.unwrapScoped(
          Effect.uninterruptibleMask((restore) =>
            Effect.map(
              holdForStream(frame, sql, () => started, restore),
              (finish) => Stream.ensuringWith(rows, finish)
            )
          )
        )
      })
  }
}

/** @internal */
export const provideFrame = <A, E, R>(effect: Effect.Effect<A, E, R>, frame: Frame): Effect.Effect<A, E, R> =>
  Effect.mapInputContext(effect, (context: Context.Context<R>) => {
    // One copy of the context instead of one per added service.
    const services = new Map(context.unsafeMap)
    services.set(Current.key, frame)
    services.set(SqlClient.TransactionConnection.key, [frame.connection, frame.depth])
    return Context.unsafeMake(services)
  })

// ---------------------------------------------------------------------------
// options
// ---------------------------------------------------------------------------

const rank = (isolation: Transaction.IsolationLevel | undefined) =>
  isolation === undefined ? 0 : isolationLevels.indexOf(isolation)

const invalidOption = (message: string) => new TransactionError({ reason: "InvalidOption", message })

const optionNames: ReadonlySet<string> = new Set([
  "isolation",
  "readOnly",
  "deferrable",
  "timeout",
  "statementTimeout",
  "lockTimeout",
  "idleTimeout",
  "retry",
  "acquireTimeout"
])

/** Shows an option's value in a message; a bigint or a cyclic object must not make the message itself throw. */
const show = (value: unknown): string => {
  if (typeof value === "bigint") return `${value}n`
  try {
    return JSON.stringify(value) ?? String(value)
  } catch {
    return String(value)
  }
}

const validateOptions = (options: Transaction.Options): TransactionError | undefined => {
  for (const name of Object.keys(options)) {
    if (!optionNames.has(name)) {
      return invalidOption(
        `Unknown option ${JSON.stringify(name)}; nothing was sent. The options are: ${[...optionNames].join(", ")}. ` +
          (name.toLowerCase().startsWith("isolation")
            ? 'For the isolation level, use isolation: "serializable". '
            : "") +
          "Remove the key, or pick the options out of a larger object instead of spreading it."
      )
    }
  }
  if (options.isolation !== undefined && !isolationLevels.includes(options.isolation)) {
    return invalidOption(
      `Unknown isolation level ${show(options.isolation)}. Use one of: ${isolationLevels.join(", ")}.`
    )
  }
  if (options.deferrable === true && (options.isolation !== "serializable" || options.readOnly !== true)) {
    return invalidOption(
      "The deferrable option only has an effect on a serializable, read-only transaction. " +
        'Add isolation: "serializable" and readOnly: true, or drop deferrable.'
    )
  }
  for (const name of durationOptions) {
    const input = options[name]
    if (input === undefined) continue
    const millis = millisOf(input)
    if (millis === undefined) {
      return invalidOption(
        `The ${name} option must be a positive, finite duration such as "5 seconds"; got ${show(input)}. ` +
          "Leave the option out for no limit."
      )
    }
    if (serverDurationOptions.includes(name) && Math.ceil(millis) > MAX_SERVER_MILLIS) {
      return invalidOption(
        `The ${name} option is ${show(input)}, above PostgreSQL's limit for it of ${MAX_SERVER_MILLIS} ms ` +
          "(about 24.8 days); nothing was sent. Leave the option out for no limit."
      )
    }
  }
  if (options.retry !== undefined && typeof options.retry !== "boolean" && !Schedule.isSchedule(options.retry)) {
    return invalidOption("The retry option must be true, false or a Schedule.")
  }
  return undefined
}

const durationOptions = ["timeout", "statementTimeout", "lockTimeout", "idleTimeout", "acquireTimeout"] as const

/** The options the database enforces (`SET LOCAL`), in whole milliseconds up to a 32-bit integer. */
const serverDurationOptions: ReadonlyArray<string> = ["statementTimeout", "lockTimeout", "idleTimeout"]
const MAX_SERVER_MILLIS = 2_147_483_647

/** A positive, finite duration in milliseconds, or undefined for anything else. */
const millisOf = (input: Duration.DurationInput): number | undefined => {
  if ((typeof input === "number" || typeof input === "bigint") && !(input > 0)) return undefined
  const decoded = Duration.decodeUnknown(input)
  if (Option.isNone(decoded)) return undefined
  const millis = Duration.toMillis(decoded.value)
  return millis > 0 && Number.isFinite(millis) ? millis : undefined
}

const conflict = (frame: Frame, message: string) =>
  new TransactionError({
    reason: "OptionConflict",
    message: `A nested block of ${frame.describe()} ${message}`
  })

/** A nested block runs inside the outer transaction: it may ask only for what that transaction already gives. */
const checkNestedOptions = (parent: Frame, options: Transaction.Options): TransactionError | undefined => {
  const outer = parent.characteristics
  if (options.isolation !== undefined && rank(options.isolation) > rank(outer.isolation)) {
    return conflict(
      parent,
      `asked for isolation "${options.isolation}", but the outer transaction runs at ` +
        `"${outer.isolation ?? "read committed"}" and isolation cannot change inside a transaction. ` +
        `Open the outermost transaction with isolation: "${options.isolation}".`
    )
  }
  if (options.readOnly === false && outer.readOnly === true) {
    return conflict(
      parent,
      "asked to be read-write, but the outer transaction is read-only. " +
        "Drop readOnly: true from the outer transaction, or readOnly: false from the nested block."
    )
  }
  if (options.readOnly === true && outer.readOnly !== true) {
    return conflict(
      parent,
      "asked to be read-only, but the outer transaction is read-write and a nested block cannot be made " +
        "read-only on its own. Open the outermost transaction with readOnly: true, or drop it from the nested block."
    )
  }
  if (options.deferrable === true && outer.deferrable !== true) {
    return conflict(
      parent,
      "asked to be deferrable, but the outer transaction is not, and deferrable only applies when a transaction " +
        "starts. Open the outermost transaction with deferrable: true, or drop it from the nested block."
    )
  }
  for (const name of [...durationOptions, "retry"] as const) {
    if (options[name] !== undefined && options[name] !== false) {
      return conflict(
        parent,
        `was given the ${name} option, which applies to a whole transaction: only the outermost block ` +
          (name === "retry" ? "can run the transaction again" : "sets it") +
          `. Set ${name} on the outermost withTransaction, or drop it from the nested block.`
      )
    }
  }
  return undefined
}

// ---------------------------------------------------------------------------
// errors of control statements
// ---------------------------------------------------------------------------

const hints: Record<string, string> = {
  "40001": "Another transaction changed data this one depends on. Run the whole transaction again; it may succeed.",
  "40P01": "Two transactions waited on each other's locks. Run the whole transaction again; it may succeed.",
  "23503":
    "A deferred foreign key is checked at COMMIT. Fix the rows the transaction writes, or make the constraint " +
    "NOT DEFERRABLE to see the error at the statement that causes it.",
  "23505":
    "A deferred unique constraint is checked at COMMIT. Fix the rows the transaction writes, or make the " +
    "constraint NOT DEFERRABLE to see the error at the statement that causes it.",
  "25P02":
    "A statement inside the block failed and its error was caught, which leaves the block aborted. Let the error " +
    "fail the block (an outer block can catch it), or wrap the failing statement in its own nested withTransaction."
}

const controlError = (
  reason: "BeginFailed" | "CommitFailed" | "RollbackFailed" | "SavepointFailed",
  what: string,
  consequence: string,
  cause: unknown,
  outcomeUnknown?: boolean
) => {
  const info = databaseInfo(cause)
  const retryable =
    info.sqlState === "40001" ? "SerializationFailure" : info.sqlState === "40P01" ? "Deadlock" : undefined
  const hint = info.sqlState === undefined ? undefined : hints[info.sqlState]
  return new TransactionError({
    reason: retryable ?? reason,
    message:
      `${what} failed: ${info.message}${info.sqlState === undefined ? "" : ` (SQLSTATE ${info.sqlState})`}. ` +
      `${consequence}${hint === undefined ? "" : ` ${hint}`}`,
    sqlState: info.sqlState,
    constraint: info.constraint,
    outcomeUnknown,
    cause
  })
}

const abortedError = (frame: Frame) => {
  const by = frame.abortedBy
  const statement =
    by === undefined
      ? "a statement inside it failed"
      : `the statement ${JSON.stringify(by.sql.trim().slice(0, 120))} inside it failed (${databaseInfo(by.error).message})`
  return new TransactionError({
    reason: frame.depth === 0 ? "CommitFailed" : "SavepointFailed",
    message:
      `${frame.describe()} returned successfully, but ${statement}, so the database had aborted ` +
      `it; it was rolled back and nothing of it was kept. ${hints["25P02"]}`,
    sqlState: "25P02",
    cause: by?.error
  })
}

// ---------------------------------------------------------------------------
// the engine
// ---------------------------------------------------------------------------

const run = (conn: Connection, sql: string) => Effect.asVoid(conn.executeUnprepared(sql, [], undefined))

/**
 * Closes the blocks still open inside `frame` and rolls their writes back: a block that ends before the nested
 * blocks its fibers started keeps none of their unfinished work. Their fibers' next statement is refused.
 */
const closeInner = (frame: Frame): Effect.Effect<void> =>
  Effect.suspend(() => {
    const tx = frame.tx
    const inner = tx.stack.splice(tx.stack.indexOf(frame) + 1)
    if (inner.length === 0) return Effect.void
    for (const block of inner) {
      block.open = false
      block.abandoned = true
    }
    tx.pendingRelease = undefined
    return Effect.catchAllCause(run(tx.conn, tx.dialect.rollbackTo(inner[0]!.savepoint!)), () => markAborted(frame))
  })

/** Passes the hooks of a block that succeeded to the block around it (a loop: there may be very many). */
const handHooksTo = (parent: Frame, hooks: ReadonlyArray<Hook>): void => {
  for (const hook of hooks) parent.hooks.push(hook)
}

/**
 * Closes the savepoints still open inside `frame` keeping their writes, as releasing or committing `frame` does in
 * SQL: their hooks pass down to `frame`, and an aborted one aborts `frame`. Used by the manual handle.
 */
const keepInner = (frame: Frame): void => {
  const tx = frame.tx
  const inner = tx.stack.splice(tx.stack.indexOf(frame) + 1)
  for (let i = inner.length - 1; i >= 0; i--) {
    const block = inner[i]!
    block.open = false
    if (block.aborted) {
      frame.aborted = true
      frame.abortedBy ??= block.abortedBy
    }
    handHooksTo(block.parent!, block.hooks)
  }
}

/**
 * Whether a failed COMMIT may still have been committed: the connection broke before the answer came. A COMMIT
 * cancelled (57014) answered, and the answer is that it rolled back.
 */
const outcomeUnknown = (cause: unknown) => {
  const { sqlState } = databaseInfo(cause)
  return sqlState === undefined || sqlState.startsWith("08") || (sqlState.startsWith("57") && sqlState !== "57014")
}

const timeoutError = (what: string, timeoutMillis: number, when: string) =>
  new TransactionError({
    reason: "Timeout",
    message:
      `${what} did not finish within its timeout of ${timeoutMillis} ms (${when}); it was rolled back ` +
      "and nothing was committed. Raise the timeout, or make the transaction do less."
  })

/**
 * Ends the outermost block: `COMMIT` when `exit` succeeded, `ROLLBACK` otherwise, and records the outcome. Blocks
 * still open inside it are rolled back (`inner: "rollback"`, the block's body has returned without them) or kept
 * (`"keep"`, savepoints of the manual handle).
 */
/** @internal */
export const finishOutermost = <A, E>(
  frame: Frame,
  exit: Exit.Exit<A, E>,
  limit: Limit | undefined,
  inner: "rollback" | "keep" = "rollback"
): Effect.Effect<A, E | TransactionError> => {
  const tx = frame.tx
  /** Rolls back, then fails with `failure`; a failed ROLLBACK is added after it and the connection destroyed. */
  const rollback = (failure: Cause.Cause<E | TransactionError>) =>
    Effect.matchCauseEffect(run(tx.conn, tx.dialect.rollback), {
      onFailure: (cause) => {
        // The destroyed session ends, and with it the transaction: nothing is committed.
        tx.outcome ??= "rolledBack"
        tx.owned.broken = true
        const error = controlError(
          "RollbackFailed",
          `ROLLBACK of ${frame.describe()}`,
          "The connection was closed instead of returned to the pool.",
          Cause.squash(cause)
        )
        return Effect.failCause(Cause.sequential(failure, Cause.fail(error)))
      },
      onSuccess: () => {
        tx.outcome ??= "rolledBack"
        return Effect.failCause(failure)
      }
    })
  const end = (): Effect.Effect<A, E | TransactionError> => {
    frame.open = false
    tx.stack.length = 0
    tx.pendingRelease = undefined
    if (Exit.isFailure(exit)) return rollback(exit.cause)
    if (frame.aborted) return rollback(Cause.fail(abortedError(frame)))
    if (limit !== undefined && limit.deadline - Date.now() <= 0) {
      return rollback(Cause.fail(timeoutError(frame.describe(), limit.timeoutMillis, "no time was left for COMMIT")))
    }
    // COMMIT is never abandoned: past the deadline it is cancelled, and its own answer says what happened.
    return Effect.matchCauseEffect(tx.owned.execute(tx.dialect.commit(tx.conn), held, limit?.deadline), {
      onFailure: (cause) => {
        const error = Cause.squash(cause)
        const { sqlState } = databaseInfo(error)
        if (limit !== undefined && sqlState === "57014" && Date.now() >= limit.deadline) {
          return rollback(Cause.fail(timeoutError(frame.describe(), limit.timeoutMillis, "COMMIT was still running")))
        }
        const unknown = outcomeUnknown(error)
        if (unknown) tx.outcome = "unknown"
        return rollback(
          Cause.fail(
            controlError(
              "CommitFailed",
              `COMMIT of ${frame.describe()}`,
              unknown
                ? "The connection failed before the database answered, so whether it committed is unknown: " +
                    "check before running the transaction again."
                : "The transaction was rolled back; nothing was committed.",
              error,
              unknown
            )
          )
        )
      },
      onSuccess: (committed): Effect.Effect<A, E | TransactionError> => {
        if (!committed) return rollback(Cause.fail(abortedError(frame)))
        tx.outcome = "committed"
        return exit
      }
    })
  }
  return tx.owned.withConnection(frame.endClaim, held, () => {
    if (innermost(tx) === frame) return end()
    if (inner === "rollback") return Effect.flatMap(closeInner(frame), end)
    keepInner(frame)
    return end()
  })
}

const reserveFailed = (cause: unknown) =>
  controlError(
    "BeginFailed",
    "Reserving a connection for the transaction",
    "Nothing was sent to the database. Check that the database is reachable and the pool is not exhausted.",
    cause
  )

const acquireTimeoutError = (millis: number, holding: boolean) =>
  new TransactionError({
    reason: "AcquireTimeout",
    message:
      `No pooled connection became free within ${millis} ms, so the transaction did not start and nothing was ` +
      "sent. Every connection of the pool is held by other work" +
      (holding
        ? ", and this fiber already holds one for the transaction it is inside: if many fibers do that at once, " +
          "the pool runs dry and each waits for the others. "
        : ". ") +
      "Raise the pool's maxConnections, keep transactions shorter, or raise acquireTimeout."
  })

/**
 * Reserves a connection into `scope`. Without a bound it waits, uninterruptibly: @effect/sql-pg loses a pooled
 * client whose reservation is interrupted while it waits. With one, another fiber waits while this one may give
 * up or be interrupted; a connection that arrives later is released at once, as its scope has closed by then.
 */
const reserve = (
  client: SqlClient.SqlClient,
  scope: Scope.Scope,
  acquireMillis: number | undefined,
  holding: boolean,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
  limit: Limit | undefined
): Effect.Effect<Connection, TransactionError> => {
  const remaining = limit === undefined ? undefined : limit.deadline - Date.now()
  if (remaining !== undefined && remaining <= 0) {
    return Effect.fail(timeoutError("The transaction", limit!.timeoutMillis, "no time was left for another attempt"))
  }
  // The `timeout` option bounds the wait for a connection too.
  const byDeadline = remaining !== undefined && (acquireMillis === undefined || remaining < acquireMillis)
  const millis = byDeadline ? remaining : acquireMillis
  if (millis === undefined) return Effect.mapError(Scope.extend(client.reserve, scope), reserveFailed)
  return Effect.flatMap(Effect.forkDaemon(Scope.extend(client.reserve, scope)), (waiting) =>
    Effect.matchCauseEffect(restore(Effect.timeoutOption(Fiber.join(waiting), Duration.millis(millis))), {
      onFailure: (cause): Effect.Effect<never, TransactionError> =>
        Cause.isInterruptedOnly(cause) ? Effect.interrupt : Effect.fail(reserveFailed(Cause.squash(cause))),
      onSuccess: Option.match({
        onNone: () =>
          Effect.fail(
            byDeadline
              ? timeoutError("The transaction", limit!.timeoutMillis, "it was still waiting for a pooled connection")
              : acquireTimeoutError(millis, holding)
          ),
        onSome: Effect.succeed
      })
    })
  )
}

/** Reserves a connection into `scope` and opens the outermost block on it. */
/** @internal */
export const open = (
  client: SqlClient.SqlClient,
  dialect: Dialect,
  options: Transaction.Options,
  scope: Scope.Scope,
  holding: boolean,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
  limit?: Limit
): Effect.Effect<Frame, TransactionError> => {
  const characteristics: Characteristics = {
    isolation: options.isolation,
    readOnly: options.readOnly,
    deferrable: options.deferrable,
    statementTimeoutMillis: options.statementTimeout === undefined ? undefined : millisOf(options.statementTimeout),
    lockTimeoutMillis: options.lockTimeout === undefined ? undefined : millisOf(options.lockTimeout),
    idleTimeoutMillis: options.idleTimeout === undefined ? undefined : millisOf(options.idleTimeout)
  }
  const acquireMillis = options.acquireTimeout === undefined ? undefined : millisOf(options.acquireTimeout)
  return Effect.flatMap(reserve(client, scope, acquireMillis, holding, restore, limit), (conn) => {
    const tx = makeTx(client, conn, dialect, characteristics)
    const frame = new Frame(tx, undefined, 0, undefined)
    return Effect.matchCauseEffect(run(conn, dialect.begin(characteristics)), {
      onFailure: (cause) => {
        frame.open = false
        return Effect.zipRight(
          dialect.destroy(conn),
          controlError(
            "BeginFailed",
            dialect.begin(characteristics),
            "No transaction was opened and the connection was closed.",
            Cause.squash(cause)
          )
        )
      },
      onSuccess: () => {
        tx.stack.push(frame)
        return Effect.succeed(frame)
      }
    })
  })
}

/** Gives the connection back to the pool, or destroys it when its state is unknown. */
/** @internal */
export const closeConnection = (tx: Tx | undefined, scope: Scope.CloseableScope, exit: Exit.Exit<unknown, unknown>) =>
  tx?.owned.broken === true
    ? Effect.zipRight(tx.dialect.destroy(tx.conn), Scope.close(scope, exit))
    : Scope.close(scope, exit)

/** The deadline of a transaction with the `timeout` option: the whole call, retries included. */
interface Limit {
  readonly deadline: number
  readonly timeoutMillis: number
}

const limitOf = (options: Transaction.Options): Limit | undefined => {
  const timeoutMillis = options.timeout === undefined ? undefined : millisOf(options.timeout)
  return timeoutMillis === undefined ? undefined : { deadline: Date.now() + timeoutMillis, timeoutMillis }
}

/**
 * Runs `body` until `limit`'s deadline, failing with `Timeout` then. Fibers the body forks stay children of the
 * caller, as without a limit (a body run in a fiber of its own would take its unjoined children down with it).
 */
const bounded = <A, E, R>(
  body: Effect.Effect<A, E, R>,
  limit: Limit | undefined,
  frame: Frame
): Effect.Effect<A, E | TransactionError, R> =>
  limit === undefined
    ? body
    : Effect.transplant((graft) =>
        Effect.timeoutFail(graft(body), {
          duration: Duration.millis(Math.max(0, limit.deadline - Date.now())),
          onTimeout: () => timeoutError(frame.describe(), limit.timeoutMillis, "its body was still running")
        })
      )

const outermost = <A, E, R>(
  client: SqlClient.SqlClient,
  dialect: Dialect,
  options: Transaction.Options,
  holding: boolean,
  effect: Effect.Effect<A, E, R>,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
  limit: Limit | undefined,
  opened: (frame: Frame) => void
): Effect.Effect<A, E | TransactionError, R> =>
  Effect.flatMap(Scope.make(), (scope) => {
    let frame: Frame | undefined
    return open(client, dialect, options, scope, holding, restore, limit).pipe(
      Effect.flatMap((begun) => {
        frame = begun
        opened(begun)
        const body = bounded(restore(provideFrame(effect, begun)), limit, begun)
        return Effect.flatMap(Effect.exit(body), (exit) => finishOutermost(begun, exit, limit))
      }),
      Effect.onExit((exit) => closeConnection(frame?.tx, scope, exit))
    )
  })

const abandonedResult = <A, E>(frame: Frame, exit: Exit.Exit<A, E>): Effect.Effect<A, E | TransactionError> =>
  Exit.isFailure(exit)
    ? exit
    : Effect.fail(
        new TransactionError({
          reason: "TransactionClosed",
          message:
            `${frame.describe()} was still running when an outer block ended, so its writes were rolled back ` +
            "with it. Join the fiber that runs a nested block before the outer block returns."
        })
      )

/**
 * Ends a nested block: releases its savepoint when `exit` succeeded, rolls it back otherwise. Blocks still open
 * inside it are rolled back or kept, as for `finishOutermost`. A block standing for the code's outermost
 * transaction in a test records how its virtual commit ended.
 *
 * @internal
 */
export const finishNested = <A, E>(
  frame: Frame,
  exit: Exit.Exit<A, E>,
  inner: "rollback" | "keep" = "rollback"
): Effect.Effect<A, E | TransactionError> =>
  frame.declared === undefined
    ? endNested(frame, exit, inner)
    : Effect.onExit(endNested(frame, exit, inner), (ended) =>
        Effect.sync(() => {
          frame.outcome = Exit.isSuccess(ended) ? "committed" : "rolledBack"
        })
      )

const endNested = <A, E>(
  frame: Frame,
  exit: Exit.Exit<A, E>,
  inner: "rollback" | "keep"
): Effect.Effect<A, E | TransactionError> => {
  const tx = frame.tx
  if (frame.abandoned) return abandonedResult(frame, exit)
  const name = frame.savepoint!
  // Called with the connection held; hands it on.
  const end = (): Effect.Effect<A, E | TransactionError> => {
    tx.stack.pop()
    frame.open = false
    if (Exit.isSuccess(exit) && !frame.aborted) {
      if (frame.declared !== undefined) return virtualCommit(frame, exit)
      // Releasing this savepoint releases any deeper one still pending.
      tx.pendingRelease = name
      handHooksTo(frame.parent!, frame.hooks)
      return exit
    }
    // Rolling back to this savepoint destroys any deeper one still pending.
    tx.pendingRelease = undefined
    return rollbackNested(frame, exit)
  }
  return tx.owned.withConnection(frame.endClaim, held, (): Effect.Effect<A, E | TransactionError> => {
    // An outer block may have ended while this one waited for the connection.
    if (frame.abandoned) return abandonedResult(frame, exit)
    if (innermost(tx) === frame) return end()
    if (inner === "rollback") return Effect.flatMap(closeInner(frame), end)
    keepInner(frame)
    return end()
  })
}

/** Rolls a nested block back to its savepoint, holding the connection, and hands the connection on. */
const rollbackNested = <A, E>(frame: Frame, exit: Exit.Exit<A, E>): Effect.Effect<A, E | TransactionError> => {
  const tx = frame.tx
  return Effect.matchCauseEffect(run(tx.conn, tx.dialect.rollbackTo(frame.savepoint!)), {
    onFailure: (cause) => {
      frame.parent!.aborted = true
      const error = controlError(
        "SavepointFailed",
        `ROLLBACK TO SAVEPOINT of ${frame.describe()}`,
        "The outer transaction cannot go on and will be rolled back.",
        Cause.squash(cause)
      )
      return Exit.isFailure(exit) ? Effect.failCause(Cause.sequential(exit.cause, Cause.fail(error))) : error
    },
    onSuccess: (): Effect.Effect<A, E | TransactionError> =>
      Exit.isFailure(exit) ? exit : Effect.fail(abortedError(frame))
  })
}

/**
 * The end of the code under test's outermost transaction in a test transaction: what COMMIT would check (the
 * deferred constraints) is checked now; if it fails, the block is rolled back and fails as COMMIT would have.
 */
const virtualCommit = <A, E>(frame: Frame, exit: Exit.Exit<A, E>): Effect.Effect<A, E | TransactionError> => {
  const tx = frame.tx
  const sql = withPendingRelease(tx, tx.dialect.checkDeferred(`etx_${++tx.savepoints}`))!
  return Effect.matchCauseEffect(run(tx.conn, sql), {
    onFailure: (cause) =>
      rollbackNested(
        frame,
        Exit.fail(
          controlError(
            "CommitFailed",
            `COMMIT of ${frame.describe()} (checked by TestTransaction where the code under test commits)`,
            "It was rolled back; nothing of it was kept, as COMMIT would have done.",
            Cause.squash(cause)
          )
        )
      ),
    onSuccess: (): Effect.Effect<A, E | TransactionError> => {
      tx.pendingRelease = frame.savepoint
      return exit
    }
  })
}

/** Opens a savepoint for a block nested in `parent`, once `parent` may use the connection. */
/** @internal */
export const openNested = (
  parent: Frame,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>
): Effect.Effect<Frame, TransactionError> =>
  unlessSelfBlocking(
    parent,
    "A nested block",
    (error) => error,
    parent.tx.owned.withConnection(parent.statementClaim, restore, (ok) => {
      if (!ok) return Effect.fail(closedTransactionError(parent, "A nested block was started"))
      const tx = parent.tx
      const name = `etx_${++tx.savepoints}`
      const sql = withPendingRelease(tx, tx.dialect.savepoint(name))!
      return Effect.matchCauseEffect(run(tx.conn, sql), {
        onFailure: (cause) => {
          parent.aborted = true
          return controlError(
            "SavepointFailed",
            `SAVEPOINT for a nested block of ${parent.describe()}`,
            "The nested block did not run.",
            Cause.squash(cause)
          )
        },
        onSuccess: () => {
          const frame = new Frame(tx, parent, parent.depth + 1, name)
          tx.stack.push(frame)
          return Effect.succeed(frame)
        }
      })
    })
  )

const nested = <A, E, R>(
  parent: Frame,
  effect: Effect.Effect<A, E, R>,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>
): Effect.Effect<A, E | TransactionError, R> =>
  Effect.flatMap(openNested(parent, restore), (frame) =>
    Effect.flatMap(Effect.exit(restore(provideFrame(effect, frame))), (exit) => finishNested(frame, exit))
  )

/**
 * The block a new block nests in: ours, or a root standing for a transaction other code opened on this fiber
 * (`TransactionConnection` without `Current`), whose end is not ours to see.
 */
const parentOf = (context: Context.Context<never>, client: SqlClient.SqlClient | undefined): Frame | undefined => {
  const current = Context.getOption(context, Current)
  if (current._tag === "Some") return current.value as Frame
  const foreign = Context.getOption(context, SqlClient.TransactionConnection)
  if (foreign._tag === "None") return undefined
  const [conn, depth] = foreign.value
  // One state per connection: concurrent blocks nested in the same foreign transaction share one savepoint
  // counter and one lock, as blocks nested in ours do. The driver hands out a new connection object per
  // reservation, so a later transaction on the same pooled session starts afresh.
  const known = foreignRoots.get(conn)
  if (known !== undefined) return known
  const adopted = makeTx(
    client ?? Context.unsafeGet(context, SqlClient.SqlClient),
    conn,
    Context.get(context, CurrentDialect),
    {
      isolation: undefined,
      readOnly: undefined,
      deferrable: undefined
    }
  )
  adopted.foreign = true
  const root = new Frame(adopted, undefined, depth, undefined)
  adopted.stack.push(root)
  foreignRoots.set(conn, root)
  return root
}

/** The root standing for each transaction other code opened, by its connection. */
const foreignRoots = new WeakMap<Connection, Frame>()

/** Sends a release still pending in a transaction that is not ours: nothing of ours would send it later. */
const flushForeign = (root: Frame) =>
  root.tx.owned
    .withConnection(root.endClaim, held, () =>
      root.tx.pendingRelease === undefined ? Effect.void : flushPendingRelease(root)
    )
    .pipe(Effect.ignore)

/** Runs `effect` in a transaction of `client`, or in a savepoint when one is already open in the fiber. */
export const transact = <A, E, R>(
  client: SqlClient.SqlClient | undefined,
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options
): Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current>> =>
  Effect.withFiberRuntime((fiber) => {
    const invalid = validateOptions(options)
    if (invalid !== undefined) return Effect.fail(invalid)
    const context = fiber.currentContext
    const parent = parentOf(context, client)
    if (parent !== undefined) {
      if (parent.tx.sandbox) {
        if (parent.sealed) return Effect.fail(sealedError())
        if (parent.test) return virtualOutermost(parent, effect, options)
      }
      const incompatible = checkNestedOptions(parent, options)
      if (incompatible !== undefined) return Effect.fail(incompatible)
      const inside = Effect.uninterruptibleMask((restore) => nested(parent, effect, restore))
      return parent.tx.foreign ? Effect.ensuring(inside, flushForeign(parent)) : inside
    }
    return outermostRetrying(client ?? Context.unsafeGet(context, SqlClient.SqlClient), context, effect, options, false)
  }) as Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current>>

const outermostRetrying = <A, E, R>(
  client: SqlClient.SqlClient,
  context: Context.Context<never>,
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options,
  holding: boolean
): Effect.Effect<A, E | TransactionError, R> => {
  const dialect = Context.get(context, CurrentDialect)
  return Effect.suspend(() => {
    const limit = limitOf(options)
    let last: Frame | undefined
    const once = Effect.uninterruptibleMask((restore) => {
      last = undefined
      return outermost(client, dialect, options, holding, effect, restore, limit, (frame) => {
        last = frame
      })
    })
    return withHooksOfLast(attempts(once, options, limit), () => last)
  })
}

/** The attempts of a transaction: one, or as many as `retry` allows before the deadline of `timeout`. */
const attempts = <A, E, R>(
  once: Effect.Effect<A, E | TransactionError, R>,
  options: Transaction.Options,
  limit: Limit | undefined
): Effect.Effect<A, E | TransactionError, R> => {
  if (options.retry === undefined || options.retry === false) return once
  const schedule = options.retry === true ? defaultRetrySchedule : options.retry
  return retrying(
    once,
    limit === undefined
      ? schedule
      : // No wait runs past the deadline; an attempt that would start after it fails with Timeout instead.
        Schedule.modifyDelay(schedule, (_, delay) =>
          Duration.min(delay, Duration.millis(Math.max(0, limit.deadline - Date.now())))
        )
  )
}

/**
 * Runs the hooks of the attempt that ended the transaction (the one that committed, or the last one), once its
 * connection is back in the pool; an attempt that was retried keeps none. They run as part of ending the call,
 * uninterruptibly: a caller interrupted during or after a COMMIT that succeeded still gets its afterCommit hooks
 * run (the interruption takes effect once they have); a rollback caused by the caller's interruption runs none. An ordinary nested block has no outcome of its own, so nothing runs
 * for it: its hooks went to the block around it.
 */
const withHooksOfLast = <A, E, R>(
  transaction: Effect.Effect<A, E, R>,
  last: () => Frame | undefined
): Effect.Effect<A, E, R> =>
  Effect.onExit(transaction, (exit) => {
    const frame = last()
    if (frame === undefined || frame.hooks.length === 0) return Effect.void
    const outcome = frame.declared === undefined ? frame.tx.outcome : frame.outcome
    // A rollback the caller's interruption caused runs no hooks; a commit always runs its own.
    if (outcome !== "committed" && Exit.isFailure(exit) && Cause.isInterrupted(exit.cause)) return Effect.void
    return runHooks(frame, outcome)
  })

/** @internal */
export const defaultRetrySchedule: Schedule.Schedule<unknown, unknown> = Schedule.exponential("10 millis").pipe(
  Schedule.modifyDelay((delay) => Duration.min(delay, Duration.seconds(1))),
  Schedule.jittered,
  Schedule.intersect(Schedule.recurs(9))
)

const isRetryable = (error: unknown) =>
  error instanceof TransactionError
    ? error.isRetryable
    : ((sqlState) => sqlState === "40001" || sqlState === "40P01")(databaseInfo(error).sqlState)

/**
 * Runs the whole transaction again on a serialization failure or deadlock, wherever it surfaced. When the
 * schedule gives up, the last failure comes back as a `TransactionError` with the attempt count, the original
 * error as `cause`.
 */
const retrying = <A, E, R>(
  once: Effect.Effect<A, E | TransactionError, R>,
  schedule: Schedule.Schedule<unknown, TransactionError>
): Effect.Effect<A, E | TransactionError, R> =>
  Effect.suspend(() => {
    let attempts = 0
    return Effect.suspend(() => {
      attempts++
      return once
    }).pipe(
      // A serialization failure can arrive as a defect (Model repositories turn SqlError into one with orDie):
      // it is retried all the same, and comes back as the defect it was if the schedule gives up.
      Effect.catchAllDefect((defect) =>
        isRetryable(defect) ? Effect.fail(new RetryableDefect(defect)) : Effect.die(defect)
      ),
      Effect.retry({
        schedule: Schedule.mapInput(schedule, (error: E | TransactionError | RetryableDefect) =>
          classify(error instanceof RetryableDefect ? error.defect : error)
        ),
        while: (error) => isRetryable(error instanceof RetryableDefect ? error.defect : error)
      }),
      Effect.catchAll((error) =>
        error instanceof RetryableDefect
          ? Effect.die(error.defect)
          : Effect.fail(isRetryable(error) ? gaveUp(error, attempts) : error)
      )
    )
  })

/** A retryable failure that reached the retry loop as a defect. */
class RetryableDefect {
  constructor(readonly defect: unknown) {}
}

const gaveUp = (error: unknown, attempts: number): TransactionError => {
  const classified = classify(error)
  return new TransactionError({
    reason: classified.reason,
    message: `${classified.message} Gave up after ${attempts} attempt${attempts === 1 ? "" : "s"}.`,
    sqlState: classified.sqlState,
    constraint: classified.constraint,
    attempts,
    cause: error instanceof TransactionError ? error.cause : error
  })
}

const validSettingName = /^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$/

/** @internal */
export const setLocal = (
  name: string,
  value: string
): Effect.Effect<void, TransactionError | SqlError, Transaction.Current> =>
  validSettingName.test(name)
    ? Effect.flatMap(Current, (current) => {
        const frame = current as Frame
        return frame.tx.dialect.setLocal(frame.connection, name, value)
      })
    : Effect.fail(
        invalidOption(
          `${JSON.stringify(name)} is not a setting name: use an identifier such as "search_path", or a ` +
            'two-part custom name such as "app.tenant_id". Nothing was sent.'
        )
      )

/** @internal */
export const withTransaction = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options = {}
): Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current> | SqlClient.SqlClient> =>
  // `transact` reads the SqlClient from the fiber's context.
  transact(undefined, effect, options) as Effect.Effect<
    A,
    E | TransactionError,
    Exclude<R, Transaction.Current> | SqlClient.SqlClient
  >

// ---------------------------------------------------------------------------
// the SqlClient wrapper
// ---------------------------------------------------------------------------

/** Carries a body's own failure through the wrapper untouched. */
class BodyFailure<E> {
  constructor(readonly error: E) {}
}

/** @internal */
export const wrapClient = (client: SqlClient.SqlClient, sandboxed = false): SqlClient.SqlClient => {
  const withTransaction = <R, E, A>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E | SqlError, R> =>
    Effect.mapError(
      transact(
        client,
        Effect.mapError(self, (error) => new BodyFailure(error)),
        {}
      ),
      (error) => (error instanceof BodyFailure ? error.error : new SqlError({ message: error.message, cause: error }))
    ) as Effect.Effect<A, E | SqlError, R>
  const wrapped: SqlClient.SqlClient = Object.assign(
    function (this: unknown, ...args: Array<unknown>) {
      return (client as unknown as (...args: Array<unknown>) => unknown).apply(this, args)
    } as unknown as SqlClient.SqlClient,
    client,
    { withTransaction, withoutTransforms: () => wrapClient(client.withoutTransforms(), sandboxed) },
    sandboxed ? { reserve: reserveInSandbox, [SandboxedClient]: true } : {}
  )
  ;(wrapped as { safe: SqlClient.SqlClient }).safe = wrapped
  return wrapped
}

/** Marks the SqlClient that TestTransaction hands to the code under test. */
const SandboxedClient = Symbol.for("effect-transaction/TestTransaction/SandboxedClient")

/** @internal */
export const isSandboxed = (client: SqlClient.SqlClient): boolean => SandboxedClient in client

/** In a test, `sql.reserve` hands out the test's connection, as the block that asks for it sees it. */
const reserveInSandbox: Effect.Effect<Connection, SqlError, Scope.Scope> = Effect.withFiberRuntime((fiber) => {
  const current = Context.getOption(fiber.currentContext, Current)
  if (current._tag === "None") {
    return Effect.fail(
      new SqlError({
        message: "TestTransaction refused sql.reserve",
        cause: sandboxError(
          "TestTransaction: sql.reserve was called outside a test. Run the code inside TestTransaction.isolate."
        )
      })
    )
  }
  const frame = current.value as Frame
  return frame.sealed
    ? Effect.fail(new SqlError({ message: "TestTransaction refused sql.reserve", cause: sealedError() }))
    : Effect.succeed(frame.connection)
})

/** @internal */
export const layer: Layer.Layer<SqlClient.SqlClient, never, SqlClient.SqlClient> = Layer.effectContext(
  Effect.gen(function* () {
    const client = yield* SqlClient.SqlClient
    const services = Context.make(SqlClient.SqlClient, wrapClient(client))
    // The driver's own tag (@effect/sql-pg's PgClient) is the same client with more methods: when it is there,
    // its withTransaction goes through the engine too, so that no path opens a transaction behind its back.
    const driver = yield* Effect.serviceOption(PgClientTag)
    return driver._tag === "Some"
      ? Context.add(services, PgClientTag, wrapClient(driver.value))
      : (services as Context.Context<SqlClient.SqlClient>)
  })
) as Layer.Layer<SqlClient.SqlClient, never, SqlClient.SqlClient>

/** @effect/sql-pg's client tag, by its key, so that the engine does not import the driver. */
const PgClientTag = Context.GenericTag<SqlClient.SqlClient>("@effect/sql-pg/PgClient")

const INT64_MIN = -(2n ** 63n)
const INT64_MAX = 2n ** 63n - 1n

/** The key as the database takes it, or undefined when it is not a 64-bit integer or a string. */
const advisoryKey = (key: number | bigint | string): bigint | string | undefined => {
  if (typeof key === "string") return key
  if (typeof key === "number" && !Number.isSafeInteger(key)) return undefined
  const big = BigInt(key)
  return big >= INT64_MIN && big <= INT64_MAX ? big : undefined
}

/** @internal */
export const advisoryLock = (
  key: number | bigint | string,
  wait: boolean
): Effect.Effect<boolean, TransactionError | SqlError, Transaction.Current> => {
  const checked = advisoryKey(key)
  if (checked === undefined) {
    return Effect.fail(
      invalidOption(
        `${String(key)} is not an advisory lock key: use a string, or an integer between -2^63 and 2^63 - 1 ` +
          "(a bigint beyond 2^53). Nothing was sent."
      )
    )
  }
  return Effect.flatMap(Current, (current) => {
    const frame = current as Frame
    return frame.tx.dialect.advisoryLock(frame.connection, checked, wait)
  })
}

// ---------------------------------------------------------------------------
// hooks
// ---------------------------------------------------------------------------

/** An `afterCommit` or `afterRollback` effect, bound to the context it was registered in. */
interface Hook {
  readonly kind: "afterCommit" | "afterRollback"
  readonly effect: Effect.Effect<unknown, unknown, unknown>
  /** The services of the place it was registered in, without the transaction's own. */
  readonly context: Context.Context<unknown>
  /** When it was registered: hooks run in this order, whichever fiber or block registered them. */
  readonly order: number
}

let nextHookOrder = 0

const logHookFailure = (failure: Transaction.HookFailure): Effect.Effect<void> =>
  Effect.logError(failure.message, failure.cause)

/** @internal */
export const HookFailureHandler = Context.Reference<Transaction.HookFailureHandler>()(
  "effect-transaction/Transaction/HookFailureHandler",
  { defaultValue: (): ((failure: Transaction.HookFailure) => Effect.Effect<void>) => logHookFailure }
)

/** A hook captured instead of run, by TestTransaction.captureHooks. */
export interface CapturedHook {
  readonly kind: "afterCommit" | "afterRollback"
  readonly transactionId: number
  readonly effect: Effect.Effect<unknown, unknown>
}

/** @internal Where TestTransaction.captureHooks collects hooks; absent, hooks run. */
export class HookCapture extends Context.Tag("effect-transaction/TestTransaction/HookCapture")<
  HookCapture,
  Array<CapturedHook>
>() {}

/** @internal */
export const registerHook = <X, E, R>(
  kind: Hook["kind"],
  effect: Effect.Effect<X, E, R>
): Effect.Effect<void, TransactionError, R | Transaction.Current> =>
  Effect.withFiberRuntime((fiber) => {
    const context = fiber.currentContext as Context.Context<R | Transaction.Current>
    const frame = Context.get(context, Current) as Frame
    if (!frame.open) return Effect.fail(closedTransactionError(frame, `An ${kind} hook was registered`))
    if (frame.tx.foreign) {
      return Effect.fail(
        new TransactionError({
          reason: "Unsupported",
          message:
            `An ${kind} hook was registered inside a transaction opened by the SqlClient's own withTransaction, ` +
            "whose end this library cannot see, so the hook could never run. Provide Transaction.layer so that " +
            "sql.withTransaction goes through this library, or open the transaction with Transaction.withTransaction."
        })
      )
    }
    if (frame.sealed) return Effect.fail(sealedError())
    if (frame.test) {
      return Effect.fail(
        sandboxError(
          `TestTransaction: an ${kind} hook was registered by the test itself, outside any transaction of the ` +
            "code under test, where it could never run. Register it inside Transaction.withTransaction (or " +
            "Transaction.fn) in the test, as the code under test does."
        )
      )
    }
    // The hook runs after the transaction, outside it: with the caller's services, without the transaction's.
    const outside = Context.omit(Current, SqlClient.TransactionConnection)(context) as Context.Context<unknown>
    frame.hooks.push({ kind, effect, context: outside, order: nextHookOrder++ })
    return Effect.void
  })

/**
 * Runs the hooks of an ended outermost block that are due after its outcome, in registration order. In a test
 * transaction the block was a savepoint, and its hooks run in the block around it (the test's, or the caller's of
 * requiresNew), or are captured by TestTransaction.captureHooks.
 */
const runHooks = (frame: Frame, outcome: Tx["outcome"]): Effect.Effect<void> => {
  const tx = frame.tx
  if (outcome === undefined) return Effect.void
  if (outcome === "unknown") {
    return Effect.logWarning(
      `The hooks of transaction ${tx.id} did not run: the connection failed during COMMIT, so whether it ` +
        "committed is unknown."
    )
  }
  const kind = outcome === "committed" ? "afterCommit" : "afterRollback"
  const due = frame.hooks.filter((hook) => hook.kind === kind).sort((a, b) => a.order - b.order)
  if (due.length === 0) return Effect.void
  const around = tx.sandbox ? frame.parent : undefined
  const bound = (hook: Hook): Effect.Effect<unknown, unknown> =>
    Effect.provide(
      hook.effect,
      around === undefined
        ? hook.context
        : Context.add(Context.add(hook.context, Current, around), SqlClient.TransactionConnection, [
            around.connection,
            around.depth
          ] as const)
    ) as Effect.Effect<unknown, unknown>
  return Effect.flatMap(Effect.serviceOption(HookCapture), (capture) => {
    if (tx.sandbox && capture._tag === "Some") {
      for (const hook of due) capture.value.push({ kind, transactionId: tx.id, effect: bound(hook) })
      return Effect.void
    }
    return Effect.flatMap(HookFailureHandler, (handler) =>
      Effect.forEach(
        due,
        (hook, index) =>
          Effect.catchAllCause(bound(hook), (cause) =>
            Effect.catchAllCause(
              handler({
                kind,
                transactionId: tx.id,
                index,
                cause,
                message:
                  `${kind} hook ${index + 1} of ${due.length} of transaction ${tx.id} failed. The transaction ` +
                  `${kind === "afterCommit" ? "had committed and stays committed" : "had been rolled back"}; ` +
                  "the other hooks still ran. Handle the hook's errors inside it, or provide " +
                  "Transaction.HookFailureHandler to report them."
              }),
              (handlerCause) => Effect.logError("Transaction.HookFailureHandler failed", handlerCause)
            )
          ),
        { discard: true }
      )
    )
  })
}

/**
 * In a test transaction, the code under test's outermost transaction: a block nested in the test's block (or, for
 * requiresNew, in the caller's block), which takes the options of an outermost transaction. Isolation, read-only,
 * deferrable and the SET LOCAL timeouts cannot change inside the test transaction; they are recorded (Current
 * reports them) and not applied. `timeout` and `retry` apply to the block.
 */
const virtualOutermost = <A, E, R>(
  parent: Frame,
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options
): Effect.Effect<A, E | TransactionError, R> => {
  const declared: Characteristics = {
    isolation: options.isolation,
    readOnly: options.readOnly,
    deferrable: options.deferrable
  }
  return Effect.suspend(() => {
    const limit = limitOf(options)
    let last: Frame | undefined
    const once = Effect.uninterruptibleMask((restore) => {
      last = undefined
      if (limit !== undefined && limit.deadline <= Date.now()) {
        return Effect.fail(timeoutError("The transaction", limit.timeoutMillis, "no time was left for another attempt"))
      }
      return Effect.flatMap(openNested(parent, restore), (frame) => {
        last = frame
        frame.declared = declared
        const body = bounded(restore(provideFrame(effect, frame)), limit, frame)
        return Effect.flatMap(Effect.exit(body), (exit) => finishNested(frame, exit))
      })
    })
    return withHooksOfLast(attempts(once, options, limit), () => last)
  })
}

// ---------------------------------------------------------------------------
// propagation
// ---------------------------------------------------------------------------

/** @internal */
export const defaultRequiresNewAcquireTimeout = Duration.seconds(5)

/** @internal */
export const requiresNew = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  options: Transaction.Options = {}
): Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current> | SqlClient.SqlClient> =>
  Effect.withFiberRuntime((fiber) => {
    const all: Transaction.Options = { acquireTimeout: defaultRequiresNewAcquireTimeout, ...options }
    const invalid = validateOptions(all)
    if (invalid !== undefined) return Effect.fail(invalid)
    const context = fiber.currentContext
    const current = Context.getOption(context, Current)
    if (current._tag === "Some" && (current.value as Frame).tx.sandbox) {
      // A test transaction has one connection: the new transaction is a block of the caller's, checked and
      // running its hooks at its end, but undone if the caller's block rolls back.
      const caller = current.value as Frame
      return caller.sealed ? Effect.fail(sealedError()) : virtualOutermost(caller, effect, options)
    }
    const holding = Context.getOption(context, SqlClient.TransactionConnection)._tag === "Some"
    const client = Context.unsafeGet(context, SqlClient.SqlClient)
    // The new transaction must not see the caller's: its statements go to its own connection.
    return Effect.provide(
      outermostRetrying(client, context, effect, all, holding),
      Context.omit(Current, SqlClient.TransactionConnection)(context) as Context.Context<R>
    )
  }) as Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current> | SqlClient.SqlClient>

// ---------------------------------------------------------------------------
// accessors
// ---------------------------------------------------------------------------

/** @internal */
export const currentOption: Effect.Effect<Option.Option<Transaction.Transaction>> = Effect.serviceOption(Current)

/** @internal */
export const isActive: Effect.Effect<boolean> = Effect.map(
  currentOption,
  (current) => current._tag === "Some" && current.value.isOpen
)

// ---------------------------------------------------------------------------
// the manual handle
// ---------------------------------------------------------------------------

const endedError = (frame: Frame, what: string) =>
  new TransactionError({
    reason: "TransactionClosed",
    message:
      `${what} on ${frame.describe()}, which has already been committed or rolled back. ` +
      "Call commit or rollback once, and run work before it; open a new one with Transaction.begin."
  })

/** @internal The options of a transaction that does not run one effect: no timeout, no retry. */
export const checkBeginOptions = (options: Transaction.BeginOptions, who: string): TransactionError | undefined => {
  const given = options as Transaction.Options
  if (given.timeout !== undefined || (given.retry !== undefined && given.retry !== false)) {
    return invalidOption(
      `${who} takes no timeout or retry option: it cannot run your work again or cut it short. Use ` +
        "withTransaction for those, or bound the scope with Effect.timeout."
    )
  }
  return validateOptions(options)
}

/** @internal */
export const begin = (
  options: Transaction.BeginOptions = {}
): Effect.Effect<Transaction.Handle, TransactionError, SqlClient.SqlClient | Scope.Scope> =>
  Effect.withFiberRuntime((fiber) => {
    const invalid = checkBeginOptions(options, "Transaction.begin")
    if (invalid !== undefined) return Effect.fail(invalid)
    const context = fiber.currentContext
    const userScope = Context.unsafeGet(context, Scope.Scope)
    const parent = parentOf(context, undefined)
    if (parent !== undefined) {
      if (parent.sealed) return Effect.fail(sealedError())
      // In a test, a handle opened by the test's own code stands for an outermost transaction.
      const virtual = parent.test
      const incompatible = virtual ? undefined : checkNestedOptions(parent, options)
      if (incompatible !== undefined) return Effect.fail(incompatible)
      return Effect.uninterruptibleMask((restore) =>
        Effect.flatMap(openNested(parent, restore), (root) => {
          root.openedBy = fiber.id()
          if (virtual) {
            root.declared = { isolation: options.isolation, readOnly: options.readOnly, deferrable: options.deferrable }
          }
          return makeHandle(root, userScope, undefined)
        })
      )
    }
    const client = Context.unsafeGet(context, SqlClient.SqlClient)
    return Effect.uninterruptibleMask((restore) =>
      Effect.flatMap(Scope.make(), (connectionScope) =>
        open(client, Context.get(context, CurrentDialect), options, connectionScope, false, restore).pipe(
          Effect.onError((cause) => Scope.close(connectionScope, Exit.failCause(cause))),
          Effect.flatMap((root) => makeHandle(root, userScope, connectionScope))
        )
      )
    )
  })

const makeHandle = (
  root: Frame,
  userScope: Scope.Scope,
  connectionScope: Scope.CloseableScope | undefined
): Effect.Effect<Transaction.Handle> => {
  /** The handle's own blocks: its root and the savepoints still open, outermost first. */
  const frames: Array<Frame> = [root]
  /** Every savepoint the handle has taken, open or not. */
  const owned = new Set<Frame>()
  let ended = false
  const live = () => !ended && root.open
  const top = () => {
    while (!frames[frames.length - 1]!.open && frames.length > 1) frames.pop()
    return frames[frames.length - 1]!
  }

  const finish = (outcome: "commit" | "rollback"): Effect.Effect<void, TransactionError> =>
    Effect.suspend(() => {
      if (!live()) return Effect.fail(endedError(root, `${outcome} was called`))
      ended = true
      const exit = outcome === "commit" ? Exit.void : Exit.failCause(Cause.empty)
      const ending =
        connectionScope === undefined
          ? root.tx.foreign
            ? Effect.ensuring(finishNested(root, exit, "keep"), flushForeign(root.parent!))
            : finishNested(root, exit, "keep")
          : Effect.onExit(finishOutermost(root, exit, undefined, "keep"), (result) =>
              closeConnection(root.tx, connectionScope, result)
            )
      // A rollback asked for ends in an empty failure: it is the expected outcome.
      return Effect.catchAllCause(
        withHooksOfLast(Effect.uninterruptible(ending), () => root),
        (cause) => (Cause.isEmpty(cause) ? Effect.void : Effect.failCause(cause))
      )
    })

  const savepointOf = (savepoint: Transaction.Savepoint, what: string): Frame | TransactionError => {
    const frame = savepoint as Frame
    if (!owned.has(frame)) {
      return invalidOption(`${what} was given a savepoint that does not belong to this handle; nothing was sent.`)
    }
    if (!frame.open || !live()) {
      return new TransactionError({
        reason: "TransactionClosed",
        message:
          `${what} was given savepoint ${frame.name}, which has already been released or rolled back, or whose ` +
          "transaction has ended. Take a new savepoint."
      })
    }
    return frame
  }

  const rollbackTo = (savepoint: Transaction.Savepoint): Effect.Effect<void, TransactionError> =>
    Effect.uninterruptibleMask((restore) => {
      const frame = savepointOf(savepoint, "rollbackTo")
      if (frame instanceof TransactionError) return Effect.fail(frame)
      const tx = frame.tx
      return tx.owned.withConnection(frame.endClaim, restore, () => {
        if (!frame.open) return Effect.fail(endedError(frame, "rollbackTo was called"))
        for (const block of tx.stack.splice(tx.stack.indexOf(frame) + 1)) {
          block.open = false
          block.abandoned = true
        }
        // A release still pending belongs to a deeper savepoint, which rolling back destroys.
        tx.pendingRelease = undefined
        return Effect.matchCauseEffect(run(tx.conn, tx.dialect.rewind(frame.savepoint!)), {
          onFailure: (cause) => {
            frame.aborted = true
            return controlError(
              "SavepointFailed",
              `ROLLBACK TO SAVEPOINT ${frame.name}`,
              "The transaction cannot go on: roll it back.",
              Cause.squash(cause)
            )
          },
          onSuccess: () => {
            frame.aborted = false
            frame.hooks = []
            return Effect.void
          }
        })
      })
    })

  const releaseSavepoint = (savepoint: Transaction.Savepoint): Effect.Effect<void, TransactionError> =>
    Effect.uninterruptible(
      Effect.suspend(() => {
        const frame = savepointOf(savepoint, "release")
        return frame instanceof TransactionError ? Effect.fail(frame) : finishNested(frame, Exit.void, "keep")
      })
    )

  const handle: Transaction.Handle = {
    transaction: root,
    run: <A, E, R>(effect: Effect.Effect<A, E, R>) =>
      Effect.suspend(
        (): Effect.Effect<A, E | TransactionError, R> =>
          live() ? provideFrame(effect, top()) : Effect.fail(endedError(root, "run was called"))
      ) as Effect.Effect<A, E | TransactionError, Exclude<R, Transaction.Current>>,
    commit: finish("commit"),
    rollback: finish("rollback"),
    savepoint: Effect.uninterruptibleMask((restore) => {
      if (!live()) return Effect.fail(endedError(root, "savepoint was called"))
      return Effect.map(
        Effect.zip(openNested(top(), restore), Effect.fiberId),
        ([frame, opener]): Transaction.Savepoint => {
          frame.openedBy = opener
          frames.push(frame)
          owned.add(frame)
          return frame
        }
      )
    }),
    rollbackTo,
    release: releaseSavepoint
  }
  // Closing the scope without commit or rollback rolls back.
  return Effect.as(
    Scope.addFinalizer(
      userScope,
      Effect.suspend(() =>
        live()
          ? Effect.catchAllCause(finish("rollback"), (cause) =>
              Effect.logError(`Rolling back ${root.describe()} when its scope closed failed`, cause)
            )
          : Effect.void
      )
    ),
    handle
  )
}
