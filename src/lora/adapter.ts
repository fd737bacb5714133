// adapter.ts: putting LoRA branches into a decoder (PEFT's inject_adapter), PEFT's initialization, the
// trainable-parameter line, and the adapter files PEFT writes and reads (SPEC-peft §9, §10).
import {promises as fs} from "node:fs";
import path from "node:path";
import {QloraError} from "../errors.js";
import {halfToF32} from "../backend/cpu.js";
import {Rng} from "../backend/rng.js";
import {writeFileAtomic} from "../io/atomic.js";
import {SafetensorsFile, writeSafetensors, type TensorToWrite} from "../io/safetensors.js";
import type {DecoderModel} from "../model/decoder.js";
import {expectedTensors, PROJ_NAMES, projModule, type ProjName} from "../model/weights.js";
import {LORA_DEFAULTS, loraScaling, validateLoraConfig, type LoraConfig} from "./config.js";
import {baseWeightF32, doraRowNorms, LoraLinear, type TrainableTensor} from "./layer.js";
import {matchTargets} from "./targets.js";

export const ADAPTER_CONFIG_FILE = "adapter_config.json";
export const ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors";

export interface LoraModel {
    model: DecoderModel;
    config: LoraConfig;
    /** every wrapped module, by its module name */
    layers: Map<string, LoraLinear>;
    trainableTensors(): TrainableTensor[];
    setTraining(on: boolean): void;
    zeroGrad(): void;
}

/** every linear module of the decoder, by name, with its layer index and projection */
export function linearModules(model: DecoderModel): {name: string; layer: number; proj: ProjName}[] {
    const out: {name: string; layer: number; proj: ProjName}[] = [];
    for (let l = 0; l < model.config.numHiddenLayers; l++)
        for (const p of PROJ_NAMES) out.push({name: projModule(l, p), layer: l, proj: p});
    return out;
}

export interface ApplyLoraOptions {
    /** draws A at initialization (PEFT: kaiming-uniform) */
    initRng?: Rng;
    /** draws the dropout masks in training */
    dropoutRng?: Rng;
    /** use these weights (by PEFT key) instead of initializing */
    weights?: Map<string, Float32Array>;
}

/** wraps the target modules of `model` in LoRA layers (in place) and returns the handle the trainer uses */
export function applyLora(model: DecoderModel, partial: Partial<LoraConfig>, opts: ApplyLoraOptions = {}): LoraModel {
    const config = validateLoraConfig({...LORA_DEFAULTS, ...partial});
    const modules = linearModules(model);
    const targets = new Set(matchTargets(modules.map((m) => m.name), config, model.config.modelType));
    const scaling = loraScaling(config);
    const initRng = opts.initRng ?? new Rng(0);
    const layers = new Map<string, LoraLinear>();
    const full = fullCopies(model, config.modules_to_save ?? [], opts.weights);
    for (const m of modules) {
        const base = model.params.layers[m.layer].proj[m.proj];
        const isTarget = targets.has(m.name);
        const trainBias = config.bias === "all" || (config.bias === "lora_only" && isTarget);
        if (!isTarget && !(trainBias && base.bias)) continue;
        let lora = null;
        if (isTarget) {
            const r = config.r, K = base.inFeatures, N = base.outFeatures;
            const keyA = `base_model.model.${m.name}.lora_A.weight`, keyB = `base_model.model.${m.name}.lora_B.weight`;
            let A: Float32Array, B: Float32Array;
            if (opts.weights) {
                const a = opts.weights.get(keyA), b = opts.weights.get(keyB);
                if (!a || !b) throw new QloraError(`the adapter has no ${a ? keyB : keyA}, but its config targets ${m.name}`);
                A = a;
                B = b;
            } else {
                A = new Float32Array(r * K);
                B = new Float32Array(N * r);
                initLora(A, K, r, config.init_lora_weights, initRng, B);
            }
            let magnitude: Float32Array | null = null;
            if (config.use_dora) {
                const keyM = `base_model.model.${m.name}.lora_magnitude_vector`;
                // PEFT's init: m = ||W + s B A|| per row (the adapter starts as a no-op)
                magnitude = opts.weights?.get(keyM) ?? doraRowNorms(baseWeightF32(base), {A, B, r, scaling}, N, K);
                if (magnitude.length !== N) throw new QloraError(`${keyM} has ${magnitude.length} values, the module has ${N} outputs`);
            }
            lora = {r, scaling, dropout: config.lora_dropout, A, B, magnitude};
        }
        const layer = new LoraLinear(m.name, base, lora, trainBias, opts.dropoutRng ?? null);
        model.params.layers[m.layer].proj[m.proj] = layer;
        layers.set(m.name, layer);
    }
    return {
        model, config, layers,
        trainableTensors: () => [...layers.values()].flatMap((l) => l.trainableTensors()).concat(full),
        setTraining: (on) => layers.forEach((l) => { l.training = on; }),
        zeroGrad: () => {
            layers.forEach((l) => l.zeroGrad());
            full.forEach((t) => t.grad.fill(0));
        },
    };
}

