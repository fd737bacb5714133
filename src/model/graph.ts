// graph.ts: the decoder (Llama / Qwen2 / Qwen3 / Mistral / Phi-3 / Gemma 3), written once over the Backend interface: the training forward
// (activations saved, or recomputed under gradient checkpointing, optionally offloaded to the host), the
// hand-written backward (no autograd), and the inference forward with a KV cache. The CPU and the GPU run this
// same code; what differs is the backend (fp32 host ops, or bf16 CUDA kernels) and the projection layers handed
// in (GraphLinear: dense or 4-bit base, LoRA/DoRA, trained bias).
//
// Block (pre-norm, as transformers' LlamaDecoderLayer / Qwen2DecoderLayer):
//   h = x + o_proj(attn(rope(q_proj(norm1(x))), rope(k_proj(.)), v_proj(.)))
//   y = h + down_proj(silu(gate_proj(norm2(h))) * up_proj(norm2(h)))
// Qwen3 normalizes each head of q and k (q_norm, k_norm: RMSNorm over head_dim) before RoPE; Phi-3 computes q, k,
// v with one qkv_proj and gate, up with one gate_up_proj (split into the same buffers after the product, their
// gradients joined before its backward) and rotates only the first rotary_dim dimensions of each head (partial
// RoPE); longrope switches to long_factor's table for a forward whose largest position reaches the original context.
// Gemma 3 (Gemma3DecoderLayer) scales the embeddings by sqrt(hidden_size), normalizes q and k per head like Qwen3,
// puts a norm on the attention's output and on the MLP's before their residual adds (sandwich norms), gates its MLP
// with GELU-tanh, gives its sliding layers a RoPE of their own (rope_local_base_freq), scales attention scores by
// query_pre_attn_scalar^-0.5 and soft-caps the final logits; its (1 + w) norm weights come in with the 1 added.
//
// The loss is transformers' causal-LM cross-entropy (logits at t predict labels[t+1]) summed over targets and
// multiplied by lossScale, so the trainer can pass 1 / (targets in the whole accumulated batch) and get the true
// token mean (SPEC-training §8); the backend computes it in chunks of rows and never holds the whole logits.
// Gradient rule (llm.c): parameter gradients +=, activation gradients =, the residual stream +=.
//
// The MLP is token-wise, so where its activations are not kept (a forward under gradient checkpointing or for
// inference) it runs in chunks of rows, and under checkpointing the backward recomputes it chunk by chunk instead
// of the block's recomputation holding it whole: the [tokens, intermediate] tensors, the largest of a long sequence,
// never exist for more than one chunk (Unsloth's and Arctic's tiled MLP). Dropout masks follow each element's
// place in the whole tensor, so chunked and whole passes draw the same masks.
import {QloraError} from "../errors.js";
import type {Backend, GatedAct, GraphLinear, HostCopy, KvBlocksOf, LossResult, TensorTypes} from "../backend/backend.js";
import type {TokenPick} from "../backend/sampling.js";
import {countNonFinite, f32ToHalf, halfToF32} from "../backend/cpu.js";
import {attentionWindow, gatedActOf, MAX_TENSOR_ELEMENTS, type ModelConfig} from "../io/hf-config.js";
import type {ProjName} from "./weights.js";
import type {TrainableTensor} from "../lora/layer.js";
import {backendTensor, type BackendTensor} from "../lora/projection.js";

export type {LossResult};

export interface TrainBatch {
    B: number;
    T: number;
    inputIds: Int32Array; // [B*T]
    /** [B*T], not shifted; negative values are ignored */
    labels: Int32Array;
    /** [B*T] 1 real, 0 padding (null: no padding) */
    attentionMask: Uint8Array | null;
    positionIds: Int32Array; // [B*T]
    /** [B*T] packed-sequence index per token; attention stays inside a segment (null: one per row) */
    segIds: Int32Array | null;
}

export interface ForwardBackwardOptions {
    /** multiplies the summed loss before backward (1 / targets of the whole accumulated batch) */
    lossScale: number;
    gradientCheckpointing: boolean;
    /** rows of logits computed at a time (memory of the loss: rows x vocab values); default: the backend's */
    lossChunkRows?: number;
    /** forward only (evaluation) */
    noBackward?: boolean;
}

/** the model's tensors on one backend */
export interface GraphWeights<X extends TensorTypes> {
    embed: X["f"]; // [V, C]
    /** [V, C]: the embedding itself when tied */
    lmHead: X["f"];
    finalNorm: X["f"]; // [C]
    invFreq: X["f"]; // RoPE inverse frequencies [rotaryDim / 2]
    /** longrope: long_factor's table [rotaryDim / 2], used by a forward whose largest position is >= fromPosition */
    longRope?: {invFreq: X["f"]; fromPosition: number} | null;
    /** gemma3: the RoPE of sliding layers [rotaryDim / 2] and its attention scaling (the others use invFreq) */
    localRope?: {invFreq: X["f"]; attentionScaling: number} | null;
    layers: {
        inputNorm: X["f"];
        /** the norm before the MLP */
        postNorm: X["f"];
        /** qwen3, gemma3: the per-head RMSNorm weights of q and k [head_dim] */
        qNorm?: X["f"];
        kNorm?: X["f"];
        /** gemma3: the norms of the attention's and the MLP's outputs, before their residual adds */
        attnOutNorm?: X["f"];
        mlpOutNorm?: X["f"];
        /** the model's projections (weights.ts projNames: the fused ones for phi3) */
        proj: Record<ProjName, GraphLinear<X["f"]>>;
    }[];
}

export interface GraphOptions<X extends TensorTypes> {
    attentionScaling: number;
    /** with gradient checkpointing, block inputs wait in host memory for the recomputation (Unsloth's offload) */
    offloadActivations?: boolean;
    /** rows of the MLP's chunks where its activations are not kept (default: mlpChunkRows(intermediate_size)) */
    mlpChunkRows?: number;
    /**
     * full weights that train (modules_to_save): fp32 masters and gradients [V, C] on the backend; weights.embed /
     * lmHead are their compute copies (refreshed by afterUpdate)
     */
    trained?: TrainedFull<BackendTensor<X["f"]>>;
    /** only for the type: the backend's tensors */
    tensors?: X;
}

/** the full weights that can train (PEFT's modules_to_save), one thing each */
export interface TrainedFull<T> {
    embed?: T;
    lmHead?: T;
}

/** the trained full weights of the host model as backend tensors */
export function trainedOnBackend<X extends TensorTypes>(
    be: Backend<X>,
    full: TrainedFull<TrainableTensor>
): TrainedFull<BackendTensor<X["f"]>> {
    return {
        embed: full.embed && backendTensor(be, full.embed),
        lmHead: full.lmHead && backendTensor(be, full.lmHead)
    };
}

/** positions per block of a KV cache (the CUDA attention's key tile: native/cuda/attention.h QLORA_CUDA_KV_BLOCK) */
export const KV_BLOCK = 64;

/** blocks a row of `positions` positions holds */
export function kvBlocksFor(positions: number): number {
    return Math.ceil(positions / KV_BLOCK);
}

/**
 * the most blocks a KV cache row holds at once when it prefills `promptLength` positions and then decodes one at a
 * time up to `positions`: all of them, or with a window (cacheWindow) the prompt's blocks, then those the window
 * spans (floor((window - 1) / KV_BLOCK) + 1) and the one being filled
 */
