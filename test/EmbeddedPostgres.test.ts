import * as fs from "node:fs"
import { SqlClient } from "@effect/sql"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Layer, Scope } from "effect"
import { EmbeddedPostgres, Transaction } from "effect-transaction"

describe("EmbeddedPostgres", () => {
  it.live("starts a real server, provides a client, and removes its files when the scope closes", () =>
    Effect.gen(function* () {
      const scope = yield* Scope.make()
      const server = yield* Scope.extend(EmbeddedPostgres.start(), scope)
      assert.strictEqual(server.host, "127.0.0.1")
      assert.isTrue(fs.existsSync(server.directory))
      const [row] = yield* Effect.flatMap(SqlClient.SqlClient, (sql) =>
        sql<{ ok: number }>`SELECT 1 AS ok`.pipe(Transaction.withTransaction())
      ).pipe(Effect.provide(Layer.fresh(EmbeddedPostgres.layer())))
      assert.strictEqual(row!.ok, 1)
      yield* Scope.close(scope, Exit.void)
      assert.isFalse(fs.existsSync(server.directory))
    })
  )

  it.live("a server that cannot start fails with StartFailed and the server's own message", () =>
    Effect.gen(function* () {
      const exit = yield* Effect.exit(
        Effect.scoped(EmbeddedPostgres.start({ postgresFlags: ["-c", "shared_buffers=not-a-size"] }))
      )
      assert.isTrue(Exit.isFailure(exit))
      const error = Exit.isFailure(exit) ? exit.cause : undefined
      const failure = error !== undefined && error._tag === "Fail" ? error.error : undefined
      assert.strictEqual(failure?._tag, "EmbeddedPostgresError")
      assert.strictEqual(failure?.reason, "StartFailed")
      assert.match(failure?.message ?? "", /shared_buffers/)
      assert.match(failure?.output ?? "", /shared_buffers/)
    })
  )
})
