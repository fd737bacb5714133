// training-args.ts: the run's settings, saved in each checkpoint as training_args.json, and the rule for what may
// change when a run is resumed. A resumed run must be the run that was interrupted: a key that defines the adapter
// or the data order can never change; a key that only steers the optimization (learning rate, schedule, length)
// changes only when the user names it in resume_override; the rest (logging, eval, save cadence, device) applies
// silently because it cannot change the adapter the run ends with.
import path from "node:path";
import {z} from "zod";
import {QloraError, quoteValue} from "../errors.js";
import type {TokenizedRow} from "../data/index.js";
import type {TrainerConfig} from "./trainer.js";

export const TRAINING_ARGS_FILE = "training_args.json";

/**
 * free: applies silently on resume; override: applies only when named in resume_override; fixed: never changes
 * on resume. A Record over every key, so a new key cannot be added without deciding its class.
 */
export const RESUME_KEY_CLASSES: Record<keyof TrainerConfig, "free" | "override" | "fixed"> = {
    model: "fixed",
    dataset: "fixed",
    dataset_format: "fixed",
    template: "fixed",
    dataset_text_field: "fixed",
    columns: "fixed",
    tags: "fixed",
    max_seq_length: "fixed",
    packing: "fixed",
    packing_strategy: "fixed",
    completion_only_loss: "fixed",
    assistant_only_loss: "fixed",
    load_in_4bit: "fixed",
    bnb_4bit_quant_type: "fixed",
    bnb_4bit_compute_dtype: "fixed",
    bnb_4bit_use_double_quant: "fixed",
    r: "fixed",
    lora_alpha: "fixed",
    target_modules: "fixed",
    lora_dropout: "fixed",
    bias: "fixed",
    use_rslora: "fixed",
    use_dora: "fixed",
    modules_to_save: "fixed",
    init_lora_weights: "fixed",
    per_device_train_batch_size: "fixed",
    // the batch it settles on is the one a resumed run must keep
    auto_find_batch_size: "free",
    gradient_accumulation_steps: "fixed",
    optim: "fixed",
    seed: "fixed",
    max_steps: "override",
    num_train_epochs: "override",
    learning_rate: "override",
    weight_decay: "override",
    adam_beta1: "override",
    adam_beta2: "override",
    adam_epsilon: "override",
    max_grad_norm: "override",
    lr_scheduler_type: "override",
    warmup_ratio: "override",
    warmup_steps: "override",
    eval_dataset: "free",
    per_device_eval_batch_size: "free",
    output_dir: "free",
    logging_steps: "free",
    eval_strategy: "free",
    eval_steps: "free",
    save_strategy: "free",
    save_steps: "free",
    save_total_limit: "free",
    resume_from_checkpoint: "free",
    overwrite_output_dir: "free",
    resume_override: "free",
    device: "free",
    threads: "free",
    gradient_checkpointing: "free",
    gradient_checkpointing_offload: "free",
    fp16: "free",
    bf16: "free"
};

// explicitly typed: the config schema (train/config.ts) reads these, and TrainerConfig is inferred from it
const KEYS = Object.keys(RESUME_KEY_CLASSES) as string[] as (keyof TrainerConfig)[];
export const RESUME_OVERRIDABLE_KEYS: string[] = KEYS.filter((k) => RESUME_KEY_CLASSES[k] === "override");

/** null when `names` is a valid resume_override list, else what is wrong with it */
export function resumeOverrideProblem(names: readonly string[]): string | null {
    for (const name of names) {
        const cls = RESUME_KEY_CLASSES[name as keyof TrainerConfig];
        if (cls === "override") continue;
        if (cls === "fixed")
            return `${name} defines the adapter or the data order and cannot change on resume (start a new run instead)`;
        if (cls === "free") return `${name} needs no override: it applies on resume as it is`;
        return `unknown key "${name}"`;
    }
    return null;
}

