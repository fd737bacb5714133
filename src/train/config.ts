// config.ts: the one schema behind `qlora train`'s YAML/JSON file, its --flags and the TypeScript API.
// Keys keep the seed recipe's names (BitsAndBytesConfig, LoraConfig, TrainingArguments, SFTConfig), so a user
// can carry a Python config over. Precedence: flags > file > defaults.
import path from "node:path";
import {parse as parseYaml} from "yaml";
import {z} from "zod";
import {nearestKey, QloraError, quoteValue} from "../errors.js";
import {ColumnMapSchema, parseMapFlag, TagMapSchema} from "../data/column-map.js";
import type {DataOptions} from "../data/index.js";
import {readTextFile} from "../io/files.js";
import {loraScalingProblem} from "../lora/config.js";
import {OPTIMIZER_NAMES} from "../optim/adamw.js";
import {SCHEDULER_TYPES} from "../optim/schedule.js";
import {RESUME_OVERRIDABLE_KEYS, resumeOverrideProblem} from "./training-args.js";

const targetModules = z.union([z.array(z.string()).min(1), z.string().min(1)]);
/** a step count (an integer >= 1), or a ratio of the total steps in (0, 1) as transformers reads these keys */
const stepsOrRatio = z
    .number()
    .positive()
    .refine((v) => v < 1 || Number.isInteger(v), "expected an integer step count, or a ratio of the total steps in (0, 1)");
/** a probability-like coefficient in [0, 1) */
const unitInterval = z.number().min(0, "expected a number in [0, 1)").lt(1, "expected a number in [0, 1)");

