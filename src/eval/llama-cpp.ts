// llama-cpp.ts: a GGUF file run by llama.cpp through node-llama-cpp, as an EvalLm (model.ts), so the gguf column
// of `qlora eval --compare` is scored by the same code as every other model. Tokens are qlora's (the GGUF vocab is
// the same tokenizer): llama.cpp is given token ids and gives back next-token probabilities (full softmax, f32) or
// greedy tokens; log-probabilities are taken here. node-llama-cpp is large and native: it is imported only when a
// GGUF file is evaluated. Rows and prompts run one after another on one llama.cpp sequence, which keeps the tokens
// a row shares with the previous one (few-shot prefixes) in its cache.
import os from "node:os";
import type {Llama, LlamaContext, LlamaContextSequence, LlamaModel, Token} from "node-llama-cpp";
import {QloraError} from "../errors.js";
import type {ModelConfig} from "../io/hf-config.js";
import {type EvalLm, lossFromTokenLogprobs, type ScoreRow, type TokenLogprob} from "./model.js";

/** the version the gguf column is tested with (package.json's optionalDependency: `npm install` brings it, `--omit=optional` leaves it out) */
export const NODE_LLAMA_CPP_VERSION = "3.21.1";

/** the smallest positive f32: llama.cpp's probabilities are f32, so a token may get exactly 0 */
const MIN_F32 = 1.401298464324817e-45;

export interface GgufLmOptions {
    /** cuda: llama.cpp may offload to the GPU (its prebuilt CUDA or Vulkan binary); cpu: the CPU binary only */
    device: "cpu" | "cuda";
    /** CPU threads (default: ggufThreads) */
    threads?: number;
}

export interface GgufLm extends EvalLm {
    /** the CPU threads llama.cpp evaluates with (its context's, once one is made) */
    readonly threads: number;
    /** frees the model and its context (llama.cpp's memory) */
    dispose(): Promise<void>;
}

/**
 * the threads a context is given: `requested`, else llama.cpp's own default (its cpu_get_num_math(): the physical
 * cores), at most the CPUs this process may run on. Left to node-llama-cpp 3.21.1, a context takes at least 4
 * threads whatever the machine has; llama.cpp's threads wait for each other at every op by spinning, so more
 * threads than cores cost a scheduler time slice per op: on 2 cores, 983 ms per decoded token of the embedded model
 * with 4 threads, 14 ms with 2, 2 ms with 1.
 */
export function ggufThreads(llama: Pick<Llama, "cpuMathCores">, requested: number | undefined): number {
    return requested ?? Math.max(1, Math.min(llama.cpuMathCores, os.availableParallelism()));
}

type NodeLlamaCpp = typeof import("node-llama-cpp");

const llamas = new Map<string, Promise<Llama>>();
/** llama.cpp's log lines: a load error says only "Failed to load model"; the reason is in the log */
const llamaLog: string[] = [];

function cannotLoad(cause: unknown): QloraError {
    const why = (cause instanceof Error ? cause.message : String(cause)).split("\n")[0];
    return new QloraError(
        `the gguf column runs the GGUF file with node-llama-cpp, which cannot be loaded (${why}); ` +
            `npm install node-llama-cpp@${NODE_LLAMA_CPP_VERSION} enables it`,
        {cause}
    );
}

/** node-llama-cpp and its llama.cpp binary (prebuilt; never built from source here), loaded once per process */
async function getLlamaFor(device: "cpu" | "cuda"): Promise<Llama> {
    let llama = llamas.get(device);
    if (!llama) {
        llama = (async () => {
            let mod: NodeLlamaCpp;
            try {
                mod = await import("node-llama-cpp");
            } catch (err) {
                throw cannotLoad(err);
            }
            try {
                return await mod.getLlama({
                    gpu: device === "cuda" ? "auto" : false,
                    build: "never",
                    logger: (level, message) => {
                        llamaLog.push(`${level}: ${message.trim()}`);
                        if (llamaLog.length > 200) llamaLog.splice(0, 100);
                    }
                });
            } catch (err) {
                throw cannotLoad(err);
            }
        })();
        llamas.set(device, llama);
        llama.catch(() => llamas.delete(device));
    }
    return llama;
}

/** loads node-llama-cpp and its binary now: a missing package fails before hours of other columns, not after */
export async function checkLlamaCpp(device: "cpu" | "cuda"): Promise<void> {
    await getLlamaFor(device);
}

