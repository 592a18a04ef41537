/**
 * The spans and metrics of transactions, read through a recording tracer and Effect's metric registry.
 */
import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Effect, Exit, Fiber, Metric, Option, Schedule, Tracer } from "effect"
import type { Span } from "effect/Tracer"
import { TestTransaction, Transaction } from "effect-transaction"
import { committedIds, insert, items, serializationFailure } from "./utils/fixtures.js"
import * as TestDatabase from "./utils/TestDatabase.js"

interface Recorded {
  readonly name: string
  readonly kind: Tracer.SpanKind
  readonly parent: Option.Option<Tracer.AnySpan>
  readonly spanId: string
  readonly attributes: Map<string, unknown>
  readonly events: Array<{ readonly name: string; readonly attributes: Record<string, unknown> }>
  exit: Exit.Exit<unknown, unknown> | undefined
  endTime: bigint | undefined
}

/** A tracer that keeps every span it makes, ended or not. */
const recordingTracer = () => {
  const spans: Array<Recorded> = []
  let next = 0
  const tracer = Tracer.make({
    span: (name, parent, context, links, startTime, kind) => {
      const recorded: Recorded = {
        name,
        kind,
        parent,
        spanId: `span-${++next}`,
        attributes: new Map(),
        events: [],
        exit: undefined,
        endTime: undefined
      }
      spans.push(recorded)
      const span: Span = {
        _tag: "Span",
        name,
        spanId: recorded.spanId,
        traceId: "trace",
        parent,
        context,
        get status(): Tracer.SpanStatus {
          return { _tag: "Started", startTime }
        },
        attributes: recorded.attributes,
        links,
        sampled: true,
        kind,
        end: (endTime, exit) => {
          recorded.exit = exit
          recorded.endTime = endTime
        },
        attribute: (key, value) => {
          recorded.attributes.set(key, value)
        },
        event: (name, _, attributes) => {
          recorded.events.push({ name, attributes: attributes ?? {} })
        },
        addLinks: () => undefined
      }
      return span
    },
    context: (f) => f()
  })
  const named = (name: string) => spans.filter((span) => span.name === name)
  const parentOf = (span: Recorded) =>
    spans.find((other) => Option.getOrUndefined(span.parent)?.spanId === other.spanId)
  return { tracer, spans, named, parentOf }
}

const counterValue = (metric: Metric.Metric.Counter<number>, ...tags: ReadonlyArray<readonly [string, string]>) =>
  Effect.map(
    Metric.value(tags.reduce((tagged, [key, value]) => Metric.tagged(tagged, key, value), metric)),
    (state) => state.count
  )

const histogramCount = (metric: Metric.Metric.Histogram<number>, ...tags: ReadonlyArray<readonly [string, string]>) =>
  Effect.map(
    Metric.value(tags.reduce((tagged, [key, value]) => Metric.tagged(tagged, key, value), metric)),
    (state) => state.count
  )

/** How much `read` grew while `effect` ran. */
const growth = <A, E, R>(read: Effect.Effect<number>, effect: Effect.Effect<A, E, R>) =>
  Effect.gen(function* () {
    const before = yield* read
    const exit = yield* Effect.exit(effect)
    return { exit, grew: (yield* read) - before }
  })

const { metrics } = Transaction

