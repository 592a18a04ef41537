import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Effect, Exit, Layer } from "effect"
import { TestTransaction } from "effect-transaction"
import { Accounts, Bank, BankLive, Notifier } from "../examples/testing/app.js"
import { migrate } from "../examples/testing/database.js"
import { transactionError } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

/** Every notification the suite's tests caused, in order. */
const sent: Array<string> = []
const NotifierLive = Layer.succeed(Notifier, { notify: (message) => Effect.sync(() => void sent.push(message)) })

/** The schema is migrated and committed (empty) before the suites; everything else happens in test transactions. */
const Db = Layer.tap(TestDatabase.layer(), (context) => Effect.provide(Effect.orDie(migrate), context))

const counts = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
  db.outside<{ accounts: number; transfers: number }>(
    "SELECT (SELECT count(*)::int FROM bank_accounts) AS accounts, (SELECT count(*)::int FROM bank_transfers) AS transfers"
  )
)

const balances = Effect.gen(function* () {
  const accounts = yield* Accounts
  return [yield* accounts.balance(1), yield* accounts.balance(2)]
})

/** Two accounts, seeded once for the suite: ids 1 and 2, 100 each. */
const seed = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`INSERT INTO bank_accounts (id, owner, balance) VALUES (1, 'ada', 100), (2, 'grace', 100)`
})

describe("the bank, tested through TestTransaction", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    // The suite shares one seeded test transaction; the app's layers are built on it, once.
    it.layer(BankLive.pipe(Layer.provide(NotifierLive), Layer.provideMerge(TestTransaction.layer({ seed }))))(
      "a seeded suite",
      (it) => {
        it.effect("a transfer moves the money and notifies after its commit", () =>
          Effect.gen(function* () {
            const bank = yield* Bank
            yield* bank.transfer(1, 2, 30)
            assert.deepStrictEqual(yield* balances, [70, 130])
            assert.include(sent, "30 moved from account 1 to account 2")
          }).pipe(TestTransaction.isolate)
        )

        it.effect("every test starts from the seed", () =>
          Effect.gen(function* () {
            assert.deepStrictEqual(yield* balances, [100, 100])
          }).pipe(TestTransaction.isolate)
        )

        it.effect("a refused transfer changes nothing and notifies no one", () =>
          Effect.gen(function* () {
            const bank = yield* Bank
            const exit = yield* Effect.exit(bank.transfer(1, 2, 1_000))
            assert.deepStrictEqual(exit, Exit.fail({ _tag: "InsufficientFunds", accountId: 1 }))
            assert.deepStrictEqual(yield* balances, [100, 100])
            assert.notInclude(sent, "1000 moved from account 1 to account 2")
          }).pipe(TestTransaction.isolate)
        )

        it.effect("a transfer to a missing account fails where production's COMMIT would", () =>
          Effect.gen(function* () {
            const bank = yield* Bank
            const exit = yield* Effect.exit(bank.transfer(1, 99, 5))
            const error = transactionError(exit)
            assert.strictEqual(error.reason, "CommitFailed")
            assert.strictEqual(error.constraint, "bank_transfers_to_id_fkey")
            assert.deepStrictEqual(yield* balances, [100, 100])
          }).pipe(TestTransaction.isolate)
        )

        describe.concurrent("tests run at the same time", () => {
          for (const amount of [11, 12, 13, 14, 15]) {
            it.effect(`transfer of ${amount} sees only its own writes`, () =>
              Effect.gen(function* () {
                const bank = yield* Bank
                assert.deepStrictEqual(yield* balances, [100, 100])
                yield* bank.transfer(2, 1, amount)
                yield* Effect.sleep("10 millis")
                assert.deepStrictEqual(yield* balances, [100 + amount, 100 - amount])
              }).pipe(TestTransaction.isolate)
            )
          }
        })

        it.effect("a statement outside isolate is refused, naming the fix", () =>
          Effect.gen(function* () {
            const accounts = yield* Accounts
            const exit = yield* Effect.exit(accounts.balance(1))
            assert.isTrue(Exit.isFailure(exit))
            const error = Exit.isFailure(exit) ? (Cause.squash(exit.cause) as { readonly cause?: Error }) : {}
            assert.match(String(error.cause?.message), /outside TestTransaction\.isolate/)
          })
        )

        it.effect("nothing of the suite is committed while it runs", () =>
          Effect.map(counts, (rows) => assert.deepStrictEqual(rows, [{ accounts: 0, transfers: 0 }]))
        )
      }
    )

    it.effect("afterwards, the tables are empty, seen from another connection", () =>
      Effect.map(counts, (rows) => assert.deepStrictEqual(rows, [{ accounts: 0, transfers: 0 }]))
    )
  })

  // @effect/vitest's layer() gives every block the same `it`, so each setup gets a block of its own.
  layer(Db, { excludeTestServices: true })((it) => {
    // vitest runs a describe's body later, when `it` may belong to another layer() block: keep this one's.
    const test = it.effect

    // Each test its own test transaction on its own pooled connection; the app is built inside the test.
    describe.concurrent("a suite sharing a pool, tests at the same time", () => {
      for (const owner of ["linus", "barbara", "edsger", "donald"]) {
        test(`${owner} opens accounts that no other test sees`, () =>
          Effect.gen(function* () {
            const accounts = yield* Accounts
            const bank = yield* Bank
            const mine = yield* accounts.open(owner, 50)
            const savings = yield* accounts.open(`${owner}'s savings`, 0)
            yield* bank.transfer(mine, savings, 20)
            const sql = yield* SqlClient.SqlClient
            const owners = yield* sql<{ owner: string }>`SELECT owner FROM bank_accounts ORDER BY owner`
            assert.deepStrictEqual(
              owners.map((row) => row.owner),
              [owner, `${owner}'s savings`]
            )
            assert.strictEqual(yield* accounts.balance(savings), 20)
          }).pipe(Effect.provide(BankLive.pipe(Layer.provide(NotifierLive))), TestTransaction.isolate))
      }
    })

    it.effect("afterwards, the tables are empty, seen from another connection", () =>
      Effect.map(counts, (rows) => assert.deepStrictEqual(rows, [{ accounts: 0, transfers: 0 }]))
    )
  })
})
