// model.ts: what scoring needs of a model, whatever runs it: the log-probability of given tokens at given
// positions (log-likelihood tasks, and the loss), greedy decoding steps (generation tasks), and the summed loss of
// a training batch. Two implementations: a CausalLm (qlora's own forward, host or GPU; causalEvalLm here) and a
// GGUF file run by llama.cpp (llama-cpp.ts). loglik.ts, generate-until.ts and loss.ts are written once over it.
import type {Batch} from "../data/index.js";
import type {ModelConfig} from "../io/hf-config.js";
import {type CausalLm, type LmCache, truncateCacheRow} from "../model/causal-lm.js";
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
    /** the rows of one scoring are done: what it kept between rows (a prefix's KV cache) is freed */
    endScoring?(): void;
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

/**
 * lets the event loop run (a signal handler, a progress bar's timer) between steps of work that is otherwise one
 * chain of promises: a CausalLm computes synchronously, so scoring and generation never give it a turn otherwise
 * (a SIGTERM to `qlora eval --compare` waited for the end of a whole GSM8K task)
 */
export const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

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
 * reads scored from one forward: `positions` are the flattened rows the forward gives logits for (reads at one
 * position share its row); `score` takes those logits [positions, V] and gives each read's log-softmax in float64
 */
function readPlan(reads: TokenRead[][], rowOf: (row: number, at: number) => number) {
    const positions: number[] = [];
    const readRows = reads.map((rowReads, b) => {
        const at = new Map<number, number>();
        return rowReads.map((read) => {
            let r = at.get(read.at);
            if (r === undefined) {
                r = positions.push(rowOf(b, read.at)) - 1;
                at.set(read.at, r);
            }
            return r;
        });
    });
    const score = (logits: Float32Array, V: number): TokenLogprob[][] => {
        const stats = positions.map((_, i) => rowStats(logits, i * V, V));
        return reads.map((rowReads, b) =>
            rowReads.map((read, j) => {
                const r = readRows[b][j];
                const x = logits[r * V + read.token];
                return {logprob: x - stats[r].lse, greedy: x >= logits[r * V + stats[r].argmax]};
            })
        );
    };
    return {positions, score};
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
    rows.forEach((row, b) => ids.set(row.ids, b * T));
    const plan = readPlan(
        rows.map((row) => row.reads),
        (b, at) => b * T + at
    );
    return plan.score(lm.forward(ids, rows.length, T, {logitRows: plan.positions}), lm.config.vocabSize);
}

/**
 * Rows scored one after another on top of the previous row's tokens, kept in a KV cache: a row runs only from the
 * first token it does not share with the previous one (and from its first read at the latest: a read's logits
 * come from this row's forward). Rows sorted by their tokens (rowOrder "shared-prefix") put a subject's questions
 * together, so its description and few-shot examples are computed once, not once per question: on the CPU, where
 * the time is the tokens run (and attention over long prompts), 3 MMLU questions of a subject cost about half
 * of 3 whole prompts. The results are those of each row alone (the same positions, keys and values), up to float
 * summation order.
 */
export class PrefixCachedScorer {
    private cache: LmCache | null = null;
    /** the tokens whose keys and values cache row 0 holds */
    private cached: number[] = [];
    /** tokens run through the model so far (what the shared prefixes save shows here) */
    tokensRun = 0;

    constructor(private readonly lm: CausalLm) {}

    score(rows: ScoreRow[]): TokenLogprob[][] {
        return rows.map((row) => this.scoreRow(row));
    }

    /** frees the cache (the next row starts a new one) */
    release(): void {
        this.cache?.release();
        this.cache = null;
        this.cached = [];
    }

    private scoreRow(row: ScoreRow): TokenLogprob[] {
        if (row.reads.length === 0) return [];
        const cache = this.cacheFor(row.ids.length);
        const firstRead = row.reads.reduce((m, r) => Math.min(m, r.at), row.ids.length - 1);
        let keep = 0;
        const limit = Math.min(firstRead, this.cached.length);
        while (keep < limit && this.cached[keep] === row.ids[keep]) keep++;
        // a sliding window may have dropped keys the shared prefix needs: the row then starts over
        keep = truncateCacheRow(cache, 0, keep);
        // until the forward succeeds, the cache holds the shared tokens only
        this.cached = row.ids.slice(0, keep);
        const input = Int32Array.from(row.ids.slice(keep));
        const plan = readPlan([row.reads], (_, at) => at - keep);
        const logits = this.lm.forward(input, 1, input.length, {cache, firstRow: 0, logitRows: plan.positions});
        this.cached = row.ids.slice();
        this.tokensRun += input.length;
        return plan.score(logits, this.lm.config.vocabSize)[0];
    }

    /** one cache row of at least `positions`, grown by doubling (a new cache starts empty) */
    private cacheFor(positions: number): LmCache {
        if (this.cache && this.cache.capacity >= positions) return this.cache;
        const grown = Math.max(Math.ceil(positions / 256) * 256, 2 * (this.cache?.capacity ?? 0));
        this.release();
        this.cache = this.lm.newCache(1, Math.max(positions, Math.min(grown, this.lm.config.maxPositionEmbeddings)));
        return this.cache;
    }
}

/**
 * how rows are best scored on a CausalLm: on the CPU one after another on top of the shared prefix
 * (PrefixCachedScorer), on the GPU in padded batches (a batch of whole rows keeps the device busy, where one row's
 * few tokens would not)
 */
export function causalScorer(lm: CausalLm): {order: RowOrder; score(rows: ScoreRow[]): TokenLogprob[][]; release(): void} {
    if (lm.device !== "cpu") return {order: "longest-first", score: (rows) => causalTokenLogprobs(lm, rows), release() {}};
    const scorer = new PrefixCachedScorer(lm);
    return {order: "shared-prefix", score: (rows) => scorer.score(rows), release: () => scorer.release()};
}

/** a CausalLm (the host DecoderModel or the CudaModel) as evaluation runs it */
export function causalEvalLm(lm: CausalLm): EvalLm {
    const scorer = causalScorer(lm);
    return {
        config: lm.config,
        rowOrder: scorer.order,
        tokenLogprobs: async (rows) => scorer.score(rows),
        endScoring: () => scorer.release(),
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
