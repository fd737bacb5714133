// cuda-attention-types.ts: a hand-written mirror of the attention ops that native/addon/cuda_attention.cpp binds
// into the CUDA addon (C declarations: native/cuda/attention.h). The arguments are the CPU ops' (CpuAddon
// attentionForward / attentionBackward) in the same order, with device addresses (DeviceBuffer.ptr) instead of
// typed arrays; 0 or null for an absent optional buffer. Every op is queued on the backend's stream and returns
// before the GPU is done (download() synchronizes).
import {cuda} from "./cuda.js";

export interface CudaAttentionOps {
    /**
     * Flash attention forward (FlashAttention-2), causal and grouped-query: out[B,T,Hq,D] (bf16, =) and
     * lse[B,Hq,T] (f32, natural log, =; null to skip) from q[B,T,Hq,D], k/v[B,S,Hkv,D] (bf16). Query t sits at key
     * position qOffset + t; key j is visible to it when j <= qOffset + t, keyValid[b,j] != 0 (u8 [B,S], null: all)
     * and seg[b,j] == seg[b,qOffset+t] (i32 [B,S], null: one segment; needs qOffset + T <= S). A query with no
     * visible key gets zeros and lse = -inf. D must be 64, 96 or 128; bf16 buffers 16-byte aligned. qOffsets (i32 [B]
     * on the device, not with seg): each row's own query offset instead of qOffset, clamped to [0, S]. window (0 or
     * absent: none): key j is visible only when j > qOffset + t - window; key tiles wholly behind it are not read.
     */
    attentionForward(
        out: number,
        lse: number | null,
        q: number,
        k: number,
        v: number,
        keyValid: number | null,
        seg: number | null,
        B: number,
        T: number,
        S: number,
        Hq: number,
        Hkv: number,
        D: number,
        qOffset: number,
        scale: number,
        qOffsets?: number | null,
        /** a paged KV cache: k/v [blocks, 64, Hkv, D], blockTable [B, tableStride] (i32), S <= 64 * tableStride */
        blockTable?: number | null,
        tableStride?: number,
        window?: number
    ): void;
    /**
     * Flash attention backward: dq[B,T,Hq,D], dk/dv[B,S,Hkv,D] (bf16, =) from dout, the forward's inputs, its out
     * (bf16) and lse (f32). Recomputes the probabilities; dk/dv of a kv head sum over its G = Hq / Hkv query heads.
     * Takes an f32 workspace of about (B*T*Hq + 2*B*S*Hkv) * D floats from the caching allocator.
     */
    attentionBackward(
        dq: number,
        dk: number,
        dv: number,
        dout: number,
        q: number,
        k: number,
        v: number,
        out: number,
        lse: number,
        keyValid: number | null,
        seg: number | null,
        B: number,
        T: number,
        S: number,
        Hq: number,
        Hkv: number,
        D: number,
        qOffset: number,
        scale: number,
        /** the forward's sliding window (0 or absent: none) */
        window?: number
    ): void;
    /** whether the kernels handle head dim D (64, 96 and 128) */
    attentionSupportsHeadDim(D: number): boolean;
}

/** the CUDA addon seen through its attention ops (throws when CUDA is not usable) */
export function cudaAttentionOps(): CudaAttentionOps {
    return cuda() as unknown as CudaAttentionOps;
}
