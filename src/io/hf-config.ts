// Hugging Face config.json for the decoder family we implement (llama, qwen2, qwen3, mistral, phi3, gemma3_text), normalized to
// one camelCase shape, plus the RoPE inverse frequencies transformers derives from it.
//
// Defaults follow transformers' LlamaConfig / Qwen2Config / Qwen3Config / MistralConfig / Phi3Config / Gemma3TextConfig for keys a
// file may leave out. Both the
// transformers 4 layout (top-level rope_theta, rope_scaling, torch_dtype) and the transformers 5 one
// (rope_parameters, dtype) are accepted.

import {promises as fs} from "node:fs";
import path from "node:path";
import type {GatedAct} from "../backend/backend.js";
import {QloraError, quoteValue} from "../errors.js";
import {readTextFile} from "./files.js";

export type ModelType = "llama" | "qwen2" | "qwen3" | "mistral" | "phi3" | "gemma3_text";

const SUPPORTED_MODEL_TYPES: readonly ModelType[] = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text"];

/** the MLP's activation as config.json names it (hidden_act; gemma3: hidden_activation) */
export type HiddenAct = "silu" | "gelu_pytorch_tanh";

/** the backend's gated activation for each: SwiGLU's silu, Gemma's GELU with the tanh approximation */
const GATED_ACT_OF: Record<HiddenAct, GatedAct> = {silu: "silu", gelu_pytorch_tanh: "gelu_tanh"};

/** the Backend.gatedAct activation of a config's MLP */
export function gatedActOf(hiddenAct: HiddenAct): GatedAct {
    return GATED_ACT_OF[hiddenAct];
}

export type RopeType = "default" | "linear" | "dynamic" | "llama3" | "yarn" | "longrope";

const SUPPORTED_ROPE_TYPES: readonly RopeType[] = ["default", "linear", "dynamic", "llama3", "yarn", "longrope"];

export interface RopeScaling {
    type: RopeType;
    factor?: number;
    lowFreqFactor?: number;
    highFreqFactor?: number;
    originalMaxPositionEmbeddings?: number;
    betaFast?: number;
    betaSlow?: number;
    attentionFactor?: number;
    mscale?: number;
    mscaleAllDim?: number;
    /** the scaling object as written in the file */
    raw: Record<string, unknown>;
}

export interface ModelConfig {
    modelType: ModelType;
    architectures: string[];
    vocabSize: number;
    hiddenSize: number;
    intermediateSize: number;
    numHiddenLayers: number;
    numAttentionHeads: number;
    numKeyValueHeads: number;
    headDim: number;
    /** the dimensions of each head that RoPE rotates: head_dim × partial_rotary_factor (all of them unless set) */
    rotaryDim: number;
    /** qwen3, gemma3: RMSNorm over each head of q and k (q_norm, k_norm) before RoPE */
    qkNorm: boolean;
    /** gemma3: every RMSNorm multiplies by (1 + weight) (Gemma3RMSNorm), the checkpoint holds weight - 1 */
    rmsNormUnitOffset: boolean;
    /**
     * gemma3: post_attention_layernorm normalizes the attention's output before the residual add, and the MLP sits
     * between pre_feedforward_layernorm and post_feedforward_layernorm (Gemma3DecoderLayer)
     */
    sandwichNorms: boolean;
    /** gemma3: the embeddings are multiplied by sqrt(hidden_size) (in the activation dtype, as transformers casts it); null: not */
    embedScale: number | null;
    /** the attention's score scale: head_dim^-0.5, or gemma3's query_pre_attn_scalar^-0.5 */
    attentionScale: number;
    /** gemma3: logits = cap tanh(logits / cap) (final_logit_softcapping), in the loss and in generation; null: none */
    finalLogitSoftcap: number | null;
    /** gemma3: the RoPE of sliding layers (rope_local_base_freq, or rope_parameters.sliding_attention); null: one RoPE */
    localRope: {theta: number; scaling: RopeScaling | null} | null;
    /** phi3: q, k, v in one qkv_proj and gate, up in one gate_up_proj (PEFT targets the fused modules) */
    fusedProjections: boolean;
    rmsNormEps: number;
    ropeTheta: number;
    ropeScaling: RopeScaling | null;
    maxPositionEmbeddings: number;
    tieWordEmbeddings: boolean;
    /** bias on q_proj, k_proj, v_proj (qwen2: always; llama: the attention_bias key) */
    attentionBias: boolean;
    /** bias on o_proj (llama: attention_bias; qwen2 and mistral: never) */
    attentionOutputBias: boolean;
    /** bias on gate/up/down projections (llama: mlp_bias) */
    mlpBias: boolean;
    /** silu (SwiGLU) or gelu_pytorch_tanh (gemma3); other activations are rejected */
    hiddenAct: HiddenAct;
    /** the sliding window's width (transformers' config.sliding_window once resolved), null when no layer slides */
    slidingWindow: number | null;
    /** transformers' layer_types: which layers attend through the window (attentionWindow gives a layer's width) */
    layerTypes: LayerType[];
    bosTokenId: number | null;
    eosTokenIds: number[];
    padTokenId: number | null;
    torchDtype: "float32" | "float16" | "bfloat16" | null;
    quantizationConfig: Record<string, unknown> | null;
    /** the whole file as parsed */
    raw: Record<string, unknown>;
    /** the file the config came from (for messages) */
    file: string;
}