export const TrainConfigSchema = z
    .object({
        // model and data
        model: z
            .string()
            .nullable()
            .default(null)
            .describe(
                "Hugging Face model folder or Hub id ORG/NAME, fetched into the HF cache (default: the embedded tiny-qwen2)"
            ),
        dataset: z
            .string()
            .nullable()
            .default(null)
            .describe("training data: JSON, JSONL or Parquet file, or a folder (default: the embedded example data)"),
        eval_dataset: z
            .string()
            .nullable()
            .default(null)
            .describe("held-out data for eval_loss (default: none, or the example's eval split)"),
        dataset_format: z
            .enum(["auto", "alpaca", "text", "prompt_completion", "messages", "sharegpt"])
            .default("auto")
            .describe("record format; detected from the first record's keys unless given"),
        template: z.string().nullable().default(null).describe("a prompt template with {field} placeholders for custom records"),
        columns: ColumnMapSchema.nullable()
            .default(null)
            .describe("other column names, as LLaMA-Factory's dataset_info: prompt, query, response, system, history, messages"),
        tags: TagMapSchema.nullable()
            .default(null)
            .describe("ShareGPT keys and role names, as LLaMA-Factory's tags: role_tag, content_tag, user_tag, ..."),
        dataset_text_field: z
            .string()
            .min(1)
            .nullable()
            .default(null)
            .describe('the field of plain-text records (TRL\'s SFTConfig; default "text")'),
        max_seq_length: z.number().int().positive().default(512).describe("truncate each example to this many tokens"),
        packing: z.boolean().default(false).describe("pack examples into rows of max_seq_length (no attention across examples)"),
        packing_strategy: z
            .enum(["bfd", "bfd_split"])
            .default("bfd")
            .describe("bfd: best-fit decreasing, long examples truncated; bfd_split: long examples split over rows"),
        completion_only_loss: z.boolean().default(true).describe("train on the response tokens only (prompt tokens get no loss)"),
        assistant_only_loss: z.boolean().default(true).describe("for chat data: train on assistant turns only"),
        // BitsAndBytesConfig
        load_in_4bit: z.boolean().default(true).describe("quantize the frozen base to 4 bits (QLoRA)"),
        bnb_4bit_quant_type: z.enum(["nf4", "fp4"]).default("nf4"),
        bnb_4bit_compute_dtype: z
            .enum(["bfloat16", "float16", "float32"])
            .default("bfloat16")
            .describe("compute dtype on the GPU (the CPU backend computes in float32)"),
        bnb_4bit_use_double_quant: z.boolean().default(true).describe("quantize the 4-bit scales again (8-bit, block 256)"),
        // LoraConfig
        r: z.number().int().positive("expected a positive integer").default(16).describe("LoRA rank"),
        lora_alpha: z.number().positive("expected a positive number").default(32),
        target_modules: targetModules
            .default(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            .describe(
                'module names, a regex (full match) or "all-linear"; the default (every projection) means qkv_proj, o_proj, gate_up_proj, down_proj on phi3'
            ),
        lora_dropout: unitInterval.default(0.05),
        bias: z.enum(["none", "all", "lora_only"]).default("none"),
        use_rslora: z.boolean().default(false),
        use_dora: z.boolean().default(false),
        modules_to_save: z.array(z.string()).nullable().default(null),
        task_type: z.literal("CAUSAL_LM").default("CAUSAL_LM"),
        init_lora_weights: z.union([z.boolean(), z.literal("gaussian")]).default(true),
        // TrainingArguments
        output_dir: z.string().default("./qlora_output"),
        overwrite_output_dir: z
            .boolean()
            .default(false)
            .describe("replace an earlier run in output_dir (only its checkpoint-N, final, metrics.jsonl, report.html)"),
        num_train_epochs: z.number().positive().default(3),
        max_steps: z
            .number()
            .int()
            .min(-1)
            .refine((v) => v !== 0, "expected -1 (train num_train_epochs) or a positive step count")
            .default(-1)
            .describe("total optimizer steps; overrides num_train_epochs when > 0"),
        per_device_train_batch_size: z.number().int().positive().default(4),
        per_device_eval_batch_size: z.number().int().positive().default(8),
        auto_find_batch_size: z
            .boolean()
            .default(false)
            .describe(
                "on the GPU, halve per_device_train_batch_size (doubling gradient_accumulation_steps) until the memory plan fits"
            ),
        gradient_accumulation_steps: z.number().int().positive().default(1),
        learning_rate: z.number().positive().default(2e-4),
        weight_decay: z.number().min(0).default(0),
        adam_beta1: unitInterval.default(0.9),
        adam_beta2: unitInterval.default(0.999),
        adam_epsilon: z
            .number()
            .positive("expected a positive number (0 divides by zero for parameters without gradient)")
            .default(1e-8),
        max_grad_norm: z.number().min(0).default(1.0).describe("clip the gradient norm (0 disables)"),
        optim: z
            .enum(OPTIMIZER_NAMES)
            .default("paged_adamw_8bit")
            .describe("adamw_torch, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit"),
        lr_scheduler_type: z
            .enum(SCHEDULER_TYPES)
            .default("cosine")
            .describe("cosine, linear, constant, constant_with_warmup, ..."),
        warmup_ratio: z.number().min(0).max(1).default(0.03),
        warmup_steps: z
            .number()
            .min(0)
            .refine(
                (v) => v < 1 || Number.isInteger(v),
                "expected an integer step count, or a ratio of the total steps in (0, 1)"
            )
            .default(0)
            .describe("warmup steps (overrides warmup_ratio when > 0)"),
        fp16: z.boolean().default(false),
        bf16: z.boolean().default(true).describe("bf16 compute on the GPU (the CPU backend computes in float32)"),
        gradient_checkpointing: z.boolean().default(true),
        gradient_checkpointing_offload: z
            .boolean()
            .default(false)
            .describe("GPU: keep the checkpointed block inputs in host memory (less GPU memory, slower)"),
        logging_steps: stepsOrRatio.default(10),
        eval_strategy: z
            .enum(["steps", "no"])
            .default("steps")
            .describe('"steps": evaluate every eval_steps when there is an eval set; "no": never'),
        save_strategy: z
            .enum(["steps", "no"])
            .default("steps")
            .describe('"steps": a checkpoint every save_steps; "no": only the final adapter (no resume)'),
        eval_steps: stepsOrRatio
            .nullable()
            .default(null)
            .describe("evaluate every N steps (default: logging_steps, when an eval set is given)"),
        save_steps: stepsOrRatio.default(500),
        save_total_limit: z.number().int().positive().nullable().default(null),
        seed: z.number().int().default(42),
        resume_from_checkpoint: z
            .union([z.boolean(), z.string()])
            .default(false)
            .describe("true: the latest checkpoint-N in output_dir; or a checkpoint folder"),
        resume_override: z
            .array(z.string())
            .default([])
            .superRefine((names, ctx) => {
                const problem = resumeOverrideProblem(names);
                if (problem) ctx.addIssue({code: "custom", message: problem});
            })
            .describe(`settings that may change on resume: ${RESUME_OVERRIDABLE_KEYS.join(", ")}`),
        // qlora's own
        device: z.enum(["auto", "cpu", "cuda"]).default("auto"),
        threads: z.number().int().positive().nullable().default(null).describe("CPU threads (default: all cores)")
    })
    .strict();

export type TrainConfig = z.infer<typeof TrainConfigSchema>;
export type TrainConfigInput = z.input<typeof TrainConfigSchema>;

/** how the data keys of a config prepare the data (the trainer; the data preview of `qlora ui`) */
export function dataOptionsOf(
    config: Pick<
        TrainConfig,
        | "dataset_format"
        | "template"
        | "dataset_text_field"
        | "columns"
        | "tags"
        | "max_seq_length"
        | "packing"
        | "packing_strategy"
        | "completion_only_loss"
        | "assistant_only_loss"
        | "seed"
    >
): DataOptions {
    return {
        dataset_format: config.dataset_format === "auto" ? undefined : config.dataset_format,
        template: config.template ?? undefined,
        dataset_text_field: config.dataset_text_field ?? undefined,
        columns: config.columns ?? undefined,
        tags: config.tags ?? undefined,
        max_seq_length: config.max_seq_length,
        packing: config.packing,
        packing_strategy: config.packing_strategy,
        completion_only_loss: config.completion_only_loss,
        assistant_only_loss: config.assistant_only_loss,
        seed: config.seed
    };
}

export const TRAIN_CONFIG_KEYS = Object.keys(TrainConfigSchema.shape) as (keyof TrainConfig)[];

/**
 * Keys users bring from Python scripts (TrainingArguments, SFTConfig, from_pretrained) that are not qlora's own: each
 * is renamed to qlora's key of the same meaning, accepted with a notice that it changes nothing here, or refused
 * with what to do instead. Never silently ignored.
 */
type ForeignKey = (value: unknown) => {rename?: keyof TrainConfig; notice?: string};

const noEffect =
    (why: string): ForeignKey =>
    () => ({notice: why});
const refused =
    (why: string, harmless?: (value: unknown) => boolean): ForeignKey =>
    (value) => {
        if (harmless?.(value)) return {};
        throw new QloraError(why);
    };
const NO_PARALLEL_DATA = "qlora tokenizes and batches in the training process";

const FOREIGN_KEYS: Record<string, ForeignKey> = {
    max_length: () => ({rename: "max_seq_length"}), // TRL's SFTConfig name since 0.20
    evaluation_strategy: () => ({rename: "eval_strategy"}), // the name before transformers 4.46
    report_to: (v) =>
        v === "none" || v === null || (Array.isArray(v) && v.length === 0)
            ? {}
            : {notice: `report_to ${quoteValue(v)} has no effect: qlora logs to metrics.jsonl and report.html in output_dir`},
    logging_dir: noEffect("logging_dir has no effect: qlora logs to metrics.jsonl and report.html in output_dir"),
    run_name: noEffect("run_name has no effect: the run is named by its output_dir"),
    torch_dtype: (v) => {
        if (!["auto", "bfloat16", "float16", "float32"].includes(String(v)))
            throw new QloraError(`torch_dtype must be auto, bfloat16, float16 or float32 (got ${quoteValue(v)})`);
        return {notice: "torch_dtype has no effect: qlora computes in float32 on the CPU and bfloat16 on the GPU (see bf16)"};
    },
    trust_remote_code: refused(
        "trust_remote_code: qlora never runs code from a model folder; the architectures it supports (Llama, Qwen2, " +
            "Mistral) load without it: remove the key",
        (v) => v === false
    ),
    formatting_func: refused(
        "formatting_func is a Python function; describe the prompt with template (a string with {field} placeholders) " +
            "or dataset_format instead"
    ),
    neftune_noise_alpha: refused("neftune_noise_alpha (NEFTune) is not implemented; remove it", (v) => v === null),
    push_to_hub: refused(
        "push_to_hub: qlora does not upload; upload output_dir/final with `huggingface-cli upload` after training",
        (v) => v === false
    ),
    hub_model_id: noEffect("hub_model_id has no effect: qlora does not upload (see push_to_hub)"),
    load_best_model_at_end: refused(
        "load_best_model_at_end is not implemented: the final adapter is the last step's; pick a checkpoint-N by its " +
            "eval_loss in metrics.jsonl",
        (v) => v === false
    ),
    metric_for_best_model: noEffect("metric_for_best_model has no effect (see load_best_model_at_end)"),
    group_by_length: noEffect("group_by_length has no effect: batches follow the shuffled order (use packing to save padding)"),
    dataloader_num_workers: noEffect(`dataloader_num_workers has no effect: ${NO_PARALLEL_DATA}`),
    dataloader_pin_memory: noEffect(`dataloader_pin_memory has no effect: ${NO_PARALLEL_DATA}`),
    dataset_num_proc: noEffect(`dataset_num_proc has no effect: ${NO_PARALLEL_DATA}`),
    remove_unused_columns: noEffect("remove_unused_columns has no effect: only the fields the format reads are used"),
    ddp_find_unused_parameters: noEffect("ddp_find_unused_parameters has no effect: qlora trains on one device"),
    gradient_checkpointing_kwargs: noEffect("gradient_checkpointing_kwargs has no effect: qlora recomputes each block itself"),
    logging_strategy: refused('logging_strategy: only "steps" (every logging_steps) is implemented', (v) => v === "steps"),
    logging_first_step: noEffect("logging_first_step has no effect: the first log comes after logging_steps steps"),
    disable_tqdm: noEffect("disable_tqdm has no effect: the progress bar shows only on a terminal"),
    log_level: noEffect("log_level has no effect"),
    eval_accumulation_steps: noEffect("eval_accumulation_steps has no effect: evaluation keeps only the loss sums"),
    attn_implementation: noEffect("attn_implementation has no effect: qlora uses its own attention kernels"),
    device_map: noEffect("device_map has no effect: see device (cpu, cuda or auto)"),
    low_cpu_mem_usage: noEffect("low_cpu_mem_usage has no effect"),
    use_cache: noEffect("use_cache has no effect while training"),
    tf32: noEffect("tf32 has no effect: qlora's fp32 GEMMs do not use TF32"),
    bnb_4bit_quant_storage: noEffect("bnb_4bit_quant_storage has no effect: 4-bit weights are stored packed in uint8"),
    dataset_kwargs: noEffect("dataset_kwargs has no effect"),
    max_seq_len: () => ({rename: "max_seq_length"})
};

/** the config with foreign keys renamed or dropped; their notices are pushed to `notices` */
function translateForeignKeys(input: Record<string, unknown>, source: string, notices: string[]): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const [key, value] of Object.entries(input)) {
        const foreign = Object.hasOwn(FOREIGN_KEYS, key) ? FOREIGN_KEYS[key] : undefined;
        if (!foreign) {
            out[key] = value;
            continue;
        }
        let r: ReturnType<ForeignKey>;
        try {
            r = foreign(value);
        } catch (err) {
            throw err instanceof QloraError ? new QloraError(err.message, {file: source}) : err;
        }
        if (r.notice) notices.push(r.notice);
        if (r.rename) {
            if (r.rename in input && input[r.rename] !== value)
                throw new QloraError(`${key} and ${r.rename} mean the same setting and disagree; keep only ${r.rename}`, {
                    file: source
                });
            out[r.rename] = value;
        }
    }
    return out;
}

