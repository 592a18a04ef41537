/**
 * afterCommit and afterRollback: side effects that must follow the transaction's outcome, and how hook failures
 * are reported. Run: `npx tsx examples/hooks.ts` (embedded PostgreSQL, or DATABASE_URL).
 */
import { SqlClient } from "@effect/sql"
import { Console, Effect } from "effect"
import { Transaction } from "effect-transaction"
import { runExample } from "./runtime.js"

const sendWelcome = (email: string) =>
  email.endsWith("@broken.example")
    ? Effect.fail(new Error(`mail server refused ${email}`))
    : Console.log(`  mail: welcome, ${email}`)

const signUp = (email: string, shouldFail: boolean) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`INSERT INTO hook_users ${sql.insert({ email })}`
    yield* Transaction.afterCommit(sendWelcome(email))
    yield* Transaction.afterRollback(Console.log(`  not signed up: ${email}`))
    // A nested block that rolls back takes its hooks with it.
    yield* Transaction.afterCommit(Console.log("  never printed")).pipe(
      Effect.zipRight(Effect.fail("nested block fails")),
      Transaction.withTransaction(),
      Effect.ignore
    )
    if (shouldFail) return yield* Effect.fail("sign-up refused")
  }).pipe(Transaction.withTransaction())

runExample(
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS hook_users`
    yield* sql`CREATE TABLE hook_users (email text PRIMARY KEY)`

    yield* Console.log("ada@example.com commits:")
    yield* signUp("ada@example.com", false)
    yield* Console.log("bob@example.com rolls back:")
    yield* Effect.ignore(signUp("bob@example.com", true))

    // A failing hook never fails the committed transaction; the handler sees it (the default one logs it).
    const failures: Array<Transaction.HookFailure> = []
    yield* Console.log("eve@broken.example commits, its hook fails:")
    yield* signUp("eve@broken.example", false).pipe(
      Effect.provideService(Transaction.HookFailureHandler, (failure) => Effect.sync(() => failures.push(failure)))
    )
    yield* Console.log(`  hook failures reported: ${failures.map((failure) => failure.kind).join(", ")}`)
    const users = yield* sql<{ email: string }>`SELECT email FROM hook_users ORDER BY email`
    yield* Console.log(`users: ${users.map((user) => user.email).join(", ")}`)
    yield* sql`DROP TABLE hook_users`
  })
)
