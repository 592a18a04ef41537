/**
 * Setup 1, one test: everything the test needs is provided to it, and TestTransaction.isolate runs it in a
 * transaction that is rolled back afterwards. Run: `npx vitest run examples/testing/one-test.test.ts`.
 */
import { assert, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { TestTransaction } from "effect-transaction"
import { Accounts, Bank, BankLive, Notifier } from "./app.js"
import { Database } from "./database.js"

it.effect(
  "a transfer moves the money and tells the owners after it commits",
  () =>
    Effect.gen(function* () {
      const sent: Array<string> = []
      const App = BankLive.pipe(
        Layer.provide(Layer.succeed(Notifier, { notify: (message) => Effect.sync(() => void sent.push(message)) }))
      )
      yield* Effect.gen(function* () {
        const accounts = yield* Accounts
        const bank = yield* Bank
        const ada = yield* accounts.open("ada", 100)
        const grace = yield* accounts.open("grace", 0)
        yield* bank.transfer(ada, grace, 40)
        assert.strictEqual(yield* accounts.balance(grace), 40)
        assert.deepStrictEqual(sent, [`40 moved from account ${ada} to account ${grace}`])
      }).pipe(
        // The app is built inside the test, so it uses the test's SqlClient.
        Effect.provide(App),
        TestTransaction.isolate,
        Effect.provide(Database)
      )
    }),
  120_000
)