/**
 * validates a partial config (from any source) and fills in the defaults; keys from the Python tools are
 * translated (their notices go to `notices` when given)
 */
export function resolveTrainConfig(raw: Record<string, unknown>, source = "config", notices: string[] = []): TrainConfig {
    const input = translateForeignKeys(raw, source, notices);
    for (const key of Object.keys(input)) {
        if (!(TRAIN_CONFIG_KEYS as string[]).includes(key)) {
            const near = closestKey(key);
            throw new QloraError(
                `unknown key "${key}"` + (near ? `; did you mean "${near}"?` : "") + " (qlora train --help lists the keys)",
                {file: source}
            );
        }
    }
    const result = TrainConfigSchema.safeParse(input);
    if (!result.success) {
        const issue = result.error.issues[0];
        const key = issue.path.join(".");
        throw new QloraError(`${key}: ${issue.message}` + (key in input ? ` (got ${quoteValue(input[key])})` : ""), {
            file: source
        });
    }
    const scalingProblem = loraScalingProblem(result.data);
    if (scalingProblem) throw new QloraError(`lora_alpha: ${scalingProblem}`, {file: source});
    return result.data;
}

/** reads a YAML or JSON config file into a plain object (not yet validated) */
export async function readConfigFile(file: string): Promise<Record<string, unknown>> {
    // a training config is a few KB: 1 MiB keeps a hostile YAML from exhausting the parser
    const text = await readTextFile(file, {what: "config file", maxBytes: 1 << 20});
    let parsed: unknown;
    try {
        parsed = path.extname(file).toLowerCase() === ".json" ? JSON.parse(text) : parseYaml(text);
    } catch (err) {
        throw new QloraError(
            `invalid ${path.extname(file).toLowerCase() === ".json" ? "JSON" : "YAML"}: ${(err as Error).message.split("\n")[0]}`,
            {file}
        );
    }
    if (parsed === null || parsed === undefined) return {};
    if (typeof parsed !== "object" || Array.isArray(parsed))
        throw new QloraError("expected a mapping of config keys to values at the top level", {file});
    return parsed as Record<string, unknown>;
}

