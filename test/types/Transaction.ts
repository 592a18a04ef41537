// Type-level tests: `npm run typecheck` must accept this file, and every `@ts-expect-error` line must be an error.
import type { SqlClient, SqlError } from "@effect/sql"
import { Effect, Schedule, type Scope, Schema } from "effect"
import { TestTransaction, Transaction, type TransactionError } from "effect-transaction"

type Equals<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false
const expect = <T extends true>(_: T) => _

class NotFound {
  readonly _tag = "NotFound"
}
declare const body: Effect.Effect<number, NotFound | SqlError.SqlError, SqlClient.SqlClient>

// data-last
const dataLast = body.pipe(Transaction.withTransaction())
expect<
  Equals<
    typeof dataLast,
    Effect.Effect<number, NotFound | SqlError.SqlError | TransactionError.TransactionError, SqlClient.SqlClient>
  >
>(true)

// data-first, with options
const dataFirst = Transaction.withTransaction(body, { isolation: "serializable", readOnly: true })
expect<Equals<typeof dataFirst, typeof dataLast>>(true)

// data-last with options
const withOptions = body.pipe(Transaction.withTransaction({ isolation: "repeatable read" }))
expect<Equals<typeof withOptions, typeof dataLast>>(true)

// Code that must run inside a transaction requires Current; withTransaction provides it.
declare const mustBeTransactional: Effect.Effect<void, never, Transaction.Current>
const provided = Transaction.withTransaction(mustBeTransactional)
expect<Equals<Effect.Effect.Context<typeof provided>, SqlClient.SqlClient>>(true)
expect<Equals<Effect.Effect.Error<typeof provided>, TransactionError.TransactionError>>(true)

// ...and without it, running the program does not compile.
// @ts-expect-error Current is not provided
Effect.runPromise(mustBeTransactional)

// Other requirements stay in R.
interface Repo {
  readonly _: unique symbol
}
declare const needsRepo: Effect.Effect<void, never, Repo | Transaction.Current>
const stillNeedsRepo = Transaction.withTransaction(needsRepo)
expect<Equals<Effect.Effect.Context<typeof stillNeedsRepo>, Repo | SqlClient.SqlClient>>(true)

// Options are checked.
// @ts-expect-error not an isolation level
Transaction.withTransaction(body, { isolation: "snapshot" })
// @ts-expect-error not an option
Transaction.withTransaction(body, { readonly: true })

// setLocal must run inside a transaction.
const tenant = Transaction.setLocal("app.tenant_id", "42")
expect<Equals<Effect.Effect.Context<typeof tenant>, Transaction.Current>>(true)
const tenantInTransaction = Transaction.withTransaction(tenant)
expect<Equals<Effect.Effect.Context<typeof tenantInTransaction>, SqlClient.SqlClient>>(true)
// @ts-expect-error Current is not provided
Effect.runPromise(tenant)

// Durations and schedules are typed options.
Transaction.withTransaction(body, {
  timeout: "5 seconds",
  statementTimeout: 1000,
  lockTimeout: "200 millis",
  idleTimeout: "1 minute",
  retry: Schedule.recurs(3)
})
Transaction.withTransaction(body, { retry: true })
Transaction.withTransaction(body, {
  retry: Schedule.tapInput(Schedule.recurs(3), (error: TransactionError.TransactionError) => Effect.log(error.reason))
})
// @ts-expect-error a schedule over another input
Transaction.withTransaction(body, { retry: Schedule.recurs(3).pipe(Schedule.mapInput((n: number) => n)) })
// @ts-expect-error not a duration
Transaction.withTransaction(body, { timeout: { seconds: 5 } })

// Advisory locks need a transaction too.
const lock = Transaction.tryAdvisoryLock("job")
expect<Equals<Effect.Effect.Context<typeof lock>, Transaction.Current>>(true)
// @ts-expect-error Current is not provided
Effect.runPromise(Transaction.advisoryLock(1))

// fn: the types of a generator body are inferred; Current is provided, SqlClient required.
const findUser = Transaction.fn("findUser", { readOnly: true })(function* (id: number, verbose?: boolean) {
  const tx = yield* Transaction.Current
  const found = yield* body
  if (found < 0) return yield* Effect.fail(new NotFound())
  yield* needsRepo
  return { id, verbose, depth: tx.depth, found }
})
expect<Equals<Parameters<typeof findUser>, [id: number, verbose?: boolean]>>(true)
expect<
  Equals<
    ReturnType<typeof findUser>,
    Effect.Effect<
      { id: number; verbose: boolean | undefined; depth: number; found: number },
      NotFound | SqlError.SqlError | TransactionError.TransactionError,
      SqlClient.SqlClient | Repo
    >
  >
>(true)
// @ts-expect-error wrong argument type
findUser("1")

