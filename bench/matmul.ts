// bench/matmul.ts: qlora's CPU sgemm (native addon) against numpy / OpenBLAS on the shapes of QLoRA training
// and generation, on the same number of threads.
//
//   npx tsx bench/matmul.ts [--threads N] [--filter TEXT] [--min-time SECONDS] [--rounds N] [--no-peer]
//
// Each shape runs y = x @ W^T style products: forward (transA=0, transB=1, W stored [out, in]), the backward
// dX = dY @ W (0, 0) and dW = dY^T @ X (1, 0). Both sides warm up and report the best of several reps.
// The peer is `python3 bench/matmul_numpy.py` (shapes as JSON on stdin, results as JSON on stdout), pinned
// with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS; the two never run at the same time, and
// they alternate for --rounds rounds (default 2), each column keeping its best, so that a burst of other work
// on the machine does not land on one side only. Threads default to the number of cores.
import {spawnSync} from "node:child_process";
import os from "node:os";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {loadNative} from "../src/backend/native.js";

interface Shape {
    label: string;
    M: number;
    N: number;
    K: number;
    transA: boolean;
    transB: boolean;
}

function fwd(label: string, M: number, inF: number, outF: number): Shape {
    return {label, M, N: outF, K: inF, transA: false, transB: true};
}
// dX[M, in] = dY[M, out] @ W[out, in]
function bwdX(label: string, M: number, inF: number, outF: number): Shape {
    return {label, M, N: inF, K: outF, transA: false, transB: false};
}
// dW[out, in] = dY[M, out]^T @ X[M, in]
function bwdW(label: string, M: number, inF: number, outF: number): Shape {
    return {label, M: outF, N: inF, K: M, transA: true, transB: false};
}

const SHAPES: Shape[] = [
    // tiny-qwen2: hidden 256, q/o 256->256, k/v 256->128, gate/up 256->768, down 768->256, vocab 16384
    fwd("tiny q/o_proj", 128, 256, 256),
    fwd("tiny k/v_proj", 128, 256, 128),
    fwd("tiny gate/up", 128, 256, 768),
    fwd("tiny down", 128, 768, 256),
    fwd("tiny lm_head", 128, 256, 16384),
    fwd("tiny q/o_proj", 512, 256, 256),
    fwd("tiny k/v_proj", 512, 256, 128),
    fwd("tiny gate/up", 512, 256, 768),
    fwd("tiny down", 512, 768, 256),
    fwd("tiny lm_head", 512, 256, 16384),
    bwdX("tiny dX gate", 512, 256, 768),
    bwdW("tiny dW gate", 512, 256, 768),
    bwdX("tiny dX lm_head", 512, 256, 16384),
    bwdW("tiny dW lm_head", 512, 256, 16384),
    // Qwen2-0.5B: hidden 896, q/o 896->896, k/v 896->128, gate/up 896->4864, down 4864->896, vocab 151936
    fwd("0.5B q/o_proj", 512, 896, 896),
    fwd("0.5B k/v_proj", 512, 896, 128),
    fwd("0.5B gate/up", 512, 896, 4864),
    fwd("0.5B down", 512, 4864, 896),
    bwdX("0.5B dX q_proj", 512, 896, 896),
    bwdW("0.5B dW q_proj", 512, 896, 896),
    bwdX("0.5B dX gate", 512, 896, 4864),
    bwdW("0.5B dW gate", 512, 896, 4864),
    bwdX("0.5B dX down", 512, 4864, 896),
    bwdW("0.5B dW down", 512, 4864, 896),
    fwd("0.5B lm_head", 128, 896, 151936),
    // generation (a few tokens: skinny M)
    fwd("gen 0.5B q_proj", 1, 896, 896),
    fwd("gen 0.5B gate", 1, 896, 4864),
    fwd("gen 0.5B gate", 4, 896, 4864),
    fwd("gen 0.5B down", 8, 4864, 896)
];

