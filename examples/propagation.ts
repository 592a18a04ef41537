/**
 * Propagation: nested blocks are savepoints, requiresNew is an independent transaction whose commit survives the
 * caller's rollback, and the accessors tell where a fiber is. Run: `npx tsx examples/propagation.ts`.
 */
import { SqlClient } from "@effect/sql"
import { Console, Effect, Option } from "effect"
import { Transaction } from "effect-transaction"
import { runExample } from "./runtime.js"

const where = Effect.map(
  Transaction.currentOption,
  Option.match({
    onNone: () => "no transaction",
    onSome: (tx) => `transaction ${tx.id} at depth ${tx.depth}${tx.readOnly ? ", read-only" : ""}`
  })
)

const audit = (event: string) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`INSERT INTO prop_audit ${sql.insert({ event })}`
    yield* Console.log(`  audit runs in ${yield* where}`)
  }).pipe(Transaction.requiresNew({ acquireTimeout: "2 seconds" }))

const placeOrder = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* Console.log(`  order runs in ${yield* where}`)
  yield* audit("order attempted")
  yield* sql`INSERT INTO prop_orders ${sql.insert({ item: "book" })}`
  yield* Effect.gen(function* () {
    yield* Console.log(`  gift wrap runs in ${yield* where}`)
    return yield* Effect.fail("out of paper")
  }).pipe(Transaction.withTransaction(), Effect.ignore)
  return yield* Effect.fail("payment declined")
}).pipe(Transaction.withTransaction())

runExample(
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS prop_audit, prop_orders`
    yield* sql`CREATE TABLE prop_audit (event text NOT NULL)`
    yield* sql`CREATE TABLE prop_orders (item text NOT NULL)`

    yield* Console.log(`outside: ${yield* where}, active: ${yield* Transaction.isActive}`)
    yield* Effect.ignore(placeOrder)
    const [audits] = yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM prop_audit`
    const [orders] = yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM prop_orders`
    yield* Console.log(`after the order rolled back: ${audits?.n} audit row kept, ${orders?.n} order rows`)
    yield* sql`DROP TABLE prop_audit, prop_orders`
  })
)
