/**
 * Spans and metrics of transactions: the `sql.transaction` span of an outermost transaction (named as @effect/sql
 * names its own, with the OpenTelemetry database attributes and this library's), the span of a nested block, their
 * events (savepoint, rollback to savepoint, retry, hook failure), and the Effect metrics (duration, outcomes,
 * retries, commit failures, active transactions, connection wait, hook failures). Spans follow Effect's tracer
 * (off with `Effect.withTracerEnabled(false)`); metrics follow `MetricsEnabled`. With both off, a transaction takes
 * none of this path.
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import { SqlError } from "@effect/sql/SqlError"
import * as Cause from "effect/Cause"
import * as Clock from "effect/Clock"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import type * as Fiber from "effect/Fiber"
import * as FiberRef from "effect/FiberRef"
import * as Metric from "effect/Metric"
import * as MetricBoundaries from "effect/MetricBoundaries"
import * as MetricLabel from "effect/MetricLabel"
import * as Redacted from "effect/Redacted"
import * as Tracer from "effect/Tracer"
import type * as Transaction from "../Transaction.js"
import { classify, databaseInfo, TransactionError } from "../TransactionError.js"
import type { Frame, Tx } from "./blocks.js"
import type { Dialect } from "./dialect.js"

/** @internal */
export const MetricsEnabled = Context.Reference<Transaction.MetricsEnabled>()(
  "effect-transaction/Transaction/MetricsEnabled",
  { defaultValue: () => true }
)

/** OpenTelemetry's advised buckets for database client durations, in seconds. */
const secondsBuckets = MetricBoundaries.fromIterable([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10])

/** @internal The metrics, by name; docs/observability.md lists them. */
export const metrics = {
  duration: Metric.histogram(
    "effect_transaction.duration",
    secondsBuckets,
    "Duration of transactions in seconds, from the call to its end (retries and the wait for a connection included)"
  ),
  outcomes: Metric.counter("effect_transaction.outcomes", {
    description: "Transactions ended, by outcome and reason",
    incremental: true
  }),
  retries: Metric.counter("effect_transaction.retries", {
    description: "Attempts run again after a serialization failure or deadlock, by reason",
    incremental: true
  }),
  commitFailures: Metric.counter("effect_transaction.commit_failures", {
    description: "COMMITs that failed, by reason",
    incremental: true
  }),
  active: Metric.gauge("effect_transaction.active", {
    description: "Outermost transactions running now in this process"
  }),
  connectionWait: Metric.histogram(
    "effect_transaction.connection_wait",
    secondsBuckets,
    "Time waiting for a pooled connection before BEGIN, in seconds"
  ),
  hookFailures: Metric.counter("effect_transaction.hook_failures", {
    description: "afterCommit and afterRollback hooks that failed, by kind",
    incremental: true
  })
} as const

type Outcome = "committed" | "rolled_back" | "unknown"

/**
 * Tag sets, made once per distinct set (a tree of maps keyed by each value in turn): updating a metric makes no new
 * set, and the metric finds its hook for the set by identity.
 */
interface LabelNode {
  labels: ReadonlyArray<MetricLabel.MetricLabel> | undefined
  readonly next: Map<string, LabelNode>
}
const labelTree: LabelNode = { labels: [], next: new Map() }
const labels = (...pairs: ReadonlyArray<string>): ReadonlyArray<MetricLabel.MetricLabel> => {
  let node = labelTree
  for (const part of pairs) {
    let next = node.next.get(part)
    if (next === undefined) {
      next = { labels: undefined, next: new Map() }
      node.next.set(part, next)
    }
    node = next
  }
  if (node.labels === undefined) {
    const made: Array<MetricLabel.MetricLabel> = []
    for (let i = 0; i < pairs.length; i += 2) made.push(MetricLabel.make(pairs[i]!, pairs[i + 1]!))
    node.labels = made
  }
  return node.labels
}
const noLabels: ReadonlyArray<MetricLabel.MetricLabel> = []

let active = 0

/** What one outermost transaction records while it runs. */
export interface Observation {
  readonly span: Tracer.Span | undefined
  readonly metrics: boolean
  /** When it started, for its duration (`performance.now()`). */
  readonly started: number
  attempts: number
}