/** transformers' names of a layer's attention (config.layer_types) */
export type LayerType = "full_attention" | "sliding_attention";

const LAYER_TYPES: readonly LayerType[] = ["full_attention", "sliding_attention"];

/**
 * the attention window of layer l: 0 for full attention, else W, and the query at position i then sees the keys
 * j with i - W < j <= i (transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window; flash-attn's
 * window_size = (W - 1, 0)): W keys counting its own
 */
export function attentionWindow(cfg: Pick<ModelConfig, "layerTypes" | "slidingWindow">, l: number): number {
    return cfg.layerTypes[l] === "sliding_attention" && cfg.slidingWindow !== null ? cfg.slidingWindow : 0;
}

export const CONFIG_FILE_NAME = "config.json";

/** a config.json is a few kB; anything above this is not one */
export const MAX_CONFIG_BYTES = 16 << 20;

/**
 * Sanity bounds on sizes, checked before anything is built from them (the real check is against the checkpoint's
 * tensors, in model/weights.ts; these keep the paths that read only config.json from allocating from a lie).
 * No released model has more than a few hundred layers; one tensor must fit in one typed array.
 */
export const MAX_HIDDEN_LAYERS = 10_000;
export const MAX_TENSOR_ELEMENTS = 2 ** 32;

/** Reads and validates `<dir>/config.json` (a path to the config file itself works too). */
export async function loadModelConfig(dir: string): Promise<ModelConfig> {
    const givenFile = dir.endsWith(".json") && (await fs.stat(dir).catch(() => null))?.isFile();
    const file = givenFile ? dir : path.join(dir, CONFIG_FILE_NAME);
    let text: string;
    try {
        // readTextFile refuses a FIFO or device instead of blocking on it, and caps the size
        text = await readTextFile(file, {what: "config file", maxBytes: MAX_CONFIG_BYTES});
    } catch (err) {
        const code = ((err as Error).cause as NodeJS.ErrnoException | undefined)?.code;
        if (code === "ENOENT" || code === "ENOTDIR") {
            throw new QloraError(
                `has no ${CONFIG_FILE_NAME}; a Hugging Face model folder needs config.json next to its weights ` +
                    "(download the whole model repository, not only the weights)",
                {file: dir, cause: err}
            );
        }
        throw err;
    }
    let json: unknown;
    try {
        json = JSON.parse(text);
    } catch (err) {
        throw new QloraError(`is not valid JSON (${(err as Error).message}); re-download it or fix the syntax`, {
            file,
            cause: err
        });
    }
    return parseModelConfig(json, file);
}

// ------------------------------------------------------------------
// typed key readers: each error names the file and the key

class ConfigReader {
    constructor(
        readonly json: Record<string, unknown>,
        readonly file: string
    ) {}

    fail(key: string, message: string): never {
        throw new QloraError(`"${key}" ${message}`, {file: this.file});
    }

    has(key: string): boolean {
        return this.json[key] !== undefined && this.json[key] !== null;
    }

    positiveInt(key: string, fallback?: number): number {
        const value = this.json[key];
        if (value === undefined || value === null) {
            if (fallback !== undefined) return fallback;
            this.fail(key, "is missing; every model config needs it (is this a complete Hugging Face config.json?)");
        }
        if (typeof value !== "number" || !Number.isSafeInteger(value) || value <= 0) {
            this.fail(key, `is ${quoteValue(value)}, expected a positive integer`);
        }
        return value;
    }

