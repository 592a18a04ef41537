import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Deferred, Effect, Exit, Fiber, Option, Schema } from "effect"
import { Migrator, TestTransaction, Transaction, type TransactionError } from "effect-transaction"
import { serializationFailure } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = TestDatabase.layer()

/** Each run of an effect body writes a row here: counting rows counts runs that committed. */
const bodies = TestDatabase.setup(
  "DROP TABLE IF EXISTS bodies",
  "CREATE TABLE bodies (id serial PRIMARY KEY, key text NOT NULL)",
  "DROP TABLE IF EXISTS effect_transaction_idempotency"
)

const body = (key: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.map(
      sql<{ id: number }>`INSERT INTO bodies (key) VALUES (${key}) RETURNING id`,
      (rows) => `${key}#${rows[0]!.id}`
    )
  )

const committedBodies = (key?: string) =>
  Effect.flatMap(TestDatabase.TestDatabase, (db) =>
    Effect.map(
      key === undefined
        ? db.outside<{ n: number }>("SELECT count(*)::int AS n FROM bodies")
        : db.outside<{ n: number }>("SELECT count(*)::int AS n FROM bodies WHERE key = $1", [key]),
      (rows) => rows[0]!.n
    )
  )

/** The committed records (none when the table itself was never committed). */
const records = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
  Effect.flatMap(
    db.outside<{ present: boolean }>("SELECT to_regclass('effect_transaction_idempotency') IS NOT NULL AS present"),
    ([row]) =>
      row!.present
        ? db.outside<{ key: string; state: string }>(
            "SELECT key, state FROM effect_transaction_idempotency ORDER BY key"
          )
        : Effect.succeed([])
  )
)

class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", { sku: Schema.String }) {}

const failureOf = <A, E>(exit: Exit.Exit<A, E>) => {
  assert.isTrue(Exit.isFailure(exit), "expected a failure")
  return Option.getOrThrow(Exit.isFailure(exit) ? Cause.failureOption(exit.cause) : Option.none())
}

