// backend.ts: the one interface the decoder graph (src/model/graph.ts) runs on. A backend owns its tensors'
// storage and implements every op a decoder block needs, forward and backward; the graph is written once over
// it and never asks which device it is on. Two implementations: cpu-backend.ts (fp32 in host memory, the
// native CPU ops) and cuda-backend.ts (bf16 activations and fp32 statistics in device memory, the CUDA kernels).
//
// Conventions (as in llm.c and both native op sets): outputs first, sizes last; parameter gradients accumulate
// (+=), activation gradients overwrite (=); an output may alias an input only where the op says so.
import type {TokenPick} from "./sampling.js";

/**
 * the gated MLP's activations, out = act(gate) * up: silu (SwiGLU: llama, qwen2/3, mistral, phi3) and gelu_tanh
 * (GELU with the tanh approximation: gemma3). config.json's names for them map here in io/hf-config.ts (gatedActOf)
 */
export const GATED_ACTS = ["silu", "gelu_tanh"] as const;
export type GatedAct = (typeof GATED_ACTS)[number];

/** the tensor types of one backend: float activations/weights, int32 indices, uint8 masks */
/** a paged KV cache's block tables on a backend (model/graph.ts KVCache): row b's positions block * i .. are in
 * block table[b * stride + i] */
export interface KvBlocksOf<I> {
    table: I;
    stride: number;
    block: number;
}

/** an activation on its way to or from host memory (offloaded gradient checkpointing); opaque to the graph */
export interface HostCopy {
    readonly hostCopy: true;
}

export interface TensorTypes {
    f: unknown;
    i: unknown;
    u8: unknown;
}

/** what one chunk of the loss reports */
export interface LossResult {
    /** sum of the cross-entropy over target tokens */
    lossSum: number;
    /** number of target tokens */
    targets: number;
}

export interface Backend<X extends TensorTypes> {
    readonly device: "cpu" | "cuda";
    /** how activations are stored: fp32 on the CPU, bf16 (fp32 accumulation) on CUDA */
    readonly activationDtype: "float32" | "bfloat16";
    /** rows of logits the loss computes at a time unless the caller says */
    readonly lossChunkRows: number;

    // ---- storage
    /** an activation tensor of n elements (contents undefined) */
    activation(n: number): X["f"];
    /** an fp32 tensor of n elements for statistics (rstd, lse) */
    stats(n: number): X["f"];
    /** n zeros in the activation dtype */
    zeros(n: number): X["f"];
    indices(host: Int32Array): X["i"];
    mask(host: Uint8Array): X["u8"];
    /** releases a tensor now (device memory); a no-op where the garbage collector owns storage */
    free(t: X["f"] | X["i"] | X["u8"] | null): void;
    /**
     * offloaded gradient checkpointing: starts copying an activation to host memory, overlapping the work queued
     * after this call; t stays usable until freed, and free(t) is ordered after the copy
     */
    offload(t: X["f"]): HostCopy;
    /** starts copying a host copy back into a new tensor, overlapping the work queued after this call */
    prefetch(h: HostCopy): HostCopy;
    /** the tensor of a prefetched (or offloaded) host copy, ready for the work queued after this call */
    restore(h: HostCopy): X["f"];

