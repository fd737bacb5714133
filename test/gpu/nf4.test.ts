// NF4/FP4 dequantization on the GPU against the CPU reference (src/quant/nf4.ts dequantize4bit): f32 output
// bit-exact, bf16/f16 output equal to the round-to-nearest-even of the CPU's f32, with and without double
// quantization, several block sizes, odd n, misaligned output (the element-wise kernel), no writes past n,
// and a bandwidth print. Runs only on a machine with a usable GPU (npm run test:gpu).
import {test, describe} from "node:test";
import assert from "node:assert/strict";
import {randomFillSync} from "node:crypto";
import {cpu} from "../../src/backend/cpu.js";
import {cuda, cudaAvailability, DeviceBuffer} from "../../src/backend/cuda.js";
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

    /** runs the GPU dequantization into `out` at byte offset `offsetBytes` */
    function dequantOnGpu(s: QuantState4bit, d: DeviceState, out: DeviceBuffer, dtype: GemmDtype, offsetBytes = 0): void {
        ops.dequantize4bit(
            out.ptr + offsetBytes,
            dtype,
            d.packed.ptr,
            d.absmax?.ptr ?? 0,
            d.absmaxQ?.ptr ?? 0,
            d.nestedAbsmax?.ptr ?? 0,
            d.nestedCode?.ptr ?? 0,
            s.offset,
            d.code.ptr,
            s.blocksize,
            s.nestedBlocksize,
            numel(s)
        );
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

    /** y = x @ W^T on the GPU (fused) against the CPU sgemm with the dequantized weight rounded to x's dtype */
    function checkGemv(
        M: number,
        N: number,
        K: number,
        xDtype: GemmDtype,
        yDtype: GemmDtype,
        quantType: QuantType,
        compress: boolean,
        seed: number
    ): void {
        const s = quantize4bit(weights(N * K, seed), {quantType, compressStatistics: compress, shape: [N, K]});
        const W = roundTo(dequantize4bit(s, {roundToDtype: false}), xDtype);
        const rng = new Rng(seed);
        const x = roundTo(
            Float32Array.from({length: M * K}, () => rng.next() * 2 - 1),
            xDtype
        );
        const ref = new Float32Array(M * N),
            S = new Float32Array(M * N);
        cpu().sgemm(false, true, M, N, K, 1, x, K, W, K, 0, ref, N);
        cpu().sgemm(false, true, M, N, K, 1, x.map(Math.abs), K, W.map(Math.abs), K, 0, S, N);
        const d = toDevice(s);
        const dx = uploadAs(x, xDtype);
        const dy = DeviceBuffer.alloc(yDtype, M * N);
        try {
            ops.gemv4bit(
                dy.ptr,
                yDtype,
                dx.ptr,
                xDtype,
                d.packed.ptr,
                d.absmax?.ptr ?? 0,
                d.absmaxQ?.ptr ?? 0,
                d.nestedAbsmax?.ptr ?? 0,
                d.nestedCode?.ptr ?? 0,
                s.offset,
                d.code.ptr,
                s.blocksize,
                s.nestedBlocksize,
                M,
                N,
                K
            );
            const got = downloadAs(dy, yDtype, M * N);
            const relTol = yDtype === "bf16" ? 2 ** -8 : yDtype === "f16" ? 2 ** -10 : 0;
            for (let i = 0; i < M * N; i++) {
                const err = Math.abs(got[i] - ref[i]);
                const tol = 1e-5 * Math.sqrt(K) * S[i] + relTol * Math.abs(ref[i]) + 1e-7;
                if (!(err <= tol))
                    assert.fail(
                        `gemv4bit ${quantType}${compress ? " dq" : ""} ${xDtype}->${yDtype} M=${M} N=${N} K=${K}: ` +
                            `y[${Math.floor(i / N)}, ${i % N}] = ${got[i]}, CPU ${ref[i]} (|err| ${err.toExponential(2)} > ${tol.toExponential(2)})`
                    );
            }
        } finally {
            d.free();
            dx.free();
            dy.free();
        }
    }

    describe("gemv4bit (fused dequantize + GEMV) vs CPU", () => {
        test("M = 1..8, bf16/f16/f32, nf4/fp4, with and without double quant", () => {
            let seed = 100;
            for (const M of [1, 2, 3, 5, 8]) {
                checkGemv(M, 256, 768, "bf16", "bf16", "nf4", true, seed++);
                checkGemv(M, 256, 768, "bf16", "f32", "nf4", false, seed++);
            }
            checkGemv(4, 131, 1000, "f32", "f32", "fp4", true, seed++);
            checkGemv(6, 77, 520, "f16", "f16", "nf4", true, seed++);
            checkGemv(7, 77, 520, "f16", "f32", "fp4", false, seed++);
            checkGemv(1, 4096, 4096, "bf16", "bf16", "nf4", true, seed++);
        });
        test("layouts it does not handle throw (K % 8 != 0)", () => {
            const s = quantize4bit(weights(16 * 12, 9), {shape: [16, 12]});
            const d = toDevice(s);
            const x = DeviceBuffer.zeros("bf16", 12),
                y = DeviceBuffer.alloc("bf16", 16);
            assert.throws(
                () =>
                    ops.gemv4bit(
                        y.ptr,
                        "bf16",
                        x.ptr,
                        "bf16",
                        d.packed.ptr,
                        0,
                        d.absmaxQ!.ptr,
                        d.nestedAbsmax!.ptr,
                        d.nestedCode!.ptr,
                        s.offset,
                        d.code.ptr,
                        s.blocksize,
                        s.nestedBlocksize,
                        1,
                        16,
                        12
                    ),
                /unsupported layout/
            );
            assert.throws(
                () =>
                    ops.gemv4bit(
                        y.ptr,
                        "bf16",
                        x.ptr,
                        "bf16",
                        d.packed.ptr,
                        0,
                        d.absmaxQ!.ptr,
                        d.nestedAbsmax!.ptr,
                        d.nestedCode!.ptr,
                        s.offset,
                        d.code.ptr,
                        s.blocksize,
                        s.nestedBlocksize,
                        9,
                        16,
                        8
                    ),
                /M <= 8/
            );
            d.free();
            x.free();
            y.free();
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
            // fused GEMV, M = 1 and 8, bf16 (double quant): the weight bytes dominate
            for (const M of [1, 8]) {
                const x = DeviceBuffer.zeros("bf16", M * cols),
                    y = DeviceBuffer.alloc("bf16", M * rows);
                const call = () =>
                    ops.gemv4bit(
                        y.ptr,
                        "bf16",
                        x.ptr,
                        "bf16",
                        packed.ptr,
                        0,
                        absmaxQ.ptr,
                        nested.ptr,
                        nestedCode.ptr,
                        0.03,
                        code.ptr,
                        bs,
                        256,
                        M,
                        rows,
                        cols
                    );
                for (let i = 0; i < 3; i++) call();
                addon.synchronize();
                const iters = 20,
                    t0 = performance.now();
                for (let i = 0; i < iters; i++) call();
                addon.synchronize();
                const ms = (performance.now() - t0) / iters;
                const bytes = n / 2 + nblocks + M * cols * 2 + M * rows * 2;
                console.log(
                    `gemv4bit M=${M} ${rows}x${cols} bf16 (double quant): ${(ms * 1000).toFixed(1)} us, ` +
                        `${(bytes / ms / 1e6).toFixed(0)} GB/s of weights`
                );
                x.free();
                y.free();
            }
            for (const b of [packed, absmax, absmaxQ, nested, nestedCode, code]) b.free();
        });
    });
}