export function kvPeakBlocks(window: number, promptLength: number, positions: number): number {
    const all = kvBlocksFor(positions);
    if (window === 0) return all;
    return Math.min(all, Math.max(kvBlocksFor(promptLength), Math.floor((window - 1) / KV_BLOCK) + 2));
}

/**
 * how far back a KV cache must keep keys: the widest sliding window of the model's layers, or 0 when a layer attends
 * to every position (then nothing is ever dropped)
 */
export function cacheWindow(cfg: ModelConfig): number {
    let widest = 0;
    for (let l = 0; l < cfg.numHiddenLayers; l++) {
        const w = attentionWindow(cfg, l);
        if (w === 0) return 0;
        widest = Math.max(widest, w);
    }
    return widest;
}

/**
 * The key/value tensors of incremental decoding, on one backend, paged as vLLM's PagedAttention pages them: per
 * layer one pool of blocks [blocks * KV_BLOCK, Hkv, D], and per row a table of the blocks holding its positions.
 * Rows take blocks as they grow (or reserve them ahead), so sequences of different lengths share the pool: it
 * can hold fewer positions than rows x capacity. Each row has its own length: rows decoded together may be at
 * different positions (continuous batching: a row that ends leaves, a new one joins in its place, and moving a
 * row moves its table, not its keys). With sliding-window layers only (cacheWindow > 0), a block whose positions
 * every later query's window has passed goes back to the pool as the row advances (its table entry becomes -1;
 * the attention never reads it), so a long generation holds about window / KV_BLOCK + 2 blocks per row. A row
 * can pledge the blocks of its whole run (SlotDecoder.join), so that it never waits for a block mid-way.
 */
export class KVCache<F = Float32Array> {
    readonly k: F[];
    readonly v: F[];
    /** positions filled, per row */
    readonly lengths: Int32Array;
    /** blocks a row may hold: ceil(capacity / KV_BLOCK) */
    readonly blocksPerRow: number;
    /** blocks in the pool */
    readonly blocks: number;
    /** [batch, blocksPerRow]: the block of each row's positions KV_BLOCK i .., -1 where none is reserved */
    readonly table: Int32Array;
    /** keys older than this many positions behind a row's next query are dropped (0: kept; cacheWindow) */
    readonly window: number;
    private readonly freeBlocks: number[];
    /** per row: its leading blocks given back (wholly behind the window); they are not reserved again */
    private readonly dropped: Int32Array;
    /** per row: the blocks promised to it (pledge), of which it may not hold all yet */
    private readonly pledged: Int32Array;

    constructor(
        readonly cfg: ModelConfig,
        readonly batch: number,
        /** positions a row may reach */
        readonly capacity: number,
        alloc: (n: number) => F = (n) => new Float32Array(n) as F,
        private readonly free: (t: F) => void = () => undefined,
        /** blocks in the pool (default: enough for every row at full capacity) */
        blocks?: number
    ) {
        if (!(Number.isSafeInteger(batch) && batch >= 1 && Number.isSafeInteger(capacity) && capacity >= 1))
            throw new Error(`KVCache: batch ${batch} and capacity ${capacity} must be positive integers`);
        this.blocksPerRow = Math.ceil(capacity / KV_BLOCK);
        this.blocks = blocks ?? batch * this.blocksPerRow;
        const n = this.blocks * KV_BLOCK * cfg.numKeyValueHeads * cfg.headDim;
        // the cache is sized from the request (prompt + max new tokens, capped by the context): a request past
        // what one buffer holds is an error that says what to lower, not a RangeError
        if (!(Number.isSafeInteger(this.blocks) && this.blocks >= 1 && Number.isSafeInteger(n) && n <= MAX_TENSOR_ELEMENTS))
            throw new QloraError(
                `a key/value cache for ${capacity} positions (x ${batch} rows, ${this.blocks} blocks of ${KV_BLOCK}) ` +
                    `needs ${n} values per layer, more than one buffer holds (${MAX_TENSOR_ELEMENTS}); lower the number of new tokens or the prompt length`
            );
        this.k = Array.from({length: cfg.numHiddenLayers}, () => alloc(n));
        this.v = Array.from({length: cfg.numHiddenLayers}, () => alloc(n));
        this.lengths = new Int32Array(batch);
        this.table = new Int32Array(batch * this.blocksPerRow).fill(-1);
        this.window = cacheWindow(cfg);
        this.dropped = new Int32Array(batch);
        this.pledged = new Int32Array(batch);
        // a stack: block 0 is handed out first
        this.freeBlocks = Array.from({length: this.blocks}, (_, i) => this.blocks - 1 - i);
    }

    /** positions filled in the longest row */
    get length(): number {
        return this.lengths.reduce((m, x) => Math.max(m, x), 0);
    }

    /** blocks not held by any row */
    get freeBlockCount(): number {
        return this.freeBlocks.length;
    }

    /** free blocks not promised to a row that does not hold them yet: what a new row may pledge */
    get availableBlocks(): number {
        let owed = 0;
        for (let r = 0; r < this.batch; r++) owed += this.owed(r);
        return this.freeBlocks.length - owed;
    }

    /** kvPeakBlocks of this cache's window */
    peakBlocks(promptLength: number, positions: number): number {
        return kvPeakBlocks(this.window, promptLength, positions);
    }

    /** promises row `row` blocks of the pool, so that its later reservations never find it short (a QloraError now if it is) */
    pledge(row: number, blocks: number): void {
        const missing = Math.max(0, blocks - this.heldBlocks(row)) - this.owed(row);
        if (missing > this.availableBlocks) throw this.full(missing);
        this.pledged[row] = blocks;
    }

    /** blocks of a row */
    heldBlocks(row: number): number {
        let n = 0;
        for (let i = 0; i < this.blocksPerRow; i++) if (this.table[row * this.blocksPerRow + i] >= 0) n++;
        return n;
    }

    /** refuses a row longer than the cache's rows */
    checkFits(positions: number): void {
        if (positions > this.capacity)
            throw new QloraError(`the sequence needs ${positions} positions but the cache holds ${this.capacity}`);
    }

    /**
     * gives row `row` blocks for its first `positions` positions (those it lacks, past the ones dropped behind the
     * window; its pledge first); nothing changes when the pool is short
     */
    reserve(row: number, positions: number): void {
        this.checkFits(positions);
        const need = kvBlocksFor(positions);
        const base = row * this.blocksPerRow;
        let missing = 0;
        for (let i = this.dropped[row]; i < need; i++) if (this.table[base + i] < 0) missing++;
        if (missing > this.availableBlocks + this.owed(row)) throw this.full(missing);
        for (let i = this.dropped[row]; i < need; i++)
            if (this.table[base + i] < 0) this.table[base + i] = this.freeBlocks.pop()!;
    }

    /**
     * rows firstRow .. firstRow + B - 1 took T more positions each; with a window, the blocks no later query can
     * see (every position j <= length - window) go back to the pool
     */
    advance(firstRow: number, B: number, T: number): void {
        for (let b = 0; b < B; b++) {
            const row = firstRow + b;
            this.lengths[row] += T;
            if (this.window === 0) continue;
            // the next query sits at position `length` and sees keys j > length - window
            const behind = Math.floor((this.lengths[row] - this.window + 1) / KV_BLOCK);
            for (let i = this.dropped[row]; i < behind; i++) {
                const at = row * this.blocksPerRow + i;
                if (this.table[at] >= 0) this.freeBlocks.push(this.table[at]);
                this.table[at] = -1;
            }
            this.dropped[row] = Math.max(this.dropped[row], behind);
            // one position at a time from here on (SlotDecoder's rows after their prompt): the pledge shrinks to the
            // blocks a window spans
            const decodePeak = kvPeakBlocks(this.window, 1, this.capacity);
            this.pledged[row] = Math.min(this.pledged[row], Math.max(this.heldBlocks(row), decodePeak));
        }
    }

