// cuda-gemm-types.ts: a hand-written mirror of the gemm ops that native/addon/cuda_gemm.cpp binds into the CUDA
// addon (C declarations: native/cuda/gemm.h, native/cuda/nf4.h). Device buffers are addresses (DeviceBuffer.ptr);
// every op is queued on the backend's stream and returns before the GPU is done (download() synchronizes).
import {cuda} from "./cuda.js";

/** dtype of a device matrix as the gemm ops name it */
export type GemmDtype = "f32" | "bf16" | "f16";

/** the largest M gemv4bit takes */
export const GEMV_4BIT_MAX_M = 8;
/** the largest LoRA rank gemv4bit's fused LoRA term takes (QLORA_GEMV_4BIT_MAX_LORA_R of native/cuda/nf4.h) */
export const GEMV_4BIT_MAX_LORA_R = 64;
/** the most parts gemv4bitGroup takes (QLORA_GEMV_4BIT_MAX_PARTS of native/cuda/nf4.h) */
export const GEMV_4BIT_MAX_PARTS = 4;

/**
 * One weight of a gemv4bitGroup call: gemv4bit's arguments that belong to the weight W[N, K] (its quantization
 * state, y and LoRA term), under the same names. Pointers that do not apply are 0.
 */
export interface Gemv4bitPart {
    y: number;
    yDtype: GemmDtype;
    packed: number;
    absmax: number;
    absmaxQ: number;
    nestedAbsmax: number;
    nestedCode: number;
    offset: number;
    code: number;
    blocksize: number;
    nestedBlocksize: number;
    N: number;
    loraXa?: number;
    loraB?: number;
    /** absent or 0: no LoRA term */
    loraR?: number;
    loraScale?: number;
    /** absent or 0: none; else the bias [N] (xDtype), added before y's one rounding */
    bias?: number;
}

export interface GemmInfo {
    /** the soname that loaded, e.g. "libcublasLt.so.13" */
    library: string;
    /** cublasLtGetVersion(): major * 10000 + minor * 100 + patch */
    version: number;
    /** gemm calls so far */
    calls: number;
    /** cache misses: each ran cuBLASLt's algorithm heuristic once */
    heuristicRuns: number;
    /** matmul plans (descriptors + algorithm) in the cache */
    cachedPlans: number;
    /** calls served by the built-in SIMT kernel (K == 0, or no cuBLASLt algorithm for the shape/alignment) */
    fallbackCalls: number;
}

/** a 4-bit weight's quantization state as dequantize4bit and gemv4bit take it, in their argument order */
export type Gemv4bitStateArgs = readonly [number, number, number, number, number, number, number, number, number];

/** the same state as the fields of a gemv4bitGroup part */
export function gemv4bitStateFields(
    a: Gemv4bitStateArgs
): Pick<
    Gemv4bitPart,
    "packed" | "absmax" | "absmaxQ" | "nestedAbsmax" | "nestedCode" | "offset" | "code" | "blocksize" | "nestedBlocksize"
> {
    const [packed, absmax, absmaxQ, nestedAbsmax, nestedCode, offset, code, blocksize, nestedBlocksize] = a;
    return {packed, absmax, absmaxQ, nestedAbsmax, nestedCode, offset, code, blocksize, nestedBlocksize};
}

