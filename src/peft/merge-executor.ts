// merge-executor.ts: where `qlora merge` computes: the host or an NVIDIA GPU. The merge of one projection
// (merge.ts mergeProjection) is written once over MergeExecutor; an executor holds the weight being merged and runs
// each step on its device:
//
//   W [out, in] in f32 (from the checkpoint's f32, bf16 or f16 values)
//   --against-nf4: W = dequant(NF4(bf16(W))), bnb's quantization (block 64, double-quantized scales) dequantized in
//                  f32, not rounded back to bf16: the base the QLoRA adapter was trained on
//   W += s B A     in fp32: the r-term dot products (fp32 FMAs), times s, plus W, each rounded to f32
//   DoRA:          W[r, :] *= m[r] / ||W[r, :]|| (the norm a float64 sum, the ratio and the product in float64)
//   bf16 / f16 bits (round to nearest even) on the host
//
// The CPU executor is the host code the GGUF export and DoRA's initial magnitude use as well (lora/layer.ts,
// quant/nf4.ts): PEFT's merge_and_unload on the CPU, which computes B A in fp32 for 16-bit weights and adds it in
// fp32. The CUDA executor runs the same steps as kernels: the conversions and the NF4 round trip (the 4-bit codes
// on the GPU, the double quantization of the scales on the host by quant/nf4.ts), the scaling, the add and the
// DoRA row scale give the CPU's bits for the same inputs; the dot products are cuBLASLt's fp32 GEMM (no TF32),
// whose r-term sums may run in another order than the CPU sgemm's FMA chain, so s B A can differ from the CPU's by
// an f32 ulp, which the 16-bit result shows as one bf16/f16 ulp in a small fraction of the values (about 2^-15 of
// those whose f32 value differs for bf16, 2^-12 for f16; test/gpu/merge.test.ts allows 0.1%); DoRA's row norms sum
// in float64 in another order, which changes a norm's f32 rounding only in rare ties.
import {QloraError} from "../errors.js";
import {f32ToHalf, halfToF32} from "../backend/cpu.js";
import {cudaBackend} from "../backend/cuda-backend.js";
import {cuda, cudaMemoryStats, DeviceBuffer, type DeviceDtype} from "../backend/cuda.js";
import {cudaGemmOps} from "../backend/cuda-gemm-types.js";
import {cudaKernelOps} from "../backend/cuda-kernels-types.js";
import {cudaLoraOps} from "../backend/cuda-lora-types.js";
import {QUANT_TYPE_CODE} from "../backend/native-quant-types.js";
import {addDeltaWeight, applyDoraMagnitude} from "../lora/layer.js";
import type {RawFloatTensor} from "../model/weights.js";
import {
    codeTable,
    dequantize4bit,
    doubleQuantizeAbsmax,
    NESTED_BLOCKSIZE,
    quantize4bit,
    SIGNED_DYNAMIC_MAP,
    type Quantize4bitOptions
} from "../quant/nf4.js";
import type {AdapterBranch} from "./adapter-files.js";

/** the quantization of --against-nf4's base: QLoRA's (bnb_4bit_quant_type nf4, block 64, double quantization) */
export const MERGE_NF4: Required<Pick<Quantize4bitOptions, "quantType" | "blocksize" | "compressStatistics">> = {
    quantType: "nf4",
    blocksize: 64,
    compressStatistics: true
};

/**
 * The steps of a merge on one device. T is the executor's handle of an f32 weight [R, C] (a Float32Array on the
 * host, a DeviceBuffer on the GPU); every step but free keeps the handle's ownership where it was.
 */
