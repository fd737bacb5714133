// NF4/FP4 dequantization on the GPU against the CPU reference (src/quant/nf4.ts dequantize4bit): f32 output
// bit-exact, bf16/f16 output equal to the round-to-nearest-even of the CPU's f32, with and without double
// quantization, several block sizes, odd n, misaligned output (the element-wise kernel), no writes past n.
// The fused 4-bit GEMV (gemv4bit) against a float64 reference, with and without its LoRA term, on both of its
// kernels; argument errors. The grouped launch (gemv4bitGroup): each part bit for bit gemv4bit's; K split across
// blocks for small N: the same bits on every run and in CUDA graph replays. The same tests and the LUT kernel's own
// (QLORA_GEMV4BIT_VARIANT=lut|lut2, a child process each): near the reference of its weights round(code) * scale
// and the usual round(code * scale), groups bit for bit, repeatable. Prints the bandwidth of both on the
// shapes that matter (the GEMV once per kernel variant, test/gpu/gemv4bit-timing.ts in a child process). Runs only
// on a machine with a usable GPU (npm run test:gpu).
import {test, describe} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {randomFillSync} from "node:crypto";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {cpu} from "../../src/backend/cpu.js";
import {cuda, cudaAvailability, CudaGraph, DeviceBuffer} from "../../src/backend/cuda.js";
import {cudaGemmOps, gemv4bitStateFields, type Gemv4bitPart, type GemmDtype} from "../../src/backend/cuda-gemm-types.js";
import {Rng} from "../../src/backend/rng.js";
import {
    dequantize4bit,
    NF4_CODE,
    quantize4bit,
    SIGNED_DYNAMIC_MAP,
    stateAbsmax,
    type QuantState4bit,
    type QuantType
} from "../../src/quant/nf4.js";
import {REPO_ROOT} from "../helpers/paths.js";

const availability = cudaAvailability();

