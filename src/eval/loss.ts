// loss.ts: loss and perplexity of a model (with or without an adapter) on a data file, with the training loss's
// definition (token mean over the targets; completion-only for instruction data by default). The `loss` metric of
// a task file and `qlora eval --data` both run this; the model is any EvalLm (a CausalLm sums its loss as training
// does; a GGUF model through llama.cpp sums −log p of the targets).
import {DataLoader, loadDataset, padTokenIdOf, type DataOptions, type DataTokenizer, type PrepareStats} from "../data/index.js";
import type {CausalLm} from "../model/causal-lm.js";
import {checkRowsFitContext} from "../model/training.js";
import {causalEvalLm, type EvalLm, yieldToEventLoop} from "./model.js";

export interface EvalResult {
    loss: number;
    perplexity: number;
    /** target tokens the loss averages over */
    tokens: number;
    rows: number;
    stats: PrepareStats;
    /** what the data preparation changed (truncated or dropped examples), to be shown to the user */
    warnings: string[];
}

export async function evaluateLoss(
    loaded: {lm: CausalLm; tokenizer: DataTokenizer},
    dataPath: string,
    options: DataOptions = {},
    batchSize = 8
): Promise<EvalResult> {
    return evaluateLossOf(causalEvalLm(loaded.lm), loaded.tokenizer, dataPath, options, batchSize);
}

export async function evaluateLossOf(
    lm: EvalLm,
    tokenizer: DataTokenizer,
    dataPath: string,
    options: DataOptions = {},
    batchSize = 8
): Promise<EvalResult> {
    const data = await loadDataset(dataPath, tokenizer, {...options, packing: false});
    // the rule train applies: rows past the context are refused, not scored at positions the model never saw
    let longest = 0;
    for (const row of data.rows) longest = Math.max(longest, row.inputIds.length);
    checkRowsFitContext(lm.config, longest, "max_seq_length", data.options.maxSeqLength);
    const loader = new DataLoader(data.rows, {batchSize, padTokenId: padTokenIdOf(tokenizer), shuffle: false, seed: 0});
    let sum = 0,
        count = 0;
    for (const {batch} of loader.epoch()) {
        const r = await lm.lossSums(batch);
        sum += r.lossSum;
        count += r.targets;
        await yieldToEventLoop();
    }
    const loss = sum / Math.max(1, count);
    return {loss, perplexity: Math.exp(loss), tokens: count, rows: data.rows.length, stats: data.stats, warnings: data.warnings};
}
