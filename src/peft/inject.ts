// inject.ts: putting LoRA branches into a decoder (PEFT's inject_adapter): target matching, PEFT's
// initialization, modules_to_save copies and the trainable-parameter line (SPEC-peft §5, §9, §10).
// It sits above model/ because it wraps a DecoderModel's layers; the LoRA layer itself is lora/layer.ts.
import {QloraError} from "../errors.js";
import type {DropoutClock} from "../backend/dropout.js";
import {Rng} from "../backend/rng.js";
import type {ModelConfig} from "../io/hf-config.js";
import {checkRankFits, LORA_DEFAULTS, loraScaling, validateLoraConfig, type LoraConfig} from "../lora/config.js";
import {baseWeightF32, doraRowNorms, frozenBase, LoraLinear, type TrainableTensor} from "../lora/layer.js";
import {matchTargets} from "../lora/targets.js";
import type {DecoderModel} from "../model/decoder.js";
import {expectedTensors, PROJ_NAMES, projectionIndex, projModule, projNames, type ProjName} from "../model/weights.js";

export interface LoraModel {
    model: DecoderModel;
    config: LoraConfig;
    /** every wrapped module, by its module name */
    layers: Map<string, LoraLinear>;
    trainableTensors(): TrainableTensor[];
    zeroGrad(): void;
}

/** every linear module a decoder of this config has, by name, with its layer index and projection */
export function linearModules(cfg: ModelConfig): {name: string; layer: number; proj: ProjName}[] {
    const out: {name: string; layer: number; proj: ProjName}[] = [];
    for (let l = 0; l < cfg.numHiddenLayers; l++)
        for (const p of projNames(cfg)) out.push({name: projModule(l, p), layer: l, proj: p});
    return out;
}

/**
 * The train config's targets on this model: its default (and any list of) all seven llama-family projections
 * means every linear projection, which on a model with fused modules (phi3) are qkv_proj, o_proj, gate_up_proj
 * and down_proj; anything else is matched as given (PEFT's rules: q_proj alone matches nothing on phi3).
 */
export function trainTargets(cfg: ModelConfig, targets: LoraConfig["target_modules"]): LoraConfig["target_modules"] {
    const everyProjection =
        Array.isArray(targets) && targets.length === PROJ_NAMES.length && PROJ_NAMES.every((p) => targets.includes(p));
    return cfg.fusedProjections && everyProjection ? [...projNames(cfg)] : targets;
}

export interface ApplyLoraOptions {
    /** draws A at initialization (PEFT: kaiming-uniform) */
    initRng?: Rng;
    /** the run's micro-batch clock the dropout masks are seeded from in training */
    dropoutClock?: DropoutClock;
    /** use these weights (by PEFT key) instead of initializing */
    weights?: Map<string, Float32Array>;
    /** where the LoRA settings come from, for messages (default "lora config") */
    where?: string;
}

