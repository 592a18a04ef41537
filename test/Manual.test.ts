import { assert, describe, layer } from "@effect/vitest"
import { Effect, Exit, Layer } from "effect"
import { Transaction } from "effect-transaction"
import { committedIds, idleInTransaction, insert, items, transactionError, visibleIds } from "./utils/fixtures.js"
import * as Recorder from "./utils/Recorder.js"
import * as TestDatabase from "./utils/TestDatabase.js"

const Db = Recorder.layer.pipe(Layer.provideMerge(TestDatabase.layer()))

const recorded = Effect.map(Recorder.Recorder, (log) => log.statements.filter((sql) => !sql.startsWith("SELECT")))

describe("Transaction.begin", () => {
  layer(Db, { excludeTestServices: true })((it) => {
    it.effect("run, then commit: the work is committed and the connection goes back idle", () =>
      Effect.gen(function* () {
        yield* items
        const log = yield* Recorder.Recorder
        log.clear()
        yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin({ isolation: "serializable" })
            yield* tx.run(insert(1))
            yield* tx.run(insert(2))
            assert.deepStrictEqual(yield* committedIds, [])
            yield* tx.commit
            assert.deepStrictEqual(yield* committedIds, [1, 2])
            assert.isFalse(tx.transaction.isOpen)
          })
        )
        assert.deepStrictEqual(yield* recorded, [
          "BEGIN ISOLATION LEVEL SERIALIZABLE; INSERT INTO items (id, label) VALUES ($1, $2)",
          "INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT"
        ])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("closing the scope without commit rolls back", () =>
      Effect.gen(function* () {
        yield* items
        const log = yield* Recorder.Recorder
        log.clear()
        yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin()
            yield* tx.run(insert(1))
          })
        )
        assert.deepStrictEqual(yield* committedIds, [])
        assert.deepStrictEqual(yield* recorded, ["BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)", "ROLLBACK"])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect("rollback undoes the work and runs the afterRollback hooks", () =>
      Effect.gen(function* () {
        yield* items
        const seen: Array<string> = []
        yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin()
            yield* tx.run(insert(1))
            yield* tx.run(Transaction.afterRollback(Effect.sync(() => seen.push("afterRollback"))))
            yield* tx.run(Transaction.afterCommit(Effect.sync(() => seen.push("afterCommit"))))
            yield* tx.rollback
            assert.deepStrictEqual(seen, ["afterRollback"])
          })
        )
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("commit twice, rollback after commit, run or savepoint after the end are TransactionClosed errors", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin()
            yield* tx.run(insert(1))
            yield* tx.commit
            for (const late of [tx.commit, tx.rollback, tx.run(insert(2)), tx.savepoint]) {
              const error = transactionError(yield* Effect.exit(late))
              assert.strictEqual(error.reason, "TransactionClosed")
              assert.match(error.message, /already been committed or rolled back/)
            }
          })
        )
        assert.deepStrictEqual(yield* committedIds, [1])
      })
    )

    it.effect("savepoints: rollbackTo undoes the work since the savepoint and keeps it, release keeps the work", () =>
      Effect.gen(function* () {
        yield* items
        const log = yield* Recorder.Recorder
        log.clear()
        yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin()
            yield* tx.run(insert(1))
            const sp = yield* tx.savepoint
            assert.strictEqual(sp.depth, 1)
            yield* tx.run(insert(2))
            yield* tx.rollbackTo(sp)
            assert.deepStrictEqual(yield* tx.run(visibleIds), [1])
            yield* tx.run(insert(3))
            assert.strictEqual(yield* tx.run(Effect.map(Transaction.Current, (current) => current.depth)), 1)
            yield* tx.release(sp)
            assert.isFalse(sp.isOpen)
            yield* tx.run(insert(4))
            yield* tx.commit
          })
        )
        assert.deepStrictEqual(yield* committedIds, [1, 3, 4])
        assert.deepStrictEqual(yield* recorded, [
          "BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)",
          "SAVEPOINT etx_1; INSERT INTO items (id, label) VALUES ($1, $2)",
          "ROLLBACK TO SAVEPOINT etx_1",
          "INSERT INTO items (id, label) VALUES ($1, $2)",
          "RELEASE SAVEPOINT etx_1; INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT"
        ])
      })
    )

    it.effect("rollbackTo recovers from a failed statement; without it, commit fails and nothing is kept", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin()
            yield* tx.run(insert(1))
            const sp = yield* tx.savepoint
            const duplicate = yield* Effect.exit(tx.run(insert(1)))
            assert.isTrue(Exit.isFailure(duplicate))
            yield* tx.rollbackTo(sp)
            yield* tx.run(insert(2))
            yield* tx.commit
          })
        )
        assert.deepStrictEqual(yield* committedIds, [1, 2])

        yield* items
        const exit = yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin()
            yield* tx.run(insert(1))
            yield* Effect.ignore(tx.run(insert(1)))
            return yield* tx.commit
          })
        ).pipe(Effect.exit)
        const error = transactionError(exit)
        assert.strictEqual(error.reason, "CommitFailed")
        assert.strictEqual(error.sqlState, "25P02")
        assert.deepStrictEqual(yield* committedIds, [])
        assert.strictEqual(yield* idleInTransaction, 0)
      })
    )

    it.effect(
      "commit releases savepoints still open and keeps their work; release of an aborted one rolls it back",
      () =>
        Effect.gen(function* () {
          yield* items
          yield* Effect.scoped(
            Effect.gen(function* () {
              const tx = yield* Transaction.begin()
              yield* tx.savepoint
              yield* tx.run(insert(1))
              yield* tx.savepoint
              yield* tx.run(insert(2))
              yield* tx.commit
            })
          )
          assert.deepStrictEqual(yield* committedIds, [1, 2])

          yield* items
          yield* Effect.scoped(
            Effect.gen(function* () {
              const tx = yield* Transaction.begin()
              yield* tx.run(insert(1))
              const sp = yield* tx.savepoint
              yield* tx.run(insert(2))
              yield* Effect.ignore(tx.run(insert(2)))
              const error = transactionError(yield* Effect.exit(tx.release(sp)))
              assert.strictEqual(error.reason, "SavepointFailed")
              assert.strictEqual(error.sqlState, "25P02")
              yield* tx.run(insert(3))
              yield* tx.commit
            })
          )
          assert.deepStrictEqual(yield* committedIds, [1, 3])
        })
    )

    it.effect("a savepoint of another handle, or one already released, is refused", () =>
      Effect.gen(function* () {
        yield* Effect.scoped(
          Effect.gen(function* () {
            const a = yield* Transaction.begin()
            const b = yield* Transaction.begin()
            const sp = yield* a.savepoint
            assert.strictEqual(transactionError(yield* Effect.exit(b.release(sp))).reason, "InvalidOption")
            yield* a.release(sp)
            yield* a.run(Effect.void)
            assert.strictEqual(transactionError(yield* Effect.exit(a.rollbackTo(sp))).reason, "TransactionClosed")
            yield* a.commit
            yield* b.commit
          })
        )
      })
    )

    it.effect("afterCommit hooks run when commit is called, after the connection is released", () =>
      Effect.gen(function* () {
        yield* items
        const seen: Array<string> = []
        yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin()
            yield* tx.run(
              Effect.zipRight(
                insert(1),
                Transaction.afterCommit(
                  Effect.flatMap(Transaction.isActive, (active) => Effect.sync(() => seen.push(`active: ${active}`)))
                )
              )
            )
            const sp = yield* tx.savepoint
            yield* tx.run(Transaction.afterCommit(Effect.sync(() => seen.push("dropped"))))
            yield* tx.rollbackTo(sp)
            seen.push("before commit")
            yield* tx.commit
            seen.push("after commit")
          })
        )
        assert.deepStrictEqual(seen, ["before commit", "active: false", "after commit"])
      })
    )

    it.effect("inside a transaction, the handle controls a savepoint of it", () =>
      Effect.gen(function* () {
        yield* items
        const log = yield* Recorder.Recorder
        log.clear()
        yield* Effect.gen(function* () {
          yield* insert(1)
          yield* Effect.scoped(
            Effect.gen(function* () {
              const tx = yield* Transaction.begin()
              assert.strictEqual(tx.transaction.depth, 1)
              yield* tx.run(insert(2))
              yield* tx.rollback
            })
          )
          yield* Effect.scoped(
            Effect.gen(function* () {
              const tx = yield* Transaction.begin()
              yield* tx.run(insert(3))
              yield* tx.commit
            })
          )
        }).pipe(Transaction.withTransaction())
        assert.deepStrictEqual(yield* committedIds, [1, 3])
        assert.deepStrictEqual(yield* recorded, [
          "BEGIN; INSERT INTO items (id, label) VALUES ($1, $2)",
          "SAVEPOINT etx_1; INSERT INTO items (id, label) VALUES ($1, $2)",
          "ROLLBACK TO SAVEPOINT etx_1; RELEASE SAVEPOINT etx_1",
          "SAVEPOINT etx_2; INSERT INTO items (id, label) VALUES ($1, $2)",
          "COMMIT"
        ])
      })
    )

    it.effect("timeout and retry are refused with InvalidOption; nested options are checked", () =>
      Effect.gen(function* () {
        const log = yield* Recorder.Recorder
        log.clear()
        const withTimeout = yield* Effect.exit(
          Effect.scoped(Transaction.begin({ timeout: "1 second" } as Transaction.BeginOptions))
        )
        assert.strictEqual(transactionError(withTimeout).reason, "InvalidOption")
        assert.deepStrictEqual(log.statements, [])
        const conflict = yield* Effect.scoped(Transaction.begin({ isolation: "serializable" })).pipe(
          Transaction.withTransaction(),
          Effect.exit
        )
        assert.strictEqual(transactionError(conflict).reason, "OptionConflict")
      })
    )

    it.effect("statements on the handle's connection run one at a time when run is called from several fibers", () =>
      Effect.gen(function* () {
        yield* items
        yield* Effect.scoped(
          Effect.gen(function* () {
            const tx = yield* Transaction.begin()
            yield* Effect.forEach([1, 2, 3, 4, 5, 6, 7, 8], (id) => tx.run(insert(id)), { concurrency: "unbounded" })
            yield* tx.commit
          })
        )
        assert.deepStrictEqual(yield* committedIds, [1, 2, 3, 4, 5, 6, 7, 8])
      })
    )
  })
})
