/**
 * CPU per transaction on the real driver path without a database: node-postgres, through `@effect/sql-pg`, talks
 * to a PostgreSQL wire-protocol stub inside the process (a stream in place of the socket) that answers every
 * message on the next turn of the event loop, as a socket read would arrive. What is measured is the work of this
 * process per transaction (node-postgres, `@effect/sql`, the transaction library, and the stub's own small share,
 * the same for every round trip), with no kernel, network or server in it. Reported as CPU microseconds (user +
 * system) per transaction, median of interleaved rounds.
 */
import { Duplex } from "node:stream"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Effect, Layer } from "effect"
import { Transaction } from "effect-transaction"

const message = (type: string, body: Buffer) => {
  const head = Buffer.alloc(5)
  head.write(type, 0, "latin1")
  head.writeInt32BE(body.length + 4, 1)
  return Buffer.concat([head, body])
}
const int16 = (n: number) => {
  const b = Buffer.alloc(2)
  b.writeInt16BE(n)
  return b
}
const int32 = (n: number) => {
  const b = Buffer.alloc(4)
  b.writeInt32BE(n)
  return b
}
const cString = (s: string) => Buffer.from(`${s}\0`)
const field = (name: string, typeOid: number, size: number) =>
  Buffer.concat([cString(name), int32(0), int16(0), int32(typeOid), int16(size), int32(-1), int16(0)])

/** Every SELECT answers one row (id bigint, payload text). */
const rowDescription = message("T", Buffer.concat([int16(2), field("id", 20, 8), field("payload", 25, -1)]))
const dataRow = message("D", Buffer.concat([int16(2), int32(1), Buffer.from("1"), int32(7), Buffer.from("payload")]))
const noData = message("n", Buffer.alloc(0))
const parseComplete = message("1", Buffer.alloc(0))
const bindComplete = message("2", Buffer.alloc(0))
const commandComplete = (tag: string) => message("C", cString(tag))

/** The command tag PostgreSQL answers a statement with, and whether it returns a row. */
const tagOf = (sql: string): readonly [string, boolean] => {
  const word = /^\s*(\w+)/.exec(sql)?.[1]?.toUpperCase() ?? ""
  if (word === "SELECT") return ["SELECT 1", true]
  if (word === "INSERT") return ["INSERT 0 1", false]
  if (word === "ROLLBACK" && /\bTO\b/i.test(sql)) return ["ROLLBACK", false]
  return [word, false]
}

let nextProcessId = 1000

/** The server side of one connection, as node-postgres sees it through its stream. */
class WireStub extends Duplex {
  private input: Buffer = Buffer.alloc(0)
  private started = false
  private status = "I"
  private readonly statements = new Map<string, string>()
  private portal = ""
  private output: Array<Buffer> = []

  setNoDelay() {
    return this
  }
  setKeepAlive() {
    return this
  }
  ref() {
    return this
  }
  unref() {
    return this
  }
  connect() {
    setImmediate(() => this.emit("connect"))
    return this
  }
  override _read() {}
  override _write(chunk: Buffer, _encoding: BufferEncoding, done: (error?: Error | null) => void) {
    this.input = this.input.length === 0 ? chunk : Buffer.concat([this.input, chunk])
    this.receive()
    done()
  }

  private send(reply: Buffer) {
    if (this.output.push(reply) > 1) return
    setImmediate(() => {
      const replies = this.output
      this.output = []
      this.push(replies.length === 1 ? replies[0] : Buffer.concat(replies))
    })
  }

  private statusAfter(sql: string) {
    const word = /^\s*(\w+)/.exec(sql)?.[1]?.toUpperCase()
    if (word === "BEGIN") this.status = "T"
    else if (word === "COMMIT" || (word === "ROLLBACK" && !/\bTO\b/i.test(sql))) this.status = "I"
  }

  private receive() {
    for (;;) {
      if (!this.started) {
        if (this.input.length < 4 || this.input.length < this.input.readInt32BE(0)) return
        this.input = this.input.subarray(this.input.readInt32BE(0))
        this.started = true
        const key = message("K", Buffer.concat([int32(nextProcessId++), int32(1)]))
        this.send(Buffer.concat([message("R", int32(0)), key, message("Z", Buffer.from(this.status))]))
        continue
      }
      if (this.input.length < 5) return
      const length = this.input.readInt32BE(1)
      if (this.input.length < length + 1) return
      const type = String.fromCharCode(this.input[0]!)
      const body = this.input.subarray(5, length + 1)
      this.input = this.input.subarray(length + 1)
      this.answer(type, body)
    }
  }