    /** moves row `from` (its blocks and length) to row `to`, whose blocks are freed; `from` is left empty */
    moveRow(from: number, to: number): void {
        if (from === to) return;
        this.clearRow(to);
        const w = this.blocksPerRow;
        this.table.copyWithin(to * w, from * w, (from + 1) * w);
        this.table.fill(-1, from * w, (from + 1) * w);
        for (const a of [this.lengths, this.dropped, this.pledged]) {
            a[to] = a[from];
            a[from] = 0;
        }
    }

    /**
     * forgets row `row`'s positions from `length` on (it keeps its blocks) and returns `length`; or, when the keys a
     * query at `length` sees were already dropped behind the window, empties the row and returns 0
     */
    truncate(row: number, length: number): number {
        const needed = this.window > 0 ? Math.floor(Math.max(0, length - this.window + 1) / KV_BLOCK) : 0;
        if (this.dropped[row] > needed) {
            this.clearRow(row);
            return 0;
        }
        this.lengths[row] = length;
        return length;
    }

    /** empties a row: its blocks go back to the pool */
    clearRow(row: number): void {
        const w = this.blocksPerRow;
        for (let i = row * w; i < (row + 1) * w; i++)
            if (this.table[i] >= 0) {
                this.freeBlocks.push(this.table[i]);
                this.table[i] = -1;
            }
        this.lengths[row] = 0;
        this.dropped[row] = 0;
        this.pledged[row] = 0;
    }

    /** blocks promised to a row beyond those it holds */
    private owed(row: number): number {
        return Math.max(0, this.pledged[row] - this.heldBlocks(row));
    }

    private full(missing: number): QloraError {
        return new QloraError(
            `the key/value cache is full: a row needs ${missing} more blocks of ${KV_BLOCK} positions and ` +
                `${this.availableBlocks} of ${this.blocks} are free; wait for a running sequence to end, or give the cache more positions`
        );
    }

    /** frees the buffers (device memory); the cache is unusable afterwards */
    release(): void {
        for (const t of [...this.k, ...this.v]) this.free(t);
        this.lengths.fill(0);
    }
}

export interface InferenceOptions<F> {
    /** [B, S] 1 for real tokens, 0 for padding (S = cache length + T with a cache, else T) */
    attentionMask?: Uint8Array;
    /** [B, T] positions; default: past length + 0..T-1 for every row (as transformers does without position_ids) */
    positionIds?: Int32Array;
    /** [B, T] packed-sequence index per token (scoring packed rows; not with a cache) */
    segIds?: Int32Array;
    cache?: KVCache<F>;
    /** the cache row of the first of the B rows (the B rows use cache rows firstRow .. firstRow + B - 1) */
    firstRow?: number;
}

/**
 * Rows longer than the model's context would run at RoPE positions the model never saw and give a finite,
 * meaningless loss: train and eval refuse them alike, naming the length knob that let them through.
 */
export function checkRowsFitContext(cfg: ModelConfig, longestRow: number, knob: string, knobValue: number | null): void {
    if (longestRow <= cfg.maxPositionEmbeddings) return;
    throw new QloraError(
        `${knob} ${knobValue ?? "(no limit)"} lets rows of ${longestRow} tokens through, longer than the ` +
            `model's context (max_position_embeddings ${cfg.maxPositionEmbeddings} in config.json); lower ${knob}`
    );
}

/** the same rule for a batch about to run (any caller of the graph: positions past the context are refused) */
export function checkPositionsFitContext(cfg: ModelConfig, positionIds: Int32Array): void {
    let last = -1;
    for (let i = 0; i < positionIds.length; i++) if (positionIds[i] > last) last = positionIds[i];
    if (last >= cfg.maxPositionEmbeddings)
        throw new QloraError(
            `a batch reaches position ${last}, past the model's context (max_position_embeddings ` +
                `${cfg.maxPositionEmbeddings} in config.json); shorten the rows`
        );
}

/** next-token targets: target[b, t] = labels[b, t + 1], -100 at the last position */
export function shiftTargets(labels: Int32Array, B: number, T: number): Int32Array {
    const targets = new Int32Array(B * T).fill(-100);
    for (let b = 0; b < B; b++)
        for (let t = 0; t + 1 < T; t++) {
            const l = labels[b * T + t + 1];
            targets[b * T + t] = l >= 0 ? l : -100;
        }
    return targets;
}

/** a forward pass that overflowed with weights that passed the NaN/Inf check at load: they are out of range */
function nonFiniteOutput(what: string): QloraError {
    return new QloraError(
        `the model's forward pass overflowed: ${what}. A weight of the model or of the adapter is far out ` +
            "of range (a damaged file, or an adapter from a diverged run); re-download the model, or train or merge the adapter again"
    );
}

/** the batch's index tensors on the backend */
interface StepContext<X extends TensorTypes> {
    B: number;
    T: number;
    N: number;
    pos: X["i"];
    keyValid: X["u8"] | null;
    seg: X["i"] | null;
    /** inference: the cache the block appends its keys and values to (its rows' block tables in `blocks`) */
    cache: KVCache<X["f"]> | null;
    blocks: KvBlocksOf<X["i"]> | null;
    /** with a cache: [B] each row's filled positions before this forward (where its new keys go) */
    pasts: X["i"] | null;
    /** the attention's query offset: 0 without a cache, else each row's own (pasts) */
    past: number | X["i"];
    /** the RoPE table of this forward (longrope: short or long) */
    invFreq: X["f"];
}

/** the host side of an inference step (DecoderGraph.planStep) */
export interface StepPlan<X extends TensorTypes> {
    B: number;
    T: number;
    N: number;
    cache: KVCache<X["f"]> | null;
    firstRow: number;
    /** [B] each row's cache length before the step */
    pasts: Int32Array;
    /** [B*T] positions */
    pos: Int32Array;
    /** [B, S] keys to hide (padding), or null */
    keyValid: Uint8Array | null;
    /** longrope: the step runs on long_factor's table (its largest position reaches the original context) */
    longRope: boolean;
}

/** an inference step's inputs on the backend (forwardStep reads them; the caller owns them) */
export interface StepInputs<X extends TensorTypes> {
    ids: X["i"];
    pos: X["i"];
    /** with a cache: each row's length before the step [B] */
    pasts: X["i"] | null;
    /** with a cache: the rows' block tables [B, blocksPerRow] */
    table: X["i"] | null;
    keyValid: X["u8"] | null;
    seg: X["i"] | null;
}

/**
 * a step's integer inputs in one array, so that one copy puts them on the backend: ids [N] | positions [N], and
 * with a cache | lengths [B] | block tables [B * blocksPerRow]
 */
export function stepIndices<X extends TensorTypes>(ids: Int32Array, plan: StepPlan<X>): Int32Array {
    const {N, B, cache} = plan;
    const w = cache ? cache.blocksPerRow : 0;
    const out = new Int32Array(2 * N + (cache ? B + B * w : 0));
    out.set(ids, 0);
    out.set(plan.pos, N);
    if (cache) {
        out.set(plan.pasts, 2 * N);
        out.set(cache.table.subarray(plan.firstRow * w, (plan.firstRow + B) * w), 2 * N + B);
    }
    return out;
}

