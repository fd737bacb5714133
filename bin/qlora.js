#!/usr/bin/env node
// The qlora command: runs the compiled CLI (npm run build writes dist/).
import {existsSync} from "node:fs";
import {fileURLToPath} from "node:url";

const main = new URL("../dist/cli/main.js", import.meta.url);
if (!existsSync(fileURLToPath(main))) {
    console.error(
        "error: qlora is not built yet. Run: npm install (or npm run build) in " + fileURLToPath(new URL("..", import.meta.url))
    );
    process.exit(1);
}
await import(main.href);
