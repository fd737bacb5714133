// generate.ts: autoregressive decoding with a KV cache: greedy, or sampled with temperature, top-k and top-p
// applied in that order (as transformers' logits warpers are), from a seeded generator.
import {QloraError} from "../errors.js";
import {Rng} from "../backend/rng.js";
import type {CausalLm} from "./causal-lm.js";

export interface SamplingOptions {
    /** greedy decoding (argmax); otherwise sampling */
    greedy: boolean;
    temperature: number;
    /** keep the k most likely tokens (0: off) */
    topK: number;
    /** keep the smallest set whose probability reaches p (1: off) */
    topP: number;
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

export const DEFAULT_SAMPLING: SamplingOptions = {greedy: false, temperature: 0.7, topK: 50, topP: 0.9, seed: 0};

/** decodes on the model's device (CPU or GPU: any CausalLm); sampling runs on the host */
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

/** checks one row's sampling settings and length */
function checkRow(s: SamplingOptions, maxNewTokens: number): void {
    if (!s.greedy && !(s.temperature > 0))
        throw new QloraError(`temperature must be > 0 for sampling (got ${s.temperature}); use --greedy for argmax decoding`);
    if (!(s.topP > 0 && s.topP <= 1)) throw new QloraError(`top_p must be in (0, 1] (got ${s.topP})`);
    if (!Number.isSafeInteger(maxNewTokens) || maxNewTokens < 0)
        throw new QloraError(`max_new_tokens must be a non-negative integer (got ${maxNewTokens})`);
}

/**
 * THE decode loop, for a batch of prompts: yields each step's new token per row (null for rows already done) and
 * returns each row's result. The options are checked on the first step.
 */
export function* decodeBatchSteps(
    model: CausalLm,
    prompts: number[][],
    opts: BatchDecodeOptions
): Generator<(number | null)[], GenerateResult[]> {
    const shared = {...DEFAULT_SAMPLING, ...stripUndefined(opts)};
    const rows = prompts.map((_, b) => {
        const own = stripUndefined(opts.rows?.[b] ?? {});
        const sampling: SamplingOptions = {...shared, ...own};
        const maxNew = own.maxNewTokens ?? opts.maxNewTokens;
        checkRow(sampling, maxNew);
        return {sampling, maxNew};
    });
    checkRow(shared, opts.maxNewTokens);
    if (prompts.length === 0) throw new QloraError("no prompt to continue");
    const context = model.config.maxPositionEmbeddings;
    let L = 0;
    for (const p of prompts) {
        if (p.length === 0) throw new QloraError("the prompt is empty: there is nothing to continue from");
        if (p.length > context)
            throw new QloraError(
                `the prompt has ${p.length} tokens but the model's context length ` +
                    `(max_position_embeddings in config.json) is ${context}; shorten the prompt`
            );
        L = Math.max(L, p.length);
    }
    const longest = rows.reduce((m, r) => Math.max(m, r.maxNew), 0);
    const B = prompts.length,
        V = model.config.vocabSize;
    const capacity = Math.min(context, L + longest);
    // padding only when the prompts differ in length: one prompt runs exactly as it always has
    const padded = prompts.some((p) => p.length !== L);
    const cache = model.newCache(B, capacity);
    try {
        const rngs = rows.map((r) => new Rng(r.sampling.seed));
        const eos = new Set(opts.eosTokenIds ?? model.config.eosTokenIds);
        const results: GenerateResult[] = prompts.map((p) => ({outputIds: [...p], newIds: [], stopReason: "max_new_tokens"}));
        // a row asked for no new token is done before the first step
        const done = rows.map((r) => r.maxNew === 0);
        // which cache positions of each row hold real tokens, and the position of each row's next token
        const keyValid = padded ? new Uint8Array(B * capacity) : null;
        const nextPos = prompts.map((p) => p.length);
        let T = L;
        let input = new Int32Array(B * L);
        let positions: Int32Array | undefined = padded ? new Int32Array(B * L) : undefined;
        prompts.forEach((p, b) => {
            const pad = L - p.length;
            input.set(p, b * L + pad); // padding: token 0, masked
            if (!keyValid || !positions) return;
            keyValid.fill(1, b * capacity + pad, b * capacity + L);
            for (let t = pad; t < L; t++) positions[b * L + t] = t - pad;
        });
        for (let step = 0; step < longest && done.includes(false); step++) {
            // rows whose caller went away stop before the step (their slot stays, masked)
            results.forEach((r, b) => {
                if (!done[b] && opts.cancelled?.(b)) {
                    r.stopReason = "cancelled";
                    done[b] = true;
                }
            });
            if (!done.includes(false)) break;
            if (cache.length + T > capacity) {
                results.forEach((r, b) => {
                    if (!done[b]) r.stopReason = "context";
                });
                break;
            }
            const S = cache.length + T;
            let attentionMask: Uint8Array | undefined;
            if (keyValid) {
                attentionMask = new Uint8Array(B * S);
                for (let b = 0; b < B; b++) attentionMask.set(keyValid.subarray(b * capacity, b * capacity + S), b * S);
            }
            const logitRows = Array.from({length: B}, (_, b) => b * T + T - 1);
            const logits = model.forward(input, B, T, {cache, logitRows, attentionMask, positionIds: positions});
            const ids = results.map((r, b) => {
                if (done[b]) return null;
                const id = pickToken(logits.subarray(b * V, (b + 1) * V), rows[b].sampling, rngs[b]);
                r.outputIds.push(id);
                r.newIds.push(id);
                if (eos.has(id)) {
                    r.stopReason = "eos";
                    done[b] = true;
                } else if (r.newIds.length >= rows[b].maxNew) done[b] = true;
                return id;
            });
            yield ids;
            // the next step: one token per row; a finished row feeds a masked placeholder
            T = 1;
            input = Int32Array.from(ids, (id) => id ?? 0);
            if (keyValid && positions) {
                positions = Int32Array.from(nextPos);
                if (S < capacity)
                    ids.forEach((id, b) => {
                        if (id !== null) keyValid[b * capacity + S] = 1;
                    });
            }
            for (let b = 0; b < B; b++) nextPos[b]++;
        }
        return results;
    } finally {
        cache.release();
    }
}

/** chooses the next token from one row of logits */
export function pickToken(logits: Float32Array, s: SamplingOptions, rng: Rng): number {
    if (s.greedy) return argmax(logits);
    const V = logits.length;
    // temperature
    const scaled = new Float32Array(V);
    for (let i = 0; i < V; i++) scaled[i] = logits[i] / s.temperature;
    // candidates sorted by logit, descending
    let order = Array.from({length: V}, (_, i) => i).sort((a, b) => scaled[b] - scaled[a]);
    if (s.topK > 0 && s.topK < V) {
        // transformers keeps every token whose logit is >= the k-th largest
        const kth = scaled[order[s.topK - 1]];
        order = order.filter((i) => scaled[i] >= kth);
    }
    const max = scaled[order[0]];
    let probs = order.map((i) => Math.exp(scaled[i] - max));
    let sum = probs.reduce((a, b) => a + b, 0);
    probs = probs.map((p) => p / sum);
    if (s.topP < 1) {
        // keep the most likely tokens until their mass reaches top_p (always at least one)
        let mass = 0,
            keep = 0;
        while (keep < probs.length && (keep === 0 || mass < s.topP)) mass += probs[keep++];
        order = order.slice(0, keep);
        probs = probs.slice(0, keep);
        sum = probs.reduce((a, b) => a + b, 0);
        probs = probs.map((p) => p / sum);
    }
    let r = rng.next();
    for (let i = 0; i < probs.length; i++) {
        r -= probs[i];
        if (r < 0) return order[i];
    }
    return order[order.length - 1];
}

export function argmax(x: Float32Array): number {
    let best = 0;
    for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
    return best;
}

function stripUndefined<T extends object>(o: T): Partial<T> {
    return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
