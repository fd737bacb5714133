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
    stopReason: "eos" | "max_new_tokens" | "context";
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
 * The decode loop, one new token per step (the ids are yielded, the result returned): generate() runs it to the
 * end; the server awaits between steps so other requests and slow clients are served meanwhile, and stops it with
 * return() when its client goes away (the KV cache is released either way). The options are checked on the
 * first step.
 */
export function* decodeSteps(model: CausalLm, promptIds: number[], opts: GenerateOptions): Generator<number, GenerateResult> {
    const sampling = {...DEFAULT_SAMPLING, ...stripUndefined(opts)};
    if (!sampling.greedy && !(sampling.temperature > 0))
        throw new QloraError(
            `temperature must be > 0 for sampling (got ${sampling.temperature}); use --greedy for argmax decoding`
        );
    if (!(sampling.topP > 0 && sampling.topP <= 1)) throw new QloraError(`top_p must be in (0, 1] (got ${sampling.topP})`);
    if (promptIds.length === 0) throw new QloraError("the prompt is empty: there is nothing to continue from");
    if (!Number.isSafeInteger(opts.maxNewTokens) || opts.maxNewTokens < 0)
        throw new QloraError(`max_new_tokens must be a non-negative integer (got ${opts.maxNewTokens})`);
    const context = model.config.maxPositionEmbeddings;
    if (promptIds.length > context)
        throw new QloraError(
            `the prompt has ${promptIds.length} tokens but the model's context length ` +
                `(max_position_embeddings in config.json) is ${context}; shorten the prompt`
        );
    const capacity = Math.min(context, promptIds.length + opts.maxNewTokens);
    const cache = model.newCache(1, capacity);
    try {
        const rng = new Rng(sampling.seed);
        const eos = new Set(opts.eosTokenIds ?? model.config.eosTokenIds);
        const out = [...promptIds];
        const newIds: number[] = [];
        let input = Int32Array.from(promptIds);
        let stopReason: GenerateResult["stopReason"] = "max_new_tokens";
        while (newIds.length < opts.maxNewTokens) {
            if (cache.length + input.length > capacity) {
                stopReason = "context";
                break;
            }
            const logits = model.forward(input, 1, input.length, {cache, logitRows: [input.length - 1]});
            const id = pickToken(logits, sampling, rng);
            out.push(id);
            newIds.push(id);
            yield id;
            if (eos.has(id)) {
                stopReason = "eos";
                break;
            }
            input = Int32Array.from([id]);
        }
        return {outputIds: out, newIds, stopReason};
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
