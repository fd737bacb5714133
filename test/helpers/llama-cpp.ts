// llama-cpp.ts: node-llama-cpp (llama.cpp's prebuilt CPU binary) as the consumer of exported GGUF files:
// greedy decoding from given token ids, and perplexity from the full next-token distributions.
import {getLlama, type Llama, type LlamaContextSequence, type LlamaModel, type Token} from "node-llama-cpp";

/**
 * one thread: the models under test are tiny, and llama.cpp's spinning thread barriers cost a scheduler time slice
 * per op when the machine is busy (seconds per token on a loaded 2-core CI runner)
 */
const TEST_THREADS = 1;

let llamaPromise: Promise<Llama> | null = null;
/** llama.cpp's log lines: load errors arrive only here (loadModel itself just says "Failed to load model") */
export const llamaLog: string[] = [];

/** the shared llama.cpp instance: CPU only, prebuilt binary, never a source build */
export function testLlama(): Promise<Llama> {
    llamaPromise ??= getLlama({
        gpu: false,
        build: "never",
        logger: (level, message) => {
            llamaLog.push(`${level}: ${message}`);
        }
    });
    return llamaPromise;
}

/** loads a GGUF model; on failure the error carries llama.cpp's last log lines */
export async function loadGguf(modelPath: string): Promise<LlamaModel> {
    const llama = await testLlama();
    const before = llamaLog.length;
    try {
        return await llama.loadModel({modelPath});
    } catch (err) {
        throw new Error(`${(err as Error).message}: ${llamaLog.slice(before).slice(-8).join(" | ")}`);
    }
}

export interface GreedyOptions {
    maxNewTokens: number;
    /** LoRA GGUF adapters applied to the context */
    lora?: {filePath: string; scale?: number}[];
    /** stop after one of these (it is included, as qlora's generate does) */
    eosTokenIds?: number[];
}

/** greedy continuation of `promptIds` (fed as tokens, so no tokenizer is involved) */
export async function llamaGreedy(model: LlamaModel, promptIds: number[], opts: GreedyOptions): Promise<number[]> {
    const context = await model.createContext({
        contextSize: Math.max(256, promptIds.length + opts.maxNewTokens + 16),
        threads: TEST_THREADS,
        lora: opts.lora ? {adapters: opts.lora.map((a) => ({filePath: a.filePath, scale: a.scale ?? 1}))} : undefined
    });
    try {
        const sequence = context.getSequence();
        const eos = new Set(opts.eosTokenIds ?? []);
        const out: number[] = [];
        let input: number[] = promptIds;
        while (out.length < opts.maxNewTokens) {
            const items = input.map((t, i) => (i === input.length - 1 ? ([t, {generateNext: {token: true}}] as const) : t));
            const result = await sequence.controlledEvaluate(items as Parameters<typeof sequence.controlledEvaluate>[0]);
            const token = result[input.length - 1]?.next.token;
            if (token === undefined || token === null) throw new Error("llama.cpp produced no token");
            out.push(token);
            if (eos.has(token)) break;
            input = [token];
        }
        return out;
    } finally {
        await context.dispose();
    }
}

/** perplexity exp(mean −log p(token[i+1] | tokens[..i])) over the text, in chunks that bound the memory used */
export async function llamaPerplexity(model: LlamaModel, tokens: number[], chunk = 48): Promise<number> {
    const context = await model.createContext({contextSize: Math.max(256, tokens.length + 16), threads: TEST_THREADS});
    try {
        const sequence = context.getSequence();
        let nll = 0,
            count = 0;
        for (let start = 0; start < tokens.length - 1; start += chunk) {
            const end = Math.min(start + chunk, tokens.length - 1);
            const items = tokens.slice(start, end).map((t) => [t, {generateNext: {probabilities: true}}] as const);
            const result = await sequence.controlledEvaluate(
                items as unknown as Parameters<typeof sequence.controlledEvaluate>[0]
            );
            for (let i = start; i < end; i++) {
                const probabilities = result[i - start]?.next.probabilities;
                if (!probabilities) throw new Error(`no probabilities at position ${i}`);
                nll -= Math.log(Math.max(probabilities.get(tokens[i + 1] as Token) ?? 0, 1e-30));
                count++;
            }
        }
        return Math.exp(nll / count);
    } finally {
        await context.dispose();
    }
}

/**
 * mean KL(reference ‖ llama.cpp) of the next-token distributions over every position of `tokens`;
 * `referenceLogits` is [tokens.length, V] (qlora's forward)
 */
export async function llamaMeanKl(
    model: LlamaModel,
    tokens: number[],
    referenceLogits: Float32Array,
    opts: {lora?: {filePath: string; scale?: number}[]} = {}
): Promise<{meanKl: number; top1Agreement: number}> {
    const V = referenceLogits.length / tokens.length;
    const context = await model.createContext({
        contextSize: Math.max(256, tokens.length + 16),
        threads: TEST_THREADS,
        lora: opts.lora ? {adapters: opts.lora.map((a) => ({filePath: a.filePath, scale: a.scale ?? 1}))} : undefined
    });
    try {
        const items = tokens.map((t) => [t, {generateNext: {probabilities: true}}] as const);
        const result = await context
            .getSequence()
            .controlledEvaluate(items as unknown as Parameters<LlamaContextSequence["controlledEvaluate"]>[0]);
        let kl = 0,
            agree = 0;
        for (let i = 0; i < tokens.length; i++) {
            const q = result[i]?.next.probabilities;
            if (!q) throw new Error(`no probabilities at position ${i}`);
            const row = referenceLogits.subarray(i * V, (i + 1) * V);
            let max = -Infinity,
                arg = 0;
            for (let v = 0; v < V; v++) if (row[v] > max) [max, arg] = [row[v], v];
            let sum = 0;
            for (let v = 0; v < V; v++) sum += Math.exp(row[v] - max);
            const logZ = max + Math.log(sum);
            // llama.cpp's probabilities are f32 and sum to 1 only up to rounding
            let sumQ = 0;
            for (const prob of q.values()) sumQ += prob;
            let rowKl = 0;
            for (let v = 0; v < V; v++) {
                const logP = row[v] - logZ;
                rowKl += Math.exp(logP) * (logP - Math.log(Math.max((q.get(v as Token) ?? 0) / sumQ, 1e-30)));
            }
            kl += rowKl;
            if (q.keys().next().value === arg) agree++;
        }
        return {meanKl: kl / tokens.length, top1Agreement: agree / tokens.length};
    } finally {
        await context.dispose();
    }
}
