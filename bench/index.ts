/**
 * `npm run bench [-- --quick]`: transaction throughput of this library against three baselines run in the same
 * process on the same database: raw `pg`, hand-written BEGIN/COMMIT through the same SqlClient, and @effect/sql's
 * own `withTransaction`. Uses DATABASE_URL when set, an embedded PostgreSQL otherwise.
 *
 * `npm run bench` builds the library first and loads it from dist/ (tsconfig.bench.json has no path mapping to
 * src/), so the library is measured as users run it, not as tsx transpiles its sources on the fly.
 */
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Cause, Effect, Layer, Redacted } from "effect"
import { EmbeddedPostgres, Transaction, TransactionError } from "effect-transaction"
import pg from "pg"
import { contention } from "./contention.js"
import { roundTripFloor } from "./floor.js"
import { idempotencyCost } from "./idempotency.js"
import { testIsolation } from "./isolation.js"
import { stubCpu } from "./stub.js"
import { wireCpu } from "./wire.js"

if (process.argv.includes("--help")) {
  console.log(
    [
      "npm run bench [-- options]",
      "  --quick          a short smoke run",
      "  --rounds N       rounds per case",
      '  --case NAME      only the cases whose name contains NAME: "flat", "nested", "contended bank", "contention",',
      '                   "floor", "stub", "wire", "idempotency", "test isolation"'
    ].join("\n")
  )
  process.exit(0)
}

const quick = process.argv.includes("--quick")
/** `--case nested` runs only the cases whose name contains "nested". */
const only = process.argv.includes("--case") ? process.argv[process.argv.indexOf("--case") + 1] : undefined
const roundsArg = process.argv.includes("--rounds") ? Number(process.argv[process.argv.indexOf("--rounds") + 1]) : 0
const rounds = roundsArg > 0 ? roundsArg : quick ? 3 : 21
const POOL = 8
const FIBERS = 16
const NESTED = 100

interface Case {
  readonly name: string
  /** Transactions per round and contender. */
  readonly transactions: number
  readonly raw: (pool: pg.Pool) => Promise<void>
  readonly effect: (contender: Contender) => Effect.Effect<void, unknown, SqlClient.SqlClient>
}

type Contender = "hand-written" | "@effect/sql" | "effect-transaction" | "effect-transaction, prepared"
const contenders: ReadonlyArray<Contender> = [
  "hand-written",
  "@effect/sql",
  "effect-transaction",
  "effect-transaction, prepared"
]
/** `Transaction.PreparedStatements` for the "prepared" contender. */
const PREPARED = 100

let nextId = 1
const ids = () => nextId++

// --- the work inside each transaction -------------------------------------------------------------------------

const insertAndRead = Effect.flatMap(SqlClient.SqlClient, (sql) => {
  const id = ids()
  return Effect.zipRight(
    sql`INSERT INTO bench_items (id, payload) VALUES (${id}, ${"payload"})`,
    sql`SELECT id, payload FROM bench_items WHERE id = ${id}`
  )
})

const insertOnly = Effect.flatMap(
  SqlClient.SqlClient,
  (sql) => sql`INSERT INTO bench_items (id, payload) VALUES (${ids()}, ${"payload"})`
)

const insertOne = Effect.flatMap(
  SqlClient.SqlClient,
  (sql) => sql`INSERT INTO bench_items (id, payload) VALUES (${ids()}, ${"nested"})`
)

// --- the three ways of wrapping it in a transaction ------------------------------------------------------------

/** BEGIN/COMMIT by hand on a reserved connection, with the same statements routed to it. */
const handWritten = <A, E, R>(body: Effect.Effect<A, E, R>) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.scoped(
      Effect.flatMap(sql.reserve, (conn) =>
        conn.executeUnprepared("BEGIN", [], undefined).pipe(
          Effect.zipRight(Effect.provideService(body, SqlClient.TransactionConnection, [conn, 0])),
          Effect.tap(() => conn.executeUnprepared("COMMIT", [], undefined)),
          Effect.tapErrorCause(() => Effect.ignore(conn.executeUnprepared("ROLLBACK", [], undefined)))
        )
      )
    )
  )

const handWrittenSavepoint =
  (n: number) =>
  <A, E, R>(body: Effect.Effect<A, E, R>) =>
    Effect.flatMap(SqlClient.TransactionConnection, ([conn]) =>
      conn.executeUnprepared(`SAVEPOINT s${n}`, [], undefined).pipe(
        Effect.zipRight(body),
        Effect.tap(() => conn.executeUnprepared(`RELEASE SAVEPOINT s${n}`, [], undefined))
      )
    )

