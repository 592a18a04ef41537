// Type-level tests: `npm run typecheck` must accept this file, and every `@ts-expect-error` line must be an error.
import type { SqlClient, SqlError } from "@effect/sql"
import { Effect, Schedule } from "effect"
import { Transaction, type TransactionError } from "effect-transaction"

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
