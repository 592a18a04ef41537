/**
 * Transaction.idempotent: a payment webhook delivered several times, some at once, is applied once; every delivery
 * gets the same receipt, and a final failure is replayed too. Run: `npx tsx examples/idempotency.ts` (embedded
 * PostgreSQL, or DATABASE_URL).
 */
import { SqlClient } from "@effect/sql"
import { Console, Effect, Schema } from "effect"
import { Transaction } from "effect-transaction"
import { runExample } from "./runtime.js"

interface PaymentEvent {
  readonly id: string
  readonly customer: string
  readonly cents: number
}

const Receipt = Schema.Struct({ receiptId: Schema.Number, balance: Schema.Number })

class AccountClosed extends Schema.TaggedError<AccountClosed>()("AccountClosed", { customer: Schema.String }) {}

const applyPayment = (event: PaymentEvent) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const [account] = yield* sql<{ balance: number; closed: boolean }>`
      UPDATE idem_accounts SET balance = balance + ${event.cents} WHERE customer = ${event.customer}
      RETURNING balance, closed`
    if (account === undefined || account.closed) return yield* new AccountClosed({ customer: event.customer })
    const [receipt] = yield* sql<{ id: number }>`
      INSERT INTO idem_receipts (customer, cents) VALUES (${event.customer}, ${event.cents}) RETURNING id`
    return { receiptId: receipt!.id, balance: account.balance }
  }).pipe(
    Transaction.idempotent({
      scope: "payment-webhook",
      key: event.id,
      request: event,
      success: Receipt,
      failure: AccountClosed
    }),
    Transaction.withTransaction({ retry: true })
  )

const deliver = (event: PaymentEvent) =>
  applyPayment(event).pipe(
    Effect.map((receipt) => `receipt ${receipt.receiptId}, balance ${receipt.balance}`),
    Effect.catchTag("AccountClosed", (closed) => Effect.succeed(`refused: account of ${closed.customer} is closed`))
  )

runExample(
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS idem_receipts, idem_accounts`
    yield* sql`CREATE TABLE idem_accounts (customer text PRIMARY KEY, balance int NOT NULL, closed bool NOT NULL)`
    yield* sql`CREATE TABLE idem_receipts (id serial PRIMARY KEY, customer text NOT NULL, cents int NOT NULL)`
    yield* sql`INSERT INTO idem_accounts VALUES ('ada', 0, false), ('bob', 0, true)`
    yield* sql`DELETE FROM effect_transaction_idempotency WHERE scope = 'payment-webhook'`.pipe(Effect.ignore)

    const payment = { id: "evt_1", customer: "ada", cents: 500 }
    // Three deliveries at once, then a late one: the payment is applied once.
    const concurrent = yield* Effect.all([deliver(payment), deliver(payment), deliver(payment)], {
      concurrency: "unbounded"
    })
    yield* Console.log(`three deliveries at once: ${concurrent.join(" | ")}`)
    yield* Console.log(`a late redelivery:        ${yield* deliver(payment)}`)

    const closed = { id: "evt_2", customer: "bob", cents: 100 }
    yield* Console.log(`a closed account:         ${yield* deliver(closed)}`)
    yield* Console.log(`its redelivery:           ${yield* deliver(closed)}`)

    const [ada] = yield* sql<{ balance: number }>`SELECT balance FROM idem_accounts WHERE customer = 'ada'`
    const [receipts] = yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM idem_receipts`
    yield* Console.log(`ada's balance: ${ada!.balance}; receipts written: ${receipts!.n}`)
    yield* sql`DROP TABLE idem_receipts, idem_accounts`
    yield* sql`DELETE FROM effect_transaction_idempotency WHERE scope = 'payment-webhook'`
  })
)
