import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Effect, Exit, Layer, Option, Schedule } from "effect"
import { Transaction } from "effect-transaction"
import { committedIds, insert, items, serializationFailure, transactionError } from "./utils/fixtures.js"
import * as Recorder from "./utils/Recorder.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = Recorder.layer.pipe(Layer.provideMerge(TestDatabase.layer()))

const isolation = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.map(sql<{ level: string }>`SELECT current_setting('transaction_isolation') AS level`, (rows) => rows[0]!.level)
)

/** The statements of the recorded connections, without the ones the test itself reads with. */
const recorded = Effect.map(Recorder.Recorder, (log) =>
  log.statements.filter((sql) => !sql.startsWith("SHOW") && !sql.startsWith("SELECT"))
)

describe("Transaction.fn", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("the body runs as one transaction with the given options, and commits", () =>
      Effect.gen(function* () {
        yield* items
        const addTwo = Transaction.fn("addTwo", { isolation: "repeatable read" })(function* (first: number) {
          yield* insert(first)
          yield* insert(first + 1)
          const tx = yield* Transaction.Current
          return { depth: tx.depth, isolation: yield* isolation }
        })
        const log = yield* Recorder.Recorder
        log.clear()
        const result = yield* addTwo(1)
        assert.deepStrictEqual(result, { depth: 0, isolation: "repeatable read" })
        assert.deepStrictEqual(yield* committedIds, [1, 2])
        assert.deepStrictEqual(yield* recorded, [
          "BEGIN ISOLATION LEVEL REPEATABLE READ; INSERT INTO items (id, label) VALUES ($1, $2)",
          "INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT"
        ])
      })
    )

    it.effect("a failure of the body rolls the whole call back", () =>
      Effect.gen(function* () {
        yield* items
        const addThenFail = Transaction.fn("addThenFail")(function* (id: number) {
          yield* insert(id)
          return yield* Effect.fail(`refused ${id}`)
        })
        assert.deepStrictEqual(yield* Effect.exit(addThenFail(7)), Exit.fail("refused 7"))
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("called inside a transaction, it is a savepoint: its failure undoes only its own writes", () =>
      Effect.gen(function* () {
        yield* items
        const add = Transaction.fn("add")(function* (id: number, fail: boolean) {
          yield* insert(id)
          if (fail) return yield* Effect.fail("no")
          return (yield* Transaction.Current).depth
        })
        const log = yield* Recorder.Recorder
        log.clear()
        const depths = yield* Effect.gen(function* () {
          yield* insert(1)
          const kept = yield* add(2, false)
          const failed = yield* Effect.either(add(3, true))
          return [kept, failed._tag]
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(depths, [1, "Left"])
        assert.deepStrictEqual(yield* committedIds, [1, 2])
        assert.deepStrictEqual(yield* recorded, [
          "BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)",
          "SAVEPOINT etx_1; INSERT INTO items (id, label) VALUES ($1, $2)",
          "RELEASE SAVEPOINT etx_1; SAVEPOINT etx_2; INSERT INTO items (id, label) VALUES ($1, $2)",
          "ROLLBACK TO SAVEPOINT etx_2; RELEASE SAVEPOINT etx_2",
          "COMMIT"
        ])
      })
    )

    it.effect("a function returning an Effect works like a generator body", () =>
      Effect.gen(function* () {
        yield* items
        const add = Transaction.fn("add")((id: number) => Effect.as(insert(id), id))
        assert.strictEqual(yield* add(5), 5)
        assert.deepStrictEqual(yield* committedIds, [5])
      })
    )

    it.effect("the call is a span named after the function, with the transaction's span inside it", () =>
      Effect.gen(function* () {
        const named = Transaction.fn("loadReport")(function* () {
          const span = yield* Effect.currentSpan
          const parent = Option.getOrUndefined(span.parent)
          return [span.name, parent?._tag === "Span" ? parent.name : undefined]
        })
        assert.deepStrictEqual(yield* named(), ["sql.transaction", "loadReport"])
        const outside = yield* Effect.currentSpan.pipe(Effect.option)
        assert.isTrue(Option.isNone(outside))
      })
    )

    it.effect("with retry, the generator body runs again from the start", () =>
      Effect.gen(function* () {
        yield* items
        let runs = 0
        const flaky = Transaction.fn("flaky", { retry: Schedule.recurs(3) })(function* (id: number) {
          runs++
          yield* insert(id)
          if (runs === 1) yield* serializationFailure
        })
        yield* flaky(9)
        assert.strictEqual(runs, 2)
        assert.deepStrictEqual(yield* committedIds, [9])
      })
    )

    it.effect("invalid options fail every call with InvalidOption, before anything is sent", () =>
      Effect.gen(function* () {
        const bad = Transaction.fn("bad", { timeout: -1 })(function* () {
          return yield* Effect.succeed(1)
        })
        const log = yield* Recorder.Recorder
        log.clear()
        assert.strictEqual(transactionError(yield* Effect.exit(bad())).reason, "InvalidOption")
        assert.deepStrictEqual(log.statements, [])
      })
    )
  })
})
