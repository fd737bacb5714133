// ops-cpu.test.ts: an op-level harness for the raw CPU op table (native/include/qlora_ops.h), in the spirit of llm.c's
// test files. What the Backend op table (test/helpers/backend-ops.ts, run by test/backend-ops.test.ts) does not
// reach is tested here: dtype conversions, addBias, the forms of the raw ops the Backend never calls (out of place
// RoPE, RMSNorm's dweight, the attention backward with a KV-cache offset, cross-entropy over a large vocabulary)
// and the accumulate/overwrite rules on the raw addon. Embedding, SwiGLU and addInplace, which the Backend calls
// exactly as the addon has them, are covered by the table only. The float64 references are shared with the table
// (test/helpers/reference-ops.ts):
//   - forwards against the float64 reference forward (HF/PyTorch semantics), with fp32-tight tolerances;
//   - backwards against central finite differences of L = sum(out * R) taken through the float64 reference
//     forward (so the FD noise is far below fp32 rounding), and against analytic float64 gradients;
//   - the accumulate rules: parameter grads (+=) accumulate into pre-filled buffers, activation grads (=)
//     overwrite pre-filled NaN garbage.
// Each check prints an llm.c-style `OK` / `NOT OK` line with its max abs and relative error.
//
// Error metric (unless a check says otherwise): errorStats of reference-ops.ts, max |got - ref| / (|ref| + rms(ref));
// a check passes when it is <= tol. Non-finite reference values (-inf lse, NaN conversions) must match exactly.
import {after, describe, test} from "node:test";
import assert from "node:assert/strict";
import {loadNative} from "../src/backend/native.js";
import type {CpuAddon} from "../src/backend/native-types.js";
import {Prng, randn32} from "./helpers/prng.js";
import {
    type AttnProblem,
    errorStats,
    f64,
    fdGrad,
    nanFilled,
    pick,
    refAttention,
    refAttentionBackward,
    refRmsnorm,
    refRmsnormBackward,
    refRope,
    ropeAngles,
    rowLse,
    sample
} from "./helpers/reference-ops.js";

const cpu: CpuAddon = loadNative();

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
        const stats = exact
            ? "bit-exact / predicate".padEnd(47)
            : `maxabs ${fmt(r.maxAbs)}  maxrel ${fmt(r.maxRel)}  (tol ${fmt(r.tol)})`;
        const line = `${r.ok ? "OK    " : "NOT OK"} ${r.label.padEnd(58)} ${stats}${extra}`;
        console.log(line);
        if (!r.ok) this.failed.push(line);
        return r.ok;
    }

    /** got vs ref with errorStats' metric; `floor` overrides rms(ref) */
    close(label: string, got: ArrayLike<number>, ref: ArrayLike<number>, tol: number, floor?: number): boolean {
        assert.equal(got.length, ref.length, `${label}: length`);
        const {maxAbs, maxRel, worst} = errorStats(got, ref, floor);
        const ok = maxRel <= tol;
        return this.record(
            {label, maxAbs, maxRel, tol, ok},
            ok || worst < 0 ? "" : `  worst at [${worst}]: got ${got[worst]} ref ${ref[worst]}`
        );
    }

    /** bit-exact integer comparison (conversions), reporting the number of mismatches */
    exact(label: string, got: ArrayLike<number>, ref: ArrayLike<number>, show?: (i: number) => string): boolean {
        assert.equal(got.length, ref.length, `${label}: length`);
        let bad = 0,
            first = -1;
        for (let i = 0; i < ref.length; i++)
            if (got[i] !== ref[i]) {
                if (first < 0) first = i;
                bad++;
            }
        const ok = bad === 0;
        const extra = ok
            ? `  (${ref.length} values)`
            : `  ${bad}/${ref.length} mismatches, first at [${first}]: got ${got[first]} ref ${ref[first]}` +
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
    const f = Math.floor(q),
        d = q - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
}

/**
 * bits of the IEEE binary format (ebits, mbits) nearest to the (exactly representable in float64) value x,
 * ties to even, overflow to inf as IEEE round-to-nearest does. Not for NaN.
 */
