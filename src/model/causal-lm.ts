// causal-lm.ts: what generation, chat and evaluation need of a model, whatever device it runs on: logits for
// new tokens with a KV cache, and the loss of a batch. The host DecoderModel and the device CudaModel both run the
// one decoder graph (graph.ts) and implement this.
import type {TokenPick} from "../backend/sampling.js";
import type {ModelConfig} from "../io/hf-config.js";
import type {LossResult, TrainBatch} from "./graph.js";

/** a KV cache as its users see it (graph.ts KVCache, in the memory of the model that made it) */
export interface LmCache {
    readonly batch: number;
    readonly capacity: number;
    /** positions filled, per row (rows decoded together may be at different lengths) */
    readonly lengths: Int32Array;
    /** positions filled in the longest row */
    readonly length: number;
    /** blocks in the pool and not held by a row (the cache is paged: graph.ts KVCache) */
    readonly blocks: number;
    readonly freeBlockCount: number;
    /** blocks a row holds */
    heldBlocks(row: number): number;
    /** gives a row the blocks of its first `positions` positions ahead of time (a QloraError when the pool is short) */
    reserve(row: number, positions: number): void;
    /** free blocks not promised to rows (pledge) */
    readonly availableBlocks: number;
    /** the most blocks a row of this prompt and run length holds at once (fewer than its positions need with a sliding window) */
    peakBlocks(promptLength: number, positions: number): number;
    /** promises a row blocks for its later reservations (a QloraError when the pool is short) */
    pledge(row: number, blocks: number): void;
    /** forgets a row's positions from `length` on (truncateCacheRow); the length it kept */
    truncate(row: number, length: number): number;
    /** moves a row's keys and values to another row, which it replaces (continuous batching keeps rows packed) */
    moveRow(from: number, to: number): void;
    /** empties a row: its blocks go back to the pool */
    clearRow(row: number): void;
    /** frees its memory; the cache is unusable afterwards */
    release(): void;
}

export interface LmForwardOptions {
    /** the cache the new keys and values are appended to (from newCache of the same model) */
    cache?: LmCache;
    /**
     * the cache row of the first of the B rows (default 0): rows firstRow .. firstRow + B - 1 are appended to, each
     * after its own filled positions. Rows at different lengths take one token each (T = 1).
     */
    firstRow?: number;
    /** compute logits only for these rows of the flattened [B*T] tokens (default: all) */
    logitRows?: number[];
    /** [B, cache length + T]: 1 real, 0 padding (batched generation pads prompts on the left) */
    attentionMask?: Uint8Array;
    /** [B, T] positions (default: cache length + 0..T-1 for every row) */
    positionIds?: Int32Array;
}

export interface CausalLm {
    readonly config: ModelConfig;
    readonly device: "cpu" | "cuda";
    /** logits [rows, V] (fp32, host memory) for ids [B, T] */
    forward(ids: Int32Array, B: number, T: number, opts?: LmForwardOptions): Float32Array;
    /**
     * decoding: the forward, then the next token of each logit row (greedy, or sampled by its pick), chosen where
     * the logits are; all rows greedy when picks is null
     */
    pickForward(ids: Int32Array, B: number, T: number, opts: LmForwardOptions, picks: readonly TokenPick[] | null): Int32Array;
    /**
     * an empty paged KV cache for `batch` rows of up to `capacity` positions, in the model's memory, with `blocks`
     * blocks of KV_BLOCK positions shared by the rows (default: every row at full capacity); release() frees it
     */
    newCache(batch: number, capacity: number, blocks?: number): LmCache;
    /** the summed loss and target count of a batch, forward only (evaluation) */
    score(batch: TrainBatch): LossResult;
}

/**
 * forgets a cache row's positions from `length` on: the row's next forward writes over them (the row keeps its
 * blocks). A row's length is the cache's whole record of what it holds (the host's lengths, which every step of
 * either device reads), so a shorter length is a shorter row. Evaluation keeps a shared few-shot prefix this way.
 * Returns the length kept: 0 (the row emptied) when keys a query at `length` would see were already dropped
 * behind a sliding window (graph.ts KVCache), so the caller runs the row from its start.
 */
export function truncateCacheRow(cache: LmCache, row: number, length: number): number {
    if (!(Number.isSafeInteger(row) && row >= 0 && row < cache.batch))
        throw new Error(`truncateCacheRow: row ${row} of a cache of ${cache.batch} rows`);
    if (!(Number.isSafeInteger(length) && length >= 0 && length <= cache.lengths[row]))
        throw new Error(`truncateCacheRow: length ${length} of a row of ${cache.lengths[row]} positions`);
    return cache.truncate(row, length);
}
