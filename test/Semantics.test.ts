/**
 * Regressions of what the engine promises beyond its connection: what `timeout` bounds, retry of failures that
 * arrive as defects, validation of bad input, diagnostics of aborted blocks, and the order of hooks.
 */
import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { PgClient } from "@effect/sql-pg"
import { Cause, Deferred, Duration, Effect, Exit, Fiber, Layer, Schedule, Stream } from "effect"
import { Transaction } from "effect-transaction"
import {
  committedIds,
  insert,
  items,
  serializationFailure,
  slowCommitTable,
  transactionError
} from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = TestDatabase.layer({ applicationName: "etx-semantics" })

const bounded = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.timeoutFail(effect, { duration: "15 seconds", onTimeout: () => "hang: the program did not finish" })

describe("what timeout bounds", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("timeout does not change what happens to a forked, unjoined statement", () =>
      Effect.gen(function* () {
        yield* items
        for (const options of [{}, { timeout: "5 seconds" }] as const) {
          yield* items
          const sql = yield* SqlClient.SqlClient
          const exit = yield* Effect.gen(function* () {
            yield* insert(1)
            // One statement still running when the body returns: COMMIT waits for it.
            yield* Effect.fork(sql`INSERT INTO items (id) SELECT 2 FROM pg_sleep(0.2)`)
            yield* Effect.sleep("50 millis")
          }).pipe(Transaction.withTransaction(options), bounded, Effect.exit)
          assert.isTrue(
            Exit.isSuccess(exit),
            `${JSON.stringify(options)}: ${Exit.isFailure(exit) ? Cause.pretty(exit.cause) : ""}`
          )
          assert.deepStrictEqual(yield* committedIds, [1, 2], JSON.stringify(options))
        }
      })
    )

    it.effect("timeout bounds the whole call with its retries", () =>
      Effect.gen(function* () {
        let attempts = 0
        const started = Date.now()
        const exit = yield* Effect.suspend(() => {
          attempts++
          return serializationFailure
        }).pipe(
          Transaction.withTransaction({ timeout: "1 second", retry: Schedule.spaced("10 millis") }),
          bounded,
          Effect.exit
        )
        const elapsed = Date.now() - started
        assert.strictEqual(transactionError(exit).reason, "Timeout")
        assert.isBelow(elapsed, 3000, `took ${elapsed} ms`)
        assert.isBelow(attempts, 200, `${attempts} attempts`)
      })
    )
  })
})

describe("retry", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("retry catches a serialization failure that reaches it as a defect", () =>
      Effect.gen(function* () {
        let attempts = 0
        const result = yield* Effect.suspend(() => {
          attempts++
          return attempts < 3 ? Effect.as(Effect.orDie(serializationFailure), "conflict") : Effect.succeed("done")
        }).pipe(Transaction.withTransaction({ retry: true }))
        assert.strictEqual(result, "done")
        assert.strictEqual(attempts, 3)
      })
    )

    it.effect("a defect that is not retryable is not retried", () =>
      Effect.gen(function* () {
        let attempts = 0
        const exit = yield* Effect.suspend(() => {
          attempts++
          return Effect.die(new Error("bug"))
        }).pipe(Transaction.withTransaction({ retry: true }), Effect.exit)
        assert.isTrue(Exit.isFailure(exit) && Cause.isDie(exit.cause))
        assert.strictEqual(attempts, 1)
      })
    )
  })
})

describe("bad input", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("bigint durations of zero or less are InvalidOption errors", () =>
      Effect.gen(function* () {
        for (const value of [0n, -5n]) {
          const exit = yield* Effect.exit(Effect.void.pipe(Transaction.withTransaction({ timeout: value })))
          assert.strictEqual(transactionError(exit).reason, "InvalidOption")
        }
      })
    )

    it.effect("durations above PostgreSQL's limit are InvalidOption errors before BEGIN", () =>
      Effect.gen(function* () {
        for (const name of ["statementTimeout", "lockTimeout", "idleTimeout"] as const) {
          const exit = yield* Effect.exit(Effect.void.pipe(Transaction.withTransaction({ [name]: "25 days" })))
          const error = transactionError(exit)
          assert.strictEqual(error.reason, "InvalidOption")
          assert.match(error.message, new RegExp(name))
        }
      })
    )

    it.effect("an unknown option key is an InvalidOption error, never silently ignored", () =>
      Effect.gen(function* () {
        yield* items
        const options = { isolationLevel: "serializable" } as unknown as Transaction.Options
        const exit = yield* Effect.exit(insert(1).pipe(Transaction.withTransaction(options)))
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "InvalidOption")
        assert.match(error.message, /isolationLevel/)
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )
  })
})

