// cuda-profile.ts: where the GPU time of some queued work goes, op by op (benchmarks; no profiler needed).
//
// Every function of the CUDA addon that queues work is wrapped for the duration: a timing event follows each
// call. Before the first one, the stream is held still for a moment (profileHold), so the work queued behind it
// runs back to back at the GPU's pace, not the host's: the time between two events is then one op's kernel time
// plus the gap the GPU takes between kernels. A synchronous upload inside the window ends the hold early (the host
// waits for the queued work), so uploads are counted and reported.
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
    /** uploads inside the window: each made the host wait, so the ops before it ran at the host's pace */
    syncUploads: number;
}

/** functions that queue no GPU work, or wait for it: not wrapped */
const NOT_OPS = new Set([
    "deviceInfo",
    "setDevice",
    "alloc",
    "free",
    "upload",
    "download",
    "synchronize",
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

/** runs fn with every op of the CUDA addon timed; fn's ops must be queued on the addon's one stream */
export function profileCuda<T>(fn: () => T, holdUs = 200_000): {result: T; profile: Profile} {
    const addon = cuda() as unknown as Record<string, unknown> & CudaAddon;
    const saved = new Map<string, (...a: unknown[]) => unknown>();
    const labels: string[] = [];
    let held = false,
        syncUploads = 0;
    for (const [name, f] of Object.entries(addon)) {
        if (typeof f !== "function" || NOT_OPS.has(name)) continue;
        const original = f as (...a: unknown[]) => unknown;
        saved.set(name, original);
        addon[name] = (...a: unknown[]) => {
            if (!held) {
                addon.profileHold(holdUs);
                addon.profileMark();
                held = true;
            }
            const out = original.apply(addon, a);
            addon.profileMark();
            labels.push(label(name, a));
            return out;
        };
    }
    const upload = addon.upload;
    addon.upload = (...a: Parameters<CudaAddon["upload"]>) => {
        if (held) syncUploads++;
        upload.apply(addon, a);
    };
    addon.profileRead(); // drop marks of an earlier, unfinished profile
    const t0 = performance.now();
    let result: T;
    try {
        result = fn();
    } finally {
        for (const [name, f] of saved) addon[name] = f;
        addon.upload = upload;
    }
    const hostMs = performance.now() - t0;
    const elapsed = addon.profileRead();
    const byOp = new Map<string, ProfileRow>();
    let totalMs = 0;
    labels.forEach((op, i) => {
        const ms = elapsed[i] ?? 0;
        totalMs += ms;
        const row = byOp.get(op) ?? {op, calls: 0, ms: 0};
        row.calls++;
        row.ms += ms;
        byOp.set(op, row);
    });
    const rows = [...byOp.values()].sort((x, y) => y.ms - x.ms);
    return {result, profile: {rows, totalMs, hostMs, syncUploads}};
}

/** the profile as a markdown table, the largest first */
export function formatProfile(p: Profile, title: string): string {
    const lines = [
        `${title}: ${p.totalMs.toFixed(3)} ms on the GPU, ${p.hostMs.toFixed(1)} ms on the host` +
            (p.syncUploads ? ` (${p.syncUploads} synchronous uploads inside: times before them include host pace)` : ""),
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
