/**
 * The most that sending `BEGIN` with the first statement can buy: the two statements of the flat case on a reserved
 * connection, autocommitted, then one `SELECT 1` where `COMMIT` was: three round trips and no transaction library at
 * all, against hand-written `BEGIN`/`COMMIT` (four round trips), `@effect/sql`'s `withTransaction` and this library
 * (three round trips). Reported as median per-round throughput ratios to hand-written.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import { Transaction } from "effect-transaction"

let nextId = 1_000_000_000

const body = Effect.flatMap(SqlClient.SqlClient, (sql) => {
  const id = nextId++
  return Effect.zipRight(
    sql`INSERT INTO bench_floor (id, payload) VALUES (${id}, ${"payload"})`,
    sql`SELECT id, payload FROM bench_floor WHERE id = ${id}`
  )
})

/** The body on a connection reserved from the client, after `before` (if any) and before `after`. */
const onReserved = (before: string | undefined, after: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.scoped(
      Effect.flatMap(sql.reserve, (conn) =>
        Effect.zipRight(
          before === undefined ? Effect.void : conn.executeUnprepared(before, [], undefined),
          Effect.provideService(body, SqlClient.TransactionConnection, [conn, 0])
        ).pipe(Effect.tap(() => conn.executeUnprepared(after, [], undefined)))
      )
    )
  )

const contenders: ReadonlyArray<readonly [string, Effect.Effect<unknown, unknown, SqlClient.SqlClient>]> = [
  ["hand-written BEGIN/COMMIT (4 round trips)", onReserved("BEGIN", "COMMIT")],
  [
    "@effect/sql withTransaction (4 round trips)",
    Effect.flatMap(SqlClient.SqlClient, (sql) => sql.withTransaction(body))
  ],
  ["effect-transaction (3 round trips)", Transaction.withTransaction(body)],
  // Not a transaction: the same statements autocommitted, and one statement where COMMIT was.
  ["floor: no transaction, SELECT 1 for COMMIT (3 round trips)", onReserved(undefined, "SELECT 1")]
]

const median = (values: ReadonlyArray<number>) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!

/** Prints each contender's median per-round throughput ratio to hand-written. */
export const roundTripFloor = (options: { readonly transactions: number; readonly rounds: number }) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS bench_floor`
    yield* sql`CREATE TABLE bench_floor (id bigint PRIMARY KEY, payload text NOT NULL)`
    const runs = contenders.map(
      ([, transaction]) =>
        () =>
          Effect.runPromise(
            Effect.provideService(Effect.repeatN(transaction, options.transactions - 1), SqlClient.SqlClient, sql)
          )
    )
    for (const run of runs) yield* Effect.promise(run)
    const samples: Array<Array<number>> = contenders.map(() => [])
    for (let round = 0; round < options.rounds; round++) {
      for (let k = 0; k < runs.length; k++) {
        const index = (k + round) % runs.length
        const started = performance.now()
        yield* Effect.promise(runs[index]!)
        samples[index]!.push(performance.now() - started)
      }
      yield* sql`TRUNCATE bench_floor`
    }
    yield* sql`DROP TABLE bench_floor`
    const rows = contenders.map(([name], index) => [
      name,
      `${median(samples[index]!.map((ms, round) => samples[0]![round]! / ms)).toFixed(2)}x`
    ])
    const header = ["flat, sequential (INSERT, SELECT)", "throughput / hand-written"]
    console.log(
      `\nThe round-trip floor: median of ${options.rounds} rounds of ${options.transactions} transactions each.\n`
    )
    console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
  })
