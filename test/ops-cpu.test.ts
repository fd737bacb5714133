// ops-cpu.test.ts: an op-level harness for the CPU op table (native/include/qlora_ops.h), in the spirit of llm.c's
// test files and ggml's test-backend-ops. Every op except sgemm (tested elsewhere) is run through the addon and
// compared with a straightforward float64 reference written here:
//   - forwards against the float64 reference forward (HF/PyTorch semantics), with fp32-tight tolerances;
//   - backwards against central finite differences of L = sum(out * R) taken through the float64 reference
//     forward (so the FD noise is far below fp32 rounding), and against analytic float64 gradients;
//   - the accumulate rules: parameter grads (+=) accumulate into pre-filled buffers, activation grads (=)
//     overwrite pre-filled NaN garbage.
// Each check prints an llm.c-style `OK` / `NOT OK` line with its max abs and relative error.
//
// Error metric (unless a check says otherwise): rel_i = |got_i - ref_i| / (|ref_i| + floor), floor = rms(ref), so
// an element near zero is judged against the typical magnitude of the tensor; a check passes when max rel_i <= tol.
// Non-finite reference values (-inf lse, NaN conversions) must match exactly.
import {after, describe, test} from "node:test";
import assert from "node:assert/strict";
import {loadNative} from "../src/backend/native.js";
import type {CpuAddon} from "../src/backend/native-types.js";
import {Prng, randn32} from "./helpers/prng.js";

const cpu: CpuAddon = loadNative();

// ------------------------------------------------------------------
// seeded PRNG (mulberry32) and helpers



function f64(a: ArrayLike<number>): Float64Array {
    return Float64Array.from(a);
}

function nanFilled(n: number): Float32Array {
    return new Float32Array(n).fill(NaN);
}

/** k distinct indices of [0, n) (all of them when k >= n) */
function sample(rng: Prng, n: number, k: number): number[] {
    if (k >= n) return Array.from({length: n}, (_, i) => i);
    const picked = new Set<number>();
    while (picked.size < k) picked.add(rng.int(n));
    return [...picked].sort((a, b) => a - b);
}

function dot64(a: ArrayLike<number>, b: ArrayLike<number>): number {
    let s = 0;
    for (let i = 0; i < a.length; i++) s += a[i] * b[i];
    return s;
}

// ------------------------------------------------------------------
// reporting

interface Result {
    label: string;
    maxAbs: number;
    maxRel: number;
    tol: number;
    ok: boolean;
}

const results: Result[] = [];

function fmt(x: number): string {
    return Number.isFinite(x) ? x.toExponential(2) : String(x);
}

/** collects the checks of one test; done() asserts that all of them passed */
class Checker {
    private failed: string[] = [];

    private record(r: Result, extra = "", exact = false): boolean {
        results.push(r);
        const stats = exact ? "bit-exact / predicate".padEnd(47) :
            `maxabs ${fmt(r.maxAbs)}  maxrel ${fmt(r.maxRel)}  (tol ${fmt(r.tol)})`;
        const line = `${r.ok ? "OK    " : "NOT OK"} ${r.label.padEnd(58)} ${stats}${extra}`;
        console.log(line);
        if (!r.ok) this.failed.push(line);
        return r.ok;
    }