function parseArgs(argv: string[]) {
    const opts = {
        threads: Number(process.env.QLORA_NUM_THREADS) || os.availableParallelism(),
        filter: "",
        minTime: 0.25,
        rounds: 2,
        peer: true
    };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === "--threads") opts.threads = Number(argv[++i]);
        else if (a === "--filter") opts.filter = argv[++i] ?? "";
        else if (a === "--min-time") opts.minTime = Number(argv[++i]);
        else if (a === "--rounds") opts.rounds = Number(argv[++i]);
        else if (a === "--no-peer") opts.peer = false;
        else if (a === "--help" || a === "-h") {
            console.log(
                "usage: npx tsx bench/matmul.ts [--threads N] [--filter TEXT] [--min-time SECONDS] [--rounds N] [--no-peer]"
            );
            process.exit(0);
        } else throw new Error(`unknown argument ${a}`);
    }
    if (!(opts.threads >= 1)) throw new Error("--threads must be >= 1");
    if (!(opts.rounds >= 1)) throw new Error("--rounds must be >= 1");
    return opts;
}

function fillRandom(a: Float32Array, seed: number) {
    let s = (seed * 2654435761) >>> 0 || 1;
    for (let i = 0; i < a.length; i++) {
        s ^= s << 13;
        s ^= s >>> 17;
        s ^= s << 5;
        a[i] = ((s >>> 0) / 4294967296 - 0.5) * 2;
    }
}

/** fraction of CPU time spent busy over a short window (other work on the machine skews a benchmark) */
function busyFraction(ms = 300): number {
    const snap = () =>
        os.cpus().reduce(
            (acc, c) => {
                const t = c.times;
                acc.idle += t.idle;
                acc.total += t.user + t.nice + t.sys + t.idle + t.irq;
                return acc;
            },
            {idle: 0, total: 0}
        );
    const a = snap();
    const end = Date.now() + ms;
    while (Date.now() < end) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
    const b = snap();
    const total = b.total - a.total;
    return total > 0 ? 1 - (b.idle - a.idle) / total : 0;
}

const gflops = (s: Shape, seconds: number) => (2 * s.M * s.N * s.K) / seconds / 1e9;

function benchQlora(shapes: Shape[], threads: number, minTime: number): number[] {
    const addon = loadNative();
    addon.setNumThreads(threads);
    const out: number[] = [];
    for (const [idx, s] of shapes.entries()) {
        const aRows = s.transA ? s.K : s.M,
            aCols = s.transA ? s.M : s.K;
        const bRows = s.transB ? s.N : s.K,
            bCols = s.transB ? s.K : s.N;
        const A = new Float32Array(aRows * aCols),
            B = new Float32Array(bRows * bCols);
        const C = new Float32Array(s.M * s.N);
        fillRandom(A, 2 * idx + 1);
        fillRandom(B, 2 * idx + 2);
        const run = () => addon.sgemm(s.transA, s.transB, s.M, s.N, s.K, 1, A, aCols, B, bCols, 0, C, s.N);
        run();
        run();
        let best = Infinity,
            total = 0,
            reps = 0;
        while (reps < 3 || (total < minTime && reps < 2000)) {
            const t0 = process.hrtime.bigint();
            run();
            const dt = Number(process.hrtime.bigint() - t0) / 1e9;
            best = Math.min(best, dt);
            total += dt;
            reps++;
        }
        out.push(gflops(s, best));
    }
    return out;
}

interface PeerResult {
    name: string;
    gflops: (number | null)[];
    error?: string;
}

