// cpu-backend.ts: the Backend on the host: fp32 tensors are Float32Arrays (the garbage collector owns them), the
// ops are the native CPU addon's (native/cpu/*.cpp, threaded by its work-claiming pool).
import {cpu} from "./cpu.js";
import {checkColumnCopy, type Backend, type GatedAct, type HostCopy, type KvBlocksOf, type LossResult} from "./backend.js";
import {pickTokensHost, type TokenPick} from "./sampling.js";

/** activations live in host memory: an offloaded one is the tensor itself */
interface CpuHostCopy extends HostCopy {
    tensor: Float32Array;
}

export interface CpuTensors {
    f: Float32Array;
    i: Int32Array;
    u8: Uint8Array;
}

/**
 * Storage of the tensors a training step frees, reused by the next requests of the same length: a step asks for
 * the same tensors every time, and a fresh Float32Array costs its zeroing, the page faults of new memory and the
 * garbage collection of the old one (tiny-qwen2 at 4 x 128: ~200 MB in 420 tensors a step, plus the loss's
 * 32 MB of logits). Owned by what runs the steps (DecoderTrainer) and lent to the backend for a step by
 * CpuBackend.withPool, so it goes with its owner. A reused tensor is not zeroed: Backend.activation's contents
 * are undefined, as on CUDA, whose caching allocator hands out freed memory the same way.
 */
export class CpuBufferPool {
    private readonly spare = new Map<number, ArrayBuffer[]>();
    /** the tensors handed out and not yet given back (each take makes a new view, so a stale free is ignored) */
    private readonly live = new WeakSet<Float32Array>();
    /** tests: reused storage is filled with NaN, so that reading a tensor before writing it shows in the results */
    poison = false;

    take(n: number): Float32Array {
        const buffer = this.spare.get(n)?.pop();
        if (!buffer) {
            const t = new Float32Array(n);
            this.live.add(t);
            return t;
        }
        const t = new Float32Array(buffer, 0, n);
        if (this.poison) t.fill(Number.NaN);
        this.live.add(t);
        return t;
    }

    /** t's storage back for reuse: only a tensor this pool handed out, once (a second free of it does nothing) */
    give(t: unknown): void {
        if (!(t instanceof Float32Array) || !this.live.delete(t)) return;
        let list = this.spare.get(t.length);
        if (!list) this.spare.set(t.length, (list = []));
        list.push(t.buffer as ArrayBuffer);
    }

    /** bytes waiting for reuse */
    spareBytes(): number {
        let bytes = 0;
        for (const list of this.spare.values()) for (const b of list) bytes += b.byteLength;
        return bytes;
    }
}

export class CpuBackend implements Backend<CpuTensors> {
    readonly device = "cpu" as const;
    readonly activationDtype = "float32" as const;
    readonly lossChunkRows = 512;
    /** where tensors come from and freed ones go during withPool; otherwise new arrays for the garbage collector */
    private pool: CpuBufferPool | null = null;

    /** runs fn with tensors drawn from and freed to pool (a training step: DecoderTrainer) */
    withPool<T>(pool: CpuBufferPool, fn: () => T): T {
        const outer = this.pool;
        this.pool = pool;
        try {
            return fn();
        } finally {
            this.pool = outer;
        }
    }
    /** n floats from the pool (contents undefined), else a new array; also the ops' own temporaries, which are not
     *  Backend requests (the planner's replay counts them inside their op) */
    private take(n: number): Float32Array {
        return this.pool ? this.pool.take(n) : new Float32Array(n);
    }

    activation(n: number): Float32Array {
        return this.take(n);
    }
    stats(n: number): Float32Array {
        return this.take(n);
    }
    zeros(n: number): Float32Array {
        return this.pool ? this.pool.take(n).fill(0) : new Float32Array(n);
    }
    indices(host: Int32Array): Int32Array {
        return host;
    }
    mask(host: Uint8Array): Uint8Array {
        return host;
    }
    free(t: Float32Array | Int32Array | Uint8Array | null): void {
        this.pool?.give(t);
    }
    offload(t: Float32Array): HostCopy {
        return {hostCopy: true, tensor: t} as CpuHostCopy; // host memory already
    }
    prefetch(h: HostCopy): HostCopy {
        return h;
    }
    restore(h: HostCopy): Float32Array {
        return (h as CpuHostCopy).tensor;
    }

