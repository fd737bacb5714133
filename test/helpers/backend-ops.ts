// backend-ops.ts: one op test table over the Backend interface (src/backend/backend.ts), in the spirit of
// llama.cpp's test-backend-ops: every op x shapes (odd sizes, GQA, padding masks, packed segments, a KV-cache
// offset) x forward and backward, run on whichever backend an io adapter wraps, against the float64 references
// of reference-ops.ts and central finite differences of L = sum(out * R) through the float64 reference forward.
//
// Inputs are seeded (prng.ts) f32 values; a backend stores them in its activation dtype, so every reference is
// computed on the values the backend actually holds (io.round: bf16 rounding on CUDA). What remains is the op's
// own error, judged with errorStats' metric (max |got - ref| / (|ref| + rms(ref))) against a tolerance per
// activation dtype:
//   - float32 (CPU): as test/ops-cpu.test.ts, 1e-6 .. 2e-5: room for a few fp32 roundings of sums over at most a
//     few thousand terms, far below what a wrong sign, index or mask gives;
//   - bfloat16 (CUDA): 1e-2 for bf16 outputs (storing a value in bf16 alone costs up to 2^-9 ~ 2e-3 relative),
//     3e-2 for the attention backward (P and dS are rounded to bf16 before their tensor-core products) and the
//     loss gradient (bf16 logits and dlogits, then a bf16 GEMM); fp32 outputs of bf16 inputs: 1e-5 for rstd and
//     the embedding gradient (plain fp32 sums), 1e-3 for logits and 2e-3 for lse (tensor-core sums in another
//     order; test/gpu/attention.test.ts allows lse 2e-3 too).
// Copies (embedding, cacheWrite) and the residual add are exact on both: the expected value is the input, or the
// fp32 sum rounded by the backend's own storage (io.round). So are the projection layers' elementwise ops with one
// rounding (addBias, dropout, divide), the fp32 round trips of trainable tensors (param, paramToHost, zeroParam)
// and the compute copies (computeCopy: io.round of the master). Their other ops: gemm 1e-5 on fp32 (1e-5 for fp32
// masters on CUDA too: no TF32), bf16 outputs BF16_OUT, fp32 outputs of bf16 inputs 1e-4 (tensor-core sums);
// columnSums and rowNorms 1e-6 (fp32 results of float64 sums); scaleColumns and dropoutAdd 1e-6 / BF16_OUT.
//
// Each case prints one llm.c-style line: `OK     op  shape  maxRel ... (tol ...)` or `NOT OK ...` followed by the
// failing checks.
import {after, describe, test, type TestContext} from "node:test";
import assert from "node:assert/strict";
import {GATED_ACTS, type Backend, type TensorTypes} from "../../src/backend/backend.js";
import {cpuBackend, type CpuTensors} from "../../src/backend/cpu-backend.js";
import {cudaBackend, type CudaTensors} from "../../src/backend/cuda-backend.js";
import {DeviceBuffer} from "../../src/backend/cuda.js";
import {cpu, f32ToHalf, halfToF32} from "../../src/backend/cpu.js";
import {pickTokensHost, type TokenPick} from "../../src/backend/sampling.js";
import {parseModelConfig} from "../../src/io/hf-config.js";
import {computeRopeInvFreq} from "../../src/model/rope.js";
import {Prng, randn32} from "./prng.js";
import {
    type AttnProblem,
    errorStats,
    f64,
    fdGrad,
    nanFilled,
    pick,
    refAttention,
    refAttentionBackward,
    refCausalLmLoss,
    refColumnSums,
    refEmbedding,
    refEmbeddingBackward,
    refGemm,
    refLogits,
    refRmsnorm,
    refRmsnormBackward,
    refRope,
    refRowNorms,
    refScaleColumns,
    refGatedAct,
    refGatedActBackward,
    softcap64,
    rms,
    ropeAngles,
    sample
} from "./reference-ops.js";

export type ActivationDtype = Backend<TensorTypes>["activationDtype"];
/** a tolerance per activation dtype */
export type Tol = Record<ActivationDtype, number>;

// ------------------------------------------------------------------
// io adapters: host f32 in, float64 out, on any backend

export interface BackendIo<X extends TensorTypes> {
    readonly be: Backend<X>;
    /** the values an activation tensor holds once `host` is uploaded (bf16 rounding on CUDA) */
    round(host: Float32Array): Float32Array;
    /** an activation tensor (the backend's dtype) holding round(host) */
    upload(host: Float32Array): X["f"];
    /** an fp32 statistics tensor (RoPE frequencies) */
    uploadStats(host: Float32Array): X["f"];
    /** an activation or statistics tensor's values */
    download(t: X["f"]): Float64Array;
}

export function cpuIo(): BackendIo<CpuTensors> {
    return {
        be: cpuBackend(),
        round: (host) => Float32Array.from(host),
        upload: (host) => Float32Array.from(host), // a copy: in-place ops must not write the caller's array
        uploadStats: (host) => Float32Array.from(host),
        download: (t) => Float64Array.from(t)
    };
}

export function cudaIo(): BackendIo<CudaTensors> {
    return {
        be: cudaBackend(),
        round: (host) => halfToF32(f32ToHalf(host, "BF16"), "BF16"),
        upload: (host) => DeviceBuffer.from("bf16", f32ToHalf(host, "BF16")),
        uploadStats: (host) => DeviceBuffer.from("f32", host),
        download: (t) => {
            if (t.dtype === "bf16") return Float64Array.from(halfToF32(t.toHost() as Uint16Array, "BF16"));
            if (t.dtype === "f32") return Float64Array.from(t.toHost() as Float32Array);
            throw new Error(`download: a ${t.dtype} buffer is no float tensor`);
        }
    };
}

// ------------------------------------------------------------------
// one case's run: tensors (freed at the end) and checks

/** a float tensor on the backend and the values it holds */
interface Held<F> {
    t: F;
    v: Float64Array;
}

interface CheckResult {
    what: string;
    maxRel: number;
    tol: number;
    ok: boolean;
    detail: string;
}

function fmt(x: number): string {
    return Number.isFinite(x) ? x.toExponential(1) : String(x);
}

export class CaseRun<X extends TensorTypes> {
    readonly be: Backend<X>;
    readonly dtype: ActivationDtype;
    readonly checks: CheckResult[] = [];
    private readonly owned: (X["f"] | X["i"] | X["u8"])[] = [];

    constructor(
        readonly io: BackendIo<X>,
        readonly rng: Prng
    ) {
        this.be = io.be;
        this.dtype = io.be.activationDtype;
    }

    /** frees t when the case ends */
    own<T extends X["f"] | X["i"] | X["u8"]>(t: T): T {
        this.owned.push(t);
        return t;
    }

    /** an activation tensor of `host`, and the values it holds */
    upload(host: Float32Array): Held<X["f"]> {
        return {t: this.own(this.io.upload(host)), v: f64(this.io.round(host))};
    }

    randn(n: number, std = 1, mean = 0): Held<X["f"]> {
        return this.upload(randn32(this.rng, n, std, mean));
    }

    /** an activation output filled with NaN: an op that overwrites (=) must replace every element */
    out(n: number): X["f"] {
        return this.own(this.io.upload(nanFilled(n)));
    }

    /** an fp32 statistics output filled with NaN */
    stats(n: number): X["f"] {
        return this.own(this.io.uploadStats(nanFilled(n)));
    }

    uploadStats(host: Float32Array): X["f"] {
        return this.own(this.io.uploadStats(host));
    }

    /**
     * an fp32 tensor made by be.param (a trainable tensor's master or gradient) holding `host` exactly; from a copy,
     * as the CPU's param returns the array itself and ops then write it
     */
    param(host: ArrayLike<number>): Held<X["f"]> {
        const h = Float32Array.from(host);
        return {t: this.own(this.be.param(Float32Array.from(h))), v: f64(h)};
    }

    indices(host: ArrayLike<number>): X["i"] {
        return this.own(this.be.indices(Int32Array.from(host)));
    }

    mask(host: ArrayLike<number>): X["u8"] {
        return this.own(this.be.mask(Uint8Array.from(host)));
    }

    get(t: X["f"]): Float64Array {
        return this.io.download(t);
    }

    /**
     * got vs ref with errorStats' metric; `floor` overrides rms(ref); `minFloor` raises it, for tensors whose
     * reference may be (near) zero throughout
     */
    close(what: string, got: ArrayLike<number>, ref: ArrayLike<number>, tol: Tol, floor?: number, minFloor = 0): void {
        const e = errorStats(got, ref, minFloor > 0 ? Math.max(floor ?? rms(ref), minFloor) : floor);
        const t = tol[this.dtype];
        const ok = e.maxRel <= t;
        this.checks.push({
            what,
            maxRel: e.maxRel,
            tol: t,
            ok,
            detail:
                ok || e.worst < 0 ? "" : `maxabs ${fmt(e.maxAbs)}, worst at [${e.worst}]: got ${got[e.worst]} ref ${ref[e.worst]}`
        });
    }

    /** the same numbers (NaN matches NaN, -0 matches 0) */
    exact(what: string, got: ArrayLike<number>, ref: ArrayLike<number>): void {
        let bad = 0,
            first = -1;
        const n = Math.max(got.length, ref.length);
        for (let i = 0; i < n; i++)
            if (!(got[i] === ref[i] || (Number.isNaN(got[i]) && Number.isNaN(ref[i])))) {
                if (first < 0) first = i;
                bad++;
            }
        const ok = bad === 0 && got.length === ref.length;
        this.checks.push({
            what,
            maxRel: ok ? 0 : Infinity,
            tol: 0,
            ok,
            detail: ok
                ? ""
                : got.length !== ref.length
                  ? `${got.length} values, expected ${ref.length}`
                  : `${bad}/${n} differ, first at [${first}]: got ${got[first]} ref ${ref[first]}`
        });
    }

    that(what: string, ok: boolean, detail = ""): void {
        this.checks.push({what, maxRel: ok ? 0 : Infinity, tol: 0, ok, detail: ok ? "" : detail});
    }

    release(): void {
        for (const t of this.owned) this.be.free(t);
        this.owned.length = 0;
    }
}

// ------------------------------------------------------------------
// the table

/**
 * the ops of the Backend interface, and the storage methods with a contract of their own (zeros, with activation
 * and stats; offload then restore; the trainable tensors' param, paramToHost, zeroParam, computeCopy): a method
 * added there and not here fails to compile. indices, mask and free serve every case.
 */
const OP_NAMES = {
    embedding: true,
    embeddingBackward: true,
    rmsnorm: true,
    residualRmsnorm: true,
    rmsnormBackward: true,
    rope: true,
    ropeBackward: true,
    attention: true,
    attentionBackward: true,
    gatedAct: true,
    gatedActBackward: true,
    scale: true,
    addInplace: true,
    cacheWrite: true,
    ropeCacheWrite: true,
    copyColumns: true,
    view: true,
    pickTokens: true,
    causalLmLoss: true,
    logits: true,
    zeros: true,
    offload: true,
    param: true,
    paramToHost: true,
    zeroParam: true,
    computeCopy: true,
    gemm: true,
    loraDownGroup: true,
    dropout: true,
    dropoutAdd: true,
    addBias: true,
    scaleColumns: true,
    columnSums: true,
    rowNorms: true,
    divide: true
} satisfies Record<
    Exclude<
        keyof Backend<TensorTypes>,
        | "device"
        | "activationDtype"
        | "lossChunkRows"
        | "activation"
        | "stats"
        | "indices"
        | "mask"
        | "free"
        | "prefetch"
        | "restore"
    >,
    true
