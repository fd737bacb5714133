// adapter-files.ts: the adapter files PEFT writes and reads (SPEC-peft §9, §10): adapter_config.json and
// adapter_model.safetensors. readAdapter is the one reader: loadAdapter (into a model), merge and the GGUF
// exports all take the adapter from it, checked the same way.
import {promises as fs} from "node:fs";
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {halfToF32} from "../backend/cpu.js";
import type {DropoutClock} from "../backend/dropout.js";
import {writeFileAtomic} from "../io/atomic.js";
import {readTextFile} from "../io/files.js";
import type {ModelConfig} from "../io/hf-config.js";
import {SafetensorsFile, writeSafetensors, type TensorToWrite} from "../io/safetensors.js";
import {checkRankFits, LORA_DEFAULTS, loraScaling, validateLoraConfig, type LoraConfig} from "../lora/config.js";
import type {DecoderModel} from "../model/decoder.js";
import {assertFinite, projHasBias, projShape} from "../model/weights.js";
import {applyLora, linearModules, type LoraModel} from "./inject.js";

export const ADAPTER_CONFIG_FILE = "adapter_config.json";
export const ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors";

/** adapter_config.json as PEFT writes it: its field set, sorted keys, 2-space indent */
export function adapterConfigJson(cfg: LoraConfig, targetModules: string[]): string {
    const fields: Record<string, unknown> = {
        alpha_pattern: {},
        auto_mapping: null,
        base_model_name_or_path: cfg.base_model_name_or_path,
        bias: cfg.bias,
        eva_config: null,
        exclude_modules: null,
        fan_in_fan_out: false,
        inference_mode: true,
        init_lora_weights: cfg.init_lora_weights,
        layer_replication: null,
        layers_pattern: null,
        layers_to_transform: null,
        loftq_config: {},
        lora_alpha: cfg.lora_alpha,
        lora_bias: false,
        lora_dropout: cfg.lora_dropout,
        megatron_config: null,
        megatron_core: "megatron.core",
        modules_to_save: cfg.modules_to_save,
        peft_type: "LORA",
        r: cfg.r,
        rank_pattern: {},
        revision: null,
        target_modules: targetModules,
        task_type: cfg.task_type,
        use_dora: cfg.use_dora,
        use_rslora: cfg.use_rslora
    };
    const sorted = Object.fromEntries(
        Object.keys(fields)
            .sort()
            .map((k) => [k, fields[k]])
    );
    return JSON.stringify(sorted, null, 2);
}

/** the saved target_modules: the projection names when they separate targets from the rest, as PEFT condenses them */
function savedTargetModules(lora: LoraModel): string[] {
    const targeted = [...lora.layers.values()].filter((l) => l.lora).map((l) => l.module);
    const all = linearModules(lora.model.config).map((m) => m.name);
    const suffixes = [...new Set(targeted.map((n) => n.slice(n.lastIndexOf(".") + 1)))];
    const covered = all.filter((n) => suffixes.some((s) => n.endsWith(`.${s}`)));
    return covered.length === targeted.length ? suffixes : targeted;
}

/** writes adapter_config.json + adapter_model.safetensors (f32) into dir (each file atomically) */
export async function saveAdapter(dir: string, lora: LoraModel): Promise<void> {
    await fs.mkdir(dir, {recursive: true}).catch((err) => {
        throw new QloraError(`cannot create the adapter folder: ${(err as Error).message}`, {file: dir});
    });
    const tensors: TensorToWrite[] = lora
        .trainableTensors()
        .sort((a, b) => a.name.localeCompare(b.name))
        .map((t) => ({name: t.name, dtype: "F32", shape: t.shape, data: t.param}));
    await writeSafetensors(path.join(dir, ADAPTER_WEIGHTS_FILE), tensors, {format: "pt"});
    await writeFileAtomic(path.join(dir, ADAPTER_CONFIG_FILE), adapterConfigJson(lora.config, savedTargetModules(lora)));
}

/** adapter_config.json is a few kB; anything above this is not one */
const MAX_ADAPTER_CONFIG_BYTES = 16 << 20;

/** what an adapter's weights are read under: the adapter is corrupt, or training diverged before it was saved */
export const CORRUPT_ADAPTER = "the adapter is corrupt (or was saved from a diverged training run): re-download or retrain it";