    positiveNumber(key: string, fallback?: number): number {
        const value = this.json[key];
        if (value === undefined || value === null) {
            if (fallback !== undefined) return fallback;
            this.fail(key, "is missing; every model config needs it");
        }
        if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
            this.fail(key, `is ${quoteValue(value)}, expected a positive number`);
        }
        return value;
    }

    boolean(key: string, fallback: boolean): boolean {
        const value = this.json[key];
        if (value === undefined || value === null) return fallback;
        if (typeof value !== "boolean") this.fail(key, `is ${quoteValue(value)}, expected true or false`);
        return value;
    }

    tokenId(key: string): number | null {
        const value = this.json[key];
        if (value === undefined || value === null) return null;
        if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) {
            this.fail(key, `is ${quoteValue(value)}, expected a token id (a non-negative integer) or null`);
        }
        return value;
    }

    tokenIds(key: string): number[] {
        const value = this.json[key];
        if (value === undefined || value === null) return [];
        const list = Array.isArray(value) ? value : [value];
        for (const id of list) {
            if (typeof id !== "number" || !Number.isSafeInteger(id) || id < 0) {
                this.fail(key, `is ${quoteValue(value)}, expected a token id or a list of token ids`);
            }
        }
        return list as number[];
    }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
    return value !== null && typeof value === "object" && !Array.isArray(value);
}

// ------------------------------------------------------------------
// parsing