>;
export type OpName = keyof typeof OP_NAMES;
export const BACKEND_OPS = Object.keys(OP_NAMES) as OpName[];

export interface OpCase {
    op: OpName;
    /** the shape and variant, as printed */
    shape: string;
    /** why a backend cannot run this case (null: it can) */
    unsupported?(be: Backend<TensorTypes>): string | null;
    run<X extends TensorTypes>(r: CaseRun<X>): void;
}

/** the bf16 tolerance of a bf16 output; fp32 per check */
const BF16_OUT = 1e-2;

export const OP_CASES: OpCase[] = [];

// ---- embedding

for (const [N, V, C] of [
    [1, 5, 8],
    [3, 11, 24],
    [17, 50, 40],
    [23, 50, 37],
    [200, 64, 300]
]) {
    OP_CASES.push({
        op: "embedding",
        shape: `N=${N} V=${V} C=${C}`,
        run(r) {
            const table = r.randn(V * C);
            const ids = Int32Array.from({length: N}, () => r.rng.int(V));
            ids[0] = 0;
            ids[N - 1] = V - 1;
            const out = r.out(N * C);
            const bad = r.be.embedding(out, r.indices(ids), table.t, N, V, C);
            r.that("returns -1", bad === -1, `returned ${bad}`);
            r.exact("rows", r.get(out), refEmbedding(ids, table.v, C));
        }
    });
}
// out-of-range ids: the first bad position is reported (the caller names it in its error)
for (const [ids, first] of [
    [[1, 2, 3, 10, 4, -1], 3],
    [[0, -1, 9], 1],
    [[-7], 0],
    [[0, 9, 5, -7, 110], 3],
    [[9, 9, 0, 10], 3],
    [[...Array.from({length: 16}, (_, i) => i % 10), 10], 16]
] as const) {
    OP_CASES.push({
        op: "embedding",
        shape: `bad ids [${ids.join(",")}] V=10`,
        run(r) {
            const V = 10,
                C = 8,
                N = ids.length;
            const table = r.randn(V * C);
            const bad = r.be.embedding(r.out(N * C), r.indices(ids), table.t, N, V, C);
            r.that(`first bad position ${first}`, bad === first, `returned ${bad}`);
        }
    });
}

for (const [N, V, C] of [
    [1, 4, 8],
    [3, 5, 24],
    [17, 9, 40],
    [23, 9, 37],
    [120, 40, 300]
]) {
    OP_CASES.push({
        op: "embeddingBackward",
        shape: `N=${N} V=${V} C=${C}`,
        run(r) {
            const ids = Int32Array.from({length: N}, () => r.rng.int(V - 1)); // id V-1 never occurs
            if (N >= 3) ids[1] = ids[2] = V - 2; // repeats sum
            if (N >= 8) ids[7] = V - 2;
            const idsT = r.indices(ids);
            const dout = r.randn(N * C);
            const pre = randn32(r.rng, V * C); // a previous micro-batch's gradient: an fp32 tensor, +=
            const dtable = r.param(pre);
            r.be.embeddingBackward(dtable.t, dout.t, idsT, N, V, C);
            const grad = refEmbeddingBackward(dout.v, ids, V, C);
            const tol = {float32: 1e-6, bfloat16: 1e-5};
            const once = r.get(dtable.t);
            r.close(
                "dtable += grad",
                once,
                grad.map((g, i) => g + pre[i]),
                tol
            );
            r.exact("unused row untouched", once.subarray((V - 1) * C), pre.subarray((V - 1) * C));
            r.be.embeddingBackward(dtable.t, dout.t, idsT, N, V, C);
            r.close(
                "twice",
                r.get(dtable.t),
                grad.map((g, i) => 2 * g + pre[i]),
                tol
            );
            // FD of L = sum(embedding(table) * dout)
            const t64 = f64(randn32(r.rng, V * C));
            const idx = sample(r.rng, V * C, 64);
            const fd = fdGrad(() => refEmbedding(ids, t64, C), t64, dout.v, idx);
            const fresh = r.param(new Float32Array(V * C));
            r.be.embeddingBackward(fresh.t, dout.t, idsT, N, V, C);
            r.close("vs FD", pick(r.get(fresh.t), idx), fd, tol);
        }
    });
}

// ---- RMSNorm

interface NormShape {
    N: number;
    C: number;
    eps: number;
    fd: number;
}
const NORM_SHAPES: NormShape[] = [
    {N: 1, C: 8, eps: 1e-6, fd: 8},
    {N: 3, C: 24, eps: 1e-5, fd: 72},
    {N: 17, C: 40, eps: 1e-6, fd: 100},
    {N: 64, C: 1024, eps: 1e-6, fd: 40},
    // qwen3's q_norm / k_norm: the rows are tokens x heads, each of head_dim values
    {N: 7 * 4, C: 64, eps: 1e-6, fd: 60},
    {N: 5 * 2, C: 128, eps: 1e-6, fd: 60}
];

/** x with rows of very different scales and (N >= 3) an all-zero row: out = 0, rstd = 1/sqrt(eps) */
function normInput<X extends TensorTypes>(r: CaseRun<X>, N: number, C: number): Held<X["f"]> {
    const x = randn32(r.rng, N * C);
    for (let n = 0; n < N; n++) {
        const s = [1, 10, 0.01][n % 3];
        for (let k = 0; k < C; k++) x[n * C + k] *= s;
    }
    if (N >= 3) x.fill(0, 2 * C, 3 * C);
    return r.upload(x);
}

const normTag = ({N, C, eps}: NormShape) => `N=${N} C=${C} eps=${eps}`;
const RSTD_TOL = {float32: 1e-6, bfloat16: 1e-5}; // fp32 on both, from the values the backend holds

for (const s of NORM_SHAPES) {
    const {N, C} = s;
    const eps = Math.fround(s.eps);
    OP_CASES.push({
        op: "rmsnorm",
        shape: normTag(s),
        run(r) {
            const x = normInput(r, N, C),
                w = r.randn(C, 0.2, 1);
            const ref = refRmsnorm(x.v, w.v, N, C, eps);
            const out = r.out(N * C),
                rstd = r.stats(N);
            r.be.rmsnorm(out, rstd, x.t, w.t, N, C, eps);
            const got = r.get(out);
            r.close("out", got, ref.out, {float32: 1e-6, bfloat16: BF16_OUT});
            r.close("rstd", r.get(rstd), ref.rstd, RSTD_TOL, 0);
            const out2 = r.out(N * C);
            r.be.rmsnorm(out2, null, x.t, w.t, N, C, eps);
            r.exact("rstd=null: same out", r.get(out2), got);
        }
    });
    OP_CASES.push({
        op: "residualRmsnorm",
        shape: normTag(s),
        run(r) {
            const x = r.randn(N * C),
                y = r.randn(N * C, 2),
                w = r.randn(C, 0.2, 1);
            const h = r.out(N * C),
                out = r.out(N * C),
                rstd = r.stats(N);
            r.be.residualRmsnorm(h, out, rstd, x.t, y.t, w.t, N, C, eps);
            const hGot = r.get(h),
                outGot = r.get(out),
                rstdGot = r.get(rstd);
            // h: the fp32 sum as the backend stores it (bf16 on CUDA); out and rstd are those of the stored h, which
            // is what the backward reads
            r.exact("h = x + y", hGot, f64(r.io.round(Float32Array.from(x.v, (v, i) => v + y.v[i]))));
            const ref = refRmsnorm(hGot, w.v, N, C, eps);
            r.close("out", outGot, ref.out, {float32: 1e-6, bfloat16: BF16_OUT});
            r.close("rstd", rstdGot, ref.rstd, RSTD_TOL, 0);
            // the graph passes the residual as both y and h
            const yh = r.upload(Float32Array.from(y.v)),
                out2 = r.out(N * C),
                rstd2 = r.stats(N);
            r.be.residualRmsnorm(yh.t, out2, rstd2, x.t, yh.t, w.t, N, C, eps);
            r.exact("h aliasing y: same h", r.get(yh.t), hGot);
            r.exact("h aliasing y: same out", r.get(out2), outGot);
            r.exact("h aliasing y: same rstd", r.get(rstd2), rstdGot);
        }
    });
    OP_CASES.push({
        op: "rmsnormBackward",
        shape: normTag(s),
        run(r) {
            const x = normInput(r, N, C),
                w = r.randn(C, 0.2, 1),
                dy = r.randn(N * C);
            const rstd = r.stats(N); // the forward's, as the graph keeps it
            r.be.rmsnorm(r.out(N * C), rstd, x.t, w.t, N, C, eps);
            const dx = r.out(N * C);
            r.be.rmsnormBackward(dx, dy.t, x.t, w.t, rstd, N, C);
            const got = r.get(dx);
            const tol = {float32: 4e-6, bfloat16: BF16_OUT};
            r.close("dx (=) vs analytic", got, refRmsnormBackward(dy.v, x.v, w.v, N, C, eps).dx, tol);
            const x64 = f64(x.v),
                idx = sample(r.rng, N * C, s.fd);
            const fd = fdGrad(() => refRmsnorm(x64, w.v, N, C, eps).out, x64, dy.v, idx);
            r.close("dx vs FD", pick(got, idx), fd, tol);
        }
    });
}

// ---- RoPE, with the inverse frequencies src/model/rope.ts computes for a config.json

interface RopeShape {
    N: number;
    H: number;
    D: number;
    /** config.json keys beyond the defaults */
    config: Record<string, unknown>;
    rope: string;
    pos: number[];
}

const ROPE_SHAPES: RopeShape[] = [
    {N: 1, H: 1, D: 64, config: {}, rope: "default", pos: [4095]},
    {N: 3, H: 2, D: 64, config: {rope_theta: 1000000, max_position_embeddings: 32768}, rope: "theta=1e6", pos: [0, 1, 32767]},
    {
        N: 17,
        H: 4,
        D: 128,
        rope: "llama3",
        pos: Array.from({length: 17}, (_, i) => 2 * i + 1),
        config: {
            rope_theta: 500000,
            rope_scaling: {
                rope_type: "llama3",
                factor: 8,
                low_freq_factor: 1,
                high_freq_factor: 4,
                original_max_position_embeddings: 8192
            }
        }
    },
    {
        N: 5,
        H: 3,
        D: 128,
        rope: "yarn (scaling != 1)",
        pos: [0, 3, 4095, 8191, 7],
        config: {
            max_position_embeddings: 8192,
            rope_scaling: {rope_type: "yarn", factor: 4, original_max_position_embeddings: 2048}
        }
    },
    {
        // Phi-3 / Phi-4-mini: partial rotary (the first 32 of 64 dimensions) with longrope's attention scaling
        N: 6,
        H: 3,
        D: 64,
        rope: "phi3 partial rotary 0.5, longrope",
        pos: [0, 1, 9, 30, 200, 511],
        config: {
            model_type: "phi3",
            partial_rotary_factor: 0.5,
            max_position_embeddings: 2048,
            original_max_position_embeddings: 512,
            rope_scaling: {
                type: "longrope",
                short_factor: Array.from({length: 16}, (_, i) => 1 + i / 8),
                long_factor: Array.from({length: 16}, (_, i) => 2 + i / 4)
            }
        }
    }
];