describe("spans and metrics", () => {
  layer(TestDatabase.layer(), { excludeTestServices: true })((it) => {
    it.effect("a commit is one sql.transaction span with the database attributes, its statements under it", () =>
      Effect.gen(function* () {
        yield* items
        const db = yield* TestDatabase.TestDatabase
        const { tracer, named, parentOf } = recordingTracer()
        const committed = counterValue(metrics.outcomes, ["outcome", "committed"])
        const durations = histogramCount(metrics.duration, ["outcome", "committed"])
        const before = { committed: yield* committed, durations: yield* durations }
        yield* insert(1).pipe(
          Transaction.withTransaction({ isolation: "serializable" }),
          Effect.withSpan("caller"),
          Effect.withTracer(tracer)
        )
        const [span] = named("sql.transaction")
        assert.strictEqual(named("sql.transaction").length, 1)
        assert.strictEqual(span!.kind, "client")
        assert.strictEqual(parentOf(span!)?.name, "caller")
        assert.strictEqual(span!.attributes.get("db.system.name"), "postgresql")
        assert.strictEqual(span!.attributes.get("db.namespace"), db.name)
        assert.strictEqual(span!.attributes.get("effect_transaction.isolation"), "serializable")
        assert.strictEqual(span!.attributes.get("effect_transaction.read_only"), false)
        assert.strictEqual(span!.attributes.get("effect_transaction.attempts"), 1)
        assert.strictEqual(span!.attributes.get("effect_transaction.outcome"), "committed")
        assert.isFalse(span!.attributes.has("error.type"))
        assert.isTrue(span!.exit !== undefined && Exit.isSuccess(span!.exit))
        // The statement's own span (@effect/sql's sql.execute) is a child of the transaction's.
        const statements = named("sql.execute")
        assert.isAbove(statements.length, 0)
        for (const statement of statements) assert.strictEqual(parentOf(statement), span)
        assert.strictEqual((yield* committed) - before.committed, 1)
        assert.strictEqual((yield* durations) - before.durations, 1)
        assert.strictEqual((yield* Metric.value(metrics.active)).value, 0)
      })
    )

    it.effect("a rollback records the outcome, the reason and, for a database error, the SQLSTATE", () =>
      Effect.gen(function* () {
        yield* items
        const { tracer, named } = recordingTracer()
        const failed = counterValue(metrics.outcomes, ["outcome", "rolled_back"], ["reason", "Failure"])
        const { exit, grew } = yield* growth(
          failed,
          Effect.zipRight(insert(1), Effect.fail("boom")).pipe(Transaction.withTransaction(), Effect.withTracer(tracer))
        )
        assert.isTrue(Exit.isFailure(exit))
        assert.strictEqual(grew, 1)
        const [span] = named("sql.transaction")
        assert.strictEqual(span!.attributes.get("effect_transaction.outcome"), "rolled_back")
        assert.strictEqual(span!.attributes.get("effect_transaction.error.reason"), "Failure")
        assert.strictEqual(span!.attributes.get("error.type"), "Failure")

        const unique = counterValue(metrics.outcomes, ["outcome", "rolled_back"], ["reason", "UniqueViolation"])
        const second = yield* growth(
          unique,
          Effect.zipRight(insert(2), insert(2)).pipe(Transaction.withTransaction(), Effect.withTracer(tracer))
        )
        assert.isTrue(Exit.isFailure(second.exit))
        assert.strictEqual(second.grew, 1)
        const last = named("sql.transaction").at(-1)!
        assert.strictEqual(last.attributes.get("effect_transaction.error.reason"), "UniqueViolation")
        assert.strictEqual(last.attributes.get("db.response.status_code"), "23505")
      })
    )

    it.effect("a retry is an event with its reason and delay; the span counts the attempts", () =>
      Effect.gen(function* () {
        yield* items
        const { tracer, named } = recordingTracer()
        const retries = counterValue(metrics.retries, ["reason", "SerializationFailure"])
        let attempt = 0
        const { exit, grew } = yield* growth(
          retries,
          Effect.gen(function* () {
            if (++attempt < 3) yield* serializationFailure
            yield* insert(1)
          }).pipe(Transaction.withTransaction({ retry: Schedule.spaced("5 millis") }), Effect.withTracer(tracer))
        )
        assert.isTrue(Exit.isSuccess(exit))
        assert.strictEqual(grew, 2)
        assert.strictEqual(named("sql.transaction").length, 1)
        const [span] = named("sql.transaction")
        assert.strictEqual(span!.attributes.get("effect_transaction.attempts"), 3)
        assert.strictEqual(span!.attributes.get("effect_transaction.outcome"), "committed")
        const events = span!.events.filter((event) => event.name === "db.transaction.retry")
        assert.deepStrictEqual(
          events.map((event) => [
            event.attributes["effect_transaction.attempt"],
            event.attributes["effect_transaction.error.reason"],
            event.attributes["effect_transaction.retry.delay_ms"]
          ]),
          [
            [1, "SerializationFailure", 5],
            [2, "SerializationFailure", 5]
          ]
        )
      })
    )

    it.effect("a failed nested block is a child span with savepoint and rollback events; the outer commits", () =>
      Effect.gen(function* () {
        yield* items
        const { tracer, named, parentOf } = recordingTracer()
        yield* Effect.gen(function* () {
          yield* insert(1)
          yield* Effect.zipRight(insert(2), Effect.fail("inner")).pipe(Transaction.withTransaction(), Effect.ignore)
          yield* Effect.void.pipe(Transaction.withTransaction())
        }).pipe(Transaction.withTransaction(), Effect.withTracer(tracer))
        const [outer, failed, succeeded] = named("sql.transaction")
        assert.strictEqual(named("sql.transaction").length, 3)
        assert.strictEqual(parentOf(failed!), outer)
        assert.strictEqual(parentOf(succeeded!), outer)
        assert.strictEqual(failed!.attributes.get("effect_transaction.depth"), 1)
        assert.deepStrictEqual(
          failed!.events.map((event) => event.name),
          ["db.transaction.savepoint", "db.transaction.rollback_to_savepoint"]
        )
        assert.deepStrictEqual(
          succeeded!.events.map((event) => event.name),
          ["db.transaction.savepoint"]
        )
        assert.strictEqual(outer!.attributes.get("effect_transaction.outcome"), "committed")
        // The nested insert's statement is under the nested block's span.
        const statements = named("sql.execute")
        assert.strictEqual(parentOf(statements[0]!), outer)
        assert.strictEqual(parentOf(statements[1]!), failed)
      })
    )

    it.effect("Transaction.fn is a span under its caller, with the transaction's span under it", () =>
      Effect.gen(function* () {
        yield* items
        const { tracer, named, parentOf } = recordingTracer()
        const add = Transaction.fn("add")(function* (id: number) {
          yield* insert(id)
        })
        yield* add(1).pipe(Effect.withSpan("caller"), Effect.withTracer(tracer))
        const [fn] = named("add")
        const [transaction] = named("sql.transaction")
        assert.strictEqual(parentOf(fn!)?.name, "caller")
        assert.strictEqual(parentOf(transaction!), fn)
      })
    )

    it.effect("a failed COMMIT and a failed hook are counted and are events of the span", () =>
      Effect.gen(function* () {
        yield* TestDatabase.setup(
          "DROP TABLE IF EXISTS deferred_items",
          "CREATE TABLE deferred_items (id int, CONSTRAINT deferred_unique UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"
        )
        const sql = yield* SqlClient.SqlClient
        const { tracer, named } = recordingTracer()
        const commitFailures = counterValue(metrics.commitFailures, ["reason", "UniqueViolation"])
        const first = yield* growth(
          commitFailures,
          sql`INSERT INTO deferred_items VALUES (1), (1)`.pipe(Transaction.withTransaction(), Effect.withTracer(tracer))
        )
        assert.isTrue(Exit.isFailure(first.exit))
        assert.strictEqual(first.grew, 1)
        const [failedCommit] = named("sql.transaction")
        assert.strictEqual(failedCommit!.attributes.get("effect_transaction.error.reason"), "CommitFailed")
        assert.include(
          failedCommit!.events.map((event) => event.name),
          "db.transaction.commit_failed"
        )

        const hookFailures = counterValue(metrics.hookFailures, ["kind", "afterCommit"])
        const second = yield* growth(
          hookFailures,
          Transaction.afterCommit(Effect.fail("hook")).pipe(
            Transaction.withTransaction(),
            Effect.provideService(Transaction.HookFailureHandler, () => Effect.void),
            Effect.withTracer(tracer)
          )
        )
        assert.isTrue(Exit.isSuccess(second.exit))
        assert.strictEqual(second.grew, 1)
        const withHook = named("sql.transaction").at(-1)!
        const event = withHook.events.find((event) => event.name === "db.transaction.hook_failed")
        assert.deepStrictEqual(event?.attributes, {
          "effect_transaction.hook.kind": "afterCommit",
          "effect_transaction.hook.index": 0,
          "effect_transaction.error.reason": "Failure"
        })
      })
    )

    it.effect("a Transaction.begin handle is one span from begin to its end, its statements under it", () =>
      Effect.gen(function* () {
        yield* items
        const { tracer, named, parentOf } = recordingTracer()
        const committed = counterValue(metrics.outcomes, ["outcome", "committed"])
        const rolledBack = counterValue(metrics.outcomes, ["outcome", "rolled_back"])
        const before = { committed: yield* committed, rolledBack: yield* rolledBack }
        yield* Effect.scoped(
          Effect.gen(function* () {
            const handle = yield* Transaction.begin()
            yield* handle.run(insert(1))
            yield* handle.commit
          })
        ).pipe(Effect.withSpan("caller"), Effect.withTracer(tracer))
        // Closing the scope without commit or rollback rolls back: that too ends the span.
        yield* Effect.scoped(Effect.flatMap(Transaction.begin(), (handle) => handle.run(insert(2)))).pipe(
          Effect.withTracer(tracer)
        )
        const [first, second] = named("sql.transaction")
        assert.strictEqual(named("sql.transaction").length, 2)
        assert.strictEqual(parentOf(first!)?.name, "caller")
        assert.strictEqual(first!.attributes.get("db.system.name"), "postgresql")
        assert.strictEqual(first!.attributes.get("effect_transaction.attempts"), 1)
        assert.strictEqual(first!.attributes.get("effect_transaction.outcome"), "committed")
        assert.isTrue(first!.exit !== undefined && Exit.isSuccess(first!.exit))
        const statements = named("sql.execute").filter((span) => parentOf(span) === first)
        assert.strictEqual(statements.length, 1)
        assert.strictEqual(second!.attributes.get("effect_transaction.outcome"), "rolled_back")
        assert.isTrue(second!.exit !== undefined)
        assert.strictEqual((yield* committed) - before.committed, 1)
        assert.strictEqual((yield* rolledBack) - before.rolledBack, 1)
      })
    )

    it.effect(
      "with the tracer's timing off, transaction and Transaction.begin spans end at time 0, as Effect's do",
      () =>
        Effect.gen(function* () {
          yield* items
          const { tracer, named } = recordingTracer()
          yield* Effect.gen(function* () {
            yield* insert(1).pipe(Transaction.withTransaction())
            yield* Effect.scoped(Effect.flatMap(Transaction.begin(), (handle) => handle.run(insert(2))))
            yield* Effect.void.pipe(Effect.withSpan("effect's own"))
          }).pipe(Effect.withTracerTiming(false), Effect.withTracer(tracer))
          const ends = [...named("sql.transaction"), ...named("effect's own")].map((span) => span.endTime)
          assert.deepStrictEqual(ends, [0n, 0n, 0n])
        })
    )

    it.effect("an interrupted Transaction.begin never leaves its span open or the active gauge raised", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const { tracer, named } = recordingTracer()
        const active = Effect.map(Metric.value(metrics.active), (state) => state.value)
        const before = yield* active
        // Interrupted after 0 to 39 yields: before, during and after begin, run, commit and rollback.
        for (let i = 0; i < 120; i++) {
          const work = Effect.scoped(
            Effect.gen(function* () {
              const handle = yield* Transaction.begin()
              yield* handle.run(sql`SELECT 1`)
              if (i % 3 === 0) yield* handle.commit
              if (i % 3 === 1) yield* handle.rollback
            })
          ).pipe(Effect.withTracer(tracer), Effect.withMaxOpsBeforeYield(64))
          const fiber = yield* Effect.fork(work)
          for (let k = 0; k < i % 40; k++) yield* Effect.yieldNow()
          yield* Fiber.interrupt(fiber)
          assert.deepStrictEqual(
            { open: named("sql.transaction").filter((span) => span.exit === undefined).length, active: yield* active },
            { open: 0, active: before },
            `interrupted after ${i % 40} yields`
          )
        }
      })
    )

    it.effect("under TestTransaction the code's own transaction is a span and is counted, as in production", () =>
      Effect.gen(function* () {
        yield* items
        const { tracer, named, parentOf } = recordingTracer()
        const committed = counterValue(metrics.outcomes, ["outcome", "committed"])
        const before = yield* committed
        const code = Effect.gen(function* () {
          yield* insert(1)
          yield* Effect.either(insert(2).pipe(Effect.zipRight(Effect.fail("no")), Transaction.withTransaction()))
        }).pipe(Transaction.withTransaction({ isolation: "serializable" }))
        yield* TestTransaction.isolate(code).pipe(Effect.withSpan("test"), Effect.withTracer(tracer))
        const [outer, nested] = named("sql.transaction")
        assert.strictEqual(named("sql.transaction").length, 2)
        assert.strictEqual(parentOf(outer!)?.name, "test")
        assert.strictEqual(outer!.attributes.get("effect_transaction.isolation"), "serializable")
        assert.strictEqual(outer!.attributes.get("effect_transaction.outcome"), "committed")
        assert.strictEqual(parentOf(nested!), outer)
        assert.isTrue(nested!.events.some((event) => event.name === "db.transaction.rollback_to_savepoint"))
        assert.strictEqual((yield* committed) - before, 1)
        // The test transaction itself rolled back: nothing was committed.
        assert.deepStrictEqual(yield* committedIds, [])
      })
    )

    it.effect("off: with the tracer disabled and MetricsEnabled false, no span and no metric", () =>
      Effect.gen(function* () {
        yield* items
        const { tracer, spans } = recordingTracer()
        const committed = counterValue(metrics.outcomes, ["outcome", "committed"])
        const { exit, grew } = yield* growth(
          committed,
          insert(1).pipe(
            Transaction.withTransaction(),
            Effect.provideService(Transaction.MetricsEnabled, false),
            Effect.withTracerEnabled(false),
            Effect.withTracer(tracer)
          )
        )
        assert.isTrue(Exit.isSuccess(exit))
        assert.strictEqual(grew, 0)
        assert.strictEqual(spans.filter((span) => span.name === "sql.transaction").length, 0)
      })
    )

    it.effect(
      "off: with the tracer disabled and MetricsEnabled false, afterCommit and afterRollback hooks still run",
      () =>
        Effect.gen(function* () {
          yield* items
          const ran: Array<string> = []
          const off = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
            effect.pipe(Effect.provideService(Transaction.MetricsEnabled, false), Effect.withTracerEnabled(false))
          const committed = yield* off(
            Effect.exit(
              Transaction.afterCommit(Effect.sync(() => ran.push("afterCommit"))).pipe(
                Effect.zipRight(insert(1)),
                Transaction.withTransaction()
              )
            )
          )
          const rolledBack = yield* off(
            Effect.exit(
              Transaction.afterRollback(Effect.sync(() => ran.push("afterRollback"))).pipe(
                Effect.zipRight(insert(2)),
                Effect.zipRight(Effect.fail("body failed")),
                Transaction.withTransaction()
              )
            )
          )
          assert.isTrue(Exit.isSuccess(committed))
          assert.isTrue(Exit.isFailure(rolledBack))
          assert.deepStrictEqual(ran, ["afterCommit", "afterRollback"])
        })
    )

    it.effect("the transaction's span ends once, after its hooks ran and recorded their failures on it", () =>
      Effect.gen(function* () {
        yield* items
        const log: Array<string> = []
        const tracer = Tracer.make({
          span: (name, parent, context, links, startTime, kind) => {
            let status: Tracer.SpanStatus = { _tag: "Started", startTime }
            return {
              _tag: "Span",
              name,
              spanId: `span-${log.length}`,
              traceId: "trace",
              parent,
              context,
              get status() {
                return status
              },
              attributes: new Map(),
              links,
              sampled: true,
              kind,
              end: (endTime, exit) => {
                if (name === "sql.transaction") log.push("end")
                status = { _tag: "Ended", startTime, endTime, exit }
              },
              attribute: () => {},
              event: (event) => {
                if (name === "sql.transaction") log.push(status._tag === "Ended" ? `${event} after end` : event)
              },
              addLinks: () => {}
            }
          },
          context: (f) => f()
        })
        const exit = yield* Effect.exit(
          Transaction.afterCommit(Effect.fail("hook")).pipe(
            Effect.zipRight(insert(1)),
            Transaction.withTransaction(),
            Effect.provideService(Transaction.HookFailureHandler, () => Effect.void),
            Effect.withTracer(tracer)
          )
        )
        assert.isTrue(Exit.isSuccess(exit))
        assert.deepStrictEqual(log, ["db.transaction.hook_failed", "end"])
      })
    )
  })
})