export interface MergeExecutor<T> {
    readonly device: "cpu" | "cuda";
    /** the weight [R, C] in f32, from the values as a checkpoint stores them (an f32 input may become the handle) */
    weight(raw: RawFloatTensor): T;
    /** dequant(NF4(bf16(W))) in f32 (MERGE_NF4, not rounded to bf16): a new handle; W is left as it was */
    nf4RoundTrip(W: T, R: number, C: number): T;
    /** W[R, C] += scaling B A */
    addDelta(W: T, branch: AdapterBranch): void;
    /** DoRA: W[r, :] *= magnitude[r] / ||W[r, :]|| */
    applyMagnitude(W: T, magnitude: Float32Array, R: number, C: number): void;
    /** W rounded to bf16 or f16 (nearest even), as bits on the host */
    toHalf(W: T, dtype: "BF16" | "F16"): Uint16Array;
    /** releases a handle (on the host the garbage collector does) */
    free(W: T): void;
    /** releases everything the executor still holds (also the handles of a merge that threw) */
    close(): void;
}

/** the merge on the host: the same functions as the GGUF export's merge and DoRA's initial magnitude */
export function cpuMergeExecutor(): MergeExecutor<Float32Array> {
    return {
        device: "cpu",
        weight: (raw) => (raw.dtype === "F32" ? raw.values : halfToF32(raw.values, raw.dtype)),
        nf4RoundTrip: (W, R, C) =>
            dequantize4bit(quantize4bit({bf16: f32ToHalf(W, "BF16")}, {...MERGE_NF4, shape: [R, C]}), {roundToDtype: false}),
        addDelta: (W, branch) => {
            addDeltaWeight(W, branch, branch.outFeatures, branch.inFeatures);
        },
        applyMagnitude: (W, magnitude, R, C) => {
            applyDoraMagnitude(W, magnitude, R, C);
        },
        toHalf: (W, dtype) => f32ToHalf(W, dtype),
        free: () => {},
        close: () => {}
    };
}

/**
 * The merge on the GPU: the weight moves to the device once (as stored: 16-bit values are widened there), every
 * step runs there, and the 16-bit result comes back. Throws the reason when CUDA is not usable.
 */
export function cudaMergeExecutor(): MergeExecutor<DeviceBuffer> {
    cuda(); // a one-line error naming what is missing, before any tensor is read
    return new CudaMergeExecutor();
}

class CudaMergeExecutor implements MergeExecutor<DeviceBuffer> {
    readonly device = "cuda" as const;
    /** every buffer this executor allocated and has not freed: close() frees them after a failed merge */
    private readonly live = new Set<DeviceBuffer>();
    /** the NF4 code table and the scales' 8-bit map, uploaded on first use */
    private tables: {code: DeviceBuffer; nestedCode: DeviceBuffer} | null = null;

    private alloc(dtype: DeviceDtype, n: number): DeviceBuffer {
        let b: DeviceBuffer;
        try {
            b = DeviceBuffer.alloc(dtype, n);
        } catch (err) {
            throw mergeOutOfMemory(err, n * (dtype === "f32" || dtype === "i32" ? 4 : dtype === "u8" ? 1 : 2));
        }
        this.live.add(b);
        return b;
    }

    private upload(dtype: DeviceDtype, data: Float32Array | Uint16Array | Uint8Array): DeviceBuffer {
        const b = this.alloc(dtype, data.length);
        b.upload(data);
        return b;
    }

    weight(raw: RawFloatTensor): DeviceBuffer {
        if (raw.dtype === "F32") return this.upload("f32", raw.values);
        const n = raw.values.length;
        const half = this.upload(raw.dtype === "BF16" ? "bf16" : "f16", raw.values);
        const W = this.alloc("f32", n);
        if (raw.dtype === "BF16") cudaKernelOps().bf16ToF32(W.ptr, half.ptr, n);
        else cudaKernelOps().f16ToF32(W.ptr, half.ptr, n);
        this.free(half);
        return W;
    }