function ropeFrequencies(s: RopeShape): {invFreq: Float32Array; scaling: number; R: number} {
    const cfg = parseModelConfig(
        {
            model_type: "llama",
            vocab_size: 32,
            hidden_size: s.H * s.D,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: s.H,
            num_key_value_heads: 1,
            head_dim: s.D,
            ...s.config
        },
        "config.json"
    );
    const {invFreq, attentionScaling} = computeRopeInvFreq(cfg);
    const R = cfg.rotaryDim;
    if (invFreq.length !== R / 2) throw new Error(`rope case: ${invFreq.length} frequencies for ${R} rotary dimensions`);
    return {invFreq, scaling: Math.fround(attentionScaling), R};
}

for (const s of ROPE_SHAPES) {
    const {N, H, D, pos} = s;
    const shape = `N=${N} H=${H} D=${D} ${s.rope}`;
    const tol = {float32: 2e-6, bfloat16: BF16_OUT};
    OP_CASES.push({
        op: "rope",
        shape,
        run(r) {
            const {invFreq, scaling, R} = ropeFrequencies(s);
            const x = r.randn(N * H * D);
            r.be.rope(x.t, r.indices(pos), r.uploadStats(invFreq), scaling, N, H, D, R); // in place
            r.close("x (in place)", r.get(x.t), refRope(x.v, ropeAngles(pos, invFreq), scaling, N, H, D, false, R), tol);
        }
    });
    OP_CASES.push({
        op: "ropeBackward",
        shape,
        run(r) {
            const {invFreq, scaling, R} = ropeFrequencies(s);
            const angles = ropeAngles(pos, invFreq);
            const g = r.randn(N * H * D);
            r.be.ropeBackward(g.t, r.indices(pos), r.uploadStats(invFreq), scaling, N, H, D, R);
            const got = r.get(g.t);
            r.close("dx (in place) vs analytic R^T dy", got, refRope(g.v, angles, scaling, N, H, D, true, R), tol);
            const x64 = f64(randn32(r.rng, N * H * D)),
                idx = sample(r.rng, N * H * D, 64);
            const fd = fdGrad(() => refRope(x64, angles, scaling, N, H, D, false, R), x64, g.v, idx);
            r.close("dx vs FD", pick(got, idx), fd, tol);
        }
    });
}

// ---- attention (the CUDA kernels take head dims 64, 96 and 128)

interface AttnShape {
    name: string;
    B: number;
    T: number;
    S: number;
    Hq: number;
    Hkv: number;
    D: number;
    past: number;
    keyValid?: number[][]; // [B][S]
    /** [B][S]: packed-sequence index */
    seg?: number[][];
    /** some query sees no key: its out row must be 0 and its lse -inf */
    expectMasked?: boolean;
    fd: number;
    /** the bf16 tolerance of the backward's gradients, where not 3e-2 */
    bf16GradTol?: number;
    /** a sliding window (keys past + t - window < j only) */
    window?: number;
}

const ATTN_SHAPES: AttnShape[] = [
    {name: "one token", B: 1, T: 1, S: 1, Hq: 1, Hkv: 1, D: 64, past: 0, fd: 16},
    {name: "causal gqa 2", B: 2, T: 3, S: 3, Hq: 2, Hkv: 1, D: 64, past: 0, fd: 24},
    {name: "causal gqa 4", B: 1, T: 17, S: 17, Hq: 4, Hkv: 1, D: 128, past: 0, fd: 16},
    {name: "causal mha", B: 2, T: 17, S: 17, Hq: 2, Hkv: 2, D: 64, past: 0, fd: 16},
    {
        name: "key padding",
        B: 3,
        T: 9,
        S: 9,
        Hq: 4,
        Hkv: 2,
        D: 64,
        past: 0,
        fd: 24,
        expectMasked: true,
        keyValid: [
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 1, 1, 1, 1], // left padding: queries 0..2 see no key
            [1, 1, 1, 1, 1, 1, 1, 0, 0] // right padding
        ]
    },
    {
        name: "packed seg",
        B: 2,
        T: 10,
        S: 10,
        Hq: 2,
        Hkv: 1,
        D: 128,
        past: 0,
        fd: 24,
        // segments of 3 to 5 tokens: dS = P (dP - D) cancels over so few keys that D_i = rowsum(dO * O) from the bf16
        // O decides the worst element (H100: maxRel 5.2e-2; test/gpu/attention.test.ts's 256-token packed case is
        // within relL2 2.6e-3 of the fp32 kernel)
        bf16GradTol: 6e-2,
        expectMasked: true,
        seg: [
            [0, 0, 0, 1, 1, 1, 1, 2, 2, 2],
            [5, 5, 5, 5, 5, 7, 7, 7, 7, 7]
        ],
        keyValid: [
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]
        ]
    }, // query 5 of b=1 sees nothing
    {
        name: "kv-cache past=8",
        B: 2,
        T: 3,
        S: 11,
        Hq: 4,
        Hkv: 2,
        D: 64,
        past: 8,
        fd: 0,
        keyValid: [
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        ]
    },
    {name: "decode T=1 past=12", B: 2, T: 1, S: 13, Hq: 4, Hkv: 4, D: 128, past: 12, fd: 0},
    // at most 5 keys a query: dS = P (dP - D_i) cancels as in "packed seg", so D_i from the bf16 out decides the
    // worst dq element (H100: maxRel 4.5e-2; emulating the kernel's bf16 out and dS in numpy gives 2e-2..5e-2 over
    // 20 seeds, and a window one key wider in dq alone gives > 50)
    {name: "window 5 gqa", B: 2, T: 40, S: 40, Hq: 4, Hkv: 2, D: 64, past: 0, fd: 16, window: 5, bf16GradTol: 6e-2},
    // windows across the CUDA kernels' 64-key tiles: whole tiles before the window are skipped
    {name: "window 70 over tiles", B: 1, T: 150, S: 150, Hq: 2, Hkv: 1, D: 128, past: 0, fd: 8, window: 70},
    {name: "window 64 = one tile", B: 1, T: 130, S: 130, Hq: 2, Hkv: 2, D: 64, past: 0, fd: 8, window: 64},
    {
        name: "window + padding",
        B: 2,
        T: 9,
        S: 9,
        Hq: 2,
        Hkv: 1,
        D: 64,
        past: 0,
        fd: 16,
        window: 3,
        expectMasked: true,
        keyValid: [
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0, 1, 1, 1] // query 5 of b=1 sees keys 3..5 only: all hidden
        ]
    },
    {name: "window kv-cache past=70", B: 2, T: 3, S: 73, Hq: 4, Hkv: 2, D: 64, past: 70, fd: 0, window: 20},
    {name: "window decode past=140", B: 2, T: 1, S: 141, Hq: 4, Hkv: 1, D: 128, past: 140, fd: 0, window: 65},
    // a cache filled up to past + T = 9 of its 12 positions: keys past the queries are hidden by causality
    {name: "cache chunk past=5", B: 1, T: 4, S: 12, Hq: 4, Hkv: 2, D: 64, past: 5, fd: 0}
];

interface AttnInputs<X extends TensorTypes> {
    a: AttnProblem;
    q: Held<X["f"]>;
    k: Held<X["f"]>;
    v: Held<X["f"]>;
    kv: X["u8"] | null;
    seg: X["i"] | null;
}

function attnInputs<X extends TensorTypes>(r: CaseRun<X>, s: AttnShape): AttnInputs<X> {
    const {B, T, S, Hq, Hkv, D} = s;
    const a: AttnProblem = {
        B,
        T,
        S,
        Hq,
        Hkv,
        D,
        qOffset: s.past,
        keyValid: s.keyValid?.flat() ?? null,
        seg: s.seg?.flat() ?? null,
        scale: Math.fround(1 / Math.sqrt(D)),
        window: s.window ?? 0
    };
    return {
        a,
        q: r.randn(B * T * Hq * D, 1.5),
        k: r.randn(B * S * Hkv * D, 1.5),
        v: r.randn(B * S * Hkv * D),
        kv: a.keyValid ? r.mask(a.keyValid) : null,
        seg: a.seg ? r.indices(a.seg) : null
    };
}

const attnTag = (s: AttnShape) =>
    `${s.name} B=${s.B} T=${s.T} S=${s.S} Hq=${s.Hq} Hkv=${s.Hkv} D=${s.D} past=${s.past}` +
    (s.window ? ` window=${s.window}` : "");

for (const s of ATTN_SHAPES) {
    OP_CASES.push({
        op: "attention",
        shape: attnTag(s),
        run(r) {
            const {B, T, S, Hq, Hkv, D, past} = s;
            const {a, q, k, v, kv, seg} = attnInputs(r, s);
            const ref = refAttention(a, q.v, k.v, v.v);
            const out = r.out(B * T * Hq * D),
                lse = r.stats(B * Hq * T);
            r.be.attention(out, lse, q.t, k.t, v.t, kv, seg, B, T, S, Hq, Hkv, D, past, a.scale, null, a.window);
            const got = r.get(out),
                lseGot = r.get(lse);
            r.close("out", got, ref.out, {float32: 1e-5, bfloat16: BF16_OUT});
            r.close("lse", lseGot, ref.lse, {float32: 2e-6, bfloat16: 2e-3});
            if (s.expectMasked) {
                const masked = [...ref.lse.keys()].filter((i) => ref.lse[i] === -Infinity);
                let zeros = masked.length > 0;
                for (const i of masked) {
                    const b = Math.floor(i / (Hq * T)),
                        h = Math.floor(i / T) % Hq,
                        t = i % T;
                    const o = ((b * T + t) * Hq + h) * D;
                    for (let d = 0; d < D; d++) if (got[o + d] !== 0) zeros = false;
                    if (lseGot[i] !== -Infinity) zeros = false;
                }
                r.that(`${masked.length} fully masked queries: out 0, lse -inf`, zeros);
            }
            const out2 = r.out(B * T * Hq * D);
            r.be.attention(out2, null, q.t, k.t, v.t, kv, seg, B, T, S, Hq, Hkv, D, past, a.scale, null, a.window);
            // T = 1 without lse is CUDA's split-KV decode kernel, whose chunks and warps keep maxima of their own, so
            // P rounds to bf16 otherwise than in the forward kernel once the keys span several warps (H100, S = 141:
            // 238 of 1,024 outputs a few bf16 ulps apart): there the reference's tolerance, elsewhere the same numbers
            if (T === 1) r.close("lse=null: out", r.get(out2), ref.out, {float32: 1e-5, bfloat16: BF16_OUT});
            else r.exact("lse=null: same out", r.get(out2), got);
        }
    });
    // the backward trains on whole sequences: no cache
    if (s.past !== 0) continue;
    OP_CASES.push({
        op: "attentionBackward",
        shape: attnTag(s),
        run(r) {
            const {B, T, S, Hq, Hkv, D} = s;
            const {a, q, k, v, kv, seg} = attnInputs(r, s);
            const out = r.out(B * T * Hq * D),
                lse = r.stats(B * Hq * T);
            r.be.attention(out, lse, q.t, k.t, v.t, kv, seg, B, T, S, Hq, Hkv, D, 0, a.scale, null, a.window);
            const g = r.randn(B * T * Hq * D);
            const dq = r.out(B * T * Hq * D),
                dk = r.out(B * S * Hkv * D),
                dv = r.out(B * S * Hkv * D);
            r.be.attentionBackward(dq, dk, dv, g.t, q.t, k.t, v.t, out, lse, kv, seg, B, T, Hq, Hkv, D, a.scale, a.window);
            const an = refAttentionBackward(a, q.v, k.v, v.v, g.v);
            const tol = {float32: 2e-5, bfloat16: s.bf16GradTol ?? 3e-2};
            // dq and dk are exactly 0 where a query sees a single key (one token: the whole tensor), and rounding
            // noise on the GPU (D_i is taken from the bf16 out); gradients of this problem are ~0.1..1, so noise
            // is judged against 1e-4 at least
            const minFloor = 1e-4;
            const q64 = f64(q.v),
                k64 = f64(k.v),
                v64 = f64(v.v);
            for (const [name, x, got, ref] of [
                ["dq", q64, dq, an.dq],
                ["dk", k64, dk, an.dk],
                ["dv", v64, dv, an.dv]
            ] as const) {
                const d = r.get(got);
                r.close(`${name} (=) vs analytic`, d, ref, tol, undefined, minFloor);
                const idx = sample(r.rng, x.length, s.fd);
                r.close(
                    `${name} vs FD`,
                    pick(d, idx),
                    fdGrad(() => refAttention(a, q64, k64, v64).out, x, g.v, idx),
                    tol,
                    rms(ref),
                    minFloor
                );
            }
        }
    });
}

