// NF4/FP4 dequantization on the GPU against the CPU reference (src/quant/nf4.ts dequantize4bit): f32 output
// bit-exact, bf16/f16 output equal to the round-to-nearest-even of the CPU's f32, with and without double
// quantization, several block sizes, odd n, misaligned output (the element-wise kernel), no writes past n.
// The fused 4-bit GEMV (gemv4bit) against a float64 reference, with and without its LoRA term, on both of its
// kernels; argument errors. Prints the bandwidth of both on the shapes that matter. Runs only on a machine with a
// usable GPU (npm run test:gpu).
import {test, describe} from "node:test";
import assert from "node:assert/strict";
import {randomFillSync} from "node:crypto";
import {cpu} from "../../src/backend/cpu.js";
import {cuda, cudaAvailability, CudaGraph, DeviceBuffer} from "../../src/backend/cuda.js";
import {cudaGemmOps, type GemmDtype} from "../../src/backend/cuda-gemm-types.js";
import {Rng} from "../../src/backend/rng.js";
import {
    dequantize4bit,
    NF4_CODE,
    quantize4bit,
    SIGNED_DYNAMIC_MAP,
    type QuantState4bit,
    type QuantType
} from "../../src/quant/nf4.js";

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

    /**
     * y = x @ W^T (+ scale * xa @ B^T) on the GPU (fused, one pass) against a float64 reference from the same
     * inputs: W dequantized on the CPU and rounded to x's dtype, x, xa and B rounded to x's dtype. Per element
     * |y - ref| <= relTol |ref| + 1e-5 sqrt(K + r) S + 1e-7, where relTol is the rounding of y to its dtype (2^-8
     * for bf16, 2^-11 for f16, 0 for f32: relative half an ulp, rounded up) and S = sum |x||W| + |scale| sum |xa||B|
     * bounds the fp32 accumulation error (any summation order). With a 16-bit y and a LoRA term, y must also be
     * rounded ONCE: at least 95% of the elements equal round(ref) exactly (fp32 summation order flips a few near
     * ties). Rounding x @ W^T to y's dtype before adding the LoRA term, as a separate gemm with beta = 1 does, matches
     * only about 75% (the LoRA term here is of the size of x @ W^T).
     */
    function checkGemv(c: GemvCase): void {
        const {M, N, K, xDtype, yDtype} = c;
        const what = describeCase(c);
        const s = quantize4bit(weights(N * K, c.seed), {
            quantType: c.quantType,
            compressStatistics: c.compress,
            blocksize: c.blocksize ?? 64,
            shape: [N, K]
        });
        const W = roundTo(dequantize4bit(s, {roundToDtype: false}), xDtype);
        const rng = new Rng(c.seed);
        const x = uniform(M * K, 1, xDtype, rng);
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
        const d = toDevice(s);
        const dx = uploadAs(x, xDtype),
            dxa = r > 0 ? uploadAs(xa, xDtype) : null,
            dB = r > 0 ? uploadAs(B, xDtype) : null;
        const dy = DeviceBuffer.alloc(yDtype, M * N);
        try {
            const args = [dy.ptr, yDtype, dx.ptr, xDtype, ...stateArgs(s, d), M, N, K] as const;
            if (dxa && dB) ops.gemv4bit(...args, dxa.ptr, dB.ptr, r, scale);
            else ops.gemv4bit(...args);
            const got = downloadAs(dy, yDtype, M * N);
            const relTol = yDtype === "bf16" ? 2 ** -8 : yDtype === "f16" ? 2 ** -11 : 0;
            for (let i = 0; i < M * N; i++) {
                const err = Math.abs(got[i] - ref[i]);
                const tol = relTol * Math.abs(ref[i]) + 1e-5 * Math.sqrt(K + r) * S[i] + 1e-7;
                if (!(err <= tol))
                    assert.fail(
                        `${what}: y[${Math.floor(i / N)}, ${i % N}] = ${got[i]}, reference ${ref[i]} ` +
                            `(|err| ${err.toExponential(2)} > ${tol.toExponential(2)})`
                    );
            }
            if (r > 0 && yDtype !== "f32") {
                const once = roundTo(Float32Array.from(ref), yDtype);
                let equal = 0;
                for (let i = 0; i < M * N; i++) if (got[i] === once[i]) equal++;
                assert.ok(
                    equal >= 0.95 * M * N,
                    `${what}: ${equal} of ${M * N} elements equal the reference rounded once to ${yDtype} ` +
                        `(want >= 95%): y looks rounded before the LoRA term was added`
                );
            }
        } finally {
            for (const b of [dx, dxa, dB, dy]) b?.free();
            d.free();
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
                assert.throws(() => gemvCall(1, 64, [xa.ptr, b.ptr, 16]), /expected a number/); // no scale
            } finally {
                xa.free();
                b.free();
            }
        });
    });

    /**
     * Device microseconds per call of `call(i)`, i = 0 .. calls - 1: the calls recorded once into a CUDA graph and
     * replayed (no host launch overhead); queued one by one from JavaScript when the capture fails.
     */
    function deviceMicros(call: (i: number) => void, calls: number): {us: number; how: string} {
        const addon = cuda();
        for (let i = 0; i < calls; i++) call(i);
        addon.synchronize();
        const reps = 10;
        let graph: CudaGraph | null = null;
        try {
            graph = CudaGraph.capture(() => {
                for (let i = 0; i < calls; i++) call(i);
            });
        } catch {
            graph = null;
        }
        const t0 = performance.now();
        for (let r = 0; r < reps; r++) {
            if (graph) graph.launch();
            else for (let i = 0; i < calls; i++) call(i);
        }
        addon.synchronize();
        const us = ((performance.now() - t0) * 1000) / (reps * calls);
        graph?.destroy();
        return {us, how: graph ? "graph replay" : "queued from JS"};
    }

    describe("gemv4bit on Qwen2-7B shapes (printed, not asserted)", () => {
        test("NF4 double quant, bs 64, bf16: q/o, k/v, gate/up, down; M = 1 and 8; LoRA none and r = 16", () => {
            const shapes: [string, number, number][] = [
                ["q/o", 3584, 3584],
                ["k/v", 512, 3584],
                ["gate/up", 18944, 3584],
                ["down", 3584, 18944]
            ];
            const bs = 64,
                rank = 16,
                rng = new Rng(5);
            const nestedCode = DeviceBuffer.from("f32", SIGNED_DYNAMIC_MAP),
                code = DeviceBuffer.from("f32", NF4_CODE);
            for (const [name, N, K] of shapes) {
                const bytes = (N * K) / 2,
                    nblocks = (N * K) / bs,
                    nnested = Math.ceil(nblocks / 256);
                // copies of the weight cycled through, 128 MB in all, so that they come from HBM, not the 50 MB L2
                const copies = Math.max(1, Math.ceil(128e6 / bytes));
                const packedHost = new Uint8Array(copies * bytes),
                    qHost = new Uint8Array(copies * nblocks);
                randomFillSync(packedHost);
                randomFillSync(qHost);
                const packed = DeviceBuffer.from("u8", packedHost),
                    absmaxQ = DeviceBuffer.from("u8", qHost);
                const nested = DeviceBuffer.from(
                    "f32",
                    Float32Array.from({length: copies * nnested}, () => 0.05 * rng.next())
                );
                for (const M of [1, 8]) {
                    const x = uploadAs(uniform(M * K, 1, "bf16", rng), "bf16"),
                        y = DeviceBuffer.alloc("bf16", M * N);
                    const xa = uploadAs(uniform(M * rank, 1, "bf16", rng), "bf16"),
                        B = uploadAs(uniform(N * rank, 0.1, "bf16", rng), "bf16");
                    for (const lora of [false, true]) {
                        const call = (i: number) => {
                            const c = i % copies;
                            const args = [
                                y.ptr,
                                "bf16",
                                x.ptr,
                                "bf16",
                                packed.ptr + c * bytes,
                                0,
                                absmaxQ.ptr + c * nblocks,
                                nested.ptr + c * nnested * 4,
                                nestedCode.ptr,
                                0.03,
                                code.ptr,
                                bs,
                                256,
                                M,
                                N,
                                K
                            ] as const;
                            if (lora) ops.gemv4bit(...args, xa.ptr, B.ptr, rank, 2);
                            else ops.gemv4bit(...args);
                        };
                        const {us, how} = deviceMicros(call, Math.max(copies, 20));
                        const weightBytes = bytes + nblocks + nnested * 4;
                        console.log(
                            `gemv4bit ${name} ${N}x${K} M=${M}${lora ? ` + LoRA r=${rank}` : ""}: ${us.toFixed(1)} us, ` +
                                `${(weightBytes / us / 1e3).toFixed(0)} GB/s of weight bytes (${how})`
                        );
                    }
                    for (const b of [x, y, xa, B]) b.free();
                }
                for (const b of [packed, absmaxQ, nested]) b.free();
            }
            nestedCode.free();
            code.free();
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
