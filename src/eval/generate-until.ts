// generate-until.ts: greedy generation until a stop string, as lm-evaluation-harness's generate_until: the prompt
// keeps its last (context length - max_gen_toks) tokens, decoding stops at an end-of-sequence token, at
// max_gen_toks, or when the text reaches one of the stop strings (the text is cut before it). Prompts are batched
// in the model's order (longest first, or by their tokens for llama.cpp); the model only decodes (model.ts
// greedySteps: a CausalLm's decodeBatchSteps, or llama.cpp); the text, the stop strings and the counts are decided
// here, the same for every model.
import {QloraError} from "../errors.js";
import {StopMatcher} from "../model/stop-strings.js";
import type {StreamDecoder} from "../tokenizer/index.js";
import {type EvalLm, rowOrder, yieldToEventLoop} from "./model.js";

export interface GenerationModel {
    tokenizer: {encode(text: string): number[]; createStreamDecoder(options?: {skipSpecialTokens?: boolean}): StreamDecoder};
    eosTokenIds: number[];
}

export interface GenerateUntilOptions {
    until: readonly string[];
    maxGenToks: number;
    batchSize: number;
    onProgress?: (done: number, total: number) => void;
}

export interface GenerateUntilResult {
    /** the generated text, cut before the first stop string */
    text: string;
    /** the prompt lost tokens from the left to leave room for max_gen_toks */
    truncated: boolean;
    /** tokens generated (the stop string's included) */
    tokens: number;
}

export async function generateUntil(
    lm: EvalLm,
    model: GenerationModel,
    prompts: string[],
    opts: GenerateUntilOptions
): Promise<GenerateUntilResult[]> {
    const context = lm.config.maxPositionEmbeddings;
    const maxPrompt = context - opts.maxGenToks;
    if (maxPrompt < 1)
        throw new QloraError(
            `max_gen_toks ${opts.maxGenToks} leaves no room for the prompt in the model's context of ${context} tokens; ` +
                "lower generation_kwargs.max_gen_toks"
        );
    const encoded = prompts.map((p) => model.tokenizer.encode(p));
    const results: GenerateUntilResult[] = encoded.map((ids) => ({text: "", truncated: ids.length > maxPrompt, tokens: 0}));
    const order = rowOrder(encoded, lm.rowOrder);
    const eos = new Set(model.eosTokenIds);
    let done = 0;
    for (let start = 0; start < order.length; start += opts.batchSize) {
        const batch = order.slice(start, start + opts.batchSize);
        const decoders = batch.map(() => model.tokenizer.createStreamDecoder({skipSpecialTokens: true}));
        const stops = batch.map(() => new StopMatcher(opts.until));
        const stopped = batch.map(() => false);
        const texts = batch.map(() => "");
        const steps = lm.greedySteps(
            batch.map((i) => {
                const ids = encoded[i].slice(-maxPrompt);
                // an empty prompt starts from the end-of-text token, as the harness does
                return ids.length > 0 ? ids : [model.eosTokenIds[0] ?? 0];
            }),
            {maxNewTokens: opts.maxGenToks, eosTokenIds: [...eos], cancelled: (b) => stopped[b]}
        );
        for await (const step of steps) {
            step.forEach((id, b) => {
                if (id === null || stopped[b]) return;
                results[batch[b]].tokens++;
                if (eos.has(id)) return;
                const piece = stops[b].push(decoders[b].push(id));
                texts[b] += piece.text;
                if (piece.stopped) stopped[b] = true;
            });
            await yieldToEventLoop();
        }
        batch.forEach((i, b) => {
            results[i].text = stopped[b] ? texts[b] : texts[b] + stops[b].flush(decoders[b].flush());
        });
        done += batch.length;
        opts.onProgress?.(done, prompts.length);
    }
    return results;
}
