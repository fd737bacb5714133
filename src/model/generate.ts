// generate.ts: autoregressive decoding with a KV cache: greedy, or sampled with repetition penalty, temperature,
// top-k and top-p applied in that order (as transformers' logits processors and warpers are), from a seeded
// generator. The token is chosen where the logits are (src/backend/sampling.ts; on the GPU only ids come back).
import {QloraError} from "../errors.js";
import {Rng} from "../backend/rng.js";
import type {TokenPick} from "../backend/sampling.js";
import {truncateCacheRow, type CausalLm, type LmCache, type LmForwardOptions} from "./causal-lm.js";
import {cacheWindow, kvPeakBlocks} from "./graph.js";
import {longropeOriginalContext} from "./rope.js";

export interface SamplingOptions {
    /** greedy decoding (argmax); otherwise sampling */
    greedy: boolean;
    temperature: number;
    /** keep the k most likely tokens (0: off) */
    topK: number;
    /** keep the smallest set whose probability reaches p (1: off) */
    topP: number;
    /** transformers' repetition_penalty: the logits of the prompt's and the generated tokens / it (1: off) */
    repetitionPenalty: number;
    seed: number;
}

export interface GenerateOptions extends Partial<SamplingOptions> {
    maxNewTokens: number;
    /** stop after producing one of these ids (it is included in the output) */
    eosTokenIds?: number[];
    /** called with each new token as soon as it is chosen */
    onToken?: (id: number) => void;
}

export interface GenerateResult {
    /** the prompt followed by the new tokens */
    outputIds: number[];
    newIds: number[];
    /** cancelled: the caller stopped the row (a server client that went away) */
    stopReason: "eos" | "max_new_tokens" | "context" | "cancelled";
}

export const DEFAULT_SAMPLING: SamplingOptions = {
    greedy: false,
    temperature: 0.7,
    topK: 50,
    topP: 0.9,
    repetitionPenalty: 1,
    seed: 0
};

/** decodes on the model's device (CPU or GPU: any CausalLm), choosing each token there */
export function generate(model: CausalLm, promptIds: number[], opts: GenerateOptions): GenerateResult {
    const steps = decodeSteps(model, promptIds, opts);
    for (;;) {
        const next = steps.next();
        if (next.done) return next.value;
        opts.onToken?.(next.value);
    }
}

/**
 * Several prompts at once: one forward per step for the whole batch (prompts padded on the left, padding masked,
 * each row at its own positions), each row sampled from its own generator seeded as generate() seeds one, so a
 * row's tokens are those generate() gives for its prompt alone (up to the batch's float summation order). A row
 * that ends keeps its slot, masked, until every row is done.
 */
export function generateBatch(model: CausalLm, prompts: number[][], opts: Omit<GenerateOptions, "onToken">): GenerateResult[] {
    const steps = decodeBatchSteps(model, prompts, opts);
    for (;;) {
        const next = steps.next();
        if (next.done) return next.value;
    }
}

/**
 * The decode loop of one prompt, one new token per step (the ids are yielded, the result returned): generate()
 * runs it to the end; the server awaits between steps so other requests and slow clients are served meanwhile,
 * and stops it with return() when its client goes away (the KV cache is released either way).
 */
export function* decodeSteps(model: CausalLm, promptIds: number[], opts: GenerateOptions): Generator<number, GenerateResult> {
    const steps = decodeBatchSteps(model, [promptIds], opts);
    try {
        for (;;) {
            const next = steps.next();
            if (next.done) return next.value[0];
            yield next.value[0] as number;
        }
    } finally {
        steps.return([]);
    }
}

/** what may differ between the rows of one batch (the server batches requests with their own settings) */
export interface RowOptions extends Partial<SamplingOptions> {
    maxNewTokens?: number;
}

export interface BatchDecodeOptions extends Omit<GenerateOptions, "onToken"> {
    /** per row, over the shared options */
    rows?: RowOptions[];
    /** a row whose caller went away: it stops (stop reason "cancelled") and its slot is masked from then on */
    cancelled?: (row: number) => boolean;
}