  private answer(type: string, body: Buffer) {
    const text = (at: number) => body.toString("utf8", at, body.indexOf(0, at))
    switch (type) {
      case "Q": {
        const replies: Array<Buffer> = []
        for (const sql of text(0)
          .split(";")
          .filter((part) => part.trim() !== "")) {
          const [tag, returnsRow] = tagOf(sql)
          if (returnsRow) replies.push(rowDescription, dataRow)
          replies.push(commandComplete(tag))
          this.statusAfter(sql)
        }
        replies.push(message("Z", Buffer.from(this.status)))
        return this.send(Buffer.concat(replies))
      }
      case "P": {
        const name = text(0)
        this.statements.set(name, text(name.length + 1))
        return this.send(parseComplete)
      }
      case "B": {
        const portal = text(0)
        this.portal = this.statements.get(text(portal.length + 1)) ?? ""
        return this.send(bindComplete)
      }
      case "D":
        return this.send(tagOf(this.portal)[1] ? rowDescription : noData)
      case "E": {
        const [tag, returnsRow] = tagOf(this.portal)
        if (returnsRow) this.send(dataRow)
        this.statusAfter(this.portal)
        return this.send(commandComplete(tag))
      }
      case "S":
        return this.send(message("Z", Buffer.from(this.status)))
      case "X":
        setImmediate(() => this.push(null))
        return
    }
  }
}

const body = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.zipRight(
    sql`INSERT INTO items (id, payload) VALUES (${1}, ${"payload"})`,
    sql`SELECT id, payload FROM items WHERE id = ${1}`
  )
)

/** The body on a reserved connection, after `before` (if any) and before `after`. */
const onReserved = (before: string | undefined, after: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.scoped(
      Effect.flatMap(sql.reserve, (conn) =>
        Effect.zipRight(
          before === undefined ? Effect.void : conn.executeUnprepared(before, [], undefined),
          Effect.provideService(body, SqlClient.TransactionConnection, [conn, 0])
        ).pipe(Effect.tap(() => conn.executeUnprepared(after, [], undefined)))
      )
    )
  )

type Run = Effect.Effect<unknown, unknown, SqlClient.SqlClient>

/** Each contender: its name, one transaction, and what its rounds run in (the context they read settings from). */
const contenders: ReadonlyArray<readonly [string, Run, ((rounds: Run) => Run)?]> = [
  ["hand-written BEGIN/COMMIT (4 round trips)", onReserved("BEGIN", "COMMIT")],
  [
    "@effect/sql withTransaction (4 round trips)",
    Effect.flatMap(SqlClient.SqlClient, (sql) => sql.withTransaction(body))
  ],
  ["effect-transaction (3 round trips)", Transaction.withTransaction(body)],
  [
    "effect-transaction, PreparedStatements 100 (3 round trips)",
    Transaction.withTransaction(body),
    Effect.provideService(Transaction.PreparedStatements, 100)
  ],
  ["no transaction, SELECT 1 for COMMIT (3 round trips)", onReserved(undefined, "SELECT 1")]
]

/** Prints the CPU per transaction of each contender on node-postgres against the wire-protocol stub. */
export const wireCpu = (options: { readonly transactions: number; readonly rounds: number }) =>
  Effect.gen(function* () {
    const context = yield* Layer.build(PgClient.layer({ host: "wire-stub", stream: () => new WireStub() }))
    const sql = Effect.runSync(Effect.provide(SqlClient.SqlClient, context))
    const runs = contenders.map(([, transaction, around = (rounds: Run) => rounds]) => () => {
      const rounds = around(Effect.repeatN(transaction, options.transactions - 1))
      return Effect.runPromise(Effect.provideService(rounds, SqlClient.SqlClient, sql))
    })
    for (const run of runs) yield* Effect.promise(run)
    const samples: Array<Array<number>> = contenders.map(() => [])
    for (let round = 0; round < options.rounds; round++) {
      for (let k = 0; k < runs.length; k++) {
        const index = (k + round) % runs.length
        const before = process.cpuUsage()
        yield* Effect.promise(runs[index]!)
        const used = process.cpuUsage(before)
        samples[index]!.push((used.user + used.system) / options.transactions)
      }
    }
    const median = (values: ReadonlyArray<number>) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!
    // The ratio within each round is steadier than either figure alone: a busy machine slows a whole round.
    const effectSql = contenders.findIndex(([name]) => name.startsWith("@effect/sql"))
    const rows = contenders.map(([name], index) => [
      name,
      median(samples[index]!).toFixed(1),
      `${median(samples[index]!.map((cpu, round) => cpu / samples[effectSql]![round]!)).toFixed(3)}x`
    ])
    const header = [
      "node-postgres against a wire-protocol stub",
      "CPU µs per transaction (INSERT, SELECT)",
      "CPU / @effect/sql's, per round"
    ]
    console.log(
      `\nCPU per transaction on the driver's path with no database (an in-process wire-protocol stub), median of ` +
        `${options.rounds} rounds of ${options.transactions} transactions.\n`
    )
    console.log([header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`).join("\n"))
  })