describe("diagnostics", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("a CommitFailed after a caught statement error names the statement and carries its error", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const exit = yield* Effect.gen(function* () {
          yield* insert(1)
          yield* Effect.ignore(sql`SELECT 1 / 0`)
        }).pipe(Transaction.withTransaction(), Effect.exit)
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "CommitFailed")
        assert.strictEqual(error.sqlState, "25P02")
        assert.match(error.message, /SELECT 1 \/ 0/)
        assert.isDefined(error.cause)
        assert.strictEqual(error.outcomeUnknown, undefined)
      })
    )
  })
})

describe("the outcome of a failed COMMIT", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("a COMMIT cancelled with 57014 rolled back: CommitFailed whose outcome is known", () =>
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
          }).pipe(Transaction.withTransaction())
        )
        const backend = yield* Deferred.await(pid)
        yield* TestDatabase.eventually(
          db.outside("SELECT pid FROM pg_stat_activity WHERE pid = $1 AND query = 'COMMIT' AND state = 'active'", [
            backend
          ]),
          (rows) => rows.length > 0
        )
        yield* db.outside("SELECT pg_cancel_backend($1)", [backend])
        const error = transactionError(yield* bounded(Fiber.await(fiber)))
        assert.strictEqual(error.reason, "CommitFailed")
        assert.strictEqual(error.sqlState, "57014")
        assert.notStrictEqual(error.outcomeUnknown, true)
        assert.notMatch(error.message, /unknown/)
        assert.deepStrictEqual(yield* db.outside("SELECT * FROM slow"), [])
      })
    )
  })
})

describe("hooks", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("hooks registered by different fibers run in registration order", () =>
      Effect.gen(function* () {
        yield* items
        const order: Array<string> = []
        const note = (entry: string) => Effect.sync(() => void order.push(entry))
        const firstRegistered = yield* Deferred.make<void>()
        yield* Effect.gen(function* () {
          // The slow block registers first and ends last.
          const slow = yield* Effect.fork(
            Effect.gen(function* () {
              yield* Transaction.afterCommit(note("first"))
              yield* Deferred.succeed(firstRegistered, undefined)
              yield* Effect.sleep("100 millis")
            }).pipe(Transaction.withTransaction())
          )
          yield* Deferred.await(firstRegistered)
          yield* Transaction.afterCommit(note("second"))
          yield* Fiber.join(slow)
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(order, ["first", "second"])
      })
    )
  })
})

describe("fibers that outlive their transaction", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("a daemon fiber forked inside a transaction can open its own transaction after the first ended", () =>
      Effect.gen(function* () {
        yield* items
        const goOn = yield* Deferred.make<void>()
        const daemon = yield* Effect.gen(function* () {
          yield* insert(1)
          return yield* Effect.forkDaemon(
            Effect.zipRight(Deferred.await(goOn), insert(2).pipe(Transaction.requiresNew()))
          )
        }).pipe(Transaction.withTransaction())
        yield* Deferred.succeed(goOn, undefined)
        const exit = yield* Fiber.await(daemon)
        assert.isTrue(Exit.isSuccess(exit), Exit.isFailure(exit) ? Cause.pretty(exit.cause) : "")
        assert.deepStrictEqual(yield* committedIds, [1, 2])
      })
    )
  })
})

describe("one fiber never deadlocks with itself", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect(
      "begin inside a transaction, handle.run, then a plain statement before commit: a typed error, at once",
      () =>
        Effect.gen(function* () {
          yield* items
          const plain = yield* Effect.gen(function* () {
            const handle = yield* Transaction.begin()
            yield* handle.run(insert(1))
            const plain = yield* Effect.exit(insert(2))
            yield* handle.commit
            return plain
          }).pipe(Effect.scoped, Transaction.withTransaction(), bounded)
          assert.isTrue(Exit.isFailure(plain))
          const error = Exit.isFailure(plain) ? Cause.squash(plain.cause) : undefined
          const reason = (error as { cause?: { reason?: string } } | undefined)?.cause?.reason
          assert.strictEqual(reason, "WouldDeadlock")
          assert.match(String((error as { message?: string }).message), /Transaction\.begin/)
          assert.deepStrictEqual(yield* committedIds, [1])
        })
    )

    it.effect("a nested block opened by the fiber that holds a handle open fails at once with WouldDeadlock", () =>
      Effect.gen(function* () {
        const nested = yield* Effect.gen(function* () {
          const handle = yield* Transaction.begin()
          const nested = yield* Effect.exit(Effect.void.pipe(Transaction.withTransaction()))
          yield* handle.rollback
          return nested
        }).pipe(Effect.scoped, Transaction.withTransaction(), bounded)
        assert.strictEqual(transactionError(nested).reason, "WouldDeadlock")
      })
    )
  })
})

