// loglik.ts: log-likelihoods of continuations given a context, as lm-evaluation-harness's HFLM computes them:
// - tokens: trailing whitespace of the context moves to the continuation; context+continuation is encoded whole,
//   the context alone, and the continuation's tokens are the whole's tokens past the context's length (so a
//   merge across the boundary is scored as the harness scores it); no special tokens are added;
// - truncation: the model sees the last max_length tokens of context+continuation minus its last token;
// - the score is the sum over the continuation's tokens of log-softmax(logits), computed here in float64.
// When every continuation of a context is one token, one forward of the context gives all of them (the logits at its
// last position); otherwise each continuation is its own row. Rows are sorted by length, batched, padded on the
// right (causal attention: padding after a row's last token never changes its logits) and read at the positions
// needed through logitRows.
import type {CausalLm} from "../model/causal-lm.js";

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
    /** the context length (default: the model's max_position_embeddings) */
    maxLength?: number;
    /** the token an empty context starts from (the harness uses the end-of-text token) */
    prefixTokenId?: number;
    /** called after each forward with the requests done so far */
    onProgress?: (done: number, total: number) => void;
}

/** one model input: its tokens, and per scored continuation the positions and tokens to read */
interface Row {
    ids: number[];
    /** the request and its continuations scored from this row */
    request: number;
    conts: {cont: number; tokens: number[]}[];
}

/** the context and continuation tokens of one pair, the harness's _encode_pair */
export function encodePair(
    tokenizer: EncodeTokenizer,
    context: string,
    continuation: string
): {context: number[]; continuation: number[]} {
    const spaces = context.length - context.trimEnd().length;
    if (spaces > 0) {
        continuation = context.slice(context.length - spaces) + continuation;
        context = context.slice(0, context.length - spaces);
    }
    const whole = tokenizer.encode(context + continuation);
    const ctx = tokenizer.encode(context);
    return {context: ctx, continuation: whole.slice(ctx.length)};
}

/** the log-sum-exp (float64) and the argmax of one row of logits */
function rowStats(logits: Float32Array, offset: number, V: number): {lse: number; argmax: number} {
    let max = -Infinity;
    let argmax = 0;
    for (let v = 0; v < V; v++) {
        const x = logits[offset + v];
        if (x > max) {
            max = x;
            argmax = v;
        }
    }
    let sum = 0;
    for (let v = 0; v < V; v++) sum += Math.exp(logits[offset + v] - max);
    return {lse: max + Math.log(sum), argmax};
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
        const pairs = req.continuations.map((c) => encodePair(tokenizer, req.context, c));
        const ctx = pairs[0]?.context ?? [];
        const context = ctx.length > 0 ? ctx : prefix;
        if (pairs.every((p) => p.continuation.length === 1)) {
            // the model input is context+cont minus its last token: the context, the same for every continuation
            if (context.length > maxLength) truncated[r] = true;
            rows.push({
                ids: context.slice(-maxLength),
                request: r,
                conts: pairs.map((p, cont) => ({cont, tokens: p.continuation}))
            });
            return;
        }
        pairs.forEach((p, cont) => {
            const whole = [...(p.context.length > 0 ? p.context : prefix), ...p.continuation];
            if (whole.length > maxLength + 1) truncated[r] = true;
            rows.push({ids: whole.slice(-(maxLength + 1), -1), request: r, conts: [{cont, tokens: p.continuation}]});
        });
    });
    return {rows, truncated};
}

/** the log-likelihood of each continuation of each request (see the top of this file for the conventions) */
export function loglikelihoods(
    lm: CausalLm,
    tokenizer: EncodeTokenizer,
    requests: LoglikRequest[],
    opts: LoglikOptions
): LoglikResult[] {
    const maxLength = opts.maxLength ?? lm.config.maxPositionEmbeddings;
    const prefix = opts.prefixTokenId === undefined ? [] : [opts.prefixTokenId];
    const {rows, truncated} = buildRows(tokenizer, requests, maxLength, prefix);
    const results: LoglikResult[] = requests.map((req, r) => ({
        logliks: req.continuations.map(() => 0),
        greedy: req.continuations.map(() => true),
        truncated: truncated[r]
    }));
    // longest first, as the harness orders them: the first batch shows at once whether memory suffices
    const order = rows.map((_, i) => i).sort((a, b) => rows[b].ids.length - rows[a].ids.length || a - b);
    const remaining = requests.map(() => 0);
    for (const row of rows) remaining[row.request]++;
    let done = 0;
    const V = lm.config.vocabSize;
    for (let start = 0; start < order.length; start += opts.batchSize) {
        const batch = order.slice(start, start + opts.batchSize).map((i) => rows[i]);
        const T = Math.max(...batch.map((row) => row.ids.length));
        const ids = new Int32Array(batch.length * T); // right padding with token 0, never attended to by real tokens
        const logitRows: number[] = [];
        // per row and continuation: the logits row each continuation token is read from
        const reads: {row: Row; cont: number; token: number; at: number}[] = [];
        batch.forEach((row, b) => {
            ids.set(row.ids, b * T);
            const n = row.ids.length;
            if (row.conts.length > 1 || row.conts[0].tokens.length === 1) {
                // one-token continuations: all read from the last position
                logitRows.push(b * T + n - 1);
                for (const c of row.conts) reads.push({row, cont: c.cont, token: c.tokens[0], at: logitRows.length - 1});
                return;
            }
            // a continuation of m tokens: token j is predicted at position n - m + j
            const {cont, tokens} = row.conts[0];
            const m = Math.min(tokens.length, n);
            const first = logitRows.length;
            for (let j = 0; j < m; j++) logitRows.push(b * T + n - m + j);
            tokens.slice(tokens.length - m).forEach((token, j) => reads.push({row, cont, token, at: first + j}));
        });
        const logits = lm.forward(ids, batch.length, T, {logitRows});
        const stats = logitRows.map((_, i) => rowStats(logits, i * V, V));
        for (const read of reads) {
            const {lse, argmax} = stats[read.at];
            const result = results[read.row.request];
            result.logliks[read.cont] += logits[read.at * V + read.token] - lse;
            // the harness's is_greedy: the token is the argmax (ties count as greedy)
            if (argmax !== read.token && logits[read.at * V + read.token] < logits[read.at * V + argmax])
                result.greedy[read.cont] = false;
        }
        for (const row of batch) if (--remaining[row.request] === 0) done++;
        opts.onProgress?.(done, requests.length);
    }
    return results;
}
