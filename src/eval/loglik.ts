// loglik.ts: log-likelihoods of continuations given a context, as lm-evaluation-harness's HFLM computes them:
// - tokens: trailing whitespace of the context moves to the continuation; context+continuation is encoded whole,
//   the context alone, and the continuation's tokens are the whole's tokens past the context's length (so a
//   merge across the boundary is scored as the harness scores it); no special tokens are added;
// - truncation: the model sees the last max_length tokens of context+continuation minus its last token;
// - the score is the sum over the continuation's tokens of log p(token), log-softmax in float64 (model.ts).
// When every continuation of a context is one token, one row of the context gives all of them (read at its last
// position); otherwise each continuation is its own row. Rows are sorted as the model takes them best (model.ts
// rowOrder: by their tokens on the CPU and for llama.cpp, which run row after row on top of the tokens a row shares
// with the previous one; longest first on the GPU, one padded forward per batch) and handed over batchSize at a time.
// The scoring is one generator (loglikelihoodSteps): it yields each batch of rows and takes back their scores, so
// the same code runs over a synchronous CausalLm (loglikelihoods) and an async model (loglikelihoodsOf).
import type {CausalLm} from "../model/causal-lm.js";
import {causalScorer, type EvalLm, type RowOrder, rowOrder, type ScoreRow, type TokenLogprob, yieldToEventLoop} from "./model.js";

export interface LoglikRequest {
    context: string;
    continuations: string[];
}

export interface LoglikResult {
    /** per continuation: the summed log-probability of its tokens */
    logliks: number[];
    /** per continuation: whether it was the argmax at every one of its tokens (the harness's is_greedy) */
    greedy: boolean[];
    /** tokens were dropped from the left to fit the model's context */
    truncated: boolean;
}

export interface EncodeTokenizer {
    encode(text: string): number[];
}

export interface LoglikOptions {
    batchSize: number;
    /** the context length (default: the model's) */
    maxLength?: number;
    /** the token an empty context starts from (the harness uses the end-of-text token) */
    prefixTokenId?: number;
    /** called after each batch with the requests done so far */
    onProgress?: (done: number, total: number) => void;
    /** the order rows are scored in (default: longest first) */
    order?: RowOrder;
}

/** one model input: its tokens and reads, and per read the request and continuation it adds to */
interface Row extends ScoreRow {
    request: number;
    conts: number[];
}

/** the context and continuation tokens of one pair, the harness's _encode_pair */
export function encodePair(
    tokenizer: EncodeTokenizer,
    context: string,
    continuation: string
): {context: number[]; continuation: number[]} {
    return encodePairs(tokenizer, context, [continuation])[0];
}

/** encodePair of one context with each of its continuations (the context, the same for all, encoded once) */
function encodePairs(
    tokenizer: EncodeTokenizer,
    context: string,
    continuations: string[]
): {context: number[]; continuation: number[]}[] {
    const trimmed = context.trimEnd();
    const spaces = context.slice(trimmed.length);
    const ctx = tokenizer.encode(trimmed);
    return continuations.map((continuation) => ({
        context: ctx,
        continuation: tokenizer.encode(trimmed + spaces + continuation).slice(ctx.length)
    }));
}

/** the requests' rows: one per context when every continuation is a single token, else one per continuation */
function buildRows(
    tokenizer: EncodeTokenizer,
    requests: LoglikRequest[],
    maxLength: number,
    prefix: number[]
): {rows: Row[]; truncated: boolean[]} {
    const rows: Row[] = [];
    const truncated = requests.map(() => false);
    requests.forEach((req, r) => {
        const pairs = encodePairs(tokenizer, req.context, req.continuations);
        const ctx = pairs[0]?.context ?? [];
        const context = ctx.length > 0 ? ctx : prefix;
        if (pairs.every((p) => p.continuation.length === 1)) {
            // the model input is context+cont minus its last token: the context, the same for every continuation,
            // and every continuation is read at its last position
            if (context.length > maxLength) truncated[r] = true;
            const ids = context.slice(-maxLength);
            rows.push({
                ids,
                request: r,
                reads: pairs.map((p) => ({at: ids.length - 1, token: p.continuation[0]})),
                conts: pairs.map((_, cont) => cont)
            });
            return;
        }
        pairs.forEach((p, cont) => {
            const whole = [...(p.context.length > 0 ? p.context : prefix), ...p.continuation];
            if (whole.length > maxLength + 1) truncated[r] = true;
            const ids = whole.slice(-(maxLength + 1), -1);
            // a continuation of m tokens: token j is predicted at position n - m + j (all of it that fits)
            const n = ids.length;
            const m = Math.min(p.continuation.length, n);
            const reads = p.continuation.slice(p.continuation.length - m).map((token, j) => ({at: n - m + j, token}));
            rows.push({ids, request: r, reads, conts: reads.map(() => cont)});
        });
    });
    return {rows, truncated};
}