// ---- the gated MLP's activation: SwiGLU's silu and Gemma's gelu_tanh (tanh saturates both ways at the edges too)

const GATE_EDGES = [0, -0, 1e-30, -1e-30, 20, -20, 88, -88, 89, -89, 100, -100, -200];

function gateInputs<X extends TensorTypes>(r: CaseRun<X>, n: number): {gate: Held<X["f"]>; up: Held<X["f"]>} {
    const gate = randn32(r.rng, n, 4);
    GATE_EDGES.forEach((e, i) => {
        if (i < n) gate[i] = e;
    });
    return {gate: r.upload(gate), up: r.randn(n)};
}

for (const act of GATED_ACTS)
    for (const n of [1, 3, 9, 17, 100003]) {
        OP_CASES.push({
            op: "gatedAct",
            shape: `${act} n=${n}`,
            run(r) {
                const {gate, up} = gateInputs(r, n);
                const out = r.out(n);
                r.be.gatedAct(out, gate.t, up.t, n, act);
                r.close("out", r.get(out), refGatedAct(act, gate.v, up.v), {float32: 2e-6, bfloat16: BF16_OUT});
            }
        });
        OP_CASES.push({
            op: "gatedActBackward",
            shape: `${act} n=${n}`,
            run(r) {
                const {gate, up} = gateInputs(r, n);
                const dout = r.randn(n);
                const dgate = r.out(n),
                    dup = r.out(n);
                r.be.gatedActBackward(dgate, dup, dout.t, gate.t, up.t, n, act);
                const ref = refGatedActBackward(act, dout.v, gate.v, up.v);
                // gelu_tanh: where fp32 tanh is within an ulp of -1 (gate near -5), 1 + tanh in its derivative keeps
                // no correct digit (torch's fp32 formula does the same): up to ~5e-6 of rms(dgate) on these inputs
                const tol = {float32: act === "gelu_tanh" ? 1e-5 : 4e-6, bfloat16: BF16_OUT};
                const dg = r.get(dgate),
                    du = r.get(dup);
                r.close("dgate (=) vs analytic", dg, ref.dgate, tol);
                r.close("dup (=) vs analytic", du, ref.dup, tol);
                // FD at the edge values and a sample of the rest
                const idx = [...new Set([...sample(r.rng, n, 48), ...GATE_EDGES.keys()].filter((i) => i < n))];
                // out[i] depends on gate[i] and up[i] only: the forward of the sampled elements alone gives the same FD
                const g64 = pick(gate.v, idx),
                    u64 = pick(up.v, idx),
                    d64 = pick(dout.v, idx),
                    local = [...idx.keys()];
                const forward = () => refGatedAct(act, g64, u64);
                r.close("dgate vs FD", pick(dg, idx), fdGrad(forward, g64, d64, local), tol);
                r.close("dup vs FD", pick(du, idx), fdGrad(forward, u64, d64, local), tol);
            }
        });
    }

// ---- scale (Gemma's embedding scale)

for (const n of [1, 9, 100003]) {
    OP_CASES.push({
        op: "scale",
        shape: `n=${n}`,
        run(r) {
            const x = r.randn(n);
            const s = 33.9411;
            r.be.scale(x.t, s, n);
            r.close(
                "x * s (in place)",
                r.get(x.t),
                Float64Array.from(x.v, (v) => v * s),
                {float32: 1e-7, bfloat16: BF16_OUT}
            );
        }
    });
}

// ---- residual add, KV-cache write

for (const n of [1, 7, 17, 100003]) {
    OP_CASES.push({
        op: "addInplace",
        shape: `n=${n}`,
        run(r) {
            const y = r.randn(n),
                x = r.randn(n);
            r.be.addInplace(y.t, x.t, n);
            // one fp32 rounding of the exact sum, then the backend's storage rounding (bf16 on CUDA)
            r.exact("y += x", r.get(y.t), f64(r.io.round(Float32Array.from(y.v, (v, i) => v + x.v[i]))));
        }
    });
}

// rows of a KV cache at their own lengths (continuous batching; a recorded decoding step): each row's queries sit
// at its own offset, given per row on the backend; the reference is each row alone at its offset
for (const [T, S, Hq, Hkv, D, pasts, window = 0] of [
    [1, 70, 4, 2, 64, [0, 37, 69]],
    [1, 130, 2, 1, 128, [64, 5, 127, 63]],
    [3, 40, 2, 2, 64, [0, 20, 37]],
    [1, 9, 2, 1, 64, [4, 4]],
    // a sliding window: each row's first visible key is its own
    [1, 200, 4, 2, 64, [199, 5, 64, 130], 70],
    [2, 140, 2, 1, 128, [100, 0, 138], 3]
] as [number, number, number, number, number, number[], number?][]) {
    const B = pasts.length;
    OP_CASES.push({
        op: "attention",
        shape:
            `per-row offsets B=${B} T=${T} S=${S} Hq=${Hq} Hkv=${Hkv} D=${D} pasts=${pasts}` +
            (window ? ` window=${window}` : ""),
        run(r) {
            const scale = Math.fround(1 / Math.sqrt(D));
            const q = r.randn(B * T * Hq * D, 1.5),
                k = r.randn(B * S * Hkv * D, 1.5),
                v = r.randn(B * S * Hkv * D);
            const out = r.out(B * T * Hq * D),
                lse = r.stats(B * Hq * T);
            r.be.attention(out, lse, q.t, k.t, v.t, null, null, B, T, S, Hq, Hkv, D, r.indices(pasts), scale, null, window);
            const refOut = new Float64Array(B * T * Hq * D),
                refLse = new Float64Array(B * Hq * T);
            for (let b = 0; b < B; b++) {
                const row = (x: Float64Array, n: number) => x.subarray(b * n, (b + 1) * n);
                const one = refAttention(
                    {B: 1, T, S, Hq, Hkv, D, qOffset: pasts[b], keyValid: null, seg: null, scale, window},
                    row(q.v, T * Hq * D),
                    row(k.v, S * Hkv * D),
                    row(v.v, S * Hkv * D)
                );
                refOut.set(one.out, b * T * Hq * D);
                refLse.set(one.lse, b * Hq * T);
            }
            r.close("out", r.get(out), refOut, {float32: 1e-5, bfloat16: BF16_OUT});
            r.close("lse", r.get(lse), refLse, {float32: 2e-6, bfloat16: 2e-3});
        }
    });
}

// a paged KV cache (graph.ts KVCache): rows' positions live in blocks of a shared pool named by a block table;
// the block size is the CUDA kernel's key tile (64). Keys are written through the table, and attention reads each
// row's blocks in table order: the reference is each row alone over its positions gathered from the pool
for (const [T, Hq, Hkv, D, pasts, tables, windowArg] of [
    [1, 4, 2, 64, [0, 70, 130], [[5], [0, 3], [1, 4, 2]]],
    [
        3,
        2,
        1,
        128,
        [10, 61],
        [
            [2, -1, -1],
            [0, 1, -1]
        ]
    ],
    [
        1,
        2,
        2,
        64,
        [63, 64],
        [
            [3, -1],
            [1, 2]
        ]
    ],
    // a sliding window of 60: a row's blocks wholly behind it are freed (-1) and never read
    [
        1,
        4,
        2,
        64,
        [130, 70, 10],
        [
            [-1, 0, 2],
            [3, 1, -1],
            [4, -1, -1]
        ],
        60
    ],
    [
        2,
        2,
        1,
        128,
        [200, 127],
        [
            [-1, -1, 0, 1],
            [-1, 2, 3, -1]
        ],
        64
    ]
] as [number, number, number, number, number[], number[][], number?][]) {
    const window = windowArg ?? 0;
    const B = pasts.length,
        block = 64,
        stride = Math.max(...tables.map((t) => t.length));
    const blocks = 1 + Math.max(...tables.flat());
    const S = stride * block;
    const table = tables.flatMap((t) => [...t, ...new Array(stride - t.length).fill(-1)]);
    const shape =
        `paged B=${B} T=${T} Hq=${Hq} Hkv=${Hkv} D=${D} pasts=${pasts} tables=${JSON.stringify(tables)}` +
        (window ? ` window=${window}` : "");
    // the pool row of row b's position j
    const at = (b: number, j: number) => table[b * stride + Math.floor(j / block)] * block + (j % block);
    OP_CASES.push({
        op: "cacheWrite",
        shape,
        run(r) {
            const rowElems = Hkv * D;
            const cache = r.randn(blocks * block * rowElems),
                x = r.randn(B * T * rowElems);
            r.be.cacheWrite(cache.t, x.t, B, T, S, r.indices(pasts), rowElems, {table: r.indices(table), stride, block});
            const want = f64(cache.v);
            for (let b = 0; b < B; b++)
                for (let t = 0; t < T; t++)
                    want.set(x.v.subarray((b * T + t) * rowElems, (b * T + t + 1) * rowElems), at(b, pasts[b] + t) * rowElems);
            r.exact("each new position in its block, the rest of the pool untouched", r.get(cache.t), want);
        }
    });
    OP_CASES.push({
        op: "attention",
        shape,
        run(r) {
            const scale = Math.fround(1 / Math.sqrt(D));
            const kvRow = Hkv * D;
            const q = r.randn(B * T * Hq * D, 1.5),
                k = r.randn(blocks * block * kvRow, 1.5),
                v = r.randn(blocks * block * kvRow);
            const out = r.out(B * T * Hq * D),
                lse = r.stats(B * Hq * T);
            r.be.attention(
                out,
                lse,
                q.t,
                k.t,
                v.t,
                null,
                null,
                B,
                T,
                S,
                Hq,
                Hkv,
                D,
                r.indices(pasts),
                scale,
                {table: r.indices(table), stride, block},
                window
            );
            const refOut = new Float64Array(B * T * Hq * D),
                refLse = new Float64Array(B * Hq * T);
            for (let b = 0; b < B; b++) {
                const n = pasts[b] + T;
                // positions in freed blocks (behind the window) are NaN: reading one would show
                const gather = (pool: Float64Array) => {
                    const g = new Float64Array(n * kvRow).fill(Number.NaN);
                    for (let j = 0; j < n; j++)
                        if (at(b, j) >= 0) g.set(pool.subarray(at(b, j) * kvRow, (at(b, j) + 1) * kvRow), j * kvRow);
                    return g;
                };
                const one = refAttention(
                    {B: 1, T, S: n, Hq, Hkv, D, qOffset: pasts[b], keyValid: null, seg: null, scale, window},
                    q.v.subarray(b * T * Hq * D, (b + 1) * T * Hq * D),
                    gather(k.v),
                    gather(v.v)
                );
                refOut.set(one.out, b * T * Hq * D);
                refLse.set(one.lse, b * Hq * T);
            }
            r.close("out", r.get(out), refOut, {float32: 1e-5, bfloat16: BF16_OUT});
            r.close("lse", r.get(lse), refLse, {float32: 2e-6, bfloat16: 2e-3});
        }
    });
}