/** Validates a parsed config.json; `file` is used in error messages. */
export function parseModelConfig(json: unknown, file: string): ModelConfig {
    if (!isPlainObject(json)) {
        throw new QloraError(`should hold a JSON object, found ${Array.isArray(json) ? "an array" : quoteValue(json)}`, {file});
    }
    const config: ConfigReader = new ConfigReader(json, file);

    const modelType = json.model_type;
    if (typeof modelType !== "string") {
        config.fail(
            "model_type",
            `is ${quoteValue(modelType)}; a Hugging Face config.json names its architecture in model_type (supported: ${SUPPORTED_MODEL_TYPES.join(", ")})`
        );
    }
    if (!(SUPPORTED_MODEL_TYPES as readonly string[]).includes(modelType)) {
        throw new QloraError(`model_type "${modelType}" is not supported (supported: ${SUPPORTED_MODEL_TYPES.join(", ")})`, {
            file
        });
    }
    const family = modelType as ModelType;

    const architectures = json.architectures ?? [];
    if (!Array.isArray(architectures) || !architectures.every((a) => typeof a === "string")) {
        config.fail("architectures", `is ${quoteValue(architectures)}, expected a list of class names`);
    }

    const vocabSize = config.positiveInt("vocab_size");
    const hiddenSize = config.positiveInt("hidden_size");
    const intermediateSize = config.positiveInt("intermediate_size");
    const numHiddenLayers = config.positiveInt("num_hidden_layers");
    const numAttentionHeads = config.positiveInt("num_attention_heads");
    const numKeyValueHeads = config.positiveInt("num_key_value_heads", numAttentionHeads);
    if (numAttentionHeads % numKeyValueHeads !== 0) {
        config.fail(
            "num_key_value_heads",
            `is ${numKeyValueHeads}, which does not divide num_attention_heads (${numAttentionHeads}); grouped-query attention needs an even split`
        );
    }
    let headDim: number;
    if (config.has("head_dim")) {
        headDim = config.positiveInt("head_dim");
    } else if (family === "qwen3") {
        headDim = 128; // Qwen3Config's default: its head size does not follow from hidden_size
    } else if (family === "gemma3_text") {
        headDim = 256; // Gemma3TextConfig's default
    } else {
        if (hiddenSize % numAttentionHeads !== 0) {
            config.fail(
                "hidden_size",
                `is ${hiddenSize}, not divisible by num_attention_heads (${numAttentionHeads}); give head_dim explicitly`
            );
        }
        headDim = hiddenSize / numAttentionHeads;
    }
    if (headDim % 2 !== 0) {
        config.fail(
            config.has("head_dim") ? "head_dim" : "hidden_size",
            `gives a head dimension of ${headDim}; rotary embeddings rotate pairs of dimensions, so it must be even`
        );
    }
    if (numHiddenLayers > MAX_HIDDEN_LAYERS) {
        config.fail(
            "num_hidden_layers",
            `is ${numHiddenLayers}, more than the ${MAX_HIDDEN_LAYERS} qlora accepts ` +
                "(no released model has more than a few hundred); is config.json corrupt?"
        );
    }
    const matrices: Array<[string, number, number]> = [
        [`"vocab_size" x "hidden_size" (the embedding)`, vocabSize, hiddenSize],
        [`"num_attention_heads" x "head_dim" x "hidden_size" (q_proj)`, numAttentionHeads * headDim, hiddenSize],
        [`"intermediate_size" x "hidden_size" (the MLP projections)`, intermediateSize, hiddenSize]
    ];
    for (const [what, rows, cols] of matrices) {
        if (rows * cols > MAX_TENSOR_ELEMENTS) {
            throw new QloraError(
                `${what} = ${rows} x ${cols} values in one tensor, more than the ${MAX_TENSOR_ELEMENTS} ` +
                    "one tensor can hold; is config.json corrupt?",
                {file}
            );
        }
    }

    const rmsNormEps = config.positiveNumber("rms_norm_eps", family === "phi3" ? 1e-5 : 1e-6);
    const maxPositionEmbeddings = config.positiveInt(
        "max_position_embeddings",
        family === "mistral"
            ? 4096 * 32
            : family === "qwen2" || family === "qwen3"
              ? 32768
              : family === "phi3"
                ? 4096
                : family === "gemma3_text"
                  ? 131072
                  : 2048
    );
    const gemma = family === "gemma3_text";

    const ropeParameters = json.rope_parameters;
    if (ropeParameters !== undefined && ropeParameters !== null && !isPlainObject(ropeParameters)) {
        config.fail(
            "rope_parameters",
            `is ${quoteValue(ropeParameters)}, expected an object such as {"rope_type": "default", "rope_theta": 10000}`
        );
    }
    let ropeTheta: number, ropeScaling: RopeScaling | null;
    let localRope: ModelConfig["localRope"] = null;
    if (gemma)
        ({ropeTheta, ropeScaling, localRope} = readGemmaRope(config, isPlainObject(ropeParameters) ? ropeParameters : null));
    else {
        ropeTheta = readRopeTheta(config, isPlainObject(ropeParameters) ? ropeParameters : null);
        ropeScaling = readRopeScaling(config, isPlainObject(ropeParameters) ? ropeParameters : null);
    }
    // transformers 5 keeps partial_rotary_factor in rope_parameters, 4 at the top level
    const partial =
        json.partial_rotary_factor ??
        (isPlainObject(ropeParameters) ? ropeParameters.partial_rotary_factor : undefined) ??
        ropeScaling?.raw.partial_rotary_factor ??
        1;
    if (typeof partial !== "number" || !(partial > 0 && partial <= 1))
        config.fail("partial_rotary_factor", `is ${quoteValue(partial)}, expected a number in (0, 1]`);
    const rotaryDim = Math.trunc(headDim * partial);
    if (rotaryDim % 2 !== 0 || rotaryDim === 0)
        config.fail(
            "partial_rotary_factor",
            `gives ${rotaryDim} rotary dimensions of the ${headDim} in a head; RoPE rotates pairs, so it must be even and positive`
        );
    // transformers' Llama/Qwen2/Qwen3/Mistral rotate every dimension of a head (their apply_rotary_pos_emb cannot
    // take fewer); Phi3's rotates the first head_dim x partial_rotary_factor and passes the rest through
    if (rotaryDim !== headDim && family !== "phi3")
        config.fail(
            "partial_rotary_factor",
            `is ${partial}: RoPE over ${rotaryDim} of the ${headDim} dimensions of a head is not ` +
                `supported for model_type ${quoteValue(json.model_type)} (transformers rotates all of them); remove the key or set it to 1`
        );
    if (family === "phi3") {
        // Phi3Attention splits qkv_proj by hidden_size / num_attention_heads; a head_dim that differs is a broken file
        if (headDim * numAttentionHeads !== hiddenSize)
            config.fail(
                "head_dim",
                `is ${headDim}, but a phi3 model's heads split hidden_size ${hiddenSize} into ${numAttentionHeads} heads of ${hiddenSize / numAttentionHeads}`
            );
        // Phi3's residual and embedding dropout would change training; released Phi-3/Phi-4 configs set them to 0
        for (const key of ["resid_pdrop", "embd_pdrop"]) {
            const p = json[key] ?? 0;
            if (p !== 0)
                config.fail(
                    key,
                    `is ${quoteValue(p)}; qlora implements Phi-3 without residual/embedding dropout (set it to 0.0)`
                );
        }
    }

    if (ropeScaling?.type === "longrope") {
        const key = json.rope_scaling ? "rope_scaling" : "rope_parameters";
        for (const name of ["short_factor", "long_factor"]) {
            const list = ropeScaling.raw[name] as number[];
            if (list.length !== rotaryDim / 2)
                config.fail(
                    `${key}.${name}`,
                    `has ${list.length} entries; longrope needs one per rotary frequency (${rotaryDim / 2} = head_dim x partial_rotary_factor / 2)`
                );
        }
    }

    // Gemma3MLP reads hidden_activation (hidden_act is an older key some files still carry); the others hidden_act
    const actKey = gemma ? "hidden_activation" : "hidden_act";
    const hiddenAct = json[actKey] ?? (gemma ? "gelu_pytorch_tanh" : "silu");
    if (hiddenAct !== (gemma ? "gelu_pytorch_tanh" : "silu")) {
        config.fail(
            actKey,
            gemma
                ? `is ${quoteValue(hiddenAct)}; qlora implements Gemma 3's GELU-tanh gated MLP, "gelu_pytorch_tanh"`
                : `is ${quoteValue(hiddenAct)}; qlora implements the SwiGLU MLP of llama/qwen2/qwen3/mistral/phi3, which uses "silu"`
        );
    }
    const gemmaKeys = gemma ? readGemmaKeys(config, hiddenSize, numAttentionHeads) : null;

    // qwen2 always puts a bias on q/k/v and never on o_proj; llama's and qwen3's attention_bias covers all four;
    // phi3's qkv_proj and o_proj have none
    let attentionBias: boolean;
    let attentionOutputBias: boolean;
    if (family === "qwen2") {
        attentionBias = true;
        attentionOutputBias = false;
    } else if (family === "llama" || family === "qwen3" || gemma) {
        attentionBias = config.boolean("attention_bias", false);
        attentionOutputBias = attentionBias;
    } else {
        attentionBias = false;
        attentionOutputBias = false;
    }
    const mlpBias = family === "llama" ? config.boolean("mlp_bias", false) : false;

    const {slidingWindow, layerTypes} = readAttentionLayout(config, family, numHiddenLayers);
    const torchDtype = readTorchDtype(config);

    const quantizationConfig = json.quantization_config ?? null;
    if (quantizationConfig !== null && !isPlainObject(quantizationConfig)) {
        config.fail("quantization_config", `is ${quoteValue(quantizationConfig)}, expected an object`);
    }

    return {
        modelType: family,
        architectures: architectures as string[],
        vocabSize,
        hiddenSize,
        intermediateSize,
        numHiddenLayers,
        numAttentionHeads,
        numKeyValueHeads,
        headDim,
        rotaryDim,
        qkNorm: family === "qwen3" || gemma,
        fusedProjections: family === "phi3",
        rmsNormUnitOffset: gemma,
        sandwichNorms: gemma,
        embedScale: gemma ? Math.sqrt(hiddenSize) : null,
        attentionScale: gemmaKeys ? gemmaKeys.queryPreAttnScalar ** -0.5 : headDim ** -0.5,
        finalLogitSoftcap: gemmaKeys?.finalLogitSoftcap ?? null,
        localRope,
        rmsNormEps,
        ropeTheta,
        ropeScaling,
        maxPositionEmbeddings,
        tieWordEmbeddings: config.boolean("tie_word_embeddings", gemma), // Gemma3TextConfig ties by default
        attentionBias,
        attentionOutputBias,
        mlpBias,
        hiddenAct: hiddenAct as HiddenAct,
        slidingWindow,
        layerTypes,
        bosTokenId: config.tokenId("bos_token_id"),
        eosTokenIds: config.tokenIds("eos_token_id"),
        padTokenId: config.tokenId("pad_token_id"),
        torchDtype,
        quantizationConfig: quantizationConfig as Record<string, unknown> | null,
        raw: json,
        file
    };
}