    embedding(out: Float32Array, ids: Int32Array, table: Float32Array, N: number, V: number, C: number): number {
        return cpu().embeddingForward(out, ids, table, N, V, C);
    }
    embeddingBackward(dtable: Float32Array, dout: Float32Array, ids: Int32Array, N: number, V: number, C: number): void {
        cpu().embeddingBackward(dtable, dout, ids, N, V, C);
    }
    rmsnorm(
        out: Float32Array,
        rstd: Float32Array | null,
        x: Float32Array,
        w: Float32Array,
        N: number,
        C: number,
        eps: number
    ): void {
        cpu().rmsnormForward(out, rstd, x, w, N, C, eps);
    }
    residualRmsnorm(
        h: Float32Array,
        out: Float32Array,
        rstd: Float32Array,
        x: Float32Array,
        y: Float32Array,
        w: Float32Array,
        N: number,
        C: number,
        eps: number
    ): void {
        const ops = cpu();
        if (h !== y) h.set(y.subarray(0, N * C));
        ops.addInplace(h, x, N * C); // y + x: the same sum as x + y, bit for bit
        ops.rmsnormForward(out, rstd, h, w, N, C, eps);
    }
    rmsnormBackward(
        dx: Float32Array,
        dy: Float32Array,
        x: Float32Array,
        w: Float32Array,
        rstd: Float32Array,
        N: number,
        C: number
    ): void {
        cpu().rmsnormBackward(dx, null, dy, x, w, rstd, N, C);
    }
    rope(
        x: Float32Array,
        pos: Int32Array,
        invFreq: Float32Array,
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        R = D
    ): void {
        cpu().ropeForward(x, x, pos, invFreq, attentionScaling, N, H, D, R);
    }
    ropeBackward(
        dx: Float32Array,
        pos: Int32Array,
        invFreq: Float32Array,
        attentionScaling: number,
        N: number,
        H: number,
        D: number,
        R = D
    ): void {
        cpu().ropeBackward(dx, dx, pos, invFreq, attentionScaling, N, H, D, R);
    }
    attention(
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
        past: number | Int32Array,
        scale: number,
        blocks?: KvBlocksOf<Int32Array> | null,
        window = 0
    ): void {
        if (!blocks && (typeof past === "number" || past.every((p) => p === past[0]))) {
            const offset = typeof past === "number" ? past : (past[0] ?? 0);
            cpu().attentionForward(out, lse, q, k, v, keyValid, seg, B, T, S, Hq, Hkv, D, offset, scale, window);
            return;
        }
        if (seg) throw new Error("attention: per-row offsets and paged caches cannot be combined with packed segments");
        // rows at their own lengths, or in cache blocks: one call per row over its tensors (a paged row's keys
        // gathered into one contiguous run first, as far as its queries can see)
        const qRow = T * Hq * D,
            kvRow = Hkv * D;
        for (let b = 0; b < B; b++) {
            const offset = typeof past === "number" ? past : past[b];
            const row = <T extends Float32Array | Uint8Array>(t: T, n: number) => t.subarray(b * n, (b + 1) * n) as T;
            let keys: Float32Array, values: Float32Array, Sb: number;
            if (blocks) {
                Sb = Math.min(S, Math.ceil((offset + T) / blocks.block) * blocks.block);
                keys = new Float32Array(Sb * kvRow);
                values = new Float32Array(Sb * kvRow);
                // blocks wholly behind the window are never read (a KV cache frees them): they stay zeros
                const from = window > 0 ? Math.max(0, offset - window + 1) : 0;
                for (let j0 = from - (from % blocks.block); j0 < Sb; j0 += blocks.block) {
                    const at = blockRow(blocks, b, j0);
                    if (at < 0) continue;
                    const n = Math.min(blocks.block, Sb - j0) * kvRow;
                    keys.set(k.subarray(at * kvRow, at * kvRow + n), j0 * kvRow);
                    values.set(v.subarray(at * kvRow, at * kvRow + n), j0 * kvRow);
                }
            } else {
                Sb = S;
                keys = row(k, S * kvRow);
                values = row(v, S * kvRow);
            }
            cpu().attentionForward(
                row(out, qRow),
                lse ? row(lse, Hq * T) : null,
                row(q, qRow),
                keys,
                values,
                keyValid ? keyValid.subarray(b * S, b * S + Sb) : null,
                null,
                1,
                T,
                Sb,
                Hq,
                Hkv,
                D,
                offset,
                scale,
                window
            );
        }
    }
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
        Hq: number,
        Hkv: number,
        D: number,
        scale: number,
        window = 0
    ): void {
        cpu().attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, keyValid, seg, B, T, T, Hq, Hkv, D, 0, scale, window);
    }
    gatedAct(out: Float32Array, gate: Float32Array, up: Float32Array, n: number, act: GatedAct): void {
        cpu().gatedActForward(out, gate, up, n, act);
    }
    gatedActBackward(
        dgate: Float32Array,
        dup: Float32Array,
        dout: Float32Array,
        gate: Float32Array,
        up: Float32Array,
        n: number,
        act: GatedAct
    ): void {
        cpu().gatedActBackward(dgate, dup, dout, gate, up, n, act);
    }
    scale(x: Float32Array, s: number, n: number): void {
        for (let i = 0; i < n; i++) x[i] *= s;
    }
    addInplace(y: Float32Array, x: Float32Array, n: number): void {
        cpu().addInplace(y, x, n);
    }
    cacheWrite(
        cache: Float32Array,
        x: Float32Array,
        B: number,
        T: number,
        capacity: number,
        pasts: Int32Array,
        rowElems: number,
        blocks?: KvBlocksOf<Int32Array> | null
    ): void {
        for (let b = 0; b < B; b++)
            for (let t = 0; t < T; t++) {
                const j = pasts[b] + t;
                if (j < 0 || j >= capacity) continue; // as the kernel: never outside the row
                const at = blocks ? blockRow(blocks, b, j) : b * capacity + j;
                if (at < 0) continue;
                cache.set(x.subarray((b * T + t) * rowElems, (b * T + t + 1) * rowElems), at * rowElems);
            }
    }
    ropeCacheWrite(
        q: Float32Array,
        k: Float32Array,
        v: Float32Array,
        pos: Int32Array,
        invFreq: Float32Array,
        attentionScaling: number,
        B: number,
        T: number,
        Hq: number,
        Hkv: number,
        D: number,
        cacheK: Float32Array,
        cacheV: Float32Array,
        capacity: number,
        pasts: Int32Array,
        blocks?: KvBlocksOf<Int32Array> | null,
        R = D
    ): void {
        this.rope(q, pos, invFreq, attentionScaling, B * T, Hq, D, R);
        this.rope(k, pos, invFreq, attentionScaling, B * T, Hkv, D, R);
        this.cacheWrite(cacheK, k, B, T, capacity, pasts, Hkv * D, blocks);
        this.cacheWrite(cacheV, v, B, T, capacity, pasts, Hkv * D, blocks);
    }
    view<T extends Float32Array | Int32Array>(t: T, offset: number, length: number): T {
        return t.subarray(offset, offset + length) as T;
    }
    copyColumns(
        dst: Float32Array,
        dstCols: number,
        dstOffset: number,
        src: Float32Array,
        srcCols: number,
        srcOffset: number,
        M: number,
        n: number
    ): void {
        checkColumnCopy(dst.length, dstCols, dstOffset, src.length, srcCols, srcOffset, M, n);
        // a row's columns are contiguous: one copy per row
        for (let m = 0; m < M; m++)
            dst.set(src.subarray(m * srcCols + srcOffset, m * srcCols + srcOffset + n), m * dstCols + dstOffset);
    }

    causalLmLoss(
        xf: Float32Array,
        targets: Int32Array,
        head: Float32Array,
        N: number,
        C: number,
        V: number,
        lossScale: number,
        dxf: Float32Array | null,
        chunkRows: number,
        dHead: Float32Array | null,
        softcap = 0
    ): LossResult {
        const ops = cpu();
        let lossSum = 0,
            count = 0;
        // only rows with a target need logits
        const rows: number[] = [];
        for (let i = 0; i < N; i++) if (targets[i] >= 0) rows.push(i);
        if (dxf) dxf.fill(0);
        const take = (n: number) => this.take(n),
            give = (t: Float32Array) => this.pool?.give(t);
        for (let start = 0; start < rows.length; start += chunkRows) {
            const idx = rows.slice(start, start + chunkRows);
            const M = idx.length;
            const h = gatherRows(take(M * C), xf, idx, C);
            const tg = new Int32Array(M);
            idx.forEach((r, i) => (tg[i] = targets[r]));
            const logits = take(M * V);
            ops.sgemm(false, true, M, V, C, 1, h, C, head, C, 0, logits, V);
            if (softcap > 0) ops.softcapForward(logits, M * V, softcap);
            const loss = take(M),
                lse = take(M);
            count += ops.crossEntropyForward(loss, lse, logits, tg, M, V);
            for (let i = 0; i < M; i++) lossSum += loss[i];
            if (dxf) {
                if (softcap > 0) {
                    // the capped logits are needed for the cap's own backward: the gradient goes to a buffer of its own
                    const dlogits = take(M * V);
                    ops.crossEntropyBackward(dlogits, logits, lse, tg, lossScale, M, V);
                    ops.softcapBackward(dlogits, logits, M * V, softcap);
                    logits.set(dlogits);
                    give(dlogits);
                } else ops.crossEntropyBackward(logits, logits, lse, tg, lossScale, M, V); // in place: dlogits
                // a trained output layer (modules_to_save): dW[V, C] += dlogits^T h
                if (dHead) ops.sgemm(true, false, V, C, M, 1, logits, V, h, C, 1, dHead, C);
                const dh = take(M * C);
                ops.sgemm(false, false, M, C, V, 1, logits, V, head, C, 0, dh, C);
                idx.forEach((r, i) => dxf.set(dh.subarray(i * C, (i + 1) * C), r * C));
                give(dh);
            }
            for (const t of [h, logits, loss, lse]) give(t);
        }
        return {lossSum, targets: count};
    }

    logits(
        hidden: Float32Array,
        rows: number[] | null,
        head: Float32Array,
        N: number,
        C: number,
        V: number,
        softcap = 0
    ): Float32Array {
        const h = rows ? gatherRows(new Float32Array(rows.length * C), hidden, rows, C) : hidden;
        const M = rows ? rows.length : N;
        const out = new Float32Array(M * V);
        cpu().sgemm(false, true, M, V, C, 1, h, C, head, C, 0, out, V);
        if (softcap > 0) cpu().softcapForward(out, M * V, softcap);
        return out;
    }
    pickTokens(
        hidden: Float32Array,
        rows: number[] | null,
        head: Float32Array,
        N: number,
        C: number,
        V: number,
        picks: readonly TokenPick[] | null,
        softcap = 0
    ): {ids: Int32Array; nonFinite: number} {
        return pickTokensHost(this.logits(hidden, rows, head, N, C, V, softcap), V, picks);
    }

    param(host: Float32Array): Float32Array {
        return host;
    }
    paramToHost(host: Float32Array, t: Float32Array): void {
        if (host !== t) host.set(t);
    }
    zeroParam(t: Float32Array, n: number): void {
        t.fill(0, 0, n);
    }
    computeCopy(t: Float32Array): Float32Array {
        return t; // fp32 is the compute dtype
    }

    gemm(
        tA: boolean,
        tB: boolean,
        M: number,
        N: number,
        K: number,
        alpha: number,
        A: Float32Array,
        B: Float32Array,
        beta: number,
        C: Float32Array
    ): void {
        cpu().sgemm(tA, tB, M, N, K, alpha, A, tA ? M : K, B, tB ? K : N, beta, C, N);
    }
    dropout(out: Float32Array, x: Float32Array, seed: number, p: number, n: number, first = 0): void {
        const mask = this.take(n);
        cpu().dropoutMask(mask, seed, p, n, first);
        for (let i = 0; i < n; i++) out[i] = x[i] * mask[i];
        this.pool?.give(mask);
    }
    dropoutAdd(y: Float32Array, x: Float32Array, seed: number, p: number, n: number, first = 0): void {
        const mask = this.take(n);
        cpu().dropoutMask(mask, seed, p, n, first);
        for (let i = 0; i < n; i++) y[i] += x[i] * mask[i];
        this.pool?.give(mask);
    }
    addBias(y: Float32Array, bias: Float32Array, M: number, N: number): void {
        cpu().addBias(y, y, bias, M, N);
    }
    scaleColumns(
        out: Float32Array,
        x: Float32Array,
        k: Float32Array,
        offset: number,
        M: number,
        N: number,
        accumulate: boolean
    ): void {
        for (let m = 0; m < M; m++)
            for (let n = 0; n < N; n++) {
                const i = m * N + n;
                const v = x[i] * (k[n] + offset);
                out[i] = accumulate ? out[i] + v : v;
            }
    }
    columnSums(dst: Float32Array, a: Float32Array, b: Float32Array | null, div: Float32Array | null, M: number, N: number): void {
        for (let n = 0; n < N; n++) {
            let s = 0;
            for (let m = 0; m < M; m++) s += b ? a[m * N + n] * b[m * N + n] : a[m * N + n];
            dst[n] += div ? s / div[n] : s;
        }
    }
    rowNorms(out: Float32Array, W: Float32Array, R: number, C: number): void {
        for (let r = 0; r < R; r++) {
            let ss = 0;
            for (let c = 0; c < C; c++) ss += W[r * C + c] ** 2;
            out[r] = Math.sqrt(ss);
        }
    }
    divide(out: Float32Array, a: Float32Array, b: Float32Array, n: number): void {
        for (let i = 0; i < n; i++) out[i] = a[i] / b[i];
    }
}

/** out[i] = x[rows[i]] (rows of C) */
function gatherRows(out: Float32Array, x: Float32Array, rows: number[], C: number): Float32Array {
    rows.forEach((r, i) => out.set(x.subarray(r * C, (r + 1) * C), i * C));
    return out;
}

let shared: CpuBackend | null = null;

/** the process's CPU backend (stateless: one is enough) */
export function cpuBackend(): CpuBackend {
    return (shared ??= new CpuBackend());
}

/** the pool row of row b's position j in a paged KV cache, or -1 where no block is reserved */
function blockRow(blocks: KvBlocksOf<Int32Array>, b: number, j: number): number {
    const blk = blocks.table[b * blocks.stride + Math.floor(j / blocks.block)];
    return blk < 0 ? -1 : blk * blocks.block + (j % blocks.block);
}