for (const [T, capacity, rowElems, pasts] of [
    [1, 5, 8, [0]],
    [3, 11, 24, [8, 0]],
    [3, 7, 128, [2, 4]],
    [1, 20, 40, [3, 19, 0]],
    [17, 20, 40, [3, 0, 1]]
] as [number, number, number, number[]][]) {
    const B = pasts.length;
    OP_CASES.push({
        op: "cacheWrite",
        shape: `B=${B} T=${T} capacity=${capacity} pasts=${pasts} row=${rowElems}`,
        run(r) {
            const cache = r.randn(B * capacity * rowElems),
                x = r.randn(B * T * rowElems);
            r.be.cacheWrite(cache.t, x.t, B, T, capacity, r.indices(pasts), rowElems);
            const want = f64(cache.v);
            for (let b = 0; b < B; b++)
                want.set(x.v.subarray(b * T * rowElems, (b + 1) * T * rowElems), (b * capacity + pasts[b]) * rowElems);
            r.exact("each row's [past, past + T) written, the rest untouched", r.get(cache.t), want);
        }
    });
}

// a view shares its parent's memory: the cache rows of a batch that starts at a later row are written through one
OP_CASES.push({
    op: "view",
    shape: "rows 2..3 of a 4-row cache",
    run(r) {
        const capacity = 6,
            rowElems = 16,
            T = 2;
        const cache = r.randn(4 * capacity * rowElems),
            x = r.randn(2 * T * rowElems);
        const rows = r.be.view(cache.t, 2 * capacity * rowElems, 2 * capacity * rowElems);
        r.be.cacheWrite(rows, x.t, 2, T, capacity, r.indices([1, 3]), rowElems);
        const want = f64(cache.v);
        want.set(x.v.subarray(0, T * rowElems), (2 * capacity + 1) * rowElems);
        want.set(x.v.subarray(T * rowElems), (3 * capacity + 3) * rowElems);
        r.exact("the parent holds what was written through the view", r.get(cache.t), want);
    }
});

// ---- the fused RoPE + KV cache write of a decoding step: q and k rotated in place as rope does them, the rotated
// k and the v rows at each row's pasts[b] + t of a contiguous or paged cache, with cacheWrite's skipping rules

interface RopeCacheShape {
    T: number;
    Hq: number;
    Hkv: number;
    D: number;
    /** [B] each row's filled positions */
    pasts: number[];
    /** [B*T] the RoPE positions (default pasts[b] + t) */
    pos?: number[];
    capacity: number;
    /** a paged cache: blocks of `block` positions, tables[b] row b's block ids (-1: none reserved) */
    paged?: {block: number; tables: number[][]};
    config: Record<string, unknown>;
    rope: string;
}

const ROPE_CACHE_SHAPES: RopeCacheShape[] = [
    // one decoding token, head dim 64
    {T: 1, Hq: 2, Hkv: 1, D: 64, pasts: [5], capacity: 8, config: {}, rope: "default"},
    // odd sizes (half = 5: no 16-byte path), positions apart from the cache slots, row 0's last token past capacity
    // (where a write would land on row 1's position 0, which row 1 leaves alone)
    {
        T: 3,
        Hq: 3,
        Hkv: 1,
        D: 10,
        pasts: [5, 3, 0],
        pos: [7, 0, 100, 3, 4, 5, 4095, 1, 9],
        capacity: 7,
        config: {rope_theta: 1000000},
        rope: "theta=1e6"
    },
    // a paged cache with a shuffled table: row 0 crosses a block boundary, row 1's second token has no block
    // reserved, row 2's second token is past capacity; attention scaling != 1
    {
        T: 2,
        Hq: 4,
        Hkv: 2,
        D: 128,
        pasts: [3, 7, 11],
        capacity: 12,
        paged: {
            block: 4,
            tables: [
                [5, 0, 7],
                [2, 6, -1],
                [1, 3, 4]
            ]
        },
        config: {
            max_position_embeddings: 8192,
            rope_scaling: {rope_type: "yarn", factor: 4, original_max_position_embeddings: 2048}
        },
        rope: "yarn (scaling != 1)"
    },
    // Qwen2-7B's heads decoding two rows of different lengths in 64-position blocks
    {
        T: 1,
        Hq: 28,
        Hkv: 4,
        D: 128,
        pasts: [0, 130],
        capacity: 192,
        paged: {
            block: 64,
            tables: [
                [4, -1, -1],
                [0, 5, 2]
            ]
        },
        config: {rope_theta: 1000000},
        rope: "theta=1e6"
    },
    // Phi-4-mini's partial rotary (3/4 of each head) with longrope's attention scaling, two rows decoding
    {
        T: 1,
        Hq: 4,
        Hkv: 2,
        D: 128,
        pasts: [3, 70],
        capacity: 128,
        paged: {
            block: 64,
            tables: [
                [3, -1],
                [0, 1]
            ]
        },
        config: {
            model_type: "phi3",
            partial_rotary_factor: 0.75,
            max_position_embeddings: 8192,
            original_max_position_embeddings: 1024,
            rope_scaling: {
                type: "longrope",
                short_factor: Array.from({length: 48}, (_, i) => 1 + i / 32),
                long_factor: Array.from({length: 48}, (_, i) => 1 + i / 4)
            }
        },
        rope: "phi3 partial rotary 0.75, longrope"
    }
];

for (const s of ROPE_CACHE_SHAPES) {
    const {T, Hq, Hkv, D, pasts, capacity, paged} = s;
    const B = pasts.length,
        N = B * T,
        rowElems = Hkv * D;
    const pos = s.pos ?? pasts.flatMap((p) => Array.from({length: T}, (_, t) => p + t));
    const stride = paged ? paged.tables[0].length : 0;
    const table = paged?.tables.flat() ?? [];
    const cacheRows = paged ? (1 + Math.max(...table)) * paged.block : B * capacity;
    // the cache row of row b's position j (cacheWrite's rules), -1: skipped
    const rowOf = (b: number, j: number): number => {
        if (j < 0 || j >= capacity) return -1;
        if (!paged) return b * capacity + j;
        const blk = table[b * stride + Math.floor(j / paged.block)];
        return blk < 0 ? -1 : blk * paged.block + (j % paged.block);
    };
    let skipped = 0;
    for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) if (rowOf(b, pasts[b] + t) < 0) skipped++;
    const layout = paged ? `paged block=${paged.block} tables=${JSON.stringify(paged.tables)}` : `capacity=${capacity}`;
    OP_CASES.push({
        op: "ropeCacheWrite",
        shape: `B=${B} T=${T} Hq=${Hq} Hkv=${Hkv} D=${D} pasts=${pasts} ${layout} ${s.rope} (${skipped} skipped)`,
        run(r) {
            const {invFreq, scaling, R} = ropeFrequencies({N, H: Hq, D, config: s.config, rope: s.rope, pos});
            const angles = ropeAngles(pos, invFreq);
            const q = r.randn(N * Hq * D),
                k = r.randn(N * rowElems),
                v = r.randn(N * rowElems);
            const cacheK = r.randn(cacheRows * rowElems),
                cacheV = r.randn(cacheRows * rowElems);
            const blocks = paged ? {table: r.indices(table), stride, block: paged.block} : null;
            r.be.ropeCacheWrite(
                q.t,
                k.t,
                v.t,
                r.indices(pos),
                r.uploadStats(invFreq),
                scaling,
                B,
                T,
                Hq,
                Hkv,
                D,
                cacheK.t,
                cacheV.t,
                capacity,
                r.indices(pasts),
                blocks,
                R
            );
            const tol = {float32: 2e-6, bfloat16: BF16_OUT};
            const kRotated = r.get(k.t);
            r.close("q (in place) = rope(q)", r.get(q.t), refRope(q.v, angles, scaling, N, Hq, D, false, R), tol);
            r.close("k (in place) = rope(k)", kRotated, refRope(k.v, angles, scaling, N, Hkv, D, false, R), tol);
            // the cache holds exactly what cacheWrite of the rotated k and of v would have written
            const wantK = f64(cacheK.v),
                wantV = f64(cacheV.v);
            for (let b = 0; b < B; b++)
                for (let t = 0; t < T; t++) {
                    const at = rowOf(b, pasts[b] + t);
                    if (at < 0) continue;
                    const n = b * T + t;
                    wantK.set(kRotated.subarray(n * rowElems, (n + 1) * rowElems), at * rowElems);
                    wantV.set(v.v.subarray(n * rowElems, (n + 1) * rowElems), at * rowElems);
                }
            r.exact("cacheK: the rotated k rows at their positions, the rest untouched", r.get(cacheK.t), wantK);
            r.exact("cacheV: the v rows at their positions, the rest untouched", r.get(cacheV.t), wantV);
            r.exact("v unchanged", r.get(v.t), v.v);
        }
    });
}

// ---- copyColumns: phi3's fused qkv_proj / gate_up_proj outputs split into parts and their gradients joined

for (const [M, parts] of [
    [5, [4, 2, 2]],
    [3, [7, 1]],
    [17, [256, 64, 64]]
] as const) {
    const W = parts.reduce((a, b) => a + b, 0);
    OP_CASES.push({
        op: "copyColumns",
        shape: `M=${M} parts=${parts.join("+")} split then join`,
        run(r) {
            const fused = r.randn(M * W);
            const pieces = parts.map((n) => r.randn(M * n));
            let offset = 0;
            for (const [i, n] of parts.entries()) {
                r.be.copyColumns(pieces[i].t, n, 0, fused.t, W, offset, M, n);
                const want = new Float64Array(M * n);
                for (let m = 0; m < M; m++) for (let j = 0; j < n; j++) want[m * n + j] = fused.v[m * W + offset + j];
                r.exact(`part ${i}: columns ${offset}..${offset + n - 1} of each row`, r.get(pieces[i].t), want);
                offset += n;
            }
            // joined back (in reverse order, into a buffer of other values): the fused rows again
            const joined = r.randn(M * W);
            offset = W;
            for (let i = parts.length - 1; i >= 0; i--) {
                offset -= parts[i];
                r.be.copyColumns(joined.t, W, offset, pieces[i].t, parts[i], 0, M, parts[i]);
            }
            r.exact("joined = fused", r.get(joined.t), f64(fused.v));
        }
    });
}