    // ---- ops
    /**
     * out[N, C] = table[ids]; returns the first position whose id is outside [0, V), or -1. With check false the
     * caller has checked the ids: nothing is reported and nothing waits for the device (a recorded step)
     */
    embedding(out: X["f"], ids: X["i"], table: X["f"], N: number, V: number, C: number, check?: boolean): number;
    /** dtable[V, C] (fp32, +=) from dout[N, C]: a trained embedding (modules_to_save) */
    embeddingBackward(dtable: X["f"], dout: X["f"], ids: X["i"], N: number, V: number, C: number): void;
    /** out = rmsnorm(x) * w; rstd[N] when not null */
    rmsnorm(out: X["f"], rstd: X["f"] | null, x: X["f"], w: X["f"], N: number, C: number, eps: number): void;
    /** h = x + y (h may alias y), out = rmsnorm(h) * w, rstd[N] of h */
    residualRmsnorm(
        h: X["f"],
        out: X["f"],
        rstd: X["f"],
        x: X["f"],
        y: X["f"],
        w: X["f"],
        N: number,
        C: number,
        eps: number
    ): void;
    /** dx (=) from dy, the forward's input x, w and rstd (a frozen norm weight) */
    rmsnormBackward(dx: X["f"], dy: X["f"], x: X["f"], w: X["f"], rstd: X["f"], N: number, C: number): void;
    /**
     * RoPE (rotate half) in place on [N, H, D] rows at positions pos[N]: the first R dimensions of each head
     * rotate (pairs (i, i + R/2), invFreq [R/2]), the rest pass through (partial rotary, Phi-3); R defaults to D
     */
    rope(x: X["f"], pos: X["i"], invFreq: X["f"], attentionScaling: number, N: number, H: number, D: number, R?: number): void;
    ropeBackward(
        dx: X["f"],
        pos: X["i"],
        invFreq: X["f"],
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        R?: number
    ): void;
    /**
     * causal grouped-query attention: out[B, T, Hq, D] from q[B, T, Hq, D] and k, v[B, S, Hkv, D]; query t sits at
     * key position past + t, past one number or one per row (i32 [B] on the backend, not with seg: rows of a KV
     * cache at their own lengths); keyValid[B, S] hides padding, seg[B, S] keeps attention inside packed
     * sequences; lse[B, Hq, T] saved for the backward when not null. window (a layer's sliding window, 0 or absent:
     * none): the query at key position i sees keys i - window < j <= i only (io/hf-config.ts attentionWindow)
     */
    attention(
        out: X["f"],
        lse: X["f"] | null,
        q: X["f"],
        k: X["f"],
        v: X["f"],
        keyValid: X["u8"] | null,
        seg: X["i"] | null,
        B: number,
        T: number,
        S: number,
        Hq: number,
        Hkv: number,
        D: number,
        past: number | X["i"],
        scale: number,
        /** a paged KV cache: k, v are block pools [blocks * block, Hkv, D] and S the rows' logical length */
        blocks?: KvBlocksOf<X["i"]> | null,
        window?: number
    ): void;
    attentionBackward(
        dq: X["f"],
        dk: X["f"],
        dv: X["f"],
        dout: X["f"],
        q: X["f"],
        k: X["f"],
        v: X["f"],
        out: X["f"],
        lse: X["f"],
        keyValid: X["u8"] | null,
        seg: X["i"] | null,
        B: number,
        T: number,
        Hq: number,
        Hkv: number,
        D: number,
        scale: number,
        /** the forward's sliding window (0 or absent: none) */
        window?: number
    ): void;
    /** the MLP's gate: out = act(gate) * up (silu: SwiGLU; gelu_tanh: Gemma's) */
    gatedAct(out: X["f"], gate: X["f"], up: X["f"], n: number, act: GatedAct): void;
    /** dgate (=), dup (=) of gatedAct */
    gatedActBackward(dgate: X["f"], dup: X["f"], dout: X["f"], gate: X["f"], up: X["f"], n: number, act: GatedAct): void;
    /** x *= s in place (Gemma's embedding scale; s already in the activation dtype) */
    scale(x: X["f"], s: number, n: number): void;
    /** y += x */
    addInplace(y: X["f"], x: X["f"], n: number): void;
    /**
     * the KV cache write: cache[b, pasts[b] .. pasts[b] + T) = x[b, 0 .. T) for b < B, in cache[B, capacity,
     * rowElems] (each row at its own length: continuous batching decodes rows of different lengths together);
     * pasts [B] on the backend, so that a recorded decoding step replays at other lengths
     */
    cacheWrite(
        cache: X["f"],
        x: X["f"],
        B: number,
        T: number,
        capacity: number,
        pasts: X["i"],
        rowElems: number,
        /** a paged cache: [blocks * block, rowElems], row b's position j in block table[b * stride + j / block] */
        blocks?: KvBlocksOf<X["i"]> | null
    ): void;
    /**
     * a decoding step's RoPE and cache write in one op: exactly rope(q, .., N, Hq, D) and rope(k, .., N, Hkv, D) (q
     * and k rotated in place, N = B * T), then cacheWrite(cacheK, k, B, T, capacity, pasts, Hkv * D, blocks) and
     * cacheWrite(cacheV, v, ..): one launch instead of four where the backend fuses them
     */
    ropeCacheWrite(
        q: X["f"],
        k: X["f"],
        v: X["f"],
        pos: X["i"],
        invFreq: X["f"],
        attentionScaling: number,
        B: number,
        T: number,
        Hq: number,
        Hkv: number,
        D: number,
        cacheK: X["f"],
        cacheV: X["f"],
        capacity: number,
        pasts: X["i"],
        blocks?: KvBlocksOf<X["i"]> | null,
        /** rotary dimensions of a head, as rope's R (default D) */
        R?: number
    ): void;
    /**
     * dst[m, dstOffset + j] = src[m, srcOffset + j] for m < M, j < n, in rows of dstCols and srcCols values: the
     * parts of a fused projection's output (phi3's qkv_proj, gate_up_proj) and the joining of their gradients
     */
    copyColumns(
        dst: X["f"],
        dstCols: number,
        dstOffset: number,
        src: X["f"],
        srcCols: number,
        srcOffset: number,
        M: number,
        n: number
    ): void;
    /** the elements [offset, offset + length) of t, sharing its memory (never freed on its own) */
    view<T extends X["f"] | X["i"]>(t: T, offset: number, length: number): T;
    /**
     * the causal-LM loss of hidden states xf[N, C] through the output layer head[V, C], in chunks of rows:
     * cross-entropy summed over rows whose target >= 0; with dxf, dxf[N, C] (=) gets the gradient scaled by
     * lossScale, and dHead (fp32 [V, C], +=) the output layer's when it trains. softcap > 0: the logits are
     * cap tanh(logits / cap) first (Gemma's final_logit_softcapping), forward and backward
     */
    causalLmLoss(
        xf: X["f"],
        targets: Int32Array,
        head: X["f"],
        N: number,
        C: number,
        V: number,
        lossScale: number,
        dxf: X["f"] | null,
        chunkRows: number,
        dHead: X["f"] | null,
        softcap?: number
    ): LossResult;
    /** logits[rows, V] (fp32, host) = hidden[rows] head^T; all N rows when rows is null; soft-capped when softcap > 0 */
    logits(hidden: X["f"], rows: number[] | null, head: X["f"], N: number, C: number, V: number, softcap?: number): Float32Array;
    /**
     * decoding: the next token of each of those rows, chosen where the logits are (only the ids leave the device),
     * each row by its pick (greedy, or sampled: sampling.ts); all rows greedy when picks is null. nonFinite: how many
     * logits are NaN or infinite
     */
    pickTokens(
        hidden: X["f"],
        rows: number[] | null,
        head: X["f"],
        N: number,
        C: number,
        V: number,
        picks: readonly TokenPick[] | null,
        /** the logits soft-capped first when > 0 (sampling sees the capped values) */
        softcap?: number
    ): {ids: Int32Array; nonFinite: number};

