// config.ts: BitsAndBytesConfig, the 4-bit quantization settings under transformers' names (SPEC-quant §7.4).
// Read from a checkpoint's config.json `quantization_config` (missing keys take transformers' defaults, since
// that is what the file means) or from user options (missing keys take the toolkit's QLoRA defaults).
import {QloraError, quoteValue} from "../errors.js";
import {QUANT_TYPES, type QuantType} from "./nf4.js";

export type ComputeDtype = "float32" | "bfloat16" | "float16";
/** the dtype the packed bytes are stored as; uint8 is the norm (bf16 etc. is FSDP-QLoRA's reinterpretation) */
export type QuantStorage = "uint8" | "bfloat16" | "float16" | "float32";

export interface BitsAndBytesConfig {
    load_in_4bit: boolean;
    bnb_4bit_quant_type: QuantType;
    bnb_4bit_compute_dtype: ComputeDtype;
    bnb_4bit_use_double_quant: boolean;
    bnb_4bit_quant_storage: QuantStorage;
    /** modules left unquantized (besides lm_head), or null */
    llm_int8_skip_modules: string[] | null;
}

export type BitsAndBytesOptions = Partial<BitsAndBytesConfig>;

/** transformers' BitsAndBytesConfig defaults: what a config.json means when it leaves a key out */
export const TRANSFORMERS_BNB_DEFAULTS: Readonly<BitsAndBytesConfig> = Object.freeze({
    load_in_4bit: true,
    bnb_4bit_quant_type: "fp4",
    bnb_4bit_compute_dtype: "float32",
    bnb_4bit_use_double_quant: false,
    bnb_4bit_quant_storage: "uint8",
    llm_int8_skip_modules: null
});

/** the toolkit's defaults for new quantization: the QLoRA recipe (NF4 + double quantization) */
export const QLORA_BNB_DEFAULTS: Readonly<BitsAndBytesConfig> = Object.freeze({
    load_in_4bit: true,
    bnb_4bit_quant_type: "nf4",
    bnb_4bit_compute_dtype: "float32",
    bnb_4bit_use_double_quant: true,
    bnb_4bit_quant_storage: "uint8",
    llm_int8_skip_modules: null
});

const COMPUTE_DTYPES: readonly ComputeDtype[] = ["float32", "bfloat16", "float16"];
const QUANT_STORAGES: readonly QuantStorage[] = ["uint8", "bfloat16", "float16", "float32"];

function describe(value: unknown): string {
    return value === undefined ? "undefined" : quoteValue(value);
}

/** "torch.bfloat16", "bf16", "half"... to the canonical name, or null */
function normaliseDtype(value: unknown): string | null {
    if (typeof value !== "string") return null;
    const name = value.replace(/^torch\./, "").toLowerCase();
    const aliases: Record<string, string> = {
        bf16: "bfloat16",
        fp16: "float16",
        half: "float16",
        fp32: "float32",
        float: "float32",
        u8: "uint8"
    };
    return aliases[name] ?? name;
}

type Fail = (key: string, message: string) => never;

function readBool(obj: Record<string, unknown>, key: string, fallback: boolean, fail: Fail): boolean {
    const value = obj[key];
    if (value === undefined) return fallback;
    if (typeof value !== "boolean") fail(key, `is ${describe(value)}, expected true or false`);
    return value as boolean;
}

function resolve(obj: Record<string, unknown>, defaults: Readonly<BitsAndBytesConfig>, fail: Fail): BitsAndBytesConfig {
    if (obj.load_in_8bit === true || obj._load_in_8bit === true)
        fail("load_in_8bit", "is true: 8-bit (LLM.int8) weights are not supported; use load_in_4bit");
    const load4 =
        obj.load_in_4bit !== undefined
            ? readBool(obj, "load_in_4bit", defaults.load_in_4bit, fail)
            : readBool(obj, "_load_in_4bit", defaults.load_in_4bit, fail);

    let quantType = defaults.bnb_4bit_quant_type;
    if (obj.bnb_4bit_quant_type !== undefined) {
        const value = obj.bnb_4bit_quant_type;
        if (value !== "nf4" && value !== "fp4")
            fail("bnb_4bit_quant_type", `is ${describe(value)}, expected one of ${QUANT_TYPES.map((t) => `"${t}"`).join(", ")}`);
        quantType = value as QuantType;
    }

    let computeDtype = defaults.bnb_4bit_compute_dtype;
    if (obj.bnb_4bit_compute_dtype !== undefined && obj.bnb_4bit_compute_dtype !== null) {
        const name = normaliseDtype(obj.bnb_4bit_compute_dtype);
        if (!name || !COMPUTE_DTYPES.includes(name as ComputeDtype))
            fail(
                "bnb_4bit_compute_dtype",
                `is ${describe(obj.bnb_4bit_compute_dtype)}, expected "float32", "bfloat16" or "float16"`
            );
        computeDtype = name as ComputeDtype;
    }

    let storage = defaults.bnb_4bit_quant_storage;
    if (obj.bnb_4bit_quant_storage !== undefined && obj.bnb_4bit_quant_storage !== null) {
        const name = normaliseDtype(obj.bnb_4bit_quant_storage);
        if (!name || !QUANT_STORAGES.includes(name as QuantStorage))
            fail(
                "bnb_4bit_quant_storage",
                `is ${describe(obj.bnb_4bit_quant_storage)}, expected "uint8" (or "bfloat16", "float16", "float32")`
            );
        storage = name as QuantStorage;
    }

    let skip = defaults.llm_int8_skip_modules;
    if (obj.llm_int8_skip_modules !== undefined) {
        const value = obj.llm_int8_skip_modules;
        if (value === null) skip = null;
        else if (Array.isArray(value) && value.every((v) => typeof v === "string" && v.length > 0)) skip = [...value];
        else fail("llm_int8_skip_modules", `is ${describe(value)}, expected a list of module names or null`);
    }

    return {
        load_in_4bit: load4,
        bnb_4bit_quant_type: quantType,
        bnb_4bit_compute_dtype: computeDtype,
        bnb_4bit_use_double_quant: readBool(obj, "bnb_4bit_use_double_quant", defaults.bnb_4bit_use_double_quant, fail),
        bnb_4bit_quant_storage: storage,
        llm_int8_skip_modules: skip
    };
}

