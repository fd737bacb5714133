// targets.ts: the qlora code each fuzz case runs, in the worker process: the library functions the CLI commands
// call, on the case's files. A target returns normally (ok), throws (the worker classifies the error), or reports
// numbers that came out non-finite although loading succeeded (a silent wrong result).
import {QloraError} from "../../src/errors.js";
import {fineTune} from "../../src/api/train.js";
import {loadTrainConfig} from "../../src/api/train-config.js";
import {exportGguf, exportGgufLora} from "../../src/api/export-gguf.js";
import {DataLoader, loadDataset, padTokenIdOf, type DataOptions} from "../../src/data/index.js";
import {SafetensorsCheckpoint} from "../../src/io/safetensors.js";
import {loadAdapter} from "../../src/peft/adapter-files.js";
import {DecoderModel} from "../../src/model/decoder.js";
import {HfTokenizer} from "../../src/tokenizer/index.js";
import type {TargetKind} from "./formats.js";

export interface TargetOutcome {
    /** where a NaN/Inf was found after a load that reported success */
    nonFinite?: string;
}

/** the first non-finite Float32Array value reachable from `root` (the loaded weights), as a path */
function findNonFinite(root: unknown, label: string): string | null {
    const seen = new Set<unknown>();
    const walk = (v: unknown, where: string, depth: number): string | null => {
        if (v === null || typeof v !== "object" || seen.has(v) || depth > 8) return null;
        seen.add(v);
        if (v instanceof Float32Array || v instanceof Float64Array) {
            for (let i = 0; i < v.length; i++) if (!Number.isFinite(v[i])) return `${where}[${i}] = ${v[i]}`;
            return null;
        }
        if (ArrayBuffer.isView(v)) return null;
        const entries = v instanceof Map ? [...v.entries()].map(([k, x]) => [String(k), x] as const) : Object.entries(v);
        for (const [k, x] of entries) {
            const hit = walk(x, `${where}.${k}`, depth + 1);
            if (hit) return hit;
        }
        return null;
    };
    return walk(root, label, 0);
}

/** a 3-token forward: a model that loaded must give finite logits */
function forwardCheck(model: DecoderModel): string | null {
    const vocab = Math.max(1, model.config.vocabSize);
    const ids = Int32Array.from([0, 1, 2].map((i) => i % vocab));
    const logits = model.forward(ids, 1, ids.length);
    for (let i = 0; i < logits.length; i++) if (!Number.isFinite(logits[i])) return `forward logits[${i}] = ${logits[i]}`;
    return null;
}

let cachedTokenizer: {dir: string; tokenizer: HfTokenizer} | null = null;

/** the unmutated seed tokenizer, loaded once per worker */
async function seedTokenizer(dir: string): Promise<HfTokenizer> {
    if (cachedTokenizer?.dir !== dir) cachedTokenizer = {dir, tokenizer: await HfTokenizer.load(dir)};
    return cachedTokenizer.tokenizer;
}

const CHAT = [
    {role: "system", content: "You are brief."},
    {role: "user", content: "把下面的数字相加。 3 5"},
    {role: "assistant", content: "8"},
    {role: "user", content: "hi 😀"}
];

export async function runTarget(kind: TargetKind, p: Record<string, unknown>): Promise<TargetOutcome> {
    switch (kind) {
        case "load-model": {
            const dir = p.model as string;
            // every tensor, also those the model does not use, through the raw reader
            const ckpt = await SafetensorsCheckpoint.open(dir);
            try {
                for (const name of ckpt.names()) await ckpt.readTyped(name);
            } finally {
                await ckpt.close();
            }
            const model = await DecoderModel.load(dir);
            const bad = findNonFinite(model.params, "params") ?? forwardCheck(model);
            return bad ? {nonFinite: bad} : {};
        }
        case "load-adapter": {
            const model = await DecoderModel.load(p.model as string);
            const lora = await loadAdapter(p.adapter as string, model);
            const bad =
                findNonFinite(
                    lora.trainableTensors().map((t) => ({[t.name]: t.param})),
                    "adapter"
                ) ?? forwardCheck(model);
            return bad ? {nonFinite: bad} : {};
        }
        case "resume":
            await fineTune(p.config as Record<string, unknown>);
            return {};
        case "export-gguf":
            await exportGguf({
                modelDir: p.model as string,
                adapterDir: (p.adapter as string | null) ?? undefined,
                outtype: p.outtype as "f32",
                out: p.out as string
            });
            return {};
        case "export-gguf-lora":
            await exportGgufLora({
                adapterDir: p.adapter as string,
                modelDir: p.model as string,
                out: p.out as string,
                outtype: p.outtype as "f32"
            });
            return {};
        case "load-dataset": {
            const tokenizer = await seedTokenizer(p.tokenizer as string);
            const prepared = await loadDataset(p.data as string, tokenizer, p.options as DataOptions);
            // the batches training would draw (collation of whatever rows came out)
            const loader = new DataLoader(prepared.rows, {
                batchSize: 2,
                padTokenId: padTokenIdOf(tokenizer),
                shuffle: true,
                seed: 1
            });
            for (const _ of loader.epoch()) {
                /* collate every batch */
            }
            return {};
        }
        case "tokenizer": {
            const tokenizer = await HfTokenizer.load(p.model as string);
            const text = tokenizer.hasChatTemplate
                ? tokenizer.applyChatTemplate(CHAT, {addGenerationPrompt: true})
                : "hello 世界";
            const ids = tokenizer.encode(text);
            tokenizer.encode(text, {addSpecialTokens: true});
            tokenizer.decode(ids);
            tokenizer.decode(ids, {skipSpecialTokens: true});
            const stream = tokenizer.createStreamDecoder();
            for (const id of ids) stream.push(id);
            stream.flush();
            // chat data through the template with assistant masks, as training prepares it
            if (tokenizer.hasChatTemplate) await loadDataset(p.messages as string, tokenizer, {max_seq_length: 64});
            return {};
        }
        // the harness's own test (test/harden-fuzz.test.ts): one target per way a case can end
        case "probe-hang":
            await new Promise(() => undefined);
            return {};
        case "probe-alloc": {
            const held: Buffer[] = [];
            for (;;) {
                held.push(Buffer.alloc(64 * 2 ** 20, 1));
                await new Promise((r) => setTimeout(r, 5));
            }
        }
        case "probe-abort":
            process.abort();
            return {};
        case "probe-throw":
            throw new TypeError("probe: not a QloraError");
        case "probe-escape":
            setTimeout(() => {
                throw new Error("probe: thrown from a timer");
            }, 0);
            await new Promise((r) => setTimeout(r, 1000));
            return {};
        case "probe-qlora-error": {
            const err = new QloraError("probe: a clean error", {file: "probe.json"});
            // set after construction: QloraError folds line breaks itself, the harness must catch them anyway
            if (typeof p.message === "string") err.message = p.message;
            throw err;
        }
        case "train-config": {
            const config = await loadTrainConfig(p.config as string, ["--output_dir", p.out as string, "--max_steps", "2"]);
            // bounded work: a valid config with many micro-batches per step is not a hang
            if (config.gradient_accumulation_steps > 4) config.gradient_accumulation_steps = 4;
            await fineTune(config as unknown as Record<string, unknown>);
            return {};
        }
    }
}