/** the inputs of a step over stepIndices' array on the backend (views into it: free the array, not them) */
export function stepInputViews<X extends TensorTypes>(
    be: Backend<X>,
    packed: X["i"],
    plan: StepPlan<X>
): Pick<StepInputs<X>, "ids" | "pos" | "pasts" | "table"> {
    const {N, B, cache} = plan;
    return {
        ids: be.view(packed, 0, N),
        pos: be.view(packed, N, N),
        pasts: cache ? be.view(packed, 2 * N, B) : null,
        table: cache ? be.view(packed, 2 * N + B, B * cache.blocksPerRow) : null
    };
}

/** what a block's backward needs from its forward */
interface BlockActs<F> {
    x: F; // block input [N, C]
    xn1: F; // [N, C]
    rstd1: F; // [N]
    /** qwen3: q and k as projected, before the per-head norm (null without q_norm / k_norm) */
    qRaw: F | null; // [N, Hq*D]
    kRaw: F | null; // [N, Hkv*D]
    rstdQ: F | null; // [N*Hq]
    rstdK: F | null; // [N*Hkv]
    q: F; // [N, Hq*D] after RoPE
    k: F; // [N, Hkv*D] after RoPE
    v: F; // [N, Hkv*D]
    att: F; // [N, Hq*D]
    lse: F; // [B, Hq, T]
    /** gemma3: o_proj's output before its norm (attnOutNorm), and that norm's rstd */
    oRaw: F | null; // [N, C]
    rstdO: F | null; // [N]
    h: F; // [N, C] residual after attention
    xn2: F;
    rstd2: F;
    /** the MLP's activations: null where the MLP ran in chunks, or is left to the backward (see mlpMode) */
    gate: F | null; // [N, I]
    up: F | null; // [N, I]
    act: F | null; // [N, I] silu(gate) * up (gemma3: gelu_tanh(gate) * up)
    /** gemma3: down_proj's output before its norm (mlpOutNorm), and that norm's rstd */
    mRaw: F | null; // [N, C]
    rstdM: F | null; // [N]
    /** the block output; null when the MLP is left to the backward (a recomputation needs no output) */
    out: F | null; // [N, C]
    /** what each projection's forward kept for its backward */
    saved: Map<ProjName, unknown>;
}

const INTERMEDIATE_ACTS = [
    "xn1",
    "rstd1",
    "qRaw",
    "kRaw",
    "rstdQ",
    "rstdK",
    "q",
    "k",
    "v",
    "att",
    "lse",
    "oRaw",
    "rstdO",
    "h",
    "xn2",
    "rstd2",
    "gate",
    "up",
    "act",
    "mRaw",
    "rstdM"
] as const;

/**
 * How a block's forward runs its MLP: "keep" saves gate, up and act for the backward (training without
 * checkpointing); "chunked" computes the output in chunks of rows and keeps nothing (a checkpointed training
 * forward, inference); "backward" skips it (the recomputation under checkpointing: blockBackward recomputes the
 * MLP chunk by chunk beside its gradient)
 */
type MlpMode = "keep" | "chunked" | "backward";

/** elements of one [rows, intermediate] tensor of an MLP chunk: 64 Mi (128 MiB in bf16) */
const MLP_CHUNK_ELEMENTS = 2 ** 26;

/** rows of an MLP chunk for this intermediate size (at least 1024: smaller GEMMs lose speed) */
export function mlpChunkRows(intermediateSize: number): number {
    return Math.max(1024, Math.floor(MLP_CHUNK_ELEMENTS / intermediateSize / 64) * 64);
}

/** [first row, rows] of each chunk of N rows */
function chunksOf(N: number, rows: number): [number, number][] {
    const out: [number, number][] = [];
    for (let r = 0; r < N; r += rows) out.push([r, Math.min(rows, N - r)]);
    return out;
}

/** whether a forward at these positions runs on longrope's long table (transformers: max(position_ids) + 1 > original) */
function usesLongRope(longRope: {fromPosition: number} | null | undefined, positions: Int32Array): boolean {
    if (!longRope) return false;
    let last = -1;
    for (let i = 0; i < positions.length; i++) if (positions[i] > last) last = positions[i];
    return last + 1 > longRope.fromPosition;
}

export class DecoderGraph<X extends TensorTypes> {
    private readonly scale: number;
    /** gemma3: the embedding scale in the activation dtype (transformers casts it to the weights' dtype); 1: none */
    private readonly embedScale: number;
    /** the final logits' soft cap (gemma3), 0: none */
    private readonly softcap: number;
    /** the MLP's gate: silu(gate) * up, or gemma3's gelu_tanh(gate) * up */
    private readonly mlpAct: GatedAct;

    constructor(
        readonly backend: Backend<X>,
        readonly config: ModelConfig,
        readonly weights: GraphWeights<X>,
        private readonly options: GraphOptions<X>
    ) {
        this.scale = config.attentionScale;
        const s = config.embedScale;
        this.embedScale =
            s === null
                ? 1
                : backend.activationDtype === "bfloat16"
                  ? halfToF32(f32ToHalf(Float32Array.of(s), "BF16"), "BF16")[0]
                  : Math.fround(s);
        this.softcap = config.finalLogitSoftcap ?? 0;
        this.mlpAct = gatedActOf(config.hiddenAct);
        if (config.sandwichNorms && !weights.layers.every((l) => l.attnOutNorm && l.mlpOutNorm))
            throw new Error("graph: a gemma3 model needs attnOutNorm and mlpOutNorm on every layer");
        if (config.localRope && !weights.localRope)
            throw new Error("graph: a gemma3 model needs its sliding layers' RoPE (localRope)");
    }

    /** after an optimizer step changed the trainable tensors: the projections refresh what they derive from them */
    afterUpdate(): void {
        for (const layer of this.weights.layers) for (const p of Object.values(layer.proj)) p.afterUpdate();
        const t = this.options.trained,
            w = this.weights;
        if (t?.embed) this.backend.computeCopy(t.embed.param, t.embed.host.param.length, w.embed);
        if (t?.lmHead) this.backend.computeCopy(t.lmHead.param, t.lmHead.host.param.length, w.lmHead);
    }

