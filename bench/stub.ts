/**
 * The engine's own CPU cost: transactions against a stub connection that answers every statement instantly, so
 * that what is measured is the library's work (fibers, bookkeeping, context), not the database's or the network's.
 * Reported as CPU microseconds (user + system) per transaction of two statements, for each contender.
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

const contenders: ReadonlyArray<readonly [string, Effect.Effect<unknown, unknown, SqlClient.SqlClient>]> = [
  ["hand-written", handWritten],
  ["@effect/sql withTransaction", Effect.flatMap(SqlClient.SqlClient, (sql) => sql.withTransaction(body))],
  ["effect-transaction", Transaction.withTransaction(body)],
  ["effect-transaction, timeout", Transaction.withTransaction(body, { timeout: "10 seconds" })]
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
    const rows: Array<ReadonlyArray<string>> = []
    for (const [name, transaction] of contenders) {
      const run = () =>
        Effect.runPromise(
          Effect.provideService(Effect.repeatN(transaction, options.transactions - 1), SqlClient.SqlClient, client)
        ).then(() => undefined)
      yield* Effect.promise(run)
      const samples: Array<number> = []
      for (let round = 0; round < options.rounds; round++) samples.push(yield* Effect.promise(cpuMicros(run)))
      samples.sort((a, b) => a - b)
      const median = samples[Math.floor(samples.length / 2)]!
      rows.push([name, (median / options.transactions).toFixed(1)])
    }
    const header = ["instant stub connection", "CPU µs per transaction (2 statements)"]
    console.log(
      `\nCPU per transaction against a connection that answers instantly, median of ${options.rounds} rounds of ` +
        `${options.transactions} transactions.\n`
    )
    console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
  })
