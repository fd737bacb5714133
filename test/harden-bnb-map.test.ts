// harden-bnb-map.test.ts: bitsandbytes' two searches for the nearest code of a sorted 256-entry map, written once
// for the CPU and the GPU (native/include/qlora_bnb.h), against a reference written from bnb's kernels:
// dQuantize (quantize_blockwise, the codes of double quantization) re-reads the map's ends, quantize_2D (the 8-bit
// optimizer states) keeps the assumed ends [-1, 1] / [0, 1]. With the dynamic maps the two agree; maps that do not
// reach those ends, exact midpoints and NaN tell them apart, so each op is checked on such maps and values.
import {describe, test} from "node:test";
import assert from "node:assert/strict";
import {loadQuantOps} from "../src/backend/native-quant-types.js";
import {loadOptimOps} from "../src/backend/native-optim-types.js";
import {SIGNED_DYNAMIC_MAP} from "../src/quant/nf4.js";
import {Prng} from "./helpers/prng.js";

const f32 = Math.fround;

/** bnb's search (csrc kernels.cu): a 7-step binary search from index 127, then the midpoint to the neighbour on
 *  the side x lies; endsFromMap: dQuantize's re-reading of code[0] / code[255] */
function bnbSearch(code: Float32Array, x: number, signed: boolean, endsFromMap: boolean): number {
    let pivot = 127,
        upperPivot = 255,
        lowerPivot = 0;
    let lower = signed ? -1 : 0,
        upper = 1;
    let val = code[127];
    for (let i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lowerPivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upperPivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (endsFromMap) {
        if (upperPivot === 255) upper = code[255];
        if (lowerPivot === 0) lower = code[0];
    }
    if (x > val) return x > f32(f32(upper + val) * 0.5) ? upperPivot : pivot;
    return x < f32(f32(lower + val) * 0.5) ? lowerPivot : pivot;
}

const signBit = (x: number): boolean => x < 0 || Object.is(x, -0);

/** the float32 next to x towards +inf (up) or -inf */
function nextF32(x: number, up: boolean): number {
    const f = new Float32Array([x]);
    const u = new Int32Array(f.buffer);
    if (x === 0) return up ? 1.401298464324817e-45 : -1.401298464324817e-45;
    u[0] += x > 0 === up ? 1 : -1;
    return f[0];
}

/** sorted maps that stop short of -1 and 1 (one with a repeated entry), and the signed dynamic map */
function narrowSignedMap(): Float32Array {
    const m = new Float32Array(256);
    for (let k = 0; k < 256; k++) m[k] = f32(-0.6 + (1.3 * k) / 255);
    m[118] = 0; // the entry nearest zero is zero, as in the dynamic map
    m[200] = m[201];
    return m.sort();
}

function narrowUnsignedMap(): Float32Array {
    const m = new Float32Array(256);
    for (let k = 0; k < 256; k++) m[k] = f32(0.8 * (k / 255) ** 2);
    return m;
}

/** every entry, every midpoint, each +-1 ulp, both signs, the values past the ends, specials and random values */
function probeValues(code: Float32Array, seed: number): number[] {
    const xs: number[] = [0, -0, 1, -1, 0.5, -0.5, 0.65, -0.65, 0.9, -0.9, 0.99, -0.99, NaN];
    for (let k = 0; k < 256; k++) {
        const points = [code[k]];
        if (k < 255) points.push(f32(f32(code[k] + code[k + 1]) * 0.5));
        for (const p of points) {
            for (const s of [p, -p]) xs.push(s, nextF32(s, true), nextF32(s, false));
        }
    }
    const rng = new Prng(seed);
    for (let i = 0; i < 2000; i++) xs.push(f32(rng.uniform() * 2 - 1));
    return xs.filter((x) => Number.isNaN(x) || Math.abs(x) <= 1);
}

/** the values laid out in blocks of 256 that each start with 1, so every block's absmax is 1 and the ops quantize
 *  the values themselves (x * fl32(1 / 1) = x) */
function blocksOfOne(xs: number[]): Float32Array {
    const perBlock = 255,
        nblocks = Math.ceil(xs.length / perBlock);
    const out = new Float32Array(nblocks * 256);
    for (let b = 0; b < nblocks; b++) {
        out[b * 256] = 1;
        for (let j = 0; j < perBlock; j++) out[b * 256 + 1 + j] = xs[b * perBlock + j] ?? 0;
    }
    return out;
}

function countDisagreements(code: Float32Array, xs: Float32Array, signed: boolean): number {
    let n = 0;
    for (const x of xs) if (bnbSearch(code, x, signed, true) !== bnbSearch(code, x, signed, false)) n++;
    return n;
}

describe("bnb's 8-bit searches (qlora_bnb.h)", () => {
    test("quantizeBlockwise8bit is dQuantize: ends re-read from the map, ties at midpoints, NaN to code 0", () => {
        const ops = loadQuantOps();
        for (const [name, code] of [
            ["signed dynamic", SIGNED_DYNAMIC_MAP],
            ["narrow", narrowSignedMap()]
        ] as const) {
            const x = blocksOfOne(probeValues(code, 7));
            const n = x.length;
            const q = new Uint8Array(n),
                absmax = new Float32Array(n / 256);
            ops.quantizeBlockwise8bit(q, absmax, x, code, 256, n);
            assert.ok(
                absmax.every((a) => a === 1),
                `${name}: every block's absmax is 1`
            );
            for (let i = 0; i < n; i++) {
                assert.equal(q[i], bnbSearch(code, x[i], true, true), `${name} map: code of ${x[i]} (element ${i})`);
            }
            if (name === "narrow") {
                // the probe values tell dQuantize from quantize_2D on this map
                assert.ok(countDisagreements(code, x, true) > 0, "the narrow map separates the two searches");
            }
        }
    });

    test("the 8-bit AdamW state codes are quantize_2D: assumed ends [-1, 1] / [0, 1], then the sign fix", () => {
        const ops = loadOptimOps();
        const qmap1 = narrowSignedMap(),
            qmap2 = narrowUnsignedMap();
        const g = blocksOfOne(probeValues(qmap1, 8).concat(probeValues(qmap2, 9), [Infinity, -Infinity]));
        const n = g.length,
            nblocks = n / 256;
        const param = new Float32Array(n),
            state1 = new Uint8Array(n).fill(127),
            state2 = new Uint8Array(n);
        const absmax1 = new Float32Array(nblocks),
            absmax2 = new Float32Array(nblocks);
        // beta1 = beta2 = 0 and old scales of 0: m = g, v = fl32(g * g); each block's new absmax is 1 (its first g)
        ops.adamwBnb8Step(param, state1, state2, absmax1, absmax2, g, qmap1, qmap2, 0, 0, 0, 1e-8, 0, 1, 256, n);
        assert.ok(absmax1.every((a) => a === 1) && absmax2.every((a) => a === 1), "every block's new absmax is 1");
        const ms = new Float32Array(n),
            vs = new Float32Array(n);
        for (let i = 0; i < n; i++) {
            const finite = Number.isFinite(g[i]);
            const m = finite ? f32(g[i] + 0) : 0,
                v = finite ? f32(g[i] * g[i]) : 0;
            ms[i] = m;
            vs[i] = v;
            let c1 = bnbSearch(qmap1, m, true, false);
            if (signBit(qmap1[c1]) !== signBit(m)) c1 = (m > 0 ? c1 + 1 : c1 - 1) & 255;
            const c2 = bnbSearch(qmap2, v, false, false);
            assert.equal(state1[i], c1, `m = ${m} (element ${i})`);
            assert.equal(state2[i], c2, `v = ${v} (element ${i})`);
        }
        assert.ok(
            countDisagreements(qmap1, ms, true) > 0 && countDisagreements(qmap2, vs, false) > 0,
            "the narrow maps separate the two searches"
        );
    });
});

// ------------------------------------------------------------------
// the whole 8-bit step, against a float32 reference of bnb's kernel (kOptimizerStatic8bit2StateBlockwise)

/** the float32 fmaf of a, b, c (float32 values): a * b is exact in a double; the double sum s of it and c is
 *  rounded once more to float32, which is fmaf's result except where s is a float32 midpoint that the sum's
 *  rounding error (two-sum) moves off */
function fmaF32(a: number, b: number, c: number): number {
    const p = a * b,
        s = p + c;
    const bb = s - p,
        err = p - (s - bb) + (c - bb);
    const r = f32(s);
    if (err === 0 || r === s || !Number.isFinite(s)) return r;
    const other = nextF32(r, s > r);
    if (s !== (r + other) / 2) return r;
    // a midpoint: the exact sum lies on err's side of it
    return err > 0 === other > r ? other : r;
}

/** one bnb 8-bit AdamW step at step 1 (powf(beta, 1) = beta), every float32 rounding spelled out */
function bnb8StepReference(
    st: {param: Float32Array; state1: Uint8Array; state2: Uint8Array; absmax1: Float32Array; absmax2: Float32Array},
    grad: Float32Array,
    qmap1: Float32Array,
    qmap2: Float32Array,
    h: {lr: number; beta1: number; beta2: number; eps: number; wd: number},
    blocksize: number
): void {
    const lr = f32(h.lr),
        beta1 = f32(h.beta1),
        beta2 = f32(h.beta2),
        eps = f32(h.eps),
        wd = f32(h.wd);
    const correction1 = f32(1 - beta1),
        correction2 = f32(Math.sqrt(f32(1 - beta2)));
    const stepSize = f32(f32(-lr * correction2) / correction1);
    const w1 = f32(1 - beta1),
        w2 = f32(1 - beta2);
    const decay = fmaF32(-lr, wd, 1);
    const n = grad.length;
    for (let base = 0, b = 0; base < n; base += blocksize, b++) {
        const len = Math.min(blocksize, n - base);
        const old1 = st.absmax1[b],
            old2 = st.absmax2[b];
        const ms: number[] = [],
            vs: number[] = [];
        let max1 = -3.4028234663852886e38,
            max2 = -3.4028234663852886e38;
        for (let j = 0; j < len; j++) {
            const i = base + j,
                g = grad[i];
            let m = 0,
                v = 0;
            if (Number.isFinite(g)) {
                v = fmaF32(f32(w2 * g), g, f32(f32(qmap2[st.state2[i]] * old2) * beta2));
                m = fmaF32(w1, g, f32(f32(qmap1[st.state1[i]] * old1) * beta1));
            }
            ms.push(m);
            vs.push(v);
            max1 = Math.max(max1, Math.abs(m));
            max2 = Math.max(max2, Math.abs(v));
        }
        if (len < blocksize) {
            // bnb pads the last block with g = 0 and codes 128 / 0
            max1 = Math.max(max1, Math.abs(f32(f32(qmap1[128] * old1) * beta1)));
            max2 = Math.max(max2, 0);
        }
        st.absmax1[b] = max1;
        st.absmax2[b] = max2;
        for (let j = 0; j < len; j++) {
            const i = base + j,
                m = ms[j],
                v = vs[j];
            if (Number.isFinite(grad[i])) {
                let p = fmaF32(stepSize, f32(m / fmaF32(correction2, eps, f32(Math.sqrt(v)))), st.param[i]);
                if (wd > 0) p = f32(p * decay);
                st.param[i] = p;
            }
            let c1 = bnbSearch(qmap1, f32(m / max1), true, false);
            if (signBit(qmap1[c1]) !== signBit(m)) c1 = (m > 0 ? c1 + 1 : c1 - 1) & 255;
            st.state1[i] = c1;
            st.state2[i] = bnbSearch(qmap2, f32(v / max2), false, false);
        }
    }
}

describe("the 8-bit AdamW step (native/cpu/optim.cpp)", () => {
    test("random states, gradients of every scale, non-finite ones and zero blocks: bnb's kernel bit for bit", () => {
        const ops = loadOptimOps();
        const qmap1 = new Float32Array(256),
            qmap2 = new Float32Array(256);
        ops.optimDynamicMap(qmap1, true);
        ops.optimDynamicMap(qmap2, false);
        const rng = new Prng(21);
        let elements = 0;
        // 256: the vector code throughout; 40, 100: vectors and a scalar rest per block; 7: scalar only
        for (const [blocksize, n] of [
            [256, 256 * 12 + 77],
            [40, 1000],
            [100, 999],
            [7, 300],
            [2048, 5000]
        ]) {
            for (const wd of [0, 0.01]) {
                const nblocks = Math.ceil(n / blocksize);
                const st = {
                    param: new Float32Array(n),
                    state1: new Uint8Array(n),
                    state2: new Uint8Array(n),
                    absmax1: new Float32Array(nblocks),
                    absmax2: new Float32Array(nblocks)
                };
                const grad = new Float32Array(n);
                for (let i = 0; i < n; i++) {
                    st.param[i] = rng.normal() * 0.05;
                    st.state1[i] = rng.int(256);
                    st.state2[i] = rng.int(256);
                    // magnitudes from 1e-12 to 1e2, some exact zeros and non-finite values
                    const u = rng.uniform();
                    grad[i] =
                        u < 0.01
                            ? [NaN, Infinity, -Infinity, 0, -0][rng.int(5)]
                            : rng.normal() * 10 ** (-12 + 14 * rng.uniform());
                }
                for (let b = 0; b < nblocks; b++) {
                    st.absmax1[b] = b % 5 === 3 ? 0 : 10 ** (-8 + 8 * rng.uniform());
                    st.absmax2[b] = b % 5 === 3 ? 0 : 10 ** (-16 + 16 * rng.uniform());
                }
                // a block whose gradients are all zero or not finite: its new scales are 0 and its codes 0/0's
                grad.fill(0, 0, Math.min(n, blocksize)).fill(NaN, 0, Math.min(n, blocksize) >> 1);
                const h = {lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, wd};
                const ref = {
                    param: st.param.slice(),
                    state1: st.state1.slice(),
                    state2: st.state2.slice(),
                    absmax1: st.absmax1.slice(),
                    absmax2: st.absmax2.slice()
                };
                bnb8StepReference(ref, grad, qmap1, qmap2, h, blocksize);
                ops.adamwBnb8Step(
                    st.param,
                    st.state1,
                    st.state2,
                    st.absmax1,
                    st.absmax2,
                    grad,
                    qmap1,
                    qmap2,
                    h.lr,
                    h.beta1,
                    h.beta2,
                    h.eps,
                    h.wd,
                    1,
                    blocksize,
                    n
                );
                for (const key of ["param", "state1", "state2", "absmax1", "absmax2"] as const) {
                    const mine = st[key],
                        want = ref[key];
                    for (let i = 0; i < mine.length; i++)
                        if (!Object.is(mine[i], want[i]))
                            assert.fail(`blocksize ${blocksize}, wd ${wd}: ${key}[${i}] = ${mine[i]}, the reference ${want[i]}`);
                }
                elements += n;
            }
        }
        assert.ok(elements > 10_000);
    });
});