function encodeRne(x: number, ebits: number, mbits: number): number {
    const bias = (1 << (ebits - 1)) - 1,
        allOnes = (1 << ebits) - 1;
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
    let m = roundHalfEven(a / 2 ** (e - mbits)); // exact division by a power of two
    if (m === 2 ** (mbits + 1)) {
        m = 2 ** mbits;
        e++;
    }
    if (m < 2 ** mbits) return sign + m; // subnormal (or zero)
    if (e + bias >= allOnes) return sign + allOnes * 2 ** mbits; // overflow
    return sign + (e + bias) * 2 ** mbits + (m - 2 ** mbits);
}

/** f32 bit patterns exercising conversion to a format with mbits mantissa bits and the given exponent range */
function conversionInputs(rng: Prng, mbits: number, eLo: number, eHi: number): Uint32Array {
    const drop = 23 - mbits,
        half = 1 << (drop - 1);
    const out: number[] = [];
    const special = [
        0x00000000,
        0x80000000, // +-0
        0x3f800000,
        0xbf800000, // +-1
        0x7f800000,
        0xff800000, // +-inf
        0x7fc00000,
        0xffc00000,
        0x7f800001,
        0xff800001,
        0x7fbfffff,
        0x7f810000,
        0x7fc00001, // NaNs (quiet, signaling)
        0x00000001,
        0x80000001,
        0x007fffff,
        0x00400000,
        0x00008000,
        0x00018000, // f32 subnormals
        0x00800000,
        0x7f7fffff,
        0xff7fffff,
        0x7f7f8000,
        0x7f7f7fff, // FLT_MIN, FLT_MAX, near the bf16 overflow edge
        f32ToBits(65504),
        f32ToBits(65519),
        f32ToBits(65519.996),
        f32ToBits(65520),
        f32ToBits(65536),
        f32ToBits(-65520),
        f32ToBits(2 ** -24),
        f32ToBits(2 ** -25),
        f32ToBits(2 ** -25 * (1 + 2 ** -23)),
        f32ToBits(3 * 2 ** -26),
        f32ToBits(2 ** -26),
        f32ToBits(2 ** -14),
        f32ToBits(2 ** -14 - 2 ** -25),
        f32ToBits(1023 * 2 ** -24 + 2 ** -25),
        f32ToBits(1 + 2 ** -8),
        f32ToBits(1 + 3 * 2 ** -8),
        f32ToBits(1 + 2 ** -11),
        f32ToBits(1 + 3 * 2 ** -11),
        f32ToBits(-(1 + 2 ** -8)),
        f32ToBits(-(1 + 3 * 2 ** -11)),
        f32ToBits(0.1),
        // biome-ignore lint/suspicious/noApproximativeNumericConstant: a float to round, not pi
        f32ToBits(-3.14159)
    ];
    out.push(...special);
    for (let i = 0; i < 40000; i++) out.push(rng.u32()); // any pattern
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
        for (const [name, ebits, mbits] of [
            ["bf16ToF32", 8, 7],
            ["f16ToF32", 5, 10]
        ] as const) {
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
                    if ((g & 0x7f800000) !== 0x7f800000 || (g & 0x7fffff) === 0 || g >>> 31 !== inp[i] >>> 15) ref[i] = ~g >>> 0; // force a mismatch
                } else {
                    ref[i] = f32ToBits(v);
                }
            }
            c.exact(
                `${name}: exhaustive (±0, subnormals, inf, NaN)`,
                got,
                ref,
                (i) => `input 0x${inp[i].toString(16)}${nan[i] ? " (NaN)" : ""}`
            );
            // the short, scalar-only path
            const small = Uint16Array.from([0x0001, 0x8000, 0x7c00, 0x3c00, 0x03ff]);
            const o5 = new Float32Array(5);
            cpu[name](o5, small, 5);
            c.exact(
                `${name}: n=5 (scalar tail only)`,
                new Uint32Array(o5.buffer),
                Uint32Array.from(small, (b) => f32ToBits(decodeFloat(b, ebits, mbits)))
            );
        }
        c.done();
    });

    test("f32ToBf16 / f32ToF16: round to nearest even, subnormals, overflow, NaN", () => {
        const c = new Checker();
        const rng = new Prng(11);
        for (const [name, ebits, mbits, eLo, eHi] of [
            ["f32ToBf16", 8, 7, 0, 254],
            ["f32ToF16", 5, 10, 127 - 27, 127 + 16]
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
            c.exact(
                `${name}: ${n} f32 patterns (ties, near-ties, edges)`,
                out,
                ref,
                (i) => `input 0x${bits[i].toString(16)} = ${bitsToF32(bits[i])}`
            );
            // spot checks spelled out, so a failure reads plainly
            const spot: [number, number][] =
                name === "f32ToF16"
                    ? [
                          [65504, 0x7bff],
                          [65519, 0x7bff],
                          [65520, 0x7c00],
                          [1e6, 0x7c00],
                          [-1e6, 0xfc00],
                          [2 ** -24, 0x0001],
                          [2 ** -25, 0x0000],
                          [3 * 2 ** -26, 0x0001],
                          [-(2 ** -25), 0x8000],
                          [1 + 2 ** -11, 0x3c00],
                          [1 + 3 * 2 ** -11, 0x3c02],
                          [1e-10, 0x0000],
                          [-0, 0x8000]
                      ]
                    : [
                          [1 + 2 ** -8, 0x3f80],
                          [1 + 3 * 2 ** -8, 0x3f82],
                          [3.4028234663852886e38, 0x7f80],
                          [bitsToF32(0x7f7f7fff), 0x7f7f],
                          [bitsToF32(0x00000001), 0x0000],
                          [bitsToF32(0x00008000), 0x0000],
                          [bitsToF32(0x00018000), 0x0002],
                          [-0, 0x8000],
                          [-Infinity, 0xff80]
                      ];
            const sx = Float32Array.from(spot, (s) => s[0]);
            const so = new Uint16Array(spot.length);
            cpu[name](so, sx, spot.length);
            c.exact(
                `${name}: spelled-out edge values`,
                so,
                spot.map((s) => s[1]),
                (i) => `input ${spot[i][0]}`
            );
        }
        c.done();
    });
});

