/**
 * The options of a transaction as data: which keys exist, what values they take (durations, isolation levels, the
 * retry schedule), PostgreSQL's limits on them, and which a nested block may repeat. Every check here runs before
 * anything is sent; a bad value is an `InvalidOption`, an incompatible nested one an `OptionConflict`.
 */
import * as Duration from "effect/Duration"
import * as Option from "effect/Option"
import * as Schedule from "effect/Schedule"
import type * as Transaction from "../Transaction.js"
import { TransactionError } from "../TransactionError.js"
import type { Frame } from "./blocks.js"

/** @internal */
export const isolationLevels = ["read committed", "repeatable read", "serializable"] as const

const rank = (isolation: Transaction.IsolationLevel | undefined) =>
  isolation === undefined ? 0 : isolationLevels.indexOf(isolation)

export const invalidOption = (message: string) => new TransactionError({ reason: "InvalidOption", message })

const optionNames: ReadonlySet<string> = new Set([
  "isolation",
  "readOnly",
  "deferrable",
  "timeout",
  "statementTimeout",
  "lockTimeout",
  "idleTimeout",
  "retry",
  "acquireTimeout",
  "deadlockTimeout"
])

/** Shows an option's value in a message; a bigint or a cyclic object must not make the message itself throw. */
const show = (value: unknown): string => {
  if (typeof value === "bigint") return `${value}n`
  try {
    return JSON.stringify(value) ?? String(value)
  } catch {
    return String(value)
  }
}

/** The most statements `Transaction.PreparedStatements` may ask each connection to keep. */
export const maxPreparedStatements = 1_000_000

/**
 * `Transaction.PreparedStatements` as a count of statements to keep prepared per connection, or the `InvalidOption`
 * a value that is not a whole number from 0 to `maxPreparedStatements` is.
 */
export const preparedStatementsCount = (value: number): number | TransactionError => {
  if (Number.isInteger(value) && value >= 0 && value <= maxPreparedStatements) return value
  // JSON would show NaN and Infinity as null.
  const shown = typeof value === "number" ? String(value) : show(value)
  return invalidOption(
    `Transaction.PreparedStatements is ${shown}: it must be a whole number from 0 (keep none) to ` +
      `${maxPreparedStatements}, the number of statements each pooled connection keeps prepared. Nothing was ` +
      "sent. Provide such a number, or leave the setting out."
  )
}

export const validateOptions = (options: Transaction.Options): TransactionError | undefined => {
  let given = false
  for (const name in options) {
    if (!Object.hasOwn(options, name)) continue
    given = true
    if (!optionNames.has(name)) {
      return invalidOption(
        `Unknown option ${JSON.stringify(name)}; nothing was sent. The options are: ${[...optionNames].join(", ")}. ` +
          (name.toLowerCase().startsWith("isolation")
            ? 'For the isolation level, use isolation: "serializable". '
            : "") +
          "Remove the key, or pick the options out of a larger object instead of spreading it."
      )
    }
  }
  if (!given) return undefined
  if (options.isolation !== undefined && !isolationLevels.includes(options.isolation)) {
    return invalidOption(
      `Unknown isolation level ${show(options.isolation)}. Use one of: ${isolationLevels.join(", ")}.`
    )
  }
  if (options.deferrable === true && (options.isolation !== "serializable" || options.readOnly !== true)) {
    return invalidOption(
      "The deferrable option only has an effect on a serializable, read-only transaction. " +
        'Add isolation: "serializable" and readOnly: true, or drop deferrable.'
    )
  }
  for (const name of durationOptions) {
    const input = options[name]
    if (input === undefined || (name === "deadlockTimeout" && isInfinite(input))) continue
    const millis = millisOf(input)
    if (millis === undefined) {
      return invalidOption(
        `The ${name} option must be a positive, finite duration such as "5 seconds"; got ${show(input)}. ` +
          "Leave the option out for no limit."
      )
    }
    if (serverDurationOptions.includes(name) && Math.ceil(millis) > MAX_SERVER_MILLIS) {
      return invalidOption(
        `The ${name} option is ${show(input)}, above PostgreSQL's limit for it of ${MAX_SERVER_MILLIS} ms ` +
          "(about 24.8 days); nothing was sent. Leave the option out for no limit."
      )
    }
  }
  if (options.retry !== undefined && typeof options.retry !== "boolean" && !Schedule.isSchedule(options.retry)) {
    return invalidOption("The retry option must be true, false or a Schedule.")
  }
  return undefined
}