    /** runs forward (and backward unless noBackward) on one micro-batch; parameter gradients accumulate */
    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult {
        const be = this.backend,
            cfg = this.config,
            w = this.weights;
        const {B, T} = batch;
        const N = B * T,
            C = cfg.hiddenSize,
            V = cfg.vocabSize,
            L = cfg.numHiddenLayers;
        checkPositionsFitContext(cfg, batch.positionIds);
        const train = !opts.noBackward;
        const ids = be.indices(batch.inputIds);
        const ctx = this.context(B, T, batch.positionIds, batch.attentionMask, batch.segIds, null);
        const x0 = this.embed(ids, batch.inputIds, N);

        const checkpoint = opts.gradientCheckpointing && train;
        const offload = checkpoint && !!this.options.offloadActivations;
        const inputs: (X["f"] | HostCopy)[] = [x0];
        const acts: (BlockActs<X["f"]> | null)[] = [];
        let x = x0;
        for (let l = 0; l < L; l++) {
            // an offloaded input's copy to host memory runs beside the block's forward
            const host = offload ? be.offload(x) : null;
            const a = this.blockForward(l, x, ctx, train, train && !checkpoint ? "keep" : "chunked");
            // a block's input is read again only by its backward (or recomputation); the free waits for the copy
            if (!train || host) be.free(x);
            if (host) inputs[l] = host;
            x = a.out!;
            inputs.push(x);
            if (checkpoint || !train) {
                this.releaseActs(a, l);
                acts.push(null);
            } else acts.push(a);
        }
        // final norm, then the loss in chunks of rows
        const xf = be.activation(N * C),
            rstdF = be.stats(N);
        be.rmsnorm(xf, rstdF, x, w.finalNorm, N, C, cfg.rmsNormEps);
        const targets = shiftTargets(batch.labels, B, T);
        const dxf = train ? be.activation(N * C) : null;
        const loss = be.causalLmLoss(
            xf,
            targets,
            w.lmHead,
            N,
            C,
            V,
            opts.lossScale,
            dxf,
            opts.lossChunkRows ?? be.lossChunkRows,
            train ? (this.options.trained?.lmHead?.grad ?? null) : null,
            this.softcap
        );
        be.free(xf);
        if (!train || !dxf) {
            for (const t of [x, rstdF, ids]) be.free(t);
            this.freeContext(ctx);
            return loss;
        }

        // backward
        let dx = be.activation(N * C);
        be.rmsnormBackward(dx, dxf, x, w.finalNorm, rstdF, N, C);
        be.free(dxf);
        be.free(rstdF);
        // offloaded inputs come back one block ahead: the copy runs beside the block before it
        let prefetched = offload ? be.prefetch(inputs[L - 1] as HostCopy) : null;
        for (let l = L - 1; l >= 0; l--) {
            const input = prefetched ? be.restore(prefetched) : (inputs[l] as X["f"]);
            inputs[l] = input;
            prefetched = offload && l > 0 ? be.prefetch(inputs[l - 1] as HostCopy) : null;
            let a = acts[l];
            // recomputed under gradient checkpointing: the dropout masks are a function of the micro-batch, so the
            // recomputation draws the masks of the first forward
            a ??= this.blockForward(l, input, ctx, true, "backward");
            const dPrev = this.blockBackward(l, a, dx, ctx);
            be.free(dx);
            dx = dPrev;
            this.releaseActs(a, l);
            be.free(a.out); // a recomputed block's own output, or inputs[l + 1] itself (freeing twice is harmless)
            be.free(inputs[l + 1] as X["f"]);
            acts[l] = null;
        }
        const dEmbed = this.options.trained?.embed?.grad;
        if (dEmbed) {
            if (this.embedScale !== 1) be.scale(dx, this.embedScale, N * C);
            be.embeddingBackward(dEmbed, dx, ids, N, V, C);
        }
        for (const t of [dx, inputs[0] as X["f"], ids]) be.free(t);
        this.freeContext(ctx);
        return loss;
    }

    /**
     * the loss of a batch, forward only (evaluation of a model as it is); a non-finite loss is refused. The trainer's
     * own evaluation passes call forwardBackward instead: a run that diverged gets the trainer's message.
     */
    score(batch: TrainBatch): LossResult {
        const loss = this.forwardBackward(batch, {lossScale: 0, gradientCheckpointing: false, noBackward: true});
        if (!Number.isFinite(loss.lossSum)) throw nonFiniteOutput(`the loss is ${loss.lossSum}`);
        return loss;
    }

    /**
     * the final hidden states [B*T, C] after the last norm, for ids [B, T]. With a cache, the new keys and values
     * are appended to it and attention covers the cached positions.
     */
    forwardHidden(idsHost: Int32Array, B: number, T: number, opts: InferenceOptions<X["f"]> = {}): X["f"] {
        const step = this.planStep(idsHost, B, T, opts);
        const be = this.backend;
        const packed = be.indices(stepIndices(idsHost, step));
        const inputs: StepInputs<X> = {
            ...stepInputViews(be, packed, step),
            keyValid: step.keyValid ? be.mask(step.keyValid) : null,
            seg: opts.segIds ? be.indices(opts.segIds) : null
        };
        try {
            const xf = this.forwardStep(inputs, step);
            step.cache?.advance(step.firstRow, B, T);
            return xf;
        } finally {
            for (const t of [packed, inputs.keyValid, inputs.seg]) be.free(t);
        }
    }

    /**
     * the host side of an inference step: every check (ids in the vocabulary, cache rows and capacity, the
     * context length), each row's cache length and the positions, and the cache blocks the new positions need
     * (reserved here: a full cache is refused before anything runs). Nothing is queued on the backend.
     */
    planStep(idsHost: Int32Array, B: number, T: number, opts: InferenceOptions<X["f"]> = {}): StepPlan<X> {
        const cfg = this.config;
        const N = B * T;
        const cache = opts.cache ?? null;
        const firstRow = opts.firstRow ?? 0;
        if (idsHost.length !== N) throw new Error(`forward: ids has ${idsHost.length} elements, expected B*T = ${N}`);
        for (let i = 0; i < N; i++)
            if (!(idsHost[i] >= 0 && idsHost[i] < cfg.vocabSize))
                throw new QloraError(
                    `token id ${idsHost[i]} at position ${i} is outside the vocabulary (${cfg.vocabSize} tokens)`
                );
        if (cache && !(Number.isSafeInteger(firstRow) && firstRow >= 0 && firstRow + B <= cache.batch))
            throw new Error(`forward: rows ${firstRow}..${firstRow + B - 1} of a cache of ${cache.batch} rows`);
        const pasts = cache ? cache.lengths.slice(firstRow, firstRow + B) : new Int32Array(B);
        const longest = pasts.reduce((m, x) => Math.max(m, x), 0);
        const uniform = pasts.every((x) => x === longest);
        // rows at different lengths decode one token each, each row's queries at its own offset
        if (!uniform && (T !== 1 || opts.attentionMask || opts.positionIds))
            throw new Error("forward: cache rows at different lengths take one token each, without a mask or positions");
        const S = cache ? cache.capacity : T;
        cache?.checkFits(longest + T);
        if (longest + T > cfg.maxPositionEmbeddings)
            throw new QloraError(
                `the sequence has ${longest + T} tokens but the model's context length ` +
                    `(max_position_embeddings) is ${cfg.maxPositionEmbeddings}`
            );
        const pos = opts.positionIds ?? new Int32Array(N).map((_, i) => pasts[Math.floor(i / T)] + (i % T));
        let keyValid: Uint8Array | null = null;
        if (opts.attentionMask) {
            const sMask = longest + T;
            if (opts.attentionMask.length !== B * sMask)
                throw new Error(`forward: attentionMask has ${opts.attentionMask.length} elements, expected ${B * sMask}`);
            // with a cache, keys beyond past + t are hidden by causality, so the mask can span the whole capacity
            const full = new Uint8Array(B * S);
            for (let b = 0; b < B; b++) full.set(opts.attentionMask.subarray(b * sMask, (b + 1) * sMask), b * S);
            // an all-ones mask hides nothing: the kernels skip the test
            if (!opts.attentionMask.every((v) => v === 1)) keyValid = full;
        }
        if (opts.segIds && (cache || opts.segIds.length !== N))
            throw new Error(`forward: segIds needs ${N} elements and no cache`);
        if (cache) for (let b = 0; b < B; b++) cache.reserve(firstRow + b, pasts[b] + T);
        return {B, T, N, cache, firstRow, pasts, pos, keyValid, longRope: usesLongRope(this.weights.longRope, pos)};
    }

