/**
 * Advisory locks: one worker at a time per key, across processes. Run: `npx tsx examples/advisory-locks.ts`.
 */
import { Console, Effect } from "effect"
import { Transaction } from "effect-transaction"
import { runExample } from "./runtime.js"

// Four workers start the nightly report at once; the lock lets one run it, the others skip.
const nightlyReport = (worker: number) =>
  Effect.gen(function* () {
    const mine = yield* Transaction.tryAdvisoryLock("nightly-report")
    if (!mine) return `worker ${worker}: skipped, another worker has the lock`
    yield* Effect.sleep("200 millis")
    return `worker ${worker}: ran the report`
  }).pipe(Transaction.withTransaction())

// advisoryLock waits instead: the charges of one invoice run one after another.
const charge = (invoice: number, attempt: number) =>
  Effect.gen(function* () {
    yield* Transaction.advisoryLock(invoice)
    yield* Console.log(`  charge ${attempt} of invoice ${invoice} holds the lock`)
    yield* Effect.sleep("50 millis")
  }).pipe(Transaction.withTransaction())

runExample(
  Effect.gen(function* () {
    const reports = yield* Effect.all([1, 2, 3, 4].map(nightlyReport), { concurrency: "unbounded" })
    for (const line of reports) yield* Console.log(line)
    yield* Console.log("three charges of invoice 7, started together:")
    yield* Effect.all(
      [1, 2, 3].map((attempt) => charge(7, attempt)),
      { concurrency: "unbounded" }
    )
  })
)
