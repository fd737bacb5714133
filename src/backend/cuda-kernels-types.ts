// cuda-kernels-types.ts: a hand-written mirror of the kernel and optimizer functions that
// native/addon/cuda_kernels.cpp adds to the CUDA addon (C ABI and math: native/cuda/kernels.h, native/cuda/optim.h).
//
// Buffers are device addresses (DeviceBuffer.ptr, or an address plus a byte offset); sizes are element counts;
// outputs first, sizes last. Activations are bf16 (stored as raw bits, DeviceBuffer dtype "bf16"), statistics and
// parameter gradients f32. Every function queues its work on the addon's one stream and returns at once: read
// results with download()/DeviceBuffer.toHost(), which wait for the stream. Gradient rule as on the CPU:
// parameter gradients accumulate (+=), activation gradients overwrite (=).
import {cuda} from "./cuda.js";
import type {GatedAct} from "./backend.js";
import type {CudaAddon} from "./native-types.js";

export interface CudaKernelOps extends CudaAddon {
    // ------------------------------------------------------------------
    // conversions (round to nearest even, as the CPU backend)
    bf16ToF32(out: number, inp: number, n: number): void;
    f16ToF32(out: number, inp: number, n: number): void;
    f32ToBf16(out: number, inp: number, n: number): void;
    f32ToF16(out: number, inp: number, n: number): void;

    // ------------------------------------------------------------------
    // elementwise
    /** x[n] = value (f32) */
    fillF32(x: number, value: number, n: number): void;
    /** x[n] = bf16(value) */
    fillBf16(x: number, value: number, n: number): void;
    /** x[n] *= s (f32) */
    scaleF32(x: number, s: number, n: number): void;
    /** x[n] *= s (bf16, fp32 product rounded) */
    scaleBf16(x: number, s: number, n: number): void;
    /** y[n] += x[n] (f32; bit-identical to the CPU's addInplace) */
    addInplace(y: number, x: number, n: number): void;
    /** y[n] += x[n] (bf16, fp32 sum rounded: the residual stream) */
    addInplaceBf16(y: number, x: number, n: number): void;
    /** KV cache rows (bf16): cache[b, pasts[b] + t, :] = x[b, t, :], pasts [B] int32 on the device */
    cacheWrite(
        cache: number,
        x: number,
        pasts: number,
        B: number,
        T: number,
        capacity: number,
        rowElems: number,
        /** a paged cache [blocks * block, rowElems]: table [B, tableStride] of block ids (< 0: none) */
        table?: number | null,
        tableStride?: number,
        block?: number
    ): void;
    /** bf16 dst[m, dstOffset + j] = src[m, srcOffset + j], m < M, j < n, rows of dstCols / srcCols values */
    copyColumns(
        dst: number,
        dstCols: number,
        dstOffset: number,
        src: number,
        srcCols: number,
        srcOffset: number,
        M: number,
        n: number
    ): void;
    /** y[n] = fma(alpha, x[n], y[n]) (f32) */
    axpy(y: number, alpha: number, x: number, n: number): void;
    /** y[n] (f32) = fma(alpha, x[n] (bf16), y[n]): a bf16 gradient into an fp32 accumulator */
    castAdd(y: number, x: number, alpha: number, n: number): void;

    // ------------------------------------------------------------------
    // embedding
    /**
     * out[N,C] (bf16) = table[ids[n]] (bf16 [V,C]). `bad` (nullable) is 2 int32 on the device, reset by the call:
     * [number of ids outside [0, V), first such row or 2^31-1]; those rows are written as zeros.
     */
    embeddingForward(out: number, bad: number | null, ids: number, table: number, N: number, V: number, C: number): void;
    /** dtable[ids[n]] (f32 [V,C]) += dout[n] (bf16 [N,C]); out-of-range ids are skipped */
    embeddingBackward(dtable: number, dout: number, ids: number, N: number, V: number, C: number): void;

