/**
 * The scanner that finds transaction control statements (COMMIT, ROLLBACK, BEGIN, ...) in the SQL the code under
 * test sends, so that the test sandbox can refuse them: they would end the test transaction and let its writes
 * escape. Owns nothing else.
 */

const controlKeywords = /^(COMMIT|END|ABORT|BEGIN|START\s+TRANSACTION|PREPARE\s+TRANSACTION|ROLLBACK(?!\s+TO\b))\b/i

/**
 * The transaction control statement among the statements of `sql` (COMMIT, ROLLBACK but not ROLLBACK TO, BEGIN,
 * ...), if any: those end the test transaction, so the code under test must not send them itself. Quoted text,
 * dollar-quoted bodies and comments are skipped.
 */
export const transactionControlOf = (sql: string): string | undefined => {
  let atStart = true
  let i = 0
  while (i < sql.length) {
    const c = sql[i]!
    if (/\s/.test(c)) {
      i++
    } else if (c === "-" && sql[i + 1] === "-") {
      const end = sql.indexOf("\n", i)
      i = end < 0 ? sql.length : end + 1
    } else if (c === "/" && sql[i + 1] === "*") {
      const end = sql.indexOf("*/", i + 2)
      i = end < 0 ? sql.length : end + 2
    } else if (c === ";") {
      atStart = true
      i++
    } else {
      if (atStart) {
        const keyword = controlKeywords.exec(sql.slice(i, i + 40))
        if (keyword !== null) return keyword[1]!.toUpperCase()
        atStart = false
      }
      if (c === "'" || c === '"') {
        const end = sql.indexOf(c, i + 1)
        i = end < 0 ? sql.length : end + 1
      } else if (c === "$") {
        const tag = /^\$[A-Za-z_]*\$/.exec(sql.slice(i))
        if (tag === null) {
          i++
        } else {
          const end = sql.indexOf(tag[0], i + tag[0].length)
          i = end < 0 ? sql.length : end + tag[0].length
        }
      } else {
        i++
      }
    }
  }
  return undefined
}