type Wrapped<R> = Effect.Effect<
  unknown,
  unknown,
  Exclude<R, Transaction.Current | SqlClient.TransactionConnection> | SqlClient.SqlClient
>

const wrap = <A, E, R>(contender: Contender, body: Effect.Effect<A, E, R>): Wrapped<R> => {
  switch (contender) {
    case "hand-written":
      return handWritten(body) as Wrapped<R>
    case "@effect/sql":
      return Effect.flatMap(SqlClient.SqlClient, (sql) => sql.withTransaction(body)) as Wrapped<R>
    case "effect-transaction":
    case "effect-transaction, prepared":
      return Transaction.withTransaction(body) as Wrapped<R>
  }
}

const nestedBody = (contender: Contender) =>
  Effect.forEach(
    Array.from({ length: NESTED }, (_, i) => i),
    (i) => (contender === "hand-written" ? handWrittenSavepoint(i)(insertOne) : wrap(contender, insertOne)),
    { discard: true }
  )

// --- raw pg ------------------------------------------------------------------------------------------------------

const rawFlat = async (pool: pg.Pool) => {
  const client = await pool.connect()
  try {
    const id = ids()
    await client.query("BEGIN")
    await client.query("INSERT INTO bench_items (id, payload) VALUES ($1, $2)", [id, "payload"])
    await client.query("SELECT id, payload FROM bench_items WHERE id = $1", [id])
    await client.query("COMMIT")
  } finally {
    client.release()
  }
}

const rawOne = async (pool: pg.Pool) => {
  const client = await pool.connect()
  try {
    await client.query("BEGIN")
    await client.query("INSERT INTO bench_items (id, payload) VALUES ($1, $2)", [ids(), "payload"])
    await client.query("COMMIT")
  } finally {
    client.release()
  }
}

const rawNested = async (pool: pg.Pool) => {
  const client = await pool.connect()
  try {
    await client.query("BEGIN")
    for (let i = 0; i < NESTED; i++) {
      await client.query(`SAVEPOINT s${i}`)
      await client.query("INSERT INTO bench_items (id, payload) VALUES ($1, $2)", [ids(), "nested"])
      await client.query(`RELEASE SAVEPOINT s${i}`)
    }
    await client.query("COMMIT")
  } finally {
    client.release()
  }
}

const concurrently = (n: number, fibers: number, run: () => Promise<void>) => {
  let started = 0
  const worker = async () => {
    while (started < n) {
      started++
      await run()
    }
  }
  return Promise.all(Array.from({ length: fibers }, worker)).then(() => undefined)
}

// --- cases ---------------------------------------------------------------------------------------------------

const flatN = quick ? 200 : 500
const nestedN = quick ? 4 : 10

const cases: ReadonlyArray<Case> = [
  {
    name: "flat, sequential",
    transactions: flatN,
    raw: async (pool) => {
      for (let i = 0; i < flatN; i++) await rawFlat(pool)
    },
    effect: (contender) => Effect.repeatN(wrap(contender, insertAndRead), flatN - 1).pipe(Effect.asVoid)
  },
  {
    name: `flat, ${FIBERS} fibers / ${POOL} connections`,
    transactions: flatN,
    raw: (pool) => concurrently(flatN, FIBERS, () => rawFlat(pool)),
    effect: (contender) =>
      Effect.forEach(Array.from({ length: flatN }), () => wrap(contender, insertAndRead), {
        concurrency: FIBERS,
        discard: true
      })
  },
  {
    name: "one statement, sequential",
    transactions: flatN,
    raw: async (pool) => {
      for (let i = 0; i < flatN; i++) await rawOne(pool)
    },
    effect: (contender) => Effect.repeatN(wrap(contender, insertOnly), flatN - 1).pipe(Effect.asVoid)
  },
  {
    name: `${NESTED} nested blocks, sequential`,
    transactions: nestedN,
    raw: async (pool) => {
      for (let i = 0; i < nestedN; i++) await rawNested(pool)
    },
    effect: (contender) => Effect.repeatN(wrap(contender, nestedBody(contender)), nestedN - 1).pipe(Effect.asVoid)
  }
]

// --- measurement ---------------------------------------------------------------------------------------------

