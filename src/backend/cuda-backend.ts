// cuda-backend.ts: the Backend on an NVIDIA GPU: activations bf16 and statistics fp32 in device memory (the
// caching allocator of native/cuda/runtime.cpp), the ops are the CUDA addon's kernels, queued on one stream.
import {cuda, DeviceBuffer, DTYPE_BYTES} from "./cuda.js";
import {cudaAttentionOps} from "./cuda-attention-types.js";
import {cudaGemmOps, type GemmDtype} from "./cuda-gemm-types.js";
import {cudaLoraOps, LORA_DOWN_MAX_M, LORA_DOWN_MAX_PARTS, LORA_DOWN_MAX_R} from "./cuda-lora-types.js";
import {cudaKernelOps} from "./cuda-kernels-types.js";
import {checkColumnCopy, type Backend, type GatedAct, type HostCopy, type KvBlocksOf, type LossResult} from "./backend.js";
import {pickArguments, type TokenPick} from "./sampling.js";

export interface CudaTensors {
    f: DeviceBuffer;
    i: DeviceBuffer;
    u8: DeviceBuffer;
}

/** positions per block of a paged KV cache in the attention kernel (native/cuda/attention.h QLORA_CUDA_KV_BLOCK) */
const KV_BLOCK_CUDA = 64;

/** an activation in a pinned host slot; `device` once a prefetch has started copying it back */
class CudaHostCopy implements HostCopy {
    readonly hostCopy = true;
    constructor(
        readonly slot: number,
        readonly dtype: DeviceBuffer["dtype"],
        readonly length: number,
        readonly device: DeviceBuffer | null = null
    ) {}
}

/** bytes per element of the activation dtype (bf16) */
const ACT_BYTES = 2;

export class CudaBackend implements Backend<CudaTensors> {
    readonly device = "cuda" as const;
    readonly activationDtype = "bfloat16" as const;
    readonly lossChunkRows = 1024;

    activation(n: number): DeviceBuffer {
        return DeviceBuffer.alloc("bf16", n);
    }
    stats(n: number): DeviceBuffer {
        return DeviceBuffer.alloc("f32", n);
    }
    zeros(n: number): DeviceBuffer {
        return DeviceBuffer.zeros("bf16", n);
    }
    indices(host: Int32Array): DeviceBuffer {
        return DeviceBuffer.from("i32", host);
    }
    mask(host: Uint8Array): DeviceBuffer {
        return DeviceBuffer.from("u8", host);
    }
    free(t: DeviceBuffer | null): void {
        if (!t) return;
        const slot = this.copyingToHost.get(t);
        if (slot !== undefined) {
            // the caching allocator may hand the memory out to the next op: the copy to host must be done first
            cuda().hostFence(slot);
            this.copyingToHost.delete(t);
        }
        t.free();
    }
    /** buffers being copied to host memory (offload), by their copy's pinned slot (native/cuda/offload.cpp) */
    private readonly copyingToHost = new Map<DeviceBuffer, number>();
    offload(t: DeviceBuffer): HostCopy {
        const slot = cuda().hostOffload(t.ptr, t.bytes);
        this.copyingToHost.set(t, slot);
        return new CudaHostCopy(slot, t.dtype, t.length);
    }
    prefetch(h: HostCopy): HostCopy {
        const c = h as CudaHostCopy;
        const device = DeviceBuffer.alloc(c.dtype, c.length);
        cuda().hostPrefetch(c.slot, device.ptr);
        return new CudaHostCopy(c.slot, c.dtype, c.length, device);
    }
    restore(h: HostCopy): DeviceBuffer {
        const c = (h as CudaHostCopy).device ? (h as CudaHostCopy) : (this.prefetch(h) as CudaHostCopy);
        cuda().hostRestore(c.slot);
        // the slot is free now; a source still unfreed (restored before it was freed) needs no fence: the compute
        // stream already waits for the copy back, queued on the copy stream after the copy out
        for (const [t, slot] of this.copyingToHost) if (slot === c.slot) this.copyingToHost.delete(t);
        return c.device!;
    }

