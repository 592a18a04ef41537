/**
 * A lexical scan of PostgreSQL text: where statements end, with quoted text, dollar-quoted bodies and comments
 * skipped as the server skips them. Owns nothing else; it never parses a statement.
 *
 * Covered: `'...'` (with `''`), `E'...'` (with backslash escapes), `U&'...'`, `"..."` and `U&"..."` identifiers,
 * `$tag$...$tag$` (tags may hold digits, but not start with one), `-- ...` and nested `/* ... *\/` comments.
 */

const isIdentifierChar = (char: string | undefined) => char !== undefined && /[\p{L}\p{N}_$]/u.test(char)

/** A dollar-quote tag at `index` of `text`, if one starts there. */
const dollarTagAt = (text: string, index: number) => {
  const tag = /\$(?:[\p{L}_][\p{L}\p{N}_]*)?\$/uy
  tag.lastIndex = index
  return tag.exec(text)?.[0]
}

/** The index just past the quoted text opening at `start` (`quote` is `'` or `"`), or the text's end. */
const skipQuoted = (text: string, start: number, quote: string, backslashEscapes: boolean) => {
  for (let i = start + 1; i < text.length; i++) {
    const char = text[i]
    if (backslashEscapes && char === "\\") i++
    else if (char === quote) {
      if (text[i + 1] === quote) i++
      else return i + 1
    }
  }
  return text.length
}

/** The index just past the comment opening at `start` (`/*`, nesting as PostgreSQL nests them). */
const skipBlockComment = (text: string, start: number) => {
  let depth = 0
  for (let i = start; i < text.length; i++) {
    if (text.startsWith("/*", i)) {
      depth++
      i++
    } else if (text.startsWith("*/", i)) {
      depth--
      i++
      if (depth === 0) return i + 1
    }
  }
  return text.length
}

/** One token of the scan: code (which may hold `;`), or a quoted literal or comment the scan skipped whole. */
export interface Span {
  readonly kind: "code" | "literal" | "comment"
  readonly text: string
}

/** Cuts `text` into spans of code, literals (quoted strings, identifiers, dollar-quoted bodies) and comments. */
export const spans = (text: string): ReadonlyArray<Span> => {
  const result: Array<Span> = []
  let code = ""
  const push = (kind: Span["kind"], from: number, to: number) => {
    if (code !== "") result.push({ kind: "code", text: code })
    code = ""
    result.push({ kind, text: text.slice(from, to) })
  }
  let i = 0
  while (i < text.length) {
    const char = text[i]!
    const previous = text[i - 1]
    if (char === "-" && text[i + 1] === "-") {
      const end = text.indexOf("\n", i)
      const to = end === -1 ? text.length : end
      push("comment", i, to)
      i = to
    } else if (char === "/" && text[i + 1] === "*") {
      const to = skipBlockComment(text, i)
      push("comment", i, to)
      i = to
    } else if ((char === "E" || char === "e") && text[i + 1] === "'" && !isIdentifierChar(previous)) {
      const to = skipQuoted(text, i + 1, "'", true)
      push("literal", i, to)
      i = to
    } else if (
      (char === "U" || char === "u") &&
      text[i + 1] === "&" &&
      (text[i + 2] === "'" || text[i + 2] === '"') &&
      !isIdentifierChar(previous)
    ) {
      const to = skipQuoted(text, i + 2, text[i + 2]!, false)
      push("literal", i, to)
      i = to
    } else if (char === "'" || char === '"') {
      const to = skipQuoted(text, i, char, false)
      push("literal", i, to)
      i = to
    } else if (char === "$" && !isIdentifierChar(previous) && dollarTagAt(text, i) !== undefined) {
      const tag = dollarTagAt(text, i)!
      const end = text.indexOf(tag, i + tag.length)
      const to = end === -1 ? text.length : end + tag.length
      push("literal", i, to)
      i = to
    } else {
      code += char
      i++
    }
  }
  if (code !== "") result.push({ kind: "code", text: code })
  return result
}

/**
 * The statements of `text`, split at the semicolons that end them, each trimmed; statements that hold nothing but
 * comments and white space are left out.
 */
export const splitStatements = (text: string): ReadonlyArray<string> => {
  const statements: Array<string> = []
  let current = ""
  let hasCode = false
  const end = () => {
    if (hasCode) statements.push(current.trim())
    current = ""
    hasCode = false
  }
  for (const span of spans(text)) {
    if (span.kind !== "code") {
      current += span.text
      if (span.kind === "literal") hasCode = true
      continue
    }
    const parts = span.text.split(";")
    parts.forEach((part, index) => {
      if (index > 0) end()
      current += part
      if (part.trim() !== "") hasCode = true
    })
  }
  end()
  return statements
}

const controlKeywords = /^(COMMIT|END|ABORT|BEGIN|START\s+TRANSACTION|PREPARE\s+TRANSACTION|ROLLBACK(?!\s+TO\b))\b/i

/**
 * The transaction control statement among the statements of `text` (COMMIT, END, ABORT, BEGIN, START TRANSACTION,
 * PREPARE TRANSACTION, ROLLBACK but not ROLLBACK TO), if any, upper-cased: such a statement ends or opens a
 * transaction behind the back of whoever owns the connection. Keywords inside literals and comments do not count.
 */
export const transactionControlOf = (text: string): string | undefined => {
  for (const statement of splitStatements(text)) {
    const code = spans(statement)
      .filter((span) => span.kind !== "comment")
      .map((span) => span.text)
      .join(" ")
      .trimStart()
    const keyword = controlKeywords.exec(code)
    if (keyword !== null) return keyword[1]!.replace(/\s+/g, " ").toUpperCase()
  }
  return undefined
}
