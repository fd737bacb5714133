#!/usr/bin/env node
// Runs every test/**/*.test.ts with node's test runner (Node 20's --test does not glob) and fails when no test
// ran. `npm test -- <filter>` runs the files whose path contains <filter>. GPU tests live in test/gpu/ and run
// only with `npm run test:gpu` on a machine with a CUDA device.
import {spawnSync} from "node:child_process";
import {readdirSync, statSync} from "node:fs";
import path from "node:path";
import {fileURLToPath} from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const args = process.argv.slice(2);
const gpu = args.includes("--gpu");
const filters = args.filter((a) => !a.startsWith("--"));

function walk(dir) {
    return readdirSync(dir).flatMap((name) => {
        const p = path.join(dir, name);
        return statSync(p).isDirectory() ? walk(p) : [p];
    });
}

const files = walk(path.join(root, "test"))
    .filter((f) => f.endsWith(".test.ts"))
    .filter((f) => gpu === f.includes(`${path.sep}gpu${path.sep}`))
    .filter((f) => filters.length === 0 || filters.some((s) => f.includes(s)))
    .sort();
if (files.length === 0) {
    console.error("no test files matched");
    process.exit(1);
}
const result = spawnSync(process.execPath, ["--import", "tsx", "--test", "--test-reporter=spec", ...files], {
    stdio: "inherit",
    cwd: root
});
process.exit(result.status ?? 1);