    embedding(out: DeviceBuffer, ids: DeviceBuffer, table: DeviceBuffer, N: number, V: number, C: number, check = true): number {
        if (!check) {
            cudaKernelOps().embeddingForward(out.ptr, null, ids.ptr, table.ptr, N, V, C);
            return -1;
        }
        const bad = DeviceBuffer.zeros("i32", 2);
        cudaKernelOps().embeddingForward(out.ptr, bad.ptr, ids.ptr, table.ptr, N, V, C);
        const [count, first] = bad.toHost() as Int32Array;
        bad.free();
        return count > 0 ? first : -1;
    }
    embeddingBackward(dtable: DeviceBuffer, dout: DeviceBuffer, ids: DeviceBuffer, N: number, V: number, C: number): void {
        cudaKernelOps().embeddingBackward(dtable.ptr, dout.ptr, ids.ptr, N, V, C);
    }
    rmsnorm(
        out: DeviceBuffer,
        rstd: DeviceBuffer | null,
        x: DeviceBuffer,
        w: DeviceBuffer,
        N: number,
        C: number,
        eps: number
    ): void {
        cudaKernelOps().rmsnormForward(out.ptr, rstd?.ptr ?? null, x.ptr, w.ptr, N, C, eps);
    }
    residualRmsnorm(
        h: DeviceBuffer,
        out: DeviceBuffer,
        rstd: DeviceBuffer,
        x: DeviceBuffer,
        y: DeviceBuffer,
        w: DeviceBuffer,
        N: number,
        C: number,
        eps: number
    ): void {
        cudaKernelOps().residualRmsnormForward(h.ptr, out.ptr, rstd.ptr, x.ptr, y.ptr, w.ptr, N, C, eps);
    }
    rmsnormBackward(
        dx: DeviceBuffer,
        dy: DeviceBuffer,
        x: DeviceBuffer,
        w: DeviceBuffer,
        rstd: DeviceBuffer,
        N: number,
        C: number
    ): void {
        cudaKernelOps().rmsnormBackward(dx.ptr, null, dy.ptr, x.ptr, w.ptr, rstd.ptr, N, C);
    }
    rope(
        x: DeviceBuffer,
        pos: DeviceBuffer,
        invFreq: DeviceBuffer,
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        R = D
    ): void {
        cudaKernelOps().ropeForward(x.ptr, x.ptr, pos.ptr, invFreq.ptr, attentionScaling, N, H, D, H * D, R);
    }
    ropeBackward(
        dx: DeviceBuffer,
        pos: DeviceBuffer,
        invFreq: DeviceBuffer,
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        R = D
    ): void {
        cudaKernelOps().ropeBackward(dx.ptr, dx.ptr, pos.ptr, invFreq.ptr, attentionScaling, N, H, D, H * D, R);
    }
    attention(
        out: DeviceBuffer,
        lse: DeviceBuffer | null,
        q: DeviceBuffer,
        k: DeviceBuffer,
        v: DeviceBuffer,
        keyValid: DeviceBuffer | null,
        seg: DeviceBuffer | null,
        B: number,
        T: number,
        S: number,
        Hq: number,
        Hkv: number,
        D: number,
        past: number | DeviceBuffer,
        scale: number,
        blocks?: KvBlocksOf<DeviceBuffer> | null,
        window = 0
    ): void {
        // the kernel's key tile is one cache block
        if (blocks && blocks.block !== KV_BLOCK_CUDA)
            throw new Error(`attention: cache blocks of ${blocks.block} positions; the kernel takes ${KV_BLOCK_CUDA}`);
        const perRow = typeof past !== "number";
        cudaAttentionOps().attentionForward(
            out.ptr,
            lse?.ptr ?? null,
            q.ptr,
            k.ptr,
            v.ptr,
            keyValid?.ptr ?? null,
            seg?.ptr ?? null,
            B,
            T,
            S,
            Hq,
            Hkv,
            D,
            perRow ? 0 : past,
            scale,
            perRow ? past.ptr : null,
            blocks?.table.ptr ?? null,
            blocks?.stride ?? 0,
            window
        );
    }
    attentionBackward(
        dq: DeviceBuffer,
        dk: DeviceBuffer,
        dv: DeviceBuffer,
        dout: DeviceBuffer,
        q: DeviceBuffer,
        k: DeviceBuffer,
        v: DeviceBuffer,
        out: DeviceBuffer,
        lse: DeviceBuffer,
        keyValid: DeviceBuffer | null,
        seg: DeviceBuffer | null,
        B: number,
        T: number,
        Hq: number,
        Hkv: number,
        D: number,
        scale: number,
        window = 0
    ): void {
        cudaAttentionOps().attentionBackward(
            dq.ptr,
            dk.ptr,
            dv.ptr,
            dout.ptr,
            q.ptr,
            k.ptr,
            v.ptr,
            out.ptr,
            lse.ptr,
            keyValid?.ptr ?? null,
            seg?.ptr ?? null,
            B,
            T,
            T,
            Hq,
            Hkv,
            D,
            0,
            scale,
            window
        );
    }
    gatedAct(out: DeviceBuffer, gate: DeviceBuffer, up: DeviceBuffer, n: number, act: GatedAct): void {
        cudaKernelOps().gatedActForward(out.ptr, gate.ptr, up.ptr, n, act);
    }
    gatedActBackward(
        dgate: DeviceBuffer,
        dup: DeviceBuffer,
        dout: DeviceBuffer,
        gate: DeviceBuffer,
        up: DeviceBuffer,
        n: number,
        act: GatedAct
    ): void {
        cudaKernelOps().gatedActBackward(dgate.ptr, dup.ptr, dout.ptr, gate.ptr, up.ptr, n, act);
    }
    scale(x: DeviceBuffer, s: number, n: number): void {
        cudaKernelOps().scaleBf16(x.ptr, s, n);
    }
    addInplace(y: DeviceBuffer, x: DeviceBuffer, n: number): void {
        cudaKernelOps().addInplaceBf16(y.ptr, x.ptr, n);
    }
    cacheWrite(
        cache: DeviceBuffer,
        x: DeviceBuffer,
        B: number,
        T: number,
        capacity: number,
        pasts: DeviceBuffer,
        rowElems: number,
        blocks?: KvBlocksOf<DeviceBuffer> | null
    ): void {
        cudaKernelOps().cacheWrite(
            cache.ptr,
            x.ptr,
            pasts.ptr,
            B,
            T,
            capacity,
            rowElems,
            blocks?.table.ptr ?? null,
            blocks?.stride ?? 0,
            blocks?.block ?? 0
        );
    }
    ropeCacheWrite(
        q: DeviceBuffer,
        k: DeviceBuffer,
        v: DeviceBuffer,
        pos: DeviceBuffer,
        invFreq: DeviceBuffer,
        attentionScaling: number,
        B: number,
        T: number,
        Hq: number,
        Hkv: number,
        D: number,
        cacheK: DeviceBuffer,
        cacheV: DeviceBuffer,
        capacity: number,
        pasts: DeviceBuffer,
        blocks?: KvBlocksOf<DeviceBuffer> | null,
        R = D
    ): void {
        cudaKernelOps().ropeCacheWrite(
            q.ptr,
            k.ptr,
            cacheK.ptr,
            cacheV.ptr,
            v.ptr,
            pos.ptr,
            invFreq.ptr,
            attentionScaling,
            pasts.ptr,
            B,
            T,
            Hq,
            Hkv,
            D,
            capacity,
            blocks?.table.ptr ?? null,
            blocks?.stride ?? 0,
            blocks?.block ?? 0,
            R
        );
    }
    copyColumns(
        dst: DeviceBuffer,
        dstCols: number,
        dstOffset: number,
        src: DeviceBuffer,
        srcCols: number,
        srcOffset: number,
        M: number,
        n: number
    ): void {
        checkColumnCopy(dst.length, dstCols, dstOffset, src.length, srcCols, srcOffset, M, n);
        cudaKernelOps().copyColumns(dst.ptr, dstCols, dstOffset, src.ptr, srcCols, srcOffset, M, n);
    }
    view<T extends DeviceBuffer>(t: T, offset: number, length: number): T {
        if (offset < 0 || offset + length > t.length) throw new Error(`view [${offset}, +${length}) of a buffer of ${t.length}`);
        return new DeviceBuffer(t.ptr + offset * DTYPE_BYTES[t.dtype], t.dtype, length) as T;
    }