    /** got vs ref with the rel metric above; `floor` overrides rms(ref) */
    close(label: string, got: ArrayLike<number>, ref: ArrayLike<number>, tol: number, floor?: number): boolean {
        assert.equal(got.length, ref.length, `${label}: length`);
        let ss = 0, nf = 0;
        for (let i = 0; i < ref.length; i++) if (Number.isFinite(ref[i])) { ss += ref[i] * ref[i]; nf++; }
        const fl = floor ?? Math.sqrt(ss / Math.max(nf, 1));
        let maxAbs = 0, maxRel = 0, worst = -1;
        for (let i = 0; i < ref.length; i++) {
            const g = got[i], r = ref[i];
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
        const ok = maxRel <= tol;
        return this.record({label, maxAbs, maxRel, tol, ok},
            ok || worst < 0 ? "" : `  worst at [${worst}]: got ${got[worst]} ref ${ref[worst]}`);
    }

    /** bit-exact integer comparison (conversions), reporting the number of mismatches */
    exact(label: string, got: ArrayLike<number>, ref: ArrayLike<number>, show?: (i: number) => string): boolean {
        assert.equal(got.length, ref.length, `${label}: length`);
        let bad = 0, first = -1;
        for (let i = 0; i < ref.length; i++) if (got[i] !== ref[i]) { if (first < 0) first = i; bad++; }
        const ok = bad === 0;
        const extra = ok ? `  (${ref.length} values)` :
            `  ${bad}/${ref.length} mismatches, first at [${first}]: got ${got[first]} ref ${ref[first]}` +
            (show ? ` ${show(first)}` : "");
        return this.record({label, maxAbs: 0, maxRel: ok ? 0 : Infinity, tol: 0, ok}, extra, true);
    }

    /** a plain predicate */
    that(label: string, ok: boolean, detail = ""): boolean {
        return this.record({label, maxAbs: 0, maxRel: ok ? 0 : Infinity, tol: 0, ok}, detail ? `  ${detail}` : "", true);
    }

    done(): void {
        assert.equal(this.failed.length, 0, `failed checks:\n${this.failed.join("\n")}`);
    }
}

/**
 * central finite differences of L(x) = sum(forward(x) * R) with respect to x[i] for i in idx, in float64.
 * forward is called with x modified in place (and restored).
 */
function fdGrad(forward: () => Float64Array, x: Float64Array, R: Float64Array, idx: number[], h = 1e-5): Float64Array {
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

function pick(a: ArrayLike<number>, idx: number[]): Float64Array {
    return Float64Array.from(idx, (i) => a[i]);
}

after(() => {
    const worst = new Map<string, Result>();
    for (const r of results) {
        const key = r.label.split(":")[0];
        const w = worst.get(key);
        if (!w || (Number.isFinite(r.maxRel) && r.maxRel > w.maxRel)) worst.set(key, r);
    }
    console.log("\nsummary (largest maxrel per op family):");
    for (const [key, r] of worst) console.log(`  ${key.padEnd(24)} maxrel ${fmt(r.maxRel)}  maxabs ${fmt(r.maxAbs)}`);
    const bad = results.filter((r) => !r.ok).length;
    console.log(`${results.length - bad}/${results.length} checks OK`);
});

// ------------------------------------------------------------------
// dtype conversion references

const cvF32 = new Float32Array(1);
const cvU32 = new Uint32Array(cvF32.buffer);

function bitsToF32(b: number): number {
    cvU32[0] = b >>> 0;
    return cvF32[0];
}

function f32ToBits(x: number): number {
    cvF32[0] = x;
    return cvU32[0];
}

/** value of an IEEE binary format with ebits/mbits given its bits (NaN for NaNs) */
function decodeFloat(bits: number, ebits: number, mbits: number): number {
    const bias = (1 << (ebits - 1)) - 1;
    const sign = (bits >>> (ebits + mbits)) & 1 ? -1 : 1;
    const e = (bits >>> mbits) & ((1 << ebits) - 1);
    const m = bits & ((1 << mbits) - 1);
    if (e === (1 << ebits) - 1) return m ? NaN : sign * Infinity;
    if (e === 0) return sign * m * 2 ** (1 - bias - mbits);
    return sign * (1 + m / 2 ** mbits) * 2 ** (e - bias);
}

function roundHalfEven(q: number): number {
    const f = Math.floor(q), d = q - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
}

/**
 * bits of the IEEE binary format (ebits, mbits) nearest to the (exactly representable in float64) value x,
 * ties to even, overflow to inf as IEEE round-to-nearest does. Not for NaN.
 */
function encodeRne(x: number, ebits: number, mbits: number): number {
    const bias = (1 << (ebits - 1)) - 1, allOnes = (1 << ebits) - 1;
    const sign = x < 0 || Object.is(x, -0) ? 2 ** (ebits + mbits) : 0;
    const a = Math.abs(x);
    if (a === Infinity) return sign + allOnes * 2 ** mbits;
    const emin = 1 - bias;
    let e = emin;
    if (a > 0) {
        e = Math.floor(Math.log2(a));
        while (2 ** e > a) e--;
        while (2 ** (e + 1) <= a) e++;
        e = Math.max(e, emin);
    }
    let m = roundHalfEven(a / 2 ** (e - mbits));  // exact division by a power of two
    if (m === 2 ** (mbits + 1)) { m = 2 ** mbits; e++; }
    if (m < 2 ** mbits) return sign + m;  // subnormal (or zero)
    if (e + bias >= allOnes) return sign + allOnes * 2 ** mbits;  // overflow
    return sign + (e + bias) * 2 ** mbits + (m - 2 ** mbits);
}

/** f32 bit patterns exercising conversion to a format with mbits mantissa bits and the given exponent range */
function conversionInputs(rng: Prng, mbits: number, eLo: number, eHi: number): Uint32Array {
    const drop = 23 - mbits, half = 1 << (drop - 1);
    const out: number[] = [];
    const special = [
        0x00000000, 0x80000000,  // +-0
        0x3f800000, 0xbf800000,  // +-1
        0x7f800000, 0xff800000,  // +-inf
        0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fbfffff, 0x7f810000, 0x7fc00001,  // NaNs (quiet, signaling)
        0x00000001, 0x80000001, 0x007fffff, 0x00400000, 0x00008000, 0x00018000,  // f32 subnormals
        0x00800000, 0x7f7fffff, 0xff7fffff, 0x7f7f8000, 0x7f7f7fff,  // FLT_MIN, FLT_MAX, near the bf16 overflow edge
        f32ToBits(65504), f32ToBits(65519), f32ToBits(65519.996), f32ToBits(65520), f32ToBits(65536), f32ToBits(-65520),
        f32ToBits(2 ** -24), f32ToBits(2 ** -25), f32ToBits(2 ** -25 * (1 + 2 ** -23)), f32ToBits(3 * 2 ** -26),
        f32ToBits(2 ** -26), f32ToBits(2 ** -14), f32ToBits(2 ** -14 - 2 ** -25), f32ToBits(1023 * 2 ** -24 + 2 ** -25),
        f32ToBits(1 + 2 ** -8), f32ToBits(1 + 3 * 2 ** -8), f32ToBits(1 + 2 ** -11), f32ToBits(1 + 3 * 2 ** -11),
        f32ToBits(-(1 + 2 ** -8)), f32ToBits(-(1 + 3 * 2 ** -11)), f32ToBits(0.1), f32ToBits(-3.14159),
    ];
    out.push(...special);
    for (let i = 0; i < 40000; i++) out.push(rng.u32());  // any pattern
    for (let i = 0; i < 60000; i++) {
        // exponent in range, mantissa random / a tie / one off a tie, either parity of the kept lsb
        const sign = rng.u32() & 0x80000000;
        const exp = eLo + rng.int(eHi - eLo + 1);
        let mant = rng.u32() & 0x7fffff;
        const kind = rng.int(4);
        if (kind === 1) mant = (mant & ~((1 << drop) - 1)) | half;
        else if (kind === 2) mant = (mant & ~((1 << drop) - 1)) | (half - 1);
        else if (kind === 3) mant = (mant & ~((1 << drop) - 1)) | (half + 1);
        out.push((sign | (exp << 23) | mant) >>> 0);
    }
    return Uint32Array.from(out);
}

// ------------------------------------------------------------------

describe("dtype conversion", () => {
    test("bf16ToF32 / f16ToF32: all 65536 values", () => {
        const c = new Checker();
        // 3 leading extra values so that every value goes through both the SIMD body and a tail somewhere
        const n = 65536 + 3;
        const inp = new Uint16Array(n);
        for (let i = 0; i < n; i++) inp[i] = (i + 65533) & 0xffff;
        for (const [name, ebits, mbits] of [["bf16ToF32", 8, 7], ["f16ToF32", 5, 10]] as const) {
            const out = nanFilled(n);
            cpu[name](out, inp, n);
            const got = new Uint32Array(out.buffer);
            const ref = new Uint32Array(n);
            const nan = new Uint8Array(n);
            for (let i = 0; i < n; i++) {
                const v = decodeFloat(inp[i], ebits, mbits);
                if (Number.isNaN(v)) {
                    nan[i] = 1;
                    // NaN: bf16 is a plain shift (payload kept); f16 must give a NaN of the same sign
                    ref[i] = name === "bf16ToF32" ? (inp[i] << 16) >>> 0 : got[i];
                    const g = got[i];
                    if ((g & 0x7f800000) !== 0x7f800000 || (g & 0x7fffff) === 0 || (g >>> 31) !== inp[i] >>> 15)
                        ref[i] = ~g >>> 0;  // force a mismatch
                } else {
                    ref[i] = f32ToBits(v);
                }
            }
            c.exact(`${name}: exhaustive (±0, subnormals, inf, NaN)`, got, ref,
                (i) => `input 0x${inp[i].toString(16)}${nan[i] ? " (NaN)" : ""}`);
            // the short, scalar-only path
            const small = Uint16Array.from([0x0001, 0x8000, 0x7c00, 0x3c00, 0x03ff]);
            const o5 = new Float32Array(5);
            cpu[name](o5, small, 5);
            c.exact(`${name}: n=5 (scalar tail only)`, new Uint32Array(o5.buffer),
                Uint32Array.from(small, (b) => f32ToBits(decodeFloat(b, ebits, mbits))));
        }
        c.done();
    });

    test("f32ToBf16 / f32ToF16: round to nearest even, subnormals, overflow, NaN", () => {
        const c = new Checker();
        const rng = new Prng(11);
        for (const [name, ebits, mbits, eLo, eHi] of [
            ["f32ToBf16", 8, 7, 0, 254],
            ["f32ToF16", 5, 10, 127 - 27, 127 + 16],
        ] as const) {
            const bits = conversionInputs(rng, mbits, eLo, eHi);
            const n = bits.length;
            const out = new Uint16Array(n).fill(0xdead);
            cpu[name](out, new Float32Array(bits.buffer), n);
            const ref = new Uint16Array(n);
            for (let i = 0; i < n; i++) {
                const x = bitsToF32(bits[i]);
                if (Number.isNaN(x)) {
                    // NaN in, NaN of the same sign out (payload not specified)
                    const g = out[i];
                    const expMask = ((1 << ebits) - 1) << mbits;
                    const isNan = (g & expMask) === expMask && (g & ((1 << mbits) - 1)) !== 0;
                    ref[i] = isNan && g >>> 15 === bits[i] >>> 31 ? g : ~g & 0xffff;
                } else {
                    ref[i] = encodeRne(x, ebits, mbits);
                }
            }
            c.exact(`${name}: ${n} f32 patterns (ties, near-ties, edges)`, out, ref,
                (i) => `input 0x${bits[i].toString(16)} = ${bitsToF32(bits[i])}`);
            // spot checks spelled out, so a failure reads plainly
            const spot: [number, number][] = name === "f32ToF16"
                ? [[65504, 0x7bff], [65519, 0x7bff], [65520, 0x7c00], [1e6, 0x7c00], [-1e6, 0xfc00], [2 ** -24, 0x0001],
                    [2 ** -25, 0x0000], [3 * 2 ** -26, 0x0001], [-(2 ** -25), 0x8000], [1 + 2 ** -11, 0x3c00],
                    [1 + 3 * 2 ** -11, 0x3c02], [1e-10, 0x0000], [-0, 0x8000]]
                : [[1 + 2 ** -8, 0x3f80], [1 + 3 * 2 ** -8, 0x3f82], [3.4028234663852886e38, 0x7f80],
                    [bitsToF32(0x7f7f7fff), 0x7f7f], [bitsToF32(0x00000001), 0x0000], [bitsToF32(0x00008000), 0x0000],
                    [bitsToF32(0x00018000), 0x0002], [-0, 0x8000], [-Infinity, 0xff80]];
            const sx = Float32Array.from(spot, (s) => s[0]);
            const so = new Uint16Array(spot.length);
            cpu[name](so, sx, spot.length);
            c.exact(`${name}: spelled-out edge values`, so, spot.map((s) => s[1]),
                (i) => `input ${spot[i][0]}`);
        }
        c.done();
    });
});

// ------------------------------------------------------------------

describe("elementwise", () => {
    test("addInplace", () => {
        const c = new Checker();
        const rng = new Prng(21);
        for (const n of [7, 100003]) {
            const y = randn32(rng, n), x = randn32(rng, n);
            const ref = Float32Array.from(y, (v, i) => v + x[i]);  // one fp32 rounding of an exact sum
            cpu.addInplace(y, x, n);
            c.exact(`addInplace: n=${n}`, new Uint32Array(y.buffer), new Uint32Array(ref.buffer));
        }
        c.done();
    });

    test("addBias (also in place)", () => {
        const c = new Checker();
        const rng = new Prng(22);
        for (const [N, C] of [[5, 13], [300, 257]]) {
            const inp = randn32(rng, N * C), bias = randn32(rng, C);
            const ref = Float32Array.from(inp, (v, i) => v + bias[i % C]);
            const out = nanFilled(N * C);
            cpu.addBias(out, inp, bias, N, C);
            c.exact(`addBias: N=${N} C=${C}`, new Uint32Array(out.buffer), new Uint32Array(ref.buffer));
            cpu.addBias(inp, inp, bias, N, C);
            c.exact(`addBias: N=${N} C=${C} in place`, new Uint32Array(inp.buffer), new Uint32Array(ref.buffer));
        }
        c.done();
    });
});

// ------------------------------------------------------------------

function refEmbedding(ids: Int32Array, table: Float64Array, C: number): Float64Array {
    const out = new Float64Array(ids.length * C);
    for (let n = 0; n < ids.length; n++) for (let c = 0; c < C; c++) out[n * C + c] = table[ids[n] * C + c];
    return out;
}

describe("embedding", () => {
    test("embeddingForward copies rows; out-of-range ids are reported", () => {
        const c = new Checker();
        const rng = new Prng(31);
        for (const [N, V, C] of [[23, 50, 37], [200, 64, 300]]) {
            const table = randn32(rng, V * C);
            const ids = Int32Array.from({length: N}, () => rng.int(V));
            ids[0] = 0;
            ids[N - 1] = V - 1;
            const out = nanFilled(N * C);
            const r = cpu.embeddingForward(out, ids, table, N, V, C);
            c.that(`embeddingForward: N=${N} V=${V} C=${C} returns -1`, r === -1, `returned ${r}`);
            c.exact(`embeddingForward: N=${N} V=${V} C=${C} rows`, new Uint32Array(out.buffer),
                new Uint32Array(Float32Array.from(refEmbedding(ids, f64(table), C)).buffer));
        }
        const V = 10, C = 4;
        const table = randn32(rng, V * C);
        for (const [ids, want] of [[[1, 2, 3, V, 4, -1], 3], [[0, -1, 9], 1], [[0, 9, 5, -7, V + 100], 3],
            [[9, 9, 0, V], 3]] as const) {
            const i32 = Int32Array.from(ids);
            const r = cpu.embeddingForward(new Float32Array(ids.length * C), i32, table, ids.length, V, C);
            c.that(`embeddingForward: bad ids [${ids.join(",")}] (V=${V}) -> index ${want}`, r === want,
                `returned ${r}`);
        }
        c.done();
    });

    test("embeddingBackward accumulates (+=), repeated ids sum; matches FD", () => {
        const c = new Checker();
        const rng = new Prng(32);
        for (const [N, V, C] of [[23, 9, 37], [120, 40, 300]]) {
            const ids = Int32Array.from({length: N}, () => rng.int(V - 1));  // id V-1 never occurs
            ids[1] = ids[2] = ids[7] = 3;  // repeats
            const table = randn32(rng, V * C);
            const dout = randn32(rng, N * C);
            const pre = randn32(rng, V * C);  // a previous micro-batch's gradient
            const dtable = Float32Array.from(pre);
            cpu.embeddingBackward(dtable, dout, ids, N, V, C);
            const grad = new Float64Array(V * C);
            for (let n = 0; n < N; n++) for (let k = 0; k < C; k++) grad[ids[n] * C + k] += dout[n * C + k];
            c.close(`embeddingBackward: N=${N} V=${V} C=${C} dtable += grad`, dtable,
                grad.map((g, i) => g + pre[i]), 1e-6);
            const untouched = new Uint32Array(dtable.buffer, (V - 1) * C * 4, C);
            c.exact(`embeddingBackward: N=${N} C=${C} unused row bit-identical`, untouched,
                new Uint32Array(pre.buffer, (V - 1) * C * 4, C));
            // second call accumulates again
            cpu.embeddingBackward(dtable, dout, ids, N, V, C);
            c.close(`embeddingBackward: N=${N} V=${V} C=${C} twice`, dtable, grad.map((g, i) => 2 * g + pre[i]), 1e-6);
            // FD of L = sum(embedding(table) * dout) in float64
            const t64 = f64(table), R = f64(dout);
            const idx = sample(rng, V * C, 300);
            const fd = fdGrad(() => refEmbedding(ids, t64, C), t64, R, idx);
            const fresh = new Float32Array(V * C);
            cpu.embeddingBackward(fresh, dout, ids, N, V, C);
            c.close(`embeddingBackward: N=${N} C=${C} vs FD`, pick(fresh, idx), fd, 1e-6);
        }
        assert.throws(() => cpu.embeddingBackward(new Float32Array(40), new Float32Array(8), Int32Array.from([1, 10]),
            2, 10, 4), RangeError);
        c.done();
    });
});

// ------------------------------------------------------------------
// RMSNorm (HF: y = w * x / sqrt(mean(x^2) + eps))

function refRmsnorm(x: Float64Array, w: Float64Array, N: number, C: number, eps: number): {out: Float64Array; rstd: Float64Array} {
    const out = new Float64Array(N * C), rstd = new Float64Array(N);
    for (let n = 0; n < N; n++) {
        let ss = 0;
        for (let k = 0; k < C; k++) ss += x[n * C + k] ** 2;
        const r = 1 / Math.sqrt(ss / C + eps);
        rstd[n] = r;
        for (let k = 0; k < C; k++) out[n * C + k] = w[k] * x[n * C + k] * r;
    }
    return {out, rstd};
}

function refRmsnormBackward(g: Float64Array, x: Float64Array, w: Float64Array, N: number, C: number, eps: number) {
    const dx = new Float64Array(N * C), dw = new Float64Array(C);
    const {rstd} = refRmsnorm(x, w, N, C, eps);
    for (let n = 0; n < N; n++) {
        const r = rstd[n];
        let s = 0;
        for (let k = 0; k < C; k++) s += w[k] * g[n * C + k] * x[n * C + k];
        for (let k = 0; k < C; k++) {
            dx[n * C + k] = r * w[k] * g[n * C + k] - x[n * C + k] * r ** 3 * s / C;
            dw[k] += g[n * C + k] * x[n * C + k] * r;
        }
    }
    return {dx, dw};
}

describe("rmsnorm", () => {
    const cases = [
        {N: 7, C: 96, eps: 1e-6, fd: 10000},
        {N: 5, C: 13, eps: 1e-5, fd: 10000},
        {N: 64, C: 1024, eps: 1e-6, fd: 200},
    ];
    for (const {N, C, eps, fd} of cases) {
        test(`rmsnorm N=${N} C=${C} eps=${eps}`, () => {
            const c = new Checker();
            const rng = new Prng(41 + C);
            const x = randn32(rng, N * C);
            for (let n = 0; n < N; n++) {
                const s = [1, 10, 0.01][n % 3];
                for (let k = 0; k < C; k++) x[n * C + k] *= s;
            }
            x.fill(0, 2 * C, 3 * C);  // an all-zero row: out = 0, rstd = 1/sqrt(eps)
            const w = randn32(rng, C, 0.2, 1);
            const eps32 = Math.fround(eps);
            const ref = refRmsnorm(f64(x), f64(w), N, C, eps32);
            const out = nanFilled(N * C), rstd = nanFilled(N);
            cpu.rmsnormForward(out, rstd, x, w, N, C, eps32);
            c.close(`rmsnormForward: N=${N} C=${C} out`, out, ref.out, 1e-6);
            c.close(`rmsnormForward: N=${N} C=${C} rstd`, rstd, ref.rstd, 1e-6, 0);
            const out2 = nanFilled(N * C);
            cpu.rmsnormForward(out2, null, x, w, N, C, eps32);
            c.exact(`rmsnormForward: N=${N} C=${C} rstd=null same out`, new Uint32Array(out2.buffer),
                new Uint32Array(out.buffer));

            const g = randn32(rng, N * C);
            const dinp = nanFilled(N * C);  // activation grad: overwritten
            const pre = randn32(rng, C);  // parameter grad: accumulated
            const dw = Float32Array.from(pre);
            cpu.rmsnormBackward(dinp, dw, g, x, w, rstd, N, C);
            const x64 = f64(x), w64 = f64(w), g64 = f64(g);
            const an = refRmsnormBackward(g64, x64, w64, N, C, eps32);
            c.close(`rmsnormBackward: N=${N} C=${C} dinp (=) vs analytic`, dinp, an.dx, 4e-6);
            c.close(`rmsnormBackward: N=${N} C=${C} dweight (+=) vs analytic`, dw, an.dw.map((v, i) => v + pre[i]), 4e-6);
            const idx = sample(rng, N * C, fd);
            const fdx = fdGrad(() => refRmsnorm(x64, w64, N, C, eps32).out, x64, g64, idx);
            c.close(`rmsnormBackward: N=${N} C=${C} dinp vs FD`, pick(dinp, idx), fdx, 4e-6);
            const idw = sample(rng, C, 64);
            const fdw = fdGrad(() => refRmsnorm(x64, w64, N, C, eps32).out, w64, g64, idw);
            c.close(`rmsnormBackward: N=${N} C=${C} dweight vs FD`,
                Float64Array.from(idw, (i) => dw[i] - pre[i]), fdw, 4e-6);
            const dinp2 = nanFilled(N * C);
            cpu.rmsnormBackward(dinp2, null, g, x, w, rstd, N, C);
            c.exact(`rmsnormBackward: N=${N} C=${C} dweight=null same dinp`, new Uint32Array(dinp2.buffer),
                new Uint32Array(dinp.buffer));
            c.done();
        });
    }
});

// ------------------------------------------------------------------
// RoPE, rotate_half: pairs (i, i + D/2); angle = pos * inv_freq[i], rounded to fp32 as transformers computes it
// (inv_freq @ position_ids in float32); cos/sin then taken in float64.

function ropeAngles(pos: Int32Array, invFreq: Float32Array): Float64Array {
    const half = invFreq.length, a = new Float64Array(pos.length * half);
    for (let n = 0; n < pos.length; n++) for (let i = 0; i < half; i++) a[n * half + i] = Math.fround(pos[n] * invFreq[i]);
    return a;
}

function refRope(x: Float64Array, angles: Float64Array, scaling: number, N: number, H: number, D: number,
    inverse = false): Float64Array {
    const half = D / 2, out = new Float64Array(N * H * D);
    for (let n = 0; n < N; n++) {
        for (let h = 0; h < H; h++) {
            const o = (n * H + h) * D;
            for (let i = 0; i < half; i++) {
                const cs = Math.cos(angles[n * half + i]) * scaling;
                const sn = (inverse ? -1 : 1) * Math.sin(angles[n * half + i]) * scaling;
                const x0 = x[o + i], x1 = x[o + i + half];
                // x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[half:], x[:half])
                out[o + i] = x0 * cs - x1 * sn;
                out[o + i + half] = x1 * cs + x0 * sn;
            }
        }
    }
    return out;
}

describe("rope", () => {
    const cases = [
        {N: 6, H: 3, D: 64, base: 10000, scaling: 1, pos: [0, 1, 2, 17, 100, 511]},
        {N: 5, H: 2, D: 24, base: 1000000, scaling: 1.25, pos: [0, 3, 4095, 32767, 7]},
        {N: 40, H: 4, D: 128, base: 500000, scaling: 1, pos: Array.from({length: 40}, (_, i) => 2 * i + 1)},
    ];
    for (const {N, H, D, base, scaling, pos: posList} of cases) {
        test(`rope N=${N} H=${H} D=${D} scaling=${scaling}`, () => {
            const c = new Checker();
            const rng = new Prng(51 + D);
            const half = D / 2;
            const invFreq = Float32Array.from({length: half}, (_, i) => 1 / base ** (2 * i / D));
            const pos = Int32Array.from(posList);
            const angles = ropeAngles(pos, invFreq);
            const sc = Math.fround(scaling);
            const x = randn32(rng, N * H * D);
            const x64 = f64(x);
            const ref = refRope(x64, angles, sc, N, H, D);
            const out = nanFilled(N * H * D);
            cpu.ropeForward(out, x, pos, invFreq, sc, N, H, D);
            const tag = `N=${N} H=${H} D=${D}`;
            c.close(`ropeForward: ${tag} out`, out, ref, 2e-6);
            const inplace = Float32Array.from(x);
            cpu.ropeForward(inplace, inplace, pos, invFreq, sc, N, H, D);
            c.exact(`ropeForward: ${tag} in place`, new Uint32Array(inplace.buffer), new Uint32Array(out.buffer));

            const g = randn32(rng, N * H * D), g64 = f64(g);
            const dinp = nanFilled(N * H * D);
            cpu.ropeBackward(dinp, g, pos, invFreq, sc, N, H, D);
            c.close(`ropeBackward: ${tag} vs analytic R^T dout`, dinp, refRope(g64, angles, sc, N, H, D, true), 2e-6);
            const idx = sample(rng, N * H * D, 400);
            const fd = fdGrad(() => refRope(x64, angles, sc, N, H, D), x64, g64, idx);
            c.close(`ropeBackward: ${tag} vs FD`, pick(dinp, idx), fd, 2e-6);
            const gi = Float32Array.from(g);
            cpu.ropeBackward(gi, gi, pos, invFreq, sc, N, H, D);
            c.exact(`ropeBackward: ${tag} in place`, new Uint32Array(gi.buffer), new Uint32Array(dinp.buffer));
            // backward(forward(x)) = scaling^2 x
            const rt = new Float32Array(N * H * D);
            cpu.ropeBackward(rt, out, pos, invFreq, sc, N, H, D);
            c.close(`ropeBackward: ${tag} R^T R x = s^2 x`, rt, x64.map((v) => v * sc * sc), 2e-6);
            c.done();
        });
    }
});

// ------------------------------------------------------------------
// attention

interface AttnCase {
    name: string;
    B: number;
    T: number;
    S: number;
    Hq: number;
    Hkv: number;
    D: number;
    qOffset: number;
    keyValid?: number[][];  // [B][S]
    seg?: number[][];  // [B][S]
    fd: number;  // FD coordinates sampled per tensor
    expectMasked?: boolean;  // some query row sees no key
}

interface AttnInputs {
    c: AttnCase;
    kv: Uint8Array | null;
    seg: Int32Array | null;
    scale: number;
}

function visible(a: AttnInputs, b: number, j: number, qpos: number): boolean {
    const {S} = a.c;
    if (j > qpos) return false;
    if (a.kv && !a.kv[b * S + j]) return false;
    if (a.seg && a.seg[b * S + j] !== a.seg[b * S + qpos]) return false;
    return true;
}

/** softmax(q k^T * scale + mask) v in float64; lse of the scaled scores (-inf for a row with no visible key) */
function refAttention(a: AttnInputs, q: Float64Array, k: Float64Array, v: Float64Array) {
    const {B, T, S, Hq, Hkv, D, qOffset} = a.c;
    const G = Hq / Hkv;
    const out = new Float64Array(B * T * Hq * D), lse = new Float64Array(B * Hq * T);
    const p = new Float64Array(S);
    for (let b = 0; b < B; b++) {
        for (let h = 0; h < Hq; h++) {
            const hk = Math.floor(h / G);  // repeat_kv: query head h uses kv head h // G
            for (let t = 0; t < T; t++) {
                const qpos = qOffset + t, qo = ((b * T + t) * Hq + h) * D;
                let m = -Infinity;
                for (let j = 0; j < S; j++) {
                    if (!visible(a, b, j, qpos)) { p[j] = -Infinity; continue; }
                    const ko = ((b * S + j) * Hkv + hk) * D;
                    let s = 0;
                    for (let d = 0; d < D; d++) s += q[qo + d] * k[ko + d];
                    p[j] = s * a.scale;
                    if (p[j] > m) m = p[j];
                }
                if (m === -Infinity) { lse[(b * Hq + h) * T + t] = -Infinity; continue; }
                let sum = 0;
                for (let j = 0; j < S; j++) { p[j] = p[j] === -Infinity ? 0 : Math.exp(p[j] - m); sum += p[j]; }
                lse[(b * Hq + h) * T + t] = m + Math.log(sum);
                for (let j = 0; j < S; j++) {
                    if (p[j] === 0) continue;
                    const w = p[j] / sum, vo = ((b * S + j) * Hkv + hk) * D;
                    for (let d = 0; d < D; d++) out[qo + d] += w * v[vo + d];
                }
            }
        }
    }
    return {out, lse};
}

function refAttentionBackward(a: AttnInputs, q: Float64Array, k: Float64Array, v: Float64Array, g: Float64Array) {
    const {B, T, S, Hq, Hkv, D, qOffset} = a.c;
    const G = Hq / Hkv;
    const {out, lse} = refAttention(a, q, k, v);
    const dq = new Float64Array(q.length), dk = new Float64Array(k.length), dv = new Float64Array(v.length);
    for (let b = 0; b < B; b++) {
        for (let h = 0; h < Hq; h++) {
            const hk = Math.floor(h / G);
            for (let t = 0; t < T; t++) {
                const l = lse[(b * Hq + h) * T + t];
                if (l === -Infinity) continue;
                const qpos = qOffset + t, qo = ((b * T + t) * Hq + h) * D;
                let di = 0;
                for (let d = 0; d < D; d++) di += g[qo + d] * out[qo + d];
                for (let j = 0; j < S; j++) {
                    if (!visible(a, b, j, qpos)) continue;
                    const ko = ((b * S + j) * Hkv + hk) * D;
                    let s = 0, dp = 0;
                    for (let d = 0; d < D; d++) { s += q[qo + d] * k[ko + d]; dp += g[qo + d] * v[ko + d]; }
                    const pj = Math.exp(s * a.scale - l), ds = pj * (dp - di) * a.scale;
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

const attnCases: AttnCase[] = [
    {name: "causal gqa", B: 2, T: 7, S: 7, Hq: 4, Hkv: 2, D: 24, qOffset: 0, fd: 400},
    {name: "causal mha", B: 1, T: 16, S: 16, Hq: 3, Hkv: 3, D: 64, qOffset: 0, fd: 150},
    {
        name: "key padding", B: 3, T: 9, S: 9, Hq: 4, Hkv: 2, D: 24, qOffset: 0, fd: 200, expectMasked: true,
        keyValid: [
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 1, 1, 1, 1],  // left padding: queries 0..2 see no key
            [1, 1, 1, 1, 1, 1, 1, 0, 0],  // right padding
        ],
    },
    {
        name: "packed seg", B: 2, T: 10, S: 10, Hq: 2, Hkv: 1, D: 64, qOffset: 0, fd: 200, expectMasked: true,
        seg: [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 7, 7, 7, 7, 7]],
        keyValid: [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]],  // query 5 of b=1 sees nothing
    },
    {
        name: "kv-cache", B: 2, T: 3, S: 11, Hq: 4, Hkv: 2, D: 64, qOffset: 8, fd: 150,
        keyValid: [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]],
    },
    {
        name: "packed seg + kv-cache", B: 2, T: 4, S: 10, Hq: 4, Hkv: 2, D: 24, qOffset: 6, fd: 300,
        seg: [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [3, 3, 3, 3, 3, 3, 3, 4, 4, 4]],
    },
    {name: "decode T=1", B: 4, T: 1, S: 13, Hq: 4, Hkv: 4, D: 24, qOffset: 12, fd: 200},
    {name: "chunk q_offset<S-T", B: 1, T: 4, S: 12, Hq: 4, Hkv: 2, D: 24, qOffset: 5, fd: 300},
    {name: "long", B: 1, T: 64, S: 64, Hq: 4, Hkv: 2, D: 64, qOffset: 0, fd: 25},
];

describe("attention", () => {
    for (const ac of attnCases) {
        const {B, T, S, Hq, Hkv, D, qOffset} = ac;
        const tag = `${ac.name} B=${B} T=${T} S=${S} Hq=${Hq} Hkv=${Hkv} D=${D} off=${qOffset}`;
        test(tag, () => {
            const c = new Checker();
            const rng = new Prng(61 + B * 100 + T * 10 + D);
            const a: AttnInputs = {
                c: ac,
                kv: ac.keyValid ? Uint8Array.from(ac.keyValid.flat()) : null,
                seg: ac.seg ? Int32Array.from(ac.seg.flat()) : null,
                scale: Math.fround(1 / Math.sqrt(D)),
            };
            const nq = B * T * Hq * D, nk = B * S * Hkv * D;
            const q = randn32(rng, nq, 1.5), k = randn32(rng, nk, 1.5), v = randn32(rng, nk);
            const q64 = f64(q), k64 = f64(k), v64 = f64(v);
            const ref = refAttention(a, q64, k64, v64);
            const out = nanFilled(nq), lse = nanFilled(B * Hq * T);
            cpu.attentionForward(out, lse, q, k, v, a.kv, a.seg, B, T, S, Hq, Hkv, D, qOffset, a.scale);
            const short = ac.name;
            c.close(`attentionForward: ${short} out`, out, ref.out, 1e-5);
            c.close(`attentionForward: ${short} lse`, lse, ref.lse, 2e-6);
            if (ac.expectMasked) {
                const masked = [...ref.lse.keys()].filter((i) => ref.lse[i] === -Infinity);
                let zeros = masked.length > 0;
                for (const i of masked) {
                    const b = Math.floor(i / (Hq * T)), h = Math.floor(i / T) % Hq, t = i % T;
                    const o = ((b * T + t) * Hq + h) * D;
                    for (let d = 0; d < D; d++) if (!Object.is(out[o + d], 0)) zeros = false;
                    if (lse[i] !== -Infinity) zeros = false;
                }
                c.that(`attentionForward: ${short} fully-masked rows: out=0, lse=-inf`, zeros,
                    `${masked.length} masked rows`);
            }
            const out2 = nanFilled(nq);
            cpu.attentionForward(out2, null, q, k, v, a.kv, a.seg, B, T, S, Hq, Hkv, D, qOffset, a.scale);
            c.exact(`attentionForward: ${short} lse=null same out`, new Uint32Array(out2.buffer),
                new Uint32Array(out.buffer));

            const g = randn32(rng, nq), g64 = f64(g);
            const dq = nanFilled(nq), dk = nanFilled(nk), dv = nanFilled(nk);  // all (=): garbage must go
            cpu.attentionBackward(dq, dk, dv, g, q, k, v, out, lse, a.kv, a.seg, B, T, S, Hq, Hkv, D, qOffset, a.scale);
            const an = refAttentionBackward(a, q64, k64, v64, g64);
            c.close(`attentionBackward: ${short} dq vs analytic`, dq, an.dq, 2e-5);
            c.close(`attentionBackward: ${short} dk vs analytic`, dk, an.dk, 2e-5);
            c.close(`attentionBackward: ${short} dv vs analytic`, dv, an.dv, 2e-5);
            for (const [nm, x, got] of [["dq", q64, dq], ["dk", k64, dk], ["dv", v64, dv]] as const) {
                const idx = sample(rng, x.length, ac.fd);
                const fd = fdGrad(() => refAttention(a, q64, k64, v64).out, x, g64, idx);
                c.close(`attentionBackward: ${short} ${nm} vs FD`, pick(got, idx), fd, 2e-5);
            }
            c.done();
        });
    }

    test("attention rejects bad sizes", () => {
        const z = new Float32Array(4096);
        assert.throws(() => cpu.attentionForward(z, null, z, z, z, null, null, 1, 4, 4, 3, 2, 8, 0, 1), RangeError);
        assert.throws(() => cpu.attentionForward(z, null, z, z, z, null, null, 1, 4, 6, 2, 2, 8, 3, 1), RangeError);
    });
});

// ------------------------------------------------------------------
// SwiGLU: out = silu(gate) * up

function silu64(g: number): number {
    return g / (1 + Math.exp(-g));
}

describe("swiglu", () => {
    test("swigluForward / swigluBackward", () => {
        const c = new Checker();
        const rng = new Prng(71);
        for (const n of [9, 100003]) {
            const gate = randn32(rng, n, 4), up = randn32(rng, n);
            const edges = [0, -0, 1e-30, -1e-30, 20, -20, 88, -88, 89, -89, 100, -100, -200];
            edges.forEach((e, i) => { if (i < n) gate[i] = e; });
            const out = nanFilled(n);
            cpu.swigluForward(out, gate, up, n);
            c.close(`swigluForward: n=${n}`, out, Float64Array.from(gate, (g, i) => silu64(g) * up[i]), 2e-6);
            const dout = randn32(rng, n);
            const dg = nanFilled(n), du = nanFilled(n);
            cpu.swigluBackward(dg, du, dout, gate, up, n);
            const refDg = new Float64Array(n), refDu = new Float64Array(n), fdDg = new Float64Array(n), fdDu = new Float64Array(n);
            const h = 1e-5;
            for (let i = 0; i < n; i++) {
                const x = gate[i], u = up[i], d = dout[i];
                const s = 1 / (1 + Math.exp(-x));
                refDu[i] = d * x * s;
                refDg[i] = d * u * s * (1 + x * (1 - s));
                // out_i depends on gate_i and up_i only, so FD of L = sum(out * dout) is elementwise
                fdDg[i] = (silu64(x + h) - silu64(x - h)) / (2 * h) * u * d;
                fdDu[i] = (silu64(x) * (u + h) - silu64(x) * (u - h)) / (2 * h) * d;
            }
            c.close(`swigluBackward: n=${n} dgate vs analytic`, dg, refDg, 4e-6);
            c.close(`swigluBackward: n=${n} dup vs analytic`, du, refDu, 4e-6);
            c.close(`swigluBackward: n=${n} dgate vs FD`, dg, fdDg, 4e-6);
            c.close(`swigluBackward: n=${n} dup vs FD`, du, fdDu, 4e-6);
        }
        c.done();
    });
});

// ------------------------------------------------------------------
// softmax cross-entropy

function rowLse(x: ArrayLike<number>, off: number, V: number): number {
    let m = -Infinity;
    for (let v = 0; v < V; v++) if (x[off + v] > m) m = x[off + v];
    let s = 0;
    for (let v = 0; v < V; v++) s += Math.exp(x[off + v] - m);
    return m + Math.log(s);
}

describe("cross-entropy", () => {
    test("crossEntropyForward / crossEntropyBackward, V=16389, ignored targets, in place", () => {
        const c = new Checker();
        const rng = new Prng(81);
        const N = 7, V = 16389;
        const logits = randn32(rng, N * V, 3);
        for (let v = 0; v < V; v++) logits[3 * V + v] += 40;  // a shifted row
        logits[4 * V + 0] = 30;  // a confident row (target 0 carries ~all the mass)
        const targets = Int32Array.from([17, -100, 5000, V - 1, 0, -1, 12345]);
        const loss = nanFilled(N), lse = nanFilled(N);
        const count = cpu.crossEntropyForward(loss, lse, logits, targets, N, V);
        c.that("crossEntropyForward: returns the number of counted rows", count === 5, `returned ${count}`);
        const refLse = new Float64Array(N), refLoss = new Float64Array(N);
        for (let n = 0; n < N; n++) {
            refLse[n] = rowLse(logits, n * V, V);
            refLoss[n] = targets[n] >= 0 ? refLse[n] - logits[n * V + targets[n]] : 0;
        }
        c.close("crossEntropyForward: lse", lse, refLse, 1e-6, 0);
        c.close("crossEntropyForward: loss (0 for ignored rows)", loss, refLoss, 2e-6);
        c.that("crossEntropyForward: ignored rows give loss exactly 0", Object.is(loss[1], 0) && Object.is(loss[5], 0));
        const loss2 = nanFilled(N);
        cpu.crossEntropyForward(loss2, null, logits, targets, N, V);
        c.exact("crossEntropyForward: lse=null same loss", new Uint32Array(loss2.buffer), new Uint32Array(loss.buffer));

        const scale = Math.fround(1 / count);
        const refD = new Float64Array(N * V);
        for (let n = 0; n < N; n++) {
            if (targets[n] < 0) continue;
            for (let v = 0; v < V; v++) refD[n * V + v] = Math.exp(logits[n * V + v] - refLse[n]) * scale;
            refD[n * V + targets[n]] -= scale;
        }
        // the off-target entries p * scale are checked with a pure relative error; the target entries
        // (p_t - 1) * scale cancel when p_t ~ 1, so they are judged relative to |ref| + scale
        const dl = nanFilled(N * V);
        cpu.crossEntropyBackward(dl, logits, lse, targets, scale, N, V);
        const isTarget = (i: number) => targets[Math.floor(i / V)] === i % V;
        // got/ref are aligned with idx (got[k] is the entry idx[k])
        const checkD = (label: string, idx: number[], got: ArrayLike<number>, ref: ArrayLike<number>) => {
            const off = [...idx.keys()].filter((k) => !isTarget(idx[k]));
            const on = [...idx.keys()].filter((k) => isTarget(idx[k]));
            c.close(`${label} off-target`, pick(got, off), pick(ref, off), 2e-5, 1e-30);
            c.close(`${label} target`, pick(got, on), pick(ref, on), 1e-6, scale);
        };
        const counted = Array.from({length: N * V}, (_, i) => i).filter((i) => targets[Math.floor(i / V)] >= 0);
        checkD("crossEntropyBackward: dlogits (=) vs analytic", counted, pick(dl, counted), pick(refD, counted));
        c.close("crossEntropyBackward: ignored rows are zero", [...dl.subarray(V, 2 * V), ...dl.subarray(5 * V, 6 * V)],
            new Float64Array(2 * V), 0, 1);
        const inplace = Float32Array.from(logits);
        cpu.crossEntropyBackward(inplace, inplace, lse, targets, scale, N, V);
        c.exact("crossEntropyBackward: in place (dlogits aliases logits)", new Uint32Array(inplace.buffer),
            new Uint32Array(dl.buffer));
        // FD of L = scale * sum(loss): perturbing logit v of row n moves only loss[n]; the row's lse under a
        // perturbation of +-h is lse + log1p(p_v * expm1(+-h)), which keeps the difference free of cancellation
        const idx = sample(rng, N * V, 400).filter((i) => targets[Math.floor(i / V)] >= 0);
        for (let n = 0; n < N; n++) if (targets[n] >= 0) idx.push(n * V + targets[n]);  // every target logit
        const fd = Float64Array.from(idx, (i) => {
            const n = Math.floor(i / V), v = i % V, t = targets[n];
            const h = 1e-4, p = Math.exp(logits[i] - refLse[n]);
            const d = Math.log1p(p * Math.expm1(h)) - Math.log1p(p * Math.expm1(-h)) - (v === t ? 2 * h : 0);
            return scale * d / (2 * h);
        });
        checkD("crossEntropyBackward: dlogits vs FD", idx, pick(dl, idx), fd);
        c.done();
    });
});
