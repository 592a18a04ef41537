/**
 * The manual handle of `Transaction.begin`: a transaction (or, inside one, a savepoint) whose end is a call on the
 * handle or the closing of its scope, with savepoints the caller takes, releases and rolls back to. Blocks the
 * handle opens record the fiber that opened them, so that this fiber waiting on them fails with `WouldDeadlock`.
 */
import * as SqlClient from "@effect/sql/SqlClient"
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Scope from "effect/Scope"
import type * as Transaction from "../Transaction.js"
import { TransactionError } from "../TransactionError.js"
import { CurrentDialect } from "./dialect.js"
import {
  controlError,
  declareOutermost,
  finishNested,
  type Frame,
  openNested,
  parentOf,
  provideFrame,
  run
} from "./blocks.js"
import { sealedError } from "./sandbox.js"
import { checkBeginOptions, checkNestedOptions, deadlockTimeoutMillisOf, invalidOption } from "./options.js"

/** How a test's code opening a transaction with the handle waits for the test's connection. */
const declaredBy = (options: Transaction.BeginOptions) => ({
  what: "A transaction of the code under test",
  deadlockTimeoutMillis: deadlockTimeoutMillisOf(options)
})
import { closeConnection, finishOutermost, open } from "./outermost.js"
import { withHooksOfLast } from "./hooks.js"
import { type OpenObservation, observeOpened } from "./observability.js"

const endedError = (frame: Frame, what: string) =>
  new TransactionError({
    reason: "TransactionClosed",
    message:
      `${what} on ${frame.describe()}, which has already been committed or rolled back. ` +
      "Call commit or rollback once, and run work before it; open a new one with Transaction.begin."
  })

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
      // In a test, the code's own transaction is observed as in production; a savepoint is part of its caller's.
      // The observation starts inside the mask, so that nothing can come between it and what ends it.
      return Effect.uninterruptibleMask((restore) =>
        Effect.flatMap(
          virtual ? observeOpened(parent.tx.client, parent.tx.dialect, options) : Effect.succeed(undefined),
          (observed) =>
            Effect.flatMap(
              Effect.onError(openNested(parent, restore, virtual ? declaredBy(options) : undefined), (cause) =>
                endUnopened(observed, cause)
              ),
              (root) => {
                root.openedBy = fiber.id()
                if (virtual) declareOutermost(root, options)
                return makeHandle(root, userScope, undefined, observed)
              }
            )
        )
      )
    }
    const client = Context.unsafeGet(context, SqlClient.SqlClient)
    const dialect = Context.get(context, CurrentDialect)
    return Effect.uninterruptibleMask((restore) =>
      Effect.flatMap(Effect.zip(observeOpened(client, dialect, options), Scope.make()), ([observed, connectionScope]) =>
        open(client, dialect, options, connectionScope, false, restore).pipe(
          Effect.onError((cause) =>
            Effect.zipRight(Scope.close(connectionScope, Exit.failCause(cause)), endUnopened(observed, cause))
          ),
          Effect.flatMap((root) => {
            root.tx.span = observed?.observation.span
            return makeHandle(root, userScope, connectionScope, observed)
          })
        )
      )
    )
  })

/** Ends the observation of a handle whose transaction could not be opened. */
const endUnopened = (observed: OpenObservation | undefined, cause: Cause.Cause<unknown>) =>
  observed === undefined ? Effect.void : observed.end(Exit.failCause(cause), undefined)

const makeHandle = (
  root: Frame,
  userScope: Scope.Scope,
  connectionScope: Scope.CloseableScope | undefined,
  observed: OpenObservation | undefined
): Effect.Effect<Transaction.Handle> => {
  const span = observed?.observation.span
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
          ? root.tx.mode.afterNested === undefined
            ? finishNested(root, exit, "keep")
            : Effect.ensuring(finishNested(root, exit, "keep"), root.tx.mode.afterNested(root.parent!))
          : Effect.onExit(finishOutermost(root, exit, undefined, "keep"), (result) =>
              closeConnection(root.tx, connectionScope, result)
            )
      // A rollback asked for ends in an empty failure: it is the expected outcome.
      const finished = Effect.catchAllCause(
        withHooksOfLast(Effect.uninterruptible(ending), () => root),
        (cause) => (Cause.isEmpty(cause) ? Effect.void : Effect.failCause(cause))
      )
      return observed === undefined ? finished : Effect.onExit(finished, (exit) => observed.end(exit, root))
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
        if (frame.opening !== undefined) {
          // Never sent: nothing ran in it or in the blocks inside it.
          frame.hooks = []
          return frame.openFailed === undefined ? Effect.void : Effect.fail(frame.openFailed)
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
          live() ? provideFrame(effect, top(), span) : Effect.fail(endedError(root, "run was called"))
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