function benchNumpy(shapes: Shape[], threads: number, minTime: number): PeerResult {
    const script = path.join(path.dirname(fileURLToPath(import.meta.url)), "matmul_numpy.py");
    const tn = String(threads);
    const res = spawnSync("python3", [script], {
        input: JSON.stringify({shapes, minTime, maxReps: 2000}),
        encoding: "utf8",
        maxBuffer: 16 << 20,
        env: {...process.env, OPENBLAS_NUM_THREADS: tn, OMP_NUM_THREADS: tn, MKL_NUM_THREADS: tn}
    });
    const none = shapes.map(() => null);
    if (res.error) {
        const code = (res.error as NodeJS.ErrnoException).code;
        return {name: "numpy", gflops: none, error: code === "ENOENT" ? "python3 not found" : res.error.message};
    }
    let parsed: {ok: boolean; error?: string; blas?: string; results?: {label: string; gflops: number}[]};
    try {
        parsed = JSON.parse(res.stdout.trim().split("\n").pop() ?? "");
    } catch {
        const why = (res.stderr || res.stdout || `exit status ${res.status}`).trim().split("\n").pop();
        return {name: "numpy", gflops: none, error: `bench/matmul_numpy.py failed: ${why}`};
    }
    if (!parsed.ok || !parsed.results) return {name: "numpy", gflops: none, error: parsed.error ?? "no results"};
    return {name: parsed.blas ?? "numpy", gflops: parsed.results.map((r) => r.gflops)};
}

function main() {
    const opts = parseArgs(process.argv.slice(2));
    const shapes = SHAPES.filter((s) => s.label.includes(opts.filter));
    if (shapes.length === 0) throw new Error(`no shape matches --filter ${opts.filter}`);
    const cpu = os.cpus()[0]?.model ?? "unknown CPU";
    console.log(
        `sgemm fp32, ${opts.threads} thread(s), ${cpu} (${os.availableParallelism()} cores), ` +
            `best of >= 3 reps (${opts.minTime}s per shape)`
    );
    const busy = busyFraction();
    if (busy > 0.1)
        console.log(`note: the CPUs were ${(100 * busy).toFixed(0)}% busy before the run; other work skews both columns`);

    const t0 = Date.now();
    let ours: number[] = shapes.map(() => 0);
    let peer: PeerResult = {name: "numpy", gflops: shapes.map(() => null), error: "skipped (--no-peer)"};
    for (let round = 0; round < opts.rounds; round++) {
        const q = benchQlora(shapes, opts.threads, opts.minTime);
        ours = ours.map((g, i) => Math.max(g, q[i]));
        if (!opts.peer || (round > 0 && peer.error)) continue;
        const p = benchNumpy(shapes, opts.threads, opts.minTime);
        if (round === 0) peer = p;
        else if (!p.error) peer.gflops = peer.gflops.map((g, i) => Math.max(g ?? 0, p.gflops[i] ?? 0));
    }

    const rows = shapes.map((s, i) => {
        const p = peer.gflops[i];
        return [
            s.label,
            `${s.M} ${s.N} ${s.K}`,
            `${s.transA ? "T" : "N"}${s.transB ? "T" : "N"}`,
            ours[i].toFixed(1),
            p == null ? "-" : p.toFixed(1),
            p == null ? "-" : (ours[i] / p).toFixed(2)
        ];
    });
    const header = ["shape", "M N K", "op", "qlora GFLOP/s", "OpenBLAS GFLOP/s", "ratio"];
    const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c].length)));
    const fmt = (r: string[]) =>
        "| " + r.map((x, c) => (c <= 2 ? x.padEnd(widths[c]) : x.padStart(widths[c]))).join(" | ") + " |";
    console.log(fmt(header));
    console.log("|" + widths.map((w, c) => (c <= 2 ? "-".repeat(w + 2) : "-".repeat(w + 1) + ":")).join("|") + "|");
    for (const r of rows) console.log(fmt(r));
    const ratios = shapes
        .map((_, i) => peer.gflops[i])
        .map((p, i) => (p == null ? null : ours[i] / p))
        .filter((x): x is number => x != null);
    if (ratios.length) {
        const geo = Math.exp(ratios.reduce((a, r) => a + Math.log(r), 0) / ratios.length);
        console.log(
            `ratio qlora / peer: geometric mean ${geo.toFixed(2)}, min ${Math.min(...ratios).toFixed(2)} ` +
                `(peer: ${peer.name}, OPENBLAS_NUM_THREADS=${opts.threads})`
        );
    } else {
        console.log(`peer column missing: ${peer.error}`);
    }
    console.log(`total ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}

main();
