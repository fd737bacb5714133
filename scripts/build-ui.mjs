#!/usr/bin/env node
// Builds qlora ui's page: src/ui/client/*.ts compiled by tsc for the browser (its own tsconfig: the DOM, no Node
// types) and the page's static files copied beside them. `node scripts/build-ui.mjs [OUT]` writes OUT/client/
// (default dist/ui/client/, where `qlora ui` serves it from); tests build into a folder of their own.
import {spawnSync} from "node:child_process";
import {copyFileSync, mkdirSync} from "node:fs";
import {createRequire} from "node:module";
import path from "node:path";
import {fileURLToPath} from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const out = path.resolve(process.argv[2] ?? path.join(root, "dist", "ui"));
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
const project = path.join(root, "src", "ui", "client", "tsconfig.json");
const r = spawnSync(process.execPath, [tsc, "-p", project, "--outDir", out], {stdio: "inherit"});
if (r.status !== 0) process.exit(r.status ?? 1);
mkdirSync(path.join(out, "client"), {recursive: true});
for (const file of ["index.html", "style.css"])
    copyFileSync(path.join(root, "src", "ui", "client", file), path.join(out, "client", file));
