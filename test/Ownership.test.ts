/**
 * Regressions of the transaction's connection ownership: the `timeout` option, cancelling statements and COMMIT,
 * terminated backends, hooks of interrupted callers, and small pools. Each test is named after what broke; a hang
 * is bounded so that it fails the test instead of the run.
 */
import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Deferred, Effect, Exit, Fiber, Option } from "effect"
import { Transaction } from "effect-transaction"
import { committedIds, idleInTransaction, insert, items, slowCommitTable, transactionError } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

/** A hang becomes a test failure. */
const bounded = <A, E, R>(effect: Effect.Effect<A, E, R>, duration: "5 seconds" | "15 seconds" = "15 seconds") =>
  Effect.timeoutFail(effect, { duration, onTimeout: () => `hang: the program did not finish within ${duration}` })

const elapsed = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.gen(function* () {
    const started = Date.now()
    const exit = yield* Effect.exit(effect)
    return [exit, Date.now() - started] as const
  })

const slowRows = Effect.flatMap(TestDatabase.TestDatabase, (db) =>
  Effect.map(db.outside<{ id: number }>("SELECT id FROM slow ORDER BY id"), (rows) => rows.map((row) => row.id))
)

const running = (query: string) =>
  Effect.flatMap(TestDatabase.TestDatabase, (db) =>
    db.outside<{ pid: number }>("SELECT pid FROM pg_stat_activity WHERE query = $1 AND state = 'active'", [query])
  )

/** A fresh transaction is served within 100 ms: the pool is not wedged. */
const servedPromptly = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const [exit, ms] = yield* elapsed(sql`SELECT 1`.pipe(Transaction.withTransaction(), bounded))
  assert.isTrue(
    Exit.isSuccess(exit),
    `a fresh transaction failed: ${Exit.isFailure(exit) ? Cause.pretty(exit.cause) : ""}`
  )
  assert.isBelow(ms, 100, `a fresh transaction took ${ms} ms`)
})

/** Holds every connection of a pool of `n` in open transactions until `release`. */
const holdAll = (n: number) =>
  Effect.gen(function* () {
    const held = yield* Deferred.make<void>()
    const release = yield* Deferred.make<void>()
    let holding = 0
    const fibers = yield* Effect.forEach(
      Array.from({ length: n }, (_, i) => i),
      () =>
        Effect.fork(
          Effect.suspend(() => (++holding === n ? Deferred.succeed(held, undefined) : Effect.void)).pipe(
            Effect.zipRight(Deferred.await(release)),
            Transaction.withTransaction()
          )
        ),
      { concurrency: "unbounded" }
    )
    yield* Deferred.await(held)
    return {
      release: Effect.zipRight(
        Deferred.succeed(release, undefined),
        Effect.forEach(fibers, Fiber.join, { discard: true })
      )
    }
  })

const poolOf = (n: number) => TestDatabase.layer({ applicationName: `etx-ownership-${n}`, maxConnections: n })