// ------------------------------------------------------------------

describe("elementwise", () => {
    test("addBias (also in place)", () => {
        const c = new Checker();
        const rng = new Prng(22);
        for (const [N, C] of [
            [5, 13],
            [300, 257]
        ]) {
            const inp = randn32(rng, N * C),
                bias = randn32(rng, C);
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
// embedding: rows, bad ids and the backward's += are in the Backend table; the raw addon's own size check is here

describe("embedding", () => {
    test("embeddingBackward refuses an id outside [0, V) (RangeError, nothing written)", () => {
        const dtable = new Float32Array(40);
        assert.throws(() => cpu.embeddingBackward(dtable, new Float32Array(8), Int32Array.from([1, 10]), 2, 10, 4), RangeError);
        assert.ok(dtable.every((v) => v === 0));
    });
});

// ------------------------------------------------------------------
// RMSNorm (HF: y = w * x / sqrt(mean(x^2) + eps))

describe("rmsnorm", () => {
    const cases = [
        {N: 7, C: 96, eps: 1e-6, fd: 10000},
        {N: 5, C: 13, eps: 1e-5, fd: 10000},
        {N: 64, C: 1024, eps: 1e-6, fd: 200}
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
            x.fill(0, 2 * C, 3 * C); // an all-zero row: out = 0, rstd = 1/sqrt(eps)
            const w = randn32(rng, C, 0.2, 1);
            const eps32 = Math.fround(eps);
            const ref = refRmsnorm(f64(x), f64(w), N, C, eps32);
            const out = nanFilled(N * C),
                rstd = nanFilled(N);
            cpu.rmsnormForward(out, rstd, x, w, N, C, eps32);
            c.close(`rmsnormForward: N=${N} C=${C} out`, out, ref.out, 1e-6);
            c.close(`rmsnormForward: N=${N} C=${C} rstd`, rstd, ref.rstd, 1e-6, 0);
            const out2 = nanFilled(N * C);
            cpu.rmsnormForward(out2, null, x, w, N, C, eps32);
            c.exact(
                `rmsnormForward: N=${N} C=${C} rstd=null same out`,
                new Uint32Array(out2.buffer),
                new Uint32Array(out.buffer)
            );

            const g = randn32(rng, N * C);
            const dinp = nanFilled(N * C); // activation grad: overwritten
            const pre = randn32(rng, C); // parameter grad: accumulated
            const dw = Float32Array.from(pre);
            cpu.rmsnormBackward(dinp, dw, g, x, w, rstd, N, C);
            const x64 = f64(x),
                w64 = f64(w),
                g64 = f64(g);
            const an = refRmsnormBackward(g64, x64, w64, N, C, eps32);
            c.close(`rmsnormBackward: N=${N} C=${C} dinp (=) vs analytic`, dinp, an.dx, 4e-6);
            c.close(
                `rmsnormBackward: N=${N} C=${C} dweight (+=) vs analytic`,
                dw,
                an.dw.map((v, i) => v + pre[i]),
                4e-6
            );
            const idx = sample(rng, N * C, fd);
            const fdx = fdGrad(() => refRmsnorm(x64, w64, N, C, eps32).out, x64, g64, idx);
            c.close(`rmsnormBackward: N=${N} C=${C} dinp vs FD`, pick(dinp, idx), fdx, 4e-6);
            const idw = sample(rng, C, 64);
            const fdw = fdGrad(() => refRmsnorm(x64, w64, N, C, eps32).out, w64, g64, idw);
            c.close(
                `rmsnormBackward: N=${N} C=${C} dweight vs FD`,
                Float64Array.from(idw, (i) => dw[i] - pre[i]),
                fdw,
                4e-6
            );
            const dinp2 = nanFilled(N * C);
            cpu.rmsnormBackward(dinp2, null, g, x, w, rstd, N, C);
            c.exact(
                `rmsnormBackward: N=${N} C=${C} dweight=null same dinp`,
                new Uint32Array(dinp2.buffer),
                new Uint32Array(dinp.buffer)
            );
            c.done();
        });
    }
});

// ------------------------------------------------------------------
// RoPE (references: reference-ops.ts)

describe("rope", () => {
    const cases = [
        {N: 6, H: 3, D: 64, base: 10000, scaling: 1, pos: [0, 1, 2, 17, 100, 511]},
        {N: 5, H: 2, D: 24, base: 1000000, scaling: 1.25, pos: [0, 3, 4095, 32767, 7]},
        {N: 40, H: 4, D: 128, base: 500000, scaling: 1, pos: Array.from({length: 40}, (_, i) => 2 * i + 1)}
    ];
    for (const {N, H, D, base, scaling, pos: posList} of cases) {
        test(`rope N=${N} H=${H} D=${D} scaling=${scaling}`, () => {
            const c = new Checker();
            const rng = new Prng(51 + D);
            const half = D / 2;
            const invFreq = Float32Array.from({length: half}, (_, i) => 1 / base ** ((2 * i) / D));
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

            const g = randn32(rng, N * H * D),
                g64 = f64(g);
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
            c.close(
                `ropeBackward: ${tag} R^T R x = s^2 x`,
                rt,
                x64.map((v) => v * sc * sc),
                2e-6
            );
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
    keyValid?: number[][]; // [B][S]
    seg?: number[][]; // [B][S]
    fd: number; // FD coordinates sampled per tensor
    expectMasked?: boolean; // some query row sees no key
    window?: number; // sliding window (keys qpos - window < j <= qpos)
}

const attnCases: AttnCase[] = [
    {name: "causal gqa", B: 2, T: 7, S: 7, Hq: 4, Hkv: 2, D: 24, qOffset: 0, fd: 400},
    {name: "causal mha", B: 1, T: 16, S: 16, Hq: 3, Hkv: 3, D: 64, qOffset: 0, fd: 150},
    {
        name: "key padding",
        B: 3,
        T: 9,
        S: 9,
        Hq: 4,
        Hkv: 2,
        D: 24,
        qOffset: 0,
        fd: 200,
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
        D: 64,
        qOffset: 0,
        fd: 200,
        expectMasked: true,
        seg: [
            [0, 0, 0, 1, 1, 1, 1, 2, 2, 2],
            [5, 5, 5, 5, 5, 7, 7, 7, 7, 7]
        ],
        keyValid: [
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]
        ] // query 5 of b=1 sees nothing
    },
    {
        name: "kv-cache",
        B: 2,
        T: 3,
        S: 11,
        Hq: 4,
        Hkv: 2,
        D: 64,
        qOffset: 8,
        fd: 150,
        keyValid: [
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        ]
    },
    {
        name: "packed seg + kv-cache",
        B: 2,
        T: 4,
        S: 10,
        Hq: 4,
        Hkv: 2,
        D: 24,
        qOffset: 6,
        fd: 300,
        seg: [
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
            [3, 3, 3, 3, 3, 3, 3, 4, 4, 4]
        ]
    },
    {name: "decode T=1", B: 4, T: 1, S: 13, Hq: 4, Hkv: 4, D: 24, qOffset: 12, fd: 200},
    {name: "chunk q_offset<S-T", B: 1, T: 4, S: 12, Hq: 4, Hkv: 2, D: 24, qOffset: 5, fd: 300},
    {name: "long", B: 1, T: 64, S: 64, Hq: 4, Hkv: 2, D: 64, qOffset: 0, fd: 25},
    {name: "window gqa", B: 2, T: 12, S: 12, Hq: 4, Hkv: 2, D: 24, qOffset: 0, fd: 300, window: 4},
    {name: "window 1 (itself only)", B: 1, T: 6, S: 6, Hq: 2, Hkv: 1, D: 24, qOffset: 0, fd: 200, window: 1},
    {
        name: "window + padding",
        B: 2,
        T: 9,
        S: 9,
        Hq: 4,
        Hkv: 2,
        D: 24,
        qOffset: 0,
        fd: 200,
        window: 3,
        expectMasked: true,
        keyValid: [
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0, 1, 1, 1] // query 5 of b=1 sees keys 3..5 only: all hidden
        ]
    },
    {
        name: "window + packed seg",
        B: 1,
        T: 10,
        S: 10,
        Hq: 2,
        Hkv: 1,
        D: 24,
        qOffset: 0,
        fd: 200,
        window: 3,
        seg: [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]
    },
    {name: "window + kv-cache", B: 2, T: 3, S: 11, Hq: 4, Hkv: 2, D: 24, qOffset: 8, fd: 200, window: 5},
    {name: "window decode T=1", B: 2, T: 1, S: 13, Hq: 4, Hkv: 2, D: 24, qOffset: 12, fd: 200, window: 6}
];

describe("attention", () => {
    for (const ac of attnCases) {
        const {B, T, S, Hq, Hkv, D, qOffset} = ac;
        const tag = `${ac.name} B=${B} T=${T} S=${S} Hq=${Hq} Hkv=${Hkv} D=${D} off=${qOffset}`;
        test(tag, () => {
            const c = new Checker();
            const rng = new Prng(61 + B * 100 + T * 10 + D);
            const kv = ac.keyValid ? Uint8Array.from(ac.keyValid.flat()) : null;
            const seg = ac.seg ? Int32Array.from(ac.seg.flat()) : null;
            const window = ac.window ?? 0;
            const a: AttnProblem = {
                B,
                T,
                S,
                Hq,
                Hkv,
                D,
                qOffset,
                keyValid: kv,
                seg,
                scale: Math.fround(1 / Math.sqrt(D)),
                window
            };
            const nq = B * T * Hq * D,
                nk = B * S * Hkv * D;
            const q = randn32(rng, nq, 1.5),
                k = randn32(rng, nk, 1.5),
                v = randn32(rng, nk);
            const q64 = f64(q),
                k64 = f64(k),
                v64 = f64(v);
            const ref = refAttention(a, q64, k64, v64);
            const out = nanFilled(nq),
                lse = nanFilled(B * Hq * T);
            cpu.attentionForward(out, lse, q, k, v, kv, seg, B, T, S, Hq, Hkv, D, qOffset, a.scale, window);
            const short = ac.name;
            if (window > 0) {
                // the window must change the result (it hides keys), and a window covering every key must not
                const full = nanFilled(nq),
                    wide = nanFilled(nq);
                cpu.attentionForward(full, null, q, k, v, kv, seg, B, T, S, Hq, Hkv, D, qOffset, a.scale);
                cpu.attentionForward(wide, null, q, k, v, kv, seg, B, T, S, Hq, Hkv, D, qOffset, a.scale, S + qOffset);
                c.that(
                    `attentionForward: ${short} differs from no window`,
                    full.some((x, i) => x !== out[i]),
                    ""
                );
                c.exact(
                    `attentionForward: ${short} window >= S is no window`,
                    new Uint32Array(wide.buffer),
                    new Uint32Array(full.buffer)
                );
            }
            c.close(`attentionForward: ${short} out`, out, ref.out, 1e-5);
            c.close(`attentionForward: ${short} lse`, lse, ref.lse, 2e-6);
            if (ac.expectMasked) {
                const masked = [...ref.lse.keys()].filter((i) => ref.lse[i] === -Infinity);
                let zeros = masked.length > 0;
                for (const i of masked) {
                    const b = Math.floor(i / (Hq * T)),
                        h = Math.floor(i / T) % Hq,
                        t = i % T;
                    const o = ((b * T + t) * Hq + h) * D;
                    for (let d = 0; d < D; d++) if (!Object.is(out[o + d], 0)) zeros = false;
                    if (lse[i] !== -Infinity) zeros = false;
                }
                c.that(`attentionForward: ${short} fully-masked rows: out=0, lse=-inf`, zeros, `${masked.length} masked rows`);
            }
            const out2 = nanFilled(nq);
            cpu.attentionForward(out2, null, q, k, v, kv, seg, B, T, S, Hq, Hkv, D, qOffset, a.scale, window);
            c.exact(`attentionForward: ${short} lse=null same out`, new Uint32Array(out2.buffer), new Uint32Array(out.buffer));

            const g = randn32(rng, nq),
                g64 = f64(g);
            const dq = nanFilled(nq),
                dk = nanFilled(nk),
                dv = nanFilled(nk); // all (=): garbage must go
            cpu.attentionBackward(dq, dk, dv, g, q, k, v, out, lse, kv, seg, B, T, S, Hq, Hkv, D, qOffset, a.scale, window);
            const an = refAttentionBackward(a, q64, k64, v64, g64);
            c.close(`attentionBackward: ${short} dq vs analytic`, dq, an.dq, 2e-5);
            c.close(`attentionBackward: ${short} dk vs analytic`, dk, an.dk, 2e-5);
            c.close(`attentionBackward: ${short} dv vs analytic`, dv, an.dv, 2e-5);
            for (const [nm, x, got] of [
                ["dq", q64, dq],
                ["dk", k64, dk],
                ["dv", v64, dv]
            ] as const) {
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
        assert.throws(
            () => cpu.attentionForward(z, null, z, z, z, null, null, 1, 4, 4, 2, 2, 8, 0, 1, -1),
            /window must be >= 0/
        );
    });
});

// ------------------------------------------------------------------
// softmax cross-entropy

describe("cross-entropy", () => {
    test("crossEntropyForward / crossEntropyBackward, V=16389, ignored targets, in place", () => {
        const c = new Checker();
        const rng = new Prng(81);
        const N = 7,
            V = 16389;
        const logits = randn32(rng, N * V, 3);
        for (let v = 0; v < V; v++) logits[3 * V + v] += 40; // a shifted row
        logits[4 * V + 0] = 30; // a confident row (target 0 carries ~all the mass)
        const targets = Int32Array.from([17, -100, 5000, V - 1, 0, -1, 12345]);
        const loss = nanFilled(N),
            lse = nanFilled(N);
        const count = cpu.crossEntropyForward(loss, lse, logits, targets, N, V);
        c.that("crossEntropyForward: returns the number of counted rows", count === 5, `returned ${count}`);
        const refLse = new Float64Array(N),
            refLoss = new Float64Array(N);
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
        c.close(
            "crossEntropyBackward: ignored rows are zero",
            [...dl.subarray(V, 2 * V), ...dl.subarray(5 * V, 6 * V)],
            new Float64Array(2 * V),
            0,
            1
        );
        const inplace = Float32Array.from(logits);
        cpu.crossEntropyBackward(inplace, inplace, lse, targets, scale, N, V);
        c.exact(
            "crossEntropyBackward: in place (dlogits aliases logits)",
            new Uint32Array(inplace.buffer),
            new Uint32Array(dl.buffer)
        );
        // FD of L = scale * sum(loss): perturbing logit v of row n moves only loss[n]; the row's lse under a
        // perturbation of +-h is lse + log1p(p_v * expm1(+-h)), which keeps the difference free of cancellation
        const idx = sample(rng, N * V, 400).filter((i) => targets[Math.floor(i / V)] >= 0);
        for (let n = 0; n < N; n++) if (targets[n] >= 0) idx.push(n * V + targets[n]); // every target logit
        const fd = Float64Array.from(idx, (i) => {
            const n = Math.floor(i / V),
                v = i % V,
                t = targets[n];
            const h = 1e-4,
                p = Math.exp(logits[i] - refLse[n]);
            const d = Math.log1p(p * Math.expm1(h)) - Math.log1p(p * Math.expm1(-h)) - (v === t ? 2 * h : 0);
            return (scale * d) / (2 * h);
        });
        checkD("crossEntropyBackward: dlogits vs FD", idx, pick(dl, idx), fd);
        c.done();
    });
});
