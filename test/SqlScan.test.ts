import { assert, describe, it } from "@effect/vitest"
import { splitStatements, transactionControlOf } from "../src/internal/sqlScan.js"

describe("splitting SQL into statements", () => {
  const cases: ReadonlyArray<readonly [string, ReadonlyArray<string>]> = [
    ["SELECT 1; SELECT 2;", ["SELECT 1", "SELECT 2"]],
    ["SELECT 'a;b'; SELECT 'it''s;'", ["SELECT 'a;b'", "SELECT 'it''s;'"]],
    ["SELECT E'it\\'s; x'; COMMIT", ["SELECT E'it\\'s; x'", "COMMIT"]],
    ["SELECT e'\\\\'; SELECT 2", ["SELECT e'\\\\'", "SELECT 2"]],
    ["SELECT 'C:\\'; SELECT 2", ["SELECT 'C:\\'", "SELECT 2"]],
    ["SELECT $a1$';$a1$; COMMIT; SELECT ''", ["SELECT $a1$';$a1$", "COMMIT", "SELECT ''"]],
    ["SELECT $$ $x$ ; $$; SELECT 2", ["SELECT $$ $x$ ; $$", "SELECT 2"]],
    ["/* /* ; */ COMMIT; */ SELECT 1", ["/* /* ; */ COMMIT; */ SELECT 1"]],
    ["SELECT U&'d\\0061t;a'; SELECT \"a;b\"", ["SELECT U&'d\\0061t;a'", 'SELECT "a;b"']],
    ['SELECT "a""b;"; SELECT 2', ['SELECT "a""b;"', "SELECT 2"]],
    ["-- only a comment;\n", []],
    ["SELECT 1 -- a ; comment\n; SELECT 2", ["SELECT 1 -- a ; comment", "SELECT 2"]],
    [
      "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql; CREATE INDEX CONCURRENTLY i ON t (x)",
      ["CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql", "CREATE INDEX CONCURRENTLY i ON t (x)"]
    ],
    ["SELECT $1; SELECT foo$bar$baz; SELECT 3", ["SELECT $1", "SELECT foo$bar$baz", "SELECT 3"]],
    ["  ;  ; SELECT 1 ;; ", ["SELECT 1"]]
  ]
  for (const [sql, statements] of cases) {
    it(`splits ${JSON.stringify(sql)}`, () => {
      assert.deepStrictEqual(splitStatements(sql), statements)
    })
  }
})

describe("finding transaction control statements", () => {
  const cases: ReadonlyArray<readonly [string, string | undefined]> = [
    ["COMMIT", "COMMIT"],
    ["select 1; commit", "COMMIT"],
    ["SELECT E'it\\'s'; COMMIT", "COMMIT"],
    ["SELECT $a1$'$a1$; COMMIT; SELECT ''", "COMMIT"],
    ["/* /* */ COMMIT */ SELECT 1", undefined],
    ["/* x */ ROLLBACK", "ROLLBACK"],
    ["ROLLBACK TO SAVEPOINT a", undefined],
    ["SELECT 'COMMIT'", undefined],
    ["SELECT U&'\\0041'; end", "END"],
    ["-- COMMIT\nSELECT 1", undefined],
    ["start   transaction", "START TRANSACTION"],
    ["SELECT commit_ts FROM t", undefined],
    ['SELECT "commit"; ABORT', "ABORT"]
  ]
  for (const [sql, control] of cases) {
    it(`${JSON.stringify(sql)} -> ${control}`, () => {
      assert.strictEqual(transactionControlOf(sql), control)
    })
  }
})
