// export-gguf.ts: `qlora export gguf` and `qlora export gguf-lora` as library calls: the options a JavaScript
// caller may get wrong are checked and the model folder is resolved (default: the embedded tiny-qwen2), then the
// pipeline of src/export/ runs (gguf-model.ts: a model, optionally with an adapter merged in; gguf-lora.ts: an
// adapter alone).
import {QloraError, quoteValue} from "../errors.js";
import {GGUF_OUTTYPES} from "../io/gguf-quants.js";
import {
    exportAdapterToGguf,
    type AdapterToGgufOptions,
    type ExportGgufLoraResult,
    type GgufLoraOuttype
} from "../export/gguf-lora.js";
import {exportModelToGguf, type ExportGgufResult, type ModelToGgufOptions} from "../export/gguf-model.js";
import {resolveModel} from "./models.js";

export type {ExportProgress} from "../export/gguf-output.js";
export type {ExportGgufLoraResult, ExportGgufResult, GgufLoraOuttype};

export interface ExportGgufOptions extends Omit<ModelToGgufOptions, "modelDir"> {
    /** Hugging Face model folder (default: the embedded tiny-qwen2) */
    modelDir?: string;
}

/** writes a llama.cpp GGUF model from a Hugging Face folder (and optionally a PEFT adapter merged into it) */
export async function exportGguf(opts: ExportGgufOptions): Promise<ExportGgufResult> {
    if (!GGUF_OUTTYPES.includes(opts.outtype))
        throw new QloraError(`--outtype ${quoteValue(opts.outtype)} is not one of ${GGUF_OUTTYPES.join(", ")}`);
    return exportModelToGguf({...opts, modelDir: await resolveModel(opts.modelDir)});
}

export interface ExportGgufLoraOptions extends Omit<AdapterToGgufOptions, "modelDir" | "outtype"> {
    /** the base model the adapter was trained on (only config.json is read) */
    modelDir?: string;
    /** f32 (default, as convert_lora_to_gguf) or f16 */
    outtype?: GgufLoraOuttype;
}

/** writes a PEFT LoRA adapter as a llama.cpp LoRA GGUF for the base model in modelDir */
export async function exportGgufLora(opts: ExportGgufLoraOptions): Promise<ExportGgufLoraResult> {
    const outtype = opts.outtype ?? "f32";
    if (outtype !== "f32" && outtype !== "f16")
        throw new QloraError(`--outtype ${quoteValue(outtype)} is not one of f32, f16 for a LoRA adapter`);
    return exportAdapterToGguf({...opts, outtype, modelDir: await resolveModel(opts.modelDir, {weights: false})});
}
