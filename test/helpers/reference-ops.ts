// reference-ops.ts: the float64 references of the decoder ops, the error metric and central finite differences,
// shared by the raw CPU op harness (test/ops-cpu.test.ts) and the Backend op table (test/helpers/backend-ops.ts).
// Each reference is written plainly from the HF/PyTorch semantics; none shares code with src/ or native/.
//
// Error metric: rel_i = |got_i - ref_i| / (|ref_i| + floor), floor = rms(ref) unless given, so an element near zero
// is judged against the typical magnitude of the tensor; a check passes when max rel_i <= tol. Non-finite
// reference values (-inf lse, NaN conversions) must match exactly.
import type {GatedAct} from "../../src/backend/backend.js";
import type {Prng} from "./prng.js";

export function f64(a: ArrayLike<number>): Float64Array {
    return Float64Array.from(a);
}

export function nanFilled(n: number): Float32Array {
    return new Float32Array(n).fill(NaN);
}

/** k distinct indices of [0, n), sorted (all of them when k >= n) */
export function sample(rng: Prng, n: number, k: number): number[] {
    if (k >= n) return Array.from({length: n}, (_, i) => i);
    const picked = new Set<number>();
    while (picked.size < k) picked.add(rng.int(n));
    return [...picked].sort((a, b) => a - b);
}

export function dot64(a: ArrayLike<number>, b: ArrayLike<number>): number {
    let s = 0;
    for (let i = 0; i < a.length; i++) s += a[i] * b[i];
    return s;
}

export function pick(a: ArrayLike<number>, idx: number[]): Float64Array {
    return Float64Array.from(idx, (i) => a[i]);
}

export interface ErrorStats {
    maxAbs: number;
    maxRel: number;
    /** index of the largest rel (-1 when every element matches) */
    worst: number;
}

/** the root mean square of the finite values */
export function rms(a: ArrayLike<number>): number {
    let ss = 0,
        nf = 0;
    for (let i = 0; i < a.length; i++)
        if (Number.isFinite(a[i])) {
            ss += a[i] * a[i];
            nf++;
        }
    return Math.sqrt(ss / Math.max(nf, 1));
}

/** the metric above; `floor` overrides rms(ref) */
export function errorStats(got: ArrayLike<number>, ref: ArrayLike<number>, floor?: number): ErrorStats {
    if (got.length !== ref.length) throw new Error(`errorStats: ${got.length} values against ${ref.length}`);
    const fl = floor ?? rms(ref);
    let maxAbs = 0,
        maxRel = 0,
        worst = -1;
    for (let i = 0; i < ref.length; i++) {
        const g = got[i],
            r = ref[i];
        let abs: number, rel: number;
        if (!Number.isFinite(r) || !Number.isFinite(g)) {
            abs = rel = Object.is(g, r) || (Number.isNaN(g) && Number.isNaN(r)) ? 0 : Infinity;
        } else {
            abs = Math.abs(g - r);
            const den = Math.abs(r) + fl;
            rel = den > 0 ? abs / den : abs === 0 ? 0 : Infinity;
        }
        if (abs > maxAbs) maxAbs = abs;
        if (rel > maxRel) {
            maxRel = rel;
            worst = i;
        }
    }
    return {maxAbs, maxRel, worst};
}

/**
 * central finite differences of L(x) = sum(forward(x) * R) with respect to x[i] for i in idx, in float64.
 * forward is called with x modified in place (and restored).
 */
export function fdGrad(
    forward: () => Float64Array,
    x: Float64Array,
    R: ArrayLike<number>,
    idx: number[],
    h = 1e-5
): Float64Array {
    const g = new Float64Array(idx.length);
    idx.forEach((i, k) => {
        const x0 = x[i];
        x[i] = x0 + h;
        const lp = dot64(forward(), R);
        x[i] = x0 - h;
        const lm = dot64(forward(), R);
        x[i] = x0;
        g[k] = (lp - lm) / (2 * h);
    });
    return g;
}

// ------------------------------------------------------------------
// embedding

export function refEmbedding(ids: ArrayLike<number>, table: ArrayLike<number>, C: number): Float64Array {
    const out = new Float64Array(ids.length * C);
    for (let n = 0; n < ids.length; n++) for (let c = 0; c < C; c++) out[n * C + c] = table[ids[n] * C + c];
    return out;
}