    /**
     * the device side of an inference step: the final hidden states [N, C] from the step's inputs on the backend.
     * It only queues work (no copy back, no allocation that outlives it but the result), so that a decoding step
     * can be recorded once and replayed (CudaModel's CUDA graphs). The cache's lengths are left to the caller.
     */
    forwardStep(inputs: StepInputs<X>, step: StepPlan<X>): X["f"] {
        const be = this.backend,
            cfg = this.config;
        const {B, T, N, cache} = step;
        const C = cfg.hiddenSize;
        const ctx: StepContext<X> = {
            B,
            T,
            N,
            pos: inputs.pos,
            keyValid: inputs.keyValid,
            seg: inputs.seg,
            cache,
            blocks: cache && inputs.table ? {table: inputs.table, stride: cache.blocksPerRow, block: KV_BLOCK} : null,
            pasts: inputs.pasts,
            past: inputs.pasts ?? 0,
            invFreq: this.ropeTable(step.longRope)
        };
        let x = be.activation(N * C);
        be.embedding(x, inputs.ids, this.weights.embed, N, cfg.vocabSize, C, false);
        if (this.embedScale !== 1) be.scale(x, this.embedScale, N * C);
        for (let l = 0; l < cfg.numHiddenLayers; l++) {
            const a = this.blockForward(l, x, ctx, false, "chunked");
            this.releaseActs(a, l);
            be.free(x);
            x = a.out!;
        }
        const xf = be.activation(N * C);
        be.rmsnorm(xf, null, x, this.weights.finalNorm, N, C, cfg.rmsNormEps);
        be.free(x);
        return xf;
    }

    /**
     * logits [rows, V] (fp32, host) of final hidden states; all B*T rows unless `rows` is given. Non-finite logits are
     * refused: finite weights far out of range (a damaged file holds 3e38 as easily as 0.01) overflow on the way
     */
    logits(hidden: X["f"], rows: number[] | null, totalRows: number): Float32Array {
        const out = this.backend.logits(
            hidden,
            rows,
            this.weights.lmHead,
            totalRows,
            this.config.hiddenSize,
            this.config.vocabSize,
            this.softcap
        );
        const bad = countNonFinite(out);
        if (bad.nan + bad.inf > 0) throw nonFiniteOutput(`${bad.nan + bad.inf} of ${out.length} logits are NaN or infinite`);
        return out;
    }

    /** decoding: the next token of each of those rows, chosen where the logits are (not copied out); non-finite refused */
    pickTokens(hidden: X["f"], rows: number[] | null, totalRows: number, picks: readonly TokenPick[] | null): Int32Array {
        const r = this.backend.pickTokens(
            hidden,
            rows,
            this.weights.lmHead,
            totalRows,
            this.config.hiddenSize,
            this.config.vocabSize,
            picks,
            this.softcap
        );
        if (r.nonFinite > 0) throw nonFiniteOutput(`${r.nonFinite} logits are NaN or infinite`);
        return r.ids;
    }

    private embed(ids: X["i"], idsHost: Int32Array, N: number): X["f"] {
        const cfg = this.config;
        const x = this.backend.activation(N * cfg.hiddenSize);
        const bad = this.backend.embedding(x, ids, this.weights.embed, N, cfg.vocabSize, cfg.hiddenSize);
        if (bad >= 0) {
            this.backend.free(x);
            throw new QloraError(
                `token id ${idsHost[bad]} at position ${bad} is outside the vocabulary (${cfg.vocabSize} tokens)`
            );
        }
        if (this.embedScale !== 1) this.backend.scale(x, this.embedScale, N * cfg.hiddenSize);
        return x;
    }

    private context(
        B: number,
        T: number,
        pos: Int32Array,
        keyValid: Uint8Array | null,
        seg: Int32Array | null,
        cache: KVCache<X["f"]> | null
    ): StepContext<X> {
        const be = this.backend;
        // an all-ones mask hides nothing: the kernels skip the test
        const hides = keyValid !== null && !keyValid.every((v) => v === 1);
        return {
            B,
            T,
            N: B * T,
            pos: be.indices(pos),
            keyValid: hides ? be.mask(keyValid!) : null,
            seg: seg ? be.indices(seg) : null,
            cache,
            blocks: null,
            pasts: null,
            past: 0,
            invFreq: this.ropeTable(usesLongRope(this.weights.longRope, pos))
        };
    }

    /** the RoPE inverse frequencies of a forward: longrope's long table or the usual one */
    private ropeTable(long: boolean): X["f"] {
        return long && this.weights.longRope ? this.weights.longRope.invFreq : this.weights.invFreq;
    }

    /** layer l's RoPE: the forward's table, or gemma3's local one on a sliding layer */
    private ropeOf(l: number, ctx: StepContext<X>): {invFreq: X["f"]; scaling: number} {
        const local = this.weights.localRope;
        if (local && this.config.layerTypes[l] === "sliding_attention")
            return {invFreq: local.invFreq, scaling: local.attentionScaling};
        return {invFreq: ctx.invFreq, scaling: this.options.attentionScaling};
    }

    private freeContext(ctx: StepContext<X>): void {
        for (const t of [ctx.pos, ctx.keyValid, ctx.seg]) this.backend.free(t);
    }

    /** frees a block's saved activations except its input and output (the neighbours' tensors) */
    private releaseActs(a: BlockActs<X["f"]>, l: number): void {
        for (const key of INTERMEDIATE_ACTS) this.backend.free(a[key]);
        const proj = this.weights.layers[l].proj;
        for (const [name, saved] of a.saved) proj[name].release(saved);
        a.saved.clear();
    }