// ---- storage: zeros, and the host round trip of offloaded gradient checkpointing

for (const n of [1, 17, 4099]) {
    OP_CASES.push({
        op: "zeros",
        shape: `n=${n}`,
        run(r) {
            r.exact("all 0", r.get(r.own(r.be.zeros(n))), new Float64Array(n));
            r.that("activation(n) holds n values", r.get(r.own(r.be.activation(n))).length === n);
            r.that("stats(n) holds n values", r.get(r.own(r.be.stats(n))).length === n);
        }
    });
    OP_CASES.push({
        op: "offload",
        shape: `n=${n} then restore`,
        run(r) {
            const x = r.randn(n);
            const host = r.be.offload(x.t);
            r.exact("restore(offload(x)) = x", r.get(r.own(r.be.restore(host))), x.v);
        }
    });
    OP_CASES.push({
        op: "offload",
        shape: `3 x n=${n}, freed and overwritten, prefetched one ahead`,
        run(r) {
            // as the graph does: free (its memory reused at once by the allocator) right after the offload, then
            // bring them back in reverse order, each prefetched while the one after it is in use
            const xs = [r.randn(n), r.randn(n), r.randn(n)];
            const other = r.randn(n);
            const hosts = xs.map((x) => {
                const h = r.be.offload(x.t);
                r.be.free(x.t);
                const reuse = r.be.activation(n); // likely the block just freed: written after the copy only
                r.be.gatedAct(reuse, other.t, other.t, n, "silu");
                r.be.free(reuse);
                return h;
            });
            let next = r.be.prefetch(hosts[2]);
            for (let i = 2; i >= 0; i--) {
                const t = r.own(r.be.restore(next));
                if (i > 0) next = r.be.prefetch(hosts[i - 1]);
                r.exact(`input ${i} back`, r.get(t), xs[i].v);
            }
        }
    });
}

// ---- the loss and the logits

interface LossShape {
    N: number;
    C: number;
    V: number;
    targets: number[];
    /** null: the backend's lossChunkRows */
    chunkRows: number | null;
    dHead?: boolean;
    /** Gemma's final_logit_softcapping */
    softcap?: number;
}

const LOSS_SHAPES: LossShape[] = [
    {N: 1, C: 8, V: 11, targets: [3], chunkRows: null},
    {N: 3, C: 24, V: 50, targets: [-100, 7, 49], chunkRows: 1},
    {N: 17, C: 40, V: 37, targets: [5, -100, 0, 36, 12, 12, -1, 30, 2, -100, -100, 7, 8, 9, 33, 1, -100], chunkRows: 4},
    {N: 5, C: 8, V: 11, targets: [-100, -100, -1, -100, -100], chunkRows: 2},
    {
        N: 17,
        C: 40,
        V: 37,
        targets: [5, -100, 0, 36, 12, 12, -1, 30, 2, -100, -100, 7, 8, 9, 33, 1, -100],
        chunkRows: 5,
        dHead: true
    },
    // soft-capped logits (|logits| up to ~10 here, so a cap of 3 saturates some)
    {N: 3, C: 24, V: 50, targets: [-100, 7, 49], chunkRows: 1, softcap: 3},
    {
        N: 17,
        C: 40,
        V: 37,
        targets: [5, -100, 0, 36, 12, 12, -1, 30, 2, -100, -100, 7, 8, 9, 33, 1, -100],
        chunkRows: 4,
        dHead: true,
        softcap: 5
    }
];

for (const s of LOSS_SHAPES) {
    const {N, C, V, targets} = s;
    OP_CASES.push({
        op: "causalLmLoss",
        shape:
            `N=${N} C=${C} V=${V} chunkRows=${s.chunkRows ?? "default"}${s.dHead ? " dHead" : ""}` +
            `${s.softcap ? ` softcap=${s.softcap}` : ""}` +
            ` (${targets.filter((t) => t < 0).length} ignored)`,
        run(r) {
            const xf = r.randn(N * C),
                head = r.randn(V * C, 0.5);
            const tg = Int32Array.from(targets);
            const count = targets.filter((t) => t >= 0).length;
            const lossScale = Math.fround(1 / Math.max(count, 1));
            const chunkRows = s.chunkRows ?? r.be.lossChunkRows;
            const cap = s.softcap ?? 0;
            const ref = refCausalLmLoss(xf.v, tg, head.v, N, C, V, lossScale, cap);
            const preHead = randn32(r.rng, V * C); // dHead accumulates (+=)
            const dHead = s.dHead ? r.param(preHead) : null; // an fp32 tensor (the trained lm_head's gradient)
            const dxf = r.out(N * C);
            const res = r.be.causalLmLoss(xf.t, tg, head.t, N, C, V, lossScale, dxf, chunkRows, dHead?.t ?? null, cap);
            r.that(`targets = ${ref.targets}`, res.targets === ref.targets, `got ${res.targets}`);
            if (count === 0) r.that("lossSum = 0", res.lossSum === 0, `got ${res.lossSum}`);
            else r.close("lossSum", [res.lossSum], [ref.lossSum], {float32: 1e-5, bfloat16: BF16_OUT});
            const got = r.get(dxf);
            const tol = {float32: 1e-5, bfloat16: 3e-2};
            const ignoredRows = [...targets.keys()].filter((n) => targets[n] < 0);
            r.that(
                "dxf rows without a target are 0",
                ignoredRows.every((n) => got.subarray(n * C, (n + 1) * C).every((v) => v === 0))
            );
            if (count > 0) {
                r.close("dxf (=) vs analytic", got, ref.dxf, tol);
                // FD of L = lossScale * lossSum through the float64 reference
                const x64 = f64(xf.v),
                    idx = sample(r.rng, N * C, 48);
                const fd = fdGrad(
                    () => Float64Array.of(refCausalLmLoss(x64, tg, head.v, N, C, V, lossScale, cap).lossSum * lossScale),
                    x64,
                    [1],
                    idx
                );
                r.close("dxf vs FD", pick(got, idx), fd, tol);
            }
            if (dHead)
                r.close(
                    "dHead += grad",
                    r.get(dHead.t),
                    ref.dHead.map((g, i) => g + preHead[i]),
                    {float32: 1e-5, bfloat16: 3e-2}
                );
            // evaluation: no gradient, the same loss
            const res2 = r.be.causalLmLoss(xf.t, tg, head.t, N, C, V, lossScale, null, chunkRows, null, cap);
            r.that(
                "dxf=null: same loss",
                res2.lossSum === res.lossSum && res2.targets === res.targets,
                `got ${res2.lossSum} / ${res2.targets}`
            );
        }
    });
}

for (const [N, C, V, rows, cap] of [
    [1, 8, 11, null, 0],
    [17, 40, 50, null, 0],
    [17, 40, 50, [16, 0, 5, 5], 0],
    [17, 40, 50, [0, 1, 2, 3], 0],
    [3, 24, 37, [2], 0],
    [17, 40, 50, [16, 0, 5, 5], 3]
] as const) {
    OP_CASES.push({
        op: "logits",
        shape: `N=${N} C=${C} V=${V} rows=${rows ? `[${rows.join(",")}]` : "all"}${cap ? ` softcap=${cap}` : ""}`,
        run(r) {
            const hidden = r.randn(N * C),
                head = r.randn(V * C, 0.5);
            const got = r.be.logits(hidden.t, rows ? [...rows] : null, head.t, N, C, V, cap);
            const all = Array.from({length: N}, (_, i) => i);
            const want = softcap64(refLogits(hidden.v, rows ? [...rows] : all, head.v, C, V), cap);
            r.close("logits (fp32)", got, want, {float32: 1e-5, bfloat16: 1e-3});
        }
    });
}

/** the first index of the largest finite value of each row, and the count of non-finite values */
function refArgmax(logits: Float32Array, V: number): {ids: number[]; nonFinite: number} {
    const ids: number[] = [];
    let nonFinite = 0;
    for (let r = 0; r < logits.length / V; r++) {
        let best = -Infinity,
            idx = 0;
        for (let i = 0; i < V; i++) {
            const x = logits[r * V + i];
            if (!Number.isFinite(x)) nonFinite++;
            else if (x > best) [best, idx] = [x, i];
        }
        ids.push(idx);
    }
    return {ids, nonFinite};
}

// decoding on the backend: greedy rows get the argmax of the logits the backend's own logits() gives (so the GEMM's
// rounding is the same on both sides), exactly; a vocabulary wider than a block's threads and duplicate maxima
// included. Sampled rows (temperature, top-k, top-p, repetition penalty, mixed with greedy rows in one batch) get
// the token src/backend/sampling.ts picks from those logits: the same integers, so the same token unless an exp
// rounds differently right at the draw.
const SAMPLED: Omit<TokenPick, "u32" | "seen">[] = [
    {temperature: 0.7, topK: 50, topP: 0.9, repetitionPenalty: 1},
    {temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1},
    {temperature: 1.3, topK: 0, topP: 0.5, repetitionPenalty: 1.3},
    {temperature: 0.2, topK: 1, topP: 1, repetitionPenalty: 1},
    {temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1.5},
    {temperature: 2, topK: 3000, topP: 0.999, repetitionPenalty: 0.8}
];
for (const [N, C, V, rows, poison, sampled, cap] of [
    [1, 8, 11, null, false, false, 0],
    [6, 40, 3001, null, false, true, 2],
    [17, 40, 3001, [16, 0, 5, 5], false, false, 0],
    [5, 24, 2053, null, false, false, 0],
    [3, 24, 37, [2, 0], true, false, 0],
    [6, 40, 3001, null, false, true, 0],
    [12, 24, 5003, [11, 0, 3, 3, 7, 1, 2, 4, 5, 6, 8, 9], false, true, 0]
] as const) {
    OP_CASES.push({
        op: "pickTokens",
        shape:
            `N=${N} C=${C} V=${V} rows=${rows ? `[${rows.join(",")}]` : "all"}${poison ? " (an infinite head row)" : ""}` +
            (sampled ? " sampled" : " greedy") +
            (cap ? ` softcap=${cap}` : ""),
        run(r) {
            const hidden = r.randn(N * C);
            const headValues = randn32(r.rng, V * C, 0.5);
            // two vocabulary rows equal: their logits tie, and the first index must win
            headValues.copyWithin(7 * C, 3 * C, 4 * C);
            if (poison) headValues.fill(Infinity, 9 * C, 10 * C);
            const head = r.upload(headValues);
            const asked = rows ? [...rows] : null;
            const M = asked ? asked.length : N;
            const picks: TokenPick[] | null = sampled
                ? Array.from({length: M}, (_, i) => ({
                      ...SAMPLED[i % SAMPLED.length],
                      u32: r.rng.u32(),
                      seen: Int32Array.from(new Set(Array.from({length: 40}, () => r.rng.int(V))))
                  }))
                : null;
            const got = r.be.pickTokens(hidden.t, asked, head.t, N, C, V, picks, cap);
            const logits = r.be.logits(hidden.t, asked, head.t, N, C, V, cap);
            if (!sampled) {
                const want = refArgmax(logits, V);
                r.exact("argmax ids", got.ids, want.ids);
                r.exact("non-finite count", [got.nonFinite], [want.nonFinite]);
                if (poison && want.nonFinite === 0) throw new Error("the infinite head row gave no non-finite logit");
                return;
            }
            const want = pickTokensHost(logits, V, picks);
            r.exact("picked ids", got.ids, want.ids);
            r.exact("non-finite count", [got.nonFinite], [0]);
            const distinct = new Set(want.ids).size;
            if (distinct < M / 2) throw new Error(`the sampled rows picked only ${distinct} distinct tokens`);
        }
    });
}