    causalLmLoss(
        xf: DeviceBuffer,
        targetsHost: Int32Array,
        head: DeviceBuffer,
        N: number,
        C: number,
        V: number,
        lossScale: number,
        dxf: DeviceBuffer | null,
        chunkRows: number,
        dHead: DeviceBuffer | null,
        softcap = 0
    ): LossResult {
        const g = cudaGemmOps(),
            k = cudaKernelOps();
        const targets = DeviceBuffer.from("i32", targetsHost);
        const lossBuf = DeviceBuffer.alloc("f32", N);
        const count = DeviceBuffer.zeros("i32", 1);
        const rows = Math.min(chunkRows, N);
        // every row goes through the output layer (rows without a target get a zero gradient): no gather on the device
        const logits = DeviceBuffer.alloc("bf16", rows * V);
        for (let start = 0; start < N; start += rows) {
            const M = Math.min(rows, N - start);
            g.gemm(
                false,
                true,
                M,
                V,
                C,
                1,
                xf.ptr + start * C * ACT_BYTES,
                C,
                "bf16",
                head.ptr,
                C,
                "bf16",
                0,
                logits.ptr,
                V,
                "bf16"
            );
            const tgt = targets.ptr + start * 4,
                lossRow = lossBuf.ptr + start * 4;
            // gemma3: the bf16 logits capped in place, as transformers caps its bf16 logits; the loss's backward
            // takes the gradient through the cap from the capped values
            if (softcap > 0) k.softcapBf16(logits.ptr, softcap, M * V);
            if (dxf) {
                k.crossEntropyFused(lossRow, null, count.ptr, logits.ptr, tgt, lossScale, M, V, softcap);
                g.gemm(
                    false,
                    false,
                    M,
                    C,
                    V,
                    1,
                    logits.ptr,
                    V,
                    "bf16",
                    head.ptr,
                    C,
                    "bf16",
                    0,
                    dxf.ptr + start * C * ACT_BYTES,
                    C,
                    "bf16"
                );
                // a trained output layer (modules_to_save): dHead[V, C] (fp32) += dlogits^T h
                if (dHead)
                    g.gemm(
                        true,
                        false,
                        V,
                        C,
                        M,
                        1,
                        logits.ptr,
                        V,
                        "bf16",
                        xf.ptr + start * C * ACT_BYTES,
                        C,
                        "bf16",
                        1,
                        dHead.ptr,
                        C,
                        "f32"
                    );
            } else k.crossEntropyForward(lossRow, null, count.ptr, logits.ptr, tgt, M, V);
        }
        const lossHost = lossBuf.toHost() as Float32Array;
        const countHost = (count.toHost() as Int32Array)[0];
        let lossSum = 0;
        for (let i = 0; i < N; i++) lossSum += lossHost[i];
        for (const b of [targets, lossBuf, count, logits]) b.free();
        return {lossSum, targets: countHost};
    }