/**
 * rope_theta: the top-level key (transformers 4), else rope_parameters' (5). `opts`: the top-level key to read
 * (gemma3's local RoPE: rope_local_base_freq), the name of the rope_parameters object in messages and the default
 */
function readRopeTheta(
    config: ConfigReader,
    ropeParameters: Record<string, unknown> | null,
    opts: {topKey?: string; paramsKey?: string; fallback?: number} = {}
): number {
    const topKey = opts.topKey ?? "rope_theta";
    if (config.has(topKey)) return config.positiveNumber(topKey);
    if (ropeParameters && ropeParameters.rope_theta !== undefined && ropeParameters.rope_theta !== null) {
        const theta = ropeParameters.rope_theta;
        if (typeof theta !== "number" || !Number.isFinite(theta) || theta <= 0) {
            config.fail(
                `${opts.paramsKey ?? "rope_parameters"}.rope_theta`,
                `is ${quoteValue(theta)}, expected a positive number`
            );
        }
        return theta;
    }
    return opts.fallback ?? 10000; // the default of LlamaConfig, Qwen2Config and MistralConfig alike
}

/**
 * the RoPE scaling of rope_scaling (transformers 4) or rope_parameters (5); `opts.paramsKey` names the
 * rope_parameters object in messages, `opts.topLevel` false ignores rope_scaling (gemma3's local RoPE has none)
 */