// ---- trainable tensors: fp32 masters and gradients on the backend, and their compute copies

/** randn values with edge cases up front: -0, a subnormal, near the fp32 maximum, tiny and huge magnitudes */
function paramHost(rng: Prng, n: number): Float32Array {
    const h = randn32(rng, n, 3);
    [-0, 1e-40, -3.4e38, 1e-30, 65504].forEach((e, i) => {
        if (i < n) h[i] = e;
    });
    return h;
}

for (const n of [1, 17, 4099]) {
    OP_CASES.push({
        op: "param",
        shape: `n=${n} then paramToHost`,
        run(r) {
            const host = paramHost(r.rng, n);
            const hc = Float32Array.from(host);
            const p = r.own(r.be.param(hc));
            if (r.be.device === "cpu") r.that("CPU: param(host) is host itself", p === hc);
            r.exact("holds host (fp32)", r.get(p), host);
            const back = nanFilled(n);
            r.be.paramToHost(back, p);
            r.exact("paramToHost(param(host)) = host", back, host);
            r.exact("host untouched", hc, host);
        }
    });
    OP_CASES.push({
        op: "paramToHost",
        shape: `n=${n} after columnSums wrote it`,
        run(r) {
            // a gradient as the projection keeps it: be.param(host.grad), accumulated by an op, then synced
            const pre = randn32(r.rng, n);
            const hostGrad = Float32Array.from(pre);
            const g = r.own(r.be.param(hostGrad));
            const a = r.randn(3 * n);
            r.be.columnSums(g, a.t, null, null, 3, n);
            const held = r.get(g);
            const sums = refColumnSums(a.v, null, null, 3, n);
            r.close(
                "the tensor holds pre + sums",
                held,
                sums.map((s, i) => s + pre[i]),
                {float32: 1e-6, bfloat16: 1e-6}
            );
            const other = nanFilled(n);
            r.be.paramToHost(other, g);
            r.exact("into another array: the tensor's values", other, held);
            r.be.paramToHost(hostGrad, g); // a no-op where they share memory (the CPU)
            r.exact("into the array param() was made from", hostGrad, held);
        }
    });
    OP_CASES.push({
        op: "zeroParam",
        shape: `n=${n}`,
        run(r) {
            const p = r.param(randn32(r.rng, n, 1, 3));
            r.be.zeroParam(p.t, n);
            r.exact("param: all 0", r.get(p.t), new Float64Array(n));
            const back = nanFilled(n);
            r.be.paramToHost(back, p.t);
            r.exact("paramToHost: all 0", back, new Float64Array(n));
            const s = r.own(r.be.stats(n));
            r.be.zeroParam(s, n);
            r.exact("stats(n): all 0", r.get(s), new Float64Array(n));
        }
    });
    OP_CASES.push({
        op: "computeCopy",
        shape: `n=${n} into a tensor and a new one`,
        run(r) {
            const host = paramHost(r.rng, n);
            const p = r.param(host);
            // the activation dtype's values (bf16 on CUDA, where -3.4e38 rounds to -inf as io.round has it)
            const want = f64(r.io.round(host));
            const into = r.out(n);
            const c1 = r.be.computeCopy(p.t, n, into);
            r.exact("into: the master in the activation dtype", r.get(c1), want);
            const c2 = r.be.computeCopy(p.t, n, null);
            if (c2 !== p.t) r.own(c2);
            r.exact("new: the master in the activation dtype", r.get(c2), want);
            if (r.be.device === "cpu") r.that("CPU: returns t itself", c1 === p.t && c2 === p.t);
            else r.that("returns `into`, or a new tensor", c1 === into && c2 !== p.t && c2 !== into);
            r.exact("the master untouched", r.get(p.t), p.v);
        }
    });
}

// ---- the projection layers' GEMM: C[M, N] = alpha op(A) op(B) + beta C, beta 0 onto NaN (C write-only) then 1

type GemmKind = "C activation" | "C fp32" | "fp32 masters";

const GEMM_KINDS: {kind: GemmKind; what: string; tol: Tol}[] = [
    // fp32 sums; bf16: the output's storage rounding
    {kind: "C activation", what: "A, B activations", tol: {float32: 1e-5, bfloat16: BF16_OUT}},
    // gradients accumulated in fp32 (dA, dB): bf16 products exact, fp32 tensor-core sums in their own order
    {kind: "C fp32", what: "A, B activations; C fp32 (stats, param)", tol: {float32: 1e-5, bfloat16: 1e-4}},
    // DoRA's W + s B A on the fp32 masters: fp32 FMA sums on both (TF32 would give ~1e-3)
    {kind: "fp32 masters", what: "A, B, C fp32 (param)", tol: {float32: 1e-5, bfloat16: 1e-5}}
];
const GEMM_SHAPES = [
    [1, 17, 3],
    [17, 1, 33],
    [33, 70, 1],
    [70, 3, 17]
] as const;
const GEMM_ALPHAS = [0.5, -1.75, Math.fround(1 / 3), 2];

for (const {kind, what, tol} of GEMM_KINDS)
    GEMM_SHAPES.forEach(([M, N, K], si) => {
        for (const tA of [false, true])
            for (const tB of [false, true]) {
                const a0 = GEMM_ALPHAS[si],
                    a1 = GEMM_ALPHAS[(si + 1) % GEMM_ALPHAS.length];
                OP_CASES.push({
                    op: "gemm",
                    shape: `${kind} M=${M} N=${N} K=${K} ${tA ? "A^T" : "A"} ${tB ? "B^T" : "B"}`,
                    run(r) {
                        const masters = kind === "fp32 masters";
                        const A = masters ? r.param(randn32(r.rng, M * K)) : r.randn(M * K),
                            B = masters ? r.param(randn32(r.rng, K * N)) : r.randn(K * N);
                        // beta 0: C is write-only (NaN-filled; r.stats is the dtype of be.stats)
                        const C0 = kind === "C activation" ? r.out(M * N) : r.stats(M * N);
                        r.be.gemm(tA, tB, M, N, K, a0, A.t, B.t, 0, C0);
                        r.close(
                            `${what}: alpha=${+a0.toPrecision(3)} beta=0`,
                            r.get(C0),
                            refGemm(tA, tB, M, N, K, a0, A.v, B.v, 0, null),
                            tol
                        );
                        // beta 1: accumulation onto C
                        const C1 = kind === "C activation" ? r.randn(M * N) : r.param(randn32(r.rng, M * N));
                        r.be.gemm(tA, tB, M, N, K, a1, A.t, B.t, 1, C1.t);
                        r.close(
                            `${what}: alpha=${+a1.toPrecision(3)} beta=1`,
                            r.get(C1.t),
                            refGemm(tA, tB, M, N, K, a1, A.v, B.v, 1, C1.v),
                            tol
                        );
                        r.exact("A untouched", r.get(A.t), A.v);
                        r.exact("B untouched", r.get(B.t), B.v);
                    }
                });
            }
    });

// ---- decoding's LoRA down products of one input: out_p[M, r_p] = x[M, K] A_p^T in one pass (optional op)

for (const [M, K, ranks] of [
    [1, 3584, [16, 16, 16]],
    [3, 72, [1, 64]],
    [8, 18944, [16]],
    [2, 40, [8, 5, 3, 2]]
] as const)
    OP_CASES.push({
        op: "loraDownGroup",
        shape: `M=${M} K=${K} r=${ranks.join("+")}`,
        unsupported: (be) => (be.loraDownGroup ? null : `no fused LoRA down kernel on ${be.device} (one gemm per part)`),
        run(r) {
            const x = r.randn(M * K);
            const parts = ranks.map((rank) => ({A: r.randn(rank * K, 0.05), out: r.out(M * rank), r: rank}));
            const done = r.be.loraDownGroup!(
                x.t,
                M,
                K,
                parts.map((p) => ({out: p.out, A: p.A.t, r: p.r}))
            );
            r.that("the kernel takes these shapes", done);
            parts.forEach((p, i) =>
                r.close(`part ${i} (r=${p.r})`, r.get(p.out), refGemm(false, true, M, p.r, K, 1, x.v, p.A.v, 0, null), {
                    float32: 1e-5,
                    bfloat16: BF16_OUT
                })
            );
            r.exact("x untouched", r.get(x.t), x.v);
        }
    });

// ---- dropout: the counter-based mask of the CPU addon (native/include/qlora_dropout.h), the same on every device

/** the mask as the CPU addon draws it: keep / (1 - p) or 0 */
function dropoutMask(seed: number, p: number, n: number): Float32Array {
    const mask = new Float32Array(n);
    cpu().dropoutMask(mask, seed, p, n, 0);
    return mask;
}

const DROPOUT_CASES = [
    {n: 1, p: 0.1, seed: 2 ** 52 + 1, tag: "2^52+1"},
    {n: 17, p: 0.5, seed: 2 ** 52 - 17, tag: "2^52-17"},
    {n: 4099, p: 0.1, seed: 2 ** 52 + 123457, tag: "2^52+123457"},
    {n: 100003, p: 0.5, seed: 2 ** 52 + 2 ** 40 + 3, tag: "2^52+2^40+3"}
];

/** for large n: the kept fraction within 5 sigma of 1 - p (the mask is no constant) */
function keptFraction<X extends TensorTypes>(r: CaseRun<X>, mask: Float32Array, p: number): void {
    const n = mask.length;
    if (n < 1000) return;
    const kept = mask.reduce((c, m) => c + (m !== 0 ? 1 : 0), 0) / n;
    r.that(`kept fraction ~ ${1 - p}`, Math.abs(kept - (1 - p)) <= 5 * Math.sqrt((p * (1 - p)) / n), `kept ${kept}`);
}

