/**
 * `npm run bench -- --case contention`: retry under contention. Fibers move money between ten accounts at
 * SERIALIZABLE, each transfer reading both balances and writing the computed ones, so that concurrent transfers on
 * the same rows fail with serialization failures and must run again. For each retry policy and fiber count: how
 * many transfers completed and gave up, transfers per second, and the maximum and p99 number of attempts one
 * transfer needed.
 */
import { SqlClient } from "@effect/sql"
import { Duration, Effect, Schedule } from "effect"
import { Transaction, TransactionError } from "effect-transaction"

const ACCOUNTS = 10

/** One transfer; `attempt` counts each run of the body. */
const transfer = (seed: number, attempt: () => void) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => {
    const from = (seed % ACCOUNTS) + 1
    const to = ((((seed * 7 + 3) % (ACCOUNTS - 1)) + from) % ACCOUNTS) + 1
    const amount = (seed % 13) + 1
    const [first, second] = from < to ? [from, to] : [to, from]
    return Effect.gen(function* () {
      attempt()
      const rows = yield* sql<{ id: number; balance: number }>`
        SELECT id, balance FROM bench_bank WHERE id IN (${first}, ${second}) ORDER BY id`
      const balance = new Map(rows.map((row) => [row.id, row.balance]))
      const delta = (id: number) => (id === from ? -amount : amount)
      yield* sql`UPDATE bench_bank SET balance = ${balance.get(first)! + delta(first)} WHERE id = ${first}`
      yield* sql`UPDATE bench_bank SET balance = ${balance.get(second)! + delta(second)} WHERE id = ${second}`
    })
  })

/** The generous schedule: exponential from 5 ms, each delay capped at 200 ms and jittered, 100 retries. */
const generous = Schedule.exponential("5 millis").pipe(
  Schedule.modifyDelay((delay) => Duration.min(delay, Duration.millis(200))),
  Schedule.jittered,
  Schedule.intersect(Schedule.recurs(100))
)

const isSerializationFailure = (error: unknown) =>
  ["40001", "40P01"].includes(TransactionError.databaseInfo(error).sqlState ?? "")

type Policy = readonly [
  string,
  (body: Effect.Effect<void, unknown, SqlClient.SqlClient>) => Effect.Effect<unknown, unknown, SqlClient.SqlClient>
]

const policies: ReadonlyArray<Policy> = [
  [
    "effect-transaction, retry: true",
    (body) => body.pipe(Transaction.withTransaction({ isolation: "serializable", retry: true }))
  ],
  [
    "effect-transaction, generous schedule",
    (body) => body.pipe(Transaction.withTransaction({ isolation: "serializable", retry: generous }))
  ],
  [
    "@effect/sql withTransaction, hand-written loop (generous schedule)",
    (body) =>
      Effect.flatMap(SqlClient.SqlClient, (sql) =>
        sql
          // @effect/sql's withTransaction has no isolation option: the body's first statement sets it.
          .withTransaction(Effect.zipRight(sql`SET TRANSACTION ISOLATION LEVEL SERIALIZABLE`, body))
          .pipe(
            // A failed COMMIT is a defect in @effect/sql: the loop catches it to run the transfer again.
            Effect.catchAllDefect((defect) =>
              isSerializationFailure(defect) ? Effect.fail(defect) : Effect.die(defect)
            ),
            Effect.retry({ schedule: generous, while: isSerializationFailure })
          )
      )
  ]
]

const percentile = (sorted: ReadonlyArray<number>, p: number) =>
  sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!

interface Tally {
  completed: number
  gaveUp: number
  readonly attempts: Array<number>
  readonly perSecond: Array<number>
}

/** Runs `transfers` transfers on `fibers` fibers with `wrap`'s policy, adding what happened to `tally`. */
const round = (wrap: Policy[1], transfers: number, fibers: number, tally: Tally) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS bench_bank`
    yield* sql`CREATE TABLE bench_bank (id int PRIMARY KEY, balance int NOT NULL)`
    yield* sql`INSERT INTO bench_bank SELECT g, 1000 FROM generate_series(1, ${ACCOUNTS}) g`
    let completed = 0
    const started = performance.now()
    yield* Effect.forEach(
      Array.from({ length: transfers }, (_, i) => i),
      (i) => {
        let tries = 0
        return wrap(transfer(i, () => tries++)).pipe(
          Effect.matchCause({
            onFailure: () => {
              tally.gaveUp++
              tally.attempts.push(tries)
            },
            onSuccess: () => {
              completed++
              tally.attempts.push(tries)
            }
          })
        )
      },
      { concurrency: fibers, discard: true }
    )
    tally.perSecond.push(completed / ((performance.now() - started) / 1000))
    tally.completed += completed
    const [row] = yield* sql<{ total: number }>`SELECT sum(balance)::int AS total FROM bench_bank`
    if (row!.total !== ACCOUNTS * 1000) return yield* Effect.dieMessage("money was created or lost")
  })

const median = (values: ReadonlyArray<number>) => {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

/**
 * Prints one table: each policy at each fiber count. Each round runs every policy once, in a rotated order, so that
 * drift on the machine hits all alike; transfers/s is the median of the rounds, the other columns count them all.
 */
export const contention = (options: {
  readonly transfers: number
  readonly rounds: number
  readonly fibers: ReadonlyArray<number>
}) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const rows: Array<ReadonlyArray<string>> = []
    for (const fibers of options.fibers) {
      const tallies = policies.map((): Tally => ({ completed: 0, gaveUp: 0, attempts: [], perSecond: [] }))
      for (let r = 0; r < options.rounds; r++) {
        for (let k = 0; k < policies.length; k++) {
          const index = (k + r) % policies.length
          yield* round(policies[index]![1], options.transfers, fibers, tallies[index]!)
        }
      }
      policies.forEach(([name], index) => {
        const tally = tallies[index]!
        const attempts = [...tally.attempts].sort((a, b) => a - b)
        rows.push([
          name,
          String(fibers),
          String(tally.completed),
          String(tally.gaveUp),
          median(tally.perSecond).toFixed(0),
          String(attempts[attempts.length - 1]),
          String(percentile(attempts, 99))
        ])
      })
    }
    yield* sql`DROP TABLE IF EXISTS bench_bank`
    const header = ["policy", "fibers", "completed", "gave up", "transfers/s", "max attempts", "p99 attempts"]
    console.log(
      `\nContended bank: ${options.rounds} rounds of ${options.transfers} transfers per policy between ${ACCOUNTS} ` +
        "accounts at SERIALIZABLE (read both balances, write the computed ones); transfers/s is the median of the " +
        "rounds. Generous schedule: exponential from 5 ms, capped at 200 ms, jittered, 100 retries.\n"
    )
    console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
  })