for (const pool of [1, 2]) {
  describe(`a pool of ${pool}`, () => {
    layer(poolOf(pool), { excludeTestServices: true })((it) => {
      it.effect("a transaction with timeout returns as soon as its body commits", () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const [exit, ms] = yield* elapsed(
            sql`SELECT 1`.pipe(Transaction.withTransaction({ timeout: "2 seconds" }), bounded)
          )
          assert.isTrue(Exit.isSuccess(exit), Exit.isFailure(exit) ? Cause.pretty(exit.cause) : "")
          assert.isBelow(ms, 1000, `took ${ms} ms`)
          yield* servedPromptly
        })
      )

      it.effect("a timeout during a slow COMMIT returns and leaves the pool usable", () =>
        Effect.gen(function* () {
          yield* slowCommitTable(1)
          const sql = yield* SqlClient.SqlClient
          const [exit, ms] = yield* elapsed(
            sql`INSERT INTO slow VALUES (1)`.pipe(Transaction.withTransaction({ timeout: "300 millis" }), bounded)
          )
          const error = transactionError(exit)
          assert.strictEqual(error.reason, "Timeout")
          assert.match(error.message, /COMMIT was still running/)
          assert.isBelow(ms, 900, `took ${ms} ms`)
          assert.deepStrictEqual(yield* slowRows, [])
          assert.strictEqual(yield* idleInTransaction, 0)
          yield* servedPromptly
        })
      )

      it.effect(`${pool * 2} transactions timing out during slow COMMITs all return and leave the pool usable`, () =>
        Effect.gen(function* () {
          yield* slowCommitTable(1)
          const sql = yield* SqlClient.SqlClient
          const [exits, ms] = yield* elapsed(
            Effect.forEach(
              Array.from({ length: pool * 2 }, (_, i) => i + 1),
              (id) =>
                Effect.exit(
                  sql`INSERT INTO slow VALUES (${id})`.pipe(Transaction.withTransaction({ timeout: "300 millis" }))
                ),
              { concurrency: "unbounded" }
            ).pipe(bounded)
          )
          assert.isTrue(Exit.isSuccess(exits), `took ${ms} ms`)
          for (const exit of Exit.isSuccess(exits) ? exits.value : []) {
            assert.strictEqual(transactionError(exit).reason, "Timeout")
          }
          // Every timeout counts from its call: the second half waited for the pool and timed out there.
          assert.isBelow(ms, 2500, `took ${ms} ms`)
          assert.deepStrictEqual(yield* slowRows, [])
          yield* servedPromptly
        })
      )

      it.effect("an outer Effect.timeout during a slow COMMIT fires, and the pool stays usable", () =>
        Effect.gen(function* () {
          yield* slowCommitTable(1)
          const sql = yield* SqlClient.SqlClient
          const [exit, ms] = yield* elapsed(
            sql`INSERT INTO slow VALUES (1)`.pipe(
              Transaction.withTransaction({ timeout: "5 seconds" }),
              Effect.timeout("300 millis"),
              bounded
            )
          )
          // COMMIT is never abandoned: it runs to its end (1 s), and the caller sees that it committed.
          assert.isTrue(Exit.isSuccess(exit) || Exit.isFailure(exit), String(exit))
          assert.isBelow(ms, 3000, `took ${ms} ms`)
          yield* servedPromptly
        })
      )

      it.effect("cancelling a running statement takes no pooled connection", () =>
        Effect.gen(function* () {
          yield* items
          const sql = yield* SqlClient.SqlClient
          const [exit, ms] = yield* elapsed(
            Effect.zipRight(insert(1), sql`SELECT pg_sleep(3)`).pipe(
              Transaction.withTransaction(),
              Effect.timeout("300 millis"),
              bounded
            )
          )
          assert.isTrue(Exit.isFailure(exit))
          assert.isBelow(ms, 1000, `took ${ms} ms`)
          assert.deepStrictEqual(yield* running("SELECT pg_sleep(3)"), [])
          assert.deepStrictEqual(yield* committedIds, [])
          yield* servedPromptly
        })
      )

      it.effect("a cancelled statement never cancels a later transaction's statement", () =>
        Effect.gen(function* () {
          yield* items
          const sql = yield* SqlClient.SqlClient
          for (let i = 0; i < 5; i++) {
            yield* sql`SELECT pg_sleep(3)`.pipe(
              Transaction.withTransaction(),
              Effect.timeout("100 millis"),
              Effect.exit
            )
            const later = yield* sql`SELECT pg_sleep(0.3)`.pipe(Transaction.withTransaction(), bounded, Effect.exit)
            assert.isTrue(Exit.isSuccess(later), Exit.isFailure(later) ? Cause.pretty(later.cause) : "")
          }
        })
      )

      it.effect("an interrupt followed by a terminated backend neither hangs nor loses a pool slot", () =>
        Effect.gen(function* () {
          yield* items
          const sql = yield* SqlClient.SqlClient
          const db = yield* TestDatabase.TestDatabase
          const pid = yield* Deferred.make<number>()
          const fiber = yield* Effect.fork(
            Effect.gen(function* () {
              yield* insert(1)
              const [row] = yield* sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`
              yield* Deferred.succeed(pid, row!.pid)
              yield* sql`SELECT pg_sleep(10)`
            }).pipe(Transaction.withTransaction())
          )
          const backend = yield* Deferred.await(pid)
          yield* TestDatabase.eventually(running("SELECT pg_sleep(10)"), (rows) => rows.length > 0)
          const interrupting = yield* Effect.fork(Fiber.interrupt(fiber))
          yield* db.outside("SELECT pg_terminate_backend($1)", [backend])
          const exit = yield* bounded(Fiber.join(interrupting))
          assert.isTrue(Exit.isInterrupted(exit))
          assert.deepStrictEqual(yield* committedIds, [])
          // Every connection of the pool can still be had at once.
          yield* Effect.forEach(
            Array.from({ length: pool }, (_, i) => i + 10),
            (id) => Effect.zipRight(insert(id), sql`SELECT pg_sleep(0.1)`).pipe(Transaction.withTransaction()),
            { concurrency: "unbounded", discard: true }
          ).pipe(bounded)
          yield* servedPromptly
        })
      )

      it.effect("Effect.timeout around a transaction waiting for a connection of a full pool returns on time", () =>
        Effect.gen(function* () {
          const held = yield* Deferred.make<void>()
          const release = yield* Deferred.make<void>()
          const holders = yield* Effect.forEach(
            Array.from({ length: pool }, (_, i) => i),
            () =>
              Effect.fork(
                Effect.zipRight(Deferred.succeed(held, undefined), Deferred.await(release)).pipe(
                  Transaction.withTransaction()
                )
              ),
            { concurrency: "unbounded" }
          )
          yield* Deferred.await(held)
          yield* Effect.sleep("100 millis")
          const [exit, ms] = yield* elapsed(
            Effect.void.pipe(Transaction.withTransaction(), Effect.timeout("300 millis"), bounded)
          )
          assert.isTrue(
            Exit.isFailure(exit) && Cause.isFailType(exit.cause) && Cause.isTimeoutException(exit.cause.error),
            `expected a TimeoutException, got ${Exit.isFailure(exit) ? Cause.pretty(exit.cause) : "a success"}`
          )
          assert.isBelow(ms, 2000, `the timeout fired after ${ms} ms`)
          yield* Deferred.succeed(release, undefined)
          yield* Effect.forEach(holders, Fiber.join, { discard: true })
          yield* servedPromptly
        })
      )

      it.effect(
        "acquireTimeout and timeout longer than a timer's longest delay keep waiting instead of firing at once",
        () =>
          Effect.gen(function* () {
            const sql = yield* SqlClient.SqlClient
            const holders = yield* holdAll(pool)
            const waiters = yield* Effect.forEach(
              [{ acquireTimeout: "30 days" }, { timeout: "30 days" }] as const,
              (options) => Effect.fork(sql`SELECT 1`.pipe(Transaction.withTransaction(options))),
              { concurrency: "unbounded" }
            )
            yield* Effect.sleep("200 millis")
            for (const waiter of waiters) {
              const done = yield* Fiber.poll(waiter)
              assert.isTrue(Option.isNone(done), `a 30-day wait ended after 200 ms: ${JSON.stringify(done)}`)
            }
            yield* holders.release
            for (const waiter of waiters) assert.isTrue(Exit.isSuccess(yield* bounded(Fiber.await(waiter))))
            yield* servedPromptly
          })
      )

      it.effect("hundreds of waiters that gave up do not lose the pool's connections when they are freed", () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const holders = yield* holdAll(pool)
          const waiters = yield* Effect.forEach(
            Array.from({ length: 1000 }, (_, i) => i),
            (i) =>
              Effect.fork(
                sql`SELECT 1`.pipe(Transaction.withTransaction(i % 2 === 0 ? {} : { acquireTimeout: "50 millis" }))
              ),
            { concurrency: "unbounded" }
          )
          yield* Effect.sleep("100 millis")
          yield* Effect.forEach(waiters, Fiber.interrupt, { concurrency: "unbounded", discard: true })
          yield* holders.release
          // Each connection goes through every abandoned reservation in turn, and comes back to the pool.
          yield* Effect.sleep("200 millis")
          yield* servedPromptly
        })
      )

      it.effect("waiters interrupted while they wait in their own fiber give every connection back to the pool", () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          // After the pool's first answers, transactions without acquireTimeout or timeout wait in their own fiber.
          yield* servedPromptly
          yield* servedPromptly
          for (let round = 0; round < 3; round++) {
            const holders = yield* holdAll(pool)
            const waiters = yield* Effect.forEach(
              Array.from({ length: 50 }, (_, i) => i),
              () => Effect.fork(sql`SELECT 1`.pipe(Transaction.withTransaction())),
              { concurrency: "unbounded" }
            )
            yield* Effect.sleep("50 millis")
            const [, ms] = yield* elapsed(
              Effect.forEach(waiters, Fiber.interrupt, { concurrency: "unbounded", discard: true })
            )
            assert.isBelow(ms, 1000, `interrupting the waiters took ${ms} ms`)
            yield* holders.release
            // Every connection of the pool is back: as many transactions as connections hold one each at once.
            const again = yield* holdAll(pool)
            yield* again.release
          }
          yield* servedPromptly
        }).pipe(bounded)
      )

      it.effect("a backend terminated during COMMIT: a typed error, and the pool recovers", () =>
        Effect.gen(function* () {
          yield* slowCommitTable(2)
          const sql = yield* SqlClient.SqlClient
          const db = yield* TestDatabase.TestDatabase
          const pid = yield* Deferred.make<number>()
          const fiber = yield* Effect.fork(
            Effect.gen(function* () {
              const [row] = yield* sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`
              yield* sql`INSERT INTO slow VALUES (1)`
              yield* Deferred.succeed(pid, row!.pid)
            }).pipe(Transaction.withTransaction({ timeout: "10 seconds" }))
          )
          const backend = yield* Deferred.await(pid)
          yield* TestDatabase.eventually(running("COMMIT"), (rows) => rows.length > 0)
          yield* db.outside("SELECT pg_terminate_backend($1)", [backend])
          const exit = yield* bounded(Fiber.await(fiber))
          const error = transactionError(exit)
          assert.strictEqual(error.reason, "CommitFailed")
          assert.isTrue(error.outcomeUnknown)
          assert.deepStrictEqual(yield* slowRows, [])
          yield* servedPromptly
        })
      )
    })
  })
}

