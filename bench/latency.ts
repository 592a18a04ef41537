/**
 * `npx tsc -p tsconfig.build.json && npx tsx --tsconfig tsconfig.bench.json bench/latency.ts`: the same transactions
 * through @effect/sql's `withTransaction` and this library, on a connection whose every message is held back
 * `LATENCY` milliseconds (2 by default) each way by a proxy in the process, as a database across a network would.
 * There the round trips a transaction saves show, whatever the CPU. Uses DATABASE_URL (required).
 */
import * as net from "node:net"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Effect, Redacted } from "effect"
import { Transaction } from "effect-transaction"

const latency = Number(process.env.LATENCY ?? 2)
const target = new URL(process.env.DATABASE_URL ?? "")
const proxy = net.createServer((client) => {
  const upstream = net.connect(Number(target.port || 5432), target.hostname)
  const forward = (from: net.Socket, to: net.Socket) =>
    from.on("data", (data) => setTimeout(() => to.write(data), latency))
  forward(client, upstream)
  forward(upstream, client)
  for (const [a, b] of [
    [client, upstream],
    [upstream, client]
  ] as const) {
    a.on("error", () => b.destroy())
    a.on("close", () => b.destroy())
  }
})

let nextId = 1
const insert = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO latency_items (id) VALUES (${nextId++})`)
const insertAndRead = Effect.flatMap(SqlClient.SqlClient, (sql) => {
  const id = nextId++
  return Effect.zipRight(
    sql`INSERT INTO latency_items (id) VALUES (${id})`,
    sql`SELECT id FROM latency_items WHERE id = ${id}`
  )
})

type Body = Effect.Effect<unknown, unknown, SqlClient.SqlClient>
const cases: ReadonlyArray<readonly [string, (wrap: (body: Body) => Body) => Body]> = [
  ["one statement", (wrap) => wrap(insert)],
  ["two statements", (wrap) => wrap(insertAndRead)],
  [
    "20 nested blocks",
    (wrap) => wrap(Effect.forEach(Array.from({ length: 20 }), () => wrap(insert), { discard: true }))
  ]
]

const main = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`DROP TABLE IF EXISTS latency_items`
  yield* sql`CREATE TABLE latency_items (id bigint PRIMARY KEY)`
  const transactions = 60
  const rounds = 5
  console.log(`\nSequential transactions, ${latency} ms of latency each way, median of ${rounds} rounds.\n`)
  console.log("| case | @effect/sql withTransaction | effect-transaction | ratio |\n| --- | --- | --- | --- |")
  for (const [name, make] of cases) {
    const contenders = [
      make((body) => sql.withTransaction(body)),
      make((body) => Transaction.withTransaction(body))
    ] as const
    const samples: [Array<number>, Array<number>] = [[], []]
    for (let round = 0; round < rounds; round++) {
      for (const k of [0, 1] as const) {
        const start = performance.now()
        yield* Effect.repeatN(contenders[k], transactions - 1)
        samples[k].push((performance.now() - start) / transactions)
      }
    }
    const median = (values: Array<number>) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!
    const [theirs, ours] = [median(samples[0]), median(samples[1])]
    console.log(`| ${name} | ${theirs.toFixed(2)} ms | ${ours.toFixed(2)} ms | ${(theirs / ours).toFixed(2)}x |`)
  }
  yield* sql`DROP TABLE latency_items`
})

proxy.listen(0, "127.0.0.1", () => {
  const port = (proxy.address() as net.AddressInfo).port
  const url = `postgres://${target.username}@127.0.0.1:${port}${target.pathname}`
  Effect.runPromise(
    Effect.scoped(main).pipe(Effect.provide(PgClient.layer({ url: Redacted.make(url), maxConnections: 8 })))
  ).then(
    () => process.exit(0),
    (error) => {
      console.error(error)
      process.exit(1)
    }
  )
})