/** The reason of a failure, as the tags and attributes show it: a TransactionError reason, or what a cause was. */
export const reasonOf = (cause: Cause.Cause<unknown>): string => {
  const failure = Cause.failureOption(cause)
  if (failure._tag === "Some") {
    const error = failure.value
    if (error instanceof TransactionError) return error.reason
    if (error instanceof SqlError || databaseInfo(error).sqlState !== undefined) return classify(error).reason
    return "Failure"
  }
  return Cause.isInterruptedOnly(cause) ? "Interrupted" : "Defect"
}

const sqlStateOf = (cause: Cause.Cause<unknown>): string | undefined => {
  const failure = Cause.failureOption(cause)
  return failure._tag === "Some" ? databaseInfo(failure.value).sqlState : undefined
}

/** `db.namespace`: the database name, when the client says it (a PgClient's config does). */
const readNamespace = (client: SqlClient.SqlClient): string | undefined => {
  const config = (client as { readonly config?: { readonly database?: unknown; readonly url?: unknown } }).config
  if (config === undefined) return undefined
  if (typeof config.database === "string") return config.database
  const url = Redacted.isRedacted(config.url) ? Redacted.value(config.url) : config.url
  if (typeof url !== "string") return undefined
  try {
    const name = decodeURIComponent(new URL(url).pathname.slice(1))
    return name === "" ? undefined : name
  } catch {
    return undefined
  }
}

/** Each client's `db.namespace`, read once: a client's config does not change. */
const namespaces = new WeakMap<SqlClient.SqlClient, string | undefined>()
const namespaceOf = (client: SqlClient.SqlClient): string | undefined => {
  if (namespaces.has(client)) return namespaces.get(client)
  const namespace = readNamespace(client)
  namespaces.set(client, namespace)
  return namespace
}

const isEnabled = (fiber: Fiber.RuntimeFiber<unknown, unknown>) => ({
  spans: fiber.getFiberRef(FiberRef.currentTracerEnabled),
  metrics: Context.get(fiber.currentContext, MetricsEnabled)
})

const outcomeOf = (exit: Exit.Exit<unknown, unknown>, last: Frame | undefined): Outcome => {
  // In a test, the code's outermost transaction is a block with a virtual commit, whose outcome is its own.
  const outcome = last?.declared !== undefined ? last.outcome : last?.tx.outcome
  if (outcome === "committed") return "committed"
  if (outcome === "unknown") return "unknown"
  if (outcome === undefined && Exit.isSuccess(exit)) return "committed"
  return "rolled_back"
}

/** Starts observing an outermost transaction in `span` (undefined when spans are off): its attributes, the gauge. */
const startObservation = (
  client: SqlClient.SqlClient,
  dialect: Dialect,
  options: Transaction.BeginOptions,
  span: Tracer.Span | undefined,
  metricsOn: boolean,
  started: number
): Observation => {
  if (span !== undefined) {
    span.attribute("db.system.name", dialect.name)
    const namespace = namespaceOf(client)
    if (namespace !== undefined) span.attribute("db.namespace", namespace)
    if (options.isolation !== undefined) span.attribute("effect_transaction.isolation", options.isolation)
    span.attribute("effect_transaction.read_only", options.readOnly === true)
  }
  if (metricsOn) {
    active++
    metrics.active.unsafeUpdate(active, noLabels)
  }
  return { span, metrics: metricsOn, started, attempts: 0 }
}

/** Records how an observed transaction ended (`exit`; `last` is the block of its last attempt). */
const endObservation = (observation: Observation, exit: Exit.Exit<unknown, unknown>, last: Frame | undefined) => {
  const outcome = outcomeOf(exit, last)
  const reason = Exit.isFailure(exit) ? reasonOf(exit.cause) : undefined
  const span = observation.span
  if (span !== undefined) {
    span.attribute("effect_transaction.attempts", observation.attempts)
    span.attribute("effect_transaction.outcome", outcome)
    if (reason !== undefined && Exit.isFailure(exit)) {
      span.attribute("effect_transaction.error.reason", reason)
      span.attribute("error.type", reason)
      const sqlState = sqlStateOf(exit.cause)
      if (sqlState !== undefined) span.attribute("db.response.status_code", sqlState)
    }
  }
  if (observation.metrics) {
    active--
    metrics.active.unsafeUpdate(active, noLabels)
    metrics.duration.unsafeUpdate((performance.now() - observation.started) / 1000, labels("outcome", outcome))
    metrics.outcomes.unsafeUpdate(
      1,
      reason === undefined ? labels("outcome", outcome) : labels("outcome", outcome, "reason", reason)
    )
  }
}

