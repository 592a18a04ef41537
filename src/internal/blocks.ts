/**
 * The blocks of one transaction: the transaction state (`Tx`, one per connection, also for a transaction other
 * code opened), the stack of open blocks (`Frame`, the outermost first), savepoint names and deferred RELEASE,
 * abort tracking, the guarded connection every statement of a block runs on (which block may use the connection
 * now is the policy this file gives connection.ts), and the opening and ending of nested blocks. The outermost
 * block's lifecycle is outermost.ts's; the hooks that blocks collect are hooks.ts's.
 */
import * as SqlClient from "@effect/sql/SqlClient"
import type { Connection } from "@effect/sql/SqlConnection"
import { SqlError } from "@effect/sql/SqlError"
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Equal from "effect/Equal"
import * as Exit from "effect/Exit"
import type * as FiberId from "effect/FiberId"
import type * as Scope from "effect/Scope"
import * as Stream from "effect/Stream"
import * as Tracer from "effect/Tracer"
import type * as Transaction from "../Transaction.js"
import { databaseInfo, TransactionError } from "../TransactionError.js"
import { type Characteristics, CurrentDialect, type Dialect } from "./dialect.js"
import { Owned, type Policy, type Prepared } from "./connection.js"
import type { Hook } from "./hooks.js"
import { deadlockTimeoutMillisOf } from "./options.js"

/** @internal */
export const Current = Context.GenericTag<Transaction.Current, Transaction.Transaction>(
  "effect-transaction/Transaction/Current"
)

let nextTransactionId = 1

/** A new transaction id: for each transaction, and in a test for each of the code's own outermost ones. */
const newTransactionId = () => nextTransactionId++

/**
 * In a test transaction, makes `frame` stand for an outermost transaction of the code under test, opened with
 * `options`: it reads as a transaction of its own (depth 0, an id of its own, the characteristics asked for) and
 * ends with a virtual commit.
 */
export const declareOutermost = (frame: Frame, options: Transaction.BeginOptions): void => {
  frame.declared = { isolation: options.isolation, readOnly: options.readOnly, deferrable: options.deferrable }
  frame.virtualId = newTransactionId()
  frame.deadlockTimeoutMillis = deadlockTimeoutMillisOf(options)
}

/** What a fiber asks the connection for: a statement or a new nested block of `frame`, or the end of a block. */
interface Claim {
  readonly frame: Frame
  /**
   * A statement or a new nested block needs its block innermost; ending a block only needs a free connection, and
   * so does a test's own statement ("test"), which, unlike the end of a block, may give up (`deadlockTimeout`).
   */
  readonly kind: "statement" | "end" | "test"
  /** The `deadlockTimeout` of this wait, when it is not its block's (a test's code opening its own transaction). */
  readonly deadlockTimeoutMillis?: number | undefined
}

/**
 * A statement may run only in the innermost open block, and never once its block has closed; one kept out by a
 * block nested deeper for longer than its transaction's `deadlockTimeout` gives up (`WouldDeadlock`).
 */
class BlockPolicy implements Policy<Claim> {
  constructor(private readonly stack: ReadonlyArray<Frame>) {}
  mayUse(claim: Claim) {
    return claim.kind !== "statement" || this.stack[this.stack.length - 1] === claim.frame
  }
  refused(claim: Claim) {
    return claim.kind === "statement" && !claim.frame.open
  }
  keptOutBy(claim: Claim) {
    const top = this.stack[this.stack.length - 1]
    return claim.kind !== "statement" || top === claim.frame ? undefined : top
  }
  // The end of a block never gives up: it must run, and nothing it waits for can wait for it.
  stuckAfterMillis(claim: Claim) {
    if (claim.kind === "end") return undefined
    const millis = claim.deadlockTimeoutMillis ?? deadlockTimeoutOf(claim.frame)
    return Number.isFinite(millis) ? millis : undefined
  }
}

/** How long a statement or nested block waits, by default, while a block another fiber opened holds the connection. */
const DEFAULT_DEADLOCK_TIMEOUT_MILLIS = 60_000

/** The `deadlockTimeout` of the transaction `frame` belongs to (in a test, of the code's own outermost block). */
const deadlockTimeoutOf = (frame: Frame): number => {
  for (let block: Frame | undefined = frame; block !== undefined; block = block.parent) {
    if (block.deadlockTimeoutMillis !== undefined) return block.deadlockTimeoutMillis
  }
  return DEFAULT_DEADLOCK_TIMEOUT_MILLIS
}

