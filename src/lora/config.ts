// config.ts: LoraConfig with PEFT's names and defaults (SPEC-peft §1, §5, §10), validated.
import {QloraError} from "../errors.js";

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
    base_model_name_or_path: null,
};

/** PEFT's default targets per model_type (constants.py) */
export const DEFAULT_TARGETS: Record<string, string[]> = {
    llama: ["q_proj", "v_proj"],
    qwen2: ["q_proj", "v_proj"],
    mistral: ["q_proj", "v_proj"],
};

/** the modules modules_to_save can name: full trainable copies of the output layer and the embedding */
export const SAVABLE_MODULES = ["lm_head", "embed_tokens"];

export function validateLoraConfig(cfg: LoraConfig, where = "lora config"): LoraConfig {
    const bad = (key: string, msg: string): never => {
        throw new QloraError(`${key}: ${msg}`, {file: where});
    };
    if (!Number.isInteger(cfg.r) || cfg.r <= 0) bad("r", `must be a positive integer (got ${cfg.r}); typical values are 8, 16, 32, 64`);
    if (!(typeof cfg.lora_alpha === "number" && cfg.lora_alpha > 0)) bad("lora_alpha", `must be a positive number (got ${cfg.lora_alpha})`);
    if (!(cfg.lora_dropout >= 0 && cfg.lora_dropout < 1)) bad("lora_dropout", `must be in [0, 1) (got ${cfg.lora_dropout})`);
    if (!["none", "all", "lora_only"].includes(cfg.bias)) bad("bias", `must be "none", "all" or "lora_only" (got "${cfg.bias}")`);
    if (cfg.task_type !== "CAUSAL_LM") bad("task_type", `only CAUSAL_LM is supported (got "${cfg.task_type}")`);
    for (const m of cfg.modules_to_save ?? [])
        if (!SAVABLE_MODULES.includes(m.replace(/^(model\.)/, "")))
            bad("modules_to_save", `"${m}" cannot be trained in full by qlora (supported: ${SAVABLE_MODULES.join(", ")})`);
    if (Array.isArray(cfg.target_modules) && cfg.target_modules.length === 0) bad("target_modules", "is an empty list");
    return cfg;
}

/** the LoRA branch's scale: alpha / r, or alpha / sqrt(r) with rsLoRA */
export function loraScaling(cfg: Pick<LoraConfig, "r" | "lora_alpha" | "use_rslora">): number {
    return cfg.use_rslora ? cfg.lora_alpha / Math.sqrt(cfg.r) : cfg.lora_alpha / cfg.r;
}