/**
 * modules_to_save: trainable full copies of the embedding and/or the output layer (PEFT's ModulesToSaveWrapper).
 * The model switches to the copies (a tied output layer becomes untied); saved as base_model.model.lm_head.weight
 * and base_model.model.model.embed_tokens.weight.
 */
function fullCopies(model: DecoderModel, names: string[], weights?: Map<string, Float32Array>): TrainableTensor[] {
    const out: TrainableTensor[] = [];
    const p = model.params;
    const V = model.config.vocabSize, C = model.config.hiddenSize;
    const wanted = new Set(names.map((n) => n.replace(/^model\./, "")));
    const copy = (key: string, from: Float32Array) => {
        const w = weights?.get(key) ?? Float32Array.from(from);
        if (w.length !== V * C) throw new QloraError(`${key} has ${w.length} values, the model needs [${V}, ${C}]`);
        return w;
    };
    p.fullGrads = {};
    if (wanted.has("lm_head")) {
        const key = "base_model.model.lm_head.weight";
        p.lmHead = copy(key, p.lmHead);
        p.fullGrads.lmHead = new Float32Array(V * C);
        out.push({name: key, param: p.lmHead, grad: p.fullGrads.lmHead, shape: [V, C], decay: true});
    }
    if (wanted.has("embed_tokens")) {
        const key = "base_model.model.model.embed_tokens.weight";
        // as in PEFT, a tied output layer keeps the original weight: only the input embedding is the trained copy
        p.embed = copy(key, p.embed);
        p.fullGrads.embed = new Float32Array(V * C);
        out.push({name: key, param: p.embed, grad: p.fullGrads.embed, shape: [V, C], decay: true, fp32State: true});
    }
    return out;
}

/** PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)), B = 0; "gaussian": A ~ N(0, 1/r) */
function initLora(A: Float32Array, fanIn: number, r: number, init: boolean | string, rng: Rng, B: Float32Array): void {
    if (init === "gaussian") {
        for (let i = 0; i < A.length; i++) A[i] = rng.normal() / r;
    } else if (init === true || init === "true") {
        const bound = 1 / Math.sqrt(fanIn);
        for (let i = 0; i < A.length; i++) A[i] = (2 * rng.next() - 1) * bound;
    } else if (init === false) {
        // nn.Linear's default for both (testing only: the adapter is not a no-op at step 0)
        const boundA = 1 / Math.sqrt(fanIn), boundB = 1 / Math.sqrt(r);
        for (let i = 0; i < A.length; i++) A[i] = (2 * rng.next() - 1) * boundA;
        for (let i = 0; i < B.length; i++) B[i] = (2 * rng.next() - 1) * boundB;
    } else {
        throw new QloraError(`init_lora_weights: "${init}" is not supported (use true, false or "gaussian")`);
    }
}

/** number of parameters of the base model (a tied embedding once; 4-bit weights count unpacked, as PEFT does) */
export function baseParameterCount(model: DecoderModel): number {
    let n = 0;
    for (const shape of expectedTensors(model.config).values()) n += shape.reduce((a, b) => a * b, 1);
    return n;
}