const spanOptions: Tracer.SpanOptions = { kind: "client", captureStackTrace: false }

/**
 * Runs an outermost transaction (`run`, all its attempts) in its `sql.transaction` span and records its metrics;
 * `last` is the block of its last attempt, which says how it ended. `after` (its hooks) runs once it has ended,
 * uninterruptibly, inside the span. The span becomes the parent of the transaction's work where the block's
 * services are provided. One wait for the end does it all: the span is ended here rather than by `useSpan`.
 */
export const observeOutermost = <A, E, R>(
  client: SqlClient.SqlClient,
  dialect: Dialect,
  options: Transaction.BeginOptions,
  last: () => Frame | undefined,
  run: (observation: Observation | undefined) => Effect.Effect<A, E, R>,
  after: (exit: Exit.Exit<A, E>, last: Frame | undefined) => Effect.Effect<void>
): Effect.Effect<A, E, R> =>
  Effect.withFiberRuntime((fiber) => {
    const enabled = isEnabled(fiber)
    if (!enabled.spans && !enabled.metrics) return Effect.onExit(run(undefined), (exit) => after(exit, last()))
    const started = performance.now()
    const observed = (span: Tracer.Span | undefined) => {
      const observation = startObservation(client, dialect, options, span, enabled.metrics, started)
      return Effect.onExit(run(observation), (exit) => {
        const frame = last()
        const end = Effect.sync(() => {
          try {
            endObservation(observation, exit, frame)
          } finally {
            // Ended whatever the tracer's attribute calls did.
            endSpan(fiber, span, exit)
          }
        })
        const hooks = after(exit, frame)
        // Hooks report their own failures; a defect among them still leaves the span and metrics ended.
        return hooks === Effect.void ? end : Effect.ensuring(hooks, end)
      })
    }
    if (!enabled.spans) return observed(undefined)
    return Effect.flatMap(Effect.makeSpan("sql.transaction", spanOptions), observed)
  })

/** Ends `span` as Effect ends its own spans: at the clock's time, or at 0 when the tracer's timing is off. */
const endSpan = (
  fiber: Fiber.RuntimeFiber<unknown, unknown>,
  span: Tracer.Span | undefined,
  exit: Exit.Exit<unknown, unknown>
) => {
  if (span === undefined || span.status._tag === "Ended") return
  const timing = fiber.getFiberRef(FiberRef.currentTracerTimingEnabled)
  span.end(timing ? Context.get(fiber.currentDefaultServices, Clock.Clock).unsafeCurrentTimeNanos() : 0n, exit)
}

/** An observed transaction whose end is not the end of one effect: `end` records how it ended, once. */
export interface OpenObservation {
  readonly observation: Observation
  readonly end: (exit: Exit.Exit<unknown, unknown>, last: Frame | undefined) => Effect.Effect<void>
}

/**
 * Starts observing a transaction of a `Transaction.begin` handle, whose span stays open until `end` is called.
 * Undefined when spans and metrics are both off.
 */
export const observeOpened = (
  client: SqlClient.SqlClient,
  dialect: Dialect,
  options: Transaction.BeginOptions
): Effect.Effect<OpenObservation | undefined> =>
  Effect.withFiberRuntime((fiber) => {
    const enabled = isEnabled(fiber)
    if (!enabled.spans && !enabled.metrics) return Effect.succeed(undefined)
    const started = performance.now()
    const observed = (span: Tracer.Span | undefined): OpenObservation => {
      const observation = startObservation(client, dialect, options, span, enabled.metrics, started)
      observation.attempts = 1
      let ended = false
      const end = (exit: Exit.Exit<unknown, unknown>, last: Frame | undefined) =>
        Effect.withFiberRuntime<void>((fiber) => {
          if (ended) return Effect.void
          ended = true
          try {
            endObservation(observation, exit, last)
          } finally {
            endSpan(fiber, span, exit)
          }
          return Effect.void
        })
      return { observation, end }
    }
    if (!enabled.spans) return Effect.succeed(observed(undefined))
    return Effect.map(Effect.makeSpan("sql.transaction", spanOptions), observed)
  })

