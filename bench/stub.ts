/**
 * The engine's own CPU cost: transactions against a stub connection that answers every statement instantly, so
 * that what is measured is the library's work (fibers, bookkeeping, context), not the database's or the network's.
 * Reported as CPU microseconds (user + system) per transaction of two statements, for each contender; the library
 * with its spans and metrics on (the default) and off.
 */
import { Reactivity } from "@effect/experimental"
import { SqlClient, Statement } from "@effect/sql"
import type { Connection } from "@effect/sql/SqlConnection"
import { Effect, Stream } from "effect"
import { Transaction } from "effect-transaction"

/**
 * Looks like a node-postgres client to the engine (a backend with a process id and secret key), so that
 * statements take the same path as on a real connection, cancellation included; nothing here is ever called.
 */
const stubDriver = {
  processID: 1,
  secretKey: 1,
  host: "/nonexistent",
  port: 0,
  emit: () => false,
  end: () => Promise.resolve(),
  listenerCount: () => 0,
  once: () => undefined,
  off: () => undefined,
  query: () => undefined
}

/**
 * A new connection object per reservation, as @effect/sql-pg makes one per reserved client: the engine takes over
 * each reserved connection's driver, once.
 */
const stubConnection = (): Connection & { readonly pg: typeof stubDriver } => ({
  pg: stubDriver,
  execute: () => Effect.succeed([]),
  executeRaw: (sql) =>
    Effect.succeed({ command: sql.trim().toUpperCase() === "COMMIT" ? "COMMIT" : "SELECT", rows: [] }),
  executeValues: () => Effect.succeed([]),
  executeUnprepared: () => Effect.succeed([]),
  executeStream: () => Stream.empty
})

const makeStubClient = SqlClient.make({
  acquirer: Effect.sync(stubConnection),
  transactionAcquirer: Effect.sync(stubConnection),
  compiler: Statement.makeCompilerSqlite(),
  spanAttributes: []
}).pipe(Effect.provide(Reactivity.layer))

const body = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.zipRight(sql`INSERT INTO items (id) VALUES (${1})`, sql`SELECT id FROM items WHERE id = ${1}`)
)

const handWritten = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.scoped(
    Effect.flatMap(sql.reserve, (conn) =>
      conn.executeUnprepared("BEGIN", [], undefined).pipe(
        Effect.zipRight(Effect.provideService(body, SqlClient.TransactionConnection, [conn, 0])),
        Effect.tap(() => conn.executeUnprepared("COMMIT", [], undefined))
      )
    )
  )
)

const noMetrics = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.provideService(effect, Transaction.MetricsEnabled, false)

const contenders: ReadonlyArray<readonly [string, Effect.Effect<unknown, unknown, SqlClient.SqlClient>]> = [
  ["hand-written", handWritten],
  ["@effect/sql withTransaction", Effect.flatMap(SqlClient.SqlClient, (sql) => sql.withTransaction(body))],
  ["effect-transaction", Transaction.withTransaction(body)],
  ["effect-transaction, timeout", Transaction.withTransaction(body, { timeout: "10 seconds" })],
  // Spans go to Effect's built-in tracer (made, not exported) unless the tracer is disabled.
  ["effect-transaction, metrics off", noMetrics(Transaction.withTransaction(body))],
  ["effect-transaction, spans off", Effect.withTracerEnabled(Transaction.withTransaction(body), false)],
  [
    "effect-transaction, spans and metrics off",
    Effect.withTracerEnabled(noMetrics(Transaction.withTransaction(body)), false)
  ]
]

const cpuMicros = (run: () => Promise<void>) => async () => {
  const before = process.cpuUsage()
  await run()
  const used = process.cpuUsage(before)
  return used.user + used.system
}

/** Prints the CPU per transaction of each contender against the stub connection. */
export const stubCpu = (options: { readonly transactions: number; readonly rounds: number }) =>
  Effect.gen(function* () {
    const client = yield* Effect.scoped(makeStubClient)
    const runs = contenders.map(
      ([, transaction]) =>
        () =>
          Effect.runPromise(
            Effect.provideService(Effect.repeatN(transaction, options.transactions - 1), SqlClient.SqlClient, client)
          ).then(() => undefined)
    )
    for (const run of runs) yield* Effect.promise(run)
    // Each round runs every contender once, in a rotated order, so that drift on the machine hits all alike.
    const samples: Array<Array<number>> = contenders.map(() => [])
    for (let round = 0; round < options.rounds; round++) {
      for (let k = 0; k < runs.length; k++) {
        const index = (k + round) % runs.length
        samples[index]!.push(yield* Effect.promise(cpuMicros(runs[index]!)))
      }
    }
    const rows = contenders.map(([name], index) => {
      const sorted = [...samples[index]!].sort((a, b) => a - b)
      return [name, (sorted[Math.floor(sorted.length / 2)]! / options.transactions).toFixed(1)]
    })
    const header = ["instant stub connection", "CPU µs per transaction (2 statements)"]
    console.log(
      `\nCPU per transaction against a connection that answers instantly, median of ${options.rounds} rounds of ` +
        `${options.transactions} transactions.\n`
    )
    console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
  })