/** The WouldDeadlock error inside a statement's SqlError, or a block's own. */
const wouldDeadlock = (cause: Cause.Cause<unknown>) => {
  const error = Cause.squash(cause) as {
    reason?: string
    cause?: { reason?: string; message?: string }
    message?: string
  }
  return error.reason === "WouldDeadlock" ? error : error.cause?.reason === "WouldDeadlock" ? error.cause : undefined
}

describe("shapes that deadlock by construction end within deadlockTimeout", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("a nested block that joins a fiber needing the outer block fails with WouldDeadlock", () =>
      Effect.gen(function* () {
        yield* items
        const go = yield* Deferred.make<void>()
        const started = Date.now()
        const exit = yield* Effect.gen(function* () {
          const needsOuter = yield* Effect.fork(Effect.zipRight(Deferred.await(go), insert(1)))
          yield* Effect.gen(function* () {
            yield* insert(2)
            yield* Deferred.succeed(go, undefined)
            yield* Fiber.join(needsOuter)
          }).pipe(Transaction.withTransaction())
        }).pipe(Transaction.withTransaction({ deadlockTimeout: "300 millis" }), Effect.exit, bounded)
        const elapsed = Date.now() - started
        assert.isTrue(Exit.isFailure(exit))
        const error = Exit.isFailure(exit) ? wouldDeadlock(exit.cause) : undefined
        assert.isDefined(error, "the failure is a WouldDeadlock")
        assert.match(String(error!.message), /waited 300 ms \(deadlockTimeout\)/)
        assert.match(
          String(error!.message),
          /A statement in transaction \d+ waited .*, which nested block etx_\d+ of transaction \d+ holds/
        )
        assert.isBelow(elapsed, 5_000)
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("lock-order inversion with a semaphore: the statement kept out gives up, the other goes on", () =>
      Effect.gen(function* () {
        yield* items
        const lock = yield* Effect.makeSemaphore(1)
        const go = yield* Deferred.make<void>()
        const locked = yield* Deferred.make<void>()
        const started = Date.now()
        const other = yield* Effect.gen(function* () {
          // Takes the lock, then needs the outer block, which the nested block below keeps.
          const other = yield* Effect.fork(
            lock.withPermits(1)(
              Deferred.await(go).pipe(
                Effect.zipRight(Deferred.succeed(locked, undefined)),
                Effect.zipRight(Effect.exit(insert(1)))
              )
            )
          )
          // Holds the connection in a nested block, then needs the lock.
          yield* Effect.gen(function* () {
            yield* Deferred.succeed(go, undefined)
            yield* Deferred.await(locked)
            yield* lock.withPermits(1)(insert(2))
          }).pipe(Transaction.withTransaction())
          return yield* Fiber.join(other)
        }).pipe(Transaction.withTransaction({ deadlockTimeout: "300 millis" }), bounded)
        assert.isBelow(Date.now() - started, 5_000)
        assert.isTrue(Exit.isFailure(other))
        const error = Exit.isFailure(other) ? wouldDeadlock(other.cause) : undefined
        assert.isDefined(error, "the statement kept out fails with WouldDeadlock")
        assert.match(String(error!.message), /, which nested block etx_\d+ of transaction \d+ holds until it ends/)
        assert.deepStrictEqual(yield* committedIds, [2])
      })
    )

    it.effect("waiting for another fiber's running statement does not count toward deadlockTimeout", () =>
      Effect.gen(function* () {
        yield* items
        const sleeping = yield* Deferred.make<void>()
        yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const slow = yield* Effect.fork(
            Effect.zipRight(Deferred.succeed(sleeping, undefined), sql`SELECT pg_sleep(0.8)`)
          )
          yield* Deferred.await(sleeping)
          yield* insert(1)
          yield* Fiber.join(slow)
        }).pipe(Transaction.withTransaction({ deadlockTimeout: "200 millis" }), bounded)
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )

    it.effect("queueing behind several sibling nested blocks in turn is not a deadlock", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const outcomes = yield* Effect.forEach(
          [1, 2, 3, 4, 5, 6],
          (id) =>
            Effect.zipRight(insert(id), sql`SELECT pg_sleep(0.25)`).pipe(
              Transaction.withTransaction(),
              Effect.exit,
              Effect.map(Exit.isSuccess)
            ),
          { concurrency: "unbounded" }
        ).pipe(Transaction.withTransaction({ deadlockTimeout: "600 millis" }), bounded)
        assert.deepStrictEqual(outcomes, [true, true, true, true, true, true])
        assert.deepStrictEqual(yield* committedIds, [1, 2, 3, 4, 5, 6])
      })
    )

    it.effect("a deadlockTimeout beyond a timer's range, or infinite, never fires early", () =>
      Effect.gen(function* () {
        yield* items
        for (const deadlockTimeout of ["25 days", Duration.infinity] as const) {
          const sql = yield* SqlClient.SqlClient
          const inNested = yield* Deferred.make<void>()
          yield* Effect.gen(function* () {
            const nested = yield* Effect.fork(
              Effect.zipRight(Deferred.succeed(inNested, undefined), sql`SELECT pg_sleep(0.3)`).pipe(
                Transaction.withTransaction()
              )
            )
            yield* Deferred.await(inNested)
            yield* sql`SELECT 1`
            yield* Fiber.join(nested)
          }).pipe(Transaction.withTransaction({ deadlockTimeout }), bounded)
        }
      })
    )

    it.effect("a statement of the fiber reading a stream of the same transaction fails at once", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const exit = yield* sql<{ n: number }>`SELECT generate_series(1, 3) AS n`.stream.pipe(
          Stream.mapEffect((row) => sql`SELECT ${row.n}`),
          Stream.runDrain,
          Transaction.withTransaction(),
          Effect.exit,
          bounded
        )
        const error = Exit.isFailure(exit) ? wouldDeadlock(exit.cause) : undefined
        assert.isDefined(error, "WouldDeadlock")
        assert.match(String(error!.message), /a stream this same fiber is reading/)
      })
    )

    it.effect("another fiber kept out by a stream whose reader waits for it gives up at deadlockTimeout", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const exit = yield* sql<{ n: number }>`SELECT generate_series(1, 3) AS n`.stream.pipe(
          Stream.mapEffect((row) => Effect.flatMap(Effect.fork(sql`SELECT ${row.n}`), Fiber.join)),
          Stream.runDrain,
          Transaction.withTransaction({ deadlockTimeout: "300 millis" }),
          Effect.exit,
          bounded
        )
        const error = Exit.isFailure(exit) ? wouldDeadlock(exit.cause) : undefined
        assert.isDefined(error, "WouldDeadlock")
        assert.match(String(error!.message), /a stream of the same transaction holds/)
      })
    )

    it.effect("deadlockTimeout is an option of the outermost transaction only", () =>
      Effect.gen(function* () {
        const exit = yield* Effect.void.pipe(
          Transaction.withTransaction({ deadlockTimeout: "1 second" }),
          Transaction.withTransaction(),
          Effect.exit
        )
        assert.strictEqual(transactionError(exit).reason, "OptionConflict")
        const invalid = yield* Effect.exit(Effect.void.pipe(Transaction.withTransaction({ deadlockTimeout: 0 })))
        assert.strictEqual(transactionError(invalid).reason, "InvalidOption")
      })
    )
  })
})

