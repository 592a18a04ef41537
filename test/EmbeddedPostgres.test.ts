import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { SqlClient } from "@effect/sql"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Layer, Scope } from "effect"
import { EmbeddedPostgres, Transaction } from "effect-transaction"
import * as internal from "../src/internal/embeddedPostgres.js"

/** Whether this process can give a child its own /etc/passwd: root, with `unshare` able to make a mount namespace. */
const canFakeAccounts = process.getuid?.() === 0 && spawnSync("unshare", ["-m", "true"]).status === 0

/**
 * Starts an embedded server in a child process that sees /etc/passwd as `passwd` (the real one less `without`), and
 * returns what it printed: the uid its backends ran as, or why it could not start.
 */
const startWithAccounts = (without: ReadonlyArray<string>) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "etx-passwd-"))
  const passwd = path.join(dir, "passwd")
  fs.writeFileSync(
    passwd,
    fs
      .readFileSync("/etc/passwd", "utf8")
      .split("\n")
      .filter((line) => !without.includes(line.split(":")[0]!))
      .join("\n")
  )
  // Accounts from the files alone: NSS modules such as systemd's would make up a `nobody` of their own.
  const nsswitch = path.join(dir, "nsswitch.conf")
  fs.writeFileSync(nsswitch, "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n")
  const script = path.join(import.meta.dirname, "utils", "embeddedOwner.ts")
  const child = spawnSync(
    "unshare",
    [
      "-m",
      "sh",
      "-c",
      'mount --bind "$0" /etc/passwd && mount --bind "$1" /etc/nsswitch.conf && exec "$2" --import tsx "$3"',
      passwd,
      nsswitch,
      process.execPath,
      script
    ],
    { encoding: "utf8", timeout: 120_000 }
  )
  fs.rmSync(dir, { recursive: true, force: true })
  const line = child.stdout.trim().split("\n").pop() ?? ""
  if (!line.startsWith("{")) throw new Error(`the child printed no result: ${child.stdout}${child.stderr}`)
  return JSON.parse(line) as { readonly uid?: number; readonly reason?: string; readonly message?: string }
}

const uidOf = (name: string) =>
  Number(
    fs
      .readFileSync("/etc/passwd", "utf8")
      .split("\n")
      .find((line) => line.startsWith(`${name}:`))
      ?.split(":")[2]
  )

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

  it.live.skipIf(!canFakeAccounts)("as root on a machine with no postgres account, the server runs as nobody", () =>
    Effect.sync(() => {
      const result = startWithAccounts(["postgres"])
      assert.deepStrictEqual(result, { uid: uidOf("nobody") })
    })
  )

  it.live.skipIf(!canFakeAccounts)(
    "as root with no unprivileged account at all, it fails with NoUnprivilegedUser and says how to create one",
    () =>
      Effect.sync(() => {
        const result = startWithAccounts(["postgres", "nobody"])
        assert.strictEqual(result.reason, "NoUnprivilegedUser")
        assert.match(result.message ?? "", /useradd --system --user-group postgres/)
      })
  )

  it.live("binaries whose install script was skipped run from a private copy with the library links made", () =>
    Effect.promise(async () => {
      const source = path.dirname(fs.realpathSync(internal.resolveNativeDir()))
      const version = `0.0.0-test.${process.pid}`
      const fake = fs.mkdtempSync(path.join(os.tmpdir(), "etx-native-"))
      fs.writeFileSync(path.join(fake, "package.json"), JSON.stringify({ version }))
      fs.cpSync(path.join(source, "native"), path.join(fake, "native"), { recursive: true, verbatimSymlinks: true })
      const links = JSON.parse(fs.readFileSync(path.join(fake, "native", "pg-symlinks.json"), "utf8")) as Array<{
        readonly target: string
      }>
      assert.isAbove(links.length, 0)
      for (const { target } of links) fs.rmSync(path.join(fake, target), { force: true })
      try {
        const { directory: prepared } = await internal.preparedNativeDir(path.join(fake, "native"), undefined)
        assert.notStrictEqual(prepared, path.join(fake, "native"))
        for (const { target } of links) {
          assert.isTrue(fs.existsSync(path.join(prepared, path.relative("native", target))), target)
        }
        const printed = spawnSync(path.join(prepared, "bin", "postgres"), ["--version"], { encoding: "utf8" })
        assert.match(printed.stdout, /PostgreSQL/)
        assert.deepStrictEqual(await internal.preparedNativeDir(path.join(fake, "native"), undefined), {
          directory: prepared
        })
        fs.rmSync(prepared, { recursive: true, force: true })
      } finally {
        fs.rmSync(fake, { recursive: true, force: true })
      }
    })
  )

  it.live("a folder of the copy's name that is a link, or writable by others, is never used: the copy is private", () =>
    Effect.promise(async () => {
      const source = path.dirname(fs.realpathSync(internal.resolveNativeDir()))
      const version = `0.0.0-squat.${process.pid}`
      const fake = fs.mkdtempSync(path.join(os.tmpdir(), "etx-native-"))
      fs.writeFileSync(path.join(fake, "package.json"), JSON.stringify({ version }))
      fs.cpSync(path.join(source, "native"), path.join(fake, "native"), { recursive: true, verbatimSymlinks: true })
      for (const { target } of JSON.parse(fs.readFileSync(path.join(fake, "native", "pg-symlinks.json"), "utf8"))) {
        fs.rmSync(path.join(fake, target), { force: true })
      }
      const name = path.join(
        os.tmpdir(),
        `effect-transaction-postgres-${process.platform}-${process.arch}-${version}-${process.getuid?.() ?? 0}`
      )
      // What another user could plant: a link to a folder whose bin/postgres is theirs to choose.
      const planted = fs.mkdtempSync(path.join(os.tmpdir(), "etx-planted-"))
      fs.mkdirSync(path.join(planted, "bin"))
      fs.writeFileSync(path.join(planted, "bin", "postgres"), "#!/bin/sh\necho planted\n", { mode: 0o755 })
      try {
        for (const squat of ["link", "open folder"] as const) {
          if (squat === "link") fs.symlinkSync(planted, name)
          else {
            fs.rmSync(name, { force: true })
            fs.cpSync(planted, name, { recursive: true })
            fs.chmodSync(name, 0o777)
          }
          const binaries = await internal.preparedNativeDir(path.join(fake, "native"), undefined)
          assert.notStrictEqual(binaries.directory, name, squat)
          assert.notInclude(fs.realpathSync(binaries.directory), planted, squat)
          const printed = spawnSync(path.join(binaries.directory, "bin", "postgres"), ["--version"], {
            encoding: "utf8"
          })
          assert.match(printed.stdout, /PostgreSQL/, squat)
          assert.isDefined(binaries.remove, "a private copy is removed when its server stops")
          await binaries.remove!()
          assert.isFalse(fs.existsSync(binaries.directory), squat)
        }
      } finally {
        fs.rmSync(name, { recursive: true, force: true })
        fs.rmSync(planted, { recursive: true, force: true })
        fs.rmSync(fake, { recursive: true, force: true })
      }
    })
  )
})