if (!availability.usable) {
    test("cuda", {skip: availability.reason ?? "CUDA is not usable"}, () => {});
} else {
    const ops = cudaGemmOps();
    const BYTES: Record<GemmDtype, number> = {f32: 4, bf16: 2, f16: 2};

    /** weight-like values: normal(0, 0.02) with a few outliers and one all-zero block at the start */
    function weights(n: number, seed: number): Float32Array {
        const rng = new Rng(seed);
        const w = new Float32Array(n);
        for (let i = 0; i < n; i += 2) {
            const u = Math.max(rng.next(), 1e-12),
                v = rng.next();
            const r = 0.02 * Math.sqrt(-2 * Math.log(u));
            w[i] = r * Math.cos(2 * Math.PI * v);
            if (i + 1 < n) w[i + 1] = r * Math.sin(2 * Math.PI * v);
        }
        for (let i = 0; i < n; i += 997) w[i] *= 25;
        w.fill(0, 0, Math.min(n, 64));
        return w;
    }

    interface DeviceState {
        packed: DeviceBuffer;
        absmax: DeviceBuffer | null;
        absmaxQ: DeviceBuffer | null;
        nestedAbsmax: DeviceBuffer | null;
        nestedCode: DeviceBuffer | null;
        code: DeviceBuffer;
        free(): void;
    }

    function toDevice(s: QuantState4bit): DeviceState {
        const d: DeviceState = {
            packed: DeviceBuffer.from("u8", s.packed),
            absmax: s.absmax ? DeviceBuffer.from("f32", s.absmax) : null,
            absmaxQ: s.absmaxQ ? DeviceBuffer.from("u8", s.absmaxQ) : null,
            nestedAbsmax: s.nestedAbsmax ? DeviceBuffer.from("f32", s.nestedAbsmax) : null,
            nestedCode: s.nestedQuantMap ? DeviceBuffer.from("f32", s.nestedQuantMap) : null,
            code: DeviceBuffer.from("f32", s.quantMap),
            free() {
                for (const b of [d.packed, d.absmax, d.absmaxQ, d.nestedAbsmax, d.nestedCode, d.code]) b?.free();
            }
        };
        return d;
    }

    function numel(s: QuantState4bit): number {
        return s.shape.reduce((a, b) => a * b, 1);
    }

    /** a quantization state as dequantize4bit and gemv4bit take it, in their argument order */
    function stateArgs(s: QuantState4bit, d: DeviceState) {
        return [
            d.packed.ptr,
            d.absmax?.ptr ?? 0,
            d.absmaxQ?.ptr ?? 0,
            d.nestedAbsmax?.ptr ?? 0,
            d.nestedCode?.ptr ?? 0,
            s.offset,
            d.code.ptr,
            s.blocksize,
            s.nestedBlocksize
        ] as const;
    }

    /** runs the GPU dequantization into `out` at byte offset `offsetBytes` */
    function dequantOnGpu(s: QuantState4bit, d: DeviceState, out: DeviceBuffer, dtype: GemmDtype, offsetBytes = 0): void {
        ops.dequantize4bit(out.ptr + offsetBytes, dtype, ...stateArgs(s, d), numel(s));
    }

    /** the CPU's f32 result as the bits the GPU must produce in `dtype` */
    function expectedBits(ref: Float32Array, dtype: GemmDtype): Uint32Array | Uint16Array {
        if (dtype === "f32") return new Uint32Array(ref.buffer, ref.byteOffset, ref.length);
        const bits = new Uint16Array(ref.length);
        if (dtype === "bf16") cpu().f32ToBf16(bits, ref, ref.length);
        else cpu().f32ToF16(bits, ref, ref.length);
        return bits;
    }

    const GUARD = 16; // elements after n that must stay untouched

    /** dequantizes on the GPU to `dtype` and compares bit for bit; `misalign` shifts the output by one element */
    function checkState(s: QuantState4bit, dtype: GemmDtype, misalign: boolean, what: string): void {
        const n = numel(s);
        const ref = dequantize4bit(s, {roundToDtype: false});
        const want = expectedBits(ref, dtype);
        const d = toDevice(s);
        const lead = misalign ? 1 : 0;
        const total = lead + n + GUARD;
        const bytes = BYTES[dtype];
        const out = DeviceBuffer.alloc(dtype === "f32" ? "f32" : "u8", dtype === "f32" ? total : total * bytes);
        try {
            cuda().memset(out.ptr, 0xff, total * bytes);
            dequantOnGpu(s, d, out, dtype, lead * bytes);
            const raw = out.toHost();
            const rawBytes = new Uint8Array(raw.buffer, raw.byteOffset, total * bytes);
            const got =
                bytes === 4
                    ? new Uint32Array(rawBytes.buffer, rawBytes.byteOffset, total)
                    : new Uint16Array(rawBytes.buffer, rawBytes.byteOffset, total);
            const ones = bytes === 4 ? 0xffffffff : 0xffff;
            for (let i = 0; i < lead; i++) assert.equal(got[i], ones, `${what} ${dtype}: element before the output was written`);
            for (let i = 0; i < n; i++) {
                if (got[lead + i] !== want[i]) {
                    const hex = (x: number) => "0x" + x.toString(16);
                    assert.fail(
                        `${what} ${dtype}${misalign ? " (misaligned)" : ""}: element ${i} of ${n} is ` +
                            `${hex(got[lead + i])}, the CPU gives ${hex(want[i])} (f32 ${ref[i]})`
                    );
                }
            }
            for (let i = lead + n; i < total; i++)
                assert.equal(got[i], ones, `${what} ${dtype}: element ${i - lead} (past n) was written`);
        } finally {
            out.free();
            d.free();
        }
    }

    interface StateCase {
        rows: number;
        cols: number;
        quantType: QuantType;
        compress: boolean;
        blocksize?: number;
    }

    function runCase(c: StateCase, dtypes: GemmDtype[], misaligned: boolean): void {
        const n = c.rows * c.cols;
        const w = weights(n, c.rows * 31 + c.cols);
        const s = quantize4bit(w, {
            quantType: c.quantType,
            compressStatistics: c.compress,
            blocksize: c.blocksize ?? 64,
            shape: c.rows === 1 ? [c.cols] : [c.rows, c.cols]
        });
        const what = `${c.quantType} ${c.rows}x${c.cols} bs=${s.blocksize}${c.compress ? " double-quant" : ""}`;
        for (const dtype of dtypes) {
            checkState(s, dtype, false, what);
            if (misaligned) checkState(s, dtype, true, what);
        }
    }

    const ALL: GemmDtype[] = ["f32", "bf16", "f16"];

    describe("dequantize4bit vs CPU", () => {
        for (const compress of [false, true]) {
            test(`nf4 4096x4096${compress ? " double-quant" : ""}`, () => {
                runCase({rows: 4096, cols: 4096, quantType: "nf4", compress}, ALL, false);
            });
        }
        test("fp4 4096x4096 double-quant", () => {
            runCase({rows: 4096, cols: 4096, quantType: "fp4", compress: true}, ALL, false);
        });
        for (const quantType of ["nf4", "fp4"] as const) {
            for (const compress of [false, true]) {
                test(`${quantType}${compress ? " double-quant" : ""}: 256x768, odd n, small and ragged, misaligned output`, () => {
                    runCase({rows: 256, cols: 768, quantType, compress}, ALL, true);
                    runCase({rows: 1, cols: 1001, quantType, compress}, ALL, true);
                    runCase({rows: 3, cols: 333, quantType, compress}, ALL, true);
                    runCase({rows: 1, cols: 7, quantType, compress}, ALL, true);
                    runCase({rows: 1, cols: 1, quantType, compress}, ALL, false);
                    runCase({rows: 5, cols: 64 * 300 + 8, quantType, compress}, ALL, false); // > 256 blocks, ragged nested block
                });
            }
        }
        test("other block sizes (32, 128, 256, 4096)", () => {
            for (const blocksize of [32, 128, 256, 4096]) {
                runCase({rows: 96, cols: 1000, quantType: "nf4", compress: true, blocksize}, ALL, blocksize === 128);
                runCase({rows: 96, cols: 1000, quantType: "fp4", compress: false, blocksize}, ["bf16"], false);
            }
        });
        test("bf16 output equals the CPU's bf16-rounded state dtype", () => {
            const w = weights(512 * 384, 3);
            const s = quantize4bit(w, {quantType: "nf4", compressStatistics: true, shape: [512, 384], dtype: "bfloat16"});
            const cpuBf16 = dequantize4bit(s); // rounded to bf16 (the state's dtype), as f32
            const d = toDevice(s);
            const out = DeviceBuffer.alloc("bf16", 512 * 384);
            dequantOnGpu(s, d, out, "bf16");
            const got = new Float32Array(512 * 384);
            cpu().bf16ToF32(got, out.toHost() as Uint16Array, got.length);
            const a = new Uint32Array(got.buffer),
                b = new Uint32Array(cpuBf16.buffer);
            for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) assert.fail(`element ${i}: ${got[i]} vs ${cpuBf16[i]}`);
            out.free();
            d.free();
        });
    });

    /** values rounded to the dtype, as f32 */
    function roundTo(values: Float32Array, dtype: GemmDtype): Float32Array {
        if (dtype === "f32") return values;
        const bits = new Uint16Array(values.length),
            out = new Float32Array(values.length);
        if (dtype === "bf16") {
            cpu().f32ToBf16(bits, values, values.length);
            cpu().bf16ToF32(out, bits, bits.length);
        } else {
            cpu().f32ToF16(bits, values, values.length);
            cpu().f16ToF32(out, bits, bits.length);
        }
        return out;
    }

    function uploadAs(values: Float32Array, dtype: GemmDtype): DeviceBuffer {
        if (dtype === "f32") return DeviceBuffer.from("f32", values);
        const bits = new Uint16Array(values.length);
        if (dtype === "bf16") cpu().f32ToBf16(bits, values, values.length);
        else cpu().f32ToF16(bits, values, values.length);
        return DeviceBuffer.from(dtype, bits);
    }

    function downloadAs(buf: DeviceBuffer, dtype: GemmDtype, n: number): Float32Array {
        if (dtype === "f32") {
            const out = new Float32Array(n);
            cuda().download(out, buf.ptr);
            return out;
        }
        const bits = new Uint16Array(n),
            out = new Float32Array(n);
        cuda().download(bits, buf.ptr);
        if (dtype === "bf16") cpu().bf16ToF32(out, bits, n);
        else cpu().f16ToF32(out, bits, n);
        return out;
    }

    /** uniform(-a, a) values rounded to the dtype */
    function uniform(n: number, a: number, dtype: GemmDtype, rng: Rng): Float32Array {
        return roundTo(
            Float32Array.from({length: n}, () => a * (rng.next() * 2 - 1)),
            dtype
        );
    }

    interface GemvCase {
        M: number;
        N: number;
        K: number;
        xDtype: GemmDtype;
        yDtype: GemmDtype;
        quantType: QuantType;
        compress: boolean;
        blocksize?: number;
        /** the LoRA term: rank and scale (PEFT's lora_alpha / r) */
        lora?: {r: number; scale: number};
        seed: number;
    }

    function describeCase(c: GemvCase): string {
        return (
            `gemv4bit ${c.quantType}${c.compress ? " dq" : ""} bs=${c.blocksize ?? 64} ${c.xDtype}->${c.yDtype} ` +
            `M=${c.M} N=${c.N} K=${c.K}${c.lora ? ` LoRA r=${c.lora.r}` : ""}`
        );
    }

    /** a GEMV problem on the CPU: the quantized weight, the inputs (rounded to x's dtype) and the float64 reference */
    interface GemvProblem {
        s: QuantState4bit;
        x: Float32Array;
        xa: Float32Array;
        B: Float32Array;
        r: number;
        scale: number;
        /** y = x @ W^T + scale * xa @ B^T in float64, W dequantized on the CPU and rounded to x's dtype */
        ref: Float64Array;
        /** sum |x||W| + |scale| sum |xa||B| per element: the size of the fp32 accumulation error */
        S: Float64Array;
        /** whether W is the LUT kernel's */
        lut: boolean;
    }

    // QLORA_GEMV4BIT_VARIANT=lut|lut2 (the LUT kernel's child process, below): the tensor-core kernel rounds each
    // code value to x's dtype and scales the block sums, where the other variants round each scaled weight
    const LUT_VARIANT = /^lut2?$/.test(process.env.QLORA_GEMV4BIT_VARIANT ?? "");

    /** whether the LUT kernel computes the case: 16-bit x, K % 64 == 0, blocksize >= 64 (else lds2 does) */
    function lutRuns(c: GemvCase): boolean {
        return LUT_VARIANT && c.xDtype !== "f32" && c.K % 64 === 0 && (c.blocksize ?? 64) >= 64;
    }

    /** the weights as the LUT kernel sees them: round(code[q]) * (the block's scale), in float64 */
    function lutWeights(s: QuantState4bit, xDtype: GemmDtype): Float64Array {
        const code = roundTo(s.quantMap, xDtype),
            scales = stateAbsmax(s);
        const W = new Float64Array(numel(s));
        for (let i = 0; i < W.length; i++) {
            const byte = s.packed[i >> 1];
            W[i] = code[i & 1 ? byte & 15 : byte >> 4] * scales[Math.floor(i / s.blocksize)];
        }
        return W;
    }

    /**
     * The problem of a case; `sharedX` replaces its own x (the parts of a group share one x). The reference takes
     * the weights the kernel that runs the case sees (LUT's, or `usualWeights`: round(code[q] * scale)).
     */
    function gemvProblem(c: GemvCase, sharedX?: Float32Array, usualWeights = false): GemvProblem {
        const {M, N, K, xDtype} = c;
        const s = quantize4bit(weights(N * K, c.seed), {
            quantType: c.quantType,
            compressStatistics: c.compress,
            blocksize: c.blocksize ?? 64,
            shape: [N, K]
        });
        const lut = lutRuns(c) && !usualWeights;
        const W = lut ? lutWeights(s, xDtype) : roundTo(dequantize4bit(s, {roundToDtype: false}), xDtype);
        const rng = new Rng(c.seed);
        const x = sharedX ?? uniform(M * K, 1, xDtype, rng);
        const r = c.lora?.r ?? 0,
            scale = c.lora?.scale ?? 0;
        // |B| ~ 1/sqrt(r): the LoRA term is about as large as x @ W^T for every r
        const xa = uniform(M * r, 1, xDtype, rng),
            B = uniform(N * r, 0.5 / Math.sqrt(Math.max(r, 1)), xDtype, rng);
        const ref = new Float64Array(M * N),
            S = new Float64Array(M * N);
        for (let m = 0; m < M; m++) {
            for (let n = 0; n < N; n++) {
                let sum = 0,
                    abs = 0,
                    lsum = 0,
                    labs = 0;
                for (let k = 0; k < K; k++) {
                    const p = x[m * K + k] * W[n * K + k];
                    sum += p;
                    abs += Math.abs(p);
                }
                for (let j = 0; j < r; j++) {
                    const p = xa[m * r + j] * B[n * r + j];
                    lsum += p;
                    labs += Math.abs(p);
                }
                ref[m * N + n] = sum + scale * lsum;
                S[m * N + n] = abs + Math.abs(scale) * labs;
            }
        }
        return {s, x, xa, B, r, scale, ref, S, lut};
    }

    /** a problem's inputs on the device (x left out when the caller shares one) */
    interface GemvDevice {
        d: DeviceState;
        x: DeviceBuffer | null;
        xa: DeviceBuffer | null;
        B: DeviceBuffer | null;
        free(): void;
    }

    function uploadProblem(c: GemvCase, p: GemvProblem, withX = true): GemvDevice {
        const dev: GemvDevice = {
            d: toDevice(p.s),
            x: withX ? uploadAs(p.x, c.xDtype) : null,
            xa: p.r > 0 ? uploadAs(p.xa, c.xDtype) : null,
            B: p.r > 0 ? uploadAs(p.B, c.xDtype) : null,
            free() {
                for (const b of [dev.x, dev.xa, dev.B]) b?.free();
                dev.d.free();
            }
        };
        return dev;
    }

    /** queues gemv4bit for a case into y (x: the problem's own, or `x` when given) */
    function gemvOnGpu(c: GemvCase, p: GemvProblem, dev: GemvDevice, y: DeviceBuffer, x = dev.x!): void {
        const args = [y.ptr, c.yDtype, x.ptr, c.xDtype, ...stateArgs(p.s, dev.d), c.M, c.N, c.K] as const;
        if (dev.xa && dev.B) ops.gemv4bit(...args, dev.xa.ptr, dev.B.ptr, p.r, p.scale);
        else ops.gemv4bit(...args);
    }

    /** a case as one part of gemv4bitGroup */
    function groupPart(c: GemvCase, p: GemvProblem, dev: GemvDevice, y: DeviceBuffer): Gemv4bitPart {
        const part: Gemv4bitPart = {y: y.ptr, yDtype: c.yDtype, ...gemv4bitStateFields(stateArgs(p.s, dev.d)), N: c.N};
        if (dev.xa && dev.B) Object.assign(part, {loraXa: dev.xa.ptr, loraB: dev.B.ptr, loraR: p.r, loraScale: p.scale});
        return part;
    }

    /** y's bits as stored (bit-identity checks: -0 and NaN payloads count) */
    function rawBits(buf: DeviceBuffer, dtype: GemmDtype, n: number): Uint16Array | Uint32Array {
        const bits = dtype === "f32" ? new Uint32Array(n) : new Uint16Array(n);
        cuda().download(bits, buf.ptr);
        return bits;
    }

    /** the index of the first element where two results differ, or -1 */
    function firstDifference(a: Uint16Array | Uint32Array, b: Uint16Array | Uint32Array): number {
        assert.equal(a.length, b.length);
        for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
        return -1;
    }

    /**
     * y from the GPU against the float64 reference. Per element |y - ref| <= relTol |ref| + 1e-5 sqrt(K + r) S +
     * 1e-7, where relTol is the rounding of y to its dtype (2^-8 for bf16, 2^-11 for f16, 0 for f32: relative half
     * an ulp, rounded up) and S = sum |x||W| + |scale| sum |xa||B| bounds the fp32 accumulation error (any summation
     * order). With a 16-bit y and a LoRA term, y must also be rounded ONCE: at least 95% of the elements equal
     * round(ref) exactly (fp32 summation order flips a few near ties). Rounding x @ W^T to y's dtype before adding
     * the LoRA term, as a separate gemm with beta = 1 does, matches only about 75% (the LoRA term here is of the size
     * of x @ W^T).
     * `tight`: the reference has the kernel's own weights (the LUT kernel's), so only the fp32 sums differ, bounded
     * by (the roundings on a path: ~8 in a block's mmas, one a block, one a slice) 2^-22 S. `weightRel`: the
     * kernel's weights differ from the reference's by up to that much relative (the LUT kernel against the usual
     * reference: round(code) * scale vs round(code * scale), 2^-8 for bf16, 2^-10 for f16), with `roundedOnce:
     * false`, as the near-tie test would count those differences.
     */
    function assertNearReference(
        c: GemvCase,
        p: GemvProblem,
        got: Float32Array,
        what = describeCase(c),
        {tight = p.lut, roundedOnce = true, weightRel = 0} = {}
    ): void {
        const {M, N, K, yDtype} = c;
        const {ref, S, r} = p;
        const relTol = yDtype === "bf16" ? 2 ** -8 : yDtype === "f16" ? 2 ** -11 : 0;
        const sumTol = (tight ? (K / 64 + r / 16 + 32) * 2 ** -22 : 1e-5 * Math.sqrt(K + r)) + weightRel;
        for (let i = 0; i < M * N; i++) {
            const err = Math.abs(got[i] - ref[i]);
            const tol = relTol * Math.abs(ref[i]) + sumTol * S[i] + 1e-7;
            if (!(err <= tol))
                assert.fail(
                    `${what}: y[${Math.floor(i / N)}, ${i % N}] = ${got[i]}, reference ${ref[i]} ` +
                        `(|err| ${err.toExponential(2)} > ${tol.toExponential(2)})`
                );
        }
        if (roundedOnce && r > 0 && yDtype !== "f32") {
            const once = roundTo(Float32Array.from(ref), yDtype);
            let equal = 0;
            for (let i = 0; i < M * N; i++) if (got[i] === once[i]) equal++;
            assert.ok(
                equal >= 0.95 * M * N,
                `${what}: ${equal} of ${M * N} elements equal the reference rounded once to ${yDtype} ` +
                    `(want >= 95%): y looks rounded before the LoRA term was added`
            );
        }
    }

    /** y = x @ W^T (+ scale * xa @ B^T) on the GPU (fused, one pass) against the float64 reference */
    function checkGemv(c: GemvCase): void {
        const p = gemvProblem(c);
        const dev = uploadProblem(c, p);
        const dy = DeviceBuffer.alloc(c.yDtype, c.M * c.N);
        try {
            gemvOnGpu(c, p, dev, dy);
            assertNearReference(c, p, downloadAs(dy, c.yDtype, c.M * c.N));
        } finally {
            dy.free();
            dev.free();
        }
    }

    function loraCase(
        M: number,
        N: number,
        K: number,
        xDtype: GemmDtype,
        yDtype: GemmDtype,
        quantType: QuantType,
        compress: boolean,
        r: number,
        scale: number,
        blocksize = 64
    ): Omit<GemvCase, "seed"> {
        return {M, N, K, xDtype, yDtype, quantType, compress, blocksize, lora: {r, scale}};
    }

    /** calls gemv4bit with the given trailing arguments on a small valid problem */
    function gemvCall(M: number, K: number, trailing: number[]): void {
        const N = 16;
        const s = quantize4bit(weights(N * K, 9), {shape: [N, K], compressStatistics: true});
        const d = toDevice(s);
        const x = DeviceBuffer.zeros("bf16", M * K),
            y = DeviceBuffer.alloc("bf16", M * N);
        try {
            const args = [y.ptr, "bf16", x.ptr, "bf16", ...stateArgs(s, d), M, N, K] as const;
            (ops.gemv4bit as (...a: unknown[]) => void)(...args, ...trailing);
        } finally {
            d.free();
            x.free();
            y.free();
        }
    }

    describe("gemv4bit (fused dequantize + GEMV) vs CPU", () => {
        test("M = 1..8, bf16/f16/f32, nf4/fp4, with and without double quant", () => {
            let seed = 100;
            for (const M of [1, 2, 3, 5, 8]) {
                checkGemv({M, N: 256, K: 768, xDtype: "bf16", yDtype: "bf16", quantType: "nf4", compress: true, seed: seed++});
                checkGemv({M, N: 256, K: 768, xDtype: "bf16", yDtype: "f32", quantType: "nf4", compress: false, seed: seed++});
            }
            checkGemv({M: 4, N: 131, K: 1000, xDtype: "f32", yDtype: "f32", quantType: "fp4", compress: true, seed: seed++});
            checkGemv({M: 6, N: 77, K: 520, xDtype: "f16", yDtype: "f16", quantType: "nf4", compress: true, seed: seed++});
            checkGemv({M: 7, N: 77, K: 520, xDtype: "f16", yDtype: "f32", quantType: "fp4", compress: false, seed: seed++});
            checkGemv({M: 1, N: 4096, K: 4096, xDtype: "bf16", yDtype: "bf16", quantType: "nf4", compress: true, seed: seed++});
        });

        // The tensor-core kernel (bf16/f16 x, K % 32 == 0, blocksize >= 32) splits K over 1, 2, 4 or 8 warps per
        // 16 rows: K = 96 (one k-step of 128, itself partial: 1 warp), 768 (6 steps: 2), 2080 (17 steps, the
        // last one partial: 4), 4096 (32 steps: 8). N not a multiple of 16 leaves a partial tile, and whole tiles
        // past N in a block's last warps. K % 32 != 0 and f32 x take the one-warp-per-row kernel.
        test("LoRA term in the same pass, tensor-core kernel: r = 1, 16, 64; M = 1, 3, 8; every K split", () => {
            // M, N, K, x, y, quant type, double quant, r, scale[, blocksize]
            const cases = [
                loraCase(1, 200, 96, "bf16", "bf16", "nf4", true, 1, 2),
                loraCase(3, 200, 768, "bf16", "bf16", "fp4", false, 16, 2),
                loraCase(8, 131, 2080, "bf16", "bf16", "nf4", false, 64, 0.5),
                loraCase(8, 131, 2080, "bf16", "f32", "fp4", true, 16, 2),
                loraCase(3, 77, 4096, "bf16", "bf16", "fp4", true, 64, 2),
                loraCase(1, 200, 4096, "f16", "f16", "nf4", true, 16, 2),
                loraCase(8, 64, 768, "f16", "f32", "nf4", false, 1, -1),
                loraCase(1, 300, 4096, "bf16", "bf16", "nf4", true, 64, 2, 32),
                loraCase(3, 50, 768, "bf16", "bf16", "nf4", true, 16, 2, 128)
            ];
            let seed = 300;
            for (const c of cases) checkGemv({...c, seed: seed++});
        });

        test("LoRA term in the same pass, one-warp-per-row kernel: K % 32 != 0, f32 x", () => {
            const cases = [
                loraCase(1, 200, 520, "bf16", "bf16", "nf4", true, 1, 2),
                loraCase(3, 131, 1000, "bf16", "bf16", "fp4", false, 64, 2),
                loraCase(8, 64, 520, "f16", "f32", "nf4", false, 16, 2),
                loraCase(8, 77, 1000, "f16", "f16", "fp4", true, 16, 2),
                loraCase(3, 131, 768, "f32", "f32", "fp4", true, 16, 2),
                loraCase(1, 100, 768, "f32", "f32", "nf4", false, 64, 0.25)
            ];
            let seed = 400;
            for (const c of cases) checkGemv({...c, seed: seed++});
        });

        test("loraR = 0 is the call without a LoRA term, bit for bit", () => {
            for (const K of [768, 520]) {
                const N = 200,
                    M = 3;
                const s = quantize4bit(weights(N * K, K), {shape: [N, K], compressStatistics: true});
                const d = toDevice(s);
                const x = uploadAs(uniform(M * K, 1, "bf16", new Rng(K)), "bf16");
                const y0 = DeviceBuffer.alloc("bf16", M * N),
                    y1 = DeviceBuffer.alloc("bf16", M * N);
                const call = (y: DeviceBuffer, trailing: number[]) =>
                    (ops.gemv4bit as (...a: unknown[]) => void)(
                        y.ptr,
                        "bf16",
                        x.ptr,
                        "bf16",
                        ...stateArgs(s, d),
                        M,
                        N,
                        K,
                        ...trailing
                    );
                call(y0, []);
                call(y1, [0, 0, 0, 1]);
                const a = y0.toHost() as Uint16Array,
                    b = y1.toHost() as Uint16Array;
                assert.deepEqual(b, a, `K=${K}: loraR = 0 changed y`);
                assert.ok(
                    a.some((v) => v !== 0),
                    `K=${K}: y is all zeros`
                );
                for (const buf of [x, y0, y1]) buf.free();
                d.free();
            }
        });

        test("layouts and ranks it does not handle throw", () => {
            assert.throws(() => gemvCall(1, 12, []), /unsupported layout/); // K % 8 != 0
            assert.throws(() => gemvCall(9, 8, []), /M <= 8/);
            const xa = DeviceBuffer.zeros("bf16", 65),
                b = DeviceBuffer.zeros("bf16", 16 * 65);
            try {
                assert.throws(
                    () => gemvCall(1, 64, [xa.ptr, b.ptr, 65, 1]),
                    (err: Error) => err instanceof RangeError && /loraR = 65 is outside 0\.\.64/.test(err.message)
                );
                assert.throws(() => gemvCall(1, 64, [xa.ptr, b.ptr, -1, 1]), /loraR = -1/);
                assert.throws(
                    () => gemvCall(1, 64, [xa.ptr, 0, 16, 1]),
                    (err: Error) => err instanceof RangeError && /needs the device buffers loraXa/.test(err.message)
                );
                assert.throws(() => gemvCall(1, 64, [xa.ptr, b.ptr, 16]), /loraR > 0 needs loraScale/); // no scale
            } finally {
                xa.free();
                b.free();
            }
        });
    });

    /** a GEMV case with the seed taken from a counter */
    function gemvCase(
        M: number,
        N: number,
        K: number,
        xDtype: GemmDtype,
        yDtype: GemmDtype,
        quantType: QuantType,
        compress: boolean,
        seed: number,
        lora?: {r: number; scale: number},
        blocksize = 64
    ): GemvCase {
        return {M, N, K, xDtype, yDtype, quantType, compress, blocksize, lora, seed};
    }

    /**
     * One gemv4bitGroup launch for parts sharing M, K, x's dtype: each part's y must be bit for bit the y of gemv4bit
     * called for that part alone, and near the float64 reference.
     */
    function checkGroup(parts: GemvCase[]): void {
        const {M, K, xDtype} = parts[0];
        const x = uniform(M * K, 1, xDtype, new Rng(parts[0].seed + 1000));
        const problems = parts.map((c) => gemvProblem(c, x));
        const dx = uploadAs(x, xDtype);
        const devs = parts.map((c, i) => uploadProblem(c, problems[i], false));
        const grouped = parts.map((c) => DeviceBuffer.alloc(c.yDtype, c.M * c.N));
        const alone = parts.map((c) => DeviceBuffer.alloc(c.yDtype, c.M * c.N));
        const what = `gemv4bitGroup M=${M} K=${K} ${xDtype} [${parts.map((c) => describeCase(c)).join("; ")}]`;
        try {
            for (const y of grouped) cuda().memset(y.ptr, 0xff, y.bytes);
            ops.gemv4bitGroup(
                dx.ptr,
                xDtype,
                M,
                K,
                parts.map((c, i) => groupPart(c, problems[i], devs[i], grouped[i]))
            );
            parts.forEach((c, i) => gemvOnGpu(c, problems[i], devs[i], alone[i], dx));
            parts.forEach((c, i) => {
                const n = c.M * c.N;
                const a = rawBits(grouped[i], c.yDtype, n),
                    b = rawBits(alone[i], c.yDtype, n);
                const at = firstDifference(a, b);
                assert.equal(
                    at,
                    -1,
                    `${what}: part ${i} y[${at}] is 0x${a[at]?.toString(16)} in the group, 0x${b[at]?.toString(16)} alone`
                );
                assertNearReference(c, problems[i], downloadAs(grouped[i], c.yDtype, n), `${what}: part ${i}`);
            });
        } finally {
            for (const b of [dx, ...grouped, ...alone]) b.free();
            for (const d of devs) d.free();
        }
    }

    /** each case near the reference, then the same bits on 3 more runs and 3 CUDA graph replays */
    function checkRepeatable(cases: GemvCase[]): void {
        for (const c of cases) {
            const what = describeCase(c),
                n = c.M * c.N;
            const p = gemvProblem(c);
            const dev = uploadProblem(c, p);
            const y = DeviceBuffer.alloc(c.yDtype, n);
            let graph: CudaGraph | null = null;
            try {
                gemvOnGpu(c, p, dev, y);
                const first = rawBits(y, c.yDtype, n);
                assertNearReference(c, p, downloadAs(y, c.yDtype, n));
                for (let run = 0; run < 3; run++) {
                    cuda().memset(y.ptr, 0xff, y.bytes);
                    gemvOnGpu(c, p, dev, y);
                    const at = firstDifference(rawBits(y, c.yDtype, n), first);
                    assert.equal(at, -1, `${what}: run ${run + 2} differs from the first at y[${at}]`);
                }
                graph = CudaGraph.capture(() => gemvOnGpu(c, p, dev, y));
                for (let replay = 0; replay < 3; replay++) {
                    cuda().memset(y.ptr, 0xff, y.bytes);
                    graph.launch();
                    const at = firstDifference(rawBits(y, c.yDtype, n), first);
                    assert.equal(at, -1, `${what}: graph replay ${replay + 1} differs from the eager call at y[${at}]`);
                }
            } finally {
                graph?.destroy();
                y.free();
                dev.free();
            }
        }
    }

    describe("gemv4bitGroup: several weights on one x in one launch", () => {
        // On an H100 (132 SMs) K = 3584 (28 k-steps of 128) splits every tile of N = 512 over 3 blocks, K = 4096
        // the tiles of N = 40 and 131 over 4, K = 18944 those of N = 16 and 48 over 18 (the split rules of nf4.cu);
        // K = 768 keeps each tile in one block (4 warps), K = 2080 ends on a partial k-step.
        test("each part's y is gemv4bit's bit for bit: 1..4 parts, N = 512 and N % 16 != 0, LoRA or not, nested or not", () => {
            let seed = 500;
            const s = () => seed++;
            // q, k, v of Qwen2-7B with the LoRA term on each, as decoding computes them
            checkGroup([
                gemvCase(1, 3584, 3584, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2}),
                gemvCase(1, 512, 3584, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2}),
                gemvCase(1, 512, 3584, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2})
            ]);
            checkGroup([
                gemvCase(8, 200, 768, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2}),
                gemvCase(8, 77, 768, "bf16", "f32", "fp4", false, s()),
                gemvCase(8, 512, 768, "bf16", "bf16", "nf4", true, s(), {r: 64, scale: 0.5}),
                gemvCase(8, 16, 768, "bf16", "bf16", "nf4", false, s(), {r: 1, scale: -1}, 32)
            ]);
            checkGroup([
                gemvCase(3, 40, 4096, "f16", "f16", "nf4", true, s(), {r: 16, scale: 2}),
                gemvCase(3, 131, 4096, "f16", "f32", "fp4", true, s())
            ]);
            checkGroup([
                gemvCase(2, 300, 2080, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2}, 128),
                gemvCase(2, 512, 2080, "bf16", "bf16", "fp4", false, s())
            ]);
            checkGroup([
                gemvCase(1, 16, 18944, "bf16", "bf16", "nf4", true, s(), {r: 64, scale: 2}),
                gemvCase(1, 48, 18944, "bf16", "f32", "nf4", false, s())
            ]);
            checkGroup([gemvCase(5, 100, 1024, "bf16", "bf16", "nf4", true, s(), {r: 8, scale: 4})]);
        });

        test("a part's bias joins before the one rounding: f32 y is gemv4bit's y + bias, bit for bit", () => {
            // f32 y makes the sum checkable exactly: the kernel adds the bias to the fp32 result, as the host does here
            const cases = [
                gemvCase(3, 512, 768, "bf16", "f32", "nf4", true, 710, {r: 16, scale: 2}),
                gemvCase(3, 131, 768, "bf16", "f32", "nf4", false, 711)
            ];
            const {M, K} = cases[0];
            const x = uniform(M * K, 1, "bf16", new Rng(712));
            const problems = cases.map((c) => gemvProblem(c, x));
            const dx = uploadAs(x, "bf16");
            const devs = cases.map((c, i) => uploadProblem(c, problems[i], false));
            const biasHost = cases.map((c) => uniform(c.N, 0.5, "bf16", new Rng(c.seed + 7)));
            const biases = biasHost.map((b) => uploadAs(b, "bf16"));
            const grouped = cases.map((c) => DeviceBuffer.alloc("f32", c.M * c.N));
            const alone = cases.map((c) => DeviceBuffer.alloc("f32", c.M * c.N));
            try {
                ops.gemv4bitGroup(
                    dx.ptr,
                    "bf16",
                    M,
                    K,
                    cases.map((c, i) => ({...groupPart(c, problems[i], devs[i], grouped[i]), bias: biases[i].ptr}))
                );
                cases.forEach((c, i) => gemvOnGpu(c, problems[i], devs[i], alone[i], dx));
                cases.forEach((c, i) => {
                    const g = downloadAs(grouped[i], "f32", c.M * c.N),
                        a = downloadAs(alone[i], "f32", c.M * c.N);
                    for (let e = 0; e < g.length; e++) {
                        const want = Math.fround(a[e] + biasHost[i][e % c.N]);
                        assert.ok(Object.is(g[e], want), `part ${i} y[${e}] = ${g[e]}, want ${a[e]} + ${biasHost[i][e % c.N]}`);
                    }
                });
            } finally {
                for (const b of [dx, ...biases, ...grouped, ...alone]) b.free();
                for (const d of devs) d.free();
            }
        });

        test("small N split across blocks: near the CPU, the same bits on every run and in CUDA graph replays", () => {
            let seed = 600;
            checkRepeatable([
                gemvCase(1, 512, 3584, "bf16", "bf16", "nf4", true, seed++),
                gemvCase(8, 512, 3584, "bf16", "bf16", "nf4", true, seed++, {r: 16, scale: 2}),
                gemvCase(3, 40, 4096, "f16", "f32", "fp4", false, seed++),
                gemvCase(1, 16, 18944, "bf16", "bf16", "nf4", true, seed++, {r: 64, scale: 0.5})
            ]);
        });

        test("what the tensor-core kernel does not take throws, naming the part", () => {
            const K = 64,
                N = 16;
            const s = quantize4bit(weights(N * K, 9), {shape: [N, K], compressStatistics: true});
            const d = toDevice(s);
            const x = DeviceBuffer.zeros("bf16", 8 * K),
                xf = DeviceBuffer.zeros("f32", 8 * K),
                y = DeviceBuffer.alloc("f32", 8 * N),
                xa = DeviceBuffer.zeros("bf16", 8 * 65),
                b = DeviceBuffer.zeros("bf16", N * 65);
            const part: Gemv4bitPart = {y: y.ptr, yDtype: "f32", ...gemv4bitStateFields(stateArgs(s, d)), N};
            const group = (parts: unknown[], M = 1, k = K, xPtr = x.ptr, xDtype: GemmDtype = "bf16") =>
                (ops.gemv4bitGroup as (...a: unknown[]) => void)(xPtr, xDtype, M, k, parts);
            try {
                group([part]); // a valid call first: the refusals below are about what they change
                assert.throws(
                    () => group([part], 1, K, xf.ptr, "f32"),
                    (err: Error) =>
                        err instanceof RangeError && /gemv4bitGroup: unsupported layout.*gemv4bit for each part/.test(err.message)
                );
                assert.throws(() => group([part], 1, 40), /unsupported layout/); // K % 32 != 0
                assert.throws(
                    () => group([]),
                    (err: Error) => err instanceof RangeError && /takes 1\.\.4 parts, got 0/.test(err.message)
                );
                assert.throws(() => group([part, part, part, part, part]), /takes 1\.\.4 parts, got 5/);
                assert.throws(() => group([part], 9), /parts\[0\]: needs 1 <= M <= 8/);
                assert.throws(
                    () => group([part, {...part, packed: undefined}]),
                    (err: Error) =>
                        err instanceof TypeError && /parts\[1\]\.packed: expected a device buffer address/.test(err.message)
                );
                assert.throws(() => group([part, {...part, yDtype: "f64"}]), /parts\[1\]\.yDtype: expected a dtype/);
                assert.throws(() => group([{...part, yDtype: "f16"}]), /parts\[0\]: needs .*y in f32 or x's dtype/);
                assert.throws(() => group([part, 7]), /parts\[1\]: expected an object/);
                assert.throws(
                    () => group([part, {...part, loraXa: xa.ptr, loraB: b.ptr, loraR: 65, loraScale: 1}]),
                    (err: Error) => err instanceof RangeError && /parts\[1\]: loraR = 65 is outside 0\.\.64/.test(err.message)
                );
                assert.throws(
                    () => group([{...part, loraXa: xa.ptr, loraB: b.ptr, loraR: 16}]),
                    /parts\[0\]: loraR > 0 needs loraScale/
                );
                assert.throws(
                    () => group([{...part, loraXa: xa.ptr, loraR: 16, loraScale: 1}]),
                    /parts\[0\]: loraR > 0 needs the device buffers loraXa/
                );
                assert.throws(() => group(part as unknown as unknown[]), /argument 4: expected an array of parts/);
            } finally {
                for (const buf of [x, xf, y, xa, b]) buf.free();
                d.free();
            }
        });
    });

    // this process's --import flags (tsx in development), not the test runner's
    const loaderFlags = () =>
        process.execArgv.flatMap((a, i, all) =>
            a.startsWith("--import=") ? [a] : a === "--import" && i + 1 < all.length ? [a, all[i + 1]] : []
        );
    const thisFile = fileURLToPath(import.meta.url);

    if (LUT_VARIANT) {
        describe(`LUT kernel (QLORA_GEMV4BIT_VARIANT=${process.env.QLORA_GEMV4BIT_VARIANT})`, () => {
            test("near the reference of its own weights (tight) and the usual one (usual tolerance); closer to its own", () => {
                let seed = 800;
                const cases = [
                    gemvCase(1, 512, 3584, "bf16", "f32", "nf4", true, seed++),
                    gemvCase(8, 200, 768, "bf16", "bf16", "nf4", true, seed++, {r: 16, scale: 2}),
                    gemvCase(3, 131, 4096, "f16", "f32", "fp4", false, seed++),
                    gemvCase(2, 77, 2048, "bf16", "f32", "nf4", true, seed++, undefined, 128),
                    // blocks of 4096 across rows of 3584
                    gemvCase(1, 48, 3584, "bf16", "f32", "nf4", true, seed++, undefined, 4096),
                    gemvCase(1, 16, 18944, "bf16", "bf16", "nf4", true, seed++, {r: 64, scale: 0.5}),
                    gemvCase(5, 100, 64, "bf16", "f32", "nf4", true, seed++)
                ];
                for (const c of cases) {
                    const own = gemvProblem(c),
                        usual = gemvProblem(c, undefined, true);
                    assert.ok(own.lut && !usual.lut);
                    const dev = uploadProblem(c, own);
                    const dy = DeviceBuffer.alloc(c.yDtype, c.M * c.N);
                    try {
                        gemvOnGpu(c, own, dev, dy);
                        const got = downloadAs(dy, c.yDtype, c.M * c.N);
                        assertNearReference(c, own, got);
                        assertNearReference(c, usual, got, `${describeCase(c)} (usual weights)`, {
                            roundedOnce: false,
                            weightRel: c.xDtype === "bf16" ? 2 ** -8 : 2 ** -10
                        });
                        if (c.yDtype === "f32") {
                            // the weights differ by 2^-9 relative, the fp32 sums by far less: y is the LUT kernel's
                            let closer = 0;
                            for (let i = 0; i < got.length; i++)
                                if (Math.abs(got[i] - own.ref[i]) < Math.abs(got[i] - usual.ref[i])) closer++;
                            assert.ok(
                                closer >= 0.9 * got.length,
                                `${describeCase(c)}: ${closer} of ${got.length} closer to the LUT reference`
                            );
                        }
                    } finally {
                        dy.free();
                        dev.free();
                    }
                }
            });

            test("groups mixing LUT parts and parts it leaves to lds2 (blocksize 32): each part's y is gemv4bit's bit for bit", () => {
                let seed = 850;
                const s = () => seed++;
                checkGroup([
                    gemvCase(2, 200, 1024, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2}),
                    gemvCase(2, 77, 1024, "bf16", "f32", "nf4", false, s(), undefined, 32),
                    gemvCase(2, 64, 1024, "bf16", "bf16", "fp4", true, s(), undefined, 256)
                ]);
                checkGroup([
                    gemvCase(1, 3584, 3584, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2}),
                    gemvCase(1, 512, 3584, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2}),
                    gemvCase(1, 512, 3584, "bf16", "bf16", "nf4", true, s(), {r: 16, scale: 2})
                ]);
            });

            test("the same bits on every run and in CUDA graph replays, K split across blocks", () => {
                let seed = 870;
                checkRepeatable([
                    gemvCase(1, 512, 3584, "bf16", "bf16", "nf4", true, seed++),
                    gemvCase(8, 512, 3584, "bf16", "f32", "nf4", true, seed++, {r: 16, scale: 2}),
                    gemvCase(1, 16, 18944, "bf16", "bf16", "nf4", true, seed++, {r: 64, scale: 0.5})
                ]);
            });
        });
    } else {
        // The LUT kernel (QLORA_GEMV4BIT_VARIANT, read once per process) in a child process per variant: this file's
        // gemv4bit and gemv4bitGroup tests (whose references then take the LUT kernel's weights) and its own.
        describe("gemv4bit's LUT kernel variants in child processes", () => {
            test("QLORA_GEMV4BIT_VARIANT = lut, lut2", () => {
                for (const variant of ["lut", "lut2"]) {
                    const r = spawnSync(
                        process.execPath,
                        [
                            ...loaderFlags(),
                            "--test",
                            "--test-name-pattern=^(gemv4bit \\(fused|gemv4bitGroup:|LUT kernel)",
                            thisFile
                        ],
                        {
                            encoding: "utf8",
                            cwd: REPO_ROOT,
                            // without NODE_TEST_CONTEXT: under `node --test` the child would report to the parent's
                            // runner in its binary protocol instead of printing its TAP summary
                            env: {...process.env, NODE_TEST_CONTEXT: undefined, QLORA_GEMV4BIT_VARIANT: variant},
                            timeout: 600_000
                        }
                    );
                    assert.equal(
                        r.status,
                        0,
                        `QLORA_GEMV4BIT_VARIANT=${variant} (signal ${r.signal}):\n${r.stdout}\n${r.stderr}`
                    );
                    assert.match(r.stdout, /# pass [1-9]/);
                    assert.match(r.stdout, /# fail 0/);
                }
            });
        });
    }

    // The timing runs in a child process per variant of the tensor-core kernel (QLORA_GEMV4BIT_VARIANT, read once
    // per process): lds2 / lds4 (the 16-entry code table, 2 or 4 k-steps of loads in flight per warp), pair2 /
    // pair4 (the 256-entry table of code pairs, one 8-byte lookup per two weights) and lut / lut2 (the code table
    // in registers, the block scale on the accumulators; 4 or 2 k-steps of 64 in flight).
    describe("gemv4bit on Qwen2-7B shapes, every kernel variant (printed, not asserted)", () => {
        test("q/o, k/v, gate/up, down; M = 1 and 8; LoRA none and r = 16; q+k+v and gate+up grouped vs separate", () => {
            // beside this file, run as this process runs (a .ts under tsx, or the compiled .js on the GPU machine)
            const script = path.join(path.dirname(thisFile), `gemv4bit-timing${path.extname(thisFile)}`);
            for (const variant of ["lds2", "lds4", "pair2", "pair4", "lut", "lut2"]) {
                const r = spawnSync(process.execPath, [...loaderFlags(), script], {
                    encoding: "utf8",
                    cwd: REPO_ROOT,
                    env: {...process.env, QLORA_GEMV4BIT_VARIANT: variant},
                    timeout: 600_000
                });
                console.log(`--- QLORA_GEMV4BIT_VARIANT=${variant}\n${r.stdout.trimEnd()}`);
                assert.equal(r.status, 0, `the timing run of ${variant} failed (signal ${r.signal}): ${r.stderr}`);
            }
        });
    });

    describe("dequantize4bit bandwidth (printed, not asserted)", () => {
        test("14336x4096 (a 7B MLP projection) to bf16", () => {
            const rows = 14336,
                cols = 4096,
                n = rows * cols,
                bs = 64,
                nblocks = n / bs;
            const packedHost = new Uint8Array(n / 2);
            randomFillSync(packedHost);
            const q = new Uint8Array(nblocks);
            randomFillSync(q);
            const rng = new Rng(1);
            const absmaxHost = Float32Array.from({length: nblocks}, () => 0.01 + 0.1 * rng.next());
            const nestedHost = Float32Array.from({length: Math.ceil(nblocks / 256)}, () => 0.05 * rng.next());
            const packed = DeviceBuffer.from("u8", packedHost),
                absmax = DeviceBuffer.from("f32", absmaxHost);
            const absmaxQ = DeviceBuffer.from("u8", q),
                nested = DeviceBuffer.from("f32", nestedHost);
            const nestedCode = DeviceBuffer.from("f32", SIGNED_DYNAMIC_MAP),
                code = DeviceBuffer.from("f32", NF4_CODE);
            const addon = cuda();
            for (const dtype of ["bf16", "f32"] as GemmDtype[]) {
                const out = DeviceBuffer.alloc(dtype === "f32" ? "f32" : "bf16", n);
                for (const dq of [false, true]) {
                    const call = () =>
                        ops.dequantize4bit(
                            out.ptr,
                            dtype,
                            packed.ptr,
                            dq ? 0 : absmax.ptr,
                            dq ? absmaxQ.ptr : 0,
                            dq ? nested.ptr : 0,
                            dq ? nestedCode.ptr : 0,
                            0.03,
                            code.ptr,
                            bs,
                            256,
                            n
                        );
                    for (let i = 0; i < 3; i++) call();
                    addon.synchronize();
                    const iters = 20,
                        t0 = performance.now();
                    for (let i = 0; i < iters; i++) call();
                    addon.synchronize();
                    const ms = (performance.now() - t0) / iters;
                    const bytes = n / 2 + n * BYTES[dtype] + nblocks * (dq ? 1 : 4);
                    console.log(
                        `dequantize4bit ${rows}x${cols} -> ${dtype}${dq ? " (double quant)" : ""}: ` +
                            `${(ms * 1000).toFixed(1)} us, ${(bytes / ms / 1e6).toFixed(0)} GB/s`
                    );
                }
                out.free();
            }
            for (const b of [packed, absmax, absmaxQ, nested, nestedCode, code]) b.free();
        });
    });
}
