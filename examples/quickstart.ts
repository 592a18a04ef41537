/**
 * The README's quick start, type-checked in CI.
 */
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Effect, Layer } from "effect"
import { Transaction } from "effect-transaction"

const transfer = (from: number, to: number, amount: number) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`UPDATE accounts SET balance = balance - ${amount} WHERE id = ${from}`
    yield* sql`UPDATE accounts SET balance = balance + ${amount} WHERE id = ${to}`
  })

export const program = Effect.gen(function* () {
  yield* transfer(1, 2, 10)
  // A nested block is a savepoint: if it fails, only its own writes are undone.
  yield* transfer(2, 3, 5).pipe(Transaction.withTransaction(), Effect.ignore)
}).pipe(
  Transaction.withTransaction({ isolation: "serializable" }),
  Effect.catchTag("TransactionError", (error) => Effect.logError(error.reason, error.message))
)

// Transaction.layer also routes sql.withTransaction (Migrator, Model repositories) through the engine.
export const SqlLive = Transaction.layer.pipe(Layer.provideMerge(PgClient.layer({ database: "app" })))
export const main = () => Effect.runPromise(Effect.provide(program, SqlLive))