describe("hooks and interrupted callers", () => {
  layer(poolOf(2), { excludeTestServices: true })((it) => {
    it.effect("an afterCommit hook runs when the caller is interrupted during a COMMIT that succeeded", () =>
      Effect.gen(function* () {
        yield* slowCommitTable(0.5)
        const sql = yield* SqlClient.SqlClient
        const sent = yield* Deferred.make<string>()
        const exit = yield* Effect.gen(function* () {
          yield* sql`INSERT INTO slow VALUES (1)`
          yield* Transaction.afterCommit(Deferred.succeed(sent, "welcome e-mail"))
        }).pipe(Transaction.withTransaction(), Effect.timeout("150 millis"), Effect.exit)
        assert.isTrue(Exit.isFailure(exit))
        assert.deepStrictEqual(yield* slowRows, [1])
        assert.deepStrictEqual(yield* bounded(Deferred.await(sent), "5 seconds"), "welcome e-mail")
      })
    )

    it.effect("an afterCommit hook runs when the caller is interrupted right after COMMIT", () =>
      Effect.gen(function* () {
        yield* items
        const committed = yield* Deferred.make<void>()
        const sent = yield* Deferred.make<void>()
        const fiber = yield* Effect.fork(
          Effect.gen(function* () {
            yield* insert(1)
            // Blocks the hooks until the caller has been interrupted.
            yield* Transaction.afterCommit(
              Effect.zipRight(Deferred.succeed(committed, undefined), Effect.sleep("200 millis"))
            )
            yield* Transaction.afterCommit(Deferred.succeed(sent, undefined))
          }).pipe(Transaction.withTransaction())
        )
        yield* Deferred.await(committed)
        yield* Fiber.interrupt(fiber)
        assert.deepStrictEqual(yield* committedIds, [1])
        assert.isTrue(Option.isSome(yield* Deferred.poll(sent)), "the second hook did not run")
      })
    )

    it.effect("a synchronous throw while the connection is held does not leave it held", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.gen(function* () {
          yield* Effect.exit(
            Effect.gen(function* () {
              yield* insert(1)
              for (let i = 0; i < 300_000; i++) yield* Transaction.afterCommit(Effect.void)
            }).pipe(Transaction.withTransaction())
          )
          yield* insert(2)
        }).pipe(Transaction.withTransaction(), bounded, Effect.exit)
        assert.isTrue(Exit.isSuccess(exit), Exit.isFailure(exit) ? Cause.pretty(exit.cause) : "")
        assert.deepStrictEqual(yield* committedIds, [1, 2])
        yield* servedPromptly
      })
    )
  })
})