/** PEFT's print_trainable_parameters line */
export function trainableParametersLine(lora: LoraModel): string {
    const tensors = lora.trainableTensors();
    // biases are already part of the base count; LoRA matrices are new parameters
    const trainable = tensors.reduce((a, t) => a + t.param.length, 0);
    // LoRA matrices and full copies (modules_to_save) are parameters next to the base's; trained biases are the base's
    const added = tensors.filter((t) => !t.name.endsWith(".bias")).reduce((a, t) => a + t.param.length, 0);
    const all = baseParameterCount(lora.model) + added;
    const fmt = (x: number) => x.toLocaleString("en-US");
    return `trainable params: ${fmt(trainable)} || all params: ${fmt(all)} || trainable%: ${(100 * trainable / all).toFixed(4)}`;
}

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
        use_rslora: cfg.use_rslora,
    };
    const sorted = Object.fromEntries(Object.keys(fields).sort().map((k) => [k, fields[k]]));
    return JSON.stringify(sorted, null, 2);
}

/** the saved target_modules: the projection names when they separate targets from the rest, as PEFT condenses them */
function savedTargetModules(lora: LoraModel): string[] {
    const targeted = [...lora.layers.values()].filter((l) => l.lora).map((l) => l.module);
    const all = linearModules(lora.model).map((m) => m.name);
    const suffixes = [...new Set(targeted.map((n) => n.slice(n.lastIndexOf(".") + 1)))];
    const covered = all.filter((n) => suffixes.some((s) => n.endsWith(`.${s}`)));
    return covered.length === targeted.length ? suffixes : targeted;
}

/** writes adapter_config.json + adapter_model.safetensors (f32) into dir (each file atomically) */
export async function saveAdapter(dir: string, lora: LoraModel): Promise<void> {
    await fs.mkdir(dir, {recursive: true}).catch((err) => {
        throw new QloraError(`cannot create the adapter folder: ${(err as Error).message}`, {file: dir});
    });
    const tensors: TensorToWrite[] = lora.trainableTensors()
        .sort((a, b) => a.name.localeCompare(b.name))
        .map((t) => ({name: t.name, dtype: "F32", shape: t.shape, data: t.param}));
    await writeSafetensors(path.join(dir, ADAPTER_WEIGHTS_FILE), tensors, {format: "pt"});
    await writeFileAtomic(path.join(dir, ADAPTER_CONFIG_FILE), adapterConfigJson(lora.config, savedTargetModules(lora)));
}

/** reads adapter_config.json (PEFT's keys; unknown keys are ignored, missing ones take PEFT's defaults) */
export async function readAdapterConfig(dir: string): Promise<LoraConfig> {
    const file = path.join(dir, ADAPTER_CONFIG_FILE);
    let raw: Record<string, unknown>;
    try {
        raw = JSON.parse(await fs.readFile(file, "utf8"));
    } catch (err) {
        const e = err as NodeJS.ErrnoException;
        if (e.code === "ENOENT") throw new QloraError(`no ${ADAPTER_CONFIG_FILE} here: pass the folder of a PEFT adapter ` +
            `(adapter_config.json + adapter_model.safetensors)`, {file: dir});
        throw new QloraError(`invalid JSON (${e.message})`, {file});
    }
    if (raw.peft_type !== undefined && raw.peft_type !== "LORA")
        throw new QloraError(`peft_type is "${String(raw.peft_type)}"; only LORA adapters are supported`, {file});
    const pick = <K extends keyof LoraConfig>(k: K): LoraConfig[K] => (raw[k] ?? LORA_DEFAULTS[k]) as LoraConfig[K];
    return validateLoraConfig({
        r: pick("r"), lora_alpha: pick("lora_alpha"), target_modules: pick("target_modules"), lora_dropout: pick("lora_dropout"),
        bias: pick("bias"), use_rslora: pick("use_rslora"), use_dora: pick("use_dora"), modules_to_save: pick("modules_to_save"),
        task_type: pick("task_type"), init_lora_weights: pick("init_lora_weights"),
        base_model_name_or_path: pick("base_model_name_or_path"),
    }, file);
}