/**
 * One outermost transaction. Its connection carries one statement at a time (`busy`), and only for the innermost
 * open block (the top of `stack`): a nested block owns the connection until it ends, so the fibers of outer or
 * sibling blocks wait, and the result is as if the blocks had run one after another.
 */
export interface Tx {
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
  /** What kind of transaction this is: the engine's own, other code's, or a test's. */
  readonly mode: Mode
  /** How the outermost block ended, once it has: which hooks run. */
  outcome: "committed" | "rolledBack" | "unknown" | undefined
  /** Why the transaction ended behind the engine's back (a test's, ended by a statement of the code), if it did. */
  lost: string | undefined
  /** The transaction's `sql.transaction` span, when spans are on: its events are recorded there. */
  span: Tracer.Span | undefined
}

/**
 * What kind of transaction a `Tx` is, as a value the engine is given instead of flags it tests. The engine's own
 * transaction and one other code opened differ in what runs after a block nested in it and whether hooks can be
 * registered; a test transaction of TestTransaction (the sandbox) refuses control statements, makes the code's
 * outermost transactions virtual (blocks nested in the test's, with a virtual commit), and runs their hooks in the
 * block around them, where TestTransaction.captureHooks can capture them.
 */
export interface Mode {
  readonly name: "own" | "foreign" | "sandbox"
  /** Why `sql` may not be sent in `frame`, if it may not. */
  readonly refuse: (frame: Frame, sql: string) => SqlError | undefined
  /** The message of a TransactionClosed error: `what` was done on `frame` after it ended, and the way out. */
  readonly closed: (frame: Frame, what: string) => string
  /** Why an `afterCommit`/`afterRollback` hook cannot be registered in this transaction, if it cannot. */
  readonly refuseHook: (kind: string) => TransactionError | undefined
  /** Whether a transaction the code opens inside it is a virtual one, and its hooks run in the block around it. */
  readonly virtual: boolean
  /** What runs once a block nested in `root` has ended. */
  readonly afterNested: ((root: Frame) => Effect.Effect<void>) | undefined
  /** Checks the session after a statement `sql` of `frame` has ended: an error if the transaction ended with it. */
  readonly verify: ((frame: Frame, sql: string) => SqlError | undefined) | undefined
}

export const refuseNothing = () => undefined

/** A transaction this engine opened. */
export const ownMode: Mode = {
  name: "own",
  refuse: refuseNothing,
  closed: (frame, what) =>
    `${what} on ${frame.describe()} after it ended. ` +
    "A fiber forked inside a transaction outlived it: join or interrupt such fibers before the block returns, " +
    "or run the work in its own transaction (Transaction.requiresNew opens one from such a fiber).",
  refuseHook: refuseNothing,
  virtual: false,
  afterNested: undefined,
  verify: undefined
}

/** A transaction other code opened (the SqlClient's own withTransaction) that a block of ours nested in. */
const foreignMode: Mode = {
  ...ownMode,
  name: "foreign",
  refuseHook: (kind) =>
    new TransactionError({
      reason: "Unsupported",
      message:
        `An ${kind} hook was registered inside a transaction opened by the SqlClient's own withTransaction, ` +
        "whose end this library cannot see, so the hook could never run. Provide Transaction.layer so that " +
        "sql.withTransaction goes through this library, or open the transaction with Transaction.withTransaction."
    }),
  // Nothing of ours would send a release still pending: the transaction's end is not ours.
  afterNested: (root) => flushForeign(root)
}

