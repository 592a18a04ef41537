/**
 * Type-checks every ```ts example: in the JSDoc of src/, in README.md and in docs/. Each example becomes a module
 * of its own under .tmp/doc-examples and is compiled with the project's settings (unused names allowed). Also checks
 * that the README's Quick start is examples/quickstart.ts word for word (that file is run by `npm run examples`).
 */
import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"

const root = path.resolve(import.meta.dirname, "..")
const out = path.join(root, ".tmp", "doc-examples")

const fromJsDoc = (text: string) => {
  const examples: Array<string> = []
  const lines = text.split("\n")
  for (let i = 0; i < lines.length; i++) {
    if (!/^\s*\*\s*```ts\s*$/.test(lines[i]!)) continue
    const body: Array<string> = []
    for (i++; i < lines.length && !/^\s*\*\s*```\s*$/.test(lines[i]!); i++) body.push(lines[i]!.replace(/^\s*\* ?/, ""))
    examples.push(body.join("\n"))
  }
  return examples
}

const fromMarkdown = (text: string) => [...text.matchAll(/^```ts\n([\s\S]*?)^```$/gm)].map((match) => match[1]!)

const walk = (dir: string): Array<string> =>
  fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name)
    return entry.isDirectory() ? walk(full) : [full]
  })

const sources = [
  ...walk(path.join(root, "src"))
    .filter((file) => file.endsWith(".ts"))
    .map((file) => [file, fromJsDoc(fs.readFileSync(file, "utf8"))] as const),
  ...[path.join(root, "README.md"), ...walk(path.join(root, "docs")).filter((file) => file.endsWith(".md"))].map(
    (file) => [file, fromMarkdown(fs.readFileSync(file, "utf8"))] as const
  )
]

const readme = fs.readFileSync(path.join(root, "README.md"), "utf8")
const quickstart = /^## Quick start\n[\s\S]*?^```ts\n([\s\S]*?)^```$/m.exec(readme)?.[1]
if (quickstart !== fs.readFileSync(path.join(root, "examples", "quickstart.ts"), "utf8")) {
  console.error("README.md's Quick start differs from examples/quickstart.ts: copy the file into the README's block")
  process.exit(1)
}

fs.rmSync(out, { recursive: true, force: true })
fs.mkdirSync(out, { recursive: true })
let count = 0
for (const [file, examples] of sources) {
  examples.forEach((example, i) => {
    const name = `${path.relative(root, file).replace(/[/.]/g, "_")}_${i + 1}.ts`
    fs.writeFileSync(path.join(out, name), `// ${path.relative(root, file)}, example ${i + 1}\n${example}\nexport {}\n`)
    count++
  })
}
fs.writeFileSync(
  path.join(out, "tsconfig.json"),
  JSON.stringify({
    extends: "../../tsconfig.base.json",
    compilerOptions: { noEmit: true, noUnusedLocals: false, noUnusedParameters: false },
    include: ["*.ts"]
  })
)
try {
  execFileSync(path.join(root, "node_modules", ".bin", "tsc"), ["-p", out], { stdio: "inherit" })
} catch {
  console.error(`doc examples: type errors (files under ${path.relative(root, out)})`)
  process.exit(1)
}
console.log(`doc examples: ${count} type-checked`)
