// evaluate.ts: loss and perplexity of a model (with or without an adapter) on a data file, with the
// training loss's definition (token mean over the targets; completion-only for instruction data by default).
import {DataLoader, loadDataset, padTokenIdOf, type DataOptions, type PrepareStats} from "../data/index.js";
import {DecoderTrainer} from "../model/training.js";
import type {LoadedModel} from "./models.js";

export interface EvalResult {
    loss: number;
    perplexity: number;
    /** target tokens the loss averages over */
    tokens: number;
    rows: number;
    stats: PrepareStats;
}

export async function evaluateLoss(loaded: LoadedModel, dataPath: string, options: DataOptions = {},
    batchSize = 8): Promise<EvalResult> {
    const data = await loadDataset(dataPath, loaded.tokenizer, {...options, packing: false});
    loaded.lora?.setTraining(false);
    const runner = new DecoderTrainer(loaded.model);
    const loader = new DataLoader(data.rows, {batchSize, padTokenId: padTokenIdOf(loaded.tokenizer), shuffle: false, seed: 0});
    let sum = 0, count = 0;
    for (const {batch} of loader.epoch()) {
        const r = runner.forwardBackward(batch, {lossScale: 0, gradientCheckpointing: false, noBackward: true});
        sum += r.lossSum;
        count += r.targets;
    }
    const loss = sum / Math.max(1, count);
    return {loss, perplexity: Math.exp(loss), tokens: count, rows: data.rows.length, stats: data.stats};
}
