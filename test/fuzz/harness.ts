// harness.ts: runs fuzz cases and classifies how each one ended.
//
// Cases run in a long-lived worker process (worker.ts, forked with a capped V8 heap) that calls qlora's library
// functions: spawning the CLI costs 1-2 s a case, the worker about 20-200 ms. A handful of cases per format also
// go through the real CLI (`node --import tsx src/cli/main.ts ...`) to check the exit code and the one-line
// `error: ...` end to end. Each case ends as one of:
//   ok          returned normally                       clean  threw a QloraError with a one-line message
//   stack       threw anything else (a bug: users would see "an internal error")
//   crash       the process died (signal, abort, an exception escaping the case)
//   hang        no answer within the time limit (the process is killed and restarted)
//   memory      RSS of the process and its children over the cap (polled from /proc), or V8's heap limit
// and is also checked for: half-written files (temporary files left behind, or a file under a final name that
// does not parse: safetensors, JSON, JSONL, GGUF; a final/ or checkpoint-N/ folder missing its files), inputs
// changed (a file the command was not asked to write that changed, vanished or appeared), bad messages (a
// QloraError of several lines, or an unreadably long one) and NaN accepted (a load that succeeded with
// non-finite weights or logits).
import {fork, spawn, type ChildProcess} from "node:child_process";
import {createHash} from "node:crypto";
import {promises as fs, readdirSync, readFileSync, type Stats} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {ggmlTensorBytes, type GgmlType} from "../../src/io/gguf-quants.js";
import {REPO_ROOT} from "../helpers/paths.js";
import {FORMATS, formatByName, type CaseSpec, type TargetKind} from "./formats.js";
import {caseSeed, FuzzRng} from "./rng.js";
import {buildSeeds, type Seeds} from "./seeds.js";
import type {WorkerReply, WorkerRequest} from "./worker.js";

export type Primary = "ok" | "clean" | "stack" | "crash" | "hang" | "memory";

export interface CaseResult {
    format: string;
    index: number;
    seed: number;
    variant: string;
    via: "lib" | "cli";
    primary: Primary;
    /** the error message, stack or reason */
    detail: string;
    halfWritten: string[];
    inputsChanged: string[];
    badMessage: string | null;
    nonFinite: string | null;
    mutations: string[];
    ms: number;
    peakRssMb: number;
    /** the case could not be built (a bug of the fuzzer itself) */
    harnessError?: string;
    /** the control case (seed files unmutated): anything but ok is a failure */
    control?: boolean;
    /** where the case folder was kept (failures only, when keepFailures) */
    kept?: string;
    command?: string;
}

export function isFailure(r: CaseResult): boolean {
    return (
        r.harnessError !== undefined ||
        (r.control === true && r.primary !== "ok") ||
        (r.primary !== "ok" && r.primary !== "clean") ||
        r.halfWritten.length > 0 ||
        r.inputsChanged.length > 0 ||
        r.badMessage !== null ||
        r.nonFinite !== null
    );
}

export interface FuzzOptions {
    seed: number;
    /** time limit of one case in the worker (ms) */
    timeoutMs?: number;
    /** time limit of one CLI case (ms) */
    cliTimeoutMs?: number;
    /** RSS cap of the worker and of a CLI process, children included (MiB; default 2048) */
    rssCapMb?: number;
    /** V8 heap limit of the worker (MiB) */
    heapMb?: number;
    /** move the folders of failing cases to os.tmpdir()/qlora-fuzz-failures/ */
    keepFailures?: boolean;
    /** log every case, not only the failures */
    verbose?: boolean;
    log?: (line: string) => void;
}

/** ".ts" under tsx (development), ".js" when compiled (scripts/device-pack.sh): then no loader, and each process the
 * cases start (the worker, the CLI, qlora's Parquet decoder) skips tsx's transpiling, about 1 s a process */
const EXT = path.extname(new URL(import.meta.url).pathname);
const LOADER = EXT === ".ts" ? ["--import", import.meta.resolve("tsx")] : [];
const CLI = path.join(REPO_ROOT, "src", "cli", `main${EXT}`);
const WORKER = path.join(path.dirname(new URL(import.meta.url).pathname), `worker${EXT}`);
export const FAILURES_DIR = path.join(os.tmpdir(), "qlora-fuzz-failures");
const MAX_MESSAGE_CHARS = 2000;