function readRopeScaling(
    config: ConfigReader,
    ropeParameters: Record<string, unknown> | null,
    opts: {paramsKey?: string; topLevel?: boolean} = {}
): RopeScaling | null {
    let key: string;
    let scaling: Record<string, unknown>;
    const ropeScaling = opts.topLevel === false ? null : config.json.rope_scaling;
    if (ropeScaling !== undefined && ropeScaling !== null) {
        if (!isPlainObject(ropeScaling)) {
            config.fail(
                "rope_scaling",
                `is ${quoteValue(ropeScaling)}, expected an object such as {"rope_type": "linear", "factor": 2.0} or null`
            );
        }
        key = "rope_scaling";
        scaling = ropeScaling;
    } else if (ropeParameters) {
        key = opts.paramsKey ?? "rope_parameters";
        scaling = ropeParameters;
    } else {
        return null;
    }

    const rawType = scaling.rope_type ?? scaling.type ?? "default";
    // "su" is the name early Phi-3 configs used for longrope (transformers maps it the same way)
    const type = rawType === "su" ? "longrope" : rawType;
    if (typeof type !== "string" || !(SUPPORTED_ROPE_TYPES as readonly string[]).includes(type)) {
        config.fail(
            `${key}.rope_type`,
            `is ${quoteValue(rawType)}, which qlora does not implement (supported: ${SUPPORTED_ROPE_TYPES.join(", ")})`
        );
    }
    if (type === "default") return null;

    const optionalNumber = (name: string): number | undefined => {
        const value = scaling[name];
        if (value === undefined || value === null) return undefined;
        if (typeof value !== "number" || !Number.isFinite(value))
            config.fail(`${key}.${name}`, `is ${quoteValue(value)}, expected a number`);
        return value;
    };
    const requiredPositive = (name: string): number => {
        const value = optionalNumber(name);
        if (value === undefined) config.fail(`${key}.${name}`, `is missing; rope type "${type}" needs it`);
        if (value <= 0) config.fail(`${key}.${name}`, `is ${value}, expected a positive number`);
        return value;
    };

    const result: RopeScaling = {type: type as RopeType, raw: scaling};
    const factor = type === "longrope" ? optionalNumber("factor") : requiredPositive("factor");
    if (factor !== undefined) result.factor = factor;
    if (type === "llama3") {
        result.lowFreqFactor = requiredPositive("low_freq_factor");
        result.highFreqFactor = requiredPositive("high_freq_factor");
        result.originalMaxPositionEmbeddings = requiredPositive("original_max_position_embeddings");
        if (result.highFreqFactor === result.lowFreqFactor) {
            config.fail(
                `${key}.high_freq_factor`,
                "equals low_freq_factor; llama3 rope interpolates between them, so they must differ"
            );
        }
    } else {
        const original = optionalNumber("original_max_position_embeddings");
        if (original !== undefined) result.originalMaxPositionEmbeddings = original;
    }
    const optionalKeys: Array<[keyof RopeScaling, string]> = [
        ["betaFast", "beta_fast"],
        ["betaSlow", "beta_slow"],
        ["attentionFactor", "attention_factor"],
        ["mscale", "mscale"],
        ["mscaleAllDim", "mscale_all_dim"]
    ];
    for (const [field, name] of optionalKeys) {
        const value = optionalNumber(name);
        if (value !== undefined) (result as unknown as Record<string, unknown>)[field] = value;
    }
    if (type === "longrope") {
        for (const name of ["short_factor", "long_factor"]) {
            const list = scaling[name];
            if (!Array.isArray(list) || !list.every((x) => typeof x === "number" && Number.isFinite(x) && x > 0)) {
                config.fail(
                    `${key}.${name}`,
                    `is ${quoteValue(list)}, expected a list of positive numbers (one per rotary frequency)`
                );
            }
        }
    }
    return result;
}

/**
 * Gemma 3's two RoPEs (Gemma3TextConfig.convert_rope_params_to_dict): full-attention layers use rope_theta (default
 * 1e6) with rope_scaling, sliding layers rope_local_base_freq (default 1e4) without scaling (transformers 4 keys);
 * transformers 5 writes rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}
 */
