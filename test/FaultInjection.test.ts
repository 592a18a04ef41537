/**
 * A seeded, repeatable fault-injection run against a real PostgreSQL: many fibers run transactions with nested
 * blocks (some in parallel), random failures, statement errors, interruptions, time-outs (Effect.timeout around
 * the call, and the `timeout` option, often running out during a COMMIT slowed by a deferred trigger), terminated
 * backends, and interrupts followed at once by the backend being terminated; on pools of 8, 2 and 1 connections;
 * half the transactions with `Transaction.PreparedStatements`.
 * Afterwards the ledger must show no partial write, no connection may be left in a transaction or lost, and a
 * fresh transaction must be served within 100 ms.
 *
 * FAULT_SEED, FAULT_TRANSACTIONS and FAULT_FIBERS change the run (the small pools run a quarter of the
 * transactions on a quarter of the fibers); SOAK=1 runs 20,000 transactions.
 */
import { SqlClient } from "@effect/sql"
import { assert, describe, layer } from "@effect/vitest"
import { Cause, Deferred, Effect, Either, Exit, Fiber, Option } from "effect"
import { Transaction } from "effect-transaction"
import * as TestDatabase from "./utils/TestDatabase.js"

const soak = process.env.SOAK === "1"
const seed = Number(process.env.FAULT_SEED ?? 20261122)
const transactions = Number(process.env.FAULT_TRANSACTIONS ?? (soak ? 20_000 : 2_000))
const fibers = Number(process.env.FAULT_FIBERS ?? 32)

const runs: ReadonlyArray<{ readonly pool: number; readonly transactions: number; readonly fibers: number }> = [
  { pool: 8, transactions, fibers },
  { pool: 2, transactions: Math.ceil(transactions / 4), fibers: Math.ceil(fibers / 4) },
  { pool: 1, transactions: Math.ceil(transactions / 4), fibers: Math.ceil(fibers / 4) }
]

