// native-types.ts: a hand-written mirror of the exports of native/addon/addon_cpu.cpp and addon_cuda.cpp.
// Buffers are typed arrays of the exact element type; sizes are element counts. Outputs first, sizes last.
import type {GatedAct} from "./backend.js";

export interface CpuAddon {
    /** row-major C[M,N] = alpha * op(A) @ op(B) + beta * C (cblas_sgemm contract) */
    sgemm(
        transA: boolean,
        transB: boolean,
        M: number,
        N: number,
        K: number,
        alpha: number,
        A: Float32Array,
        lda: number,
        B: Float32Array,
        ldb: number,
        beta: number,
        C: Float32Array,
        ldc: number
    ): void;
    setNumThreads(n: number): void;
    getNumThreads(): number;

    bf16ToF32(out: Float32Array, inp: Uint16Array, n: number): void;
    f16ToF32(out: Float32Array, inp: Uint16Array, n: number): void;
    f32ToBf16(out: Uint16Array, inp: Float32Array, n: number): void;
    f32ToF16(out: Uint16Array, inp: Float32Array, n: number): void;
    /** y += x */
    addInplace(y: Float32Array, x: Float32Array, n: number): void;
    /** out[N,C] = inp + bias[C] */
    addBias(out: Float32Array, inp: Float32Array, bias: Float32Array, N: number, C: number): void;

    /** returns the index of the first id outside [0, V), or -1 */
    embeddingForward(out: Float32Array, ids: Int32Array, table: Float32Array, N: number, V: number, C: number): number;
    embeddingBackward(dtable: Float32Array, dout: Float32Array, ids: Int32Array, N: number, V: number, C: number): void;

    rmsnormForward(
        out: Float32Array,
        rstd: Float32Array | null,
        inp: Float32Array,
        weight: Float32Array,
        N: number,
        C: number,
        eps: number
    ): void;
    rmsnormBackward(
        dinp: Float32Array,
        dweight: Float32Array | null,
        dout: Float32Array,
        inp: Float32Array,
        weight: Float32Array,
        rstd: Float32Array,
        N: number,
        C: number
    ): void;

    ropeForward(
        out: Float32Array,
        inp: Float32Array,
        pos: Int32Array,
        invFreq: Float32Array,
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        /** rotary dimensions of each head (pairs (i, i + rotary/2), invFreq [rotary/2]); the rest pass through. Default D */
        rotary?: number
    ): void;
    ropeBackward(
        dinp: Float32Array,
        dout: Float32Array,
        pos: Int32Array,
        invFreq: Float32Array,
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        rotary?: number
    ): void;

    attentionForward(
        out: Float32Array,
        lse: Float32Array | null,
        q: Float32Array,
        k: Float32Array,
        v: Float32Array,
        keyValid: Uint8Array | null,
        seg: Int32Array | null,
        B: number,
        T: number,
        S: number,
        Hq: number,
        Hkv: number,
        D: number,
        qOffset: number,
        scale: number,
        /** a sliding window: key j visible to query t only when j > qOffset + t - window (0 or absent: none) */
        window?: number
    ): void;
    attentionBackward(
        dq: Float32Array,
        dk: Float32Array,
        dv: Float32Array,
        dout: Float32Array,
        q: Float32Array,
        k: Float32Array,
        v: Float32Array,
        out: Float32Array,
        lse: Float32Array,
        keyValid: Uint8Array | null,
        seg: Int32Array | null,
        B: number,
        T: number,
        S: number,
        Hq: number,
        Hkv: number,
        D: number,
        qOffset: number,
        scale: number,
        /** a sliding window: key j visible to query t only when j > qOffset + t - window (0 or absent: none) */
        window?: number
    ): void;

    /**
     * mask[n] = 1 / (1 - p) where element first + i is kept, else 0: LoRA dropout, the CUDA kernels' masks (seed <
     * 2^53; first: where this part of the tensor starts)
     */
    dropoutMask(mask: Float32Array, seed: number, p: number, n: number, first: number): void;
    /** out = act(gate) * up: the gated MLP (silu: SwiGLU; gelu_tanh: Gemma's gelu_pytorch_tanh) */
    gatedActForward(out: Float32Array, gate: Float32Array, up: Float32Array, n: number, act: GatedAct): void;
    /** dgate (=), dup (=); dgate may alias gate, dup may alias up */
    gatedActBackward(
        dgate: Float32Array,
        dup: Float32Array,
        dout: Float32Array,
        gate: Float32Array,
        up: Float32Array,
        n: number,
        act: GatedAct
    ): void;
    /** x = cap tanh(x / cap) in place (Gemma's final_logit_softcapping); cap > 0 */
    softcapForward(x: Float32Array, n: number, cap: number): void;
    /** dx *= 1 - (y / cap)^2, y the capped values */
    softcapBackward(dx: Float32Array, y: Float32Array, n: number, cap: number): void;

