// cuda-profile.ts: where the GPU time of some queued work goes, op by op (benchmarks; no profiler needed).
//
// Every function of the CUDA addon that queues work is wrapped for the duration: a timing event follows each
// call. Before the first one, the stream is held still for a moment (profileHold), so the work queued behind it
// runs back to back at the GPU's pace, not the host's: the time between two events is then one op's kernel time
// plus the gap the GPU takes between kernels. A call that makes the host wait for the stream (a download, a
// synchronous upload, synchronize: a training step reads its loss) ends the hold; the next op holds the stream
// again, and the interval across the wait is left out (counted in `waits`).
import {cuda} from "./cuda.js";
import type {CudaAddon} from "./native-types.js";

export interface ProfileRow {
    /** the addon function and, for the products, their shape */
    op: string;
    calls: number;
    /** GPU milliseconds, summed over the calls */
    ms: number;
}

export interface Profile {
    rows: ProfileRow[];
    /** GPU milliseconds from the first op's start to the last op's end */
    totalMs: number;
    /** host milliseconds the profiled function took (its queuing, not the GPU's work) */
    hostMs: number;
    /** host waits for the stream inside the window (downloads, uploads, synchronize); their intervals are left out */
    waits: number;
}

export interface ProfileOptions {
    /** how long the stream is held still before the work queued behind it runs, microseconds */
    holdUs?: number;
    /** the addon whose functions are timed (tests pass a fake one) */
    addon?: CudaAddon;
}

/** functions that queue no GPU work, or wait for it: not wrapped */
const NOT_OPS = new Set([
    "deviceInfo",
    "setDevice",
    "alloc",
    "free",
    "memoryStats",
    "resetPeakMemoryStats",
    "emptyCache",
    "graphBegin",
    "graphEnd",
    "graphDestroy",
    "profileHold",
    "profileMark",
    "profileRead",
    "gemmInfo",
    "gemmClearCache"
]);

/** the op's name with its shape where the shape is what tells calls apart (the products) */
function label(op: string, a: unknown[]): string {
    if (op === "gemm") return `gemm ${a[2]}x${a[3]}x${a[4]}`;
    if (op === "gemmStridedBatched") return `gemmStridedBatched ${a[19]}x ${a[2]}x${a[3]}x${a[4]}`;
    if (op === "gemv4bit") return `gemv4bit ${a[13]}x${a[14]}x${a[15]}${a[18] ? " +lora" : ""}`;
    return op;
}

/** functions after which the host has waited for the stream: the hold is over */
const WAITS = new Set(["upload", "download", "synchronize"]);

/** the label of an interval across a host wait and the next hold (left out of the profile) */
const WAIT_GAP = "";

/** runs fn with every op of the CUDA addon timed; fn's ops must be queued on the addon's one stream */
export function profileCuda<T>(fn: () => T, opts: ProfileOptions = {}): {result: T; profile: Profile} {
    const holdUs = opts.holdUs ?? 200_000;
    const addon = (opts.addon ?? cuda()) as unknown as Record<string, unknown> & CudaAddon;
    const saved = new Map<string, (...a: unknown[]) => unknown>();
    const labels: string[] = [];
    let held = false,
        marked = false,
        waits = 0;
    for (const [name, f] of Object.entries(addon)) {
        if (typeof f !== "function" || NOT_OPS.has(name)) continue;
        const original = f as (...a: unknown[]) => unknown;
        saved.set(name, original);
        addon[name] = WAITS.has(name)
            ? (...a: unknown[]) => {
                  if (held) waits++;
                  held = false;
                  return original.apply(addon, a);
              }
            : (...a: unknown[]) => {
                  if (!held) {
                      addon.profileHold(holdUs);
                      addon.profileMark();
                      // after a wait, the interval from the last op's mark spans the wait and the hold
                      if (marked) labels.push(WAIT_GAP);
                      held = marked = true;
                  }
                  const out = original.apply(addon, a);
                  addon.profileMark();
                  labels.push(label(name, a));
                  return out;
              };
    }
    addon.profileRead(); // drop marks of an earlier, unfinished profile
    const t0 = performance.now();
    let result: T;
    try {
        result = fn();
    } finally {
        for (const [name, f] of saved) addon[name] = f;
    }
    const hostMs = performance.now() - t0;
    const elapsed = addon.profileRead();
    const byOp = new Map<string, ProfileRow>();
    let totalMs = 0;
    labels.forEach((op, i) => {
        if (op === WAIT_GAP) return;
        const ms = elapsed[i] ?? 0;
        totalMs += ms;
        const row = byOp.get(op) ?? {op, calls: 0, ms: 0};
        row.calls++;
        row.ms += ms;
        byOp.set(op, row);
    });
    const rows = [...byOp.values()].sort((x, y) => y.ms - x.ms);
    return {result, profile: {rows, totalMs, hostMs, waits}};
}

/** the profile as a markdown table, the largest first */
export function formatProfile(p: Profile, title: string): string {
    const lines = [
        `${title}: ${p.totalMs.toFixed(3)} ms on the GPU, ${p.hostMs.toFixed(1)} ms on the host` +
            (p.waits ? ` (${p.waits} host waits for the stream inside, the time across them left out)` : ""),
        "",
        "| op | calls | ms | us per call | share |",
        "|---|--:|--:|--:|--:|"
    ];
    for (const r of p.rows)
        lines.push(
            `| ${r.op} | ${r.calls} | ${r.ms.toFixed(3)} | ${((1000 * r.ms) / r.calls).toFixed(1)} | ` +
                `${((100 * r.ms) / p.totalMs).toFixed(1)}% |`
        );
    return lines.join("\n");
}