/** opens a GGUF model file for evaluation; `config` is the config.json of the model it was exported from */
export async function openGgufLm(file: string, config: ModelConfig, opts: GgufLmOptions): Promise<GgufLm> {
    const llama = await getLlamaFor(opts.device);
    const threads = ggufThreads(llama, opts.threads);
    const before = llamaLog.length;
    let model: LlamaModel;
    try {
        model = await llama.loadModel({modelPath: file, gpuLayers: opts.device === "cuda" ? "auto" : 0});
    } catch (err) {
        const log = llamaLog.slice(before).slice(-4).join(" | ");
        throw new QloraError(`llama.cpp cannot load it (${(err as Error).message}${log ? `: ${log}` : ""})`, {
            file,
            cause: err
        });
    }
    // one sequence, rows one after another: node-llama-cpp 3.21.1 now and then returns another row's
    // probabilities when several sequences of a context are evaluated at once (measured: 4 of 18 batches of 8 rows
    // off by up to half in loss; none when evaluated one by one), so nothing here runs concurrently
    let context: LlamaContext | null = null;
    let sequence: LlamaContextSequence | null = null;
    /** the sequence, in a context of at least `tokens` positions: made again only when it is too small */
    const sequenceFor = async (tokens: number): Promise<LlamaContextSequence> => {
        if (!context || !sequence || context.contextSize < tokens) {
            // grown by doubling: a new context starts with an empty cache
            const grown = Math.max(Math.ceil(tokens / 256) * 256, 2 * (context?.contextSize ?? 0));
            const size = Math.min(config.maxPositionEmbeddings, grown);
            await context?.dispose();
            context = null;
            context = await model.createContext({contextSize: size, threads});
            sequence = context.getSequence();
        }
        return sequence;
    };
    /** the sequence keeps the first tokens it shares with `ids` (a few-shot prefix), at most `limit`; returns how many */
    const keepPrefix = async (seq: LlamaContextSequence, ids: number[], limit: number): Promise<number> => {
        const keep = Math.min(seq.compareContextTokens(ids as Token[]).firstDifferentIndex, limit);
        if (keep < seq.nextTokenIndex) await seq.eraseContextTokenRanges([{start: keep, end: seq.nextTokenIndex}]);
        return keep;
    };
    const scoreRow = async (row: ScoreRow): Promise<TokenLogprob[]> => {
        if (row.reads.length === 0) return [];
        const seq = await sequenceFor(row.ids.length);
        const wanted = new Set(row.reads.map((r) => r.at));
        // every read position is evaluated again: its probabilities are not kept in the cache
        const keep = await keepPrefix(seq, row.ids, Math.min(...wanted));
        const items = row.ids
            .slice(keep)
            .map((token, j) => (wanted.has(keep + j) ? ([token, {generateNext: {probabilities: true}}] as const) : token));
        const out = await seq.controlledEvaluate(items as Parameters<LlamaContextSequence["controlledEvaluate"]>[0]);
        return row.reads.map(({at, token}) => {
            const probabilities = out[at - keep]?.next.probabilities;
            if (!probabilities) throw new Error(`llama.cpp gave no probabilities at position ${at}`);
            const p = probabilities.get(token as Token) ?? 0;
            // the map is sorted, most likely first
            const top = probabilities.values().next().value ?? 0;
            return {logprob: Math.log(Math.max(p, MIN_F32)), greedy: p >= top};
        });
    };
    const lm: GgufLm = {
        config,
        rowOrder: "shared-prefix",
        get threads() {
            return context?.currentThreads ?? threads;
        },
        async tokenLogprobs(rows) {
            const out: TokenLogprob[][] = [];
            for (const row of rows) out.push(await scoreRow(row));
            return out;
        },
        // one prompt after another: each step yields the current prompt's token, null for the others
        async *greedySteps(prompts, opts) {
            const eos = new Set(opts.eosTokenIds);
            for (let b = 0; b < prompts.length; b++) {
                const ids = prompts[b];
                const seq = await sequenceFor(Math.min(config.maxPositionEmbeddings, ids.length + opts.maxNewTokens));
                let input = ids.slice(await keepPrefix(seq, ids, ids.length - 1));
                for (let made = 0; made < opts.maxNewTokens && !opts.cancelled(b); made++) {
                    const items = input.map((token, j) =>
                        j === input.length - 1
                            ? ([token, {generateNext: {token: true, options: {temperature: 0}}}] as const)
                            : token
                    );
                    const out = await seq.controlledEvaluate(items as Parameters<LlamaContextSequence["controlledEvaluate"]>[0]);
                    const token = out[input.length - 1]?.next.token;
                    if (token === undefined || token === null) throw new Error("llama.cpp generated no token");
                    yield prompts.map((_, r) => (r === b ? token : null));
                    if (eos.has(token)) break;
                    input = [token];
                }
            }
        },
        lossSums: (batch) => lossFromTokenLogprobs(lm, batch),
        async dispose() {
            await context?.dispose();
            context = null;
            sequence = null;
            await model.dispose();
        }
    };
    return lm;
}
