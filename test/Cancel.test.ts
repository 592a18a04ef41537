/**
 * The out-of-band cancel request (src/internal/pgCancel.ts): sent on a socket of its own, which stays open until
 * the server closes it, as libpq's does. A connection pooler in between (PgBouncer) forwards the request over a
 * connection of its own and drops it when the client hangs up first, so a request sent with the socket half-closed
 * right after it never reached the statement behind the pooler.
 */
import * as net from "node:net"
import { assert, describe, it, layer } from "@effect/vitest"
import { Effect } from "effect"
import pg from "pg"
import { cancelMessage, sendCancelRequest } from "../src/internal/pgCancel.js"
import * as TestDatabase from "./utils/TestDatabase.js"

/** A server that reads a cancel request, waits `holdMillis` as a pooler forwarding it would, then closes. */
const poolerLike = (holdMillis: number) =>
  Effect.acquireRelease(
    Effect.async<{
      readonly port: number
      readonly seen: Array<{ readonly request: Buffer; readonly hungUpFirst: boolean }>
      readonly server: net.Server
    }>((resume) => {
      const seen: Array<{ readonly request: Buffer; readonly hungUpFirst: boolean }> = []
      const server = net.createServer((socket) => {
        let request = Buffer.alloc(0)
        let hungUp = false
        socket.on("end", () => {
          hungUp = true
        })
        socket.on("data", (chunk) => {
          request = Buffer.concat([request, chunk])
          if (request.length < 16) return
          const hold = setTimeout(() => {
            seen.push({ request, hungUpFirst: hungUp })
            socket.destroy()
          }, holdMillis)
          socket.on("close", () => clearTimeout(hold))
        })
      })
      server.listen(0, "127.0.0.1", () => {
        resume(Effect.succeed({ port: (server.address() as net.AddressInfo).port, seen, server }))
      })
      return Effect.sync(() => {
        server.close()
      })
    }),
    ({ server }) =>
      Effect.async<void>((resume) => {
        server.close(() => resume(Effect.void))
      })
  )

describe("the cancel request", () => {
  it.live("keeps its socket open until the server closes it, as a pooler such as PgBouncer needs", () =>
    Effect.scoped(
      Effect.gen(function* () {
        const server = yield* poolerLike(100)
        const target = { host: "127.0.0.1", port: server.port, processID: 4242, secretKey: 777 }
        assert.isTrue(yield* sendCancelRequest(target, 5_000))
        assert.strictEqual(server.seen.length, 1)
        assert.deepStrictEqual(server.seen[0]!.request, cancelMessage(target))
        assert.isFalse(server.seen[0]!.hungUpFirst)
      })
    )
  )

  it.live("a server that never closes: false at the deadline, and the socket is closed", () =>
    Effect.scoped(
      Effect.gen(function* () {
        const server = yield* poolerLike(60_000)
        const target = { host: "127.0.0.1", port: server.port, processID: 1, secretKey: 2 }
        const started = Date.now()
        assert.isFalse(yield* sendCancelRequest(target, 200))
        assert.isBelow(Date.now() - started, 2_000)
      })
    )
  )

  layer(TestDatabase.layer(), { excludeTestServices: true })((it) => {
    it.effect("stops a running statement of PostgreSQL, and ends when the server has closed the socket", () =>
      Effect.gen(function* () {
        const { url } = yield* TestDatabase.TestDatabase
        const client = new pg.Client({ connectionString: url })
        yield* Effect.promise(() => client.connect())
        const sleeping = client.query("SELECT pg_sleep(30)").then(
          () => "finished",
          (error: { readonly code?: string }) => error.code
        )
        const { host, port, processID, secretKey } = client as unknown as {
          readonly host: string
          readonly port: number
          readonly processID: number
          readonly secretKey: number
        }
        // The statement has reached the backend once it shows as active.
        yield* TestDatabase.eventually(
          Effect.flatMap(TestDatabase.TestDatabase, (db) =>
            db.outside<{ n: number }>(
              `SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = ${processID} AND state = 'active'`
            )
          ),
          (rows) => rows[0]!.n === 1
        )
        const started = Date.now()
        assert.isTrue(yield* sendCancelRequest({ host, port: Number(port), processID, secretKey }, 5_000))
        assert.strictEqual(yield* Effect.promise(() => sleeping), "57014")
        assert.isBelow(Date.now() - started, 5_000)
        yield* Effect.promise(() => client.end())
      })
    )
  })
})