/**
 * The `quantization_config` object of a config.json. `file` names the file in errors. Keys transformers writes
 * but the toolkit does not use (llm_int8_threshold...) are accepted and ignored.
 */
export function parseQuantizationConfig(json: unknown, file: string): BitsAndBytesConfig {
    const fail: Fail = (key, message) => {
        throw new QloraError(`quantization_config.${key} ${message}`, {file});
    };
    if (json === null || typeof json !== "object" || Array.isArray(json))
        throw new QloraError(`quantization_config is ${describe(json)}, expected an object`, {file});
    const obj = json as Record<string, unknown>;
    if (obj.quant_method !== undefined && obj.quant_method !== "bitsandbytes")
        fail(
            "quant_method",
            `is ${describe(obj.quant_method)}: only bitsandbytes 4-bit checkpoints are supported ` +
                "(use the unquantized model, or a *-bnb-4bit checkpoint)"
        );
    const cfg = resolve(obj, TRANSFORMERS_BNB_DEFAULTS, fail);
    if (!cfg.load_in_4bit) fail("load_in_4bit", "is false: the checkpoint is not a 4-bit bitsandbytes checkpoint");
    return cfg;
}

/** a BitsAndBytesConfig from user options (TS objects, YAML, flags), the QLoRA defaults filling the gaps */
export function bitsAndBytesConfig(options: BitsAndBytesOptions | Record<string, unknown> = {}): BitsAndBytesConfig {
    const fail: Fail = (key, message) => {
        throw new QloraError(`BitsAndBytesConfig.${key} ${message}`);
    };
    if (options === null || typeof options !== "object" || Array.isArray(options))
        throw new QloraError(`BitsAndBytesConfig is ${describe(options)}, expected an object`);
    return resolve(options as Record<string, unknown>, QLORA_BNB_DEFAULTS, fail);
}

/**
 * The `quantization_config` object transformers writes into config.json (every key explicit, in its sorted
 * order; SPEC-quant §7.4).
 */
export function quantizationConfigToJson(cfg: BitsAndBytesConfig): Record<string, unknown> {
    return {
        _load_in_4bit: cfg.load_in_4bit,
        _load_in_8bit: false,
        bnb_4bit_compute_dtype: cfg.bnb_4bit_compute_dtype,
        bnb_4bit_quant_storage: cfg.bnb_4bit_quant_storage,
        bnb_4bit_quant_type: cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant: cfg.bnb_4bit_use_double_quant,
        llm_int8_enable_fp32_cpu_offload: false,
        llm_int8_has_fp16_weight: false,
        llm_int8_skip_modules: cfg.llm_int8_skip_modules,
        llm_int8_threshold: 6.0,
        load_in_4bit: cfg.load_in_4bit,
        load_in_8bit: false,
        quant_method: "bitsandbytes"
    };
}

/**
 * Whether a module (e.g. "model.layers.0.mlp.down_proj") stays unquantized: lm_head always (transformers keeps
 * the output layer in 16-bit), and any module whose name contains an entry of llm_int8_skip_modules as a
 * dotted component sequence.
 */
export function isModuleSkipped(cfg: BitsAndBytesConfig, moduleName: string): boolean {
    const skip = ["lm_head", ...(cfg.llm_int8_skip_modules ?? [])];
    const dotted = `.${moduleName}.`;
    return skip.some((key) => dotted.includes(`.${key}.`));
}
