/**
 * Transaction.fn: functions that always run as one transaction, and become savepoints when one calls another.
 * Run: `npx tsx examples/functions.ts` (embedded PostgreSQL, or DATABASE_URL).
 */
import { SqlClient } from "@effect/sql"
import { Console, Effect } from "effect"
import { Transaction } from "effect-transaction"
import { runExample } from "./runtime.js"

class InsufficientFunds {
  readonly _tag = "InsufficientFunds"
  constructor(readonly account: string) {}
}

// A transfer: one transaction when called on its own, a savepoint when called inside another. Its span is named
// "transfer". It takes no options, so that any transaction can call it.
export const transfer = Transaction.fn("transfer")(function* (from: string, to: string, amount: number) {
  const sql = yield* SqlClient.SqlClient
  const [row] = yield* sql<{ balance: number }>`SELECT balance FROM fn_accounts WHERE name = ${from} FOR UPDATE`
  if (row === undefined || row.balance < amount) return yield* Effect.fail(new InsufficientFunds(from))
  yield* sql`UPDATE fn_accounts SET balance = balance - ${amount} WHERE name = ${from}`
  yield* sql`UPDATE fn_accounts SET balance = balance + ${amount} WHERE name = ${to}`
  return (yield* Transaction.Current).depth
})

// The entry point chooses how the whole transaction runs: serializable, run again on serialization failures.
// The transfers it calls are savepoints of it: a refused one is undone alone.
export const payday = Transaction.fn("payday", { isolation: "serializable", retry: true })(function* (
  names: ReadonlyArray<string>
) {
  const results: Array<string> = []
  for (const name of names) {
    const outcome = yield* transfer("company", name, 40).pipe(
      Effect.map((depth) => `${name}: paid (savepoint at depth ${depth})`),
      Effect.catchTag("InsufficientFunds", () => Effect.succeed(`${name}: not paid, company is short`))
    )
    results.push(outcome)
  }
  return results
})

const balances = Effect.flatMap(
  SqlClient.SqlClient,
  (sql) => sql<{ name: string; balance: number }>`SELECT name, balance FROM fn_accounts ORDER BY name`
)

runExample(
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS fn_accounts`
    yield* sql`CREATE TABLE fn_accounts (name text PRIMARY KEY, balance int NOT NULL)`
    yield* sql`INSERT INTO fn_accounts VALUES ('company', 100), ('ada', 0), ('grace', 0), ('linus', 0)`

    yield* Console.log(`on its own, transfer runs at depth ${yield* transfer("company", "ada", 10)}`)
    for (const line of yield* payday(["ada", "grace", "linus"])) yield* Console.log(line)
    yield* Console.log((yield* balances).map((row) => `${row.name} ${row.balance}`).join(", "))
    yield* sql`DROP TABLE fn_accounts`
  })
)