/**
 * `--key value` / `--key=value` pairs (kebab-case or snake_case) into config values, typed by the schema:
 * numbers, booleans (`--packing` alone means true), comma lists for target_modules and modules_to_save.
 */
export function parseFlags(args: string[]): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (let i = 0; i < args.length; i++) {
        const arg = args[i];
        if (!arg.startsWith("--")) throw new QloraError(`unexpected argument "${arg}": options look like --key value`);
        let [rawKey, value] = arg.slice(2).split(/=(.*)/s, 2) as [string, string | undefined];
        const key = rawKey.replace(/-/g, "_");
        if (!(TRAIN_CONFIG_KEYS as string[]).includes(key) && !Object.hasOwn(FOREIGN_KEYS, key)) {
            const near = closestKey(key);
            throw new QloraError(`unknown option --${rawKey}` + (near ? `; did you mean --${near}?` : ""));
        }
        if (value === undefined) {
            const next = args[i + 1];
            if (next === undefined || next.startsWith("--")) value = "true";
            else {
                value = next;
                i++;
            }
        }
        out[key] = coerce(key, value);
    }
    return out;
}

function coerce(key: string, value: string): unknown {
    if (value === "null" || (value === "none" && key !== "bias")) return null;
    if (key === "columns" || key === "tags") return parseMapFlag(key, value);
    if (key === "target_modules" || key === "modules_to_save" || key === "resume_override") {
        if (key === "target_modules" && (value === "all-linear" || /[\\^$*+?()[\]{}|]/.test(value))) return value;
        return value
            .split(",")
            .map((s) => s.trim())
            .filter(Boolean);
    }
    if (value === "true") return true;
    if (value === "false") return false;
    if (/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(value)) return Number(value);
    return value;
}

/** the valid key nearest to `key`, when it is near enough to be a typo or written in part */
export function closestKey(key: string): string | null {
    return nearestKey(key, [...TRAIN_CONFIG_KEYS, ...Object.keys(FOREIGN_KEYS)], TRAIN_CONFIG_KEYS);
}

/** config file, then flags, over the defaults; notices about keys from the Python tools go to `notices` */
export async function loadTrainConfig(configFile: string | null, flags: string[], notices: string[] = []): Promise<TrainConfig> {
    const fromFile = configFile ? await readConfigFile(configFile) : {};
    if (configFile) resolveTrainConfig(fromFile, configFile); // report file errors against the file
    return resolveTrainConfig({...fromFile, ...parseFlags(flags)}, configFile ?? "command line", notices);
}