/** pid and its descendants (the processes a case started: qlora may decode in a child process) */
function processTree(pid: number): number[] {
    const out: number[] = [];
    const visit = (p: number) => {
        if (out.includes(p)) return;
        out.push(p);
        try {
            for (const tid of readdirSync(`/proc/${p}/task`))
                for (const child of readFileSync(`/proc/${p}/task/${tid}/children`, "utf8").split(" ").filter(Boolean))
                    visit(Number(child));
        } catch {
            // the process ended meanwhile
        }
    };
    visit(pid);
    return out;
}

/** the resident memory of a process and all its descendants */
function readRssMb(pid: number): number {
    let kb = 0;
    for (const p of processTree(pid)) {
        try {
            const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${p}/status`, "utf8"));
            if (m) kb += Number(m[1]);
        } catch {
            // ended meanwhile
        }
    }
    return kb / 1024;
}

/** SIGKILLs a process started here and its descendants, children first */
function killTree(child: ChildProcess): void {
    if (child.pid === undefined) return;
    for (const p of processTree(child.pid).reverse()) {
        if (p === child.pid) continue;
        try {
            process.kill(p, "SIGKILL");
        } catch {
            // already gone
        }
    }
    child.kill("SIGKILL");
}

function short(text: string, max = 300): string {
    const one = text.replace(/\s+/g, " ").trim();
    return one.length > max ? `${one.slice(0, max)}… (${text.length} chars)` : one;
}

// ------------------------------------------------------------------
// the worker process

type RunOutcome =
    | {reply: WorkerReply; peakRssMb: number; ms: number}
    | {died: "crash" | "hang" | "memory"; detail: string; peakRssMb: number; ms: number};

class WorkerHost {
    private child: ChildProcess | null = null;
    private stderrTail = "";
    private nextId = 1;
    private listeners = new Set<(m: unknown) => void>();
    private exitListeners = new Set<(code: number | null, signal: NodeJS.Signals | null) => void>();

    constructor(private readonly heapMb: number) {}

    private async start(): Promise<ChildProcess> {
        const child = fork(WORKER, [], {
            execArgv: [...LOADER, `--max-old-space-size=${this.heapMb}`],
            stdio: ["ignore", "pipe", "pipe", "ipc"],
            cwd: REPO_ROOT,
            env: {...process.env, QLORA_DEBUG: ""}
        });
        this.stderrTail = "";
        child.stdout!.on("data", () => undefined);
        child.stderr!.on("data", (d: Buffer) => {
            this.stderrTail = (this.stderrTail + d.toString()).slice(-4000);
        });
        child.on("message", (m) => this.listeners.forEach((l) => l(m)));
        child.on("exit", (code, signal) => {
            if (this.child === child) this.child = null;
            this.exitListeners.forEach((l) => l(code, signal));
        });
        await new Promise<void>((resolve, reject) => {
            const timer = setTimeout(
                () => reject(new Error(`the fuzz worker did not start in 120 s: ${this.stderrTail}`)),
                120_000
            );
            const onMessage = (m: unknown) => {
                if ((m as {ready?: boolean}).ready) {
                    clearTimeout(timer);
                    this.listeners.delete(onMessage);
                    this.exitListeners.delete(onExit);
                    resolve();
                }
            };
            const onExit = () => {
                clearTimeout(timer);
                this.listeners.delete(onMessage);
                this.exitListeners.delete(onExit);
                reject(new Error(`the fuzz worker exited while starting: ${this.stderrTail}`));
            };
            this.listeners.add(onMessage);
            this.exitListeners.add(onExit);
        });
        this.child = child;
        return child;
    }

    async run(
        kind: WorkerRequest["kind"],
        params: Record<string, unknown>,
        timeoutMs: number,
        rssCapMb: number
    ): Promise<RunOutcome> {
        // a worker that has grown to half the cap between cases (leaks add up over thousands of cases) is replaced,
        // so the next case is not blamed for memory it did not take
        if (this.child && readRssMb(this.child.pid!) > rssCapMb / 2) await this.stop();
        const child = this.child ?? (await this.start());
        const pid = child.pid!;
        const id = this.nextId++;
        const started = Date.now();
        let peak = readRssMb(pid);
        return new Promise<RunOutcome>((resolve) => {
            let settled = false;
            const finish = (o: RunOutcome) => {
                if (settled) return;
                settled = true;
                clearInterval(poll);
                clearTimeout(timer);
                this.listeners.delete(onMessage);
                this.exitListeners.delete(onExit);
                resolve(o);
            };
            // set before the worker is killed or exits on its own: onExit then reports this instead of a crash
            let ending: {died: "crash" | "hang" | "memory"; detail: string} | null = null;
            const kill = (died: "hang" | "memory", detail: string) => {
                if (ending) return;
                ending = {died, detail};
                killTree(child);
            };
            const poll = setInterval(() => {
                const rss = readRssMb(pid);
                peak = Math.max(peak, rss);
                if (rss > rssCapMb) kill("memory", `RSS ${rss.toFixed(0)} MiB > cap ${rssCapMb} MiB`);
            }, 20);
            const timer = setTimeout(() => kill("hang", `no answer in ${timeoutMs} ms`), timeoutMs);
            const onMessage = (m: unknown) => {
                const reply = m as WorkerReply;
                if (reply.id !== id && reply.status !== "escaped") return;
                if (reply.status === "escaped") {
                    // the worker exits right after this message; the case is a crash once it has
                    ending ??= {
                        died: "crash",
                        detail: `an exception escaped the case: ${short(reply.stack || reply.message, 1500)}`
                    };
                    return;
                }
                if (ending) return;
                finish({reply, peakRssMb: Math.max(peak, readRssMb(pid)), ms: Date.now() - started});
            };
            const onExit = (code: number | null, signal: NodeJS.Signals | null) => {
                const tail = this.stderrTail;
                const oom = /heap limit|out of memory|Allocation failed/i.test(tail);
                const died = ending ?? {
                    died: oom ? ("memory" as const) : ("crash" as const),
                    detail: `worker exited (${signal ?? `code ${code}`}): ${short(tail, 1500)}`
                };
                finish({...died, peakRssMb: peak, ms: Date.now() - started});
            };
            this.listeners.add(onMessage);
            this.exitListeners.add(onExit);
            child.send({id, kind, params} satisfies WorkerRequest);
        });
    }

    async stop(): Promise<void> {
        const child = this.child;
        if (!child) return;
        this.child = null;
        const exited = new Promise<void>((r) => child.once("exit", () => r()));
        killTree(child);
        await exited;
    }
}

// ------------------------------------------------------------------
// what a case leaves on disk

type Snapshot = Map<string, string>;

/** every path under dir with a signature: content hash for regular files, the target for links */
export async function snapshot(dir: string): Promise<Snapshot> {
    const out: Snapshot = new Map();
    const walk = async (rel: string) => {
        const abs = path.join(dir, rel);
        let names: string[];
        try {
            names = await fs.readdir(abs);
        } catch {
            return;
        }
        for (const name of names) {
            const r = rel ? `${rel}/${name}` : name;
            const p = path.join(dir, r);
            let st: Stats;
            try {
                st = await fs.lstat(p);
            } catch {
                continue;
            }
            if (st.isDirectory()) {
                out.set(r, "dir");
                await walk(r);
            } else if (st.isSymbolicLink()) out.set(r, `link:${await fs.readlink(p).catch(() => "?")}`);
            else if (st.isFile()) {
                // small files by content; big ones (weights, tokenizer.json, sparse giants) by inode and change time:
                // any write or replacement changes ctime or the inode, and hashing megabytes twice a case is slow
                if (st.size > 256 * 1024) out.set(r, `file:${st.size}:${st.ino}:${st.mtimeMs}:${st.ctimeMs}`);
                else
                    out.set(
                        r,
                        `file:${createHash("sha1")
                            .update(await fs.readFile(p))
                            .digest("hex")}`
                    );
            } else out.set(r, st.isFIFO() ? "fifo" : "special");
        }
    };
    await walk("");
    return out;
}

const TEMP_NAME = /\.tmp\b|\.tmp-|\.old-|\.new-|\.(tmp|old|new|partial|lock)$|\.write-test/i;
const SAFETENSORS_DTYPE_BYTES: Record<string, number> = {
    F64: 8,
    F32: 4,
    F16: 2,
    BF16: 2,
    I64: 8,
    I32: 4,
    I16: 2,
    I8: 1,
    U8: 1,
    BOOL: 1
};

/** an independent safetensors check (not qlora's reader): header, dtypes, sizes, ranges, no overlap, no gap at the end */
export function checkSafetensorsBytes(buf: Buffer): string | null {
    if (buf.length < 8) return "shorter than 8 bytes";
    const n = buf.readBigUInt64LE(0);
    if (n > BigInt(buf.length - 8)) return `header length ${n} beyond the file (${buf.length} bytes)`;
    let header: Record<string, {dtype: string; shape: number[]; data_offsets: [number, number]}>;
    try {
        header = JSON.parse(buf.subarray(8, 8 + Number(n)).toString("utf8"));
    } catch (err) {
        return `header is not JSON (${(err as Error).message})`;
    }
    if (header === null || typeof header !== "object" || Array.isArray(header)) return "the header is not a JSON object";
    const dataLen = buf.length - 8 - Number(n);
    const ranges: [number, number, string][] = [];
    for (const [name, e] of Object.entries(header)) {
        if (name === "__metadata__") continue;
        const size = SAFETENSORS_DTYPE_BYTES[e?.dtype];
        if (!size) return `tensor ${name}: dtype ${JSON.stringify(e?.dtype)}`;
        if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
            return `tensor ${name}: shape ${JSON.stringify(e.shape)}`;
        const [b, end] = e.data_offsets ?? [];
        if (!Number.isSafeInteger(b) || !Number.isSafeInteger(end) || b > end || end > dataLen)
            return `tensor ${name}: data_offsets ${JSON.stringify(e.data_offsets)} (data ${dataLen} bytes)`;
        if (end - b !== e.shape.reduce((a, d) => a * d, 1) * size)
            return `tensor ${name}: ${end - b} bytes for ${e.dtype} ${JSON.stringify(e.shape)}`;
        if (end > b) ranges.push([b, end, name]);
    }
    ranges.sort((x, y) => x[0] - y[0]);
    let at = 0;
    for (const [b, end, name] of ranges) {
        if (b < at) return `tensor ${name} overlaps the one before`;
        at = end;
    }
    if (at !== dataLen) return `the data section has ${dataLen} bytes, the tensors cover ${at}`;
    return null;
}

async function checkGguf(file: string): Promise<string | null> {
    try {
        const parsed = await gguf(file, {allowLocalFile: true});
        const size = (await fs.stat(file)).size;
        let end = 0n;
        for (const t of parsed.tensorInfos) {
            const bytes = ggmlTensorBytes(
                t.dtype as unknown as GgmlType,
                t.shape.map((d) => Number(d))
            );
            const e = t.offset + BigInt(bytes);
            if (e > end) end = e;
        }
        if (parsed.tensorDataOffset + end > BigInt(size))
            return `tensor data ends at ${parsed.tensorDataOffset + end}, the file has ${size} bytes`;
        return null;
    } catch (err) {
        return `GGUF does not parse (${(err as Error).message})`;
    }
}

/** null when the file under a final name is complete, else what is wrong with it */
export async function checkOutputFile(file: string): Promise<string | null> {
    const lower = file.toLowerCase();
    if (lower.endsWith(".gguf")) return checkGguf(file);
    if (!/\.(safetensors|json|jsonl)$/.test(lower)) return null;
    const st = await fs.stat(file);
    if (st.size > 256 * 2 ** 20) return null;
    const buf = await fs.readFile(file);
    if (lower.endsWith(".safetensors")) return checkSafetensorsBytes(buf);
    const text = buf.toString("utf8");
    try {
        if (lower.endsWith(".json")) JSON.parse(text);
        else text.split("\n").forEach((l) => l.trim() && JSON.parse(l));
        return null;
    } catch (err) {
        return `not valid ${lower.endsWith(".json") ? "JSON" : "JSONL"} (${(err as Error).message})`;
    }
}

const ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"];
const CHECKPOINT_FILES = [
    ...ADAPTER_FILES,
    "trainer_state.json",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng_state.json"
];

/** what a case left in its folder, against the snapshot taken before it ran */
export async function checkDisk(
    spec: Pick<CaseSpec, "writes" | "expectOutputs">,
    dir: string,
    before: Snapshot,
    primary: Primary
): Promise<{halfWritten: string[]; inputsChanged: string[]}> {
    const after = await snapshot(dir);
    const halfWritten: string[] = [],
        inputsChanged: string[] = [];
    const mayWrite = (rel: string) => spec.writes.some((re) => re.test(rel));
    for (const [rel, sig] of before) {
        if (mayWrite(rel)) continue;
        const now = after.get(rel);
        if (now !== sig) inputsChanged.push(`${rel} ${now === undefined ? "vanished" : "changed"}`);
    }
    for (const [rel, sig] of after) {
        if (before.get(rel) === sig) continue;
        const base = path.basename(rel);
        if (!mayWrite(rel)) {
            if (!before.has(rel)) inputsChanged.push(`${rel} appeared`); // a changed one is reported above
            continue;
        }
        if (TEMP_NAME.test(base)) {
            halfWritten.push(`${rel}: a temporary file left behind`);
            continue;
        }
        if (sig.startsWith("file:")) {
            const problem = await checkOutputFile(path.join(dir, rel));
            if (problem) halfWritten.push(`${rel}: ${problem}`);
        } else if (sig === "dir" && (base === "final" || /^checkpoint-\d+$/.test(base))) {
            for (const f of base === "final" ? ADAPTER_FILES : CHECKPOINT_FILES)
                if (!after.has(`${rel}/${f}`)) halfWritten.push(`${rel}: ${f} is missing`);
        }
    }
    if (primary === "ok")
        for (const rel of spec.expectOutputs)
            if (!after.has(rel)) halfWritten.push(`${rel}: not written although the run succeeded`);
    return {halfWritten, inputsChanged};
}

// ------------------------------------------------------------------
// one CLI run

function stripAnsi(s: string): string {
    // eslint-disable-next-line no-control-regex
    return s.replace(/\u001b\[[0-9;]*m/g, "");
}

async function runCli(
    args: string[],
    cwd: string,
    timeoutMs: number,
    rssCapMb: number
): Promise<{primary: Primary; detail: string; badMessage: string | null; peakRssMb: number; ms: number}> {
    const started = Date.now();
    const child = spawn(process.execPath, [...LOADER, CLI, ...args], {
        cwd,
        stdio: ["ignore", "pipe", "pipe"],
        // no GPU: on a GPU machine --device auto adds a line saying which device runs, and the cases judge the
        // error line alone (the readers under test are the same on either device)
        env: {...process.env, QLORA_DEBUG: "", NO_COLOR: "1", FORCE_COLOR: "0", CUDA_VISIBLE_DEVICES: ""}
    });
    let peak = 0,
        killedFor: "hang" | "memory" | null = null;
    // all of stderr (an error line can be megabytes long, and its start is what must say "error: "), up to 64 MiB
    const stderrChunks: Buffer[] = [];
    let stderrBytes = 0;
    child.stdout!.on("data", () => undefined);
    child.stderr!.on("data", (d: Buffer) => {
        if (stderrBytes < 64 * 2 ** 20) stderrChunks.push(d);
        stderrBytes += d.length;
    });
    const poll = setInterval(() => {
        const rss = readRssMb(child.pid!);
        peak = Math.max(peak, rss);
        if (rss > rssCapMb && !killedFor) {
            killedFor = "memory";
            killTree(child);
        }
    }, 50);
    const timer = setTimeout(() => {
        if (!killedFor) {
            killedFor = "hang";
            killTree(child);
        }
    }, timeoutMs);
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((r) =>
        child.on("exit", (c, s) => r([c, s]))
    );
    clearInterval(poll);
    clearTimeout(timer);
    const ms = Date.now() - started;
    const err = stripAnsi(Buffer.concat(stderrChunks).toString("utf8")).trim();
    if (killedFor)
        return {
            primary: killedFor,
            detail: killedFor === "hang" ? `no exit in ${timeoutMs} ms` : `RSS over ${rssCapMb} MiB`,
            badMessage: null,
            peakRssMb: peak,
            ms
        };
    if (code === 0) return {primary: "ok", detail: "", badMessage: null, peakRssMb: peak, ms};
    if (code !== 1) {
        const oom = /heap limit|out of memory|Allocation failed/i.test(err);
        return {
            primary: oom ? "memory" : "crash",
            detail: `exit ${signal ?? code}: ${short(err, 1500)}`,
            badMessage: null,
            peakRssMb: peak,
            ms
        };
    }
    const lines = err.split("\n").filter((l) => l.trim());
    if (/an internal error|\n\s+at .+:\d+:\d+/.test(err) || lines.some((l) => /^\s+at /.test(l)))
        return {primary: "stack", detail: short(err, 1500), badMessage: null, peakRssMb: peak, ms};
    const bad =
        lines.length !== 1
            ? `stderr has ${lines.length} lines: ${short(err, 600)}`
            : !lines[0].startsWith("error: ")
              ? `stderr does not start with "error: ": ${short(err, 300)}`
              : lines[0].length > MAX_MESSAGE_CHARS
                ? `a ${lines[0].length}-character error line`
                : null;
    return {primary: "clean", detail: short(lines[0] ?? "", 500), badMessage: bad, peakRssMb: peak, ms};
}

// ------------------------------------------------------------------
// the session

export interface FormatSummary {
    format: string;
    via: "lib" | "cli";
    cases: number;
    ok: number;
    clean: number;
    crash: number;
    hang: number;
    stack: number;
    memory: number;
    halfWritten: number;
    inputsChanged: number;
    badMessage: number;
    nonFinite: number;
    peakRssMb: number;
    msTotal: number;
}

export function summarize(format: string, via: "lib" | "cli", results: CaseResult[]): FormatSummary {
    const count = (p: (r: CaseResult) => boolean) => results.filter(p).length;
    return {
        format,
        via,
        cases: results.length,
        ok: count((r) => r.primary === "ok"),
        clean: count((r) => r.primary === "clean"),
        crash: count((r) => r.primary === "crash"),
        hang: count((r) => r.primary === "hang"),
        stack: count((r) => r.primary === "stack"),
        memory: count((r) => r.primary === "memory"),
        halfWritten: count((r) => r.halfWritten.length > 0),
        inputsChanged: count((r) => r.inputsChanged.length > 0),
        badMessage: count((r) => r.badMessage !== null),
        nonFinite: count((r) => r.nonFinite !== null),
        peakRssMb: Math.max(0, ...results.map((r) => r.peakRssMb)),
        msTotal: results.reduce((s, r) => s + r.ms, 0)
    };
}

export function formatTable(rows: FormatSummary[]): string {
    const head = [
        "format",
        "via",
        "cases",
        "ok",
        "clean errors",
        "crashes",
        "hangs",
        "stack traces",
        "memory blow-ups",
        "half-written",
        "inputs changed",
        "bad messages",
        "NaN accepted",
        "peak RSS MiB",
        "avg ms"
    ];
    const body = rows.map((r) =>
        [
            r.format,
            r.via,
            r.cases,
            r.ok,
            r.clean,
            r.crash,
            r.hang,
            r.stack,
            r.memory,
            r.halfWritten,
            r.inputsChanged,
            r.badMessage,
            r.nonFinite,
            Math.round(r.peakRssMb),
            r.cases ? Math.round(r.msTotal / r.cases) : 0
        ].map(String)
    );
    const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
    const line = (cells: string[]) =>
        `| ${cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(" | ")} |`;
    return [
        line(head),
        `|${widths.map((w, i) => (i < 2 ? `:${"-".repeat(w + 1)}` : `${"-".repeat(w + 1)}:`)).join("|")}|`,
        ...body.map(line)
    ].join("\n");
}

export function describeFailure(r: CaseResult): string {
    const problems = [
        r.harnessError ? `HARNESS ERROR (a bug of the fuzzer): ${r.harnessError}` : null,
        r.primary !== "ok" && (r.primary !== "clean" || r.control) ? `${r.primary}: ${r.detail}` : null,
        ...r.halfWritten.map((h) => `half-written: ${h}`),
        ...r.inputsChanged.map((h) => `input changed: ${h}`),
        r.badMessage ? `bad message: ${r.badMessage}` : null,
        r.nonFinite ? `NaN accepted: ${r.nonFinite}` : null
    ].filter(Boolean);
    return [
        r.control
            ? `FAIL ${r.format} control case (${r.via}, ${r.variant}): the seed files as written must load`
            : `FAIL ${r.format} seed ${r.seed} case ${r.index} (${r.via}, ${r.variant}) — replay: npm run fuzz -- --format ${r.format} --seed ${r.seed} --case ${r.index}${r.via === "cli" ? " --cli" : ""}`,
        ...problems.map((p) => `    ${p}`),
        `    mutations: ${r.mutations.join(" | ") || "(none)"}`,
        ...(r.command ? [`    command: qlora ${r.command}`] : []),
        ...(r.kept ? [`    case folder kept: ${r.kept}`] : [])
    ].join("\n");
}

export class FuzzSession {
    private readonly worker: WorkerHost;
    private constructor(
        readonly options: Required<Omit<FuzzOptions, "log">> & {log: (l: string) => void},
        readonly root: string,
        readonly seeds: Seeds
    ) {
        this.worker = new WorkerHost(options.heapMb);
    }

    static async create(options: FuzzOptions): Promise<FuzzSession> {
        const root = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-fuzz-"));
        const seeds = await buildSeeds(path.join(root, "seeds"));
        await fs.mkdir(path.join(root, "cases"));
        return new FuzzSession(
            {
                // 2 GiB: the worker (about 300 MiB) plus the Parquet decoder qlora forks, whose heap it caps at 1 GiB
                timeoutMs: 30_000,
                cliTimeoutMs: 90_000,
                rssCapMb: 2048,
                heapMb: 1024,
                keepFailures: true,
                verbose: false,
                log: () => undefined,
                ...options
            },
            root,
            seeds
        );
    }

    private async buildCase(
        format: string,
        index: number,
        via: "lib" | "cli",
        mutate = true
    ): Promise<{spec: CaseSpec; dir: string; before: Snapshot}> {
        const dir = path.join(this.root, "cases", `${format}-${via}-${index}${mutate ? "" : "-control"}`);
        await fs.rm(dir, {recursive: true, force: true});
        await fs.mkdir(dir, {recursive: true});
        const rng = new FuzzRng(caseSeed(this.options.seed, via === "cli" ? `${format}/cli` : format, index));
        const spec = await formatByName(format).build({seeds: this.seeds, rng, dir, index, mutate});
        return {spec, dir, before: await snapshot(dir)};
    }

    /** runs one target in the worker and classifies how it ended */
    async runInWorker(
        kind: TargetKind,
        params: Record<string, unknown>,
        timeoutMs = this.options.timeoutMs
    ): Promise<Pick<CaseResult, "primary" | "detail" | "badMessage" | "nonFinite" | "ms" | "peakRssMb">> {
        const out = await this.worker.run(kind, params, timeoutMs, this.options.rssCapMb);
        const r = {
            primary: "ok" as Primary,
            detail: "",
            badMessage: null as string | null,
            nonFinite: null as string | null,
            ms: out.ms,
            peakRssMb: out.peakRssMb
        };
        if ("died" in out) {
            r.primary = out.died;
            r.detail = out.detail;
        } else if (out.reply.status === "ok") {
            r.nonFinite = out.reply.nonFinite ?? null;
        } else if (out.reply.status === "error") {
            const m = out.reply.message;
            r.primary = "clean";
            r.detail = short(m, 500);
            r.badMessage =
                m.trim() === ""
                    ? "an empty message"
                    : m.includes("\n")
                      ? `${m.split("\n").length} lines: ${short(m, 400)}`
                      : m.length > MAX_MESSAGE_CHARS
                        ? `a ${m.length}-character message: ${short(m, 200)}`
                        : null;
        } else if (out.reply.status === "internal") {
            r.primary = "stack";
            r.detail = `${out.reply.name}: ${short(out.reply.message, 300)}\n${out.reply.stack
                .split("\n")
                .slice(1, 6)
                .map((l) => `      ${l.trim()}`)
                .join("\n")}`;
        }
        return r;
    }

    /**
     * runs case `index` of `format` in the worker (lib) or through the CLI; with mutate false, the control case: the
     * seed files as they are, which must load (else every mutated case would end in an error for another reason)
     */
    async runCase(format: string, index: number, via: "lib" | "cli", mutate = true): Promise<CaseResult> {
        const o = this.options;
        let built: Awaited<ReturnType<FuzzSession["buildCase"]>>;
        try {
            built = await this.buildCase(format, index, via, mutate);
        } catch (err) {
            // a bug of the harness, not of qlora: reported, and the run goes on
            return {
                format,
                index,
                seed: o.seed,
                variant: "?",
                via,
                primary: "ok",
                detail: "",
                halfWritten: [],
                inputsChanged: [],
                badMessage: null,
                nonFinite: null,
                mutations: [],
                ms: 0,
                peakRssMb: 0,
                control: !mutate,
                harnessError: (err as Error).stack ?? String(err)
            };
        }
        const {spec, dir, before} = built;
        const result: CaseResult = {
            format,
            index,
            seed: o.seed,
            variant: spec.variant,
            via,
            primary: "ok",
            detail: "",
            halfWritten: [],
            inputsChanged: [],
            badMessage: null,
            nonFinite: null,
            mutations: spec.mutations,
            ms: 0,
            peakRssMb: 0,
            ...(via === "cli" ? {command: spec.cli.join(" ")} : {})
        };
        if (via === "lib") Object.assign(result, await this.runInWorker(spec.kind, spec.params, o.timeoutMs));
        else {
            const out = await runCli(spec.cli, dir, o.cliTimeoutMs, o.rssCapMb);
            Object.assign(result, {
                primary: out.primary,
                detail: out.detail,
                badMessage: out.badMessage,
                peakRssMb: out.peakRssMb,
                ms: out.ms
            });
        }
        // a process killed mid-write may leave temporaries: that is the kill, not the code under test
        if (result.primary !== "hang" && result.primary !== "memory" && result.primary !== "crash") {
            try {
                const disk = await checkDisk(spec, dir, before, result.primary);
                result.halfWritten = disk.halfWritten;
                result.inputsChanged = disk.inputsChanged;
            } catch (err) {
                result.harnessError = `checking the case folder: ${(err as Error).stack ?? err}`;
            }
        }
        if (!mutate) {
            result.control = true;
            if (result.primary !== "ok") result.detail = `the unmutated seed files did not load: ${result.detail}`;
        }
        if (isFailure(result) && o.keepFailures) {
            const kept = path.join(
                FAILURES_DIR,
                mutate ? `${format}-s${o.seed}-c${index}${via === "cli" ? "-cli" : ""}` : `${format}-control-${via}`
            );
            await fs.mkdir(FAILURES_DIR, {recursive: true});
            await fs.rm(kept, {recursive: true, force: true});
            await fs.rename(dir, kept);
            await fs.writeFile(
                path.join(kept, "FUZZ-CASE.txt"),
                describeFailure({...result, kept}) +
                    "\n" +
                    "(paths inside point at the run's scratch folder, which is deleted at the end; the replay command rebuilds the case)\n"
            );
            result.kept = kept;
        } else await fs.rm(dir, {recursive: true, force: true}).catch(() => undefined);
        return result;
    }

    /**
     * the control case (in the worker, and through the CLI when cliCases > 0), then cases [start, start + cases) in
     * the worker and cliCases through the CLI, side by side
     */
    async runFormat(
        format: string,
        cases: number,
        cliCases: number,
        start = 0,
        cliStart = start
    ): Promise<{control: CaseResult[]; lib: CaseResult[]; cli: CaseResult[]}> {
        formatByName(format);
        const control: CaseResult[] = [],
            lib: CaseResult[] = [],
            cli: CaseResult[] = [];
        const report = (r: CaseResult) => {
            if (isFailure(r)) this.options.log(describeFailure(r));
            else if (this.options.verbose)
                this.options.log(
                    `${r.format} ${r.control ? "control" : `case ${r.index}`} (${r.via}, ${r.variant}): ` +
                        `${r.primary}${r.detail ? ` — ${short(r.detail, 200)}` : ""} [${r.ms} ms]`
                );
        };
        const libLoop = (async () => {
            const c = await this.runCase(format, 0, "lib", false);
            control.push(c);
            report(c);
            for (let i = start; i < start + cases; i++) {
                const r = await this.runCase(format, i, "lib");
                lib.push(r);
                report(r);
            }
        })();
        const cliLoop = (async () => {
            if (cliCases === 0) return;
            const c = await this.runCase(format, 0, "cli", false);
            control.push(c);
            report(c);
            for (let i = cliStart; i < cliStart + cliCases; i++) {
                const r = await this.runCase(format, i, "cli");
                cli.push(r);
                report(r);
            }
        })();
        await Promise.all([libLoop, cliLoop]);
        return {control, lib, cli};
    }

    async close(): Promise<void> {
        await this.worker.stop();
        await fs.rm(this.root, {recursive: true, force: true});
    }
}

export const FORMAT_NAMES = FORMATS.map((f) => f.name);