    // ---- trainable tensors (LoRA, DoRA magnitudes, biases): fp32 masters and gradients, as stats() tensors
    /** an fp32 tensor holding `host`; on the CPU the array itself (the host optimizer updates it in place) */
    param(host: Float32Array): X["f"];
    /** host (=) the fp32 tensor's values: a no-op where they share memory */
    paramToHost(host: Float32Array, t: X["f"]): void;
    /** zeros an fp32 tensor of n elements */
    zeroParam(t: X["f"], n: number): void;
    /**
     * the fp32 tensor `t` (n elements) in the activation dtype, for the GEMMs: written into `into` (made when
     * null) and returned; on the CPU `t` itself
     */
    computeCopy(t: X["f"], n: number, into: X["f"] | null): X["f"];

    // ---- the projection layers' ops (lora/projection.ts)
    /**
     * row-major C[M, N] = alpha op(A) op(B) + beta C, op(A) [M, K], op(B) [K, N], transposed when tA / tB;
     * A and B in one dtype (activations and compute copies, or two fp32 tensors), C an activation or fp32
     */
    gemm(
        tA: boolean,
        tB: boolean,
        M: number,
        N: number,
        K: number,
        alpha: number,
        A: X["f"],
        B: X["f"],
        beta: number,
        C: X["f"]
    ): void;
    /**
     * decoding: out_p[M, r_p] (=) x[M, K] A_p^T for projections sharing x (PEFT's lora_A [r_p, K] compute copies),
     * in one pass where the backend has a kernel for it: true; false when it has none for these shapes, and
     * nothing was done (the caller runs one gemm per part)
     */
    loraDownGroup?(x: X["f"], M: number, K: number, parts: {out: X["f"]; A: X["f"]; r: number}[]): boolean;
    /**
     * out[n] = x[n] keep(seed, first + i) / (1 - p): the counter-based mask of dropout.ts (out may alias x); `first`
     * (default 0): the element of the whole tensor where x starts, so a tensor processed in parts draws its own masks
     */
    dropout(out: X["f"], x: X["f"], seed: number, p: number, n: number, first?: number): void;
    /** y[n] += x[n] keep(seed, first + i) / (1 - p): dropout's backward into an input gradient */
    dropoutAdd(y: X["f"], x: X["f"], seed: number, p: number, n: number, first?: number): void;
    /** y[M, N] += bias[N] */
    addBias(y: X["f"], bias: X["f"], M: number, N: number): void;
    /** out[m, n] (= or += when accumulate) x[m, n] (k[n] + offset); k fp32 [N] (DoRA's magnitude scale) */
    scaleColumns(out: X["f"], x: X["f"], k: X["f"], offset: number, M: number, N: number, accumulate: boolean): void;
    /** dst[n] (fp32, +=) sum_m a[m, n] (b[m, n] when b) / (div[n] when div): bias and magnitude gradients */
    columnSums(dst: X["f"], a: X["f"], b: X["f"] | null, div: X["f"] | null, M: number, N: number): void;
    /** out[r] = ||W[r, :]|| (fp32 W [R, C], sums in float64) */
    rowNorms(out: X["f"], W: X["f"], R: number, C: number): void;
    /** out[i] = a[i] / b[i] (fp32) */
    divide(out: X["f"], a: X["f"], b: X["f"], n: number): void;
}

