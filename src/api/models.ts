// models.ts: loading a model folder (config, weights, tokenizer) as one object, the entry point of the API.
import {existsSync, statSync} from "node:fs";
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {pathExists, readTextFile} from "../io/files.js";
import {MAX_CHAT_TEMPLATE_BYTES, readChatTemplateFile} from "../io/gguf-vocab.js";
import {
    cachedHubModelSync,
    fetchHubModel,
    HubNotFoundError,
    type HubModelRequest,
    type HubModelResult,
    isHubModelId
} from "../io/hub.js";
import {packageRoot} from "../backend/native.js";
import {chooseDevice, type DeviceChoice} from "../backend/cuda.js";
import type {CausalLm} from "../model/causal-lm.js";
import {CudaModel} from "../model/cuda-model.js";
import {DecoderModel} from "../model/decoder.js";
import {loadAdapter} from "../peft/adapter-files.js";
import type {LoraModel} from "../peft/inject.js";
import {bitsAndBytesConfig} from "../quant/config.js";
import {CHAT_TEMPLATE_FILE_NAME, HfTokenizer, TOKENIZER_FOLDER_FILES} from "../tokenizer/index.js";
import type {ModelConfig} from "../io/hf-config.js";

/** the model that ships inside the package, used when no --model is given */
export const DEFAULT_MODEL_DIR = path.join(packageRoot, "models", "tiny-qwen2");

export interface LoadedModel {
    dir: string;
    /** the model as loaded, in host memory (its layers carry the adapter) */
    model: DecoderModel;
    /** what generation, chat and evaluation run: the host model, or the model on the GPU */
    lm: CausalLm;
    device: "cpu" | "cuda";
    /** why that device, when it is worth telling (the GPU chosen, or passed over for a reason) */
    deviceNote: string | null;
    /** the tokenizer, with the chat template in use (the adapter's training format, by default) */
    tokenizer: HfTokenizer;
    /** the model's own tokenizer and chat template */
    baseTokenizer: HfTokenizer;
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
    /** where to run: auto (default: the GPU when one is usable), cuda, or cpu */
    device?: "auto" | "cpu" | "cuda";
    /**
     * the chat template: by default the adapter's (its training format, chat_template.jinja beside it) or else
     * the model's; "base" keeps the model's with an adapter; any other value is a Jinja file
     */
    template?: string;
}

/** the files of a model folder that qlora reads besides the weights: config.json and the tokenizer's */
const MODEL_TEXT_FILES: readonly string[] = ["config.json", ...TOKENIZER_FOLDER_FILES];

/**
 * The model folder `nameOrDir` names, the one resolver of --model and of the train config's model: a folder
 * that exists (it always wins), else a Hugging Face Hub id (ORG/NAME), fetched into the Hugging Face cache
 * as huggingface_hub does (only what is missing; HF_HUB_OFFLINE=1: the cache only, no network).
 * `weights: false` fetches the config and tokenizer files only.
 */
export async function resolveModel(nameOrDir?: string, opts: {revision?: string; weights?: boolean} = {}): Promise<string> {
    if (nameOrDir === undefined || existsSync(path.resolve(nameOrDir)) || !isHubModelId(nameOrDir))
        return resolveModelDir(nameOrDir);
    try {
        return (await downloadModel(nameOrDir, opts)).dir;
    } catch (err) {
        // ORG/NAME may also be a mistyped relative path: say that no such folder exists either
        if (err instanceof HubNotFoundError)
            throw new QloraError(`no folder ${path.resolve(nameOrDir)} exists; ${err.message}`, {cause: err});
        throw err;
    }
}

/** fetches the files of a Hub model that qlora reads into the Hugging Face cache (or opts.localDir) */
export function downloadModel(repoId: string, opts: Omit<HubModelRequest, "repoId" | "textFiles"> = {}): Promise<HubModelResult> {
    return fetchHubModel({...opts, repoId, textFiles: MODEL_TEXT_FILES});
}

/**
 * The model folder `dir` names, synchronously: a folder, or a Hub id already in the Hugging Face cache (this
 * never downloads; resolveModel does).
 */
export function resolveModelDir(dir: string | undefined): string {
    const resolved = path.resolve(dir ?? DEFAULT_MODEL_DIR);
    if (!existsSync(resolved)) {
        const cached = dir === undefined ? null : cachedHubModelSync(dir);
        if (cached) return cached;
        throw new QloraError(
            "the model folder does not exist (pass a Hugging Face model folder " +
                "with config.json, *.safetensors and tokenizer.json" +
                (dir !== undefined && isHubModelId(dir) ? `, or fetch the Hub model first: qlora download ${dir})` : ")"),
            {file: resolved}
        );
    }
    if (!statSync(resolved).isDirectory())
        throw new QloraError("expected a model folder, got a file " + "(pass the folder that holds config.json)", {
            file: resolved
        });
    return resolved;
}

