// models.ts: loading a model folder (config, weights, tokenizer) as one object, the entry point of the API.
import {existsSync, statSync} from "node:fs";
import {readFile} from "node:fs/promises";
import path from "node:path";
import {QloraError} from "../errors.js";
import {packageRoot} from "../backend/native.js";
import {DecoderModel} from "../model/decoder.js";
import {loadAdapter, type LoraModel} from "../lora/adapter.js";
import {bitsAndBytesConfig} from "../quant/config.js";
import {HfTokenizer} from "../tokenizer/index.js";

/** the model that ships inside the package, used when no --model is given */
export const DEFAULT_MODEL_DIR = path.join(packageRoot, "models", "tiny-qwen2");

export interface LoadedModel {
    dir: string;
    model: DecoderModel;
    tokenizer: HfTokenizer;
    /** the adapter applied, when one was given */
    lora: LoraModel | null;
    /** eos ids to stop on: config.json, generation_config.json and the tokenizer's eos token */
    eosTokenIds: number[];
}

export interface LoadModelOptions {
    /** a PEFT adapter folder to apply */
    adapter?: string;
    /** quantize the projections to NF4 with double quantization as they load (as QLoRA trains them) */
    loadIn4bit?: boolean;
}

export function resolveModelDir(dir: string | undefined): string {
    const resolved = path.resolve(dir ?? DEFAULT_MODEL_DIR);
    if (!existsSync(resolved)) throw new QloraError("the model folder does not exist (pass a Hugging Face model folder " +
        "with config.json, *.safetensors and tokenizer.json)", {file: resolved});
    if (!statSync(resolved).isDirectory()) throw new QloraError("expected a model folder, got a file " +
        "(pass the folder that holds config.json)", {file: resolved});
    return resolved;
}

/** loads config.json, the safetensors weights (fp32 on the CPU) and the tokenizer of a model folder */
export async function loadModel(dir?: string, opts: LoadModelOptions = {}): Promise<LoadedModel> {
    const resolved = resolveModelDir(dir);
    const quantization = opts.loadIn4bit ? bitsAndBytesConfig({load_in_4bit: true, bnb_4bit_compute_dtype: "float32"}) : null;
    const model = await DecoderModel.load(resolved, {quantization});
    const tokenizer = await HfTokenizer.load(resolved);
    const lora = opts.adapter ? await loadAdapter(path.resolve(opts.adapter), model) : null;
    const eos = new Set<number>(model.config.eosTokenIds);
    if (tokenizer.eosTokenId !== null) eos.add(tokenizer.eosTokenId);
    for (const id of await generationConfigEos(resolved)) eos.add(id);
    return {dir: resolved, model, tokenizer, lora, eosTokenIds: [...eos]};
}

/** eos_token_id of generation_config.json (a number or a list), which chat models use to stop at end of turn */
async function generationConfigEos(dir: string): Promise<number[]> {
    try {
        const cfg = JSON.parse(await readFile(path.join(dir, "generation_config.json"), "utf8")) as {eos_token_id?: unknown};
        const eos = cfg.eos_token_id;
        if (typeof eos === "number") return [eos];
        if (Array.isArray(eos)) return eos.filter((x): x is number => typeof x === "number");
    } catch {
        // no generation_config.json, or an unreadable one: config.json and the tokenizer decide
    }
    return [];
}
