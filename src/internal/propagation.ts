/**
 * What reaches the engine from outside `withTransaction`: `requiresNew` (an independent transaction on another
 * connection, or a virtual one in a test), the `SqlClient` wrapper of `Transaction.layer` (also for the driver's
 * own PgClient tag), `sql.reserve` in a test, `setLocal`, `advisoryLock`, and the accessors of the current block.
 */
import * as SqlClient from "@effect/sql/SqlClient"
import { SqlError } from "@effect/sql/SqlError"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Duration from "effect/Duration"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import type * as Transaction from "../Transaction.js"
import type { TransactionError } from "../TransactionError.js"
import { Current, type Frame } from "./blocks.js"
import { reserveInSandbox, sealedError } from "./sandbox.js"
import { invalidOption, validateOptions } from "./options.js"
import { outermostRetrying, transact, virtualOutermost } from "./outermost.js"

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

/**
 * The clients code under test gets in a test: `client` (the SqlClient) and, when `context` has it, the driver's own
 * tag (@effect/sql-pg's PgClient), both sandboxed, so that neither path reaches the database around the test.
 */
/** @internal */
export const sandboxedServices = (
  client: SqlClient.SqlClient,
  context: Context.Context<never>
): Context.Context<SqlClient.SqlClient> => {
  const sandbox = (found: SqlClient.SqlClient) => (isSandboxed(found) ? found : wrapClient(found, true))
  const services = Context.make(SqlClient.SqlClient, sandbox(client))
  const driver = Context.getOption(context, PgClientTag)
  return driver._tag === "Some"
    ? (Context.add(services, PgClientTag, sandbox(driver.value)) as Context.Context<SqlClient.SqlClient>)
    : services
}

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
    if (current._tag === "Some" && (current.value as Frame).tx.mode.virtual) {
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

/**
 * The block the code runs in, as production would show it: a test's own block (TestTransaction) stands for no
 * transaction at all, so code under test outside its own transactions reads "not in a transaction".
 */
/** @internal */
export const currentOption: Effect.Effect<Option.Option<Transaction.Transaction>> = Effect.map(
  Effect.serviceOption(Current),
  (current) => (current._tag === "Some" && (current.value as Frame).test ? OptionNone : current)
)

const OptionNone: Option.Option<never> = Option.none()

/** @internal */
export const isActive: Effect.Effect<boolean> = Effect.map(
  currentOption,
  (current) => current._tag === "Some" && current.value.isOpen
)
