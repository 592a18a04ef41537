/**
 * Run by test/EmbeddedPostgres.test.ts in a child process (inside a mount namespace whose /etc/passwd it chose):
 * starts an embedded server and prints, as JSON, the uid its backends run as, or the start error.
 */
import * as fs from "node:fs"
import pg from "pg"
import * as internal from "../../src/internal/embeddedPostgres.js"

try {
  const server = await internal.start({ fast: true, startTimeoutMillis: 60_000, postgresFlags: [] })
  const client = new pg.Client({ host: server.host, port: server.port, user: server.user, database: server.database })
  await client.connect()
  const { rows } = await client.query<{ pid: number }>("SELECT pg_backend_pid() AS pid")
  const uid = fs.statSync(`/proc/${rows[0]!.pid}`).uid
  await client.end()
  await server.stop()
  console.log(JSON.stringify({ uid }))
} catch (error) {
  console.log(JSON.stringify({ reason: (error as internal.StartError).reason, message: (error as Error).message }))
}
