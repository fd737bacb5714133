// model.ts: what scoring needs of a model, whatever runs it: the log-probability of given tokens at given
// positions (log-likelihood tasks, and the loss), greedy decoding steps (generation tasks), and the summed loss of
// a training batch. Two implementations: a CausalLm (qlora's own forward, host or GPU; causalEvalLm here) and a
// GGUF file run by llama.cpp (llama-cpp.ts). loglik.ts, generate-until.ts and loss.ts are written once over it.
import type {Batch} from "../data/index.js";
import type {ModelConfig} from "../io/hf-config.js";
import type {CausalLm} from "../model/causal-lm.js";
import {decodeBatchSteps} from "../model/generate.js";
import type {HfTokenizer} from "../tokenizer/index.js";
import type {ModelIdentity} from "./cache.js";

/** read the next-token distribution after ids[0..at] (inclusive) and score `token` under it */
export interface TokenRead {
    at: number;
    token: number;
}

/** one model input and the tokens to score in it */
export interface ScoreRow {
    ids: number[];
    reads: TokenRead[];
}

export interface TokenLogprob {
    /** log p(token | ids[0..at]), computed in float64 where the model gives logits */
    logprob: number;
    /** the token is the most likely one there (ties count as greedy: the harness's is_greedy) */
    greedy: boolean;
}

export interface GreedyStepsOptions {
    maxNewTokens: number;
    eosTokenIds: number[];
    /** a row the caller has finished with (it reached a stop string): it stops and yields null from then on */
    cancelled: (row: number) => boolean;
}

/** a model as evaluation runs it */
export interface EvalLm {
    /** the model's config.json (max_position_embeddings is the most tokens one row may hold) */
    readonly config: ModelConfig;
    /**
     * the order rows and prompts are best given in: longest first (padded batches: the first batch shows at once
     * whether memory suffices), or sorted by their tokens, so rows sharing a prefix (a subject's few-shot examples)
     * follow each other (a model that keeps the previous row's tokens in its cache)
     */
    readonly rowOrder: RowOrder;
    /** rows scored together (one forward pass, or one batch of sequences); per row, per read, in order */
    tokenLogprobs(rows: ScoreRow[]): Promise<TokenLogprob[][]>;
    /**
     * greedy decoding of a batch of prompts: each step yields a new token for some rows (all that are not done, for
     * a CausalLm; one prompt at a time, for llama.cpp), null for the others; a row is done at an end-of-sequence
     * token, at maxNewTokens, or when cancelled
     */
    greedySteps(prompts: number[][], opts: GreedyStepsOptions): AsyncGenerator<(number | null)[], void, undefined>;
    /** the summed loss and target count of a right-padded batch (labels[t + 1] is position t's target; < 0 ignored) */
    lossSums(batch: Batch): Promise<{lossSum: number; targets: number}>;
}

export type RowOrder = "longest-first" | "shared-prefix";

/** the indexes of `rows` in the order a model takes them best (see EvalLm.rowOrder); ties keep their order */
export function rowOrder(rows: readonly (readonly number[])[], order: RowOrder): number[] {
    const byLength = (a: number, b: number) => rows[b].length - rows[a].length || a - b;
    const byTokens = (a: number, b: number) => {
        const x = rows[a],
            y = rows[b];
        for (let i = 0; i < x.length && i < y.length; i++) if (x[i] !== y[i]) return x[i] - y[i];
        return x.length - y.length || a - b;
    };
    return rows.map((_, i) => i).sort(order === "longest-first" ? byLength : byTokens);
}

/** what a task needs of a model: the tokenizer and stop ids (known without loading it) and the model, opened once */
export interface EvalModel {
    tokenizer: HfTokenizer;
    eosTokenIds: number[];
    /** tells its cached results apart from every other model's */
    identity: ModelIdentity;
    contextLength: number;
    /** the model, loaded (merged, exported) on the first call: a run whose results are all cached never loads it */
    lm(): Promise<EvalLm>;
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

/**
 * tokenLogprobs of a CausalLm, synchronously: the rows padded on the right into one forward (a causal model's
 * logits at a row's real positions do not depend on padding after them), logits computed only at the positions
 * read, log-softmax in float64
 */
export function causalTokenLogprobs(lm: CausalLm, rows: ScoreRow[]): TokenLogprob[][] {
    if (rows.length === 0) return [];
    const T = Math.max(...rows.map((row) => row.ids.length));
    const ids = new Int32Array(rows.length * T); // right padding with token 0, never attended to by real tokens
    const logitRows: number[] = [];
    // per row: the logits row of each read (reads at one position share it)
    const readRows = rows.map((row, b) => {
        ids.set(row.ids, b * T);
        const at = new Map<number, number>();
        return row.reads.map((read) => {
            let r = at.get(read.at);
            if (r === undefined) {
                r = logitRows.push(b * T + read.at) - 1;
                at.set(read.at, r);
            }
            return r;
        });
    });
    const V = lm.config.vocabSize;
    const logits = lm.forward(ids, rows.length, T, {logitRows});
    const stats = logitRows.map((_, i) => rowStats(logits, i * V, V));
    return rows.map((row, b) =>
        row.reads.map((read, j) => {
            const r = readRows[b][j];
            const x = logits[r * V + read.token];
            return {logprob: x - stats[r].lse, greedy: x >= logits[r * V + stats[r].argmax]};
        })
    );
}

/** a CausalLm (the host DecoderModel or the CudaModel) as evaluation runs it */
export function causalEvalLm(lm: CausalLm): EvalLm {
    return {
        config: lm.config,
        rowOrder: "longest-first",
        tokenLogprobs: async (rows) => causalTokenLogprobs(lm, rows),
        async *greedySteps(prompts, opts) {
            const steps = decodeBatchSteps(lm, prompts, {
                maxNewTokens: opts.maxNewTokens,
                greedy: true,
                eosTokenIds: opts.eosTokenIds,
                cancelled: opts.cancelled
            });
            try {
                for (;;) {
                    const step = steps.next();
                    if (step.done) return;
                    yield step.value;
                }
            } finally {
                steps.return([]); // releases the KV cache when the caller stops early
            }
        },
        lossSums: async (batch) => {
            const r = lm.score(batch);
            return {lossSum: r.lossSum, targets: r.targets};
        }
    };
}

/** the loss of a right-padded batch from tokenLogprobs: −Σ log p(target) over the targets (labels ≥ 0) */
export async function lossFromTokenLogprobs(lm: EvalLm, batch: Batch): Promise<{lossSum: number; targets: number}> {
    const rows: ScoreRow[] = [];
    for (let b = 0; b < batch.B; b++) {
        const base = b * batch.T;
        let n = 0;
        while (n < batch.T && batch.attentionMask[base + n] === 1) n++;
        const reads: TokenRead[] = [];
        for (let t = 0; t + 1 < n; t++) {
            const label = batch.labels[base + t + 1];
            if (label >= 0) reads.push({at: t, token: label});
        }
        if (reads.length > 0) rows.push({ids: Array.from(batch.inputIds.subarray(base, base + n)), reads});
    }
    let lossSum = 0,
        targets = 0;
    for (const scores of await lm.tokenLogprobs(rows))
        for (const s of scores) {
            lossSum -= s.logprob;
            targets++;
        }
    return {lossSum, targets};
}
