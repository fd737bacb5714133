// kernels.test.ts: the CUDA kernels (native/cuda/kernels.h) against the CPU ops (native/cpu/ops.cpp) on seeded
// random inputs of several shapes, odd sizes and misaligned buffers included (GPU machine only: npm run test:gpu).
//
// Inputs are rounded to bf16 once and the same values go to both backends: the GPU reads the bf16 bits, the CPU
// their exact f32 values. Tolerances:
//   - bf16 outputs: relative L2 error <= 1e-2 against the CPU's f32 output. Rounding the output to bf16 alone
//     costs ~2^-9 relative (rms ~1e-3), so 1e-2 leaves room for fp32 summation-order differences, not for a bug.
//     Forwards without cancellation-prone sums (conversions, RMSNorm out, RoPE, SwiGLU) are also checked element by
//     element: |gpu - cpu| <= 1 bf16 ulp of the CPU value (+ a floor of 1e-5 rms for values near zero), i.e. the
//     GPU's fp32 result rounds to the CPU's bf16 or its neighbour. Backwards print that count but only
//     assert the L2 error (their subtractions can cancel, so single small elements may differ by more).
//   - f32 statistics (rstd, lse, loss) and f32 gradients: max |gpu - cpu| / (|cpu| + rms(cpu)) <= 1e-5.
//   - exact ops (conversions, copies, bf16 residual add): bit equality.
// A timing table (GB/s) closes the file; it only prints.
import {after, describe, test} from "node:test";
import assert from "node:assert/strict";
import {CudaGraph, cudaAvailability, DeviceBuffer, type DeviceDtype} from "../../src/backend/cuda.js";
import {cpu} from "../../src/backend/cpu.js";
import {GATED_ACTS} from "../../src/backend/backend.js";
import {cudaKernelOps, type CudaKernelOps} from "../../src/backend/cuda-kernels-types.js";
import {Prng, randn32 as randn} from "../helpers/prng.js";
import {timeIt} from "../helpers/gpu-timing.js";

// ------------------------------------------------------------------
// helpers

/** x rounded to bf16: the bits (for the GPU) and their exact f32 values (for the CPU) */
function bf16(x: Float32Array): {bits: Uint16Array; vals: Float32Array} {
    const bits = new Uint16Array(x.length);
    cpu().f32ToBf16(bits, x, x.length);
    const vals = new Float32Array(x.length);
    cpu().bf16ToF32(vals, bits, x.length);
    return {bits, vals};
}

function bitsToF32(bits: Uint16Array): Float32Array {
    const out = new Float32Array(bits.length);
    cpu().bf16ToF32(out, bits, bits.length);
    return out;
}

function rms(a: ArrayLike<number>): number {
    let s = 0;
    for (let i = 0; i < a.length; i++) s += a[i] * a[i];
    return Math.sqrt(s / Math.max(1, a.length));
}