    logits(
        hidden: DeviceBuffer,
        rows: number[] | null,
        head: DeviceBuffer,
        N: number,
        C: number,
        V: number,
        softcap = 0
    ): Float32Array {
        const out = this.deviceLogits(hidden, rows, head, N, C, V, softcap);
        const host = out.toHost() as Float32Array;
        out.free();
        return host;
    }
    pickTokens(
        hidden: DeviceBuffer,
        rows: number[] | null,
        head: DeviceBuffer,
        N: number,
        C: number,
        V: number,
        picks: readonly TokenPick[] | null,
        softcap = 0
    ): {ids: Int32Array; nonFinite: number} {
        const logits = this.deviceLogits(hidden, rows, head, N, C, V, softcap);
        const M = logits.length / V;
        const {params, entries} = pickArguments(M, picks);
        const p = DeviceBuffer.from("i32", params);
        const e = entries.length > 0 ? DeviceBuffer.from("i32", entries) : null;
        // the ids and the non-finite count in one buffer: one copy to the host
        const out = DeviceBuffer.zeros("i32", M + 1);
        try {
            cudaKernelOps().pickTokensF32(logits.ptr, M, V, p.ptr, e?.ptr ?? null, entries.length / 2, out.ptr, out.ptr + 4 * M);
            const host = out.toHost() as Int32Array;
            return {ids: host.subarray(0, M), nonFinite: host[M]};
        } finally {
            for (const b of [logits, p, e, out]) b?.free();
        }
    }
    /** f32 logits [rows, V] on the device, soft-capped when softcap > 0 */
    private deviceLogits(
        hidden: DeviceBuffer,
        rows: number[] | null,
        head: DeviceBuffer,
        N: number,
        C: number,
        V: number,
        softcap: number
    ): DeviceBuffer {
        const M = rows ? rows.length : N;
        // the asked rows gathered into one block, so lm_head is read once for all of them (a GEMM per row reads its
        // [V, C] weight once per row: 32 times for a decoding step of 32 rows)
        let x = hidden;
        if (rows && !rows.every((r, i) => r === i)) {
            x = DeviceBuffer.alloc("bf16", M * C);
            rows.forEach((r, i) => cuda().copy(x.ptr + i * C * ACT_BYTES, hidden.ptr + r * C * ACT_BYTES, C * ACT_BYTES));
        }
        const out = DeviceBuffer.alloc("f32", M * V);
        cudaGemmOps().gemm(false, true, M, V, C, 1, x.ptr, C, "bf16", head.ptr, C, "bf16", 0, out.ptr, V, "f32");
        if (x !== hidden) x.free();
        if (softcap > 0) cudaKernelOps().softcapF32(out.ptr, softcap, M * V);
        return out;
    }