    // ------------------------------------------------------------------
    // RMSNorm (bf16 in/out, bf16 weight, f32 rstd)
    /** out[N,C] = inp * rstd * weight; rstd[N] saved when not null; out may alias inp */
    rmsnormForward(out: number, rstd: number | null, inp: number, weight: number, N: number, C: number, eps: number): void;
    /** h = bf16(x + y) (h may alias x or y), out = rmsnorm(h), rstd[N] of h */
    residualRmsnormForward(
        h: number,
        out: number,
        rstd: number | null,
        x: number,
        y: number,
        weight: number,
        N: number,
        C: number,
        eps: number
    ): void;
    /**
     * dinp[N,C] (bf16; =, or += when accumulate), dweight[C] (f32 +=, null for a frozen norm), from dout, inp,
     * weight and the forward's rstd. dinp may alias dout.
     */
    rmsnormBackward(
        dinp: number,
        dweight: number | null,
        dout: number,
        inp: number,
        weight: number,
        rstd: number,
        N: number,
        C: number,
        accumulate?: boolean
    ): void;

    // ------------------------------------------------------------------
    // RoPE (rotate half), bf16 [N,H,D] rows `rowStride` elements apart (default H*D); in place allowed. The first
    // `rotary` dimensions of each head rotate (pairs (i, i + rotary/2), invFreq [rotary/2]), the rest pass through
    // (default rotary: D)
    ropeForward(
        out: number,
        inp: number,
        pos: number,
        invFreq: number,
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        rowStride?: number,
        rotary?: number
    ): void;
    ropeBackward(
        dinp: number,
        dout: number,
        pos: number,
        invFreq: number,
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        rowStride?: number,
        rotary?: number
    ): void;
    /**
     * a decoding step's ropeForward of q [B*T, Hq, D] and k [B*T, Hkv, D] (in place, packed rows) and cacheWrite
     * of k and v [B*T, Hkv, D] into cacheK, cacheV at each row's pasts[b] + t, in one launch, bit-identical to
     * those four calls
     */
    ropeCacheWrite(
        q: number,
        k: number,
        cacheK: number,
        cacheV: number,
        v: number,
        pos: number,
        invFreq: number,
        attentionScaling: number,
        pasts: number,
        B: number,
        T: number,
        Hq: number,
        Hkv: number,
        D: number,
        capacity: number,
        /** a paged cache [blocks * block, Hkv * D]: table [B, tableStride] of block ids (< 0: none) */
        table?: number | null,
        tableStride?: number,
        block?: number,
        /** rotary dimensions of a head, as ropeForward's (default D) */
        rotary?: number
    ): void;

    // ------------------------------------------------------------------
    // the gated MLP's activation (bf16)
    /** out[n] = act(gate) * up (silu: SwiGLU; gelu_tanh: Gemma's gelu_pytorch_tanh); out may alias gate or up */
    gatedActForward(out: number, gate: number, up: number, n: number, act: GatedAct): void;
    /** dgate (=), dup (=); dgate may alias gate, dup may alias up */
    gatedActBackward(dgate: number, dup: number, dout: number, gate: number, up: number, n: number, act: GatedAct): void;