function relL2(got: ArrayLike<number>, ref: ArrayLike<number>): number {
    assert.equal(got.length, ref.length);
    let num = 0,
        den = 0;
    for (let i = 0; i < ref.length; i++) {
        const d = got[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

/** max |got - ref| / (|ref| + rms(ref)) */
function maxRel(got: ArrayLike<number>, ref: ArrayLike<number>): number {
    assert.equal(got.length, ref.length);
    const floor = rms(ref) || 1e-30;
    let m = 0;
    for (let i = 0; i < ref.length; i++) {
        const e = Math.abs(got[i] - ref[i]) / (Math.abs(ref[i]) + floor);
        if (!(e <= m)) m = e; // NaN propagates
    }
    return m;
}

function bf16Ulp(x: number): number {
    const a = Math.abs(x);
    if (a === 0 || !Number.isFinite(a)) return 0;
    return 2 ** (Math.floor(Math.log2(a)) - 7);
}

/** elements where |got - ref| > 1 bf16 ulp of ref + floorRel * rms(ref) */
function beyondUlp(got: ArrayLike<number>, ref: ArrayLike<number>, floorRel = 1e-5): number {
    const floor = floorRel * rms(ref);
    let count = 0;
    for (let i = 0; i < ref.length; i++) if (!(Math.abs(got[i] - ref[i]) <= bf16Ulp(ref[i]) + floor)) count++;
    return count;
}

function bitsEqualCount(a: Uint16Array | Uint32Array, b: Uint16Array | Uint32Array): number {
    let diff = 0;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) diff++;
    return diff;
}

function fmt(x: number): string {
    return x === 0 ? "0" : x.toExponential(2);
}

function report(ok: boolean, what: string, detail: string): void {
    console.log(`${ok ? "OK    " : "NOT OK"} ${what}: ${detail}`);
}

/** asserts a bf16 output: relative L2 <= tol; strict: also <= 1 ulp element-wise */
function checkBf16(what: string, gotBits: Uint16Array, ref: Float32Array, strict: boolean, tol = 1e-2, floorRel = 1e-5): void {
    const got = bitsToF32(gotBits);
    const l2 = relL2(got, ref);
    const beyond = beyondUlp(got, ref, floorRel);
    const ok = l2 <= tol && (!strict || beyond === 0);
    report(
        ok,
        what,
        `relL2 ${fmt(l2)} (tol ${fmt(tol)}), > 1 ulp: ${beyond} of ${ref.length}` + (strict ? " (must be 0)" : " (printed only)")
    );
    assert.ok(l2 <= tol, `${what}: relative L2 error ${l2} > ${tol}`);
    if (strict) assert.equal(beyond, 0, `${what}: ${beyond} elements differ from the CPU by more than 1 bf16 ulp`);
}

function checkF32(what: string, got: Float32Array, ref: Float32Array, tol = 1e-5): void {
    const e = maxRel(got, ref);
    report(e <= tol, what, `maxRel ${fmt(e)} (tol ${fmt(tol)})`);
    assert.ok(e <= tol, `${what}: max relative error ${e} > ${tol}`);
}

// ------------------------------------------------------------------
// device buffers, freed at the end

const live: DeviceBuffer[] = [];

function upload(dtype: DeviceDtype, data: Float32Array | Uint16Array | Uint8Array | Int32Array): DeviceBuffer {
    const b = DeviceBuffer.from(dtype, data);
    live.push(b);
    return b;
}

function alloc(dtype: DeviceDtype, n: number): DeviceBuffer {
    const b = DeviceBuffer.alloc(dtype, n);
    live.push(b);
    return b;
}

/** a buffer whose data starts `offsetBytes` past a 256-byte aligned address (misaligned for 16-byte loads) */
function uploadAt(
    k: CudaKernelOps,
    dtype: DeviceDtype,
    data: Float32Array | Uint16Array | Int32Array,
    offsetBytes: number
): number {
    const b = alloc(dtype, data.length + 16);
    k.upload(b.ptr, data, offsetBytes);
    return b.ptr + offsetBytes;
}

function downloadBf16(k: CudaKernelOps, ptr: number, n: number): Uint16Array {
    const out = new Uint16Array(n);
    k.download(out, ptr);
    return out;
}

function downloadF32(k: CudaKernelOps, ptr: number, n: number): Float32Array {
    const out = new Float32Array(n);
    k.download(out, ptr);
    return out;
}

// ------------------------------------------------------------------

const availability = cudaAvailability();
if (!availability.usable) {
    test("cuda kernels", {skip: `CUDA is not usable: ${availability.reason}`}, () => {});
} else {
    const k = cudaKernelOps();
    const c = cpu();
    after(() => {
        for (const b of live) b.free();
        live.length = 0;
    });

    describe("cuda kernels", () => {
        test("conversions are bit-identical to the CPU's", () => {
            const rng = new Prng(1);
            for (const n of [1, 7, 8, 1000, (1 << 20) + 3]) {
                for (const offset of [0, 4]) {
                    const x = randn(rng, n);
                    // magnitudes from f16-subnormal to f16-overflow, and the special values
                    for (let i = 0; i < n; i++) x[i] *= 10 ** (rng.int(12) - 7);
                    const specials = [0, -0, Infinity, -Infinity, NaN, 65504, 65520, 1e-8, -3e-5, 1.5e-45];
                    for (let i = 0; i < Math.min(n, specials.length); i++) x[i] = specials[i];
                    const xDev = uploadAt(k, "f32", x, offset);

                    const refBf = new Uint16Array(n);
                    c.f32ToBf16(refBf, x, n);
                    const outBf = alloc("bf16", n + 8);
                    k.f32ToBf16(outBf.ptr + offset / 2, xDev, n);
                    const gotBf = downloadBf16(k, outBf.ptr + offset / 2, n);
                    const dBf = bitsEqualCount(gotBf, refBf);
                    report(dBf === 0, `f32ToBf16 n=${n} offset=${offset}`, `${dBf} differing codes`);
                    assert.equal(dBf, 0);

                    const refF = new Float32Array(n);
                    c.bf16ToF32(refF, refBf, n);
                    const inBf = uploadAt(k, "bf16", refBf, offset / 2);
                    const outF = alloc("f32", n + 4);
                    k.bf16ToF32(outF.ptr + offset, inBf, n);
                    const gotF = downloadF32(k, outF.ptr + offset, n);
                    const dF = bitsEqualCount(new Uint32Array(gotF.buffer), new Uint32Array(refF.buffer));
                    report(dF === 0, `bf16ToF32 n=${n} offset=${offset}`, `${dF} differing values`);
                    assert.equal(dF, 0);

                    // f16: equal codes for every non-NaN value; NaN stays NaN (payloads may differ)
                    const refH = new Uint16Array(n);
                    c.f32ToF16(refH, x, n);
                    const outH = alloc("f16", n + 8);
                    k.f32ToF16(outH.ptr, xDev, n);
                    const gotH = downloadBf16(k, outH.ptr, n);
                    const isNanH = (h: number) => (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
                    let dH = 0;
                    for (let i = 0; i < n; i++) if (isNanH(refH[i]) ? !isNanH(gotH[i]) : gotH[i] !== refH[i]) dH++;
                    report(dH === 0, `f32ToF16 n=${n} offset=${offset}`, `${dH} differing codes`);
                    assert.equal(dH, 0);

                    const refHF = new Float32Array(n);
                    c.f16ToF32(refHF, refH, n);
                    const inH = uploadAt(k, "f16", refH, offset / 2);
                    k.f16ToF32(outF.ptr, inH, n);
                    const gotHF = downloadF32(k, outF.ptr, n);
                    let dHF = 0;
                    for (let i = 0; i < n; i++)
                        if (Number.isNaN(refHF[i]) ? !Number.isNaN(gotHF[i]) : !Object.is(gotHF[i], refHF[i])) dHF++;
                    report(dHF === 0, `f16ToF32 n=${n} offset=${offset}`, `${dHF} differing values`);
                    assert.equal(dHF, 0);
                }
            }
        });

        test("fill, scale, add, axpy, castAdd", () => {
            const rng = new Prng(2);
            for (const n of [1, 13, 4096, 100_003]) {
                const x = randn(rng, n),
                    y = randn(rng, n);
                const xb = bf16(x),
                    yb = bf16(y);

                // fill
                const f = alloc("f32", n);
                k.fillF32(f.ptr, 0.3, n);
                assert.ok(
                    downloadF32(k, f.ptr, n).every((v) => v === Math.fround(0.3)),
                    "fillF32"
                );
                const fb = alloc("bf16", n);
                k.fillBf16(fb.ptr, 0.3, n);
                const want = bf16(Float32Array.of(0.3)).bits[0];
                assert.ok(
                    downloadBf16(k, fb.ptr, n).every((v) => v === want),
                    "fillBf16"
                );

                // scale (f32: exact float products)
                const s = 0.7311;
                const xs = upload("f32", x);
                k.scaleF32(xs.ptr, s, n);
                const gotS = downloadF32(k, xs.ptr, n);
                const refS = x.map((v) => Math.fround(v * Math.fround(s)));
                assert.equal(bitsEqualCount(new Uint32Array(gotS.buffer), new Uint32Array(refS.buffer)), 0, "scaleF32");
                const xsb = upload("bf16", xb.bits);
                k.scaleBf16(xsb.ptr, s, n);
                const refSb = bf16(xb.vals.map((v) => Math.fround(v * Math.fround(s)))).bits;
                assert.equal(bitsEqualCount(downloadBf16(k, xsb.ptr, n), refSb), 0, "scaleBf16");

                // add: f32 bit-identical to the CPU's addInplace; bf16 = bf16(f32 sum)
                const ya = upload("f32", y),
                    xa = upload("f32", x);
                k.addInplace(ya.ptr, xa.ptr, n);
                const refA = y.slice();
                c.addInplace(refA, x, n);
                const gotA = downloadF32(k, ya.ptr, n);
                const dA = bitsEqualCount(new Uint32Array(gotA.buffer), new Uint32Array(refA.buffer));
                assert.equal(dA, 0, "addInplace");
                const yab = upload("bf16", yb.bits),
                    xab = upload("bf16", xb.bits);
                k.addInplaceBf16(yab.ptr, xab.ptr, n);
                const refAb = bf16(yb.vals.map((v, i) => Math.fround(v + xb.vals[i]))).bits;
                assert.equal(bitsEqualCount(downloadBf16(k, yab.ptr, n), refAb), 0, "addInplaceBf16");

                // axpy / castAdd: a single fma; the double reference is exact before its final rounding except in
                // rare double-rounding cases, hence 1e-6
                const alpha = -1.37;
                const yx = upload("f32", y);
                k.axpy(yx.ptr, alpha, xa.ptr, n);
                const refX = y.map((v, i) => Math.fround(Math.fround(alpha) * x[i] + v));
                checkF32(`axpy n=${n}`, downloadF32(k, yx.ptr, n), refX, 1e-6);
                const yc = upload("f32", y);
                k.castAdd(yc.ptr, xab.ptr, alpha, n);
                const refC = y.map((v, i) => Math.fround(Math.fround(alpha) * xb.vals[i] + v));
                checkF32(`castAdd n=${n}`, downloadF32(k, yc.ptr, n), refC, 1e-6);
                report(true, `fill/scale/add n=${n}`, "bit-identical");
            }
        });

        test("embedding forward (exact rows, bad ids flagged) and backward (+=)", () => {
            const rng = new Prng(3);
            const V = 1000;
            for (const [N, C] of [
                [1, 64],
                [37, 257],
                [19, 3584]
            ]) {
                const table = bf16(randn(rng, V * C));
                const ids = Int32Array.from({length: N}, () => rng.int(V));
                const tableDev = upload("bf16", table.bits),
                    idsDev = upload("i32", ids);
                const out = alloc("bf16", N * C),
                    bad = alloc("i32", 2);
                k.embeddingForward(out.ptr, bad.ptr, idsDev.ptr, tableDev.ptr, N, V, C);
                const got = downloadBf16(k, out.ptr, N * C);
                let diff = 0;
                for (let n = 0; n < N; n++) for (let j = 0; j < C; j++) if (got[n * C + j] !== table.bits[ids[n] * C + j]) diff++;
                assert.equal(diff, 0, "embedding rows");
                assert.deepEqual(Array.from(bad.toHost() as Int32Array), [0, 2147483647]);

                if (N > 10) {
                    const badIds = ids.slice();
                    badIds[5] = -1;
                    badIds[9] = V;
                    const badDev = upload("i32", badIds);
                    k.embeddingForward(out.ptr, bad.ptr, badDev.ptr, tableDev.ptr, N, V, C);
                    assert.deepEqual(Array.from(bad.toHost() as Int32Array), [2, 5]);
                    const got2 = downloadBf16(k, out.ptr, N * C);
                    assert.ok(
                        got2.subarray(5 * C, 6 * C).every((v) => v === 0),
                        "a bad id's row is zeros"
                    );
                    assert.equal(got2[4 * C], table.bits[badIds[4] * C]);
                }

                // backward: repeated ids accumulate; the table gradient starts non-zero (+=)
                const dout = bf16(randn(rng, N * C));
                const repeat = Int32Array.from({length: N}, () => rng.int(5));
                const dtable0 = randn(rng, V * C, 0.1);
                const refD = dtable0.slice();
                c.embeddingBackward(refD, dout.vals, repeat, N, V, C);
                const dtable = upload("f32", dtable0);
                k.embeddingBackward(dtable.ptr, upload("bf16", dout.bits).ptr, upload("i32", repeat).ptr, N, V, C);
                checkF32(`embeddingBackward N=${N} C=${C}`, downloadF32(k, dtable.ptr, V * C), refD, 1e-5);
                report(true, `embeddingForward N=${N} C=${C}`, "rows bit-identical");
            }
        });

        const normShapes: [number, number][] = [
            [1, 64],
            [3, 257],
            [17, 3584],
            [64, 4096],
            [4, 16384],
            [2, 40000]
        ];

        test("rmsnorm forward and residual + rmsnorm forward", () => {
            const rng = new Prng(4);
            const eps = 1e-6;
            for (const [N, C] of normShapes) {
                const x = bf16(randn(rng, N * C, 1.5, 0.2)),
                    w = bf16(randn(rng, C, 0.2, 1));
                const refOut = new Float32Array(N * C),
                    refRstd = new Float32Array(N);
                c.rmsnormForward(refOut, refRstd, x.vals, w.vals, N, C, eps);
                const xDev = upload("bf16", x.bits),
                    wDev = upload("bf16", w.bits);
                const out = alloc("bf16", N * C),
                    rstd = alloc("f32", N);
                k.rmsnormForward(out.ptr, rstd.ptr, xDev.ptr, wDev.ptr, N, C, eps);
                checkBf16(`rmsnormForward N=${N} C=${C} out`, downloadBf16(k, out.ptr, N * C), refOut, true);
                checkF32(`rmsnormForward N=${N} C=${C} rstd`, downloadF32(k, rstd.ptr, N), refRstd);

                // misaligned rows (the scalar kernel), rstd not saved
                const xMis = uploadAt(k, "bf16", x.bits, 2);
                k.rmsnormForward(out.ptr, null, xMis, wDev.ptr, N, C, eps);
                checkBf16(`rmsnormForward N=${N} C=${C} misaligned`, downloadBf16(k, out.ptr, N * C), refOut, true);

                // residual: h = bf16(x + y) exactly, in place into x's buffer
                const y = bf16(randn(rng, N * C, 0.5));
                const hRef = bf16(x.vals.map((v, i) => Math.fround(v + y.vals[i])));
                const refOut2 = new Float32Array(N * C),
                    refRstd2 = new Float32Array(N);
                c.rmsnormForward(refOut2, refRstd2, hRef.vals, w.vals, N, C, eps);
                const hDev = upload("bf16", x.bits),
                    yDev = upload("bf16", y.bits);
                k.residualRmsnormForward(hDev.ptr, out.ptr, rstd.ptr, hDev.ptr, yDev.ptr, wDev.ptr, N, C, eps);
                const dh = bitsEqualCount(downloadBf16(k, hDev.ptr, N * C), hRef.bits);
                report(dh === 0, `residualRmsnormForward N=${N} C=${C} h`, `${dh} differing`);
                assert.equal(dh, 0, "residual sum h");
                checkBf16(`residualRmsnormForward N=${N} C=${C} out`, downloadBf16(k, out.ptr, N * C), refOut2, true);
                checkF32(`residualRmsnormForward N=${N} C=${C} rstd`, downloadF32(k, rstd.ptr, N), refRstd2);
            }
        });

        test("rmsnorm backward (dinp =, +=; dweight +=)", () => {
            const rng = new Prng(5);
            for (const [N, C] of normShapes) {
                const x = bf16(randn(rng, N * C, 1.5, 0.2)),
                    w = bf16(randn(rng, C, 0.2, 1));
                const g = bf16(randn(rng, N * C));
                const rstd = new Float32Array(N);
                c.rmsnormForward(new Float32Array(N * C), rstd, x.vals, w.vals, N, C, 1e-6);
                const dw0 = randn(rng, C);
                const refDx = new Float32Array(N * C),
                    refDw = dw0.slice();
                c.rmsnormBackward(refDx, refDw, g.vals, x.vals, w.vals, rstd, N, C);

                const xDev = upload("bf16", x.bits),
                    wDev = upload("bf16", w.bits),
                    gDev = upload("bf16", g.bits);
                const rDev = upload("f32", rstd),
                    dwDev = upload("f32", dw0);
                const dx = alloc("bf16", N * C);
                k.rmsnormBackward(dx.ptr, dwDev.ptr, gDev.ptr, xDev.ptr, wDev.ptr, rDev.ptr, N, C);
                checkBf16(`rmsnormBackward N=${N} C=${C} dinp`, downloadBf16(k, dx.ptr, N * C), refDx, false, 1e-2, 1e-4);
                checkF32(`rmsnormBackward N=${N} C=${C} dweight (+=)`, downloadF32(k, dwDev.ptr, C), refDw);

                // accumulate into an existing gradient, no dweight; dinp aliasing dout
                const old = bf16(randn(rng, N * C));
                const acc = upload("bf16", old.bits);
                k.rmsnormBackward(acc.ptr, null, gDev.ptr, xDev.ptr, wDev.ptr, rDev.ptr, N, C, true);
                const refAcc = refDx.map((v, i) => v + old.vals[i]);
                checkBf16(`rmsnormBackward N=${N} C=${C} dinp +=`, downloadBf16(k, acc.ptr, N * C), refAcc, false, 1e-2, 1e-4);
                const inPlace = upload("bf16", g.bits);
                k.rmsnormBackward(inPlace.ptr, null, inPlace.ptr, xDev.ptr, wDev.ptr, rDev.ptr, N, C);
                checkBf16(
                    `rmsnormBackward N=${N} C=${C} dinp = dout (in place)`,
                    downloadBf16(k, inPlace.ptr, N * C),
                    refDx,
                    false,
                    1e-2,
                    1e-4
                );
            }
        });

        test("rope forward/backward (precise angles, strided rows, in place)", () => {
            const rng = new Prng(6);
            const cases: {N: number; H: number; D: number; stride?: number; scaling: number}[] = [
                {N: 1, H: 1, D: 6, scaling: 1},
                {N: 7, H: 3, D: 64, scaling: 1},
                {N: 33, H: 28, D: 128, scaling: 1},
                {N: 9, H: 4, D: 128, stride: (4 + 2 * 2) * 128, scaling: 0.9},
                {N: 5, H: 2, D: 10, stride: 31, scaling: 1.1}
            ];
            for (const {N, H, D, stride, scaling} of cases) {
                const half = D / 2;
                const rowStride = stride ?? H * D;
                const invFreq = Float32Array.from({length: half}, (_, i) => 1 / 1e6 ** ((2 * i) / D));
                const pos = Int32Array.from({length: N}, () => rng.int(32768));
                pos[0] = 0;
                if (N > 2) pos[N - 1] = 131071;
                const buf = bf16(randn(rng, N * rowStride));
                // the packed [N,H,D] part the op touches
                const packed = new Float32Array(N * H * D);
                for (let n = 0; n < N; n++) packed.set(buf.vals.subarray(n * rowStride, n * rowStride + H * D), n * H * D);
                const posDev = upload("i32", pos),
                    fDev = upload("f32", invFreq);
                const tag = `N=${N} H=${H} D=${D} stride=${rowStride}`;
                for (const dir of ["forward", "backward"] as const) {
                    const ref = new Float32Array(N * H * D);
                    if (dir === "forward") c.ropeForward(ref, packed, pos, invFreq, scaling, N, H, D);
                    else c.ropeBackward(ref, packed, pos, invFreq, scaling, N, H, D);
                    // out of place into a second strided buffer, then in place
                    const inDev = upload("bf16", buf.bits),
                        outDev = upload("bf16", buf.bits);
                    const fn = dir === "forward" ? k.ropeForward.bind(k) : k.ropeBackward.bind(k);
                    fn(outDev.ptr, inDev.ptr, posDev.ptr, fDev.ptr, scaling, N, H, D, rowStride);
                    fn(inDev.ptr, inDev.ptr, posDev.ptr, fDev.ptr, scaling, N, H, D, rowStride);
                    for (const [name, dev] of [
                        ["out of place", outDev],
                        ["in place", inDev]
                    ] as const) {
                        const all = downloadBf16(k, dev.ptr, N * rowStride);
                        const got = new Uint16Array(N * H * D);
                        let untouched = 0;
                        for (let n = 0; n < N; n++) {
                            got.set(all.subarray(n * rowStride, n * rowStride + H * D), n * H * D);
                            for (let j = H * D; j < rowStride; j++)
                                if (all[n * rowStride + j] !== buf.bits[n * rowStride + j]) untouched++;
                        }
                        assert.equal(untouched, 0, "elements past H*D in a row must stay as they were");
                        checkBf16(`rope ${dir} ${tag} ${name}`, got, ref, true);
                    }
                }
            }
        });

        test("rope + KV cache write fused: bit-identical to ropeForward, ropeForward, cacheWrite, cacheWrite; graph replay", () => {
            const rng = new Prng(10);
            interface FusedCase {
                what: string;
                B: number;
                T: number;
                Hq: number;
                Hkv: number;
                D: number;
                pasts: number[];
                capacity: number;
                paged?: {block: number; tables: number[][]};
                /** bytes the caches start past a 16-byte boundary (their rows then take the scalar path) */
                offset: number;
                scaling: number;
            }
            const cases: FusedCase[] = [
                {
                    what: "Qwen2-7B decoding step",
                    B: 1,
                    T: 1,
                    Hq: 28,
                    Hkv: 4,
                    D: 128,
                    pasts: [37],
                    capacity: 64,
                    offset: 0,
                    scaling: 1
                },
                {
                    // row 1's position 64 has no block, row 2's positions from 128 are past capacity
                    what: "3 rows into a paged cache, shuffled table",
                    B: 3,
                    T: 5,
                    Hq: 28,
                    Hkv: 4,
                    D: 128,
                    pasts: [0, 60, 126],
                    capacity: 128,
                    paged: {
                        block: 64,
                        tables: [
                            [3, 1],
                            [0, -1],
                            [2, 4]
                        ]
                    },
                    offset: 0,
                    scaling: 0.9
                },
                {
                    what: "misaligned cache (scalar path)",
                    B: 2,
                    T: 1,
                    Hq: 4,
                    Hkv: 2,
                    D: 64,
                    pasts: [3, 0],
                    capacity: 8,
                    offset: 2,
                    scaling: 1
                },
                {
                    what: "half = 5, GQA 3:1, past capacity",
                    B: 2,
                    T: 3,
                    Hq: 3,
                    Hkv: 1,
                    D: 10,
                    pasts: [1, 5],
                    capacity: 7,
                    offset: 0,
                    scaling: 1.1
                }
            ];
            for (const c0 of cases) {
                const {B, T, Hq, Hkv, D, pasts, capacity, paged, offset, scaling} = c0;
                const N = B * T,
                    rowElems = Hkv * D;
                const stride = paged ? paged.tables[0].length : 0,
                    block = paged?.block ?? 0;
                const table = paged ? paged.tables.flat() : [];
                const cacheRows = paged ? (1 + Math.max(...table)) * block : B * capacity;
                const rowOf = (b: number, j: number): number => {
                    if (j < 0 || j >= capacity) return -1;
                    if (!paged) return b * capacity + j;
                    const blk = table[b * stride + Math.floor(j / block)];
                    return blk < 0 ? -1 : blk * block + (j % block);
                };
                const invFreq = Float32Array.from({length: D / 2}, (_, i) => 1 / 1e6 ** ((2 * i) / D));
                const pos = Int32Array.from({length: N}, () => rng.int(131072));
                if (N > 1) pos[0] = 0; // a decoding step keeps its random position: angle 0 rotates nothing
                const q = bf16(randn(rng, N * Hq * D)),
                    kk = bf16(randn(rng, N * rowElems)),
                    v = bf16(randn(rng, N * rowElems));
                const ck0 = bf16(randn(rng, cacheRows * rowElems)),
                    cv0 = bf16(randn(rng, cacheRows * rowElems));
                const posDev = upload("i32", pos),
                    fDev = upload("f32", invFreq),
                    pastsDev = upload("i32", Int32Array.from(pasts));
                const tablePtr = paged ? upload("i32", Int32Array.from(table)).ptr : null;
                type Bufs = {q: number; k: number; v: number; ck: number; cv: number};
                const fresh = (): Bufs => ({
                    q: upload("bf16", q.bits).ptr,
                    k: upload("bf16", kk.bits).ptr,
                    v: upload("bf16", v.bits).ptr,
                    ck: uploadAt(k, "bf16", ck0.bits, offset),
                    cv: uploadAt(k, "bf16", cv0.bits, offset)
                });
                const refill = (b: Bufs) => {
                    k.upload(b.q, q.bits);
                    k.upload(b.k, kk.bits);
                    k.upload(b.ck, ck0.bits);
                    k.upload(b.cv, cv0.bits);
                };
                const fourCalls = (b: Bufs) => {
                    k.ropeForward(b.q, b.q, posDev.ptr, fDev.ptr, scaling, N, Hq, D);
                    k.ropeForward(b.k, b.k, posDev.ptr, fDev.ptr, scaling, N, Hkv, D);
                    k.cacheWrite(b.ck, b.k, pastsDev.ptr, B, T, capacity, rowElems, tablePtr, stride, block);
                    k.cacheWrite(b.cv, b.v, pastsDev.ptr, B, T, capacity, rowElems, tablePtr, stride, block);
                };
                const fused = (b: Bufs) =>
                    k.ropeCacheWrite(
                        b.q,
                        b.k,
                        b.ck,
                        b.cv,
                        b.v,
                        posDev.ptr,
                        fDev.ptr,
                        scaling,
                        pastsDev.ptr,
                        B,
                        T,
                        Hq,
                        Hkv,
                        D,
                        capacity,
                        tablePtr,
                        stride,
                        block
                    );
                const state = (b: Bufs) => ({
                    q: downloadBf16(k, b.q, N * Hq * D),
                    k: downloadBf16(k, b.k, N * rowElems),
                    v: downloadBf16(k, b.v, N * rowElems),
                    cacheK: downloadBf16(k, b.ck, cacheRows * rowElems),
                    cacheV: downloadBf16(k, b.cv, cacheRows * rowElems)
                });
                const same = (what: string, got: ReturnType<typeof state>, want: ReturnType<typeof state>) => {
                    for (const key of ["q", "k", "v", "cacheK", "cacheV"] as const) {
                        const diff = bitsEqualCount(got[key], want[key]);
                        report(
                            diff === 0,
                            `ropeCacheWrite ${c0.what}: ${what} ${key}`,
                            `${diff} of ${want[key].length} codes differ`
                        );
                        assert.equal(diff, 0, `${c0.what}: ${what} ${key}`);
                    }
                };

                const ref = fresh(),
                    got = fresh();
                fourCalls(ref);
                fused(got);
                const want = state(ref),
                    fusedState = state(got);
                same("vs the four calls", fusedState, want);
                // and the four calls themselves: the rotation against the CPU, each cache row where cacheWrite's rules put it
                const refQ = new Float32Array(N * Hq * D),
                    refK = new Float32Array(N * rowElems);
                c.ropeForward(refQ, q.vals, pos, invFreq, scaling, N, Hq, D);
                c.ropeForward(refK, kk.vals, pos, invFreq, scaling, N, Hkv, D);
                checkBf16(`ropeCacheWrite ${c0.what} q`, fusedState.q, refQ, true);
                checkBf16(`ropeCacheWrite ${c0.what} k`, fusedState.k, refK, true);
                const hostK = ck0.bits.slice(),
                    hostV = cv0.bits.slice();
                let written = 0;
                for (let b = 0; b < B; b++)
                    for (let t = 0; t < T; t++) {
                        const at = rowOf(b, pasts[b] + t);
                        if (at < 0) continue;
                        written++;
                        const n = b * T + t;
                        hostK.set(fusedState.k.subarray(n * rowElems, (n + 1) * rowElems), at * rowElems);
                        hostV.set(v.bits.subarray(n * rowElems, (n + 1) * rowElems), at * rowElems);
                    }
                assert.equal(bitsEqualCount(fusedState.cacheK, hostK), 0, `${c0.what}: cacheK rows (${written} of ${N} written)`);
                assert.equal(bitsEqualCount(fusedState.cacheV, hostV), 0, `${c0.what}: cacheV rows (${written} of ${N} written)`);

                // captured once, replayed at other lengths (pasts read on the device): the same as eager calls there
                const replayed = fresh();
                refill(replayed);
                const graph = CudaGraph.capture(() => fused(replayed));
                try {
                    for (const shift of [1, 2]) {
                        const at = pasts.map((p, b) => (p + shift * (b + 1)) % capacity);
                        k.upload(pastsDev.ptr, Int32Array.from(at));
                        refill(replayed);
                        graph.launch();
                        const eager = fresh();
                        fourCalls(eager);
                        same(`graph replay at pasts ${at}`, state(replayed), state(eager));
                    }
                } finally {
                    graph.destroy();
                    k.upload(pastsDev.ptr, Int32Array.from(pasts));
                }
            }
        });

        test("rope + KV cache write fused: time per layer in a CUDA graph (printed only)", () => {
            // a Qwen2-7B decoding layer's share: 28 layers recorded, the graph replayed
            const layers = 28,
                Hq = 28,
                Hkv = 4,
                D = 128,
                block = 64,
                perRow = 64;
            const rows: string[] = [];
            for (const B of [1, 8]) {
                const q = alloc("bf16", B * Hq * D),
                    kx = alloc("bf16", B * Hkv * D),
                    v = alloc("bf16", B * Hkv * D);
                const cacheK = alloc("bf16", B * perRow * block * Hkv * D),
                    cacheV = alloc("bf16", B * perRow * block * Hkv * D);
                for (const b of [q, kx, v]) k.fillBf16(b.ptr, 0.25, b.length);
                const pos = upload(
                        "i32",
                        Int32Array.from({length: B}, (_, b) => 1000 + b)
                    ),
                    pasts = upload(
                        "i32",
                        Int32Array.from({length: B}, (_, b) => 1000 + b)
                    ),
                    inv = upload(
                        "f32",
                        Float32Array.from({length: D / 2}, (_, i) => 1 / 1e6 ** ((2 * i) / D))
                    ),
                    table = upload(
                        "i32",
                        Int32Array.from({length: B * perRow}, (_, i) => i)
                    );
                const S = perRow * block;
                const four = () => {
                    k.ropeForward(q.ptr, q.ptr, pos.ptr, inv.ptr, 1, B, Hq, D);
                    k.ropeForward(kx.ptr, kx.ptr, pos.ptr, inv.ptr, 1, B, Hkv, D);
                    k.cacheWrite(cacheK.ptr, kx.ptr, pasts.ptr, B, 1, S, Hkv * D, table.ptr, perRow, block);
                    k.cacheWrite(cacheV.ptr, v.ptr, pasts.ptr, B, 1, S, Hkv * D, table.ptr, perRow, block);
                };
                const fused = () =>
                    k.ropeCacheWrite(
                        q.ptr,
                        kx.ptr,
                        cacheK.ptr,
                        cacheV.ptr,
                        v.ptr,
                        pos.ptr,
                        inv.ptr,
                        1,
                        pasts.ptr,
                        B,
                        1,
                        Hq,
                        Hkv,
                        D,
                        S,
                        table.ptr,
                        perRow,
                        block
                    );
                for (const [what, call] of [
                    ["ropeForward x2 + cacheWrite x2", four],
                    ["ropeCacheWrite", fused]
                ] as const) {
                    const graph = CudaGraph.capture(() => {
                        for (let l = 0; l < layers; l++) call();
                    });
                    try {
                        const us = (timeIt(k, () => graph.launch(), 50) * 1e6) / layers;
                        rows.push(`  B=${B} ${what.padEnd(32)} ${us.toFixed(2).padStart(7)} us per layer`);
                    } finally {
                        graph.destroy();
                    }
                }
            }
            console.log(`rope + cache write, Qwen2-7B decoding (graph replay):\n${rows.join("\n")}`);
        });

        for (const act of GATED_ACTS)
            test(`gated activation (${act}) forward/backward`, () => {
                const rng = new Prng(7);
                for (const n of [1, 257, 8000, (1 << 20) + 5]) {
                    for (const offset of [0, 2]) {
                        const gate = bf16(randn(rng, n, 2)),
                            up = bf16(randn(rng, n)),
                            dout = bf16(randn(rng, n));
                        const refOut = new Float32Array(n),
                            refDg = new Float32Array(n),
                            refDu = new Float32Array(n);
                        c.gatedActForward(refOut, gate.vals, up.vals, n, act);
                        c.gatedActBackward(refDg, refDu, dout.vals, gate.vals, up.vals, n, act);
                        const gDev = uploadAt(k, "bf16", gate.bits, offset),
                            uDev = uploadAt(k, "bf16", up.bits, offset);
                        const dDev = uploadAt(k, "bf16", dout.bits, offset);
                        const out = alloc("bf16", n),
                            dg = alloc("bf16", n),
                            du = alloc("bf16", n);
                        const what = `${act} n=${n} offset=${offset}`;
                        k.gatedActForward(out.ptr, gDev, uDev, n, act);
                        // gelu_tanh: the device's tanhf is tanh.approx (--use_fast_math, ~2^-11 relative), and where
                        // 1 + tanh cancels (gate below -2) that is more than a bf16 ulp of the small output: L2 only
                        const strict = act === "silu";
                        checkBf16(`gatedActForward ${what}`, downloadBf16(k, out.ptr, n), refOut, strict);
                        k.gatedActBackward(dg.ptr, du.ptr, dDev, gDev, uDev, n, act);
                        checkBf16(`gatedActBackward ${what} dgate`, downloadBf16(k, dg.ptr, n), refDg, false);
                        checkBf16(`gatedActBackward ${what} dup`, downloadBf16(k, du.ptr, n), refDu, false);
                        // in place: the gradients overwrite gate and up
                        k.gatedActBackward(gDev, uDev, dDev, gDev, uDev, n, act);
                        assert.equal(bitsEqualCount(downloadBf16(k, gDev, n), downloadBf16(k, dg.ptr, n)), 0);
                        assert.equal(bitsEqualCount(downloadBf16(k, uDev, n), downloadBf16(k, du.ptr, n)), 0);
                    }
                }
            });

        test("cross-entropy forward, backward (in place and not), fused", () => {
            const rng = new Prng(8);
            const cases: {N: number; V: number; offset: number}[] = [
                {N: 1, V: 257, offset: 0},
                {N: 6, V: 1000, offset: 0},
                {N: 4, V: 1001, offset: 2},
                {N: 3, V: 151936, offset: 0}
            ];
            for (const {N, V, offset} of cases) {
                const logits = bf16(randn(rng, N * V, 3));
                const targets = Int32Array.from({length: N}, () => rng.int(V));
                if (N > 1) targets[1] = -100;
                if (N > 2) targets[2] = V - 1;
                if (N > 3) targets[3] = 0;
                const refLoss = new Float32Array(N),
                    refLse = new Float32Array(N);
                const refCount = c.crossEntropyForward(refLoss, refLse, logits.vals, targets, N, V);
                const scale = 1 / Math.max(1, refCount);
                const refD = new Float32Array(N * V);
                c.crossEntropyBackward(refD, logits.vals, refLse, targets, scale, N, V);
                const tag = `N=${N} V=${V} offset=${offset}`;

                const xDev = uploadAt(k, "bf16", logits.bits, offset),
                    tDev = upload("i32", targets);
                const loss = alloc("f32", N),
                    lse = alloc("f32", N),
                    count = alloc("i32", 1);
                k.memset(count.ptr, 0, 4);
                k.crossEntropyForward(loss.ptr, lse.ptr, count.ptr, xDev, tDev.ptr, N, V);
                checkF32(`crossEntropyForward ${tag} loss`, downloadF32(k, loss.ptr, N), refLoss);
                checkF32(`crossEntropyForward ${tag} lse`, downloadF32(k, lse.ptr, N), refLse);
                assert.equal((count.toHost() as Int32Array)[0], refCount, "counted rows");
                if (N > 1) assert.equal(downloadF32(k, loss.ptr, N)[1], 0, "an ignored row's loss is 0");

                // backward into a separate buffer at another alignment, then in place
                const dDev = uploadAt(k, "bf16", new Uint16Array(N * V), 4 - offset);
                k.crossEntropyBackward(dDev, xDev, lse.ptr, tDev.ptr, scale, N, V);
                checkBf16(`crossEntropyBackward ${tag} separate`, downloadBf16(k, dDev, N * V), refD, false);
                k.crossEntropyBackward(xDev, xDev, lse.ptr, tDev.ptr, scale, N, V);
                const inPlace = downloadBf16(k, xDev, N * V);
                checkBf16(`crossEntropyBackward ${tag} in place`, inPlace, refD, false);
                if (N > 1)
                    assert.ok(
                        inPlace.subarray(V, 2 * V).every((v) => v === 0),
                        "an ignored row's gradient is 0"
                    );

                // fused = forward + in-place backward, bit for bit
                const yDev = uploadAt(k, "bf16", logits.bits, offset);
                const loss2 = alloc("f32", N);
                k.memset(count.ptr, 0, 4);
                k.crossEntropyFused(loss2.ptr, null, count.ptr, yDev, tDev.ptr, scale, N, V);
                assert.deepEqual(downloadF32(k, loss2.ptr, N), downloadF32(k, loss.ptr, N), "fused loss");
                assert.equal((count.toHost() as Int32Array)[0], refCount, "fused count");
                const fusedDiff = bitsEqualCount(downloadBf16(k, yDev, N * V), inPlace);
                report(fusedDiff === 0, `crossEntropyFused ${tag}`, `${fusedDiff} codes differ from forward+backward`);
                assert.equal(fusedDiff, 0);
            }
        });

        test("timing (printed only)", () => {
            const rows: string[] = [];
            const line = (what: string, bytes: number, sec: number) =>
                rows.push(
                    `  ${what.padEnd(44)} ` +
                        `${(sec * 1e6).toFixed(1).padStart(9)} us ${(bytes / sec / 1e9).toFixed(0).padStart(6)} GB/s`
                );
            {
                const N = 8192,
                    C = 3584;
                const x = alloc("bf16", N * C),
                    out = alloc("bf16", N * C),
                    w = alloc("bf16", C),
                    r = alloc("f32", N);
                const y = alloc("bf16", N * C),
                    h = alloc("bf16", N * C),
                    dx = alloc("bf16", N * C);
                const dw = alloc("f32", C);
                k.fillBf16(x.ptr, 0.5, N * C);
                k.fillBf16(y.ptr, 0.25, N * C);
                k.fillBf16(w.ptr, 1, C);
                k.fillF32(dw.ptr, 0, C);
                const io = 2 * N * C * 2;
                line(
                    `rmsnormForward ${N}x${C} bf16`,
                    io,
                    timeIt(k, () => k.rmsnormForward(out.ptr, r.ptr, x.ptr, w.ptr, N, C, 1e-6))
                );
                line(
                    `residualRmsnormForward ${N}x${C}`,
                    4 * N * C * 2,
                    timeIt(k, () => k.residualRmsnormForward(h.ptr, out.ptr, r.ptr, x.ptr, y.ptr, w.ptr, N, C, 1e-6))
                );
                line(
                    `rmsnormBackward ${N}x${C} (no dweight)`,
                    3 * N * C * 2,
                    timeIt(k, () => k.rmsnormBackward(dx.ptr, null, y.ptr, x.ptr, w.ptr, r.ptr, N, C))
                );
                line(
                    `rmsnormBackward ${N}x${C} (+ dweight)`,
                    3 * N * C * 2,
                    timeIt(k, () => k.rmsnormBackward(dx.ptr, dw.ptr, y.ptr, x.ptr, w.ptr, r.ptr, N, C))
                );
                line(
                    `gatedActForward silu ${N}x${C}`,
                    3 * N * C * 2,
                    timeIt(k, () => k.gatedActForward(out.ptr, x.ptr, y.ptr, N * C, "silu"))
                );
                const pos = upload(
                    "i32",
                    Int32Array.from({length: N}, (_, i) => i)
                );
                const inv = upload(
                    "f32",
                    Float32Array.from({length: 64}, (_, i) => 1 / 1e6 ** (i / 64))
                );
                line(
                    `ropeForward ${N}x28x128 in place`,
                    2 * N * C * 2,
                    timeIt(k, () => k.ropeForward(x.ptr, x.ptr, pos.ptr, inv.ptr, 1, N, 28, 128))
                );
            }
            {
                const N = 2048,
                    V = 151936;
                const logits = alloc("bf16", N * V),
                    loss = alloc("f32", N),
                    lse = alloc("f32", N);
                const targets = upload(
                    "i32",
                    Int32Array.from({length: N}, (_, i) => (i * 7919) % V)
                );
                k.fillBf16(logits.ptr, 0.5, N * V);
                const bytes = N * V * 2;
                line(
                    `crossEntropyForward ${N}x${V}`,
                    bytes,
                    timeIt(k, () => k.crossEntropyForward(loss.ptr, lse.ptr, null, logits.ptr, targets.ptr, N, V))
                );
                line(
                    `crossEntropyBackward ${N}x${V} in place`,
                    2 * bytes,
                    timeIt(k, () => k.crossEntropyBackward(logits.ptr, logits.ptr, lse.ptr, targets.ptr, 1e-3, N, V))
                );
                line(
                    `crossEntropyFused ${N}x${V}`,
                    2 * bytes,
                    timeIt(k, () => k.crossEntropyFused(loss.ptr, lse.ptr, null, logits.ptr, targets.ptr, 1e-3, N, V))
                );
            }
            console.log(`cuda kernels timing (GB/s = bytes read + written once / time):\n${rows.join("\n")}`);
        });
    });
}