    nf4RoundTrip(W: DeviceBuffer, R: number, C: number): DeviceBuffer {
        const n = R * C;
        const {blocksize, quantType} = MERGE_NF4;
        const bits = this.alloc("bf16", n);
        cudaKernelOps().f32ToBf16(bits.ptr, W.ptr, n);
        const packed = this.alloc("u8", Math.ceil(n / 2));
        const absmax = this.alloc("f32", Math.ceil(n / blocksize));
        cudaGemmOps().quantize4bitBf16(packed.ptr, absmax.ptr, bits.ptr, QUANT_TYPE_CODE[quantType], blocksize, n);
        this.free(bits);
        // the scales' double quantization is a 64th of the work and sequential (a float64 mean): the host's code
        const dq = doubleQuantizeAbsmax(absmax.toHost() as Float32Array);
        this.free(absmax);
        const absmaxQ = this.upload("u8", dq.absmaxQ);
        const nested = this.upload("f32", dq.nestedAbsmax);
        const t = this.codeTables();
        const out = this.alloc("f32", n);
        cudaGemmOps().dequantize4bit(
            out.ptr,
            "f32",
            packed.ptr,
            0,
            absmaxQ.ptr,
            nested.ptr,
            t.nestedCode.ptr,
            dq.offset,
            t.code.ptr,
            blocksize,
            NESTED_BLOCKSIZE,
            n
        );
        this.free(packed);
        this.free(absmaxQ);
        this.free(nested);
        return out;
    }

    addDelta(W: DeviceBuffer, branch: AdapterBranch): void {
        const A = this.upload("f32", branch.A);
        const B = this.upload("f32", branch.B);
        // as the host's sgemm with beta 1 computes it: D = fl32(s * (B A)) (cuBLASLt's fp32 GEMM, no TF32), then
        // W = fl32(W + D); a GEMM with beta 1 could fuse the two into one rounding, which the host does not
        const D = this.alloc("f32", W.length);
        cudaBackend().gemm(false, false, branch.outFeatures, branch.inFeatures, branch.r, branch.scaling, B, A, 0, D);
        cudaKernelOps().addInplace(W.ptr, D.ptr, W.length);
        this.free(D);
        this.free(A);
        this.free(B);
    }

    applyMagnitude(W: DeviceBuffer, magnitude: Float32Array, R: number, C: number): void {
        const norms = this.alloc("f32", R);
        cudaBackend().rowNorms(norms, W, R, C);
        const m = this.upload("f32", magnitude);
        cudaLoraOps().scaleRowsRatioF32(W.ptr, m.ptr, norms.ptr, R, C);
        this.free(m);
        this.free(norms);
    }

    toHalf(W: DeviceBuffer, dtype: "BF16" | "F16"): Uint16Array {
        const out = this.alloc(dtype === "BF16" ? "bf16" : "f16", W.length);
        if (dtype === "BF16") cudaKernelOps().f32ToBf16(out.ptr, W.ptr, W.length);
        else cudaKernelOps().f32ToF16(out.ptr, W.ptr, W.length);
        const bits = out.toHost() as Uint16Array;
        this.free(out);
        return bits;
    }

    free(W: DeviceBuffer): void {
        if (this.live.delete(W)) W.free();
    }

    close(): void {
        for (const b of this.live) b.free();
        this.live.clear();
        this.tables = null;
    }

    private codeTables(): {code: DeviceBuffer; nestedCode: DeviceBuffer} {
        this.tables ??= {
            code: this.upload("f32", codeTable(MERGE_NF4.quantType)),
            nestedCode: this.upload("f32", SIGNED_DYNAMIC_MAP)
        };
        return this.tables;
    }
}

/** DeviceBuffer's out-of-memory error says what a merge can do instead (its own advice is about training) */
function mergeOutOfMemory(err: unknown, bytes: number): unknown {
    if (!(err instanceof QloraError) || !/^out of GPU memory/.test(err.message)) return err;
    const s = cudaMemoryStats();
    const gib = (b: number | undefined) => (b === undefined ? "?" : (b / 2 ** 30).toFixed(2));
    return new QloraError(
        `out of GPU memory: the merge needed ${gib(bytes)} GiB more with ${gib(s.allocated)} GiB in use and ` +
            `${gib(s.deviceFree)} GiB free of the GPU's ${gib(s.deviceTotal)} GiB (another process may hold it); ` +
            "merge on the host with --device cpu",
        {cause: err}
    );
}