/** a LoRA update as a fused product adds it: scale xa B^T, xa [M, r] = x A^T and B [out, r] in the activation dtype */
export interface LoraTerm<F> {
    xa: F;
    B: F;
    r: number;
    scale: number;
}

/**
 * A frozen weight W [out, in] on one backend (dense, or 4-bit dequantized as its products need it); the bias is
 * not part of it (the projection adds it, and trains it when asked).
 */
export interface FrozenWeight<F> {
    readonly inFeatures: number;
    readonly outFeatures: number;
    /** y[M, out] (=) x[M, in] W^T; `decoding`: an inference step of a few rows (the fused 4-bit GEMV may serve it) */
    product(y: F, x: F, M: number, decoding: boolean): void;
    /**
     * decoding, where a fused kernel can: y (=) x W^T + scale xa B^T in one pass (xa [M, r], B [out, r] in the
     * activation dtype) and true; false when it cannot, and nothing was done (the caller adds the LoRA branch)
     */
    productWithLora?(y: F, x: F, M: number, lora: LoraTerm<F>): boolean;
    /**
     * decoding, where a fused kernel can: for every part (this weight is the first's), y (=) x W^T (+ its LoRA
     * term) (+ its bias [out], activation dtype), all of the same x [M, in], in one launch, and true; false when it
     * cannot, and nothing was done
     */
    productGroup?(parts: {weight: FrozenWeight<F>; y: F; lora: LoraTerm<F> | null; bias: F | null}[], x: F, M: number): boolean;
    /** dx[M, in] (= or += when accumulate) dy[M, out] W */
    productTranspose(dx: F, dy: F, M: number, accumulate: boolean): void;
    /** out (fp32 [out, in], =) W as the products see it (4-bit: dequantized and rounded to its dtype) */
    weightInto(out: F): void;
}

/**
 * A projection of a decoder block as the graph sees it, on one backend: the frozen base (dense or 4-bit) with its
 * trainable parts (LoRA, DoRA, bias). forward returns what backward needs beyond the input (null when nothing);
 * the graph keeps it with the block's activations and hands it back, or recomputes the block.
 */
export interface GraphLinear<F> {
    readonly inFeatures: number;
    readonly outFeatures: number;
    /**
     * y[M, out] (=) = layer(x[M, in]); `train`: dropout on, and keep what backward needs; `firstRow`: x is rows
     * [firstRow, firstRow + M) of the layer's whole input (dropout draws the whole input's masks)
     */
    forward(y: F, x: F, M: number, train: boolean, firstRow?: number): unknown;
    /** what backward needs of forward(_, x, M, true, firstRow), without computing y where it can */
    saveForBackward(x: F, M: number, firstRow?: number): unknown;
    /**
     * decoding: this layer and `others` (ys[0] is this layer's output, ys[i] that of others[i - 1]), all of the
     * same x, as `forward(y, x, M, false)` of each, in fewer launches where the backend has fused kernels; false,
     * with nothing done, when the group does not qualify (the caller runs each forward)
     */
    forwardShared?(others: GraphLinear<F>[], ys: F[], x: F, M: number): boolean;
    /** dx[M, in] (= or += when accumulate) from dy[M, out]; parameter gradients += (rows as forward's) */
    backward(dx: F, dy: F, x: F, saved: unknown, M: number, accumulate: boolean, firstRow?: number): void;
    /** frees what forward returned */
    release(saved: unknown): void;
    /** after an optimizer step changed the trainable tensors: new compute copies, no cached DoRA norms */
    afterUpdate(): void;
}

/** the bounds of Backend.copyColumns, checked on the host by both backends (a programming error, not user input) */
export function checkColumnCopy(
    dstLength: number,
    dstCols: number,
    dstOffset: number,
    srcLength: number,
    srcCols: number,
    srcOffset: number,
    M: number,
    n: number
): void {
    const ok =
        [dstCols, dstOffset, srcCols, srcOffset, M, n].every((v) => Number.isSafeInteger(v) && v >= 0) &&
        dstOffset + n <= dstCols &&
        srcOffset + n <= srcCols &&
        M * dstCols <= dstLength &&
        M * srcCols <= srcLength;
    if (!ok)
        throw new Error(
            `copyColumns: ${n} columns from offset ${srcOffset} of ${M} rows of ${srcCols} (${srcLength} values) ` +
                `to offset ${dstOffset} of rows of ${dstCols} (${dstLength} values) do not fit`
        );
}
