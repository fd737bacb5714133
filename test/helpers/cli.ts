// cli.ts: the qlora command line as tests run it (a child process through tsx), and the check every refusal
// must pass: exit code 1, one stderr line with `error:`, no stack trace, naming what it should.
import {spawnSync} from "node:child_process";
import assert from "node:assert/strict";
import path from "node:path";
import {REPO_ROOT} from "./paths.js";

export const CLI = path.join(REPO_ROOT, "src", "cli", "main.ts");
/** tsx's loader as an absolute URL, so the CLI also starts from a working folder outside the checkout */
export const TSX = import.meta.resolve("tsx");

export interface CliResult {
    code: number | null;
    stdout: string;
    stderr: string;
    /** the signal that killed it (a run past `timeoutMs`), or null */
    signal?: NodeJS.Signals | null;
}

/** runs `qlora ...args` to the end (in the repository root unless cwd says otherwise; killed past timeoutMs) */
export function runCli(args: string[], opts: {cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number} = {}): CliResult {
    const r = spawnSync(process.execPath, ["--import", TSX, CLI, ...args], {
        encoding: "utf8",
        cwd: opts.cwd ?? REPO_ROOT,
        env: opts.env ?? process.env,
        timeout: opts.timeoutMs
    });
    return {code: r.status, stdout: r.stdout, stderr: r.stderr, signal: r.signal};
}

/** a refusal: exit 1, one stderr line with `error:` and no stack trace, holding each fragment (text or pattern) */
export function expectOneLineError(r: CliResult, ...fragments: (string | RegExp)[]): string {
    assert.ok(!r.signal, `the command was killed (${r.signal}): it hung`);
    assert.equal(r.code, 1, `exit code (stdout: ${r.stdout}\nstderr: ${r.stderr})`);
    const lines = r.stderr.trim().split("\n");
    assert.equal(lines.length, 1, `one line of error, got:\n${r.stderr}`);
    assert.match(lines[0], /error:/);
    assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
    for (const f of fragments)
        if (typeof f === "string") assert.ok(lines[0].includes(f), `${JSON.stringify(f)} in ${lines[0]}`);
        else assert.match(lines[0], f);
    return lines[0];
}