/**
 * THE scoring of log-likelihood requests: yields each batch of rows to score, takes back their scores (per row, per
 * read) and returns each request's result
 */
export function* loglikelihoodSteps(
    tokenizer: EncodeTokenizer,
    requests: LoglikRequest[],
    opts: LoglikOptions & {maxLength: number}
): Generator<ScoreRow[], LoglikResult[], TokenLogprob[][]> {
    const prefix = opts.prefixTokenId === undefined ? [] : [opts.prefixTokenId];
    const {rows, truncated} = buildRows(tokenizer, requests, opts.maxLength, prefix);
    const results: LoglikResult[] = requests.map((req, r) => ({
        logliks: req.continuations.map(() => 0),
        greedy: req.continuations.map(() => true),
        truncated: truncated[r]
    }));
    // longest first, as the harness orders them (the first batch shows at once whether memory suffices), or
    // rows sharing a prefix together, for a model that keeps the previous row's tokens (model.ts)
    const order = rowOrder(
        rows.map((r) => r.ids),
        opts.order ?? "longest-first"
    );
    const remaining = requests.map(() => 0);
    for (const row of rows) remaining[row.request]++;
    let done = 0;
    for (let start = 0; start < order.length; start += opts.batchSize) {
        const batch = order.slice(start, start + opts.batchSize).map((i) => rows[i]);
        const scores = yield batch.map(({ids, reads}) => ({ids, reads}));
        batch.forEach((row, b) => {
            const result = results[row.request];
            scores[b].forEach((s, j) => {
                const cont = row.conts[j];
                result.logliks[cont] += s.logprob;
                if (!s.greedy) result.greedy[cont] = false;
            });
        });
        for (const row of batch) if (--remaining[row.request] === 0) done++;
        opts.onProgress?.(done, requests.length);
    }
    return results;
}

/** the log-likelihood of each continuation of each request, on a CausalLm (synchronous; scored as causalEvalLm scores) */
export function loglikelihoods(
    lm: CausalLm,
    tokenizer: EncodeTokenizer,
    requests: LoglikRequest[],
    opts: LoglikOptions
): LoglikResult[] {
    const scorer = causalScorer(lm);
    try {
        const steps = loglikelihoodSteps(tokenizer, requests, {
            ...opts,
            maxLength: opts.maxLength ?? lm.config.maxPositionEmbeddings,
            order: opts.order ?? scorer.order
        });
        let step = steps.next();
        while (!step.done) step = steps.next(scorer.score(step.value));
        return step.value;
    } finally {
        scorer.release();
    }
}

/** the same on any EvalLm (a CausalLm, or a GGUF model through llama.cpp) */
export async function loglikelihoodsOf(
    lm: EvalLm,
    tokenizer: EncodeTokenizer,
    requests: LoglikRequest[],
    opts: LoglikOptions
): Promise<LoglikResult[]> {
    const steps = loglikelihoodSteps(tokenizer, requests, {
        ...opts,
        maxLength: opts.maxLength ?? lm.config.maxPositionEmbeddings,
        order: lm.rowOrder
    });
    try {
        let step = steps.next();
        while (!step.done) {
            const scores = await lm.tokenLogprobs(step.value);
            await yieldToEventLoop();
            step = steps.next(scores);
        }
        return step.value;
    } finally {
        lm.endScoring?.();
    }
}