describe("a transaction opened by other code", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("concurrent sibling nested blocks in a raw sql.withTransaction keep each other's writes", () =>
      Effect.gen(function* () {
        yield* items
        const sql = yield* SqlClient.SqlClient
        const exits = yield* Effect.forEach(
          [1, 2, 3, 4],
          (id) =>
            Effect.zipRight(
              Effect.zipRight(insert(id), sql`SELECT pg_sleep(0.02)`),
              id % 2 === 0 ? Effect.fail(`block ${id} fails`) : Effect.void
            ).pipe(Transaction.withTransaction(), Effect.exit),
          { concurrency: "unbounded" }
        ).pipe(sql.withTransaction, bounded)
        assert.deepStrictEqual(
          exits.map((exit) => Exit.isSuccess(exit)),
          [true, false, true, false]
        )
        assert.deepStrictEqual(yield* committedIds, [1, 3])
      })
    )
  })
})

describe("Transaction.layer and the driver's own tag", () => {
  layer(Transaction.layer.pipe(Layer.provideMerge(Db)), { excludeTestServices: true })((it) => {
    it.effect("PgClient.PgClient's withTransaction goes through the engine too", () =>
      Effect.gen(function* () {
        yield* items
        const pg = yield* PgClient.PgClient
        const active = yield* Transaction.isActive.pipe(pg.withTransaction)
        assert.isTrue(active)
        const exits = yield* Effect.forEach(
          [1, 2],
          (id) =>
            Effect.zipRight(insert(id), id === 2 ? Effect.fail("no") : Effect.void).pipe(
              pg.withTransaction,
              Effect.exit
            ),
          { concurrency: "unbounded" }
        ).pipe(pg.withTransaction)
        assert.deepStrictEqual(
          exits.map((exit) => Exit.isSuccess(exit)),
          [true, false]
        )
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )
  })
})