describe("Transaction.idempotent", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("32 fibers calling with 8 keys: exactly 8 bodies run, and every caller gets its key's result", () =>
      Effect.gen(function* () {
        yield* bodies
        const keys = Array.from({ length: 8 }, (_, i) => `order-${i}`)
        const results = yield* Effect.forEach(
          Array.from({ length: 32 }, (_, i) => keys[i % 8]!),
          (key) =>
            Effect.map(
              body(key).pipe(Transaction.idempotent({ key, success: Schema.String })),
              (result) => [key, result] as const
            ),
          { concurrency: "unbounded" }
        )
        assert.strictEqual(yield* committedBodies(), 8)
        for (const key of keys) {
          const seen = new Set(results.filter(([k]) => k === key).map(([, result]) => result))
          assert.strictEqual(seen.size, 1, `one result for ${key}`)
          assert.match([...seen][0]!, new RegExp(`^${key}#\\d+$`))
          assert.strictEqual(yield* committedBodies(key), 1)
        }
      })
    )

    it.effect(
      "at serializable with retry, concurrent calls with one key still commit one body and share its result",
      () =>
        Effect.gen(function* () {
          yield* bodies
          const results = yield* Effect.forEach(
            Array.from({ length: 8 }, () => "serial"),
            (key) =>
              body(key).pipe(
                Transaction.idempotent({ key, success: Schema.String }),
                Transaction.withTransaction({ isolation: "serializable", retry: true })
              ),
            { concurrency: "unbounded" }
          )
          assert.strictEqual(new Set(results).size, 1)
          assert.strictEqual(yield* committedBodies(), 1)
        })
    )

    it.effect("a later call replays the stored result, decoded, without running the effect", () =>
      Effect.gen(function* () {
        yield* bodies
        const Receipt = Schema.Struct({ id: Schema.String, at: Schema.Date })
        const charge = Effect.map(body("receipt"), (id) => ({ id, at: new Date("2026-01-02T03:04:05Z") })).pipe(
          Transaction.idempotent({ key: "receipt", success: Receipt })
        )
        const first = yield* charge
        const second = yield* charge
        assert.deepStrictEqual(second, first)
        assert.instanceOf(second.at, Date)
        assert.strictEqual(yield* committedBodies(), 1)
      })
    )

    it.effect("a failure the failure schema accepts is final: writes rolled back, failure recorded and replayed", () =>
      Effect.gen(function* () {
        yield* bodies
        let runs = 0
        const reserve = Effect.zipRight(
          Effect.sync(() => runs++),
          Effect.zipRight(body("stock"), Effect.fail(new OutOfStock({ sku: "A-1" })))
        ).pipe(Transaction.idempotent({ key: "stock", success: Schema.String, failure: OutOfStock }))
        const first = failureOf(yield* Effect.exit(reserve))
        const second = failureOf(yield* Effect.exit(reserve))
        assert.instanceOf(first, OutOfStock)
        assert.instanceOf(second, OutOfStock)
        // Compared as plain objects: the first failed inside the transaction's span, so Effect attached the span
        // to it (as it does to any error failed inside a span); the replayed one is decoded outside it.
        assert.deepStrictEqual({ ...second }, { ...first })
        assert.strictEqual(runs, 1)
        assert.strictEqual(yield* committedBodies(), 0, "the failed effect's writes were rolled back")
        assert.deepStrictEqual(yield* records, [{ key: "stock", state: "failed" }])
      })
    )

    it.effect(
      "defects, interruptions, unaccepted failures and retryable errors record nothing: the next call runs",
      () =>
        Effect.gen(function* () {
          yield* bodies
          const attempts: Array<Effect.Effect<string, unknown, SqlClient.SqlClient>> = [
            Effect.zipRight(body("k"), Effect.die("boom")),
            Effect.zipRight(body("k"), Effect.interrupt),
            Effect.zipRight(body("k"), Effect.fail("not an OutOfStock")),
            Effect.zipRight(body("k"), Effect.as(serializationFailure, "never"))
          ]
          for (const attempt of attempts) {
            const exit = yield* Effect.exit(
              attempt.pipe(Transaction.idempotent({ key: "k", success: Schema.String, failure: OutOfStock }))
            )
            assert.isTrue(Exit.isFailure(exit))
          }
          assert.strictEqual(yield* committedBodies(), 0)
          assert.deepStrictEqual(yield* records, [])
          const result = yield* body("k").pipe(Transaction.idempotent({ key: "k", success: Schema.String }))
          assert.match(result, /^k#\d+$/)
          assert.strictEqual(yield* committedBodies(), 1)
        })
    )

    it.effect("the same key with a different request fails with KeyReused and runs nothing", () =>
      Effect.gen(function* () {
        yield* bodies
        const pay = (cents: number) =>
          body("pay").pipe(
            Transaction.idempotent({ key: "pay", success: Schema.String, request: { cents, to: "ada" } })
          )
        yield* pay(100)
        // The same request, its keys in another order, replays.
        yield* body("pay").pipe(
          Transaction.idempotent({ key: "pay", success: Schema.String, request: { to: "ada", cents: 100 } })
        )
        const error = failureOf(yield* Effect.exit(pay(200))) as TransactionError.TransactionError
        assert.strictEqual(error.reason, "KeyReused")
        assert.match(error.message, /was used before for a different request/)
        assert.strictEqual(yield* committedBodies(), 1)
      })
    )

    it.effect(
      "a backend terminated between the effect's writes and COMMIT leaves the key free and nothing written",
      () =>
        Effect.gen(function* () {
          yield* bodies
          const crash = Effect.zipRight(
            body("crash"),
            Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT pg_terminate_backend(pg_backend_pid())`)
          ).pipe(Transaction.idempotent({ key: "crash", success: Schema.Unknown, failure: Schema.Unknown }))
          const exit = yield* Effect.exit(crash)
          assert.isTrue(Exit.isFailure(exit))
          assert.strictEqual(yield* committedBodies(), 0)
          assert.deepStrictEqual(yield* records, [])
          assert.match(
            yield* body("crash").pipe(Transaction.idempotent({ key: "crash", success: Schema.String })),
            /crash#/
          )
        })
    )

    it.effect("nested in an outer transaction it shares its fate: an outer rollback frees the key", () =>
      Effect.gen(function* () {
        yield* bodies
        const once = body("nested").pipe(Transaction.idempotent({ key: "nested", success: Schema.String }))
        const exit = yield* Effect.exit(
          Effect.zipRight(once, Effect.fail("outer fails")).pipe(Transaction.withTransaction())
        )
        assert.isTrue(Exit.isFailure(exit))
        assert.deepStrictEqual(yield* records, [])
        const [a, b] = yield* Effect.all([once, once]).pipe(Transaction.withTransaction())
        assert.strictEqual(a, b, "the second call in the same transaction replays the first")
        assert.strictEqual(yield* committedBodies(), 1)
      })
    )

    it.effect(
      "with retry: an attempt that hits a serialization failure is run again, and the result recorded once",
      () =>
        Effect.gen(function* () {
          yield* bodies
          let attempts = 0
          const flaky = Effect.zipRight(
            body("retry"),
            Effect.suspend(() => (++attempts === 1 ? Effect.asVoid(serializationFailure) : Effect.void))
          ).pipe(
            Effect.zipRight(Effect.succeed("done")),
            Transaction.idempotent({ key: "retry", success: Schema.String }),
            Transaction.withTransaction({ retry: true })
          )
          assert.strictEqual(yield* flaky, "done")
          assert.strictEqual(yield* flaky, "done")
          assert.strictEqual(attempts, 2)
          assert.strictEqual(yield* committedBodies(), 1)
        })
    )

    it.effect("with timeout: a body that overruns is rolled back and records nothing", () =>
      Effect.gen(function* () {
        yield* bodies
        const slow = Effect.zipRight(body("slow"), Effect.sleep("2 seconds")).pipe(
          Effect.as("late"),
          Transaction.idempotent({ key: "slow", success: Schema.String, failure: Schema.Unknown }),
          Transaction.withTransaction({ timeout: "200 millis" })
        )
        const error = failureOf(yield* Effect.exit(slow)) as TransactionError.TransactionError
        assert.strictEqual(error.reason, "Timeout")
        assert.deepStrictEqual(yield* records, [])
        assert.strictEqual(yield* committedBodies(), 0)
      })
    )

    it.effect("calls with different keys do not wait for each other", () =>
      Effect.gen(function* () {
        yield* bodies
        const release = yield* Deferred.make<void>()
        const started = yield* Deferred.make<void>()
        const held = yield* Effect.fork(
          Effect.zipRight(Deferred.succeed(started, undefined), Deferred.await(release)).pipe(
            Effect.as("a"),
            Transaction.idempotent({ key: "hold-a", success: Schema.String })
          )
        )
        yield* Deferred.await(started)
        const other = yield* body("b").pipe(
          Transaction.idempotent({ key: "hold-b", success: Schema.String }),
          Effect.timeoutFail({ duration: "3 seconds", onTimeout: () => "key b waited for key a" })
        )
        assert.match(other, /^b#/)
        yield* Deferred.succeed(release, undefined)
        assert.strictEqual(yield* Fiber.join(held), "a")
      })
    )

    it.effect("expired records free their key, and purgeIdempotencyRecords deletes them", () =>
      Effect.gen(function* () {
        yield* bodies
        const short = body("short").pipe(
          Transaction.idempotent({ key: "short", success: Schema.String, expiresAfter: "100 millis" })
        )
        const first = yield* short
        yield* Effect.sleep("300 millis")
        const second = yield* short
        assert.notStrictEqual(second, first, "the expired key ran again")
        yield* Effect.sleep("300 millis")
        assert.strictEqual(yield* Transaction.purgeIdempotencyRecords, 1)
        assert.deepStrictEqual(yield* records, [])
      })
    )

    it.effect("the shipped migration creates the table idempotent uses", () =>
      Effect.gen(function* () {
        yield* bodies
        yield* Migrator.up({
          loader: Effect.succeed([[1, "idempotency", Effect.succeed(Migrator.idempotencyTable)]]),
          table: "idempotency_migrations"
        })
        const db = yield* TestDatabase.TestDatabase
        const [present] = yield* db.outside<{ ok: boolean }>(
          "SELECT to_regclass('effect_transaction_idempotency') IS NOT NULL AS ok"
        )
        assert.isTrue(present!.ok)
        assert.match(yield* body("m").pipe(Transaction.idempotent({ key: "m", success: Schema.String })), /^m#/)
      })
    )

    it.effect("under TestTransaction it replays within the test and leaves nothing behind", () =>
      Effect.gen(function* () {
        yield* bodies
        const once = body("test").pipe(Transaction.idempotent({ key: "test", success: Schema.String }))
        const [a, b] = yield* Effect.all([once, once]).pipe(TestTransaction.isolate)
        assert.strictEqual(a, b)
        assert.strictEqual(yield* committedBodies(), 0)
        const db = yield* TestDatabase.TestDatabase
        const [present] = yield* db.outside<{ ok: boolean }>(
          "SELECT to_regclass('effect_transaction_idempotency') IS NOT NULL AS ok"
        )
        assert.isFalse(present!.ok, "the table made on first use in the test was rolled back too")
      })
    )

    it.effect("bad options fail with InvalidOption before anything runs", () =>
      Effect.gen(function* () {
        const cases: ReadonlyArray<Transaction.IdempotentOptions<string, string, never, never, never, never>> = [
          { key: "", success: Schema.String },
          { key: "k", scope: "", success: Schema.String },
          { key: "k", success: Schema.String, expiresAfter: "0 millis" }
        ]
        for (const options of cases) {
          const error = failureOf(
            yield* Effect.exit(Effect.succeed("x").pipe(Transaction.idempotent(options)))
          ) as TransactionError.TransactionError
          assert.strictEqual(error.reason, "InvalidOption")
        }
      })
    )

    it.effect(
      "at repeatable read, a call that waited on the key never runs the effect: it fails retryably, then replays",
      () =>
        Effect.gen(function* () {
          yield* bodies
          let runs = 0
          const release = yield* Deferred.make<void>()
          const holding = yield* Deferred.make<void>()
          const call = (first: boolean) =>
            Effect.zipRight(
              Effect.sync(() => runs++),
              first ? Effect.zipRight(Deferred.succeed(holding, undefined), Deferred.await(release)) : Effect.void
            ).pipe(
              Effect.zipRight(body("rr")),
              Transaction.idempotent({ key: "rr", success: Schema.String }),
              Transaction.withTransaction({ isolation: "repeatable read" })
            )
          const first = yield* Effect.fork(call(true))
          yield* Deferred.await(holding)
          const waiter = yield* Effect.fork(Effect.exit(call(false)))
          yield* Effect.sleep("200 millis")
          yield* Deferred.succeed(release, undefined)
          const recorded = yield* Fiber.join(first)
          const error = failureOf(yield* Fiber.join(waiter)) as TransactionError.TransactionError
          assert.strictEqual(error.reason, "SerializationFailure")
          assert.strictEqual(runs, 1, "the waiter did not run the effect")
          const again = yield* call(false)
          assert.strictEqual(again, recorded)
          assert.strictEqual(runs, 1)
        })
    )

    it.effect("retryable errors are not recorded even when the failure schema would accept them", () =>
      Effect.gen(function* () {
        yield* bodies
        const exit = yield* Effect.exit(
          Effect.zipRight(body("transient"), Effect.as(serializationFailure, "x")).pipe(
            Transaction.idempotent({ key: "transient", success: Schema.String, failure: Schema.Unknown })
          )
        )
        assert.isTrue(Exit.isFailure(exit))
        assert.deepStrictEqual(yield* records, [])
      })
    )

    it.effect(
      "a result whose encoded form is not JSON fails with InvalidOption, commits nothing and records nothing",
      () =>
        Effect.gen(function* () {
          yield* bodies
          const cases: ReadonlyArray<Effect.Effect<unknown, unknown, SqlClient.SqlClient>> = [
            Effect.map(body("json-1"), () => new Date(0)).pipe(
              Transaction.idempotent({ key: "json-1", success: Schema.DateFromSelf })
            ),
            Effect.map(body("json-2"), () => 1n).pipe(
              Transaction.idempotent({ key: "json-2", success: Schema.BigIntFromSelf })
            ),
            Effect.map(body("json-3"), () => Number.POSITIVE_INFINITY).pipe(
              Transaction.idempotent({ key: "json-3", success: Schema.Number })
            )
          ]
          for (const call of cases) {
            const error = failureOf(yield* Effect.exit(call)) as TransactionError.TransactionError
            assert.strictEqual(error.reason, "InvalidOption")
            assert.match(error.message, /JSON/)
          }
          assert.strictEqual(yield* committedBodies(), 0)
          assert.deepStrictEqual(yield* records, [])
        })
    )

    it.effect(
      "requests that differ in kind have different fingerprints; those that cannot be fingerprinted are refused",
      () =>
        Effect.gen(function* () {
          yield* bodies
          const pairs: ReadonlyArray<readonly [unknown, unknown]> = [
            [new Map([["cents", 100]]), new Map([["cents", 999]])],
            [{ at: new Date(0) }, { at: "1970-01-01T00:00:00.000Z" }],
            [{ n: 1n }, { n: "1" }],
            [{ a: Number.NaN }, { a: null }],
            [{ o: Option.none() }, { o: {} }],
            [new Set([1]), [1]]
          ]
          let n = 0
          for (const [first, second] of pairs) {
            const key = `fp-${n++}`
            yield* Effect.succeed("x").pipe(Transaction.idempotent({ key, success: Schema.String, request: first }))
            const error = failureOf(
              yield* Effect.exit(
                Effect.succeed("x").pipe(Transaction.idempotent({ key, success: Schema.String, request: second }))
              )
            ) as TransactionError.TransactionError
            assert.strictEqual(error.reason, "KeyReused", key)
          }
          const cyclic: Record<string, unknown> = {}
          cyclic.self = cyclic
          for (const request of [cyclic, { f: () => 1 }]) {
            const error = failureOf(
              yield* Effect.exit(
                Effect.succeed("x").pipe(Transaction.idempotent({ key: "fp-bad", success: Schema.String, request }))
              )
            ) as TransactionError.TransactionError
            assert.strictEqual(error.reason, "InvalidOption")
          }
        })
    )

    it.effect("a key too long for the index is refused before anything runs", () =>
      Effect.gen(function* () {
        yield* bodies
        const error = failureOf(
          yield* Effect.exit(
            body("long").pipe(Transaction.idempotent({ key: "k".repeat(6000), success: Schema.String }))
          )
        ) as TransactionError.TransactionError
        assert.strictEqual(error.reason, "InvalidOption")
        assert.strictEqual(yield* committedBodies(), 0)
      })
    )

    it.effect("expiry counts from when the outcome is recorded, not from when the transaction began", () =>
      Effect.gen(function* () {
        yield* bodies
        const slow = Effect.zipRight(Effect.sleep("400 millis"), body("late")).pipe(
          Transaction.idempotent({ key: "late", success: Schema.String, expiresAfter: "300 millis" })
        )
        const first = yield* slow
        const fast = body("late").pipe(Transaction.idempotent({ key: "late", success: Schema.String }))
        assert.strictEqual(yield* fast, first, "replayed: the record is still live right after its commit")
      })
    )
  })
})
