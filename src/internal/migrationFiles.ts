/**
 * Migration sources: the directory loader (TypeScript, JavaScript and `.sql` files mixed), the `.sql` file format,
 * checksums, and turning whatever a loader's `load` yields (an Effect, a module) into one `Migration` value.
 */
import { createHash } from "node:crypto"
import { pathToFileURL } from "node:url"
import * as FileSystem from "@effect/platform/FileSystem"
import * as Path from "@effect/platform/Path"
import * as SqlMigrator from "@effect/sql/Migrator"
import * as SqlClient from "@effect/sql/SqlClient"
import * as Effect from "effect/Effect"
import * as Predicate from "effect/Predicate"
import { splitStatements } from "./sqlScan.js"

/** A migration, loaded: what it does, how to undo it, whether it runs in a transaction, and where it came from. */
export interface Migration {
  readonly id: number
  readonly name: string
  readonly up: Effect.Effect<unknown, unknown, SqlClient.SqlClient>
  readonly down: Effect.Effect<unknown, unknown, SqlClient.SqlClient> | undefined
  readonly transaction: boolean
  readonly checksum: string | undefined
  readonly file: string | undefined
}

export type Failure = {
  readonly reason: "ImportFailed" | "InvalidFile"
  readonly message: string
  readonly cause?: unknown
}

/** Marks what the directory loader's `load` yields, so that it is taken as it is. */
const LoadedTypeId: unique symbol = Symbol.for("effect-transaction/Migrator/Loaded")

interface Loaded extends Omit<Migration, "id" | "name"> {
  readonly [LoadedTypeId]: typeof LoadedTypeId
}

/** The checksum of a migration file: SHA-256 of its text with line endings normalised to `\n`. */
export const checksumOf = (text: string) => createHash("sha256").update(text.replace(/\r\n?/g, "\n")).digest("hex")

const fileName = /^(\d+)_(.+)\.(ts|mts|js|mjs|sql)$/

/**
 * Parses a migration file name: `0007_add_ledger.ts` is id 7, name `add_ledger`. Declaration files and test files
 * (`*.test.ts`, `*.spec.ts`) are not migrations.
 */
export const parseFileName = (file: string) => {
  if (/\.d\.m?ts$/.test(file) || /\.(test|spec)\.m?[jt]s$/.test(file)) return undefined
  const match = fileName.exec(file)
  return match === null ? undefined : { id: Number(match[1]), name: match[2]!, extension: match[3]! }
}

/** The largest id the table's `integer` column holds. */
export const maxId = 2_147_483_647

const marker = /^--\s*migrate:(up|down)\b(.*)$/

/**
 * Reads a `.sql` migration: `-- migrate:up` then its statements, optionally `-- migrate:down` then the statements
 * that undo them. `-- migrate:up transaction:false` runs the up statements outside a transaction, one by one.
 */
export const parseSql = (text: string, file: string): SqlFile | Failure => {
  const sections: Record<string, Array<string>> = {}
  const preamble: Array<string> = []
  let current: string | undefined
  let transaction = true
  for (const line of text.replace(/\r\n?/g, "\n").split("\n")) {
    const match = marker.exec(line.trim())
    if (match === null) {
      if (current !== undefined) sections[current]!.push(line)
      else preamble.push(line)
      continue
    }
    const [, section, rest] = match as unknown as [string, "up" | "down", string]
    if (sections[section] !== undefined) {
      return { reason: "InvalidFile", message: `${file}: "-- migrate:${section}" appears twice.` }
    }
    const flags = rest.trim()
    if (flags !== "") {
      if (section !== "up" || !/^transaction:\s*(true|false)$/.test(flags)) {
        return {
          reason: "InvalidFile",
          message: `${file}: unknown flags "${flags}" after "-- migrate:${section}". The only flag is "transaction:false", on the up line.`
        }
      }
      transaction = flags.endsWith("true")
    }
    sections[section] = []
    current = section
  }
  if (sections.up === undefined) {
    return { reason: "InvalidFile", message: `${file}: no "-- migrate:up" line. A .sql migration starts with it.` }
  }
  if (splitStatements(preamble.join("\n")).length > 0) {
    return {
      reason: "InvalidFile",
      message: `${file}: a statement stands before the first "-- migrate:up" line. Put every statement under "-- migrate:up" or "-- migrate:down".`
    }
  }
  const up = sections.up.join("\n").trim()
  if (splitStatements(up).length === 0) {
    return {
      reason: "InvalidFile",
      message: `${file}: the "-- migrate:up" section has no statement. Write the migration, or delete the file.`
    }
  }
  const down = sections.down?.join("\n").trim()
  return {
    up,
    // A down section without statements is no down: reverting would record a revert that changed nothing.
    down: down === undefined || splitStatements(down).length === 0 ? undefined : down,
    transaction
  }
}

