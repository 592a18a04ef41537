import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Deferred, Effect, Exit, Fiber, Option } from "effect"
import { Transaction } from "effect-transaction"
import { committedIds, idleInTransaction, insert, items, transactionError, visibleIds } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const backendPid = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.map(sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`, (rows) => rows[0]!.pid)
)

/** Holds a connection of the pool in a transaction until `release` completes. */
const holdConnection = (held: Deferred.Deferred<void>, release: Deferred.Deferred<void>) =>
  Effect.zipRight(Effect.zipRight(backendPid, Deferred.succeed(held, undefined)), Deferred.await(release)).pipe(
    Transaction.withTransaction()
  )

/**
 * Holds `n` connections of the pool, each in a transaction of its own; succeeds once all are held, with the effect
 * that lets them go and waits until they have.
 */
const holdConnections = (n: number) =>
  Effect.gen(function* () {
    const release = yield* Deferred.make<void>()
    const holders = yield* Effect.forEach(Array.from({ length: n }), () =>
      Effect.gen(function* () {
        const held = yield* Deferred.make<void>()
        const holder = yield* Effect.fork(holdConnection(held, release))
        yield* Deferred.await(held)
        return holder
      })
    )
    return Effect.zipRight(Deferred.succeed(release, undefined), Fiber.joinAll(holders))
  })

/** Two transactions that each hold a connection at the same time: fails (AcquireTimeout) unless both are free. */
const bothConnectionsFree = Effect.gen(function* () {
  const both = yield* Deferred.make<void>()
  let inside = 0
  const meet = Effect.suspend(() => {
    inside++
    return inside === 2 ? Deferred.succeed(both, undefined) : Deferred.await(both)
  }).pipe(Transaction.withTransaction({ acquireTimeout: "2 seconds" }))
  yield* Effect.all([meet, meet], { concurrency: 2 })
})

describe("Transaction.requiresNew", () => {
  layer(TestDatabase.layer(), { excludeTestServices: true })((it) => {
    it.effect("its commit survives the rollback of the caller's transaction", () =>
      Effect.gen(function* () {
        yield* items
        const exit = yield* Effect.gen(function* () {
          yield* insert(1)
          yield* insert(2).pipe(Transaction.requiresNew())
          return yield* Effect.fail("outer fails")
        }).pipe(Transaction.withTransaction(), Effect.exit)
        assert.deepStrictEqual(exit, Exit.fail("outer fails"))
        assert.deepStrictEqual(yield* committedIds, [2])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("it runs on another connection, as a transaction of its own that does not see the caller's writes", () =>
      Effect.gen(function* () {
        yield* items
        const seen = yield* Effect.gen(function* () {
          yield* insert(1)
          const outerPid = yield* backendPid
          const inner = yield* Effect.all({
            pid: backendPid,
            ids: visibleIds,
            depth: Effect.map(Transaction.Current, (tx) => tx.depth),
            isolation: Effect.map(Transaction.Current, (tx) => tx.isolation)
          }).pipe(Transaction.requiresNew({ isolation: "serializable" }))
          const outerTx = yield* Transaction.Current
          return { outerPid, inner, outerDepth: outerTx.depth, outerOpen: outerTx.isOpen }
        }).pipe(Transaction.withTransaction())
        assert.notStrictEqual(seen.inner.pid, seen.outerPid)
        assert.deepStrictEqual(seen.inner.ids, [])
        assert.strictEqual(seen.inner.depth, 0)
        assert.strictEqual(seen.inner.isolation, "serializable")
        assert.strictEqual(seen.outerDepth, 0)
        assert.isTrue(seen.outerOpen)
      })
    )

    it.effect("its failure rolls back only its own writes, and the caller can go on", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.gen(function* () {
          yield* insert(1)
          const failed = yield* Effect.zipRight(insert(2), Effect.fail("inner fails")).pipe(
            Transaction.requiresNew(),
            Effect.either
          )
          assert.strictEqual(failed._tag, "Left")
          yield* insert(3)
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [1, 3])
      })
    )

    it.effect("its hooks run after its own commit, while the caller's transaction is still open", () =>
      Effect.gen(function* () {
        const seen: Array<string> = []
        yield* Effect.gen(function* () {
          yield* Transaction.afterCommit(Effect.sync(() => seen.push("outer afterCommit")))
          yield* Transaction.afterCommit(Effect.sync(() => seen.push("inner afterCommit"))).pipe(
            Transaction.requiresNew()
          )
          seen.push("outer body goes on")
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(seen, ["inner afterCommit", "outer body goes on", "outer afterCommit"])
      })
    )

    it.effect("outside any transaction it is a plain transaction", () =>
      Effect.gen(function* () {
        yield* items
        yield* insert(1).pipe(Transaction.requiresNew())
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )
  })

  // Two connections: the caller's transaction holds one, another fiber the other.
  layer(TestDatabase.layer({ maxConnections: 2 }), { excludeTestServices: true })((it) => {
    it.effect("with the pool exhausted, it fails with AcquireTimeout instead of hanging, and no connection leaks", () =>
      Effect.gen(function* () {
        const release = yield* holdConnections(1)
        const started = Date.now()
        const exit = yield* Effect.void.pipe(
          Transaction.requiresNew({ acquireTimeout: "300 millis" }),
          Transaction.withTransaction(),
          Effect.exit
        )
        const waited = Date.now() - started
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "AcquireTimeout")
        assert.match(error.message, /within 300 ms/)
        assert.match(error.message, /already holds one/)
        assert.isAtLeast(waited, 290)
        assert.isBelow(waited, 5_000)
        yield* release
        yield* bothConnectionsFree
      })
    )

    it.effect("the default bound of requiresNew is 5 seconds; a connection that arrives after it is released", () =>
      Effect.gen(function* () {
        const release = yield* holdConnections(1)
        const started = Date.now()
        const waiting = yield* Effect.fork(
          Effect.void.pipe(Transaction.requiresNew(), Transaction.withTransaction(), Effect.exit)
        )
        // The holder lets go after the requiresNew gave up; the connection reaches a wait that has ended.
        const exit = yield* Fiber.join(waiting)
        assert.strictEqual(transactionError(exit).reason, "AcquireTimeout")
        assert.isAtLeast(Date.now() - started, 4_900)
        yield* release
        yield* bothConnectionsFree
      })
    )

    it.effect("with acquireTimeout, waiting for a connection can be interrupted without losing it", () =>
      Effect.gen(function* () {
        const release = yield* holdConnections(2)
        const waiting = yield* Effect.fork(
          Effect.void.pipe(Transaction.withTransaction({ acquireTimeout: "1 minute" }))
        )
        yield* Effect.sleep("100 millis")
        yield* Fiber.interrupt(waiting)
        yield* release
        // The reservation the interrupted fiber left behind got a connection and gave it back.
        yield* bothConnectionsFree
      })
    )
  })
})

describe("accessors", () => {
  layer(TestDatabase.layer(), { excludeTestServices: true })((it) => {
    it.effect("isActive and currentOption say whether and where the fiber is in a transaction", () =>
      Effect.gen(function* () {
        assert.isFalse(yield* Transaction.isActive)
        assert.isTrue(Option.isNone(yield* Transaction.currentOption))
        const inside = yield* Effect.gen(function* () {
          const outer = Option.getOrThrow(yield* Transaction.currentOption)
          const nested = yield* Effect.all([Transaction.isActive, Transaction.Current]).pipe(
            Transaction.withTransaction()
          )
          return { active: yield* Transaction.isActive, outer, nested }
        }).pipe(Transaction.withTransaction({ isolation: "repeatable read", readOnly: true }))
        assert.isTrue(inside.active)
        assert.strictEqual(inside.outer.depth, 0)
        assert.strictEqual(inside.outer.isolation, "repeatable read")
        assert.isTrue(inside.outer.readOnly)
        assert.isTrue(inside.nested[0])
        assert.strictEqual(inside.nested[1].depth, 1)
        assert.strictEqual(inside.nested[1].id, inside.outer.id)
        assert.isFalse(inside.outer.isOpen)
        assert.isFalse(yield* Transaction.isActive)
      })
    )
  })
})