    /** returns the number of rows with a target >= 0 */
    crossEntropyForward(
        loss: Float32Array,
        lse: Float32Array | null,
        logits: Float32Array,
        targets: Int32Array,
        N: number,
        V: number
    ): number;
    crossEntropyBackward(
        dlogits: Float32Array,
        logits: Float32Array,
        lse: Float32Array,
        targets: Int32Array,
        dlossScale: number,
        N: number,
        V: number
    ): void;
}

export interface CudaDeviceInfo {
    runtimeVersion: number;
    driverVersion: number;
    /** why no device could be counted (no driver, no GPU), or null */
    error: string | null;
    devices: {index: number; name: string; major: number; minor: number; totalBytes: number; freeBytes?: number}[];
    /** the cuBLASLt library that dlopen found, or null */
    cublasLt: string | null;
}

/** allocator statistics, in bytes */
export interface CudaMemoryStats {
    allocated: number;
    reserved: number;
    peakAllocated: number;
    peakReserved: number;
    numAllocs: number;
    /** paged optimizer states (unified memory, outside the allocator) */
    pagedBytes: number;
    /** pinned host slots of offloaded activations (host memory) */
    pinnedHostBytes: number;
    deviceFree?: number;
    deviceTotal?: number;
}

/**
 * The CUDA addon. Device buffers are numbers holding device addresses; every op is queued on one stream and
 * download() waits for it. Op families add their functions (see native/addon/cuda_*.cpp and the interfaces in
 * src/backend/cuda-*-types.ts).
 */
export interface CudaAddon {
    deviceInfo(): CudaDeviceInfo;
    setDevice(index: number): void;
    alloc(bytes: number): number;
    free(ptr: number): void;
    /** pinned host memory mapped for the device (kernels read it over PCIe); the address is the same on both */
    hostAlloc(bytes: number): number;
    hostFree(ptr: number): void;
    /** host to device (synchronous) at dst + offset bytes */
    upload(dst: number, src: ArrayBufferView, dstOffsetBytes?: number): void;
    /** device to host, after the stream's queued work */
    download(dst: ArrayBufferView, src: number, srcOffsetBytes?: number): void;
    memset(dst: number, byte: number, bytes: number): void;
    copy(dst: number, src: number, bytes: number): void;
    synchronize(): void;
    memoryStats(): CudaMemoryStats;
    resetPeakMemoryStats(): void;
    /** gives cached device buffers and idle pinned host slots back */
    emptyCache(): void;
    /** offloaded activations (native/cuda/offload.cpp): src copied to a pinned host slot on the copy stream, after the queued work */
    hostOffload(src: number, bytes: number): number;
    /** the stream waits for the slot's copy to host (before src is freed) */
    hostFence(slot: number): void;
    /** the slot copied back into dst on the copy stream, after the queued work */
    hostPrefetch(slot: number, dst: number): void;
    /** the stream waits for the copy back; the slot is free again */
    hostRestore(slot: number): void;
    /** work queued from now on is recorded into a CUDA graph instead of run; allocations use the graph pool */
    graphBegin(): void;
    /** ends the recording: the instantiated graph's handle (throws when the work could not be captured) */
    graphEnd(): number;
    /** queues one replay of the graph on the stream */
    graphLaunch(graph: number): void;
    /** waits for queued work and destroys the graph (with the last one, its pool goes back to the cache) */
    graphDestroy(graph: number): void;
    /** profiling: the stream waits `us` microseconds, so that the work queued after it runs back to back */
    profileHold(us: number): void;
    /** profiling: a timing event on the stream */
    profileMark(): void;
    /** profiling: waits for the stream; the milliseconds between consecutive marks since the last read */
    profileRead(): Float64Array;
}
