import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Effect, Exit } from "effect"
import { TestTransaction } from "effect-transaction"
import * as TestDatabase from "./utils/TestDatabase.js"

const table = TestDatabase.setup("DROP TABLE IF EXISTS escapes", "CREATE TABLE escapes (note text)")

const committedRows = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
  Effect.map(db.outside<{ n: number }>("SELECT count(*)::int AS n FROM escapes"), (rows) => rows[0]!.n)
)

/** Runs `text` as one query of a test under TestTransaction.isolate: whether it was refused. */
const refused = (text: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(text)).pipe(
    TestTransaction.isolate,
    Effect.exit,
    Effect.map(Exit.isFailure)
  )

/** A small deterministic generator (mulberry32), so that a failing case can be run again. */
const random = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

const controls = ["COMMIT", "commit", "ROLLBACK", "END", "ABORT", "BEGIN", "START TRANSACTION", "COMMIT AND CHAIN"]

/** Literals whose text holds semicolons, quotes and control keywords, in every quoting style PostgreSQL has. */
const literals = [
  "'plain; COMMIT'",
  "'it''s; ROLLBACK'",
  "E'it\\'s; COMMIT; \\\\'",
  "e'\\''",
  "$$; COMMIT; $$",
  "$a1$'; COMMIT; '$a1$",
  "$q$ $a$ ; END ; $q$",
  "U&'d\\0061t; COMMIT'",
  "'C:\\'",
  "'/* COMMIT */'",
  "'-- COMMIT'"
]

const comments = ["", "-- ; COMMIT\n", "/* ; ROLLBACK; */ ", "/* /* ; */ COMMIT; */ ", "/**/"]

const generate = (next: () => number) => {
  const pick = <A>(items: ReadonlyArray<A>) => items[Math.floor(next() * items.length)]!
  let hasControl = false
  const statements = Array.from({ length: 1 + Math.floor(next() * 4) }, () => {
    const prefix = pick(comments)
    if (next() < 0.15) {
      hasControl = true
      return `${prefix}${pick(controls)}`
    }
    const literal = pick(literals)
    return next() < 0.5 ? `${prefix}INSERT INTO escapes (note) VALUES (${literal})` : `${prefix}SELECT ${literal}`
  })
  return { text: statements.join(pick([";", "; ", ";\n", " ;"])), hasControl }
}

describe("TestTransaction: nothing escapes", () => {
  layer(TestDatabase.layer(), { excludeTestServices: true })((it) => {
    it.effect("quoting tricks around COMMIT never commit the test's rows", () =>
      Effect.gen(function* () {
        yield* table
        for (const text of [
          "INSERT INTO escapes VALUES ('a'); SELECT E'it\\'s'; COMMIT",
          "INSERT INTO escapes VALUES ('a'); SELECT $a1$'$a1$; COMMIT; SELECT ''",
          "INSERT INTO escapes VALUES ('a'); /* /* */ COMMIT; */ SELECT 1; COMMIT",
          "INSERT INTO escapes VALUES ('a'); SELECT U&'\\0041'; COMMIT"
        ]) {
          assert.isTrue(yield* refused(text), text)
        }
        assert.strictEqual(yield* committedRows, 0)
      })
    )

    it.effect(
      "generated statements: refused exactly when they hold a control statement, and nothing is committed",
      () =>
        Effect.gen(function* () {
          yield* table
          const next = random(20261206)
          let refusals = 0
          for (let i = 0; i < 300; i++) {
            const { text, hasControl } = generate(next)
            const wasRefused = yield* refused(text)
            assert.strictEqual(wasRefused, hasControl, text)
            if (wasRefused) refusals++
          }
          assert.isAbove(refusals, 20, "the generator produced control statements")
          assert.strictEqual(yield* committedRows, 0)
        })
    )
  })
})
