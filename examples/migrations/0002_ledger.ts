/** The ledger: each transfer's two entries. Its foreign key is checked at COMMIT (deferred). */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"

export const up = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`CREATE TABLE ledger (
    id serial PRIMARY KEY,
    account text NOT NULL CONSTRAINT ledger_account_fk REFERENCES accounts (name) DEFERRABLE INITIALLY DEFERRED,
    amount int NOT NULL
  )`
})

export const down = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`DROP TABLE ledger`)
