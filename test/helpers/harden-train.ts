// harden-train.ts: running `qlora train` from the harden-train-* tests (the real CLI, the embedded tiny model).
import {spawn, type ChildProcess} from "node:child_process";
import {createHash} from "node:crypto";
import {existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {CLI, type CliResult, expectOneLineError, runCli, TSX} from "./cli.js";

/** the smallest settings that still train: the tiny model, 64 tokens, batch 1, one thread; a log line every step,
 * the example eval split only at the end */
export const TINY = [
    "--max_seq_length",
    "64",
    "--per_device_train_batch_size",
    "1",
    "--threads",
    "1",
    "--logging_steps",
    "1",
    "--eval_steps",
    "1000"
];

export function scratch(name: string): string {
    const dir = mkdtempSync(path.join(os.tmpdir(), `qlora-${name}-`));
    process.on("exit", () => rmSync(dir, {recursive: true, force: true}));
    return dir;
}

export function qlora(cwd: string, ...args: string[]): CliResult {
    return runCli(args, {cwd});
}

export function qloraAsync(cwd: string, ...args: string[]): {child: ChildProcess; done: Promise<CliResult>; stdout(): string} {
    const child = spawn(process.execPath, ["--import", TSX, CLI, ...args], {cwd});
    let stdout = "",
        stderr = "";
    child.stdout!.on("data", (d) => {
        stdout += d;
    });
    child.stderr!.on("data", (d) => {
        stderr += d;
    });
    const done = new Promise<CliResult>((resolve) =>
        child.on("exit", (code, signal) => resolve({code: code ?? (signal ? -1 : null), stdout, stderr}))
    );
    return {child, done, stdout: () => stdout};
}

/** exit code 1 and exactly one stderr line, holding every fragment */
export const expectError = expectOneLineError;

/** path → content hash of every file (and every folder) under dir: to show that nothing changed */
export function treeHash(dir: string): Record<string, string> {
    const out: Record<string, string> = {};
    const walk = (d: string) => {
        for (const name of readdirSync(d).sort()) {
            const p = path.join(d, name),
                rel = path.relative(dir, p);
            const st = lstatSync(p);
            if (st.isDirectory()) {
                out[rel + "/"] = "dir";
                walk(p);
            } else out[rel] = createHash("sha256").update(readFileSync(p)).digest("hex") + `@${st.mtimeMs}`;
        }
    };
    walk(dir);
    return out;
}

export function metrics(dir: string): Record<string, unknown>[] {
    return readFileSync(path.join(dir, "metrics.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
}

/** resolves once `check` holds (polled every few ms), or rejects after `ms` */
export function waitFor(check: () => boolean, ms = 120_000): Promise<void> {
    const start = Date.now();
    return new Promise((resolve, reject) => {
        const poll = setInterval(() => {
            if (check()) {
                clearInterval(poll);
                resolve();
            } else if (Date.now() - start > ms) {
                clearInterval(poll);
                reject(new Error("timed out waiting"));
            }
        }, 5);
    });
}

export function adapterBytes(dir: string): Buffer {
    return readFileSync(path.join(dir, "adapter_model.safetensors"));
}

export const exists = existsSync;