    // ------------------------------------------------------------------
    /**
     * the next token of each row of f32 logits x[R, V] (penalized in place), as src/backend/sampling.ts picks it:
     * params (i32 [R * 5]) = temperature (f32 bits; 0 greedy), top_k, top_p (f32 bits), u (uint32), repetition
     * penalty (f32 bits); entries (i32 [2E], nullable when E = 0) the rows then the tokens to penalize (distinct per
     * row); out (i32 [R]); bad (one i32, +=) the number of NaN or infinite logits
     */
    pickTokensF32(
        x: number,
        R: number,
        V: number,
        params: number,
        entries: number | null,
        E: number,
        out: number,
        bad: number
    ): void;
    // cross-entropy over bf16 logits [N,V]; targets < 0 (or >= V) are ignored
    /** loss[N], lse[N] (nullable), count (nullable int32 on the device: += counted rows) */
    crossEntropyForward(
        loss: number,
        lse: number | null,
        count: number | null,
        logits: number,
        targets: number,
        N: number,
        V: number
    ): void;
    /**
     * dlogits[N,V] (bf16, =) = (softmax - onehot) * dlossScale; dlogits may equal logits. softcap > 0: the logits
     * are soft-capped (softcapBf16) and the gradient goes through the cap
     */
    crossEntropyBackward(
        dlogits: number,
        logits: number,
        lse: number,
        targets: number,
        dlossScale: number,
        N: number,
        V: number,
        softcap?: number
    ): void;
    /** the forward, then the logits overwritten in place by their gradient (one pass over HBM); softcap as the backward's */
    crossEntropyFused(
        loss: number,
        lse: number | null,
        count: number | null,
        logits: number,
        targets: number,
        dlossScale: number,
        N: number,
        V: number,
        softcap?: number
    ): void;
    /** x = cap tanh(x / cap) in place, cap > 0 (Gemma's final_logit_softcapping) */
    softcapF32(x: number, cap: number, n: number): void;
    softcapBf16(x: number, cap: number, n: number): void;

    // ------------------------------------------------------------------
    // optimizer (fp32 params/grads; bit-identical to loadOptimOps()'s functions of the same names)
    adamwTorchStep(
        param: number,
        expAvg: number,
        expAvgSq: number,
        grad: number,
        lr: number,
        beta1: number,
        beta2: number,
        eps: number,
        weightDecay: number,
        step: number,
        n: number
    ): void;
    adamwBnb32Step(
        param: number,
        state1: number,
        state2: number,
        grad: number,
        lr: number,
        beta1: number,
        beta2: number,
        eps: number,
        weightDecay: number,
        step: number,
        n: number
    ): void;
    /** 8-bit blockwise; state1/state2 u8 [n], absmax1/absmax2 f32 [ceil(n/blocksize)], qmap1/qmap2 f32 [256] */
    adamwBnb8Step(
        param: number,
        state1: number,
        state2: number,
        absmax1: number,
        absmax2: number,
        grad: number,
        qmap1: number,
        qmap2: number,
        lr: number,
        beta1: number,
        beta2: number,
        eps: number,
        weightDecay: number,
        step: number,
        blocksize: number,
        n: number
    ): void;
    /** out (one f64 on the device) = (accumulate ? out : 0) + sum of squares over the f32 buffers, in double */
    optimSumSquares(out: number, buffers: readonly number[], lengths: readonly number[], accumulate?: boolean): void;
    /**
     * clip_grad_norm_ on the device: coef = f32(maxNorm / f32(f32(sqrt(sumSquares)) + 1e-6)) as clipGradNorm
     * computes it; when coef < 1 every buffer is scaled by it. maxNorm <= 0 does nothing.
     */
    optimClipScale(buffers: readonly number[], lengths: readonly number[], sumSquares: number, maxNorm: number): void;
    /** x[n] *= s (f32) */
    optimScale(x: number, s: number, n: number): void;

    // ------------------------------------------------------------------
    // paged optimizer states (unified memory the driver may evict to the host under memory pressure)
    /** cudaMallocManaged + preferred location on the current GPU; not counted by memoryStats() */
    allocPagedState(bytes: number): number;
    freePagedState(ptr: number): void;
    /** migrate the pages to the GPU (before a step) or to the host (to free GPU memory); a hint, asynchronous */
    prefetchState(ptr: number, bytes: number, toDevice: boolean): void;
}

/** the CUDA addon with its kernel functions (throws when CUDA is not usable, as cuda() does) */
export function cudaKernelOps(): CudaKernelOps {
    return cuda() as unknown as CudaKernelOps;
}