function readGemmaRope(
    config: ConfigReader,
    ropeParameters: Record<string, unknown> | null
): {ropeTheta: number; ropeScaling: RopeScaling | null; localRope: {theta: number; scaling: RopeScaling | null}} {
    const part = (layerType: LayerType): Record<string, unknown> | null => {
        if (!ropeParameters) return null;
        const value = ropeParameters[layerType];
        if (value === undefined || value === null) return null;
        if (!isPlainObject(value))
            config.fail(
                `rope_parameters.${layerType}`,
                `is ${quoteValue(value)}, expected an object such as {"rope_type": "default", "rope_theta": 10000}`
            );
        return value;
    };
    if (ropeParameters && !Object.keys(ropeParameters).every((k) => (LAYER_TYPES as readonly string[]).includes(k)))
        config.fail(
            "rope_parameters",
            `is ${quoteValue(ropeParameters)}; a gemma3_text config keys it by layer type ({"full_attention": {...}, "sliding_attention": {...}})`
        );
    const global = part("full_attention"),
        local = part("sliding_attention");
    const paramsKey = (t: LayerType) => `rope_parameters.${t}`;
    const ropeTheta = readRopeTheta(config, global, {paramsKey: paramsKey("full_attention"), fallback: 1_000_000});
    const ropeScaling = readRopeScaling(config, global, {paramsKey: paramsKey("full_attention")});
    const theta = readRopeTheta(config, local, {
        topKey: "rope_local_base_freq",
        paramsKey: paramsKey("sliding_attention"),
        fallback: 10_000
    });
    const scaling = readRopeScaling(config, local, {paramsKey: paramsKey("sliding_attention"), topLevel: false});
    for (const [s, t] of [
        [ropeScaling, "full_attention"],
        [scaling, "sliding_attention"]
    ] as const)
        if (s?.type === "longrope")
            config.fail(
                config.json.rope_scaling && t === "full_attention" ? "rope_scaling" : paramsKey(t),
                "is longrope, which qlora implements for phi3 only"
            );
    return {ropeTheta, ropeScaling, localRope: {theta, scaling}};
}

/** Gemma 3's own keys: the attention scale, soft-capping (the attention's refused), bidirectional attention refused */
function readGemmaKeys(
    config: ConfigReader,
    hiddenSize: number,
    heads: number
): {queryPreAttnScalar: number; finalLogitSoftcap: number | null} {
    // Gemma3TextConfig.validate_architecture raises on this too
    if (hiddenSize % heads !== 0)
        config.fail(
            "hidden_size",
            `is ${hiddenSize}, not a multiple of num_attention_heads (${heads}), which Gemma3TextConfig requires`
        );
    const queryPreAttnScalar = config.positiveNumber("query_pre_attn_scalar", 256);
    const finalLogitSoftcap = config.has("final_logit_softcapping") ? config.positiveNumber("final_logit_softcapping") : null;
    if (config.has("attn_logit_softcapping"))
        config.fail(
            "attn_logit_softcapping",
            `is ${quoteValue(config.json.attn_logit_softcapping)}; qlora's attention kernels have no soft-capping ` +
                "(Gemma 3's released configs set it to null, and transformers' Gemma3Attention does not apply it): set it to null"
        );
    if (config.boolean("use_bidirectional_attention", false))
        config.fail("use_bidirectional_attention", "is true; qlora implements causal (decoder) attention only: set it to false");
    return {queryPreAttnScalar, finalLogitSoftcap};
}

/** families whose every layer slides when sliding_window is set (MistralAttention, Phi3Attention); the default width */
const EVERY_LAYER_SLIDES: ReadonlyMap<string, number | null> = new Map([
    ["mistral", 4096],
    ["phi3", null]
]);
/** families that slide only with use_sliding_window, on the layers layer_types (or max_window_layers) names */
const QWEN_WINDOW_LAYOUT = new Set(["qwen2", "qwen3"]);

/**
 * The sliding window and which layers use it, as transformers resolves them: Mistral (and Phi-3) slide on every
 * layer when sliding_window is set (MistralModel ignores layer_types with a warning; qlora refuses a mixed list rather
 * than guess); Qwen2/Qwen3 keep sliding_window only with use_sliding_window, on the layers of layer_types, which
 * defaults to "sliding_attention" for layers >= max_window_layers (Qwen2Config.__post_init__); Llama never slides.
 */