/** mulberry32: a small seeded generator, so that a failing run can be repeated exactly. */
const random = (state: number) => () => {
  state = (state + 0x6d2b79f5) | 0
  let t = Math.imul(state ^ (state >>> 15), 1 | state)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

interface BlockPlan {
  readonly name: string
  readonly outcome: "ok" | "fail" | "statement error"
  readonly inner: BlockPlan | undefined
}

interface Plan {
  readonly id: number
  readonly blocks: ReadonlyArray<BlockPlan>
  readonly parallel: boolean
  readonly sleepMs: number
  /** Writes a row whose deferred trigger makes COMMIT take 30 ms. */
  readonly slowCommit: boolean
  readonly ending: "commit" | "fail" | "timeout" | "timeout option" | "interrupt" | "interrupt and kill" | "kill"
  readonly afterMs: number
}

const makePlans = (transactions: number): ReadonlyArray<Plan> => {
  const next = random(seed)
  const pick = <A>(choices: ReadonlyArray<readonly [number, A]>): A => {
    let roll = next()
    for (const [weight, value] of choices) {
      roll -= weight
      if (roll < 0) return value
    }
    return choices[choices.length - 1]![1]
  }
  const block = (name: string, depth: number): BlockPlan => ({
    name,
    outcome: pick([
      [0.7, "ok"],
      [0.15, "fail"],
      [0.15, "statement error"]
    ] as const),
    inner: depth < 2 && next() < 0.3 ? block(`${name}.i`, depth + 1) : undefined
  })
  return Array.from({ length: transactions }, (_, id) => ({
    id,
    blocks: Array.from({ length: Math.floor(next() * 4) }, (_, i) => block(`b${i}`, 1)),
    parallel: next() < 0.4,
    sleepMs: next() < 0.15 ? Math.floor(next() * 20) : 0,
    slowCommit: next() < 0.15,
    ending: pick([
      [0.6, "commit"],
      [0.08, "fail"],
      [0.07, "timeout"],
      [0.1, "timeout option"],
      [0.06, "interrupt"],
      [0.06, "interrupt and kill"],
      [0.03, "kill"]
    ] as const),
    afterMs: 1 + Math.floor(next() * 40)
  }))
}

type Outcome = "committed" | "failed" | "interrupted"

interface Result {
  readonly plan: Plan
  readonly outcome: Outcome
  /** The rows the body wrote that must be there if (and only if) it committed. */
  readonly expected: ReadonlyArray<string>
}

for (const { pool: POOL, transactions, fibers } of runs) {
  describe(`fault injection, pool of ${POOL}`, () => {
    const application = `etx-fault-${POOL}`
    layer(TestDatabase.layer({ applicationName: application, maxConnections: POOL }), { excludeTestServices: true })(
      (it) => {
        it.effect(
          `${transactions} transactions on ${fibers} fibers: no partial writes, no connection left behind (seed ${seed})`,
          () =>
            Effect.gen(function* () {
              yield* TestDatabase.setup(
                "DROP TABLE IF EXISTS ledger",
                "CREATE TABLE ledger (tx int NOT NULL, part text NOT NULL, PRIMARY KEY (tx, part))",
                `CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN IF NEW.part = 'slow' THEN PERFORM pg_sleep(0.03); END IF; RETURN NULL; END $$`,
                `CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger DEFERRABLE INITIALLY DEFERRED
                   FOR EACH ROW EXECUTE FUNCTION slow_commit()`
              )
              const sql = yield* SqlClient.SqlClient
              const db = yield* TestDatabase.TestDatabase
              const write = (tx: number, part: string) => sql`INSERT INTO ledger (tx, part) VALUES (${tx}, ${part})`
              let killed = 0
              let blocksKept = 0
              let blocksRolledBack = 0
              const timeouts = { committed: 0, timedOut: 0, duringCommit: 0 }

              const runBlock = (
                tx: number,
                plan: BlockPlan
              ): Effect.Effect<ReadonlyArray<string>, unknown, SqlClient.SqlClient> =>
                Effect.gen(function* () {
                  const rows = [`${plan.name}.1`]
                  yield* write(tx, `${plan.name}.1`)
                  if (plan.inner !== undefined) {
                    const inner = yield* Effect.either(runBlock(tx, plan.inner))
                    if (Either.isRight(inner)) rows.push(...inner.right)
                  }
                  yield* write(tx, `${plan.name}.2`)
                  rows.push(`${plan.name}.2`)
                  if (plan.outcome === "fail") return yield* Effect.fail("planned block failure")
                  if (plan.outcome === "statement error") yield* write(tx, "o1")
                  return rows
                }).pipe(
                  Transaction.withTransaction(),
                  Effect.tapBoth({
                    onFailure: () => Effect.sync(() => blocksRolledBack++),
                    onSuccess: () => Effect.sync(() => blocksKept++)
                  })
                )

              const body = (plan: Plan, expected: Array<string>, running?: Deferred.Deferred<number>) =>
                Effect.gen(function* () {
                  yield* write(plan.id, "o1")
                  yield* write(plan.id, "o2")
                  expected.push("o1", "o2")
                  const blocks = yield* Effect.forEach(
                    plan.blocks,
                    (block) => Effect.either(runBlock(plan.id, block)),
                    { concurrency: plan.parallel ? "unbounded" : 1 }
                  )
                  for (const block of blocks) if (Either.isRight(block)) expected.push(...block.right)
                  if (plan.sleepMs > 0) yield* sql`SELECT pg_sleep(${plan.sleepMs / 1000})`
                  if (plan.ending === "kill") {
                    const [row] = yield* sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`
                    yield* db.outside("SELECT pg_terminate_backend($1)", [row!.pid])
                    killed++
                  }
                  if (running !== undefined) {
                    const [row] = yield* sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`
                    yield* Deferred.succeed(running, row!.pid)
                    yield* sql`SELECT pg_sleep(1)`
                  }
                  if (plan.slowCommit) {
                    yield* write(plan.id, "slow")
                    expected.push("slow")
                  }
                  yield* write(plan.id, "done")
                  expected.push("done")
                  if (plan.ending === "fail") return yield* Effect.fail("planned transaction failure")
                })

              const runPlan = (plan: Plan): Effect.Effect<Result, never, SqlClient.SqlClient> =>
                Effect.suspend(() => {
                  const expected: Array<string> = []
                  const tx = body(plan, expected).pipe(Transaction.withTransaction())
                  const result = (outcome: Outcome): Result => ({ plan, outcome, expected })
                  switch (plan.ending) {
                    case "timeout":
                      return Effect.map(Effect.either(Effect.timeout(tx, `${plan.afterMs} millis`)), (either) =>
                        result(
                          Either.isRight(either)
                            ? "committed"
                            : Cause.isTimeoutException(either.left)
                              ? "interrupted"
                              : "failed"
                        )
                      )
                    case "timeout option":
                      return Effect.map(
                        Effect.exit(
                          body(plan, expected).pipe(
                            Transaction.withTransaction({ timeout: `${20 + plan.afterMs * 2} millis` })
                          )
                        ),
                        (exit) => {
                          if (Exit.isSuccess(exit)) timeouts.committed++
                          else if (String(Cause.squash(exit.cause)).includes("COMMIT was still running")) {
                            timeouts.duringCommit++
                          } else timeouts.timedOut++
                          return result(Exit.isSuccess(exit) ? "committed" : "failed")
                        }
                      )
                    case "interrupt":
                      return Effect.gen(function* () {
                        const fiber = yield* Effect.fork(tx)
                        yield* Effect.sleep(`${plan.afterMs} millis`)
                        const exit = yield* Fiber.interrupt(fiber)
                        return result(
                          Exit.isSuccess(exit) ? "committed" : Exit.isInterrupted(exit) ? "interrupted" : "failed"
                        )
                      })
                    case "interrupt and kill":
                      return Effect.gen(function* () {
                        const running = yield* Deferred.make<number>()
                        const fiber = yield* Effect.fork(
                          body(plan, expected, running).pipe(Transaction.withTransaction())
                        )
                        const pid = yield* Effect.raceFirst(
                          Effect.map(Deferred.await(running), Option.some),
                          Effect.as(Fiber.await(fiber), Option.none<number>())
                        )
                        if (Option.isSome(pid)) {
                          // The interrupt and the termination race each other.
                          const interrupting = yield* Effect.fork(Fiber.interrupt(fiber))
                          yield* db.outside("SELECT pg_terminate_backend($1)", [pid.value])
                          killed++
                          yield* Fiber.join(interrupting)
                        }
                        const exit = yield* Fiber.await(fiber)
                        return result(
                          Exit.isSuccess(exit) ? "committed" : Exit.isInterrupted(exit) ? "interrupted" : "failed"
                        )
                      })
                    default:
                      return Effect.map(Effect.exit(tx), (exit) =>
                        result(Exit.isSuccess(exit) ? "committed" : "failed")
                      )
                  }
                })

              const started = Date.now()
              // Half the transactions run their statements as statements the connection keeps prepared.
              const results = yield* Effect.forEach(
                makePlans(transactions),
                (plan) =>
                  plan.id % 2 === 0
                    ? Effect.provideService(runPlan(plan), Transaction.PreparedStatements, 8)
                    : runPlan(plan),
                { concurrency: fibers }
              )
              const elapsed = Date.now() - started

              // The ledger: every transaction is all there or not there at all, as its outcome says.
              const rows = yield* db.outside<{ tx: number; part: string }>("SELECT tx, part FROM ledger")
              const present = new Map<number, Array<string>>()
              for (const row of rows) present.set(row.tx, [...(present.get(row.tx) ?? []), row.part])
              const violations: Array<string> = []
              let interruptedCommitted = 0
              for (const { plan, outcome, expected } of results) {
                const found = (present.get(plan.id) ?? []).sort()
                const whole = [...expected].sort()
                const isWhole = found.length === whole.length && found.every((part, i) => part === whole[i])
                if (outcome === "committed" && !isWhole) violations.push(`tx ${plan.id} committed but has [${found}]`)
                if (outcome === "failed" && found.length > 0) violations.push(`tx ${plan.id} failed but has [${found}]`)
                if (outcome === "interrupted" && found.length > 0) {
                  if (isWhole) interruptedCommitted++
                  else violations.push(`tx ${plan.id} interrupted with a partial write [${found}]`)
                }
              }
              const count = (outcome: Outcome) => results.filter((result) => result.outcome === outcome).length
              console.log(
                `fault injection, pool of ${POOL} (seed ${seed}): ${transactions} transactions on ${fibers} fibers in ` +
                  `${elapsed} ms: ${count("committed")} committed, ${count("failed")} rolled back, ` +
                  `${count("interrupted")} interrupted or timed out (${interruptedCommitted} of those had committed ` +
                  `first), ${killed} backends terminated; timeout option: ${timeouts.committed} committed, ` +
                  `${timeouts.timedOut} timed out, ${timeouts.duringCommit} of them during COMMIT; nested blocks: ` +
                  `${blocksKept} kept, ${blocksRolledBack} rolled back`
              )
              assert.deepStrictEqual(violations.slice(0, 10), [])
              assert.isAbove(count("committed"), 0)
              assert.isAbove(count("failed"), 0)
              assert.isAbove(count("interrupted"), 0)
              assert.isAbove(killed, 0)
              assert.isAbove(timeouts.timedOut + timeouts.duringCommit, 0)

              // No session is left inside a transaction or still running a cancelled statement.
              const sessions = db.outside<{ pid: number; state: string }>(
                "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
                [application]
              )
              const settled = yield* Effect.either(
                TestDatabase.eventually(sessions, (rows) => rows.every((row) => row.state === "idle"))
              )
              assert.isTrue(Either.isRight(settled), `sessions not idle: ${JSON.stringify(settled)}`)
              assert.isAtMost(Either.getOrThrow(settled).length, POOL)

              // The pool lost nothing: all of its connections can be reserved at once, each on its own backend.
              const pids = yield* Effect.forEach(
                Array.from({ length: POOL }, (_, i) => i),
                () =>
                  sql<{ pid: number }>`SELECT pg_backend_pid() AS pid, pg_sleep(0.1)`.pipe(
                    Transaction.withTransaction(),
                    Effect.map((rows) => rows[0]!.pid)
                  ),
                { concurrency: "unbounded" }
              ).pipe(Effect.timeout("20 seconds"), Effect.option)
              assert.isTrue(Option.isSome(pids), "the pool could not hand out all of its connections")
              assert.strictEqual(new Set(Option.getOrThrow(pids)).size, POOL)

              // And a fresh transaction is served at once.
              const fresh = Date.now()
              yield* sql`SELECT 1`.pipe(Transaction.withTransaction())
              const freshMs = Date.now() - fresh
              assert.isBelow(freshMs, 100, `a fresh transaction took ${freshMs} ms`)
            }),
          soak ? 3_600_000 : 120_000
        )
      }
    )
  })
}