const durationOptions = [
  "timeout",
  "statementTimeout",
  "lockTimeout",
  "idleTimeout",
  "acquireTimeout",
  "deadlockTimeout"
] as const

/** The options the database enforces (`SET LOCAL`), in whole milliseconds up to a 32-bit integer. */
const serverDurationOptions: ReadonlyArray<string> = ["statementTimeout", "lockTimeout", "idleTimeout"]
const MAX_SERVER_MILLIS = 2_147_483_647

/** The `deadlockTimeout` option in milliseconds: `Infinity` for no bound, undefined when it is not given. */
export const deadlockTimeoutMillisOf = (options: Transaction.BeginOptions): number | undefined => {
  const input = options.deadlockTimeout
  if (input === undefined) return undefined
  return isInfinite(input) ? Number.POSITIVE_INFINITY : millisOf(input)
}

const isInfinite = (input: Duration.DurationInput): boolean => {
  const decoded = Duration.decodeUnknown(input)
  return Option.isSome(decoded) && !Duration.isFinite(decoded.value)
}

/** A positive, finite duration in milliseconds, or undefined for anything else. */
export const millisOf = (input: Duration.DurationInput): number | undefined => {
  if ((typeof input === "number" || typeof input === "bigint") && !(input > 0)) return undefined
  const decoded = Duration.decodeUnknown(input)
  if (Option.isNone(decoded)) return undefined
  const millis = Duration.toMillis(decoded.value)
  return millis > 0 && Number.isFinite(millis) ? millis : undefined
}

const conflict = (frame: Frame, message: string) =>
  new TransactionError({
    reason: "OptionConflict",
    message: `A nested block of ${frame.describe()} ${message}`
  })

/** A nested block runs inside the outer transaction: it may ask only for what that transaction already gives. */
export const checkNestedOptions = (parent: Frame, options: Transaction.Options): TransactionError | undefined => {
  const outer = parent.characteristics
  if (options.isolation !== undefined && rank(options.isolation) > rank(outer.isolation)) {
    return conflict(
      parent,
      `asked for isolation "${options.isolation}", but the outer transaction runs at ` +
        `"${outer.isolation ?? "read committed"}" and isolation cannot change inside a transaction. ` +
        `Open the outermost transaction with isolation: "${options.isolation}".`
    )
  }
  if (options.readOnly === false && outer.readOnly === true) {
    return conflict(
      parent,
      "asked to be read-write, but the outer transaction is read-only. " +
        "Drop readOnly: true from the outer transaction, or readOnly: false from the nested block."
    )
  }
  if (options.readOnly === true && outer.readOnly !== true) {
    return conflict(
      parent,
      "asked to be read-only, but the outer transaction is read-write and a nested block cannot be made " +
        "read-only on its own. Open the outermost transaction with readOnly: true, or drop it from the nested block."
    )
  }
  if (options.deferrable === true && outer.deferrable !== true) {
    return conflict(
      parent,
      "asked to be deferrable, but the outer transaction is not, and deferrable only applies when a transaction " +
        "starts. Open the outermost transaction with deferrable: true, or drop it from the nested block."
    )
  }
  for (const name of [...durationOptions, "retry"] as const) {
    if (options[name] !== undefined && options[name] !== false) {
      return conflict(
        parent,
        `was given the ${name} option, which applies to a whole transaction: only the outermost block ` +
          (name === "retry" ? "can run the transaction again" : "sets it") +
          `. Set ${name} on the outermost withTransaction, or drop it from the nested block.`
      )
    }
  }
  return undefined
}

/** @internal The options of a transaction that does not run one effect: no timeout, no retry. */
export const checkBeginOptions = (options: Transaction.BeginOptions, who: string): TransactionError | undefined => {
  const given = options as Transaction.Options
  if (given.timeout !== undefined || (given.retry !== undefined && given.retry !== false)) {
    return invalidOption(
      `${who} takes no timeout or retry option: it cannot run your work again or cut it short. Use ` +
        "withTransaction for those, or bound the scope with Effect.timeout."
    )
  }
  return validateOptions(options)
}
