/**
 * The cost of Transaction.idempotent, as ratios to a plain transaction doing the same work (one INSERT), measured in
 * the same process on the same database, rounds rotating the order:
 *
 * - a new key: the lock, the lookup that finds nothing, the work, and the recorded result;
 * - a replay: the lock and the lookup that finds the result (the work does not run).
 */
import { SqlClient } from "@effect/sql"
import { Effect, Schema } from "effect"
import { Transaction } from "effect-transaction"

const median = (values: ReadonlyArray<number>) => {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

let nextId = 1

const work = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.as(sql`INSERT INTO bench_idempotent (id) VALUES (${nextId++})`, "done")
)

export const idempotencyCost = (options: { readonly rounds: number; readonly transactions: number }) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`DROP TABLE IF EXISTS bench_idempotent`
    yield* sql`CREATE TABLE bench_idempotent (id int PRIMARY KEY)`
    yield* sql`DELETE FROM effect_transaction_idempotency WHERE scope = 'bench'`.pipe(Effect.ignore)
    let key = 0
    const replayKey = "replayed"
    yield* work.pipe(Transaction.idempotent({ scope: "bench", key: replayKey, success: Schema.String }))
    const contenders: ReadonlyArray<readonly [string, () => Effect.Effect<unknown, unknown, SqlClient.SqlClient>]> = [
      ["plain transaction", () => work.pipe(Transaction.withTransaction())],
      [
        "idempotent, new key",
        () => work.pipe(Transaction.idempotent({ scope: "bench", key: `k${key++}`, success: Schema.String }))
      ],
      [
        "idempotent, replay",
        () => work.pipe(Transaction.idempotent({ scope: "bench", key: replayKey, success: Schema.String }))
      ]
    ]
    const perSecond = new Map<string, Array<number>>(contenders.map(([name]) => [name, []]))
    const ratios = new Map<string, Array<number>>(contenders.map(([name]) => [name, []]))
    for (let round = 0; round < options.rounds; round++) {
      const measured = new Map<string, number>()
      for (let i = 0; i < contenders.length; i++) {
        const [name, run] = contenders[(i + round) % contenders.length]!
        const started = performance.now()
        for (let t = 0; t < options.transactions; t++) yield* run()
        measured.set(name, options.transactions / ((performance.now() - started) / 1000))
      }
      for (const [name] of contenders) {
        perSecond.get(name)!.push(measured.get(name)!)
        ratios.get(name)!.push(measured.get(name)! / measured.get("plain transaction")!)
      }
    }
    yield* sql`DROP TABLE bench_idempotent`
    yield* sql`DELETE FROM effect_transaction_idempotency WHERE scope = 'bench'`
    const rows = contenders.map(([name]) => [
      name,
      `${median(perSecond.get(name)!).toFixed(0)} tx/s`,
      `${median(ratios.get(name)!).toFixed(2)}x`
    ])
    console.log(
      `\nTransaction.idempotent: ${options.transactions} sequential transactions per contender and round, ` +
        `${options.rounds} rounds; median throughput and median ratio to a plain transaction.\n`
    )
    const header = ["idempotency (sequential, one INSERT)", "throughput", "vs plain transaction"]
    console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
  })