export const makeTx = (
  client: SqlClient.SqlClient,
  conn: Connection,
  dialect: Dialect,
  characteristics: Characteristics,
  mode: Mode = ownMode
): Tx => {
  const stack: Array<Frame> = []
  return {
    id: newTransactionId(),
    client,
    conn,
    dialect,
    characteristics,
    stack,
    owned: new Owned(conn, dialect, new BlockPolicy(stack)),
    savepoints: 0,
    pendingRelease: undefined,
    mode,
    outcome: undefined,
    lost: undefined,
    span: undefined
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
  /** The `deadlockTimeout` option of the transaction this block stands for (outermost, or a test's virtual one). */
  deadlockTimeoutMillis: number | undefined = undefined
  /** The fiber that opened the block with the manual handle: only a call on the handle ends it. */
  openedBy: FiberId.FiberId | undefined = undefined
  /** In a test transaction: the id the code's outermost transaction reads, one of its own as in production. */
  virtualId = 0
  /** How a block with `declared` characteristics ended: its virtual commit or rollback. */
  outcome: "committed" | "rolledBack" | undefined = undefined
  /** Why the block could not be opened: its statements fail with this, and its end sends nothing. */
  openFailed: TransactionError | undefined = undefined
  readonly connection: Connection
  readonly statementClaim: Claim = { frame: this, kind: "statement" }
  readonly endClaim: Claim = { frame: this, kind: "end" }

  constructor(
    readonly tx: Tx,
    readonly parent: Frame | undefined,
    /** How deep the block is on its connection: 0 for the transaction the engine (or a test) opened. */
    readonly level: number,
    readonly savepoint: string | undefined,
    /**
     * The statements that open the block (BEGIN, SAVEPOINT) until they have been sent: they travel with the first
     * statement that runs in it, so a block that runs none sends nothing. Sent blocks are the bottom of the stack.
     */
    public opening: ReadonlyArray<string> | undefined
  ) {
    this.connection = new GuardedConnection(this)
  }

  /**
   * The block as the code in it sees it: in a test, the code's own outermost transaction reads as depth 0 and its
   * own id, as in production, where the test's blocks around it would not exist.
   */
  private get declaredRoot(): Frame | undefined {
    if (!this.tx.mode.virtual) return undefined
    for (let frame: Frame | undefined = this; frame !== undefined; frame = frame.parent) {
      if (frame.declared !== undefined) return frame
    }
    return undefined
  }
  get id() {
    const root = this.declaredRoot
    return root === undefined ? this.tx.id : root.virtualId
  }
  get depth() {
    const root = this.declaredRoot
    return root === undefined ? this.level : this.level - root.level
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
      ? `transaction ${this.id}`
      : `nested block ${this.savepoint} of transaction ${this.id}`
  }
}

/** The error of a block, or a test, whose test transaction a statement ended behind the engine's back. */
export const lostTransactionError = (frame: Frame) =>
  new TransactionError({ reason: "Unsupported", message: `TestTransaction: ${frame.tx.lost}` })

export const closedTransactionError = (frame: Frame, what: string) =>
  new TransactionError({
    reason: "TransactionClosed",
    message:
      frame.tx.lost === undefined
        ? frame.tx.mode.closed(frame, what)
        : `${what} on ${frame.describe()}, which had ended: ${frame.tx.lost}`
  })

const closedError = (frame: Frame) => {
  const cause = closedTransactionError(frame, "A statement was run")
  return new SqlError({
    message: frame.tx.lost === undefined ? `${frame.describe()} has already ended` : cause.message,
    cause
  })
}

export const innermost = (tx: Tx) => tx.stack[tx.stack.length - 1]

/** Holding the connection is uninterruptible unless a caller's `restore` says otherwise (the end of a block). */
export const held: Restore = (effect) => effect

type Restore = <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>

/** Marks the block aborted; the first statement that did it is kept for the error its end reports. */
const abort = (frame: Frame, sql?: string, cause?: Cause.Cause<unknown>): void => {
  frame.aborted = true
  if (sql !== undefined && frame.abortedBy === undefined && cause !== undefined && !Cause.isInterruptedOnly(cause)) {
    frame.abortedBy = { sql, error: Cause.squash(cause) }
  }
}

const markAborted = (frame: Frame, sql?: string, cause?: Cause.Cause<unknown>) =>
  Effect.sync(() => abort(frame, sql, cause))

/**
 * What must precede the next statement on the connection: a deferred RELEASE, then the opening statements of the
 * blocks not sent yet, outermost first; `ends[i]` counts the statements up to the end of `blocks[i]`'s opening.
 */
interface Pending {
  readonly statements: Array<string>
  readonly blocks: Array<Frame>
  readonly ends: Array<number>
  readonly released: boolean
}

/** The statements still to send before the next one, if any; the error of a block that could not be opened. */
const pendingOf = (tx: Tx): Pending | TransactionError | undefined => {
  const stack = tx.stack
  let first = stack.length
  while (first > 0 && stack[first - 1]!.opening !== undefined) first--
  if (first === stack.length && tx.pendingRelease === undefined) return undefined
  const statements: Array<string> = []
  if (tx.pendingRelease !== undefined) statements.push(tx.dialect.release(tx.pendingRelease))
  const blocks: Array<Frame> = []
  const ends: Array<number> = []
  for (let i = first; i < stack.length; i++) {
    const block = stack[i]!
    if (block.openFailed !== undefined) return block.openFailed
    for (const statement of block.opening!) statements.push(statement)
    blocks.push(block)
    ends.push(statements.length)
  }
  return { statements, blocks, ends, released: tx.pendingRelease !== undefined }
}

/**
 * Records that the database completed `completed` of `pending`'s statements (all of them unless a failure says
 * otherwise). When one failed, the blocks it would have opened stay unopened: the outermost block's failure is a
 * BeginFailed (the connection is closed at the end), a nested one's a SavepointFailed, and the block the failure
 * happened in is aborted. Returns the error of the block that could not be opened, if any.
 */
const settlePending = (
  tx: Tx,
  pending: Pending,
  completed: number,
  cause?: Cause.Cause<unknown>
): TransactionError | undefined => {
  if (pending.released) tx.pendingRelease = undefined
  let opened = 0
  while (opened < pending.blocks.length && completed >= pending.ends[opened]!) {
    pending.blocks[opened]!.opening = undefined
    opened++
  }
  if (completed >= pending.statements.length || cause === undefined) return undefined
  const sql = pending.statements[completed]!
  const error = Cause.squash(cause)
  const failed = pending.blocks[opened]
  if (failed !== undefined && failed.parent === undefined) {
    tx.owned.broken = true
    failed.openFailed = controlError(
      "BeginFailed",
      sql,
      "No transaction was opened, no statement of it ran, and the connection was closed.",
      error
    )
    return failed.openFailed
  }
  const inside =
    opened > 0
      ? pending.blocks[opened - 1]
      : pending.blocks.length > 0
        ? tx.stack[tx.stack.indexOf(pending.blocks[0]!) - 1]
        : innermost(tx)
  if (inside !== undefined) {
    inside.aborted = true
    if (inside.abortedBy === undefined && !Cause.isInterruptedOnly(cause)) inside.abortedBy = { sql, error }
  }
  if (failed === undefined) return undefined
  failed.openFailed = controlError(
    "SavepointFailed",
    `SAVEPOINT for ${failed.describe()}`,
    "No statement of the nested block ran; the block around it cannot go on and will be rolled back.",
    error
  )
  return failed.openFailed
}

/** The error a statement fails with when the block it runs in could not be opened. */
const unopenedError = (error: TransactionError) => new SqlError({ message: error.message, cause: error })

/**
 * Sends what is pending, and `extra` after it, in a round trip of their own. Without a connection the engine took
 * over, this is how a block's opening and a deferred RELEASE reach the database before a statement.
 */
const sendPending = (tx: Tx, extra?: string): Effect.Effect<void, SqlError> => {
  const pending = pendingOf(tx)
  if (pending instanceof TransactionError) return Effect.fail(unopenedError(pending))
  if (pending === undefined) return extra === undefined ? Effect.void : run(tx.conn, extra)
  if (extra !== undefined) pending.statements.push(extra)
  return Effect.matchCauseEffect(run(tx.conn, tx.dialect.batch(pending.statements)), {
    // Which of them ran is not known: as if none had, and the block they ran in is rolled back.
    onFailure: (cause) => {
      const failed = settlePending(tx, pending, 0, cause)
      return Effect.failCause(
        failed === undefined || Cause.isInterruptedOnly(cause) ? cause : Cause.fail(unopenedError(failed))
      )
    },
    onSuccess: () => {
      settlePending(tx, pending, pending.statements.length)
      return Effect.void
    }
  })
}

/**
 * Runs a statement of the innermost block with what is pending ahead of it: in its round trip on a connection the
 * engine took over, in one of their own before it otherwise.
 */
const runWithPending = <A>(
  frame: Frame,
  sql: string,
  run: (sql: string) => Effect.Effect<A, SqlError>,
  restore: Restore
): Effect.Effect<A, SqlError> =>
  Effect.suspend(() => {
    const tx = frame.tx
    const pending = pendingOf(tx)
    if (pending === undefined) return tx.owned.execute(run(sql), restore)
    if (pending instanceof TransactionError) return Effect.fail(unopenedError(pending))
    const carried = tx.owned.carry(pending.statements, sql)
    if (carried === undefined) {
      return Effect.zipRight(
        sendPending(tx),
        Effect.suspend(() => tx.owned.execute(run(sql), restore))
      )
    }
    return Effect.matchCauseEffect(tx.owned.execute(run(carried.sql), restore), {
      onFailure: (cause) => {
        const failed = settlePending(tx, pending, carried.completed(), cause)
        return Effect.failCause(
          failed === undefined || Cause.isInterrupted(cause) ? cause : Cause.fail(unopenedError(failed))
        )
      },
      onSuccess: (value) => {
        settlePending(tx, pending, pending.statements.length)
        return Effect.succeed(value)
      }
    })
  })

/**
 * A statement of the innermost block on a connection the engine took over, with what is pending carried ahead of
 * it, and the bookkeeping of its end: `runHeld` for `Owned.executeNow`.
 */
const prepareStatement = <A>(
  frame: Frame,
  sql: string,
  run: (sql: string) => Effect.Effect<A, SqlError>
): Prepared<A> => {
  const tx = frame.tx
  const pending = frame.opening === undefined && tx.pendingRelease === undefined ? undefined : pendingOf(tx)
  if (pending === undefined) return { statement: run(sql), ended: (exit) => abortedBy(frame, sql, exit) }
  if (pending instanceof TransactionError) {
    return { statement: Effect.fail(unopenedError(pending)), ended: (exit) => abortedBy(frame, sql, exit) }
  }
  const carried = tx.owned.carry(pending.statements, sql)!
  return {
    statement: run(carried.sql),
    ended: (exit) => {
      if (Exit.isSuccess(exit)) {
        settlePending(tx, pending, pending.statements.length)
        return exit
      }
      const failed = settlePending(tx, pending, carried.completed(), exit.cause)
      return abortedBy(
        frame,
        sql,
        failed === undefined || Cause.isInterrupted(exit.cause) ? exit : Exit.fail(unopenedError(failed))
      )
    }
  }
}

/** `exit`, having aborted the block if it is a failure. */
const abortedBy = <A, E>(frame: Frame, sql: string, exit: Exit.Exit<A, E>): Exit.Exit<A, E> => {
  if (Exit.isFailure(exit)) abort(frame, sql, exit.cause)
  return exit
}

/** Runs a statement of `frame`, holding the connection; a failed or interrupted one aborts the block. */
const runHeld = <A>(
  frame: Frame,
  sql: string,
  run: (sql: string) => Effect.Effect<A, SqlError>,
  restore: Restore
): Effect.Effect<A, SqlError> => {
  const tx = frame.tx
  // The innermost block sent means every block is: only a deferred RELEASE can be pending.
  const statement =
    frame.opening === undefined && tx.pendingRelease === undefined
      ? tx.owned.execute(run(sql), restore)
      : runWithPending(frame, sql, run, restore)
  const verify = tx.mode.verify
  return Effect.tapErrorCause(
    verify === undefined ? statement : verified(statement, () => verify(frame, sql)),
    (cause) => markAborted(frame, sql, cause)
  )
}

/** `statement`, then the mode's check of the session, whichever way the statement ended. */
const verified = <A>(
  statement: Effect.Effect<A, SqlError>,
  check: () => SqlError | undefined
): Effect.Effect<A, SqlError> =>
  Effect.flatMap(Effect.exit(statement), (exit) => {
    const lost = check()
    return lost === undefined ? exit : Effect.fail(lost)
  })

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
  sql: string,
  statement: () => Effect.Effect<A, SqlError>,
  restore: Restore
): Effect.Effect<A, SqlError> => {
  const tx = frame.tx
  const name = `etx_${++tx.savepoints}`
  let opened = false
  const executed = Effect.zipRight(
    sendPending(tx, tx.dialect.savepoint(name)),
    Effect.suspend(() => {
      opened = true
      return tx.owned.execute(statement(), restore)
    })
  )
  const verify = tx.mode.verify
  return Effect.matchCauseEffect(verify === undefined ? executed : verified(executed, () => verify(frame, sql)), {
    onFailure: (cause) =>
      opened && tx.lost === undefined
        ? Effect.zipRight(undoStatement(frame, name), Effect.failCause(cause))
        : Effect.failCause(cause),
    onSuccess: (value) => {
      tx.pendingRelease = name
      return Effect.succeed(value)
    }
  })
}

