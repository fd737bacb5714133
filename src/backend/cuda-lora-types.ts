// cuda-lora-types.ts: a hand-written mirror of the projection layers' small kernels (LoRA, DoRA, trained biases)
// that native/addon/cuda_lora.cpp binds into the CUDA addon (C declarations: native/cuda/lora_extras.h,
// native/cuda/lora_down.h). Buffers are device addresses (DeviceBuffer.ptr) of the dtypes each op names; every op is
// queued on the backend's stream and returns before the GPU is done.
import {cuda} from "./cuda.js";

/** the limits of loraDown (QLORA_LORA_DOWN_MAX_* of native/cuda/lora_down.h) */
export const LORA_DOWN_MAX_M = 8;
export const LORA_DOWN_MAX_R = 64;
export const LORA_DOWN_MAX_PARTS = 4;

/** one projection of a loraDown call: device addresses of out [M, r] and A [r, K] (bf16, row-major) */
export interface LoraDownPart {
    out: number;
    /** PEFT's lora_A.weight */
    A: number;
    r: number;
}

export interface CudaLoraOps {
    /** y[N,C] += bias[C] */
    addBiasBf16(y: number, bias: number, N: number, C: number): void;
    /** out[n] = inp[n] * keep(seed, i) / (1 - p), the mask a hash of (seed, i) (seed < 2^53); in place allowed */
    dropoutBf16(out: number, inp: number, seed: number, p: number, n: number, first: number): void;
    /** y[n] += x[n] * keep(seed, i) / (1 - p): dropout's backward into an input gradient */
    dropoutAddBf16(y: number, x: number, seed: number, p: number, n: number, first: number): void;
    /** out[m, n] (bf16; = or += when accumulate) x[m, n] (k[n] + offset), k f32 [N]; out may alias x */
    scaleColumnsBf16(out: number, x: number, k: number, offset: number, M: number, N: number, accumulate: boolean): void;
    /** dst[n] (f32, +=) sum_m a[m, n] b[m, n] / div[n] (a, b bf16; b and div null: factor 1), float64 sums */
    columnSumsBf16(dst: number, a: number, b: number | null, div: number | null, M: number, N: number): void;
    /** out[r] = ||W[r, :]|| (f32 W [R, C], float64 sums) */
    rowNormsF32(out: number, W: number, R: number, C: number): void;
    /** out[i] = a[i] / b[i] (f32) */
    divideF32(out: number, a: number, b: number, n: number): void;
    /**
     * W[r, c] = fl32(W[r, c] (num[r] / den[r])) (f32 W [R, C], num and den f32 [R]), the ratio and the product in
     * float64: DoRA's merged rows as lora/layer.ts applyDoraMagnitude scales them on the host
     */
    scaleRowsRatioF32(W: number, num: number, den: number, R: number, C: number): void;
    /**
     * The LoRA "A" products of a decoding step in one launch: for each part, out[M, r] = x[M, K] @ A[r, K]^T, all
     * bf16 row-major, fp32 sums rounded once (gemm(false, true, M, r, K, 1, x, A, 0, out) up to the summation order;
     * the same bits every run; capturable in a CUDA graph). Parts that share x (q, k, v; gate, up) go in one call.
     * 1 <= M <= LORA_DOWN_MAX_M, K >= 1, 1..LORA_DOWN_MAX_PARTS parts of rank 1..LORA_DOWN_MAX_R; K % 8 == 0 and
     * 16-byte aligned x and A. Throws a RangeError (nothing queued) for anything else: use gemm there.
     */
    loraDown(x: number, M: number, K: number, parts: readonly LoraDownPart[]): void;
}

/** the CUDA addon seen through its LoRA kernels (throws when CUDA is not usable) */
export function cudaLoraOps(): CudaLoraOps {
    return cuda() as unknown as CudaLoraOps;
}