/** loads a PEFT adapter folder into `model` (in place); shapes are checked against the model */
export async function loadAdapter(dir: string, model: DecoderModel, opts: {dropoutRng?: Rng} = {}): Promise<LoraModel> {
    const config = await readAdapterConfig(dir);
    const file = path.join(dir, ADAPTER_WEIGHTS_FILE);
    let st: SafetensorsFile;
    try {
        st = await SafetensorsFile.open(file);
    } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT" || /ENOENT|no such file/i.test((err as Error).message))
            throw new QloraError(`no ${ADAPTER_WEIGHTS_FILE} beside adapter_config.json`, {file: dir});
        throw err;
    }
    const weights = new Map<string, Float32Array>();
    try {
        const modules = new Map(linearModules(model).map((m) => [m.name, m]));
        for (const name of st.names()) {
            const info = st.info(name);
            const mag = /^base_model\.model\.(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$/.exec(name);
            if (mag) {
                if (!config.use_dora) throw new QloraError(`tensor "${name}" is a DoRA magnitude but adapter_config.json ` +
                    "says use_dora is false", {file});
                weights.set(`base_model.model.${mag[1]}.lora_magnitude_vector`, await st.readF32(name));
                continue;
            }
            if (/^base_model\.model\.(lm_head|model\.embed_tokens)(?:\.modules_to_save\.default)?\.weight$/.test(name)) {
                const key = name.replace(".modules_to_save.default", "");
                const expected = [model.config.vocabSize, model.config.hiddenSize];
                if (info.shape[0] !== expected[0] || info.shape[1] !== expected[1])
                    throw new QloraError(`tensor "${name}" has shape [${info.shape.join(", ")}] but this model needs ` +
                        `[${expected.join(", ")}]: the adapter was trained on another base model`, {file});
                weights.set(key, info.dtype === "F32" ? await st.readF32(name)
                    : halfToF32((await st.readTyped(name)) as Uint16Array, info.dtype as "BF16" | "F16"));
                continue;
            }
            const m = /^base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$/.exec(name);
            if (!m) {
                if (/\.bias$/.test(name)) continue; // trained biases are applied below
                throw new QloraError(`tensor "${name}" is not a LoRA weight qlora can apply`, {file});
            }
            const mod = modules.get(m[1]);
            if (!mod) throw new QloraError(`tensor "${name}" belongs to module ${m[1]}, which this model does not have ` +
                `(was the adapter trained on another base model?)`, {file});
            const base = model.params.layers[mod.layer].proj[mod.proj];
            const expected = m[2] === "lora_A" ? [config.r, base.inFeatures] : [base.outFeatures, config.r];
            if (info.shape.length !== 2 || info.shape[0] !== expected[0] || info.shape[1] !== expected[1])
                throw new QloraError(`tensor "${name}" has shape [${info.shape.join(", ")}] but this model needs ` +
                    `[${expected.join(", ")}]: the adapter was trained on another base model`, {file});
            weights.set(name.replace(".default.weight", ".weight"), info.dtype === "F32" ? await st.readF32(name)
                : halfToF32((await st.readTyped(name)) as Uint16Array, info.dtype as "BF16" | "F16"));
        }
        const lora = applyLora(model, {...config, target_modules: targetsFromWeights(weights)}, {weights, dropoutRng: opts.dropoutRng});
        // trained biases replace the base biases
        for (const name of st.names()) {
            const m = /^base_model\.model\.(.+)\.bias$/.exec(name);
            if (!m) continue;
            const layer = lora.layers.get(m[1]);
            const bias = layer?.bias;
            if (!bias || bias.length !== st.info(name).shape.reduce((a, b) => a * b, 1))
                throw new QloraError(`tensor "${name}" does not match a bias of this model`, {file});
            bias.set(await st.readF32(name));
        }
        lora.config.target_modules = config.target_modules;
        return lora;
    } finally {
        await st.close();
    }
}

/** the exact module names that have LoRA weights */
function targetsFromWeights(weights: Map<string, Float32Array>): string[] {
    const names = new Set<string>();
    for (const k of weights.keys()) {
        const m = /^base_model\.model\.(.+)\.lora_A\.weight$/.exec(k);
        if (m) names.add(m[1]);
    }
    if (names.size === 0) throw new QloraError("the adapter holds no lora_A weights");
    return [...names];
}
