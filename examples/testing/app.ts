/**
 * A small bank, the code under test of the testing examples: a repository, a service whose transfer (a
 * Transaction.fn) calls two other transactional functions, and a notification sent after commit. Its schema is
 * the migration in examples/testing/migrations.
 */
import { SqlClient } from "@effect/sql"
import { Context, Effect, Layer } from "effect"
import { Transaction } from "effect-transaction"

export class InsufficientFunds {
  readonly _tag = "InsufficientFunds"
  constructor(readonly accountId: number) {}
}

/** Where the bank's data lives. Captures the SqlClient when its layer is built, as repositories do. */
export class Accounts extends Context.Tag("bank/Accounts")<
  Accounts,
  {
    readonly open: (owner: string, balance: number) => Effect.Effect<number, unknown>
    readonly balance: (id: number) => Effect.Effect<number, unknown>
    readonly adjust: (id: number, delta: number) => Effect.Effect<void, unknown>
    readonly record: (from: number, to: number, amount: number) => Effect.Effect<void, unknown>
  }
>() {}

export const AccountsLive = Layer.effect(
  Accounts,
  Effect.map(SqlClient.SqlClient, (sql) =>
    Accounts.of({
      open: (owner, balance) =>
        Effect.map(
          sql<{ id: number }>`INSERT INTO bank_accounts ${sql.insert({ owner, balance })} RETURNING id`,
          (rows) => rows[0]!.id
        ),
      balance: (id) =>
        Effect.map(sql<{ balance: number }>`SELECT balance FROM bank_accounts WHERE id = ${id}`, (rows) =>
          rows.length === 0 ? 0 : rows[0]!.balance
        ),
      adjust: (id, delta) => Effect.asVoid(sql`UPDATE bank_accounts SET balance = balance + ${delta} WHERE id = ${id}`),
      record: (from, to, amount) =>
        Effect.asVoid(sql`INSERT INTO bank_transfers ${sql.insert({ from_id: from, to_id: to, amount })}`)
    })
  )
)

/** Tells the owners; only after the money has really moved. */
export class Notifier extends Context.Tag("bank/Notifier")<
  Notifier,
  { readonly notify: (message: string) => Effect.Effect<void> }
>() {}

export class Bank extends Context.Tag("bank/Bank")<
  Bank,
  {
    readonly transfer: (
      from: number,
      to: number,
      amount: number
    ) => Effect.Effect<void, InsufficientFunds | unknown, SqlClient.SqlClient>
  }
>() {}

export const BankLive = Layer.effect(
  Bank,
  Effect.gen(function* () {
    const accounts = yield* Accounts
    const notifier = yield* Notifier
    const withdraw = Transaction.fn("Bank.withdraw")(function* (id: number, amount: number) {
      if ((yield* accounts.balance(id)) < amount) return yield* Effect.fail(new InsufficientFunds(id))
      yield* accounts.adjust(id, -amount)
    })
    const deposit = Transaction.fn("Bank.deposit")(function* (id: number, amount: number) {
      yield* accounts.adjust(id, amount)
    })
    const transfer = Transaction.fn("Bank.transfer", { isolation: "serializable", retry: true })(function* (
      from: number,
      to: number,
      amount: number
    ) {
      yield* withdraw(from, amount)
      yield* deposit(to, amount)
      yield* accounts.record(from, to, amount)
      yield* Transaction.afterCommit(notifier.notify(`${amount} moved from account ${from} to account ${to}`))
    })
    return Bank.of({ transfer })
  })
).pipe(Layer.provideMerge(AccountsLive))