/** reads adapter_config.json (PEFT's keys; unknown keys are ignored, missing ones take PEFT's defaults) */
export async function readAdapterConfig(dir: string): Promise<LoraConfig> {
    const file = path.join(dir, ADAPTER_CONFIG_FILE);
    let text: string;
    try {
        text = await readTextFile(file, {what: "adapter config", maxBytes: MAX_ADAPTER_CONFIG_BYTES});
    } catch (err) {
        const code = ((err as Error).cause as NodeJS.ErrnoException | undefined)?.code;
        if (code === "ENOENT" || code === "ENOTDIR")
            throw new QloraError(
                `no ${ADAPTER_CONFIG_FILE} here: pass the folder of a PEFT adapter ` +
                    `(adapter_config.json + adapter_model.safetensors)`,
                {file: dir, cause: err}
            );
        throw err;
    }
    let raw: unknown;
    try {
        raw = JSON.parse(text);
    } catch (err) {
        throw new QloraError(`invalid JSON (${(err as Error).message})`, {file, cause: err});
    }
    if (raw === null || typeof raw !== "object" || Array.isArray(raw))
        throw new QloraError(
            `holds ${Array.isArray(raw) ? "an array" : quoteValue(raw)}, expected a JSON object of LoraConfig keys`,
            {file}
        );
    const json = raw as Record<string, unknown>;
    if (json.peft_type !== undefined && json.peft_type !== "LORA")
        throw new QloraError(`peft_type is ${quoteValue(json.peft_type)}; only LORA adapters are supported`, {file});
    // per-module ranks and alphas would silently change the scaling of some modules: refuse what qlora can't apply
    for (const key of ["rank_pattern", "alpha_pattern"]) {
        const value = json[key];
        if (
            value !== undefined &&
            value !== null &&
            !(typeof value === "object" && !Array.isArray(value) && Object.keys(value).length === 0)
        )
            throw new QloraError(
                `${key} is ${quoteValue(value)}; per-module ranks and alphas are not supported (only {} or null)`,
                {file}
            );
    }
    const pick = <K extends keyof LoraConfig>(k: K): LoraConfig[K] => (json[k] ?? LORA_DEFAULTS[k]) as LoraConfig[K];
    return validateLoraConfig(
        {
            r: pick("r"),
            lora_alpha: pick("lora_alpha"),
            target_modules: pick("target_modules"),
            lora_dropout: pick("lora_dropout"),
            bias: pick("bias"),
            use_rslora: pick("use_rslora"),
            use_dora: pick("use_dora"),
            modules_to_save: pick("modules_to_save"),
            task_type: pick("task_type"),
            init_lora_weights: pick("init_lora_weights"),
            base_model_name_or_path: pick("base_model_name_or_path")
        },
        file
    );
}

/** reads an adapter tensor as f32 (from F32, F64, BF16 or F16), refusing NaN and Inf */
async function readAdapterTensor(st: SafetensorsFile, name: string): Promise<Float32Array> {
    const info = st.info(name);
    const values =
        info.dtype === "BF16" || info.dtype === "F16"
            ? halfToF32((await st.readTyped(name)) as Uint16Array, info.dtype)
            : await st.readF32(name);
    // after the conversion, on memory it touched (see readFloatTensor); bf16/f16 NaN and Inf stay NaN and Inf in f32
    assertFinite(name, values, st.path, "F32", CORRUPT_ADAPTER);
    return values;
}

/** one LoRA branch of an adapter, shape-checked against its module */
export interface AdapterBranch {
    r: number;
    /** alpha / r (or alpha / sqrt(r) with rsLoRA), from adapter_config.json */
    scaling: number;
    A: Float32Array; // [r, in]
    B: Float32Array; // [out, r]
    /** DoRA's magnitude [out], or null (plain LoRA, or a DoRA adapter that starts from PEFT's init) */
    magnitude: Float32Array | null;
    outFeatures: number;
    inFeatures: number;
}

/** a PEFT adapter folder, read and checked against a model config */
export interface Adapter {
    /** adapter_config.json's settings */
    config: LoraConfig;
    /** the LoRA branches by module name (model.layers.0.self_attn.q_proj), in the file's order */
    branches: Map<string, AdapterBranch>;
    /** modules_to_save copies by the base tensor each replaces: lm_head.weight, model.embed_tokens.weight */
    fullWeights: Map<string, Float32Array>;
    /** trained biases by the base tensor each replaces, e.g. model.layers.0.self_attn.q_proj.bias */
    biases: Map<string, Float32Array>;
}

export interface ReadAdapterOptions {
    /** called with adapter_config.json's settings before any tensor is read: throws to refuse what the caller cannot use */
    checkConfig?: (config: LoraConfig) => void;
}

/** where one tensor of the adapter file goes: a branch's A, B or magnitude (by module), or a base tensor it replaces */
interface PlacedTensor {
    name: string;
    kind: "lora_A" | "lora_B" | "magnitude" | "full" | "bias";
    target: string;
}

