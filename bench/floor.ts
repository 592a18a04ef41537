/**
 * The most that sending `BEGIN` with the first statement can buy: the two statements of the flat case on a reserved
 * connection, autocommitted, then one `SELECT 1` where `COMMIT` was: three round trips and no transaction library at
 * all, against hand-written `BEGIN`/`COMMIT` (four round trips), `@effect/sql`'s `withTransaction` and this library
 * (three round trips), and against the least an engine that carries `BEGIN` does (`carryOnly`), one after another
 * and on 16 fibers sharing 8 connections. Reported as median per-round throughput ratios to hand-written and to
 * `@effect/sql`.
 */
import { SqlClient } from "@effect/sql"
import type { Connection } from "@effect/sql/SqlConnection"
import { Effect } from "effect"
import { Transaction } from "effect-transaction"
import { postgres } from "../src/internal/dialect.js"

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

/**
 * The least an engine that carries `BEGIN` does: `BEGIN` sent with the body's first statement (through the library's
 * own node-postgres stand-in), then `COMMIT`; none of the library's other work (no span or metrics, no bookkeeping
 * of blocks, no guard against a failed `BEGIN`, an interrupt or a lost connection). Not a transaction library: the
 * ceiling of one that saves `BEGIN`'s round trip.
 */
const carryOnly = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.scoped(
    Effect.flatMap(sql.reserve, (conn) => {
      const inFlight = postgres.takeOver(conn, 0)
      let begun = false
      const carrying: Connection = Object.assign(Object.create(conn) as Connection, {
        execute: (
          text: string,
          params: ReadonlyArray<unknown>,
          transformRows: Parameters<Connection["execute"]>[2]
        ) => {
          if (begun || inFlight === undefined) return conn.execute(text, params, transformRows)
          begun = true
          return conn.execute(inFlight.carry(["BEGIN"], text).sql, params, transformRows)
        }
      })
      return Effect.zipLeft(
        Effect.provideService(body, SqlClient.TransactionConnection, [carrying, 0]),
        conn.executeRaw("COMMIT", [])
      )
    })
  )
)

const contenders: ReadonlyArray<readonly [string, Effect.Effect<unknown, unknown, SqlClient.SqlClient>]> = [
  ["hand-written BEGIN/COMMIT (4 round trips)", onReserved("BEGIN", "COMMIT")],
  [
    "@effect/sql withTransaction (4 round trips)",
    Effect.flatMap(SqlClient.SqlClient, (sql) => sql.withTransaction(body))
  ],
  ["effect-transaction (3 round trips)", Transaction.withTransaction(body)],
  ["carry only: BEGIN with the first statement, COMMIT, no library work (3 round trips)", carryOnly],
  // Not a transaction: the same statements autocommitted, and one statement where COMMIT was.
  ["floor: no transaction, SELECT 1 for COMMIT (3 round trips)", onReserved(undefined, "SELECT 1")]
]

const median = (values: ReadonlyArray<number>) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!

/** The shapes the contenders run in: one after another, and on 16 fibers sharing the pool's 8 connections. */
const shapes: ReadonlyArray<
  readonly [
    string,
    (transaction: Effect.Effect<unknown, unknown, SqlClient.SqlClient>, n: number) => typeof transaction
  ]
> = [
  ["flat, sequential (INSERT, SELECT)", (transaction, n) => Effect.repeatN(transaction, n - 1)],
  [
    "flat, 16 fibers / 8 connections",
    (transaction, n) => Effect.forEach(Array.from({ length: n }), () => transaction, { concurrency: 16, discard: true })
  ]
]

/** Prints each contender's median per-round throughput ratio to hand-written and to @effect/sql, for each shape. */
export const roundTripFloor = (options: { readonly transactions: number; readonly rounds: number }) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS bench_floor`
    yield* sql`CREATE TABLE bench_floor (id bigint PRIMARY KEY, payload text NOT NULL)`
    const rows: Array<ReadonlyArray<string>> = []
    for (const [shapeName, shape] of shapes) {
      const runs = contenders.map(
        ([, transaction]) =>
          () =>
            Effect.runPromise(
              Effect.provideService(shape(transaction, options.transactions), SqlClient.SqlClient, sql)
            ).then(() => undefined)
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
      const ratio = (index: number, to: number) =>
        `${median(samples[index]!.map((ms, round) => samples[to]![round]! / ms)).toFixed(2)}x`
      contenders.forEach(([name], index) => {
        rows.push([shapeName, name, ratio(index, 0), ratio(index, 1)])
      })
    }
    yield* sql`DROP TABLE bench_floor`
    const header = ["case", "contender", "throughput / hand-written", "throughput / @effect/sql"]
    console.log(
      `\nThe round-trip floor: median of ${options.rounds} rounds of ${options.transactions} transactions each.\n`
    )
    console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
  })
