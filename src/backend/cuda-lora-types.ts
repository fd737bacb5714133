// cuda-lora-types.ts: a hand-written mirror of the LoRA step's small kernels that native/addon/cuda_lora.cpp binds
// into the CUDA addon (C declarations: native/cuda/lora_extras.h). Buffers are bf16 device addresses
// (DeviceBuffer.ptr); every op is queued on the backend's stream and returns before the GPU is done.
import {cuda} from "./cuda.js";

export interface CudaLoraOps {
    /** y[N,C] += bias[C] */
    addBiasBf16(y: number, bias: number, N: number, C: number): void;
    /** out[n] = inp[n] * keep(seed, i) / (1 - p), the mask a hash of (seed, i) (seed < 2^53); in place allowed */
    dropoutBf16(out: number, inp: number, seed: number, p: number, n: number): void;
    /** y[n] += x[n] * keep(seed, i) / (1 - p): dropout's backward into an input gradient */
    dropoutAddBf16(y: number, x: number, seed: number, p: number, n: number): void;
}

/** the CUDA addon seen through its LoRA kernels (throws when CUDA is not usable) */
export function cudaLoraOps(): CudaLoraOps {
    return cuda() as unknown as CudaLoraOps;
}