export interface CudaGemmOps {
    /**
     * Row-major C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C, the CPU sgemm contract: op(A) = A (A is
     * [M, lda >= K]) or A^T (A is [K, lda >= M]) when transA; likewise B. beta == 0: C is write-only.
     * A and B share one dtype; C is "f32" or that dtype. fp32 accumulation (f32 inputs: no TF32).
     */
    gemm(
        transA: boolean,
        transB: boolean,
        M: number,
        N: number,
        K: number,
        alpha: number,
        A: number,
        lda: number,
        dtypeA: GemmDtype,
        B: number,
        ldb: number,
        dtypeB: GemmDtype,
        beta: number,
        C: number,
        ldc: number,
        dtypeC: GemmDtype
    ): void;
    /** `batch` GEMMs of one shape; matrix i starts at ptr + i * stride elements (stride 0 reuses A or B) */
    gemmStridedBatched(
        transA: boolean,
        transB: boolean,
        M: number,
        N: number,
        K: number,
        alpha: number,
        A: number,
        lda: number,
        strideA: number,
        dtypeA: GemmDtype,
        B: number,
        ldb: number,
        strideB: number,
        dtypeB: GemmDtype,
        beta: number,
        C: number,
        ldc: number,
        strideC: number,
        dtypeC: GemmDtype,
        batch: number
    ): void;
    /**
     * bitsandbytes NF4/FP4 dequantization, bit-identical to the CPU's dequantize4bit: out[n] (outDtype) from
     * packed[ceil(n/2)] (u8, first element in the high nibble) and code[16] (f32). Scales: absmax[nblocks] (f32)
     * with absmaxQ = 0, or double quantized: absmaxQ[nblocks] (u8), nestedAbsmax[ceil(nblocks/nestedBlocksize)]
     * (f32), nestedCode[256] (f32) and offset. Pass 0 for the pointers that do not apply.
     */
    dequantize4bit(
        out: number,
        outDtype: GemmDtype,
        packed: number,
        absmax: number,
        absmaxQ: number,
        nestedAbsmax: number,
        nestedCode: number,
        offset: number,
        code: number,
        blocksize: number,
        nestedBlocksize: number,
        n: number
    ): void;
    /**
     * bitsandbytes NF4/FP4 quantization of bf16 values, bit-identical to the CPU's quantize4bitBf16: packed[ceil(n/2)]
     * (u8, first element in the high nibble) and absmax[ceil(n/blocksize)] (f32) from inp[n] (bf16); quantType 0 (nf4)
     * or 1 (fp4) as QUANT_TYPE_CODE; an even blocksize >= 2. No double quantization: quantize the absmax on the host
     * (src/quant/nf4.ts doubleQuantizeAbsmax) as quantize4bit does.
     */
    quantize4bitBf16(packed: number, absmax: number, inp: number, quantType: number, blocksize: number, n: number): void;
    /**
     * Fused dequantization + GEMV for generation: y[M, N] = x[M, K] @ W^T, W[N, K] the 4-bit weight (same
     * arguments as dequantize4bit, n = N * K), each weight rounded to xDtype before the product, fp32 accumulation.
     * 1 <= M <= 8; yDtype is "f32" or xDtype. Throws a RangeError for layouts it does not handle (K % 8 != 0,
     * non-power-of-two block sizes, misaligned x): use dequantize4bit + gemm there.
     *
     * With loraR > 0 the LoRA branch joins the same pass: y = x @ W^T + loraScale * loraXa @ loraB^T, both sums in
     * fp32 and y rounded once (a separate gemm with beta = 1 would round x @ W^T first). loraXa is [M, loraR]
     * (x A^T), loraB is [N, loraR] (PEFT's lora_B.weight), both in xDtype, row-major. loraR <= GEMV_4BIT_MAX_LORA_R
     * (a RangeError otherwise); omit the four arguments (or pass loraR = 0) for no LoRA term.
     */
    gemv4bit(
        y: number,
        yDtype: GemmDtype,
        x: number,
        xDtype: GemmDtype,
        packed: number,
        absmax: number,
        absmaxQ: number,
        nestedAbsmax: number,
        nestedCode: number,
        offset: number,
        code: number,
        blocksize: number,
        nestedBlocksize: number,
        M: number,
        N: number,
        K: number,
        loraXa?: number,
        loraB?: number,
        loraR?: number,
        loraScale?: number
    ): void;
    /**
     * gemv4bit for 1..GEMV_4BIT_MAX_PARTS weights applied to one x (q, k and v; gate and up) in ONE kernel launch:
     * each part's y is bit for bit what gemv4bit gives for that part alone. Takes only what gemv4bit's tensor-core
     * kernel takes (bf16 or f16 x, K % 32 == 0, power-of-two block sizes >= 32, 16-byte aligned x and packed) and
     * throws a RangeError otherwise: call gemv4bit for each part then.
     */
    gemv4bitGroup(x: number, xDtype: GemmDtype, M: number, K: number, parts: readonly Gemv4bitPart[]): void;
    /** loads cuBLASLt if needed (throws with the reason when it cannot) and reports it */
    gemmInfo(): GemmInfo;
    /** drops the cached matmul plans */
    gemmClearCache(): void;
}

/** the CUDA addon seen through its gemm ops (throws when CUDA is not usable) */
export function cudaGemmOps(): CudaGemmOps {
    return cuda() as unknown as CudaGemmOps;
}