const LORA_TENSOR = /^base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$/;
const MAGNITUDE_TENSOR = /^base_model\.model\.(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$/;
const FULL_TENSOR = /^base_model\.model\.(lm_head|model\.embed_tokens)(?:\.modules_to_save\.default)?\.weight$/;
const BIAS_TENSOR = /^base_model\.model\.(.+)\.bias$/;

/**
 * reads a PEFT adapter folder for a model of config `model`: adapter_config.json, then every tensor's name and
 * shape is checked against the model's modules and the config (r included) from the header before any tensor
 * data is read, then each tensor is read as f32 and checked for NaN and Inf.
 */
export async function readAdapter(dir: string, model: ModelConfig, opts: ReadAdapterOptions = {}): Promise<Adapter> {
    const config = await readAdapterConfig(dir);
    opts.checkConfig?.(config);
    const configFile = path.join(dir, ADAPTER_CONFIG_FILE);
    const file = path.join(dir, ADAPTER_WEIGHTS_FILE);
    let st: SafetensorsFile;
    try {
        st = await SafetensorsFile.open(file);
    } catch (err) {
        const code = ((err as Error).cause as NodeJS.ErrnoException | undefined)?.code;
        if (code === "ENOENT")
            throw new QloraError(`no ${ADAPTER_WEIGHTS_FILE} beside adapter_config.json`, {file: dir, cause: err});
        throw err;
    }
    try {
        const modules = new Map(
            linearModules(model).map((m) => {
                const [outFeatures, inFeatures] = projShape(model, m.proj);
                return [m.name, {outFeatures, inFeatures, hasBias: projHasBias(model, m.proj)}];
            })
        );
        const otherBase = "the adapter was trained on another base model";
        const shapeError = (name: string, shape: readonly number[], expected: readonly number[]) =>
            new QloraError(
                `tensor "${name}" has shape [${shape.join(", ")}] but this model needs [${expected.join(", ")}]: ${otherBase}`,
                {file}
            );
        const sameShape = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, i) => d === b[i]);
        const moduleOf = (name: string, module: string) => {
            const m = modules.get(module);
            if (!m)
                throw new QloraError(
                    `tensor "${name}" belongs to module ${module}, which this model does not have ` +
                        `(was the adapter trained on another base model?)`,
                    {file}
                );
            return m;
        };
        const placed: PlacedTensor[] = [];
        const placedBy = new Map<string, string>(); // kind:target -> the tensor name that goes there
        const place = (t: PlacedTensor) => {
            const first = placedBy.get(`${t.kind}:${t.target}`);
            if (first)
                throw new QloraError(`tensors "${first}" and "${t.name}" are the same weight (with and without ".default")`, {
                    file
                });
            placedBy.set(`${t.kind}:${t.target}`, t.name);
            placed.push(t);
        };
        for (const name of st.names()) {
            const info = st.info(name);
            const mag = MAGNITUDE_TENSOR.exec(name);
            if (mag) {
                if (!config.use_dora)
                    throw new QloraError(
                        `tensor "${name}" is a DoRA magnitude but adapter_config.json ` + "says use_dora is false",
                        {file}
                    );
                const expected = [moduleOf(name, mag[1]).outFeatures];
                if (info.shape.reduce((a, b) => a * b, 1) !== expected[0]) throw shapeError(name, info.shape, expected);
                place({name, kind: "magnitude", target: mag[1]});
                continue;
            }
            const full = FULL_TENSOR.exec(name);
            if (full) {
                const expected = [model.vocabSize, model.hiddenSize];
                if (!sameShape(info.shape, expected)) throw shapeError(name, info.shape, expected);
                place({name, kind: "full", target: `${full[1]}.weight`});
                continue;
            }
            const m = LORA_TENSOR.exec(name);
            if (!m) {
                const bias = BIAS_TENSOR.exec(name);
                if (bias) {
                    // trained biases replace the base biases
                    const base = modules.get(bias[1]);
                    if (!base?.hasBias || config.bias === "none" || !sameShape(info.shape, [base.outFeatures]))
                        throw new QloraError(`tensor "${name}" does not match a bias of this model`, {file});
                    place({name, kind: "bias", target: `${bias[1]}.bias`});
                    continue;
                }
                throw new QloraError(`tensor "${name}" is not a LoRA weight qlora can apply`, {file});
            }
            const [, module, half] = m;
            const base = moduleOf(name, module);
            // r against the module first: a huge r in adapter_config.json is named as such, not as a shape mismatch
            checkRankFits(config.r, [{name: module, ...base}], configFile);
            const rank = half === "lora_A" ? info.shape[0] : info.shape[1];
            if (info.shape.length === 2 && rank !== config.r)
                throw new QloraError(
                    `tensor "${name}" has rank ${rank} but adapter_config.json says r ${config.r}: the scaling ` +
                        "alpha/r would be wrong; the adapter files do not belong together",
                    {file: dir}
                );
            const expected = half === "lora_A" ? [config.r, base.inFeatures] : [base.outFeatures, config.r];
            if (!sameShape(info.shape, expected)) throw shapeError(name, info.shape, expected);
            place({name, kind: half as "lora_A" | "lora_B", target: module});
        }
        const branchModules = new Set(placed.filter((t) => t.kind === "lora_A" || t.kind === "lora_B").map((t) => t.target));
        for (const module of branchModules) {
            const has = (half: string) => placedBy.has(`${half}:${module}`);
            if (!has("lora_A") || !has("lora_B"))
                throw new QloraError(
                    `the adapter has ${has("lora_A") ? "lora_A" : "lora_B"} but no ${has("lora_A") ? "lora_B" : "lora_A"} ` +
                        `for ${module}`,
                    {file}
                );
        }
        if (branchModules.size === 0) throw new QloraError("the adapter holds no lora_A weights", {file});
        for (const t of placed) {
            if (t.kind === "magnitude" && !branchModules.has(t.target))
                throw new QloraError(`tensor "${t.name}" is a DoRA magnitude of ${t.target}, which has no lora_A / lora_B`, {
                    file
                });
            // "lora_only": PEFT trains the biases of the LoRA-wrapped modules only
            if (t.kind === "bias" && config.bias === "lora_only" && !branchModules.has(t.target.replace(/\.bias$/, "")))
                throw new QloraError(`tensor "${t.name}" does not match a bias of this model`, {file});
        }

        const adapter: Adapter = {config, branches: new Map(), fullWeights: new Map(), biases: new Map()};
        const partial = new Map<string, Partial<AdapterBranch>>();
        for (const t of placed) {
            const values = await readAdapterTensor(st, t.name);
            if (t.kind === "full") adapter.fullWeights.set(t.target, values);
            else if (t.kind === "bias") adapter.biases.set(t.target, values);
            else {
                const b = partial.get(t.target) ?? {};
                if (t.kind === "magnitude") b.magnitude = values;
                else b[t.kind === "lora_A" ? "A" : "B"] = values;
                partial.set(t.target, b);
            }
        }
        const scaling = loraScaling(config);
        for (const [module, b] of partial) {
            const {outFeatures, inFeatures} = modules.get(module)!;
            adapter.branches.set(module, {
                r: config.r,
                scaling,
                A: b.A!,
                B: b.B!,
                magnitude: b.magnitude ?? null,
                outFeatures,
                inFeatures
            });
        }
        return adapter;
    } finally {
        await st.close();
    }
}

