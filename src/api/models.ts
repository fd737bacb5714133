// models.ts: loading a model folder (config, weights, tokenizer) as one object, the entry point of the API.
import {existsSync, statSync} from "node:fs";
import path from "node:path";
import {QloraError} from "../errors.js";
import {packageRoot} from "../backend/native.js";
import {DecoderModel} from "../model/decoder.js";
import {HfTokenizer} from "../tokenizer/index.js";

/** the model that ships inside the package, used when no --model is given */
export const DEFAULT_MODEL_DIR = path.join(packageRoot, "models", "tiny-qwen2");

export interface LoadedModel {
    dir: string;
    model: DecoderModel;
    tokenizer: HfTokenizer;
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
export async function loadModel(dir?: string): Promise<LoadedModel> {
    const resolved = resolveModelDir(dir);
    const model = await DecoderModel.load(resolved);
    const tokenizer = await HfTokenizer.load(resolved);
    return {dir: resolved, model, tokenizer};
}