/** dtable[V, C] of L = sum(embedding(table) * dout): repeated ids sum */
export function refEmbeddingBackward(dout: ArrayLike<number>, ids: ArrayLike<number>, V: number, C: number): Float64Array {
    const grad = new Float64Array(V * C);
    for (let n = 0; n < ids.length; n++) for (let c = 0; c < C; c++) grad[ids[n] * C + c] += dout[n * C + c];
    return grad;
}

// ------------------------------------------------------------------
// RMSNorm (HF: y = w * x / sqrt(mean(x^2) + eps))

export function refRmsnorm(
    x: ArrayLike<number>,
    w: ArrayLike<number>,
    N: number,
    C: number,
    eps: number
): {out: Float64Array; rstd: Float64Array} {
    const out = new Float64Array(N * C),
        rstd = new Float64Array(N);
    for (let n = 0; n < N; n++) {
        let ss = 0;
        for (let k = 0; k < C; k++) ss += x[n * C + k] ** 2;
        const r = 1 / Math.sqrt(ss / C + eps);
        rstd[n] = r;
        for (let k = 0; k < C; k++) out[n * C + k] = w[k] * x[n * C + k] * r;
    }
    return {out, rstd};
}

/** dx and dw of L = sum(rmsnorm(x) * g) */
export function refRmsnormBackward(
    g: ArrayLike<number>,
    x: ArrayLike<number>,
    w: ArrayLike<number>,
    N: number,
    C: number,
    eps: number
): {dx: Float64Array; dw: Float64Array} {
    const dx = new Float64Array(N * C),
        dw = new Float64Array(C);
    const {rstd} = refRmsnorm(x, w, N, C, eps);
    for (let n = 0; n < N; n++) {
        const r = rstd[n];
        let s = 0;
        for (let k = 0; k < C; k++) s += w[k] * g[n * C + k] * x[n * C + k];
        for (let k = 0; k < C; k++) {
            dx[n * C + k] = r * w[k] * g[n * C + k] - (x[n * C + k] * r ** 3 * s) / C;
            dw[k] += g[n * C + k] * x[n * C + k] * r;
        }
    }
    return {dx, dw};
}

// ------------------------------------------------------------------
// RoPE, rotate_half: pairs (i, i + D/2); angle = pos * inv_freq[i], rounded to fp32 as transformers computes it
// (inv_freq @ position_ids in float32); cos/sin then taken in float64.

export function ropeAngles(pos: ArrayLike<number>, invFreq: Float32Array): Float64Array {
    const half = invFreq.length,
        a = new Float64Array(pos.length * half);
    for (let n = 0; n < pos.length; n++) for (let i = 0; i < half; i++) a[n * half + i] = Math.fround(pos[n] * invFreq[i]);
    return a;
}

/**
 * x * cos + rotate_half(x) * sin on [N, H, D] rows; `inverse`: the transpose (rotation by -angle), i.e. the
 * backward. Only the first R dimensions of a head rotate (partial rotary, as Phi3's apply_rotary_pos_emb: pairs
 * (i, i + R/2)); the rest pass through unscaled.
 */
export function refRope(
    x: ArrayLike<number>,
    angles: Float64Array,
    scaling: number,
    N: number,
    H: number,
    D: number,
    inverse = false,
    R = D
): Float64Array {
    const half = R / 2,
        out = Float64Array.from({length: N * H * D}, (_, i) => x[i]);
    for (let n = 0; n < N; n++) {
        for (let h = 0; h < H; h++) {
            const o = (n * H + h) * D;
            for (let i = 0; i < half; i++) {
                const cs = Math.cos(angles[n * half + i]) * scaling;
                const sn = (inverse ? -1 : 1) * Math.sin(angles[n * half + i]) * scaling;
                const x0 = x[o + i],
                    x1 = x[o + i + half];
                // rotate_half(x) = cat(-x[half:], x[:half])
                out[o + i] = x0 * cs - x1 * sn;
                out[o + i + half] = x1 * cs + x0 * sn;
            }
        }
    }
    return out;
}

