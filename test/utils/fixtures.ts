import * as SqlClient from "@effect/sql/SqlClient"
import { assert } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import { TransactionError } from "effect-transaction"
import * as TestDatabase from "./TestDatabase.js"

/** (Re)creates the `items` table the behaviour tests write to. */
export const items = TestDatabase.setup(
  "DROP TABLE IF EXISTS items",
  "CREATE TABLE items (id int PRIMARY KEY, label text)"
)

export const insert = (id: number, label = `item ${id}`) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => sql`INSERT INTO items (id, label) VALUES (${id}, ${label})`)

/** (Re)creates the table `slow`, whose COMMIT takes `seconds`: a deferred constraint trigger sleeps at COMMIT. */
export const slowCommitTable = (seconds: number) =>
  TestDatabase.setup(
    "DROP TABLE IF EXISTS slow",
    "CREATE TABLE slow (id int)",
    `CREATE OR REPLACE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN PERFORM pg_sleep(${seconds}); RETURN NULL; END $$`,
    `CREATE CONSTRAINT TRIGGER slow_check AFTER INSERT ON slow DEFERRABLE INITIALLY DEFERRED
       FOR EACH ROW EXECUTE FUNCTION slow_check()`
  )

/** The ids in `items`, as another session sees them (so only what was committed). */
export const committedIds = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
  Effect.map(db.outside<{ id: number }>("SELECT id FROM items ORDER BY id"), (rows) => rows.map((row) => row.id))
)

/** The ids in `items` as the current fiber sees them (inside a transaction: its own writes too). */
export const visibleIds = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.map(sql<{ id: number }>`SELECT id FROM items ORDER BY id`, (rows) => rows.map((row) => row.id))
).pipe(Effect.orDie)

/** Sessions of the test database left inside a transaction. */
export const idleInTransaction = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
  Effect.map(
    db.outside<{ n: number }>(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
    ),
    (rows) => rows[0]!.n
  )
)

/** The typed failure, an instance of `type`, an exit failed with (fails the test otherwise). */
// biome-ignore lint/suspicious/noExplicitAny: any constructor, as assert.instanceOf takes it
export const typedFailure = <A, E, T>(exit: Exit.Exit<A, E>, type: new (...args: Array<any>) => T): T => {
  assert.isTrue(Exit.isFailure(exit), "expected a failure")
  const failure = Exit.isFailure(exit) ? Cause.failureOption(exit.cause) : Option.none()
  assert.isTrue(
    Option.isSome(failure),
    `expected a typed failure, got ${Exit.isFailure(exit) ? Cause.pretty(exit.cause) : ""}`
  )
  const error = Option.getOrThrow(failure)
  assert.instanceOf(error, type)
  return error as T
}

/** The typed `TransactionError` an exit failed with (fails the test otherwise). */
export const transactionError = <A, E>(exit: Exit.Exit<A, E>): TransactionError.TransactionError =>
  typedFailure(exit, TransactionError.TransactionError)

/** A real serialization failure (SQLSTATE 40001) raised by the database. */
export const serializationFailure = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  sql.unsafe(`DO $$ BEGIN RAISE EXCEPTION 'simulated conflict' USING ERRCODE = 'serialization_failure'; END $$`)
)
