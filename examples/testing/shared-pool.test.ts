/**
 * Setup 2, a suite sharing a pool: the database layer is built once for the suite; each test runs in
 * TestTransaction.isolate, on a connection and in a transaction of its own, so tests that run at the same time do
 * not see each other's rows. Run: `npx vitest run examples/testing/shared-pool.test.ts`.
 */
import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { TestTransaction } from "effect-transaction"
import { Accounts, Bank, BankLive, Notifier } from "./app.js"
import { Database } from "./database.js"

const App = BankLive.pipe(Layer.provide(Layer.succeed(Notifier, { notify: () => Effect.void })))

layer(Database, { timeout: "120 seconds" })((it) => {
  it.effect("an account opened in one test", () =>
    Effect.gen(function* () {
      const accounts = yield* Accounts
      yield* accounts.open("ada", 100)
      const sql = yield* SqlClient.SqlClient
      assert.strictEqual((yield* sql`SELECT * FROM bank_accounts`).length, 1)
    }).pipe(Effect.provide(App), TestTransaction.isolate)
  )

  it.effect("is gone in the next", () =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      assert.strictEqual((yield* sql`SELECT * FROM bank_accounts`).length, 0)
    }).pipe(TestTransaction.isolate)
  )

  // vitest runs a describe's body later; keep this block's tester.
  const test = it.effect
  describe.concurrent("tests that run at the same time", () => {
    for (const owner of ["linus", "barbara", "edsger"]) {
      test(`${owner} sees only ${owner}'s account`, () =>
        Effect.gen(function* () {
          const accounts = yield* Accounts
          const bank = yield* Bank
          const mine = yield* accounts.open(owner, 10)
          const savings = yield* accounts.open(`${owner} savings`, 0)
          yield* bank.transfer(mine, savings, 10)
          const sql = yield* SqlClient.SqlClient
          const owners = yield* sql<{ owner: string }>`SELECT owner FROM bank_accounts ORDER BY id`
          assert.deepStrictEqual(
            owners.map((row) => row.owner),
            [owner, `${owner} savings`]
          )
        }).pipe(Effect.provide(App), TestTransaction.isolate))
    }
  })
})