function readAttentionLayout(
    config: ConfigReader,
    family: string,
    layers: number
): {slidingWindow: number | null; layerTypes: LayerType[]} {
    const json = config.json;
    const everyLayer = EVERY_LAYER_SLIDES.has(family);
    const qwen = QWEN_WINDOW_LAYOUT.has(family);
    let layerTypes: LayerType[] | null = null;
    if (json.layer_types !== undefined && json.layer_types !== null) {
        const list = json.layer_types;
        if (!Array.isArray(list) || list.length !== layers)
            config.fail(
                "layer_types",
                `is ${quoteValue(list)}, expected a list of ${layers} entries (one per layer, num_hidden_layers)`
            );
        list.forEach((t, i) => {
            if (!(LAYER_TYPES as readonly unknown[]).includes(t))
                config.fail(
                    `layer_types[${i}]`,
                    `is ${quoteValue(t)}, which qlora does not implement (supported: ${LAYER_TYPES.join(", ")})`
                );
        });
        layerTypes = list as LayerType[];
    }
    const full = (): LayerType[] => Array.from({length: layers}, () => "full_attention");
    if (family === "gemma3_text") return gemmaLayout(config, layers, layerTypes);
    if (!everyLayer && !qwen) return {slidingWindow: null, layerTypes: full()};

    const fallback = everyLayer ? EVERY_LAYER_SLIDES.get(family)! : 4096;
    const value = "sliding_window" in json ? json.sliding_window : fallback;
    if (value !== undefined && value !== null && (typeof value !== "number" || !Number.isSafeInteger(value) || value <= 0))
        config.fail("sliding_window", `is ${quoteValue(value)}, expected a positive integer or null`);
    let window = (value ?? null) as number | null;
    if (qwen && !config.boolean("use_sliding_window", false)) window = null;

    if (everyLayer) {
        if (window !== null && layerTypes?.includes("full_attention"))
            config.fail(
                "layer_types",
                `mixes full and sliding layers, but transformers' ${family} model applies sliding_window to every layer ` +
                    "and ignores layer_types; remove layer_types, or set sliding_window to null for full attention"
            );
        return {
            slidingWindow: window,
            layerTypes: window === null ? full() : Array.from({length: layers}, () => "sliding_attention")
        };
    }
    if (!layerTypes) {
        const first = json.max_window_layers ?? 28;
        if (typeof first !== "number" || !Number.isSafeInteger(first) || first < 0)
            config.fail("max_window_layers", `is ${quoteValue(first)}, expected a non-negative integer`);
        layerTypes = Array.from({length: layers}, (_, i) =>
            window !== null && i >= first ? "sliding_attention" : "full_attention"
        );
    }
    // transformers' create_sliding_window_causal_mask raises here too
    if (window === null && layerTypes.includes("sliding_attention"))
        config.fail(
            "layer_types",
            'has "sliding_attention" layers but no window: set "use_sliding_window": true and a "sliding_window" width, ' +
                'or make every entry "full_attention"'
        );
    return {slidingWindow: layerTypes.includes("sliding_attention") ? window : null, layerTypes};
}

/**
 * Gemma 3: layer_types, or every sliding_window_pattern-th layer full and the others sliding (Gemma3TextConfig's
 * default, pattern 6); the window defaults to 4096
 */
function gemmaLayout(
    config: ConfigReader,
    layers: number,
    given: LayerType[] | null
): {slidingWindow: number | null; layerTypes: LayerType[]} {
    const pattern = config.positiveInt("sliding_window_pattern", 6);
    const layerTypes =
        given ??
        Array.from({length: layers}, (_, i): LayerType => ((i + 1) % pattern !== 0 ? "sliding_attention" : "full_attention"));
    const json = config.json;
    const value = "sliding_window" in json ? json.sliding_window : 4096;
    if (value !== null && (typeof value !== "number" || !Number.isSafeInteger(value) || value <= 0))
        config.fail("sliding_window", `is ${quoteValue(value)}, expected a positive integer`);
    if (value === null && layerTypes.includes("sliding_attention"))
        config.fail(
            "sliding_window",
            'is null, but the model has "sliding_attention" layers (layer_types or sliding_window_pattern): give the window width'
        );
    return {slidingWindow: layerTypes.includes("sliding_attention") ? (value as number) : null, layerTypes};
}

function readTorchDtype(config: ConfigReader): ModelConfig["torchDtype"] {
    const key = config.has("dtype") ? "dtype" : "torch_dtype";
    const value = config.json[key];
    if (value === undefined || value === null || value === "auto") return null;
    // some exports write "torch.bfloat16"
    const name = typeof value === "string" ? value.replace(/^torch\./, "") : value;
    if (name === "float32" || name === "float16" || name === "bfloat16") return name;
    if (name === "half") return "float16";
    if (name === "float") return "float32";
    config.fail(key, `is ${quoteValue(value)}, expected "float32", "float16" or "bfloat16"`);
}