/**
 * Runs a nested block in a `sql.transaction` span of its own, under its caller's span, when spans are on; `block`
 * provides the span to the block's work with the block's services.
 */
export const observeNested = <A, E, R>(
  block: (span: Tracer.Span | undefined) => Effect.Effect<A, E, R>,
  parent: Frame
): Effect.Effect<A, E, R> =>
  Effect.withFiberRuntime((fiber) => {
    if (!fiber.getFiberRef(FiberRef.currentTracerEnabled)) return block(undefined)
    return Effect.useSpan("sql.transaction", spanOptions, (span) => {
      span.attribute("db.system.name", parent.tx.dialect.name)
      span.attribute("effect_transaction.depth", parent.depth + 1)
      span.event("db.transaction.savepoint", nanos())
      return Effect.onExit(block(span), (exit) =>
        Effect.sync(() => {
          if (Exit.isFailure(exit)) {
            span.event("db.transaction.rollback_to_savepoint", nanos(), {
              "effect_transaction.error.reason": reasonOf(exit.cause)
            })
          }
        })
      )
    })
  })

const nanos = () => BigInt(Math.round((performance.timeOrigin + performance.now()) * 1_000_000))

/** Records a retry: the reason of the failure and the delay before the next attempt. */
export const observeRetry = (observation: Observation | undefined, reason: string, delayMillis: number): void => {
  if (observation === undefined) return
  observation.span?.event("db.transaction.retry", nanos(), {
    "effect_transaction.attempt": observation.attempts,
    "effect_transaction.error.reason": reason,
    "effect_transaction.retry.delay_ms": delayMillis
  })
  if (observation.metrics) metrics.retries.unsafeUpdate(1, labels("reason", reason))
}

/** The span to record an event of `tx` on: its own, or, where it has none, the fiber's current one. */
const spanOf = (fiber: Fiber.RuntimeFiber<unknown, unknown>, tx: Tx): Tracer.Span | undefined => {
  if (tx.span !== undefined) return tx.span
  if (!fiber.getFiberRef(FiberRef.currentTracerEnabled)) return undefined
  const span = Context.getOption(fiber.currentContext, Tracer.ParentSpan)
  return span._tag === "Some" && span.value._tag === "Span" ? span.value : undefined
}

/** Records a failed COMMIT of `tx`. */
export const observeCommitFailure =
  (tx: Tx) =>
  (error: unknown): Effect.Effect<void> =>
    Effect.withFiberRuntime((fiber) => {
      const reason = error instanceof TransactionError ? error.reason : classify(error).reason
      if (Context.get(fiber.currentContext, MetricsEnabled))
        metrics.commitFailures.unsafeUpdate(1, labels("reason", reason))
      spanOf(fiber, tx)?.event("db.transaction.commit_failed", nanos(), { "effect_transaction.error.reason": reason })
      return Effect.void
    })

/** Starts timing a wait for a pooled connection: call what it returns when the wait has ended, however it ended. */
export const connectionWait = (fiber: Fiber.RuntimeFiber<unknown, unknown>): (() => void) | undefined => {
  if (!Context.get(fiber.currentContext, MetricsEnabled)) return undefined
  const started = performance.now()
  return () => metrics.connectionWait.unsafeUpdate((performance.now() - started) / 1000, noLabels)
}

/** Records a hook of `tx` that failed, on the transaction's span and in the metrics. */
export const observeHookFailure =
  (tx: Tx, kind: string, index: number) =>
  (cause: Cause.Cause<unknown>): Effect.Effect<void> =>
    Effect.withFiberRuntime((fiber) => {
      if (Context.get(fiber.currentContext, MetricsEnabled)) metrics.hookFailures.unsafeUpdate(1, labels("kind", kind))
      spanOf(fiber, tx)?.event("db.transaction.hook_failed", nanos(), {
        "effect_transaction.hook.kind": kind,
        "effect_transaction.hook.index": index,
        "effect_transaction.error.reason": reasonOf(cause)
      })
      return Effect.void
    })
