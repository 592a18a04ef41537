/**
 * The engine behind the public Transaction module, as it imports it. Each part lives in its own file:
 *
 * - connection.ts: the transaction's connection, its single owner, statements with out-of-band cancel, settle
 * - blocks.ts: the transaction state, the stack of blocks, savepoints, nested blocks, the guarded connection
 * - outermost.ts: reserve, BEGIN, outcome, timeout, retry, and choosing a nested block or a new transaction
 * - hooks.ts: afterCommit / afterRollback
 * - observability.ts: the spans and metrics of transactions; turns.ts: taking turns under contention
 * - handle.ts: the manual handle of Transaction.begin
 * - propagation.ts: requiresNew, the SqlClient wrapper, setLocal, advisory locks, accessors
 * - options.ts, sqlScan.ts, dialect.ts, pgCancel.ts: option checks, the sandbox's scanner, the database
 */
export { Current } from "./blocks.js"
export { begin } from "./handle.js"
export { HookFailureHandler, registerHook } from "./hooks.js"
export { metrics, MetricsEnabled } from "./observability.js"
export { PreparedStatements } from "./dialect.js"
export { isolationLevels } from "./options.js"
export { defaultRetrySchedule, withTransaction } from "./outermost.js"
export { advisoryLock, currentOption, isActive, layer, requiresNew, setLocal } from "./propagation.js"
export { transactionControlOf } from "./sqlScan.js"