export interface SqlFile {
  readonly up: string
  readonly down: string | undefined
  readonly transaction: boolean
}

/**
 * The statements of a `.sql` section as one effect. In a transaction they go as one simple query; outside one they
 * go one by one, since PostgreSQL runs a multi-statement query as one implicit transaction (where, for example,
 * `CREATE INDEX CONCURRENTLY` cannot run).
 */
const sqlEffect = (text: string, transaction: boolean): Effect.Effect<void, unknown, SqlClient.SqlClient> =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    transaction
      ? text === ""
        ? Effect.void
        : Effect.asVoid(sql.unsafe(text))
      : Effect.forEach(splitStatements(text), (statement) => sql.unsafe(statement), { discard: true })
  )

/**
 * A loader for a directory of migration files, mixable: `0001_name.ts` / `.js` / `.mjs` exporting `up` (or a
 * default export, as `@effect/sql`'s loaders expect), optional `down` and optional `transaction = false`; and
 * `0002_name.sql` with `-- migrate:up` / `-- migrate:down` sections. Checksums cover every file's text.
 */
export const fromDirectory = (directory: string): SqlMigrator.Loader<FileSystem.FileSystem | Path.Path> =>
  Effect.gen(function* () {
    const fs = yield* FileSystem.FileSystem
    const path = yield* Path.Path
    const absolute = path.resolve(directory)
    const entries = yield* fs.readDirectory(absolute).pipe(
      Effect.mapError(
        (error) =>
          new SqlMigrator.MigrationError({
            reason: "failed",
            message: `Cannot read the migrations directory ${absolute}: ${error.message}`
          })
      )
    )
    const files = entries.flatMap((file) => {
      const parsed = parseFileName(file)
      return parsed === undefined ? [] : [{ file, ...parsed }]
    })
    files.sort((a, b) => a.id - b.id || a.file.localeCompare(b.file))
    for (const { file, id } of files) {
      const other = files.find((candidate) => candidate.id === id && candidate.file !== file)
      if (other !== undefined) {
        return yield* new SqlMigrator.MigrationError({
          reason: "duplicates",
          message: `Two migration files have id ${id}: ${[other.file, file].sort().join(" and ")}. Renumber one of them.`
        })
      }
      if (id > maxId) {
        return yield* new SqlMigrator.MigrationError({
          reason: "bad-state",
          message: `${file}: id ${id} is larger than the table's integer column holds (${maxId}). Use a smaller id.`
        })
      }
    }
    const resolved = yield* Effect.forEach(files, ({ file, id, name, extension }) =>
      Effect.map(
        fs
          .readFileString(path.join(absolute, file))
          .pipe(
            Effect.mapError(
              (error) =>
                new SqlMigrator.MigrationError({ reason: "failed", message: `Cannot read ${file}: ${error.message}` })
            )
          ),
        (text): SqlMigrator.ResolvedMigration => {
          const full = path.join(absolute, file)
          const checksum = checksumOf(text)
          const loaded = (fields: Omit<Migration, "id" | "name" | "checksum" | "file">): Loaded => ({
            [LoadedTypeId]: LoadedTypeId,
            ...fields,
            checksum,
            file: path.join(directory, file)
          })
          if (extension === "sql") {
            const parsed = parseSql(text, path.join(directory, file))
            return [
              id,
              name,
              "reason" in parsed
                ? Effect.fail(parsed)
                : Effect.succeed(
                    loaded({
                      up: sqlEffect(parsed.up, parsed.transaction),
                      down: parsed.down === undefined ? undefined : sqlEffect(parsed.down, parsed.transaction),
                      transaction: parsed.transaction
                    })
                  )
            ]
          }
          return [
            id,
            name,
            Effect.tryPromise({
              try: () => import(/* @vite-ignore */ pathToFileURL(full).href),
              catch: (cause) => importFailure(path.join(directory, file), cause)
            }).pipe(
              Effect.flatMap((module) => fromModule(module, path.join(directory, file))),
              Effect.map((migration) => loaded(migration))
            )
          ]
        }
      )
    )
    return resolved.sort(([a], [b]) => a - b)
  })