const median = (values: ReadonlyArray<number>) => {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

const timed = async (run: () => Promise<void>) => {
  const start = performance.now()
  await run()
  return performance.now() - start
}

const main = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const pgClient = yield* PgClient.PgClient
  yield* sql`DROP TABLE IF EXISTS bench_items`
  yield* sql`CREATE TABLE bench_items (id bigint PRIMARY KEY, payload text NOT NULL)`
  const url = pgClient.config.url ? Redacted.value(pgClient.config.url) : undefined
  const pool = new pg.Pool({ connectionString: url, max: POOL })
  pool.on("error", () => undefined)
  yield* Effect.addFinalizer(() => Effect.promise(() => pool.end()))
  const runEffect = <A, E>(effect: Effect.Effect<A, E, SqlClient.SqlClient>) =>
    Effect.runPromise(Effect.provideService(effect, SqlClient.SqlClient, sql))

  const rows: Array<ReadonlyArray<string>> = []
  for (const c of cases.filter((c) => only === undefined || c.name.includes(only))) {
    const names = ["raw pg", ...contenders]
    const samples: Record<string, Array<number>> = {}
    for (const name of names) samples[name] = []
    const run = (name: string) =>
      name === "raw pg"
        ? c.raw(pool)
        : runEffect(
            name === "effect-transaction, prepared"
              ? Effect.provideService(c.effect(name), Transaction.PreparedStatements, PREPARED)
              : c.effect(name as Contender)
          )
    // Warm-up: JIT, prepared plans and pool connections for every contender.
    for (const name of names) yield* Effect.promise(() => run(name))
    // Each round runs every contender once, in a rotated order, so that drift on the machine hits all alike;
    // ratios are taken within a round and the median across rounds is reported.
    for (let round = 0; round < rounds; round++) {
      for (let k = 0; k < names.length; k++) {
        const name = names[(k + round) % names.length]!
        samples[name]!.push(yield* Effect.promise(() => timed(() => run(name))))
      }
      yield* sql`TRUNCATE bench_items`
    }
    const base = samples["hand-written"]!
    /** The median over rounds of `name`'s throughput relative to `to`'s in the same round. */
    const ratio = (name: string, to: ReadonlyArray<number>) =>
      median(samples[name]!.map((ms, round) => to[round]! / ms)).toFixed(2)
    const cell = (name: string) => {
      const tps = (c.transactions / median(samples[name]!)) * 1000
      return `${tps.toFixed(0)} tx/s (${ratio(name, base)}x)`
    }
    rows.push([
      c.name,
      cell("raw pg"),
      cell("hand-written"),
      cell("@effect/sql"),
      cell("effect-transaction"),
      `${ratio("effect-transaction", samples["@effect/sql"]!)}x`,
      `${ratio("effect-transaction", samples["raw pg"]!)}x`,
      cell("effect-transaction, prepared"),
      `${ratio("effect-transaction, prepared", samples["@effect/sql"]!)}x`,
      `${ratio("effect-transaction, prepared", samples["raw pg"]!)}x`
    ])
  }

  const header = [
    "case",
    "raw pg",
    "hand-written",
    "@effect/sql withTransaction",
    "effect-transaction",
    "effect-transaction / @effect/sql",
    "effect-transaction / raw pg",
    `effect-transaction, PreparedStatements ${PREPARED}`,
    "prepared / @effect/sql",
    "prepared / raw pg"
  ]
  const lines = [header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`)
  console.log(
    `\nThroughput, median of ${rounds} rounds; in brackets the median per-round throughput ratio to hand-written BEGIN/COMMIT on the same SqlClient; the ratio columns are effect-transaction's median per-round ratios to @effect/sql's withTransaction and to raw pg, without and with Transaction.PreparedStatements.`
  )
  console.log(
    `PostgreSQL: ${yield* sql<{ v: string }>`SHOW server_version`.pipe(Effect.map((r) => Object.values(r[0]!)[0]))}, pool of ${POOL} connections${quick ? ", quick run" : ""}.\n`
  )
  console.log(lines.join("\n"))
  yield* sql`DROP TABLE bench_items`
  if (only === undefined || "contended bank".includes(only)) yield* contendedBank
  if (only === undefined || "contention".includes(only)) {
    yield* contention({ transfers: quick ? 300 : 1000, rounds: quick ? 1 : 3, fibers: [16, 32] })
  }
  if (only === undefined || "floor".includes(only)) {
    yield* roundTripFloor({ transactions: quick ? 200 : 500, rounds })
  }
  if (only === undefined || "stub".includes(only)) {
    yield* stubCpu(quick ? { transactions: 2000, rounds: 3 } : { transactions: 10_000, rounds: 7 })
  }
  if (only === undefined || "wire".includes(only)) {
    yield* wireCpu(quick ? { transactions: 1000, rounds: 3 } : { transactions: 5000, rounds: 9 })
  }
  if (only === undefined || "idempotency".includes(only)) {
    yield* idempotencyCost({ rounds, transactions: quick ? 50 : 300 })
  }
  if (only === undefined || "test isolation".includes(only)) {
    yield* testIsolation(
      quick ? { tests: 100, templateTests: 5, rounds: 1 } : { tests: 1000, templateTests: 30, rounds: 3 }
    )
  }
})

// --- contended bank: retry on serialization failures -------------------------------------------------------------

const ACCOUNTS = 10
const TRANSFERS = quick ? 200 : 1000

/**
 * A transfer between two of ten accounts that also audits the total of all balances, at SERIALIZABLE. Reading
 * every row makes read/write dependencies between concurrent transfers, which PostgreSQL often detects only at
 * COMMIT; writing the same rows makes conflicts at the UPDATE.
 */
const bankTransfer = (seed: number) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => {
    const from = (seed % ACCOUNTS) + 1
    const to = ((((seed * 7 + 3) % (ACCOUNTS - 1)) + from) % ACCOUNTS) + 1
    return Effect.gen(function* () {
      const [row] = yield* sql<{ total: number }>`SELECT sum(balance)::int AS total FROM bench_accounts`
      yield* sql`UPDATE bench_accounts SET balance = balance - 1 WHERE id = ${from}`
      yield* sql`UPDATE bench_accounts SET balance = balance + 1 WHERE id = ${to}`
      yield* sql`INSERT INTO bench_audit (seen_total) VALUES (${row!.total})`
    })
  })

const isSerializationFailure = (error: unknown) =>
  ["40001", "40P01"].includes(TransactionError.databaseInfo(error).sqlState ?? "")

/** Each contender runs the transfers on 16 fibers and counts what completed, failed, and died (defects). */
const bankContenders: ReadonlyArray<
  readonly [string, (seed: number) => Effect.Effect<unknown, unknown, SqlClient.SqlClient>]
> = [
  [
    "@effect/sql withTransaction + hand-written retry loop",
    (seed) =>
      Effect.flatMap(SqlClient.SqlClient, (sql) =>
        sql
          // @effect/sql's withTransaction has no isolation option: the body's first statement sets it.
          .withTransaction(Effect.zipRight(sql`SET TRANSACTION ISOLATION LEVEL SERIALIZABLE`, bankTransfer(seed)))
          .pipe(Effect.retry({ schedule: Transaction.defaultRetrySchedule, while: isSerializationFailure }))
      )
  ],
  [
    "effect-transaction, retry: true",
    (seed) => bankTransfer(seed).pipe(Transaction.withTransaction({ isolation: "serializable", retry: true }))
  ]
]

const contendedBank = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const rows: Array<ReadonlyArray<string>> = []
  for (const [name, run] of bankContenders) {
    yield* sql`DROP TABLE IF EXISTS bench_accounts, bench_audit`
    yield* sql`CREATE TABLE bench_accounts (id int PRIMARY KEY, balance int NOT NULL)`
    yield* sql`CREATE TABLE bench_audit (id serial PRIMARY KEY, seen_total int NOT NULL)`
    yield* sql`INSERT INTO bench_accounts SELECT g, 1000 FROM generate_series(1, ${ACCOUNTS}) g`
    const outcomes = { completed: 0, failed: 0, died: 0 }
    const started = performance.now()
    yield* Effect.forEach(
      Array.from({ length: TRANSFERS }, (_, i) => i),
      (i) =>
        run(i).pipe(
          Effect.matchCause({
            onFailure: (cause) => (Cause.isDie(cause) ? outcomes.died++ : outcomes.failed++),
            onSuccess: () => outcomes.completed++
          })
        ),
      { concurrency: 16, discard: true }
    )
    const seconds = (performance.now() - started) / 1000
    rows.push([
      name,
      `${(outcomes.completed / seconds).toFixed(0)} transfers/s`,
      String(outcomes.completed),
      String(outcomes.failed),
      String(outcomes.died)
    ])
  }
  yield* sql`DROP TABLE IF EXISTS bench_accounts, bench_audit`
  const header = [
    "contended bank (10 accounts, 16 fibers, SERIALIZABLE)",
    "completed per second",
    "completed",
    "failed",
    "died (defects)"
  ]
  console.log(
    `\n${TRANSFERS} transfers per contender; a COMMIT failure is a defect in @effect/sql, which no retry loop can catch.\n`
  )
  console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
})

const Database =
  process.env.DATABASE_URL !== undefined && process.env.DATABASE_URL !== ""
    ? PgClient.layer({ url: Redacted.make(process.env.DATABASE_URL), maxConnections: POOL })
    : EmbeddedPostgres.layer({ client: { maxConnections: POOL } })

Effect.runPromise(Effect.scoped(main).pipe(Effect.provide(Layer.orDie(Database)))).catch((error) => {
  console.error(error)
  process.exit(1)
})