// fn with a body that returns an Effect.
const total = Transaction.fn("total")((ids: ReadonlyArray<number>) => Effect.as(mustBeTransactional, ids.length))
expect<Equals<ReturnType<typeof total>, Effect.Effect<number, TransactionError.TransactionError, SqlClient.SqlClient>>>(
  true
)

// A body that yields nothing fallible.
// biome-ignore lint/correctness/useYield: the point is a body without effects
const noop = Transaction.fn("noop")(function* () {
  return "done" as const
})
expect<Equals<ReturnType<typeof noop>, Effect.Effect<"done", TransactionError.TransactionError, SqlClient.SqlClient>>>(
  true
)

// Current: its fields are read-only data.
declare const current: Transaction.Transaction
expect<Equals<typeof current.id, number>>(true)
expect<Equals<typeof current.isolation, Transaction.IsolationLevel | undefined>>(true)
// @ts-expect-error read-only
current.depth = 2

// Hooks need a transaction, keep the hook's requirements, and withTransaction removes Current only.
declare const sendMail: Effect.Effect<void, Error, Repo>
const hook = Transaction.afterCommit(sendMail)
expect<Equals<typeof hook, Effect.Effect<void, TransactionError.TransactionError, Repo | Transaction.Current>>>(true)
const hookInTransaction = Transaction.withTransaction(hook)
expect<Equals<Effect.Effect.Context<typeof hookInTransaction>, Repo | SqlClient.SqlClient>>(true)
// @ts-expect-error Current is not provided
Effect.runPromise(Transaction.afterRollback(Effect.void))
// A hook runs after the transaction, outside it: it cannot require Current.
// @ts-expect-error the hook requires Current
Transaction.afterCommit(Effect.map(Transaction.Current, (current) => current.id))
// @ts-expect-error the hook requires Current
Transaction.afterRollback(Transaction.setLocal("app.user", "1"))

// requiresNew provides its own Current.
const independent = Transaction.requiresNew(needsRepo, { acquireTimeout: "1 second" })
expect<Equals<Effect.Effect.Context<typeof independent>, Repo | SqlClient.SqlClient>>(true)
const independentLast = needsRepo.pipe(Transaction.requiresNew())
expect<Equals<typeof independentLast, typeof independent>>(true)

// begin: scoped; the handle's run provides Current.
const manual = Effect.gen(function* () {
  const tx = yield* Transaction.begin({ isolation: "serializable" })
  const sp = yield* tx.savepoint
  const inside = yield* tx.run(needsRepo)
  yield* tx.rollbackTo(sp)
  yield* tx.commit
  return inside
})
expect<Equals<Effect.Effect.Context<typeof manual>, SqlClient.SqlClient | Scope.Scope | Repo>>(true)
// @ts-expect-error begin takes no timeout
Transaction.begin({ timeout: "1 second" })
// @ts-expect-error begin takes no retry
Transaction.begin({ retry: true })

// TestTransaction.isolate: removes Scope, adds SqlClient, keeps every other requirement (Current included: code
// that must run in a transaction still needs withTransaction inside a test).
declare const scopedTest: Effect.Effect<string, NotFound, Scope.Scope | Repo>
const isolated = TestTransaction.isolate(scopedTest)
expect<
  Equals<
    typeof isolated,
    Effect.Effect<string, NotFound | TransactionError.TransactionError, Repo | SqlClient.SqlClient>
  >
>(true)
const isolatedPiped = scopedTest.pipe(TestTransaction.isolate)
expect<Equals<typeof isolatedPiped, typeof isolated>>(true)
const stillNeedsCurrent = TestTransaction.isolate(mustBeTransactional)
expect<Equals<Effect.Effect.Context<typeof stillNeedsCurrent>, Transaction.Current | SqlClient.SqlClient>>(true)

// idempotent: the success schema's type is the result; the failure schema's type joins the error channel (replays
// decode it); Current is eliminated; the schemas' requirements flow into R.
class Forbidden extends Schema.TaggedError<Forbidden>()("Forbidden", {}) {}
declare const charge: Effect.Effect<"ok", NotFound, Repo | Transaction.Current>
const once = charge.pipe(Transaction.idempotent({ key: "k", success: Schema.String, failure: Forbidden }))
expect<
  Equals<
    typeof once,
    Effect.Effect<string, NotFound | Forbidden | TransactionError.TransactionError, Repo | SqlClient.SqlClient>
  >
>(true)
const onceFirst = Transaction.idempotent(charge, { key: "k", success: Schema.String })
expect<Equals<Effect.Effect.Success<typeof onceFirst>, string>>(true)
declare const wide: Effect.Effect<string | number>
// @ts-expect-error the effect's result must be what the success schema encodes
wide.pipe(Transaction.idempotent({ key: "k", success: Schema.String }))