// ------------------------------------------------------------------
// attention: causal grouped-query, q[B, T, Hq, D], k/v[B, S, Hkv, D]; query t sits at key position qOffset + t

export interface AttnProblem {
    B: number;
    T: number;
    S: number;
    Hq: number;
    Hkv: number;
    D: number;
    qOffset: number;
    /** [B, S] 1 real, 0 hidden (null: all real) */
    keyValid: ArrayLike<number> | null;
    /** [B, S] packed-sequence index (null: one sequence per row) */
    seg: ArrayLike<number> | null;
    scale: number;
    /** a sliding window (0 or absent: none) */
    window?: number;
}

export function attnVisible(a: AttnProblem, b: number, j: number, qpos: number): boolean {
    const {S} = a;
    if (j > qpos) return false;
    if (a.keyValid && !a.keyValid[b * S + j]) return false;
    if (a.seg && a.seg[b * S + j] !== a.seg[b * S + qpos]) return false;
    // transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window
    if (a.window && !(j > qpos - a.window)) return false;
    return true;
}

/** softmax(q k^T * scale + mask) v in float64; lse[B, Hq, T] of the scaled scores (-inf for a row with no visible key) */
export function refAttention(
    a: AttnProblem,
    q: ArrayLike<number>,
    k: ArrayLike<number>,
    v: ArrayLike<number>
): {out: Float64Array; lse: Float64Array} {
    const {B, T, S, Hq, Hkv, D, qOffset} = a;
    const G = Hq / Hkv;
    const out = new Float64Array(B * T * Hq * D),
        lse = new Float64Array(B * Hq * T);
    const p = new Float64Array(S);
    for (let b = 0; b < B; b++) {
        for (let h = 0; h < Hq; h++) {
            const hk = Math.floor(h / G); // repeat_kv: query head h uses kv head h // G
            for (let t = 0; t < T; t++) {
                const qpos = qOffset + t,
                    qo = ((b * T + t) * Hq + h) * D;
                let m = -Infinity;
                for (let j = 0; j < S; j++) {
                    if (!attnVisible(a, b, j, qpos)) {
                        p[j] = -Infinity;
                        continue;
                    }
                    const ko = ((b * S + j) * Hkv + hk) * D;
                    let s = 0;
                    for (let d = 0; d < D; d++) s += q[qo + d] * k[ko + d];
                    p[j] = s * a.scale;
                    if (p[j] > m) m = p[j];
                }
                if (m === -Infinity) {
                    lse[(b * Hq + h) * T + t] = -Infinity;
                    continue;
                }
                let sum = 0;
                for (let j = 0; j < S; j++) {
                    p[j] = p[j] === -Infinity ? 0 : Math.exp(p[j] - m);
                    sum += p[j];
                }
                lse[(b * Hq + h) * T + t] = m + Math.log(sum);
                for (let j = 0; j < S; j++) {
                    if (p[j] === 0) continue;
                    const w = p[j] / sum,
                        vo = ((b * S + j) * Hkv + hk) * D;
                    for (let d = 0; d < D; d++) out[qo + d] += w * v[vo + d];
                }
            }
        }
    }
    return {out, lse};
}

/** dq, dk, dv of L = sum(attention(q, k, v) * g) */
export function refAttentionBackward(
    a: AttnProblem,
    q: ArrayLike<number>,
    k: ArrayLike<number>,
    v: ArrayLike<number>,
    g: ArrayLike<number>
): {dq: Float64Array; dk: Float64Array; dv: Float64Array} {
    const {B, T, S, Hq, Hkv, D, qOffset} = a;
    const G = Hq / Hkv;
    const {out, lse} = refAttention(a, q, k, v);
    const dq = new Float64Array(q.length),
        dk = new Float64Array(k.length),
        dv = new Float64Array(v.length);
    for (let b = 0; b < B; b++) {
        for (let h = 0; h < Hq; h++) {
            const hk = Math.floor(h / G);
            for (let t = 0; t < T; t++) {
                const l = lse[(b * Hq + h) * T + t];
                if (l === -Infinity) continue;
                const qpos = qOffset + t,
                    qo = ((b * T + t) * Hq + h) * D;
                let di = 0;
                for (let d = 0; d < D; d++) di += g[qo + d] * out[qo + d];
                for (let j = 0; j < S; j++) {
                    if (!attnVisible(a, b, j, qpos)) continue;
                    const ko = ((b * S + j) * Hkv + hk) * D;
                    let s = 0,
                        dp = 0;
                    for (let d = 0; d < D; d++) {
                        s += q[qo + d] * k[ko + d];
                        dp += g[qo + d] * v[ko + d];
                    }
                    const pj = Math.exp(s * a.scale - l),
                        ds = pj * (dp - di) * a.scale;
                    for (let d = 0; d < D; d++) {
                        dv[ko + d] += pj * g[qo + d];
                        dk[ko + d] += ds * q[qo + d];
                        dq[qo + d] += ds * k[ko + d];
                    }
                }
            }
        }
    }
    return {dq, dk, dv};
}