/** wraps the target modules of `model` in LoRA layers (in place) and returns the handle the trainer uses */
export function applyLora(model: DecoderModel, partial: Partial<LoraConfig>, opts: ApplyLoraOptions = {}): LoraModel {
    const config = validateLoraConfig({...LORA_DEFAULTS, ...partial});
    const modules = linearModules(model.config);
    const targets = new Set(
        matchTargets(
            modules.map((m) => m.name),
            config,
            model.config.modelType
        )
    );
    // r against every targeted module's shape before any A or B is allocated
    checkRankFits(
        config.r,
        modules
            .filter((m) => targets.has(m.name))
            .map((m) => {
                const base = model.params.layers[m.layer].proj[m.proj];
                return {name: m.name, outFeatures: base.outFeatures, inFeatures: base.inFeatures};
            }),
        opts.where
    );
    const scaling = loraScaling(config);
    const initRng = opts.initRng ?? new Rng(0);
    const layers = new Map<string, LoraLinear>();
    const full = fullCopies(model, config.modules_to_save ?? [], opts.weights);
    for (const m of modules) {
        const slot = model.params.layers[m.layer].proj[m.proj];
        // one adapter per model: a second would wrap the first's layer and train both
        if (slot instanceof LoraLinear) throw new Error(`${m.name} already has a LoRA adapter; load a fresh base model`);
        const base = frozenBase(slot);
        const isTarget = targets.has(m.name);
        const trainBias = config.bias === "all" || (config.bias === "lora_only" && isTarget);
        if (!isTarget && !(trainBias && base.bias)) continue;
        let lora = null;
        if (isTarget) {
            const r = config.r,
                K = base.inFeatures,
                N = base.outFeatures;
            const keyA = `base_model.model.${m.name}.lora_A.weight`,
                keyB = `base_model.model.${m.name}.lora_B.weight`;
            let A: Float32Array, B: Float32Array;
            if (opts.weights) {
                const a = opts.weights.get(keyA),
                    b = opts.weights.get(keyB);
                if (!a || !b) throw new QloraError(`the adapter has no ${a ? keyB : keyA}, but its config targets ${m.name}`);
                if (a.length !== r * K || b.length !== N * r)
                    throw new QloraError(
                        `${keyA} / ${keyB} have ${a.length} / ${b.length} values, but r = ${r} on ${m.name} ` +
                            `([${N}, ${K}]) needs ${r * K} / ${N * r}`,
                        {file: opts.where}
                    );
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
                if (magnitude.length !== N)
                    throw new QloraError(`${keyM} has ${magnitude.length} values, the module has ${N} outputs`);
            }
            lora = {r, scaling, dropout: config.lora_dropout, A, B, magnitude};
        }
        const dropout = opts.dropoutClock
            ? {clock: opts.dropoutClock, projection: projectionIndex(model.config, m.layer, m.proj)}
            : null;
        const layer = new LoraLinear(m.name, base, lora, trainBias, dropout);
        model.params.layers[m.layer].proj[m.proj] = layer;
        layers.set(m.name, layer);
    }
    return {
        model,
        config,
        layers,
        trainableTensors: () => [...layers.values()].flatMap((l) => l.trainableTensors()).concat(full),
        zeroGrad: () => {
            layers.forEach((l) => l.zeroGrad());
            full.forEach((t) => t.grad.fill(0));
        }
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
    const V = model.config.vocabSize,
        C = model.config.hiddenSize;
    const wanted = new Set(names.map((n) => n.replace(/^model\./, "")));
    const copy = (key: string, from: Float32Array) => {
        const w = weights?.get(key) ?? Float32Array.from(from);
        if (w.length !== V * C) throw new QloraError(`${key} has ${w.length} values, the model needs [${V}, ${C}]`);
        return w;
    };
    p.trainedFull = {};
    if (wanted.has("lm_head")) {
        const key = "base_model.model.lm_head.weight";
        p.lmHead = copy(key, p.lmHead);
        p.trainedFull.lmHead = {name: key, param: p.lmHead, grad: new Float32Array(V * C), shape: [V, C], decay: true};
        out.push(p.trainedFull.lmHead);
    }
    if (wanted.has("embed_tokens")) {
        const key = "base_model.model.model.embed_tokens.weight";
        // as in PEFT, a tied output layer keeps the original weight: only the input embedding is the trained copy
        p.embed = copy(key, p.embed);
        p.trainedFull.embed = {
            name: key,
            param: p.embed,
            grad: new Float32Array(V * C),
            shape: [V, C],
            decay: true,
            fp32State: true
        };
        out.push(p.trainedFull.embed);
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
        const boundA = 1 / Math.sqrt(fanIn),
            boundB = 1 / Math.sqrt(r);
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
    return `trainable params: ${fmt(trainable)} || all params: ${fmt(all)} || trainable%: ${((100 * trainable) / all).toFixed(4)}`;
}
