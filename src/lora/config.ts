// config.ts: LoraConfig with PEFT's names and defaults (SPEC-peft §1, §5, §10), validated.
import {QloraError, quoteValue} from "../errors.js";

export type LoraBias = "none" | "all" | "lora_only";

export interface LoraConfig {
    r: number;
    lora_alpha: number;
    /** a list of module-name suffixes, a regex (full match) or "all-linear"; null: the architecture's default */
    target_modules: string[] | string | null;
    lora_dropout: number;
    bias: LoraBias;
    use_rslora: boolean;
    use_dora: boolean;
    modules_to_save: string[] | null;
    task_type: string;
    /** "gaussian", true (PEFT's default: kaiming-uniform A, zero B) or false */
    init_lora_weights: boolean | string;
    base_model_name_or_path: string | null;
}

export const LORA_DEFAULTS: LoraConfig = {
    r: 8,
    lora_alpha: 8,
    target_modules: null,
    lora_dropout: 0,
    bias: "none",
    use_rslora: false,
    use_dora: false,
    modules_to_save: null,
    task_type: "CAUSAL_LM",
    init_lora_weights: true,
    base_model_name_or_path: null
};

/** PEFT's default targets per model_type (constants.py) */
export const DEFAULT_TARGETS: Record<string, string[]> = {
    llama: ["q_proj", "v_proj"],
    qwen2: ["q_proj", "v_proj"],
    qwen3: ["q_proj", "v_proj"],
    mistral: ["q_proj", "v_proj"],
    phi3: ["qkv_proj"]
};

/** the modules modules_to_save can name: full trainable copies of the output layer and the embedding */
export const SAVABLE_MODULES = ["lm_head", "embed_tokens"];

export function validateLoraConfig(cfg: LoraConfig, where = "lora config"): LoraConfig {
    const bad = (key: string, msg: string): never => {
        throw new QloraError(`${key}: ${msg}`, {file: where});
    };
    const shown = (value: unknown) => quoteValue(value);
    const isName = (value: unknown) => typeof value === "string" && value.length > 0;
    if (!Number.isInteger(cfg.r) || cfg.r <= 0)
        bad("r", `must be a positive integer (got ${shown(cfg.r)}); typical values are 8, 16, 32, 64`);
    if (!(typeof cfg.lora_alpha === "number" && Number.isFinite(cfg.lora_alpha) && cfg.lora_alpha > 0))
        bad("lora_alpha", `must be a positive number (got ${shown(cfg.lora_alpha)})`);
    if (!(typeof cfg.lora_dropout === "number" && cfg.lora_dropout >= 0 && cfg.lora_dropout < 1))
        bad("lora_dropout", `must be a number in [0, 1) (got ${shown(cfg.lora_dropout)})`);
    if (!["none", "all", "lora_only"].includes(cfg.bias))
        bad("bias", `must be "none", "all" or "lora_only" (got ${shown(cfg.bias)})`);
    if (typeof cfg.use_rslora !== "boolean") bad("use_rslora", `must be true or false (got ${shown(cfg.use_rslora)})`);
    const scalingProblem = loraScalingProblem(cfg);
    if (scalingProblem) bad("lora_alpha", scalingProblem);
    if (typeof cfg.use_dora !== "boolean") bad("use_dora", `must be true or false (got ${shown(cfg.use_dora)})`);
    if (cfg.task_type !== "CAUSAL_LM") bad("task_type", `only CAUSAL_LM is supported (got ${shown(cfg.task_type)})`);
    if (typeof cfg.init_lora_weights !== "boolean" && typeof cfg.init_lora_weights !== "string")
        bad("init_lora_weights", `must be true, false or "gaussian" (got ${shown(cfg.init_lora_weights)})`);
    if (cfg.base_model_name_or_path !== null && typeof cfg.base_model_name_or_path !== "string")
        bad("base_model_name_or_path", `must be a string or null (got ${shown(cfg.base_model_name_or_path)})`);
    if (cfg.modules_to_save !== null && !(Array.isArray(cfg.modules_to_save) && cfg.modules_to_save.every(isName)))
        bad("modules_to_save", `must be a list of module names or null (got ${shown(cfg.modules_to_save)})`);
    for (const m of cfg.modules_to_save ?? [])
        if (!SAVABLE_MODULES.includes(m.replace(/^(model\.)/, "")))
            bad("modules_to_save", `"${m}" cannot be trained in full by qlora (supported: ${SAVABLE_MODULES.join(", ")})`);
    const targets = cfg.target_modules;
    if (Array.isArray(targets) && targets.length === 0) bad("target_modules", "is an empty list");
    if (!(targets === null || isName(targets) || (Array.isArray(targets) && targets.every(isName))))
        bad("target_modules", `must be a list of module names, a regular expression or "all-linear" (got ${shown(targets)})`);
    return cfg;
}

/**
 * LoRA's rank against the modules it wraps: B A has rank at most min(in_features, out_features), so a larger r
 * adds nothing but memory (r = 1000000 on a 256-wide model asks for gigabytes). Checked for every targeted module
 * before any LoRA weight is allocated or read; the error names the tightest module and the largest valid r.
 */
export function checkRankFits(
    r: number,
    modules: Iterable<{name: string; outFeatures: number; inFeatures: number}>,
    where = "lora config"
): void {
    let tightest: {name: string; outFeatures: number; inFeatures: number} | null = null;
    for (const m of modules)
        if (!tightest || Math.min(m.outFeatures, m.inFeatures) < Math.min(tightest.outFeatures, tightest.inFeatures))
            tightest = m;
    if (!tightest) return;
    const limit = Math.min(tightest.outFeatures, tightest.inFeatures);
    if (r > limit)
        throw new QloraError(
            `r: ${r} is larger than the targeted module ${tightest.name} allows: its weight is ` +
                `[${tightest.outFeatures}, ${tightest.inFeatures}] (out, in), and LoRA's rank is at most ` +
                `min(in_features, out_features) = ${limit}; use r <= ${limit}`,
            {file: where}
        );
}

/** the LoRA branch's scale: alpha / r, or alpha / sqrt(r) with rsLoRA */
/**
 * The largest LoRA scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) qlora accepts: PEFT takes any, but an update
 * multiplied by more than 2^16 overflows activations to Inf (NaN logits) long before it trains; real configs use 0.5-4.
 */
export const MAX_LORA_SCALING = 65536;

/** why lora_alpha, r and use_rslora give a scaling past MAX_LORA_SCALING, or null (adapter files and train configs) */
export function loraScalingProblem(cfg: Pick<LoraConfig, "r" | "lora_alpha" | "use_rslora">): string | null {
    const scaling = loraScaling(cfg);
    if (!(scaling > MAX_LORA_SCALING)) return null;
    return (
        `${cfg.lora_alpha} with r ${cfg.r} scales the LoRA update by ${scaling.toPrecision(3)}, past the ${MAX_LORA_SCALING} ` +
        "at which bf16/fp32 activations overflow to Inf and the outputs to NaN; typical values are alpha = r or 2r"
    );
}

export function loraScaling(cfg: Pick<LoraConfig, "r" | "lora_alpha" | "use_rslora">): number {
    return cfg.use_rslora ? cfg.lora_alpha / Math.sqrt(cfg.r) : cfg.lora_alpha / cfg.r;
}