    private blockForward(l: number, x: X["f"], ctx: StepContext<X>, train: boolean, mode: MlpMode): BlockActs<X["f"]> {
        const be = this.backend,
            cfg = this.config,
            layer = this.weights.layers[l],
            p = layer.proj;
        const {B, T, N} = ctx;
        const C = cfg.hiddenSize,
            Hq = cfg.numAttentionHeads,
            Hkv = cfg.numKeyValueHeads,
            D = cfg.headDim;
        const I = cfg.intermediateSize,
            eps = cfg.rmsNormEps;
        const act = (n: number) => be.activation(n);
        const qkNorm = layer.qNorm !== undefined && layer.kNorm !== undefined;
        const sandwich = cfg.sandwichNorms;
        // gemma3: the MLP's output norm needs the MLP's output in the backward, so a recomputation runs it too
        const mlp: MlpMode = sandwich && mode === "backward" ? "chunked" : mode;
        const a: BlockActs<X["f"]> = {
            x,
            xn1: act(N * C),
            rstd1: be.stats(N),
            qRaw: qkNorm ? act(N * Hq * D) : null,
            kRaw: qkNorm ? act(N * Hkv * D) : null,
            rstdQ: qkNorm ? be.stats(N * Hq) : null,
            rstdK: qkNorm ? be.stats(N * Hkv) : null,
            q: act(N * Hq * D),
            k: act(N * Hkv * D),
            v: act(N * Hkv * D),
            att: act(N * Hq * D),
            lse: be.stats(B * Hq * T),
            oRaw: sandwich ? act(N * C) : null,
            rstdO: sandwich ? be.stats(N) : null,
            h: act(N * C),
            xn2: act(N * C),
            rstd2: be.stats(N),
            gate: mlp === "keep" ? act(N * I) : null,
            up: mlp === "keep" ? act(N * I) : null,
            act: mlp === "keep" ? act(N * I) : null,
            mRaw: sandwich ? act(N * C) : null,
            rstdM: sandwich ? be.stats(N) : null,
            out: mlp === "backward" ? null : act(N * C),
            saved: new Map()
        };
        const project = (name: ProjName, y: X["f"], input: X["f"]) => {
            const saved = p[name].forward(y, input, N, train);
            if (saved !== null && saved !== undefined) a.saved.set(name, saved);
        };
        // inference: the projections of one input together (fused launches where the backend has them)
        const projectShared = (names: ProjName[], ys: X["f"][], input: X["f"]) => {
            const [first, ...rest] = names.map((n) => p[n]);
            if (!train && first.forwardShared?.(rest, ys, input, N)) return;
            names.forEach((n, i) => project(n, ys[i], input));
        };
        // a chunk of the MLP's rows: nothing is kept for a backward (each projection's state is freed at once)
        const projectRows = (names: ProjName[], ys: X["f"][], input: X["f"], M: number, first: number) => {
            const [head, ...rest] = names.map((n) => p[n]);
            if (!train && rest.length > 0 && head.forwardShared?.(rest, ys, input, M)) return;
            names.forEach((n, i) => p[n].release(p[n].forward(ys[i], input, M, train, first)));
        };
        be.rmsnorm(a.xn1, a.rstd1, x, layer.inputNorm, N, C, eps);
        const qOut = a.qRaw ?? a.q,
            kOut = a.kRaw ?? a.k;
        if (cfg.fusedProjections) {
            // phi3: one product for q, k and v, then each part into its own buffer
            const W = (Hq + 2 * Hkv) * D;
            const qkv = act(N * W);
            project("qkv_proj", qkv, a.xn1);
            be.copyColumns(qOut, Hq * D, 0, qkv, W, 0, N, Hq * D);
            be.copyColumns(kOut, Hkv * D, 0, qkv, W, Hq * D, N, Hkv * D);
            be.copyColumns(a.v, Hkv * D, 0, qkv, W, (Hq + Hkv) * D, N, Hkv * D);
            be.free(qkv);
        } else projectShared(["q_proj", "k_proj", "v_proj"], [qOut, kOut, a.v], a.xn1);
        if (a.qRaw && a.kRaw) {
            // qwen3: each head of q and k is a row of head_dim values for the RMSNorm
            be.rmsnorm(a.q, a.rstdQ, a.qRaw, layer.qNorm!, N * Hq, D, eps);
            be.rmsnorm(a.k, a.rstdK, a.kRaw, layer.kNorm!, N * Hkv, D, eps);
        }
        const {invFreq, scaling: attentionScaling} = this.ropeOf(l, ctx),
            R = cfg.rotaryDim;
        let keys = a.k,
            values = a.v,
            S = T;
        const cache = ctx.cache;
        if (cache && ctx.pasts && ctx.blocks) {
            S = cache.capacity;
            keys = cache.k[l];
            values = cache.v[l];
            // RoPE of q and k and the cache write of k and v: one launch per layer where the backend fuses them
            be.ropeCacheWrite(
                a.q,
                a.k,
                a.v,
                ctx.pos,
                invFreq,
                attentionScaling,
                B,
                T,
                Hq,
                Hkv,
                D,
                keys,
                values,
                S,
                ctx.pasts,
                ctx.blocks,
                R
            );
        } else {
            be.rope(a.q, ctx.pos, invFreq, attentionScaling, N, Hq, D, R);
            be.rope(a.k, ctx.pos, invFreq, attentionScaling, N, Hkv, D, R);
        }
        be.attention(
            a.att,
            train ? a.lse : null,
            a.q,
            keys,
            values,
            ctx.keyValid,
            ctx.seg,
            B,
            T,
            S,
            Hq,
            Hkv,
            D,
            ctx.past,
            this.scale,
            ctx.blocks,
            attentionWindow(cfg, l)
        );
        if (a.oRaw) {
            // gemma3: the attention's output normalized before the residual add
            project("o_proj", a.oRaw, a.att);
            be.rmsnorm(a.h, a.rstdO, a.oRaw, layer.attnOutNorm!, N, C, eps);
        } else project("o_proj", a.h, a.att);
        be.residualRmsnorm(a.h, a.xn2, a.rstd2, x, a.h, layer.postNorm, N, C, eps);
        // the MLP writes its output here: the block output, or gemma3's raw output for its norm
        const mlpOut = a.mRaw ?? a.out;
        if (mlp === "keep") {
            this.gateUp(a.gate!, a.up!, a.xn2, N, projectShared);
            be.gatedAct(a.act!, a.gate!, a.up!, N * I, this.mlpAct);
            project("down_proj", mlpOut!, a.act!);
        } else if (mlp === "chunked")
            for (const [r0, m] of chunksOf(N, this.options.mlpChunkRows ?? mlpChunkRows(I))) {
                const rows = (t: X["f"], width: number) => (m === N ? t : be.view(t, r0 * width, m * width));
                const gate = act(m * I),
                    up = act(m * I);
                this.gateUp(gate, up, rows(a.xn2, C), m, (names, ys, input) => projectRows(names, ys, input, m, r0));
                const h = act(m * I);
                be.gatedAct(h, gate, up, m * I, this.mlpAct);
                be.free(gate);
                be.free(up);
                projectRows(["down_proj"], [rows(mlpOut!, C)], h, m, r0);
                be.free(h);
            }
        if (a.out && a.mRaw) be.rmsnorm(a.out, a.rstdM, a.mRaw, layer.mlpOutNorm!, N, C, eps);
        if (a.out) be.addInplace(a.out, a.h, N * C);
        return a;
    }

    /**
     * gate and up [M, I] of M rows of the MLP's input xn, the products by `project` (phi3: one gate_up_proj, whose
     * rows are [gate; up] as Phi3MLP chunks its output, split into the two buffers)
     */
    private gateUp(
        gate: X["f"],
        up: X["f"],
        xn: X["f"],
        M: number,
        project: (names: ProjName[], ys: X["f"][], input: X["f"]) => void
    ): void {
        const be = this.backend,
            I = this.config.intermediateSize;
        if (!this.config.fusedProjections) {
            project(["gate_proj", "up_proj"], [gate, up], xn);
            return;
        }
        const both = be.activation(M * 2 * I);
        project(["gate_up_proj"], [both], xn);
        be.copyColumns(gate, I, 0, both, 2 * I, 0, M, I);
        be.copyColumns(up, I, 0, both, 2 * I, I, M, I);
        be.free(both);
    }

