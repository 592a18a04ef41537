/**
 * Setup 3, a suite sharing seeded data: TestTransaction.layer opens one test transaction for the suite and seeds
 * it once (here the seed also runs the migrations, so nothing of the schema outlives the suite); the app's layers are built on it; each test runs in TestTransaction.isolate, a savepoint rolled back to
 * the seed afterwards. Run: `npx vitest run examples/testing/seeded-suite.test.ts`.
 */
import { SqlClient } from "@effect/sql"
import { assert, layer } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { TestTransaction, TransactionError } from "effect-transaction"
import { Accounts, Bank, BankLive, Notifier } from "./app.js"
import { EmptyDatabase, migrate } from "./database.js"

// The seed runs once, inside the suite's test transaction: the migrations (as savepoints of it), then the data.
const seed = Effect.zipRight(
  migrate,
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) => sql`INSERT INTO bank_accounts (id, owner, balance) VALUES (1, 'ada', 100), (2, 'grace', 100)`
  )
)

const sent: Array<string> = []
const Suite = BankLive.pipe(
  Layer.provide(Layer.succeed(Notifier, { notify: (message) => Effect.sync(() => void sent.push(message)) })),
  Layer.provideMerge(TestTransaction.layer({ seed })),
  Layer.provide(EmptyDatabase)
)

const balances = Effect.flatMap(Accounts, (accounts) => Effect.all([accounts.balance(1), accounts.balance(2)]))

layer(Suite, { timeout: "120 seconds" })((it) => {
  it.effect("a transfer starts from the seed", () =>
    Effect.gen(function* () {
      const bank = yield* Bank
      yield* bank.transfer(1, 2, 25)
      assert.deepStrictEqual(yield* balances, [75, 125])
    }).pipe(TestTransaction.isolate)
  )

  it.effect("and is rolled back to it", () =>
    Effect.gen(function* () {
      assert.deepStrictEqual(yield* balances, [100, 100])
    }).pipe(TestTransaction.isolate)
  )

  it.effect("hooks can be captured instead of run", () =>
    Effect.gen(function* () {
      const bank = yield* Bank
      const before = sent.length
      const [, hooks] = yield* TestTransaction.captureHooks(bank.transfer(2, 1, 5))
      assert.strictEqual(hooks.length, 1)
      assert.strictEqual(sent.length, before) // not sent yet
      yield* hooks[0]!.effect
      assert.strictEqual(sent[sent.length - 1], "5 moved from account 2 to account 1")
    }).pipe(TestTransaction.isolate)
  )

  it.effect("a transfer to a missing account fails where production's COMMIT would", () =>
    Effect.gen(function* () {
      const bank = yield* Bank
      const error = yield* Effect.flip(bank.transfer(1, 42, 5))
      assert.isTrue(TransactionError.isReason("ForeignKeyViolation")(error))
      assert.deepStrictEqual(yield* balances, [100, 100])
    }).pipe(TestTransaction.isolate)
  )
})