/** a fingerprint of the tokenized training rows: a resumed run must see the data the checkpoint was made with */
export interface DataFingerprint {
    rows: number;
    tokens: number;
    /** a 64-bit hash of every row's length, input ids and which tokens are trained (hex) */
    hash: string;
}

export function dataFingerprint(rows: readonly TokenizedRow[]): DataFingerprint {
    // two 32-bit FNV-style lanes over each token with its "trained" bit (labels are the ids or -100), and each length
    let h1 = 0x811c9dc5 | 0,
        h2 = 0x2545f491 | 0,
        tokens = 0;
    for (const row of rows) {
        const ids = row.inputIds,
            labels = row.labels,
            n = ids.length;
        h1 = Math.imul(h1 ^ n, 0x01000193);
        h2 = Math.imul(h2 ^ n, 0x5bd1e995);
        for (let i = 0; i < n; i++) {
            const v = ids[i] ^ (labels[i] === -100 ? 0x40000000 : 0);
            h1 = Math.imul(h1 ^ v, 0x01000193);
            h2 = Math.imul(h2 ^ v, 0x5bd1e995) ^ (h2 >>> 15);
        }
        tokens += n;
    }
    const hex = (h: number) => (h >>> 0).toString(16).padStart(8, "0");
    return {rows: rows.length, tokens, hash: hex(h1) + hex(h2)};
}

export interface SavedTrainingArgs {
    format: "qlora.training_args";
    version: 1;
    /** the run's resolved settings (absolute paths) */
    config: Record<string, unknown>;
    data: DataFingerprint;
    /** the ranks of a data-parallel run (absent: 1) */
    world_size?: number;
}

/** the comparable form of a value: absolute paths, module lists as sets */
function normalize(key: string, value: unknown): unknown {
    if ((key === "model" || key === "dataset") && typeof value === "string") return path.resolve(value);
    if ((key === "target_modules" || key === "modules_to_save") && Array.isArray(value)) return [...value].sort();
    return value ?? null;
}

/** `worldSize`: the ranks of a data-parallel run (saved only when more than 1) */
export function trainingArgsOf(config: TrainerConfig, data: DataFingerprint, worldSize = 1): SavedTrainingArgs {
    const saved: Record<string, unknown> = {};
    for (const key of KEYS) saved[key] = normalize(key, config[key]);
    return {format: "qlora.training_args", version: 1, config: saved, data, ...(worldSize > 1 ? {world_size: worldSize} : {})};
}

const SavedArgsSchema = z.object({
    format: z.literal("qlora.training_args"),
    version: z.literal(1),
    config: z.record(z.string(), z.unknown()),
    data: z.object({rows: z.number().int().min(0), tokens: z.number().int().min(0), hash: z.string()}),
    world_size: z.number().int().min(1).optional()
});

/** parses training_args.json; a QloraError naming the file when it is not one */
export function parseTrainingArgs(text: string, file: string, advice: string): SavedTrainingArgs {
    let json: unknown;
    try {
        json = JSON.parse(text);
    } catch (err) {
        throw new QloraError(`not valid JSON (${(err as Error).message}); ${advice}`, {file});
    }
    const r = SavedArgsSchema.safeParse(json);
    if (!r.success) {
        const issue = r.error.issues[0];
        throw new QloraError(`${issue.path.join(".") || "(top level)"}: ${issue.message}; ${advice}`, {file});
    }
    return r.data as SavedTrainingArgs;
}

export interface ConfigChange {
    key: string;
    saved: unknown;
    now: unknown;
}

function same(a: unknown, b: unknown): boolean {
    try {
        return JSON.stringify(a) === JSON.stringify(b);
    } catch {
        return false; // a saved value nested too deeply to serialize is not any setting qlora writes
    }
}

