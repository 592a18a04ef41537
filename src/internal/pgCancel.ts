/**
 * PostgreSQL's out-of-band cancel request: what stops a statement (or a COMMIT) of a backend without taking a
 * pooled connection. The request is a 16-byte message (length 16, code 80877102, the backend's process id and
 * secret key) on a fresh socket to the server the backend belongs to; the server signals the backend and closes
 * the socket without answering. This module owns only that message and its socket; when to send it is the
 * connection's business (see connection.ts).
 */
import * as net from "node:net"
import * as Effect from "effect/Effect"

/** Where a backend lives and what proves that a cancel request for it comes from its own client. */
export interface CancelTarget {
  readonly host: string
  readonly port: number
  readonly processID: number
  readonly secretKey: number
}

const CANCEL_REQUEST_CODE = 80877102

/** The cancel request for `target`, as the server reads it. */
export const cancelMessage = (target: CancelTarget): Buffer => {
  const message = Buffer.alloc(16)
  message.writeInt32BE(16, 0)
  message.writeInt32BE(CANCEL_REQUEST_CODE, 4)
  message.writeInt32BE(target.processID, 8)
  message.writeInt32BE(target.secretKey, 12)
  return message
}

/**
 * Sends the cancel request and waits until the server has closed the socket, which it does once it has signalled
 * the backend. Succeeds with `true` then, with `false` if the socket failed or `deadlineMillis` passed first (the
 * socket is destroyed, so a request not yet sent never is). Never fails.
 */
export const sendCancelRequest = (target: CancelTarget, deadlineMillis: number): Effect.Effect<boolean> =>
  Effect.async<boolean>((resume) => {
    let settled = false
    const socket = target.host.startsWith("/")
      ? net.connect({ path: `${target.host}/.s.PGSQL.${target.port}` })
      : net.connect({ host: target.host, port: target.port })
    const finish = (delivered: boolean) => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      socket.destroy()
      resume(Effect.succeed(delivered))
    }
    const timer = setTimeout(() => finish(false), deadlineMillis)
    socket.setNoDelay(true)
    // Written without ending the socket: a pooler in between (PgBouncer) forwards the request over a connection of
    // its own and drops it if the client hangs up first. The server's close ends it.
    socket.once("connect", () => socket.write(cancelMessage(target)))
    socket.once("error", () => finish(false))
    socket.once("close", (hadError) => finish(!hadError))
    // Reading drains the socket so that the server's close is seen; the server sends nothing.
    socket.on("data", () => undefined)
    return Effect.sync(() => finish(false))
  })