for (const {n, p, seed, tag} of DROPOUT_CASES) {
    const shape = `n=${n} p=${p} seed=${tag}`;
    OP_CASES.push({
        op: "dropout",
        shape,
        run(r) {
            const x = r.randn(n);
            const mask = dropoutMask(seed, p, n);
            keptFraction(r, mask, p);
            // one fp32 product, then the backend's storage rounding: exact
            const want = f64(r.io.round(Float32Array.from(x.v, (v, i) => v * mask[i])));
            const out = r.out(n);
            r.be.dropout(out, x.t, seed, p, n);
            r.exact("out = x * mask", r.get(out), want);
            r.exact("x untouched", r.get(x.t), x.v);
            const y = r.upload(Float32Array.from(x.v));
            r.be.dropout(y.t, y.t, seed, p, n);
            r.exact("in place (out = x): x * mask", r.get(y.t), want);
            // a part of a larger tensor starting at element `first` draws that tensor's masks
            const first = 3 * n + 7;
            const part = dropoutMask(seed, p, first + n).subarray(first);
            r.be.dropout(out, x.t, seed, p, n, first);
            const wantPart = f64(r.io.round(Float32Array.from(x.v, (v, i) => v * part[i])));
            r.exact("a part from element first: x * mask[first..]", r.get(out), wantPart);
        }
    });
    OP_CASES.push({
        op: "dropoutAdd",
        shape,
        run(r) {
            const y = r.randn(n),
                x = r.randn(n);
            const mask = dropoutMask(seed, p, n);
            keptFraction(r, mask, p);
            r.be.dropoutAdd(y.t, x.t, seed, p, n);
            const got = r.get(y.t);
            const dropped = [...mask.keys()].filter((i) => mask[i] === 0);
            r.exact(`${dropped.length} dropped: y untouched`, pick(got, dropped), pick(y.v, dropped));
            // one fp32 rounding of the sum (fused or not on CUDA), then the backend's storage rounding
            r.close(
                "y += x * mask",
                got,
                y.v.map((v, i) => v + x.v[i] * mask[i]),
                {float32: 1e-6, bfloat16: BF16_OUT}
            );
            // a part of a larger tensor starting at element `first` draws that tensor's masks
            const first = 2 * n + 5;
            const part = dropoutMask(seed, p, first + n).subarray(first);
            const z = r.upload(new Float32Array(n));
            r.be.dropoutAdd(z.t, x.t, seed, p, n, first);
            const wantPart = x.v.map((v, i) => v * part[i]);
            r.close("a part from element first: 0 += x * mask[first..]", r.get(z.t), wantPart, {
                float32: 1e-6,
                bfloat16: BF16_OUT
            });
            r.exact("x untouched", r.get(x.t), x.v);
        }
    });
}

// ---- bias, DoRA's column scaling, the bias and magnitude gradients, the weight norms

for (const [M, N] of [
    [1, 1],
    [3, 17],
    [17, 33],
    [70, 4099]
]) {
    OP_CASES.push({
        op: "addBias",
        shape: `M=${M} N=${N}`,
        run(r) {
            const y = r.randn(M * N),
                bias = r.randn(N, 0.5); // the bias's compute copy: an activation tensor
            r.be.addBias(y.t, bias.t, M, N);
            // one fp32 sum, then the backend's storage rounding: exact
            r.exact("y += bias", r.get(y.t), f64(r.io.round(Float32Array.from(y.v, (v, i) => v + bias.v[i % N]))));
            r.exact("bias untouched", r.get(bias.t), bias.v);
        }
    });
}

// fp32 products and sums; bf16: the output's storage rounding
const SCALE_TOL = {float32: 1e-6, bfloat16: BF16_OUT};

for (const [M, N] of [
    [1, 1],
    [3, 17],
    [33, 4099]
])
    for (const offset of [0, -1])
        for (const accumulate of [false, true]) {
            OP_CASES.push({
                op: "scaleColumns",
                shape: `M=${M} N=${N} offset=${offset} ${accumulate ? "+=" : "="}`,
                run(r) {
                    const x = r.randn(M * N),
                        k = r.param(randn32(r.rng, N, 0.3, 1)); // fp32 k = m / norm ~ 1
                    const pre = accumulate ? r.randn(M * N) : null;
                    const out = pre ? pre.t : r.out(M * N);
                    r.be.scaleColumns(out, x.t, k.t, offset, M, N, accumulate);
                    const op = accumulate ? "+=" : "=";
                    r.close(
                        `out ${op} x (k + offset)`,
                        r.get(out),
                        refScaleColumns(x.v, k.v, offset, M, N, pre?.v ?? null),
                        SCALE_TOL
                    );
                    r.exact("x untouched", r.get(x.t), x.v);
                    const xa = r.upload(Float32Array.from(x.v));
                    r.be.scaleColumns(xa.t, xa.t, k.t, offset, M, N, accumulate);
                    r.close(
                        `out aliasing x: x ${op} x (k + offset)`,
                        r.get(xa.t),
                        refScaleColumns(x.v, k.v, offset, M, N, accumulate ? x.v : null),
                        SCALE_TOL
                    );
                }
            });
        }

// fp32 results of float64 sums on both backends
const SUMS_TOL = {float32: 1e-6, bfloat16: 1e-6};

for (const [M, N] of [
    [1, 1],
    [17, 33],
    [257, 4099]
])
    for (const withB of [false, true])
        for (const withDiv of [false, true]) {
            OP_CASES.push({
                op: "columnSums",
                shape: `M=${M} N=${N} ${withB ? "a*b" : "a"}${withDiv ? " / div" : ""}`,
                run(r) {
                    const a = r.randn(M * N),
                        b = withB ? r.randn(M * N) : null;
                    // div: DoRA's weight norms (fp32, positive)
                    const div = withDiv ? r.param(randn32(r.rng, N).map((v) => 0.5 + Math.abs(v))) : null;
                    const pre = randn32(r.rng, N); // a previous micro-batch's gradient: +=
                    const dst = r.param(pre);
                    r.be.columnSums(dst.t, a.t, b?.t ?? null, div?.t ?? null, M, N);
                    const sums = refColumnSums(a.v, b?.v ?? null, div?.v ?? null, M, N);
                    r.close(
                        "dst += sums",
                        r.get(dst.t),
                        sums.map((s, n) => s + pre[n]),
                        SUMS_TOL
                    );
                    r.be.columnSums(dst.t, a.t, b?.t ?? null, div?.t ?? null, M, N);
                    r.close(
                        "twice",
                        r.get(dst.t),
                        sums.map((s, n) => 2 * s + pre[n]),
                        SUMS_TOL
                    );
                }
            });
        }

/** row scales of the rowNorms cases: squares of 1e20 overflow fp32, of 1e-25 underflow it (float64 sums needed) */
const ROW_SCALES = [1, 1e20, 1e-25, 0, 0.01, 1, 3];

for (const [R, C] of [
    [1, 1],
    [3, 17],
    [7, 4099]
]) {
    OP_CASES.push({
        op: "rowNorms",
        shape: `R=${R} C=${C} row scales ${ROW_SCALES.slice(0, R)
            .map((v) => (v >= 1e6 || (v > 0 && v < 1e-6) ? v.toExponential() : String(v)))
            .join(",")}`,
        run(r) {
            const host = randn32(r.rng, R * C);
            for (let i = 0; i < R; i++) for (let c = 0; c < C; c++) host[i * C + c] *= ROW_SCALES[i];
            const W = r.param(host);
            const out = r.stats(R);
            r.be.rowNorms(out, W.t, R, C);
            // per row (floor 0): each norm against its own magnitude
            r.close("norms (fp32)", r.get(out), refRowNorms(W.v, R, C), SUMS_TOL, 0);
            r.exact("W untouched", r.get(W.t), W.v);
        }
    });
}

for (const n of [1, 17, 4099]) {
    OP_CASES.push({
        op: "divide",
        shape: `n=${n}`,
        run(r) {
            const a = r.param(randn32(r.rng, n, 1, 1)),
                b = r.param(randn32(r.rng, n, 2));
            const out = r.stats(n);
            r.be.divide(out, a.t, b.t, n);
            // one correctly rounded fp32 division: exact
            r.exact(
                "out = a / b",
                r.get(out),
                Float64Array.from(a.v, (v, i) => Math.fround(v / b.v[i]))
            );
        }
    });
}

// ------------------------------------------------------------------
// the runner

function seedOf(text: string): number {
    let h = 2166136261; // FNV-1a: a case keeps its inputs when others are added
    for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 16777619);
    return h >>> 0;
}

export interface CaseResult {
    ok: boolean;
    /** the one line the case prints */
    line: string;
    /** the failing checks, one per line */
    failures: string[];
    ms: number;
}

export function runCase<X extends TensorTypes>(io: BackendIo<X>, c: OpCase): CaseResult {
    const r = new CaseRun(io, new Prng(seedOf(`${c.op} ${c.shape}`)));
    const start = performance.now();
    try {
        c.run(r);
    } catch (e) {
        r.that("runs", false, `threw ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    } finally {
        r.release();
    }
    const ms = performance.now() - start;
    // the check closest to its tolerance speaks for the case
    const ratio = (k: CheckResult) => (k.tol > 0 ? k.maxRel / k.tol : k.ok ? 0 : Infinity);
    const worst = r.checks.reduce<CheckResult | null>((w, k) => (!w || ratio(k) > ratio(w) ? k : w), null);
    const ok = r.checks.length > 0 && r.checks.every((k) => k.ok);
    const stats =
        worst && worst.tol > 0
            ? `maxRel=${fmt(worst.maxRel)} (tol ${fmt(worst.tol)}, ${worst.what})`
            : worst
              ? `exact (${worst.what})`
              : "no checks";
    const line =
        `${ok ? "OK    " : "NOT OK"} ${io.be.device} ${c.op.padEnd(17)} ${c.shape.padEnd(52)} ${stats}` +
        `  [${r.checks.length} checks, ${ms.toFixed(0)} ms]`;
    const failures = r.checks
        .filter((k) => !k.ok)
        .map(
            (k) =>
                `    ${k.what}: ${k.tol > 0 ? `maxRel ${fmt(k.maxRel)} > tol ${fmt(k.tol)}` : "failed"}${k.detail ? `; ${k.detail}` : ""}`
        );
    return {ok, line, failures, ms};
}

/**
 * registers the whole table as node:test tests on one backend (describe per op, a test per case); `io` is made
 * on first use, so a file can register the tests of an absent backend and skip them all with `skip`
 */
export function registerBackendOpTests<X extends TensorTypes>(io: () => BackendIo<X>, skip: string | null = null): void {
    const results: CaseResult[] = [];
    let made: BackendIo<X> | null = null;
    test("the table covers every op of the Backend interface", () => {
        const missing = BACKEND_OPS.filter((op) => !OP_CASES.some((c) => c.op === op));
        assert.deepEqual(missing, [], `ops without a case: ${missing.join(", ")}`);
    });
    for (const op of BACKEND_OPS) {
        describe(op, () => {
            for (const c of OP_CASES.filter((k) => k.op === op)) {
                test(c.shape, (t: TestContext) => {
                    if (skip) return t.skip(skip);
                    made ??= io();
                    const why = c.unsupported?.(made.be as unknown as Backend<TensorTypes>) ?? null;
                    if (why) {
                        console.log(`SKIP   ${made.be.device} ${c.op.padEnd(17)} ${c.shape.padEnd(52)} ${why}`);
                        return t.skip(why);
                    }
                    const res = runCase(made, c);
                    results.push(res);
                    console.log(res.line);
                    for (const f of res.failures) console.log(f);
                    assert.ok(res.ok, [res.line, ...res.failures].join("\n"));
                });
            }
        });
    }
    after(() => {
        if (results.length === 0) return;
        const bad = results.filter((k) => !k.ok).length;
        const ms = results.reduce((s, k) => s + k.ms, 0);
        console.log(`${results.length - bad}/${results.length} cases OK (${(ms / 1000).toFixed(2)} s in the cases)`);
    });
}