function checkPrompt(prompt: number[], context: number): void {
    if (prompt.length === 0) throw new QloraError("the prompt is empty: there is nothing to continue from");
    if (prompt.length > context)
        throw new QloraError(
            `the prompt has ${prompt.length} tokens but the model's context length ` +
                `(max_position_embeddings in config.json) is ${context}; shorten the prompt`
        );
}

/** checks one row's sampling settings and length */
function checkRow(s: SamplingOptions, maxNewTokens: number): void {
    if (!s.greedy && !(s.temperature > 0))
        throw new QloraError(`temperature must be > 0 for sampling (got ${s.temperature}); use --greedy for argmax decoding`);
    if (!(s.topP > 0 && s.topP <= 1)) throw new QloraError(`top_p must be in (0, 1] (got ${s.topP})`);
    if (!(Number.isSafeInteger(s.topK) && s.topK >= 0))
        throw new QloraError(`top_k must be a non-negative integer (0: off) (got ${s.topK})`);
    if (!(s.repetitionPenalty > 0 && Number.isFinite(s.repetitionPenalty)))
        throw new QloraError(`repetition_penalty must be > 0 (1: off) (got ${s.repetitionPenalty})`);
    if (!Number.isSafeInteger(maxNewTokens) || maxNewTokens < 0)
        throw new QloraError(`max_new_tokens must be a non-negative integer (got ${maxNewTokens})`);
}

/**
 * A batch of prompts decoded together (THE batch decode loop: generate, generateBatch, eval and the server's
 * batches run it): yields each step's new token per row (null for rows already done) and returns each row's
 * result. The options are checked on the first step. Rows run in a SlotDecoder, so a row that ends frees its
 * place at once.
 */
export function* decodeBatchSteps(
    model: CausalLm,
    prompts: number[][],
    opts: BatchDecodeOptions
): Generator<(number | null)[], GenerateResult[]> {
    const shared = {...DEFAULT_SAMPLING, ...stripUndefined(opts)};
    const rows = prompts.map((_, b) => {
        const own = stripUndefined(opts.rows?.[b] ?? {});
        const maxNewTokens = own.maxNewTokens ?? opts.maxNewTokens;
        checkRow({...shared, ...own}, maxNewTokens);
        return {...shared, ...own, maxNewTokens};
    });
    checkRow(shared, opts.maxNewTokens);
    if (prompts.length === 0) throw new QloraError("no prompt to continue");
    const context = model.config.maxPositionEmbeddings;
    // every prompt is checked before the first one is prefilled
    for (const p of prompts) checkPrompt(p, context);
    const longest = rows.reduce((m, r) => Math.max(m, r.maxNewTokens), 0);
    const L = prompts.reduce((m, p) => Math.max(m, p.length), 0);
    const capacity = Math.min(context, L + longest);
    // with sliding-window layers only, the pool holds what the rows hold at once (blocks behind the windows go
    // back as they run), so a long generation keeps bounded memory
    const window = cacheWindow(model.config);
    const blocks = window > 0 ? prompts.length * kvPeakBlocks(window, L, capacity) : undefined;
    const decoder = new SlotDecoder(model, prompts.length, capacity, opts.eosTokenIds, blocks);
    try {
        const handles = prompts.map((p, b) => decoder.join(p, rows[b]));
        if (handles.some((h) => h.result.newIds.length > 0)) yield handles.map((h) => h.result.newIds[0] ?? null);
        while (decoder.active > 0) {
            // rows whose caller went away stop before the step
            handles.forEach((h, b) => {
                if (!h.done && opts.cancelled?.(b)) decoder.leave(h, "cancelled");
            });
            if (decoder.active === 0) break;
            const step = decoder.step();
            yield handles.map((h) => step.get(h) ?? null);
        }
        return handles.map((h) => h.result);
    } finally {
        decoder.release();
    }
}

/** a row of a SlotDecoder: its settings and what it produced so far */
export interface DecodeRow {
    readonly result: GenerateResult;
    /** ended: eos, its token limit, the context, or left */
    readonly done: boolean;
}

interface ActiveRow extends DecodeRow {
    result: GenerateResult;
    done: boolean;
    sampling: SamplingOptions;
    maxNew: number;
    rng: Rng;
    /** the distinct tokens of the prompt and the output, while a repetition penalty applies */
    seen: Set<number> | null;
}