/** the settings of `config` that differ from the saved run, split by what the resume rule allows */
export function compareTrainingArgs(
    saved: SavedTrainingArgs,
    config: TrainerConfig,
    worldSize = 1
): {
    fixed: ConfigChange[];
    notNamed: ConfigChange[];
    overridden: ConfigChange[];
} {
    const out = {fixed: [] as ConfigChange[], notNamed: [] as ConfigChange[], overridden: [] as ConfigChange[]};
    const named = new Set<string>(config.resume_override ?? []);
    const bothStepCounted = Number(saved.config.max_steps) > 0 && config.max_steps > 0;
    for (const key of KEYS) {
        const cls = RESUME_KEY_CLASSES[key];
        if (cls === "free" || !(key in saved.config)) continue;
        // num_train_epochs means nothing while max_steps sets the length
        if (key === "num_train_epochs" && bothStepCounted) continue;
        let was = saved.config[key],
            now = normalize(key, config[key]);
        const savedWorld = saved.world_size ?? 1;
        if (key === "per_device_train_batch_size" && (savedWorld > 1 || worldSize > 1)) {
            // the data order is the global micro-batch's (per device x ranks): it may be split over other ranks
            if (Number(was) * savedWorld === Number(now) * worldSize) continue;
            const global = (b: unknown, w: number) => `${Number(b) * w} (${b} per device x ${w} rank${w === 1 ? "" : "s"})`;
            was = global(was, savedWorld);
            now = global(now, worldSize);
        } else if (same(was, now)) continue;
        const change = {key, saved: was, now};
        if (cls === "fixed") out.fixed.push(change);
        else if (named.has(key)) out.overridden.push(change);
        else out.notNamed.push(change);
    }
    return out;
}

const show = (v: unknown) => (typeof v === "string" ? v : quoteValue(v));

/**
 * Refuses a resume whose settings differ from the checkpoint's, listing every difference (key: saved → new), unless
 * each difference is an overridable key named in resume_override. Returns the keys that are overridden.
 */
export function checkResumeSettings(
    saved: SavedTrainingArgs,
    config: TrainerConfig,
    checkpointDir: string,
    worldSize = 1
): ConfigChange[] {
    const {fixed, notNamed, overridden} = compareTrainingArgs(saved, config, worldSize);
    if (fixed.length === 0 && notNamed.length === 0) return overridden;
    const list = [...fixed, ...notNamed].map((c) => `${c.key}: ${show(c.saved)} → ${show(c.now)}`).join(", ");
    const parts: string[] = [];
    if (fixed.length > 0)
        parts.push(
            `${fixed.map((c) => c.key).join(", ")} cannot change on resume (${fixed.length === 1 ? "it defines" : "they define"} ` +
                "the adapter or the data order): put them back, or start a new run (another output_dir, or --overwrite_output_dir true)"
        );
    if (notNamed.length > 0)
        parts.push(
            `to change ${notNamed.map((c) => c.key).join(", ")} on resume, name ${notNamed.length === 1 ? "it" : "them"} in ` +
                `resume_override (--resume_override ${[...new Set([...(config.resume_override ?? []), ...notNamed.map((c) => c.key)])].join(",")})`
        );
    throw new QloraError(
        `resume_from_checkpoint: the settings differ from the run being resumed (${list}); ${parts.join("; ")}`,
        {file: path.join(checkpointDir, TRAINING_ARGS_FILE)}
    );
}

/** refuses data that differs from what the checkpoint's run trained on */
export function checkResumeData(saved: SavedTrainingArgs, now: DataFingerprint, checkpointDir: string): void {
    if (saved.data.rows === now.rows && saved.data.tokens === now.tokens && saved.data.hash === now.hash) return;
    throw new QloraError(
        `resume_from_checkpoint: the training data differs from the data the run started with ` +
            `(${saved.data.rows} rows, ${saved.data.tokens} tokens, hash ${saved.data.hash} → ${now.rows} rows, ${now.tokens} tokens, ` +
            `hash ${now.hash}); resume with the same data file, or start a new run (another output_dir, or --overwrite_output_dir true)`,
        {file: path.join(checkpointDir, TRAINING_ARGS_FILE)}
    );
}
