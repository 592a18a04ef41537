/**
 * `afterCommit` and `afterRollback`: registering a hook in the block it belongs to (kept in registration order,
 * whichever fiber registers it), and running the hooks of the block that ended the transaction as part of ending
 * the call, uninterruptibly, once the connection is back in the pool, with failures reported to the
 * HookFailureHandler. In a test transaction the hooks can be captured instead.
 */
import * as SqlClient from "@effect/sql/SqlClient"
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import { observeHookFailure } from "./observability.js"
import type * as Transaction from "../Transaction.js"
import type { TransactionError } from "../TransactionError.js"
import { closedTransactionError, Current, type Frame, type Tx } from "./blocks.js"
import { sandboxError, sealedError } from "./sandbox.js"

/**
 * Runs the hooks of the attempt that ended the transaction (the one that committed, or the last one), once its
 * connection is back in the pool; an attempt that was retried keeps none. They run as part of ending the call,
 * uninterruptibly: a caller interrupted during or after a COMMIT that succeeded still gets its afterCommit hooks
 * run (the interruption takes effect once they have); a rollback caused by the caller's interruption runs none. An ordinary nested block has no outcome of its own, so nothing runs
 * for it: its hooks went to the block around it.
 */
export const withHooksOfLast = <A, E, R>(
  transaction: Effect.Effect<A, E, R>,
  last: () => Frame | undefined
): Effect.Effect<A, E, R> => Effect.onExit(transaction, (exit) => hooksOfLast(exit, last()))

/** The hooks due once a transaction whose last attempt opened `frame` has ended with `exit`: `withHooksOfLast`. */
export const hooksOfLast = (exit: Exit.Exit<unknown, unknown>, frame: Frame | undefined): Effect.Effect<void> => {
  if (frame === undefined || frame.hooks.length === 0) return Effect.void
  const outcome = frame.declared === undefined ? frame.tx.outcome : frame.outcome
  // A rollback the caller's interruption caused runs no hooks; a commit always runs its own.
  if (outcome !== "committed" && Exit.isFailure(exit) && Cause.isInterrupted(exit.cause)) return Effect.void
  return runHooks(frame, outcome)
}

/** An `afterCommit` or `afterRollback` effect, bound to the context it was registered in. */
export interface Hook {
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
    const refused = frame.tx.mode.refuseHook(kind)
    if (refused !== undefined) return Effect.fail(refused)
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
      `The hooks of transaction ${frame.id} did not run: the connection failed during COMMIT, so whether it ` +
        "committed is unknown."
    )
  }
  // A test transaction a statement ended: what was written may have been committed or not, whatever the block
  // says; the test fails, and no hook runs on a guess.
  if (tx.lost !== undefined) return Effect.void
  const kind = outcome === "committed" ? "afterCommit" : "afterRollback"
  const due = frame.hooks.filter((hook) => hook.kind === kind).sort((a, b) => a.order - b.order)
  if (due.length === 0) return Effect.void
  const around = tx.mode.virtual ? frame.parent : undefined
  const bound = (hook: Hook): Effect.Effect<unknown, unknown> =>
    Effect.provide(
      hook.effect,
      around === undefined
        ? hook.context
        : Context.add(Context.add(hook.context, Current, around), SqlClient.TransactionConnection, [
            around.connection,
            around.level
          ] as const)
    ) as Effect.Effect<unknown, unknown>
  return Effect.flatMap(Effect.serviceOption(HookCapture), (capture) => {
    if (tx.mode.virtual && capture._tag === "Some") {
      for (const hook of due) capture.value.push({ kind, transactionId: frame.id, effect: bound(hook) })
      return Effect.void
    }
    return Effect.flatMap(HookFailureHandler, (handler) =>
      Effect.forEach(
        due,
        (hook, index) =>
          Effect.catchAllCause(Effect.tapErrorCause(bound(hook), observeHookFailure(tx, kind, index)), (cause) =>
            Effect.catchAllCause(
              handler({
                kind,
                transactionId: frame.id,
                index,
                cause,
                message:
                  `${kind} hook ${index + 1} of ${due.length} of transaction ${frame.id} failed. The transaction ` +
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