const undoStatement = (frame: Frame, name: string) =>
  Effect.catchAllCause(run(frame.tx.conn, frame.tx.dialect.rollbackTo(name)), () => markAborted(frame))

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

/**
 * A wait for the connection that outlasted the transaction's `deadlockTimeout` while a deeper block held it: by then
 * almost always a cycle the engine cannot see (the block's fiber waits for this one, directly or through a lock).
 */
const stuckError = (frame: Frame, what: string, millis: number | undefined = deadlockTimeoutOf(frame)) => {
  const holder = innermost(frame.tx)
  const waited = `${what} in ${frame.describe()} waited ${millis} ms (deadlockTimeout) for the connection, which `
  const message =
    holder === undefined || holder === frame || !frame.open
      ? `${waited}a stream of the same transaction holds until the stream has been read to its end; it gave up, ` +
        "as the stream's reader most likely waits for it. Nothing was sent. Read the stream to its end first " +
        "(or collect its rows with Stream.runCollect), then run the statement."
      : holder.declared !== undefined && frame.tx.mode.virtual
        ? `${waited}${holder.describe()}, another transaction of the code under test, holds until it ends. In a ` +
          "test the code's transactions take turns on the test's one connection, where production would run them " +
          "at the same time on two: code in which one transaction waits for another that is still open cannot run " +
          "under TestTransaction. Nothing was sent. Let the first transaction end before the second needs it, or " +
          "test that interplay without TestTransaction."
        : `${waited}${holder.describe()} holds until it ends; it gave up, as the two most likely wait for each ` +
          "other (the nested block joins or awaits this fiber, or the two fibers take a lock in opposite orders). " +
          "Nothing was sent. Run the work in the nested block itself, join forked fibers before opening a nested " +
          "block, or raise deadlockTimeout on the outermost transaction if the nested block is simply slow."
  return new TransactionError({ reason: "WouldDeadlock", message })
}