/**
 * Continuous batching: rows decoded together in one KV cache of `slots` rows, each at its own length. A row joins
 * at any time (its prompt is prefilled into a free cache row and its first token chosen), every step() gives each
 * active row its next token in one forward pass, and a row that ends (eos, its limit, the context, or leave())
 * frees its cache row at once: the last row moves into its place, so the active rows stay rows 0..active-1.
 * Each row samples from its own generator seeded as generate() seeds one, so its tokens are those of the prompt
 * alone, whatever joins or leaves around it (up to the float summation order of the batch).
 */
export class SlotDecoder {
    private readonly cache: LmCache;
    /** rows[i] occupies cache row i */
    private readonly rows: ActiveRow[] = [];
    private readonly eos: Set<number>;
    /** longrope: the cache length from which a row's step runs its whole sequence again (refill), else null */
    private readonly refillAt: number | null;

    constructor(
        readonly model: CausalLm,
        readonly slots: number,
        /** positions per row: the longest prompt plus new tokens a row may reach */
        readonly capacity: number,
        eosTokenIds?: number[],
        /**
         * blocks of KV_BLOCK positions in the cache, shared by the rows (default: every row at full capacity).
         * Fewer let more rows run when most are short: a row reserves what its prompt and new tokens need
         */
        blocks?: number
    ) {
        if (!(Number.isSafeInteger(slots) && slots >= 1)) throw new Error(`SlotDecoder: slots must be >= 1 (got ${slots})`);
        this.cache = model.newCache(slots, capacity, blocks);
        this.eos = new Set(eosTokenIds ?? model.config.eosTokenIds);
        // without original_max_position_embeddings transformers never switches (it compares with the context)
        this.refillAt = longropeOriginalContext(model.config) ?? null;
    }

    get active(): number {
        return this.rows.length;
    }

    get free(): number {
        return this.slots - this.rows.length;
    }

    /** positions a row of this prompt and this many new tokens reserves (its whole run, so it never waits mid-way) */
    private positionsFor(promptLength: number, maxNewTokens: number): number {
        return Math.min(this.capacity, promptLength + maxNewTokens);
    }

    /** whether a row of this prompt and new tokens can join now: a free row and the cache blocks it will hold at once */
    canJoin(promptLength: number, maxNewTokens: number): boolean {
        return (
            this.free > 0 &&
            this.cache.availableBlocks >= this.cache.peakBlocks(promptLength, this.positionsFor(promptLength, maxNewTokens))
        );
    }

    /**
     * starts a row: prefills its prompt in a free cache row and chooses its first token (in result.newIds). A row
     * asked for no token, or whose first token ends it, is done at once and takes no place.
     */
    join(prompt: number[], options: RowOptions & {maxNewTokens: number}): DecodeRow {
        const sampling: SamplingOptions = {...DEFAULT_SAMPLING, ...stripUndefined(options)};
        checkRow(sampling, options.maxNewTokens);
        checkPrompt(prompt, this.model.config.maxPositionEmbeddings);
        if (prompt.length > this.capacity)
            throw new QloraError(`the prompt has ${prompt.length} tokens but a row holds ${this.capacity} positions`);
        const row: ActiveRow = {
            result: {outputIds: [...prompt], newIds: [], stopReason: "max_new_tokens"},
            done: false,
            sampling,
            maxNew: options.maxNewTokens,
            rng: new Rng(sampling.seed),
            seen: sampling.repetitionPenalty !== 1 ? new Set(prompt) : null
        };
        if (row.maxNew === 0) {
            row.done = true;
            return row;
        }
        if (this.free === 0) throw new Error("SlotDecoder.join: no free row");
        const at = this.rows.length;
        // the blocks of its whole run promised (a QloraError naming the free blocks when the cache is short): all its
        // positions', or with a sliding window those it holds at once (blocks behind the window go back as it runs)
        this.cache.pledge(at, this.cache.peakBlocks(prompt.length, this.positionsFor(prompt.length, row.maxNew)));
        let id: number;
        try {
            [id] = this.next([row], Int32Array.from(prompt), 1, prompt.length, {
                cache: this.cache,
                firstRow: at,
                logitRows: [prompt.length - 1]
            });
        } catch (err) {
            this.cache.clearRow(at);
            throw err;
        }
        this.rows.push(row);
        if (this.accept(row, id)) this.remove([at]);
        return row;
    }

