import * as SqlClient from "@effect/sql/SqlClient"
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Layer from "effect/Layer"
import * as Scope from "effect/Scope"
import type * as TestTransaction from "../TestTransaction.js"
import type * as Transaction from "../Transaction.js"
import { TransactionError } from "../TransactionError.js"
import { CurrentDialect } from "./dialect.js"
import { Current, type Frame, finishNested, lostTransactionError, openNested, provideFrame } from "./blocks.js"
import { sandboxError, sandboxMode } from "./sandbox.js"
import { type CapturedHook, HookCapture } from "./hooks.js"
import { checkBeginOptions } from "./options.js"
import { closeConnection, finishOutermost, open } from "./outermost.js"
import { sandboxedServices } from "./propagation.js"

const missingClient = (what: string) =>
  Effect.dieMessage(
    `${what} needs a SqlClient and none was provided. Provide your database layer to it, e.g. ` +
      "Effect.provide(PgClient.layer({ ... })) around the test, or TestTransaction.layer().pipe(Layer.provide(PgLive))."
  )

/** Runs the effect in `frame`, with the clients the code under test gets in a test. */
const inTest = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  frame: Frame,
  services: Context.Context<SqlClient.SqlClient>
): Effect.Effect<A, E, Exclude<R, Scope.Scope>> =>
  provideFrame(Effect.provide(Effect.scoped(effect), services), frame) as Effect.Effect<A, E, Exclude<R, Scope.Scope>>

/** A rollback asked for ends in an empty failure; the body's own exit is what the test returns. */
const bodyUnlessRollbackFailed = <A, E>(
  body: Exit.Exit<A, E>,
  rolledBack: Exit.Exit<unknown, TransactionError>
): Effect.Effect<A, E | TransactionError> => {
  if (Exit.isSuccess(rolledBack) || Cause.isEmpty(rolledBack.cause)) return body
  const failure = rolledBack.cause
  return Exit.isFailure(body) ? Effect.failCause(Cause.sequential(body.cause, failure)) : Effect.failCause(failure)
}

const nothing = Exit.failCause(Cause.empty)

/**
 * A test whose test transaction a statement ended fails with that first, whatever else it did (it may have caught
 * the statement's error, or failed for a reason that follows from it).
 */
const unlessLost = <A, E>(test: Frame, body: Exit.Exit<A, E>): Exit.Exit<A, E | TransactionError> =>
  test.tx.lost === undefined
    ? body
    : Exit.failCause(
        Exit.isFailure(body)
          ? Cause.sequential(Cause.fail(lostTransactionError(test)), body.cause)
          : Cause.fail(lostTransactionError(test))
      )