const stuckStatementError = (frame: Frame) => {
  const error = stuckError(frame, "A statement")
  return new SqlError({ message: error.message, cause: error })
}

const streamDeadlockError = (frame: Frame, what: string) =>
  new TransactionError({
    reason: "WouldDeadlock",
    message:
      `${what} in ${frame.describe()} would wait for the connection, which a stream this same fiber is reading ` +
      "holds until the stream has been read to its end (sql`...`.stream keeps the transaction's connection while " +
      "its rows arrive), so it would wait for ever. Nothing was sent. Read the stream to its end first (or " +
      "collect its rows with Stream.runCollect), then run the statement."
  })

/**
 * Fails at once when the current fiber would wait for what only it can end: a block it opened with the manual
 * handle, or a stream it is reading.
 */
const unlessSelfBlocking = <A, E, R>(
  frame: Frame,
  what: string,
  onError: (error: TransactionError) => E,
  effect: Effect.Effect<A, E, R>,
  /** Whether the claim waits for blocks nested deeper to end (a test's own statement does not). */
  waitsForBlocks = true
): Effect.Effect<A, E, R> =>
  (!waitsForBlocks || innermost(frame.tx) === frame || frame.tx.stack.length === 0) && !frame.tx.owned.streaming
    ? effect
    : Effect.withFiberRuntime((fiber) => {
        if (frame.tx.owned.heldByStreamOf(fiber.id())) return Effect.fail(onError(streamDeadlockError(frame, what)))
        const holder = waitsForBlocks ? selfBlocking(frame, fiber.id()) : undefined
        return holder === undefined ? effect : Effect.fail(onError(wouldDeadlockError(frame, what, holder)))
      })

