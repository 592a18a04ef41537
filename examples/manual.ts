/**
 * Transaction.begin: a transaction under manual control, with savepoints taken and rolled back by hand.
 * Run: `npx tsx examples/manual.ts` (embedded PostgreSQL, or DATABASE_URL).
 */
import { SqlClient } from "@effect/sql"
import { Console, Effect } from "effect"
import { Transaction } from "effect-transaction"
import { runExample } from "./runtime.js"

const rows = [
  { sku: "A-1", quantity: 3 },
  { sku: "B-2", quantity: -1 }, // breaks the CHECK constraint
  { sku: "C-3", quantity: 7 }
]

// Imports what it can: a row that fails is rolled back to its savepoint and skipped, the others are kept.
const importRows = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const tx = yield* Transaction.begin({ isolation: "repeatable read" })
  const skipped: Array<string> = []
  for (const row of rows) {
    const before = yield* tx.savepoint
    const inserted = yield* tx.run(sql`INSERT INTO manual_stock ${sql.insert(row)}`).pipe(Effect.either)
    if (inserted._tag === "Left") {
      skipped.push(row.sku)
      yield* tx.rollbackTo(before)
    }
    yield* tx.release(before)
  }
  yield* tx.commit
  return skipped
}).pipe(Effect.scoped)

// A handle whose scope closes without commit rolls back.
const abandoned = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const tx = yield* Transaction.begin()
  yield* tx.run(sql`INSERT INTO manual_stock VALUES ('Z-9', 1)`)
}).pipe(Effect.scoped)

runExample(
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS manual_stock`
    yield* sql`CREATE TABLE manual_stock (sku text PRIMARY KEY, quantity int NOT NULL CHECK (quantity >= 0))`

    const skipped = yield* importRows
    yield* abandoned
    const kept = yield* sql<{ sku: string }>`SELECT sku FROM manual_stock ORDER BY sku`
    yield* Console.log(`kept: ${kept.map((row) => row.sku).join(", ")}; skipped: ${skipped.join(", ")}`)
    yield* sql`DROP TABLE manual_stock`
  })
)
