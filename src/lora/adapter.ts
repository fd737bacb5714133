// adapter.ts: putting LoRA branches into a decoder (PEFT's inject_adapter), PEFT's initialization, the
// trainable-parameter line, and the adapter files PEFT writes and reads (SPEC-peft §9, §10).
import {promises as fs} from "node:fs";
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {halfToF32} from "../backend/cpu.js";
import {Rng} from "../backend/rng.js";
import {writeFileAtomic} from "../io/atomic.js";
import {readTextFile} from "../io/files.js";
import {SafetensorsFile, writeSafetensors, type TensorToWrite} from "../io/safetensors.js";
import type {DecoderModel} from "../model/decoder.js";
import {assertFinite, expectedTensors, PROJ_NAMES, projModule, type ProjName} from "../model/weights.js";
import {checkRankFits, LORA_DEFAULTS, loraScaling, validateLoraConfig, type LoraConfig} from "./config.js";
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
    /** where the LoRA settings come from, for messages (default "lora config") */
    where?: string;
}

/** wraps the target modules of `model` in LoRA layers (in place) and returns the handle the trainer uses */
export function applyLora(model: DecoderModel, partial: Partial<LoraConfig>, opts: ApplyLoraOptions = {}): LoraModel {
    const config = validateLoraConfig({...LORA_DEFAULTS, ...partial});
    const modules = linearModules(model);
    const targets = new Set(matchTargets(modules.map((m) => m.name), config, model.config.modelType));
    // r against every targeted module's shape before any A or B is allocated
    checkRankFits(config.r, modules.filter((m) => targets.has(m.name)).map((m) => {
        const base = model.params.layers[m.layer].proj[m.proj];
        return {name: m.name, outFeatures: base.outFeatures, inFeatures: base.inFeatures};
    }), opts.where);
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
                if (a.length !== r * K || b.length !== N * r)
                    throw new QloraError(`${keyA} / ${keyB} have ${a.length} / ${b.length} values, but r = ${r} on ${m.name} ` +
                        `([${N}, ${K}]) needs ${r * K} / ${N * r}`, {file: opts.where});
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
        if (code === "ENOENT" || code === "ENOTDIR") throw new QloraError(`no ${ADAPTER_CONFIG_FILE} here: pass the folder of a PEFT adapter ` +
            `(adapter_config.json + adapter_model.safetensors)`, {file: dir, cause: err});
        throw err;
    }
    let raw: unknown;
    try {
        raw = JSON.parse(text);
    } catch (err) {
        throw new QloraError(`invalid JSON (${(err as Error).message})`, {file, cause: err});
    }
    if (raw === null || typeof raw !== "object" || Array.isArray(raw))
        throw new QloraError(`holds ${Array.isArray(raw) ? "an array" : quoteValue(raw)}, expected a JSON object of LoraConfig keys`, {file});
    const json = raw as Record<string, unknown>;
    if (json.peft_type !== undefined && json.peft_type !== "LORA")
        throw new QloraError(`peft_type is ${quoteValue(json.peft_type)}; only LORA adapters are supported`, {file});
    // per-module ranks and alphas would silently change the scaling of some modules: refuse what qlora can't apply
    for (const key of ["rank_pattern", "alpha_pattern"]) {
        const value = json[key];
        if (value !== undefined && value !== null && !(typeof value === "object" && !Array.isArray(value) && Object.keys(value).length === 0))
            throw new QloraError(`${key} is ${quoteValue(value)}; per-module ranks and alphas are not supported (only {} or null)`, {file});
    }
    const pick = <K extends keyof LoraConfig>(k: K): LoraConfig[K] => (json[k] ?? LORA_DEFAULTS[k]) as LoraConfig[K];
    return validateLoraConfig({
        r: pick("r"), lora_alpha: pick("lora_alpha"), target_modules: pick("target_modules"), lora_dropout: pick("lora_dropout"),
        bias: pick("bias"), use_rslora: pick("use_rslora"), use_dora: pick("use_dora"), modules_to_save: pick("modules_to_save"),
        task_type: pick("task_type"), init_lora_weights: pick("init_lora_weights"),
        base_model_name_or_path: pick("base_model_name_or_path"),
    }, file);
}

/** reads an adapter tensor as f32 (from F32, F64, BF16 or F16), refusing NaN and Inf (merge reads through it too) */
export async function readAdapterTensor(st: SafetensorsFile, name: string): Promise<Float32Array> {
    const info = st.info(name);
    const values = info.dtype === "BF16" || info.dtype === "F16"
        ? halfToF32((await st.readTyped(name)) as Uint16Array, info.dtype) : await st.readF32(name);
    // after the conversion, on memory it touched (see readFloatTensor); bf16/f16 NaN and Inf stay NaN and Inf in f32
    assertFinite(name, values, st.path, "F32", CORRUPT_ADAPTER);
    return values;
}

/** how loadAdapter places one tensor of the adapter file */
interface AdapterTensorPlan {
    /** the tensor's name in the file */
    name: string;
    /** the PEFT key applyLora looks it up under */
    key: string;
    kind: "lora" | "magnitude" | "full" | "bias";
}

/**
 * loads a PEFT adapter folder into `model` (in place). Every tensor's name and shape is checked against the model
 * and adapter_config.json (r included) from the header before any tensor data is read, then each tensor is read
 * and checked for NaN and Inf.
 */