    /**
     * d(xn) of the MLP's input from d(out), the MLP recomputed chunk by chunk beside its gradient (gradient
     * checkpointing): per chunk gate, up and act again, down's own backward state without its product, then the
     * chunk's gradients; parameter gradients accumulate over the chunks
     */
    private mlpBackwardChunked(l: number, xn2: X["f"], dout: X["f"], N: number): X["f"] {
        const be = this.backend,
            p = this.weights.layers[l].proj,
            C = this.config.hiddenSize,
            I = this.config.intermediateSize;
        const act = (n: number) => be.activation(n);
        const dxn = act(N * C);
        for (const [r0, m] of chunksOf(N, this.options.mlpChunkRows ?? mlpChunkRows(I))) {
            const rows = (t: X["f"], width: number) => (m === N ? t : be.view(t, r0 * width, m * width));
            const xn = rows(xn2, C);
            const saved = new Map<ProjName, unknown>();
            const gate = act(m * I),
                up = act(m * I);
            this.gateUp(gate, up, xn, m, (names, ys, input) =>
                names.forEach((n, i) => saved.set(n, p[n].forward(ys[i], input, m, true, r0)))
            );
            const h = act(m * I);
            be.gatedAct(h, gate, up, m * I, this.mlpAct);
            const downSaved = p.down_proj.saveForBackward(h, m, r0);
            const dh = act(m * I);
            p.down_proj.backward(dh, rows(dout, C), h, downSaved, m, false, r0);
            p.down_proj.release(downSaved);
            be.free(h);
            const dgate = act(m * I),
                dup = act(m * I);
            be.gatedActBackward(dgate, dup, dh, gate, up, m * I, this.mlpAct);
            be.free(dh);
            be.free(gate);
            be.free(up);
            this.gateUpBackward(rows(dxn, C), dgate, dup, xn, m, (name, dx, dy, x, accumulate) =>
                p[name].backward(dx, dy, x, saved.get(name) ?? null, m, accumulate, r0)
            );
            for (const [name, s] of saved) p[name].release(s);
        }
        return dxn;
    }

    /** dxn (=) from d(gate) and d(up) (phi3: joined into d(gate_up) first); frees dgate and dup */
    private gateUpBackward(
        dxn: X["f"],
        dgate: X["f"],
        dup: X["f"],
        xn: X["f"],
        M: number,
        back: (name: ProjName, dx: X["f"], dy: X["f"], x: X["f"], accumulate: boolean) => void
    ): void {
        const be = this.backend,
            I = this.config.intermediateSize;
        if (this.config.fusedProjections) {
            const both = be.activation(M * 2 * I);
            be.copyColumns(both, 2 * I, 0, dgate, I, 0, M, I);
            be.copyColumns(both, 2 * I, I, dup, I, 0, M, I);
            back("gate_up_proj", dxn, both, xn, false);
            be.free(both);
        } else {
            back("gate_proj", dxn, dgate, xn, false);
            back("up_proj", dxn, dup, xn, true);
        }
        be.free(dgate);
        be.free(dup);
    }

    /** returns d(block input) from d(block output) */
    private blockBackward(l: number, a: BlockActs<X["f"]>, dout: X["f"], ctx: StepContext<X>): X["f"] {
        const be = this.backend,
            cfg = this.config,
            layer = this.weights.layers[l],
            p = layer.proj;
        const {B, T, N} = ctx;
        const C = cfg.hiddenSize,
            Hq = cfg.numAttentionHeads,
            Hkv = cfg.numKeyValueHeads,
            D = cfg.headDim;
        const I = cfg.intermediateSize;
        const act = (n: number) => be.activation(n);
        const back = (name: ProjName, dx: X["f"], dy: X["f"], x: X["f"], accumulate: boolean) =>
            p[name].backward(dx, dy, x, a.saved.get(name) ?? null, N, accumulate);
        // MLP: out = h + down(silu(gate(xn2)) * up(xn2)) (gemma3: h + norm(down(gelu_tanh(gate(xn2)) * up(xn2))))
        let dmlp = dout;
        if (a.mRaw) {
            dmlp = act(N * C);
            be.rmsnormBackward(dmlp, dout, a.mRaw, layer.mlpOutNorm!, a.rstdM!, N, C);
        }
        let dxn: X["f"];
        if (a.gate && a.up && a.act) {
            const dact = act(N * I);
            back("down_proj", dact, dmlp, a.act, false);
            const dgate = act(N * I),
                dup = act(N * I);
            be.gatedActBackward(dgate, dup, dact, a.gate, a.up, N * I, this.mlpAct);
            be.free(dact);
            dxn = act(N * C);
            this.gateUpBackward(dxn, dgate, dup, a.xn2, N, (name, dx, dy, x, accumulate) => back(name, dx, dy, x, accumulate));
        } else dxn = this.mlpBackwardChunked(l, a.xn2, dmlp, N);
        if (dmlp !== dout) be.free(dmlp);
        const dh = act(N * C);
        be.rmsnormBackward(dh, dxn, a.h, layer.postNorm, a.rstd2, N, C);
        be.addInplace(dh, dout, N * C); // the residual stream
        // attention: h = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))) (gemma3: x + norm(o(...)))
        const datt = act(N * Hq * D);
        if (a.oRaw) {
            const doRaw = act(N * C);
            be.rmsnormBackward(doRaw, dh, a.oRaw, layer.attnOutNorm!, a.rstdO!, N, C);
            back("o_proj", datt, doRaw, a.att, false);
            be.free(doRaw);
        } else back("o_proj", datt, dh, a.att, false);
        const dq = act(N * Hq * D),
            dk = act(N * Hkv * D),
            dv = act(N * Hkv * D);
        be.attentionBackward(
            dq,
            dk,
            dv,
            datt,
            a.q,
            a.k,
            a.v,
            a.att,
            a.lse,
            ctx.keyValid,
            ctx.seg,
            B,
            T,
            Hq,
            Hkv,
            D,
            this.scale,
            attentionWindow(cfg, l)
        );
        be.free(datt);
        const R = cfg.rotaryDim,
            rope = this.ropeOf(l, ctx);
        be.ropeBackward(dq, ctx.pos, rope.invFreq, rope.scaling, N, Hq, D, R);
        be.ropeBackward(dk, ctx.pos, rope.invFreq, rope.scaling, N, Hkv, D, R);
        // qwen3, gemma3: back through the per-head norms (their weights are frozen)
        let dqRaw = dq,
            dkRaw = dk;
        if (a.qRaw && a.kRaw) {
            dqRaw = act(N * Hq * D);
            dkRaw = act(N * Hkv * D);
            be.rmsnormBackward(dqRaw, dq, a.qRaw, layer.qNorm!, a.rstdQ!, N * Hq, D);
            be.rmsnormBackward(dkRaw, dk, a.kRaw, layer.kNorm!, a.rstdK!, N * Hkv, D);
            be.free(dq);
            be.free(dk);
        }
        if (cfg.fusedProjections) {
            const W = (Hq + 2 * Hkv) * D;
            const dqkv = act(N * W);
            be.copyColumns(dqkv, W, 0, dqRaw, Hq * D, 0, N, Hq * D);
            be.copyColumns(dqkv, W, Hq * D, dkRaw, Hkv * D, 0, N, Hkv * D);
            be.copyColumns(dqkv, W, (Hq + Hkv) * D, dv, Hkv * D, 0, N, Hkv * D);
            back("qkv_proj", dxn, dqkv, a.xn1, false);
            be.free(dqkv);
        } else {
            back("q_proj", dxn, dqRaw, a.xn1, false);
            back("k_proj", dxn, dkRaw, a.xn1, true);
            back("v_proj", dxn, dv, a.xn1, true);
        }
        for (const t of [dqRaw, dkRaw, dv]) be.free(t);
        const dx = act(N * C);
        be.rmsnormBackward(dx, dxn, a.x, layer.inputNorm, a.rstd1, N, C);
        be.addInplace(dx, dh, N * C);
        be.free(dxn);
        be.free(dh);
        return dx;
    }
}