    /** one token for every active row, in one forward pass: the new token of each row that took one */
    step(): Map<DecodeRow, number> {
        const out = new Map<DecodeRow, number>();
        // a row whose cache row is full cannot take its last token in: it has reached the context
        const full = this.rows.flatMap((_, i) => (this.cache.lengths[i] >= this.capacity ? [i] : []));
        for (const i of full) this.finish(this.rows[i], "context");
        this.remove(full);
        const B = this.rows.length;
        if (B === 0) return out;
        const input = Int32Array.from(this.rows, (r) => r.result.newIds[r.result.newIds.length - 1]);
        const crossing = this.rows.flatMap((_, b) => (this.cache.lengths[b] === this.refillAt ? [b] : []));
        const ids = this.next(this.rows, input, B, 1, {cache: this.cache, logitRows: Array.from({length: B}, (_, b) => b)});
        // longrope (Phi-3): the step whose sequence first passes the original context runs the whole sequence again
        // on long_factor's table, as Phi3ForCausalLM.prepare_inputs_for_generation drops the cache there; that row's
        // token of the batched step (over keys rotated by the short table) is replaced
        for (const b of crossing) {
            const seq = this.rows[b].result.outputIds;
            truncateCacheRow(this.cache, b, 0);
            [ids[b]] = this.next([this.rows[b]], Int32Array.from(seq), 1, seq.length, {
                cache: this.cache,
                firstRow: b,
                logitRows: [seq.length - 1]
            });
        }
        const ended: number[] = [];
        this.rows.forEach((row, b) => {
            if (this.accept(row, ids[b])) ended.push(b);
            out.set(row, ids[b]);
        });
        this.remove(ended);
        return out;
    }

    /** stops a row (a server client that went away): its place is freed at once */
    leave(row: DecodeRow, reason: GenerateResult["stopReason"] = "cancelled"): void {
        const i = this.rows.indexOf(row as ActiveRow);
        this.finish(row as ActiveRow, reason);
        if (i >= 0) this.remove([i]);
    }

    release(): void {
        this.cache.release();
    }

    /** the next token of each row from one forward pass, chosen where the logits are (each row by its settings) */
    private next(rows: ActiveRow[], ids: Int32Array, B: number, T: number, opts: LmForwardOptions): number[] {
        const picks = rows.every((r) => r.sampling.greedy && !r.seen) ? null : rows.map(tokenPick);
        return Array.from(this.model.pickForward(ids, B, T, opts, picks));
    }

    /** takes a row's next token; true when the row ended with it */
    private accept(row: ActiveRow, id: number): boolean {
        row.result.outputIds.push(id);
        row.result.newIds.push(id);
        row.seen?.add(id);
        if (this.eos.has(id)) this.finish(row, "eos");
        else if (row.result.newIds.length >= row.maxNew) this.finish(row, "max_new_tokens");
        return row.done;
    }

    private finish(row: ActiveRow, reason: GenerateResult["stopReason"]): void {
        if (row.done) return;
        row.done = true;
        row.result.stopReason = reason;
    }

    /** frees the cache rows of these rows: the last active rows move into the gaps */
    private remove(indices: number[]): void {
        for (const i of [...indices].sort((a, b) => b - a)) {
            const last = this.rows.length - 1;
            if (i !== last) {
                this.cache.moveRow(last, i);
                this.rows[i] = this.rows[last];
            } else this.cache.clearRow(i);
            this.rows.pop();
        }
    }
}

/** how a row picks its next token; a sampled row draws one number from its generator per token */
function tokenPick(row: ActiveRow): TokenPick {
    const s = row.sampling;
    return {
        temperature: s.greedy ? 0 : s.temperature,
        topK: s.topK,
        topP: s.topP,
        u32: s.greedy ? 0 : row.rng.nextU32(),
        repetitionPenalty: s.repetitionPenalty,
        seen: row.seen ? Int32Array.from(row.seen) : null
    };
}

function stripUndefined<T extends object>(o: T): Partial<T> {
    return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