const importFailure = (file: string, cause: unknown): Failure => {
  const message = cause instanceof Error ? cause.message : String(cause)
  const typescript = /\.m?ts$/.test(file) && /Unknown file extension "\.m?ts"/.test(message)
  return {
    reason: "ImportFailed",
    message: typescript
      ? `Cannot load ${file}: this Node.js does not run TypeScript by itself. Install a loader (npm install --save-dev tsx) and run with it (the effect-transaction CLI registers tsx when it is installed), or compile the migrations to JavaScript.`
      : `Cannot load ${file}: ${message}`,
    cause
  }
}

/** What a migration module exports: `up` (or a default export), `down`, `transaction`. */
const fromModule = (
  module: unknown,
  file: string
): Effect.Effect<Omit<Migration, "id" | "name" | "checksum" | "file">, Failure> => {
  if (Effect.isEffect(module)) {
    return Effect.succeed({ up: module as Migration["up"], down: undefined, transaction: true })
  }
  if (!Predicate.isRecord(module)) {
    return Effect.fail({ reason: "InvalidFile", message: `${file}: the module exports nothing a migration can be.` })
  }
  const record = module as Record<string, unknown>
  const fallback =
    Predicate.isRecord(record.default) && "default" in record.default ? record.default.default : record.default
  const up = record.up ?? fallback
  if (!Effect.isEffect(up)) {
    return Effect.fail({
      reason: "InvalidFile",
      message: `${file}: exports no "up" Effect. Export the migration as \`export const up = Effect.gen(...)\` (or as the default export).`
    })
  }
  if (record.down !== undefined && !Effect.isEffect(record.down)) {
    return Effect.fail({ reason: "InvalidFile", message: `${file}: "down" is exported but is not an Effect.` })
  }
  if (record.transaction !== undefined && typeof record.transaction !== "boolean") {
    return Effect.fail({
      reason: "InvalidFile",
      message: `${file}: "transaction" must be a boolean (export const transaction = false).`
    })
  }
  return Effect.succeed({
    up: up as Migration["up"],
    down: record.down as Migration["down"],
    transaction: record.transaction !== false
  })
}

/** Turns a resolved migration of any loader (this library's or `@effect/sql`'s) into a `Migration`. */
export const load = ([id, name, effect]: SqlMigrator.ResolvedMigration): Effect.Effect<
  Migration,
  Failure,
  SqlClient.SqlClient
> =>
  Effect.catchAllDefect(effect as Effect.Effect<unknown, unknown, SqlClient.SqlClient>, (defect) =>
    Effect.fail(importFailure(`${id}_${name}`, defect))
  ).pipe(
    Effect.mapError(
      (error): Failure =>
        Predicate.isRecord(error) && (error.reason === "ImportFailed" || error.reason === "InvalidFile")
          ? (error as Failure)
          : { reason: "ImportFailed", message: `Cannot load migration ${id}_${name}: ${String(error)}`, cause: error }
    ),
    Effect.flatMap(
      (value): Effect.Effect<Migration, Failure> =>
        Predicate.isRecord(value) && LoadedTypeId in value
          ? Effect.succeed({ id, name, ...(value as unknown as Loaded) })
          : Effect.map(fromModule(value, `${id}_${name}`), (fields) => ({
              id,
              name,
              ...fields,
              checksum: undefined,
              file: undefined
            }))
    )
  )