const asSqlError = (error: TransactionError) => new SqlError({ message: error.message, cause: error })

/** Called by @effect/sql when the statement runs, so the checks see the block as it is at that moment. */
const guarded = <A>(
  frame: Frame,
  sql: string,
  run: (sql: string) => Effect.Effect<A, SqlError>
): Effect.Effect<A, SqlError> =>
  Effect.uninterruptibleMask((restore) => {
    const tx = frame.tx
    if (!frame.open) return Effect.fail(closedError(frame))
    const refused = tx.mode.refuse(frame, sql)
    if (refused !== undefined) return Effect.fail(refused)
    if (frame.test) {
      // A test's own statement stands for an autocommitted one, which production would run on another pooled
      // connection: it does not wait for the code under test's open transactions to end (that could deadlock
      // where production cannot), only for the connection to be free, and runs inside whatever block is open.
      return unlessSelfBlocking(
        frame,
        "A statement",
        asSqlError,
        tx.owned.withConnection({ frame, kind: "test" }, restore, (access) =>
          access === "granted" && frame.open
            ? runAtomic(frame, sql, () => run(sql), restore)
            : Effect.fail(access === "stuck" ? stuckStatementError(frame) : closedError(frame))
        ),
        false
      )
    }
    // The common case: the block is innermost and the connection is free.
    if (tx.mode.verify === undefined && innermost(tx) === frame && !tx.owned.streaming) {
      const now = tx.owned.executeNow(frame.statementClaim, restore, () => prepareStatement(frame, sql, run))
      if (now !== undefined) return now
    }
    return unlessSelfBlocking(
      frame,
      "A statement",
      asSqlError,
      tx.owned.withConnection(frame.statementClaim, restore, (access) =>
        access === "granted"
          ? runHeld(frame, sql, run, restore)
          : Effect.fail(access === "stuck" ? stuckStatementError(frame) : closedError(frame))
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
  const refused = tx.mode.refuse(frame, sql)
  if (refused !== undefined) return Effect.fail(refused)
  const hold = tx.owned.hold(frame.test ? { frame, kind: "test" } : frame.statementClaim, restore, (access) =>
    access === "stuck" ? stuckStatementError(frame) : closedError(frame)
  )
  return Effect.flatMap(unlessSelfBlocking(frame, "A stream", asSqlError, hold, !frame.test), () => {
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
    const prepare = sendPending(tx, name === undefined ? undefined : tx.dialect.savepoint(name))
    // Hands the connection back if the stream never started (it was interrupted first).
    return Effect.as(
      Effect.zipRight(
        Effect.addFinalizer((exit) => (started() ? Effect.void : finish(exit))),
        Effect.tapError(prepare, () => markAborted(frame))
      ),
      finish
    )
  })
}

/** The connection the statements of a block see: each runs through `guarded`. */
class GuardedConnection implements Connection {
  constructor(private readonly frame: Frame) {}
  execute(sql: string, params: ReadonlyArray<unknown>, transformRows: TransformRows) {
    const conn = this.frame.tx.conn
    return guarded(this.frame, sql, (text) => conn.execute(text, params, transformRows))
  }
  executeRaw(sql: string, params: ReadonlyArray<unknown>) {
    const conn = this.frame.tx.conn
    return guarded(this.frame, sql, (text) => conn.executeRaw(text, params))
  }
  executeValues(sql: string, params: ReadonlyArray<unknown>) {
    const conn = this.frame.tx.conn
    return guarded(this.frame, sql, (text) => conn.executeValues(text, params))
  }
  executeUnprepared(sql: string, params: ReadonlyArray<unknown>, transformRows: TransformRows) {
    const conn = this.frame.tx.conn
    return guarded(this.frame, sql, (text) => conn.executeUnprepared(text, params, transformRows))
  }
  // A stream holds the connection until it has ended.
  executeStream(sql: string, params: ReadonlyArray<unknown>, transformRows: TransformRows) {
    const frame = this.frame
    const conn = frame.tx.conn
    return Stream.suspend(() => {
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

type TransformRows = (<A extends object>(row: ReadonlyArray<A>) => ReadonlyArray<A>) | undefined

/**
 * Runs `effect` in `frame`, and under `span` when the block has one: one copy of the context for all of them, as
 * each service added on its own would cost a copy of its own.
 *
 * @internal
 */
export const provideFrame = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  frame: Frame,
  span?: Tracer.Span
): Effect.Effect<A, E, R> =>
  Effect.mapInputContext(effect, (context: Context.Context<R>) => {
    const services = new Map(context.unsafeMap)
    services.set(Current.key, frame)
    services.set(SqlClient.TransactionConnection.key, [frame.connection, frame.level])
    if (span !== undefined) services.set(Tracer.ParentSpan.key, span)
    return Context.unsafeMake(services)
  })

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

export const controlError = (
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

export const abortedError = (frame: Frame) => {
  const by = frame.abortedBy
  const statement =
    by === undefined
      ? "a statement inside it failed"
      : `the statement ${JSON.stringify(by.sql.trim().slice(0, 120))} inside it failed (${databaseInfo(by.error).message})`
  return new TransactionError({
    // The code's outermost transaction in a test ends where its COMMIT would: it fails as that COMMIT would.
    reason: frame.level === 0 || frame.declared !== undefined ? "CommitFailed" : "SavepointFailed",
    message:
      `${frame.describe()} returned successfully, but ${statement}, so the database had aborted ` +
      `it; it was rolled back and nothing of it was kept. ${hints["25P02"]}`,
    sqlState: "25P02",
    cause: by?.error
  })
}

export const run = (conn: Connection, sql: string) => Effect.asVoid(conn.executeUnprepared(sql, [], undefined))

/**
 * Closes the blocks still open inside `frame` and rolls their writes back: a block that ends before the nested
 * blocks its fibers started keeps none of their unfinished work. Their fibers' next statement is refused.
 */
export const closeInner = (frame: Frame): Effect.Effect<void> =>
  Effect.suspend(() => {
    const tx = frame.tx
    const inner = tx.stack.splice(tx.stack.indexOf(frame) + 1)
    if (inner.length === 0) return Effect.void
    for (const block of inner) {
      block.open = false
      block.abandoned = true
    }
    // Nothing ran in a block never sent, nor in any inside it.
    if (inner[0]!.opening !== undefined) return Effect.void
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
export const keepInner = (frame: Frame): void => {
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

const abandonedResult = <A, E>(frame: Frame, exit: Exit.Exit<A, E>): Effect.Effect<A, E | TransactionError> =>
  frame.tx.lost !== undefined
    ? Effect.failCause(
        Exit.isFailure(exit)
          ? Cause.sequential(Cause.fail(lostTransactionError(frame)), exit.cause)
          : Cause.fail(lostTransactionError(frame))
      )
    : Exit.isFailure(exit)
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
    if (frame.opening !== undefined) {
      // Its SAVEPOINT was never sent, so nothing ran in it: nothing to release or roll back.
      if (frame.openFailed !== undefined) return Effect.fail(frame.openFailed)
      if (Exit.isSuccess(exit) && frame.declared === undefined) handHooksTo(frame.parent!, frame.hooks)
      return exit
    }
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
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
  /** For a test's code opening its own transaction: what it is called, and its own `deadlockTimeout`. */
  declared?: { readonly what: string; readonly deadlockTimeoutMillis: number | undefined }
): Effect.Effect<Frame, TransactionError> => {
  const what = declared?.what ?? "A nested block"
  const claim: Claim =
    declared?.deadlockTimeoutMillis === undefined
      ? parent.statementClaim
      : { frame: parent, kind: "statement", deadlockTimeoutMillis: declared.deadlockTimeoutMillis }
  return unlessSelfBlocking(
    parent,
    what,
    (error) => error,
    parent.tx.owned.withConnection(claim, restore, (access) => {
      if (access === "stuck") {
        return Effect.fail(stuckError(parent, what, claim.deadlockTimeoutMillis ?? deadlockTimeoutOf(parent)))
      }
      if (access === "refused") return Effect.fail(closedTransactionError(parent, "A nested block was started"))
      const tx = parent.tx
      const name = `etx_${++tx.savepoints}`
      // The SAVEPOINT travels with the block's first statement.
      const frame = new Frame(tx, parent, parent.level + 1, name, [tx.dialect.savepoint(name)])
      tx.stack.push(frame)
      return Effect.succeed(frame)
    })
  )
}

/** Runs `effect` in a block nested in `parent`, under `span` when spans are on. */
export const nested = <A, E, R>(
  parent: Frame,
  effect: Effect.Effect<A, E, R>,
  restore: <AX, EX, RX>(effect: Effect.Effect<AX, EX, RX>) => Effect.Effect<AX, EX, RX>,
  span?: Tracer.Span
): Effect.Effect<A, E | TransactionError, R> =>
  Effect.flatMap(openNested(parent, restore), (frame) =>
    Effect.flatMap(Effect.exit(restore(provideFrame(effect, frame, span))), (exit) => finishNested(frame, exit))
  )

/**
 * The block a new block nests in: ours, or a root standing for a transaction other code opened on this fiber
 * (`TransactionConnection` without `Current`), whose end is not ours to see.
 */
export const parentOf = (
  context: Context.Context<never>,
  client: SqlClient.SqlClient | undefined
): Frame | undefined => {
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
    },
    foreignMode
  )
  const root = new Frame(adopted, undefined, depth, undefined, undefined)
  adopted.stack.push(root)
  foreignRoots.set(conn, root)
  return root
}

/** The root standing for each transaction other code opened, by its connection. */
const foreignRoots = new WeakMap<Connection, Frame>()

/** Sends a release still pending in a transaction that is not ours: nothing of ours would send it later. */
export const flushForeign = (root: Frame) =>
  root.tx.owned
    .withConnection(root.endClaim, held, () =>
      root.tx.pendingRelease === undefined ? Effect.void : sendPending(root.tx)
    )
    .pipe(Effect.ignore)