/** loads config.json, the safetensors weights (fp32 on the CPU) and the tokenizer of a model folder */
export async function loadModel(dir?: string, opts: LoadModelOptions = {}): Promise<LoadedModel> {
    const resolved = await resolveModel(dir);
    const requested = opts.device ?? "auto";
    const choice = chooseDevice(requested);
    const device = choice.device;
    // the GPU computes in bf16, so a bf16 checkpoint is quantized from its bf16 values there (as QLoRA trains it)
    const computeDtype = device === "cuda" ? "bfloat16" : "float32";
    const quantization = opts.loadIn4bit ? bitsAndBytesConfig({load_in_4bit: true, bnb_4bit_compute_dtype: computeDtype}) : null;
    const model = await DecoderModel.load(resolved, {quantization});
    const baseTokenizer = await HfTokenizer.load(resolved);
    const lora = opts.adapter ? await loadAdapter(path.resolve(opts.adapter), model) : null;
    const tokenizer = await chatTemplateFor(baseTokenizer, opts.adapter, opts.template);
    const eosTokenIds = await stopTokenIds(resolved, model.config, tokenizer);
    return {
        dir: resolved,
        model,
        tokenizer,
        baseTokenizer,
        lora,
        eosTokenIds,
        ...onDevice(model, device, requested, deviceLine(choice))
    };
}

/** the tokenizer with the chat template LoadModelOptions.template asks for */
export async function chatTemplateFor(
    base: HfTokenizer,
    adapterDir: string | undefined,
    template: string | undefined
): Promise<HfTokenizer> {
    if (template === "base") return base;
    if (template !== undefined) {
        const file = path.resolve(template);
        return base.withChatTemplate(await readTextFile(file, {what: "chat template", maxBytes: MAX_CHAT_TEMPLATE_BYTES}), file);
    }
    if (adapterDir === undefined) return base;
    // an adapter trained by qlora carries its training format (older adapters and PEFT's may carry the base's)
    const trained = await readChatTemplateFile(path.resolve(adapterDir));
    return trained === null ? base : base.withChatTemplate(trained, path.join(path.resolve(adapterDir), CHAT_TEMPLATE_FILE_NAME));
}

/**
 * The same base with another adapter (PEFT's several adapters on one base model): the frozen weights are shared,
 * not copied; the adapter's layers wrap them in a copy of the model's layer table. On the GPU the variant gets
 * its own device copy of the base (one per adapter, for now).
 */
export async function withAdapter(base: LoadedModel, adapterDir: string): Promise<LoadedModel> {
    if (base.lora) throw new Error("withAdapter: the base already carries an adapter");
    const p = base.model.params;
    const model = new DecoderModel(base.model.config, {
        ...p,
        layers: p.layers.map((layer) => ({...layer, proj: {...layer.proj}}))
    });
    const lora = await loadAdapter(path.resolve(adapterDir), model);
    const tokenizer = await chatTemplateFor(base.baseTokenizer, adapterDir, undefined);
    return {...base, model, lora, tokenizer, ...onDevice(model, base.device, base.device, base.deviceNote)};
}

/** the model as generation runs it: the host model, or its copy on the GPU (auto falls back and says why) */
/** the device line a command prints: the GPU chosen, or passed over for a reason (silent without any GPU) */
export function deviceLine(choice: DeviceChoice): string | null {
    return choice.device === "cuda" || choice.gpuSeen ? choice.line : null;
}

function onDevice(
    model: DecoderModel,
    device: "cpu" | "cuda",
    requested: "auto" | "cpu" | "cuda",
    note: string | null
): Pick<LoadedModel, "lm" | "device" | "deviceNote"> {
    if (device === "cpu") return {lm: model, device, deviceNote: note};
    try {
        return {lm: new CudaModel(model), device, deviceNote: note};
    } catch (err) {
        // what the GPU path cannot run (head sizes other than 64, 96 and 128): auto falls back and says so
        if (requested === "cuda" || !(err instanceof QloraError)) throw err;
        return {lm: model, device: "cpu", deviceNote: `device: cpu (the GPU cannot run this model: ${err.message})`};
    }
}

/** generation_config.json is a few kB; anything above this is not one */
const MAX_GENERATION_CONFIG_BYTES = 16 << 20;

/** the ids generation stops at: config.json's, the tokenizer's eos token and generation_config.json's */
export async function stopTokenIds(dir: string, config: ModelConfig, tokenizer: HfTokenizer): Promise<number[]> {
    const eos = new Set<number>(config.eosTokenIds);
    if (tokenizer.eosTokenId !== null) eos.add(tokenizer.eosTokenId);
    for (const id of await generationConfigEos(dir)) eos.add(id);
    return [...eos];
}

/**
 * eos_token_id of generation_config.json (a number or a list), which chat models use to stop at end of turn.
 * A missing file is fine (config.json and the tokenizer decide); a broken one is an error, since ignoring it
 * would silently generate past the end of every turn.
 */
async function generationConfigEos(dir: string): Promise<number[]> {
    const file = path.join(dir, "generation_config.json");
    if (!(await pathExists(file))) return [];
    const text = await readTextFile(file, {what: "generation config", maxBytes: MAX_GENERATION_CONFIG_BYTES});
    let cfg: unknown;
    try {
        cfg = JSON.parse(text);
    } catch (err) {
        throw new QloraError(`is not valid JSON (${(err as Error).message}); fix it or delete it`, {file, cause: err});
    }
    if (cfg === null || typeof cfg !== "object" || Array.isArray(cfg))
        throw new QloraError("should hold a JSON object; fix it or delete it", {file});
    const eos = (cfg as {eos_token_id?: unknown}).eos_token_id;
    if (eos === undefined || eos === null) return [];
    const ids = Array.isArray(eos) ? eos : [eos];
    if (!ids.every((id) => Number.isSafeInteger(id) && (id as number) >= 0))
        throw new QloraError(`"eos_token_id" is ${quoteValue(eos)}, expected a token id or a list of token ids`, {file});
    return ids as number[];
}