    param(host: Float32Array): DeviceBuffer {
        return DeviceBuffer.from("f32", host);
    }
    paramToHost(host: Float32Array, t: DeviceBuffer): void {
        cuda().download(host, t.ptr);
    }
    zeroParam(t: DeviceBuffer, n: number): void {
        cuda().memset(t.ptr, 0, n * 4);
    }
    computeCopy(t: DeviceBuffer, n: number, into: DeviceBuffer | null): DeviceBuffer {
        const out = into ?? DeviceBuffer.alloc("bf16", n);
        cudaKernelOps().f32ToBf16(out.ptr, t.ptr, n);
        return out;
    }

    gemm(
        tA: boolean,
        tB: boolean,
        M: number,
        N: number,
        K: number,
        alpha: number,
        A: DeviceBuffer,
        B: DeviceBuffer,
        beta: number,
        C: DeviceBuffer
    ): void {
        cudaGemmOps().gemm(
            tA,
            tB,
            M,
            N,
            K,
            alpha,
            A.ptr,
            tA ? M : K,
            gemmDtype(A),
            B.ptr,
            tB ? K : N,
            gemmDtype(B),
            beta,
            C.ptr,
            N,
            gemmDtype(C)
        );
    }
    loraDownGroup(x: DeviceBuffer, M: number, K: number, parts: {out: DeviceBuffer; A: DeviceBuffer; r: number}[]): boolean {
        // the kernel's limits, checked here so that a prefill or a wide rank goes to the GEMM without a throw
        if (M > LORA_DOWN_MAX_M || parts.length > LORA_DOWN_MAX_PARTS || K % 8 !== 0 || x.dtype !== "bf16") return false;
        if (parts.some((p) => p.r > LORA_DOWN_MAX_R || p.A.dtype !== "bf16")) return false;
        try {
            cudaLoraOps().loraDown(
                x.ptr,
                M,
                K,
                parts.map((p) => ({out: p.out.ptr, A: p.A.ptr, r: p.r}))
            );
            return true;
        } catch (err) {
            // shapes or alignments the kernel does not take: the caller's gemms
            if (err instanceof RangeError) return false;
            throw err;
        }
    }
    dropout(out: DeviceBuffer, x: DeviceBuffer, seed: number, p: number, n: number, first = 0): void {
        cudaLoraOps().dropoutBf16(out.ptr, x.ptr, seed, p, n, first);
    }
    dropoutAdd(y: DeviceBuffer, x: DeviceBuffer, seed: number, p: number, n: number, first = 0): void {
        cudaLoraOps().dropoutAddBf16(y.ptr, x.ptr, seed, p, n, first);
    }
    addBias(y: DeviceBuffer, bias: DeviceBuffer, M: number, N: number): void {
        cudaLoraOps().addBiasBf16(y.ptr, bias.ptr, M, N);
    }
    scaleColumns(
        out: DeviceBuffer,
        x: DeviceBuffer,
        k: DeviceBuffer,
        offset: number,
        M: number,
        N: number,
        accumulate: boolean
    ): void {
        cudaLoraOps().scaleColumnsBf16(out.ptr, x.ptr, k.ptr, offset, M, N, accumulate);
    }
    columnSums(dst: DeviceBuffer, a: DeviceBuffer, b: DeviceBuffer | null, div: DeviceBuffer | null, M: number, N: number): void {
        cudaLoraOps().columnSumsBf16(dst.ptr, a.ptr, b?.ptr ?? null, div?.ptr ?? null, M, N);
    }
    rowNorms(out: DeviceBuffer, W: DeviceBuffer, R: number, C: number): void {
        cudaLoraOps().rowNormsF32(out.ptr, W.ptr, R, C);
    }
    divide(out: DeviceBuffer, a: DeviceBuffer, b: DeviceBuffer, n: number): void {
        cudaLoraOps().divideF32(out.ptr, a.ptr, b.ptr, n);
    }
}

/** a matrix's dtype as the GEMM names it */
function gemmDtype(t: DeviceBuffer): GemmDtype {
    if (t.dtype === "f32" || t.dtype === "bf16" || t.dtype === "f16") return t.dtype;
    throw new Error(`gemm: a ${t.dtype} buffer is no float matrix`);
}

let shared: CudaBackend | null = null;

/** the process's CUDA backend (throws with the reason when no GPU is usable, on first use of an op) */
export function cudaBackend(): CudaBackend {
    return (shared ??= new CudaBackend());
}