/**
 * loads a PEFT adapter folder into `model` (in place): readAdapter, then the branches are injected with their
 * weights (applyLora), and trained biases written over the base biases.
 */
export async function loadAdapter(
    dir: string,
    model: DecoderModel,
    opts: {dropoutClock?: DropoutClock} = {}
): Promise<LoraModel> {
    const adapter = await readAdapter(dir, model.config);
    // applyLora looks weights up by the names PEFT saves them under
    const weights = new Map<string, Float32Array>();
    for (const [module, b] of adapter.branches) {
        weights.set(`base_model.model.${module}.lora_A.weight`, b.A);
        weights.set(`base_model.model.${module}.lora_B.weight`, b.B);
        if (b.magnitude) weights.set(`base_model.model.${module}.lora_magnitude_vector`, b.magnitude);
    }
    for (const [name, w] of adapter.fullWeights) weights.set(`base_model.model.${name}`, w);
    const lora = applyLora(
        model,
        {...adapter.config, target_modules: [...adapter.branches.keys()]},
        {weights, dropoutClock: opts.dropoutClock, where: path.join(dir, ADAPTER_CONFIG_FILE)}
    );
    for (const [name, values] of adapter.biases) {
        // readAdapter checked each bias against the model and adapter_config.json's bias mode, so applyLora made it trainable
        const bias = lora.layers.get(name.replace(/\.bias$/, ""))?.bias;
        if (!bias) throw new Error(`${name}: applyLora did not make this bias trainable`);
        bias.set(values);
    }
    lora.config.target_modules = adapter.config.target_modules;
    return lora;
}
