/**
 * The test transaction of TestTransaction, as one strategy the engine is given: everything a test transaction does
 * differently from a transaction in production is here, to be checked against docs/testing.md.
 * - It is never committed; the code under test's outermost transactions are blocks nested in it whose end is a
 *   virtual commit (`sandboxMode.virtual`; outermost.ts `virtualOutermost`, also for `requiresNew`).
 * - It refuses transaction control statements and, in a seeded suite, statements outside a test (`refuse`).
 * - After every statement it checks that the session is still inside it, and ends everything on it if not
 *   (`verify`).
 * - `sql.reserve` gets the test's connection (`reserveInSandbox`); the code's clients come from propagation.ts
 *   `sandboxedServices`.
 * - Its own errors: a refused statement, a statement outside `isolate`, a transaction ended behind its back.
 * The test's own blocks (`Frame.test`) and the code's outermost ones (`Frame.declared`) are marked in blocks.ts,
 * where statements of a test's own block run each in a savepoint, as if autocommitted.
 */
import type { Connection } from "@effect/sql/SqlConnection"
import { SqlError } from "@effect/sql/SqlError"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import { TransactionError } from "../TransactionError.js"
import { Current, type Frame, lostTransactionError, type Mode, refuseNothing } from "./blocks.js"
import { transactionControlOf } from "./sqlScan.js"

/** A test transaction of TestTransaction: never committed; the code under test runs in blocks nested in it. */
export const sandboxMode: Mode = {
  name: "sandbox",
  refuse: (frame, sql) => refusedInSandbox(frame, sql),
  closed: (frame, what) =>
    `${what} on ${frame.describe()} after it ended, in a test under TestTransaction. A fiber forked by the ` +
    "test (or by the code under test) outlived the block or the test it belongs to: join or interrupt it " +
    "before the test returns. Effect.fork is interrupted with its parent; Effect.forkDaemon and Effect.forkIn " +
    "are not.",
  refuseHook: refuseNothing,
  virtual: true,
  afterNested: undefined,
  verify: (frame, sql) => verifyInSandbox(frame, sql)
}

/**
 * After every statement in a test transaction: the database reports with each answer whether the session is still
 * inside a transaction. If it is not, a statement the refusal above did not recognise ended the test transaction
 * (what the test wrote may have been committed): the transaction is marked lost, every block of it closed, and its
 * connection discarded, so that neither this test nor a later one runs anything more on it.
 */
const verifyInSandbox = (frame: Frame, sql: string): SqlError | undefined => {
  const tx = frame.tx
  if (tx.dialect.transactionStatus(tx.conn) !== "idle") return undefined
  tx.lost =
    `the test transaction ended: after the statement ${JSON.stringify(sql.trim().slice(0, 200))} the database ` +
    "reported the session outside any transaction, so that statement ended it (a COMMIT or ROLLBACK that " +
    "TestTransaction did not recognise) and what the test wrote before it may have been committed for real. The " +
    "connection was discarded and nothing more runs in this test transaction. Check the database for left-over " +
    "rows, and do not send transaction control statements from code under test: use Transaction.withTransaction."
  tx.owned.broken = true
  tx.pendingRelease = undefined
  for (const block of tx.stack) {
    block.open = false
    if (block.level > 0) block.abandoned = true
  }
  tx.stack.length = 1
  return lostError(frame)
}

/** The error of the statement that ended a test transaction. */
const lostError = (frame: Frame) =>
  new SqlError({ message: `TestTransaction: ${frame.tx.lost}`, cause: lostTransactionError(frame) })

/** Why a statement may not run in a test transaction at all, if it may not. */
const refusedInSandbox = (frame: Frame, sql: string): SqlError | undefined => {
  if (frame.sealed) return new SqlError({ message: "TestTransaction refused a statement", cause: sealedError() })
  return transactionControlOf(sql) === undefined ? undefined : controlStatementError(sql)
}

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

/** In a test, `sql.reserve` hands out the test's connection, as the block that asks for it sees it. */
export const reserveInSandbox: Effect.Effect<Connection, SqlError, Scope.Scope> = Effect.withFiberRuntime((fiber) => {
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