// ------------------------------------------------------------------
// the gated MLP's activation: out = act(gate) * up (silu: SwiGLU; gelu_tanh: Gemma's gelu_pytorch_tanh)

export function silu64(g: number): number {
    return g / (1 + Math.exp(-g));
}

export function geluTanh64(x: number): number {
    return 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));
}

/** each activation and its derivative, written out */
const ACT64: Record<GatedAct, {f: (x: number) => number; grad: (x: number) => number}> = {
    silu: {
        f: silu64,
        grad(x) {
            const s = 1 / (1 + Math.exp(-x));
            return s * (1 + x * (1 - s));
        }
    },
    gelu_tanh: {
        f: geluTanh64,
        grad(x) {
            const k = Math.sqrt(2 / Math.PI);
            const t = Math.tanh(k * (x + 0.044715 * x ** 3));
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x);
        }
    }
};

export function refGatedAct(act: GatedAct, gate: ArrayLike<number>, up: ArrayLike<number>): Float64Array {
    const f = ACT64[act].f;
    return Float64Array.from({length: gate.length}, (_, i) => f(gate[i]) * up[i]);
}

/** dgate, dup of L = sum(gatedAct(gate, up) * dout) */
export function refGatedActBackward(
    act: GatedAct,
    dout: ArrayLike<number>,
    gate: ArrayLike<number>,
    up: ArrayLike<number>
): {dgate: Float64Array; dup: Float64Array} {
    const {f, grad} = ACT64[act];
    const n = gate.length,
        dgate = new Float64Array(n),
        dup = new Float64Array(n);
    for (let i = 0; i < n; i++) {
        dup[i] = dout[i] * f(gate[i]);
        dgate[i] = dout[i] * up[i] * grad(gate[i]);
    }
    return {dgate, dup};
}

/** cap tanh(x / cap) in place (cap 0: unchanged) */
export function softcap64(x: Float64Array, cap: number): Float64Array {
    if (cap > 0) for (let i = 0; i < x.length; i++) x[i] = cap * Math.tanh(x[i] / cap);
    return x;
}

// ------------------------------------------------------------------
// softmax cross-entropy and the output layer

/** log(sum(exp(x[off .. off + V)))) */
export function rowLse(x: ArrayLike<number>, off: number, V: number): number {
    let m = -Infinity;
    for (let v = 0; v < V; v++) if (x[off + v] > m) m = x[off + v];
    let s = 0;
    for (let v = 0; v < V; v++) s += Math.exp(x[off + v] - m);
    return m + Math.log(s);
}

/** logits[rows, V] = hidden[rows] head^T (hidden [N, C], head [V, C]) */
export function refLogits(
    hidden: ArrayLike<number>,
    rows: number[],
    head: ArrayLike<number>,
    C: number,
    V: number
): Float64Array {
    const out = new Float64Array(rows.length * V);
    rows.forEach((r, i) => {
        for (let v = 0; v < V; v++) {
            let s = 0;
            for (let c = 0; c < C; c++) s += hidden[r * C + c] * head[v * C + c];
            out[i * V + v] = s;
        }
    });
    return out;
}

/**
 * the causal-LM loss of hidden states xf[N, C] through head[V, C]: the cross-entropy summed over rows whose
 * target is in [0, V), their count, and the gradients of lossScale * lossSum with respect to xf and head
 */