export async function loadAdapter(dir: string, model: DecoderModel, opts: {dropoutRng?: Rng} = {}): Promise<LoraModel> {
    const config = await readAdapterConfig(dir);
    const configFile = path.join(dir, ADAPTER_CONFIG_FILE);
    const file = path.join(dir, ADAPTER_WEIGHTS_FILE);
    let st: SafetensorsFile;
    try {
        st = await SafetensorsFile.open(file);
    } catch (err) {
        const code = ((err as Error).cause as NodeJS.ErrnoException | undefined)?.code;
        if (code === "ENOENT") throw new QloraError(`no ${ADAPTER_WEIGHTS_FILE} beside adapter_config.json`, {file: dir, cause: err});
        throw err;
    }
    try {
        const modules = new Map(linearModules(model).map((m) => [m.name, m]));
        const baseOf = (module: string) => {
            const m = modules.get(module)!;
            return model.params.layers[m.layer].proj[m.proj];
        };
        const otherBase = "the adapter was trained on another base model";
        const shapeError = (name: string, shape: readonly number[], expected: readonly number[]) =>
            new QloraError(`tensor "${name}" has shape [${shape.join(", ")}] but this model needs [${expected.join(", ")}]: ${otherBase}`, {file});
        const sameShape = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, i) => d === b[i]);
        const plan: AdapterTensorPlan[] = [];
        const halves = new Map<string, Set<string>>(); // module -> {"lora_A", "lora_B"}
        for (const name of st.names()) {
            const info = st.info(name);
            const mag = /^base_model\.model\.(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$/.exec(name);
            if (mag) {
                if (!config.use_dora) throw new QloraError(`tensor "${name}" is a DoRA magnitude but adapter_config.json ` +
                    "says use_dora is false", {file});
                if (!modules.has(mag[1])) throw new QloraError(`tensor "${name}" belongs to module ${mag[1]}, which this model does not have: ${otherBase}`, {file});
                const expected = [baseOf(mag[1]).outFeatures];
                if (info.shape.reduce((a, b) => a * b, 1) !== expected[0]) throw shapeError(name, info.shape, expected);
                plan.push({name, key: `base_model.model.${mag[1]}.lora_magnitude_vector`, kind: "magnitude"});
                continue;
            }
            if (/^base_model\.model\.(lm_head|model\.embed_tokens)(?:\.modules_to_save\.default)?\.weight$/.test(name)) {
                const expected = [model.config.vocabSize, model.config.hiddenSize];
                if (!sameShape(info.shape, expected)) throw shapeError(name, info.shape, expected);
                plan.push({name, key: name.replace(".modules_to_save.default", ""), kind: "full"});
                continue;
            }
            const m = /^base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$/.exec(name);
            if (!m) {
                const bias = /^base_model\.model\.(.+)\.bias$/.exec(name);
                if (bias) {
                    // trained biases replace the base biases (applied after applyLora, which makes them trainable)
                    const base = modules.has(bias[1]) ? baseOf(bias[1]) : null;
                    if (!base?.bias || config.bias === "none" || !sameShape(info.shape, [base.bias.length]))
                        throw new QloraError(`tensor "${name}" does not match a bias of this model`, {file});
                    plan.push({name, key: name, kind: "bias"});
                    continue;
                }
                throw new QloraError(`tensor "${name}" is not a LoRA weight qlora can apply`, {file});
            }
            if (!modules.has(m[1])) throw new QloraError(`tensor "${name}" belongs to module ${m[1]}, which this model does not have ` +
                `(was the adapter trained on another base model?)`, {file});
            const base = baseOf(m[1]);
            // r against the module first: a huge r in adapter_config.json is named as such, not as a shape mismatch
            checkRankFits(config.r, [{name: m[1], outFeatures: base.outFeatures, inFeatures: base.inFeatures}], configFile);
            const expected = m[2] === "lora_A" ? [config.r, base.inFeatures] : [base.outFeatures, config.r];
            if (!sameShape(info.shape, expected)) throw shapeError(name, info.shape, expected);
            plan.push({name, key: name.replace(".default.weight", ".weight"), kind: "lora"});
            const seen = halves.get(m[1]) ?? new Set<string>();
            if (seen.has(m[2])) throw new QloraError(`module ${m[1]} has two ${m[2]} tensors (with and without ".default")`, {file});
            halves.set(m[1], seen.add(m[2]));
        }
        for (const [module, seen] of halves)
            if (seen.size !== 2) throw new QloraError(`the adapter has ${[...seen][0]} but no ${seen.has("lora_A") ? "lora_B" : "lora_A"} ` +
                `for ${module}`, {file});
        if (halves.size === 0) throw new QloraError("the adapter holds no lora_A weights", {file});

        const weights = new Map<string, Float32Array>();
        for (const t of plan) if (t.kind !== "bias") weights.set(t.key, await readAdapterTensor(st, t.name));
        const lora = applyLora(model, {...config, target_modules: [...halves.keys()]}, {weights, dropoutRng: opts.dropoutRng, where: configFile});
        for (const t of plan) {
            if (t.kind !== "bias") continue;
            const bias = lora.layers.get(/^base_model\.model\.(.+)\.bias$/.exec(t.name)![1])?.bias;
            if (!bias) throw new QloraError(`tensor "${t.name}" does not match a bias of this model`, {file});
            bias.set(await readAdapterTensor(st, t.name));
        }
        lora.config.target_modules = config.target_modules;
        return lora;
    } finally {
        await st.close();
    }
}