/** @internal */
export const isolate = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  options: Transaction.BeginOptions = {}
): Effect.Effect<A, E | TransactionError, Exclude<R, Scope.Scope> | SqlClient.SqlClient> =>
  Effect.withFiberRuntime((fiber) => {
    const invalid = checkBeginOptions(options, "TestTransaction.isolate")
    if (invalid !== undefined) return Effect.fail(invalid)
    const context = fiber.currentContext
    const current = Context.getOption(context, Current)
    if (current._tag === "Some") {
      const frame = current.value as Frame
      if (Object.values(options).some((value) => value !== undefined)) {
        return Effect.fail(
          new TransactionError({
            reason: "OptionConflict",
            message:
              "TestTransaction.isolate was given options, but here the test runs in a savepoint of a transaction " +
              "that has begun already (the suite's, from TestTransaction.layer). Give the options to " +
              "TestTransaction.layer instead."
          })
        )
      }
      if (!frame.tx.mode.virtual || !frame.test) {
        return Effect.fail(
          sandboxError(
            `TestTransaction.isolate was called inside ${frame.describe()}, which is not a test's own block. ` +
              "Call it around the whole test: it opens the test's transaction, and the code under test runs in it."
          )
        )
      }
      // In a suite that shares one test transaction (or inside another isolate): a savepoint rolled back after.
      const services = sandboxedServices(Context.unsafeGet(context, SqlClient.SqlClient), context)
      return Effect.uninterruptibleMask((restore) =>
        Effect.flatMap(openNested(frame, restore), (test) => {
          test.test = true
          return Effect.flatMap(Effect.exit(restore(inTest(effect, test, services))), (body) =>
            Effect.flatMap(Effect.exit(finishNested(test, nothing)), (rolledBack) =>
              bodyUnlessRollbackFailed(unlessLost(test, body), rolledBack)
            )
          )
        })
      )
    }
    const client = Context.getOption(context, SqlClient.SqlClient)
    if (client._tag === "None") return missingClient("TestTransaction.isolate")
    const services = sandboxedServices(client.value, context)
    return Effect.uninterruptibleMask((restore) =>
      Effect.flatMap(Scope.make(), (scope) =>
        open(
          client.value,
          Context.get(context, CurrentDialect),
          options,
          scope,
          false,
          restore,
          undefined,
          sandboxMode
        ).pipe(
          Effect.onError((cause) => Scope.close(scope, Exit.failCause(cause))),
          Effect.flatMap((test) => {
            test.test = true
            return Effect.flatMap(Effect.exit(restore(inTest(effect, test, services))), (body) =>
              finishOutermost(test, nothing, undefined).pipe(
                Effect.onExit((exit) => closeConnection(test.tx, scope, exit)),
                Effect.exit,
                Effect.flatMap((rolledBack) => bodyUnlessRollbackFailed(unlessLost(test, body), rolledBack))
              )
            )
          })
        )
      )
    )
  }) as Effect.Effect<A, E | TransactionError, Exclude<R, Scope.Scope> | SqlClient.SqlClient>

/** @internal */
export const layer = <E = never, R = never>(
  options: TestTransaction.LayerOptions<E, R> = {}
): Layer.Layer<SqlClient.SqlClient, E | TransactionError, SqlClient.SqlClient | R> =>
  Layer.scopedContext(
    Effect.gen(function* () {
      const found = yield* Effect.serviceOption(SqlClient.SqlClient)
      if (found._tag === "None") return yield* missingClient("TestTransaction.layer")
      const client = found.value
      const services = sandboxedServices(client, yield* Effect.context<never>())
      const dialect = yield* CurrentDialect
      const scope = yield* Scope.make()
      const { seed, ...begin } = options
      const invalid = checkBeginOptions(begin, "TestTransaction.layer")
      if (invalid !== undefined) return yield* Effect.fail(invalid)
      const root = yield* Effect.uninterruptibleMask((restore) =>
        Effect.onError(open(client, dialect, begin, scope, false, restore, undefined, sandboxMode), (cause) =>
          Scope.close(scope, Exit.failCause(cause))
        )
      )
      root.test = true
      // Nothing the suite did is ever committed.
      yield* Effect.addFinalizer(() =>
        finishOutermost(root, nothing, undefined).pipe(
          Effect.onExit((exit) => closeConnection(root.tx, scope, exit)),
          Effect.catchAllCause((cause) =>
            Cause.isEmpty(cause)
              ? Effect.void
              : Effect.logError("TestTransaction: rolling back the suite's test transaction failed", cause)
          )
        )
      )
      if (seed !== undefined) {
        yield* Effect.scoped(provideFrame(Effect.provide(seed, services), root)) as Effect.Effect<unknown, E, R>
      }
      root.sealed = true
      return services.pipe(
        Context.add(Current, root as Transaction.Transaction),
        Context.add(SqlClient.TransactionConnection, [root.connection, root.level] as const)
      ) as Context.Context<SqlClient.SqlClient>
    })
  )

/** @internal */
export const captureHooks = <A, E, R>(
  effect: Effect.Effect<A, E, R>
): Effect.Effect<readonly [A, ReadonlyArray<CapturedHook>], E, R> =>
  Effect.suspend(() => {
    const captured: Array<CapturedHook> = []
    return Effect.map(Effect.provideService(effect, HookCapture, captured), (a) => [a, captured] as const)
  })