export function refCausalLmLoss(
    xf: ArrayLike<number>,
    targets: ArrayLike<number>,
    head: ArrayLike<number>,
    N: number,
    C: number,
    V: number,
    lossScale: number,
    /** > 0: the logits are cap tanh(logits / cap) (Gemma's final_logit_softcapping) */
    softcap = 0
): {lossSum: number; targets: number; dxf: Float64Array; dHead: Float64Array} {
    const all = Array.from({length: N}, (_, i) => i);
    const logits = softcap64(refLogits(xf, all, head, C, V), softcap);
    const dxf = new Float64Array(N * C),
        dHead = new Float64Array(V * C);
    let lossSum = 0,
        count = 0;
    const d = new Float64Array(V);
    for (let n = 0; n < N; n++) {
        const t = targets[n];
        if (!(t >= 0 && t < V)) continue;
        const lse = rowLse(logits, n * V, V);
        lossSum += lse - logits[n * V + t];
        count++;
        for (let v = 0; v < V; v++) d[v] = Math.exp(logits[n * V + v] - lse) * lossScale;
        d[t] -= lossScale;
        if (softcap > 0) for (let v = 0; v < V; v++) d[v] *= 1 - (logits[n * V + v] / softcap) ** 2;
        for (let v = 0; v < V; v++)
            for (let c = 0; c < C; c++) {
                dxf[n * C + c] += d[v] * head[v * C + c];
                dHead[v * C + c] += d[v] * xf[n * C + c];
            }
    }
    return {lossSum, targets: count, dxf, dHead};
}

// ------------------------------------------------------------------
// the projection layers' ops (LoRA, DoRA, trained biases)

/**
 * row-major C[M, N] = alpha op(A) op(B) + beta C: op(A) [M, K] is A [M, K], or A^T with A stored [K, M] when tA;
 * op(B) [K, N] is B [K, N], or B^T with B stored [N, K] when tB; C is not read when beta is 0
 */
export function refGemm(
    tA: boolean,
    tB: boolean,
    M: number,
    N: number,
    K: number,
    alpha: number,
    A: ArrayLike<number>,
    B: ArrayLike<number>,
    beta: number,
    C: ArrayLike<number> | null
): Float64Array {
    const out = new Float64Array(M * N);
    for (let m = 0; m < M; m++)
        for (let n = 0; n < N; n++) {
            let s = 0;
            for (let k = 0; k < K; k++) s += (tA ? A[k * M + m] : A[m * K + k]) * (tB ? B[n * K + k] : B[k * N + n]);
            out[m * N + n] = alpha * s + (beta !== 0 ? beta * C![m * N + n] : 0);
        }
    return out;
}

/** out[m, n] = x[m, n] (k[n] + offset), plus pre[m, n] when given (accumulate) */
export function refScaleColumns(
    x: ArrayLike<number>,
    k: ArrayLike<number>,
    offset: number,
    M: number,
    N: number,
    pre: ArrayLike<number> | null
): Float64Array {
    const out = new Float64Array(M * N);
    for (let m = 0; m < M; m++)
        for (let n = 0; n < N; n++) out[m * N + n] = (pre ? pre[m * N + n] : 0) + x[m * N + n] * (k[n] + offset);
    return out;
}

/** s[n] = sum_m a[m, n] (b[m, n] when b) / (div[n] when div) */
export function refColumnSums(
    a: ArrayLike<number>,
    b: ArrayLike<number> | null,
    div: ArrayLike<number> | null,
    M: number,
    N: number
): Float64Array {
    const s = new Float64Array(N);
    for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) s[n] += a[m * N + n] * (b ? b[m * N + n] : 1);
    if (div) for (let n = 0; n < N; n++) s[n] /= div[n];
    return s;
}

/** out[r] = ||W[r, :]|| of W [R, C] */
export function refRowNorms(W: ArrayLike<number>, R: number, C: number): Float64Array {
    const out = new Float64Array(R);
    for (let r = 0; r < R; r++) {
        let ss = 0;
        for (let c = 0; c < C; c++) ss += W[r * C + c] ** 2;
        out[r] = Math.sqrt(ss);
    }
    return out;
}
