/**
 * Per-test isolation cost: the same test (an app transaction inserting 10 rows, then a count) run many times,
 * isolated four ways, against the same database in the same process:
 *
 * - TestTransaction, a suite layer: each test a savepoint of the suite's test transaction, rolled back after it;
 * - TestTransaction.isolate on its own: each test its own transaction on a pooled connection, rolled back;
 * - TRUNCATE of the table after each test (the test's transaction commits);
 * - a fresh database per test, CREATE DATABASE ... TEMPLATE, dropped after the test.
 *
 * Each test's body is timed inside each strategy; what a strategy costs beyond its tests' bodies is the cost of
 * isolating them.
 */
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Duration, Effect, Redacted } from "effect"
import { TestTransaction, Transaction } from "effect-transaction"
import pg from "pg"

const ROWS = 10

/** One test: the code under test's transaction writes 10 rows; the test checks they are there. */
const oneTest = (test: number) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* Effect.gen(function* () {
      for (let i = 0; i < ROWS; i++) yield* sql`INSERT INTO bench_test_items (test, payload) VALUES (${test}, ${"row"})`
    }).pipe(Transaction.withTransaction())
    const [row] = yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM bench_test_items WHERE test = ${test}`
    if (row?.n !== ROWS) return yield* Effect.dieMessage(`test ${test} saw ${row?.n} rows, not ${ROWS}`)
  })

const times = (n: number, run: (test: number) => Effect.Effect<unknown, unknown, SqlClient.SqlClient>) =>
  Effect.forEach(
    Array.from({ length: n }, (_, i) => i),
    run,
    { discard: true }
  )

const median = (values: ReadonlyArray<number>) => {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

const withUrl = (url: string, database: string) => {
  const parsed = new URL(url)
  parsed.pathname = `/${database}`
  return parsed.toString()
}

const admin = (url: string, statement: string) =>
  Effect.promise(async () => {
    const client = new pg.Client({ connectionString: url })
    client.on("error", () => undefined)
    await client.connect()
    try {
      await client.query(statement)
    } finally {
      await client.end()
    }
  })

/** Runs the comparison and prints its table; `tests` per round for the fast strategies, fewer for the template. */
export const testIsolation = (options: {
  readonly tests: number
  readonly templateTests: number
  readonly rounds: number
}) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const client = yield* PgClient.PgClient
    const url = Redacted.value(client.config.url!)
    const schema = "CREATE TABLE bench_test_items (id serial PRIMARY KEY, test int NOT NULL, payload text NOT NULL)"
    yield* sql`DROP TABLE IF EXISTS bench_test_items`
    yield* sql.unsafe(schema)
    yield* sql`CREATE INDEX ON bench_test_items (test)`

    const template = `bench_template_${process.pid}`
    yield* admin(url, `DROP DATABASE IF EXISTS ${template}`)
    yield* admin(url, `CREATE DATABASE ${template}`)
    yield* admin(withUrl(url, template), schema)
    yield* Effect.addFinalizer(() => Effect.ignore(admin(url, `DROP DATABASE IF EXISTS ${template} WITH (FORCE)`)))

    // Time spent in the tests' own bodies; the rest of a strategy's time is what isolating them costs.
    let bodyMs = 0
    const body = (test: number) =>
      Effect.map(Effect.timed(oneTest(test)), ([duration]) => {
        bodyMs += Duration.toMillis(duration)
      })

    const strategies: ReadonlyArray<
      readonly [string, number, (n: number) => Effect.Effect<unknown, unknown, SqlClient.SqlClient>]
    > = [
      [
        "TestTransaction.layer + isolate (savepoint per test)",
        options.tests,
        (n) => times(n, (test) => TestTransaction.isolate(body(test))).pipe(Effect.provide(TestTransaction.layer()))
      ],
      [
        "TestTransaction.isolate alone (transaction per test)",
        options.tests,
        (n) => times(n, (test) => TestTransaction.isolate(body(test)))
      ],
      [
        "TRUNCATE after each test",
        options.tests,
        (n) => times(n, (test) => Effect.zipRight(body(test), sql`TRUNCATE bench_test_items`))
      ],
      [
        "CREATE DATABASE ... TEMPLATE per test",
        options.templateTests,
        (n) =>
          times(n, (test) => {
            const database = `bench_test_${process.pid}_${test}`
            return Effect.acquireUseRelease(
              admin(url, `CREATE DATABASE ${database} TEMPLATE ${template}`),
              () =>
                Effect.provide(
                  body(test),
                  PgClient.layer({ url: Redacted.make(withUrl(url, database)), maxConnections: 1 })
                ),
              () => admin(url, `DROP DATABASE ${database} WITH (FORCE)`)
            )
          })
      ]
    ]

    // Warm-up, then rounds; each round runs every strategy once, rotated.
    for (const [, , run] of strategies) {
      yield* run(3)
      yield* sql`TRUNCATE bench_test_items`
    }
    const perTest: Record<string, Array<number>> = {}
    const isolation: Record<string, Array<number>> = {}
    for (const [name] of strategies) {
      perTest[name] = []
      isolation[name] = []
    }
    for (let round = 0; round < options.rounds; round++) {
      for (let k = 0; k < strategies.length; k++) {
        const [name, n, run] = strategies[(k + round) % strategies.length]!
        bodyMs = 0
        const started = performance.now()
        yield* run(n)
        const total = performance.now() - started
        perTest[name]!.push(total / n)
        isolation[name]!.push((total - bodyMs) / n)
        yield* sql`TRUNCATE bench_test_items`
      }
    }
    const ours = median(isolation[strategies[0]![0]]!)
    const rows = strategies.map(([name, n]) => {
      const cost = median(isolation[name]!)
      return [
        name,
        String(n),
        `${median(perTest[name]!).toFixed(3)} ms`,
        `${cost.toFixed(3)} ms`,
        `${(cost / ours).toFixed(1)}x`
      ]
    })
    const header = [
      "isolation",
      "tests per round",
      "per test",
      "isolation cost per test",
      "cost vs TestTransaction.layer"
    ]
    console.log(
      `\nPer-test isolation: each test's app transaction inserts ${ROWS} rows, then the test counts them. Median of ` +
        `${options.rounds} round${options.rounds === 1 ? "" : "s"}; isolation cost = time per test minus the time ` +
        "spent in the test's own body.\n"
    )
    console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
    yield* sql`DROP TABLE bench_test_items`
  })
