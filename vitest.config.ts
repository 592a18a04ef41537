import * as path from "node:path"
import { defineConfig } from "vitest/config"

export default defineConfig({
  resolve: {
    alias: [
      { find: /^effect-transaction$/, replacement: path.resolve(import.meta.dirname, "src/index.ts") },
      { find: /^effect-transaction\/(.*)$/, replacement: path.resolve(import.meta.dirname, "src/$1.ts") }
    ]
  },
  test: {
    include: ["test/**/*.test.ts", "examples/**/*.test.ts"],
    globalSetup: ["test/utils/globalSetup.ts"],
    pool: "forks",
    testTimeout: 60_000,
    hookTimeout: 120_000
  }
})
