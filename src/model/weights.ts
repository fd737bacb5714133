// weights.ts: reads a Hugging Face decoder checkpoint (llama / qwen2 / qwen3 / mistral / phi3 / gemma3 names) into fp32 buffers,
// checking config.json against the checkpoint's headers before anything is allocated, and every value read for
// NaN and Inf.
import path from "node:path";
import {QloraError} from "../errors.js";
import {countNonFinite, halfToF32, type FloatDtype} from "../backend/cpu.js";
import type {ModelConfig} from "../io/hf-config.js";
import {SafetensorsCheckpoint} from "../io/safetensors.js";

export type ProjName =
    | "q_proj"
    | "k_proj"
    | "v_proj"
    | "o_proj"
    | "gate_proj"
    | "up_proj"
    | "down_proj"
    | "qkv_proj"
    | "gate_up_proj";
/** the projections of llama / qwen2 / qwen3 / mistral, in the order of their dropout numbers */
export const PROJ_NAMES: readonly ProjName[] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
/** phi3's: q, k, v in one qkv_proj ([q; k; v] rows), gate and up in one gate_up_proj ([gate; up] rows) */
export const FUSED_PROJ_NAMES: readonly ProjName[] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/** the projections of each layer of this model, as its checkpoint and PEFT name them */
export function projNames(cfg: ModelConfig): readonly ProjName[] {
    return cfg.fusedProjections ? FUSED_PROJ_NAMES : PROJ_NAMES;
}

/** a projection's number in the model (layer-major, projNames order): part of its dropout seed on every device */
export function projectionIndex(cfg: ModelConfig, layer: number, proj: ProjName): number {
    const names = projNames(cfg);
    return layer * names.length + names.indexOf(proj);
}

const MLP_PROJ: ReadonlySet<string> = new Set(["gate_proj", "up_proj", "down_proj", "gate_up_proj"]);

/** the module path of a projection, as PEFT and Hugging Face name it */
export function projModule(layer: number, proj: ProjName): string {
    return `model.layers.${layer}.${MLP_PROJ.has(proj) ? "mlp" : "self_attn"}.${proj}`;
}

/** [out, in] of each projection, from the config */
export function projShape(cfg: ModelConfig, proj: ProjName): [number, number] {
    const C = cfg.hiddenSize,
        D = cfg.headDim;
    switch (proj) {
        case "q_proj":
            return [cfg.numAttentionHeads * D, C];
        case "k_proj":
        case "v_proj":
            return [cfg.numKeyValueHeads * D, C];
        case "qkv_proj":
            return [(cfg.numAttentionHeads + 2 * cfg.numKeyValueHeads) * D, C];
        case "o_proj":
            return [C, cfg.numAttentionHeads * D];
        case "gate_proj":
        case "up_proj":
            return [cfg.intermediateSize, C];
        case "gate_up_proj":
            return [2 * cfg.intermediateSize, C];
        case "down_proj":
            return [C, cfg.intermediateSize];
    }
}

export function projHasBias(cfg: ModelConfig, proj: ProjName): boolean {
    if (proj === "q_proj" || proj === "k_proj" || proj === "v_proj" || proj === "qkv_proj") return cfg.attentionBias;
    if (proj === "o_proj") return cfg.attentionOutputBias;
    return cfg.mlpBias;
}

/** qwen3's and gemma3's per-head norms of q and k: model.layers.N.self_attn.{q,k}_norm.weight [head_dim] */
export function qkNormNames(layer: number): {q: string; k: string} {
    return {q: `model.layers.${layer}.self_attn.q_norm.weight`, k: `model.layers.${layer}.self_attn.k_norm.weight`};
}

/**
 * the RMSNorm weights of a layer by their role in the graph: before attention (input), before the MLP (preMlp),
 * and gemma3's norms of the attention's and the MLP's outputs (Gemma3DecoderLayer: its post_attention_layernorm
 * normalizes the attention output; pre_feedforward_layernorm is what llama's post_attention_layernorm is)
 */
export function layerNormNames(
    cfg: ModelConfig,
    layer: number
): {input: string; preMlp: string; attnOut?: string; mlpOut?: string} {
    const p = `model.layers.${layer}.`;
    if (!cfg.sandwichNorms) return {input: `${p}input_layernorm.weight`, preMlp: `${p}post_attention_layernorm.weight`};
    return {
        input: `${p}input_layernorm.weight`,
        preMlp: `${p}pre_feedforward_layernorm.weight`,
        attnOut: `${p}post_attention_layernorm.weight`,
        mlpOut: `${p}post_feedforward_layernorm.weight`
    };
}

/** every tensor name and shape the config implies */
export function expectedTensors(cfg: ModelConfig): Map<string, number[]> {
    const m = new Map<string, number[]>();
    m.set("model.embed_tokens.weight", [cfg.vocabSize, cfg.hiddenSize]);
    for (let l = 0; l < cfg.numHiddenLayers; l++) {
        for (const name of Object.values(layerNormNames(cfg, l))) m.set(name, [cfg.hiddenSize]);
        if (cfg.qkNorm) {
            const n = qkNormNames(l);
            m.set(n.q, [cfg.headDim]);
            m.set(n.k, [cfg.headDim]);
        }
        for (const p of projNames(cfg)) {
            const shape = projShape(cfg, p);
            m.set(`${projModule(l, p)}.weight`, shape);
            if (projHasBias(cfg, p)) m.set(`${projModule(l, p)}.bias`, [shape[0]]);
        }
    }
    m.set("model.norm.weight", [cfg.hiddenSize]);
    if (!cfg.tieWordEmbeddings) m.set("lm_head.weight", [cfg.vocabSize, cfg.hiddenSize]);
    return m;
}

export const CORRUPT_CHECKPOINT = "the checkpoint is corrupt: re-download it";

/**
 * Throws when `data` (f32 values, or the bits of bf16/f16 values) holds a NaN or an infinity: such a weight
 * turns every output it touches into NaN, or worse, into finite nonsense after a max or a clamp. The message
 * names the tensor, the file and the counts; `remedy` says what to do (default: re-download the checkpoint).
 * The model loader (readFloatTensor, readTensorF32) and the adapter reader (peft/adapter-files.ts readAdapter)
 * call it on what they read.
 */
export function assertFinite(
    name: string,
    data: Float32Array | Uint16Array,
    file: string,
    dtype: FloatDtype = "F32",
    remedy = CORRUPT_CHECKPOINT
): void {
    const {nan, inf} = countNonFinite(data, dtype);
    if (nan === 0 && inf === 0) return;
    const counts = [nan ? `${nan.toLocaleString("en-US")} NaN` : "", inf ? `${inf.toLocaleString("en-US")} infinite` : ""]
        .filter(Boolean)
        .join(" and ");
    throw new QloraError(
        `tensor "${name}" holds ${counts} value${nan + inf === 1 ? "" : "s"} ` +
            `(of ${data.length.toLocaleString("en-US")}): ${remedy}`,
        {file}
    );
}

/** a float tensor as stored: f32 values, or the bits of bf16/f16 values */
export type RawFloatTensor = {dtype: "F32"; values: Float32Array} | {dtype: "BF16" | "F16"; values: Uint16Array};

/**
 * Reads one float tensor as stored, hands it to `use` (a conversion, a quantizer) and then checks the values for
 * NaN and Inf. The check runs after `use` on purpose: the first touch of freshly read memory is what costs on a
 * loaded machine, so checking memory the conversion just touched adds about 1% to the load instead of 10-40%.
 */
export async function readFloatTensor<T>(ckpt: SafetensorsCheckpoint, name: string, use: (t: RawFloatTensor) => T): Promise<T> {
    const info = ckpt.info(name);
    const t: RawFloatTensor =
        info.dtype === "BF16" || info.dtype === "F16"
            ? {dtype: info.dtype, values: (await ckpt.readTyped(name)) as Uint16Array}
            : {dtype: "F32", values: await ckpt.readF32(name)};
    const result = use(t);
    assertFinite(name, t.values, ckpt.fileFor(name).path, t.dtype);
    return result;
}

/** reads one tensor as fp32, whatever its float dtype; NaN and Inf are refused */
export function readTensorF32(ckpt: SafetensorsCheckpoint, name: string): Promise<Float32Array> {
    return readFloatTensor(ckpt, name, (t) => (t.dtype === "F32" ? t.values : halfToF32(t.values, t.dtype)));
}

const LAYER_TENSOR = /^model\.layers\.(\d+)\./;

/**
 * Checks config.json's sizes against the tensors the checkpoint's headers list, before anything is built from the
 * config: the layer count (the highest model.layers.N + 1) and the embedding's [vocab_size, hidden_size]. Only
 * then is the per-tensor list of expectedTensors built, so a config that claims a billion layers is an error
 * here instead of an out-of-memory crash, and every buffer later allocated from the config has a tensor of that
 * size in the files.
 */
export function checkConfigAgainstCheckpoint(cfg: ModelConfig, ckpt: SafetensorsCheckpoint): void {
    const where = ckpt.indexPath ?? ckpt.path;
    let layers = 0;
    for (const name of ckpt.names()) {
        const m = LAYER_TENSOR.exec(name);
        if (m) layers = Math.max(layers, Number(m[1]) + 1);
    }
    if (layers !== cfg.numHiddenLayers)
        throw new QloraError(
            `"num_hidden_layers" is ${cfg.numHiddenLayers} but the checkpoint (${where}) ` +
                (layers === 0
                    ? "has no model.layers.N tensors"
                    : `holds ${layers} layer${layers === 1 ? "" : "s"} ` + `(model.layers.0 to model.layers.${layers - 1})`) +
                ": the weights do not belong to this config.json (fix the config or re-download the model)",
            {file: cfg.file}
        );
    const embedName = "model.embed_tokens.weight";
    if (ckpt.has(embedName)) {
        const shape = ckpt.info(embedName).shape;
        if (shape.length !== 2 || shape[0] !== cfg.vocabSize || shape[1] !== cfg.hiddenSize)
            throw new QloraError(
                `"vocab_size" ${cfg.vocabSize} and "hidden_size" ${cfg.hiddenSize} imply ` +
                    `${embedName} [${cfg.vocabSize}, ${cfg.hiddenSize}], but the checkpoint holds [${shape.join(", ")}] ` +
                    `(${path.basename(ckpt.fileFor(embedName).path)}): the weights do not belong to this config.json`,
                {file: cfg.file}
            );
    }
}

/**
 * Opens the checkpoint in `dir` and checks that every tensor the config implies exists with the right shape.
 * `skip` names tensors the caller reads itself (quantized projections).
 */
export async function openCheckpoint(
    dir: string,
    cfg: ModelConfig,
    skip: Set<string> = new Set()
): Promise<SafetensorsCheckpoint> {
    const ckpt = await SafetensorsCheckpoint.open(dir);
    try {
        checkConfigAgainstCheckpoint(cfg, ckpt);
        const fileOf = (name: string) => path.basename(ckpt.fileFor(name).path);
        for (const [name, shape] of expectedTensors(cfg)) {
            if (skip.has(name)) continue;
            if (!ckpt.has(name)) {
                if (name === "lm_head.weight")
                    throw new QloraError(
                        `lm_head.weight is missing and config.json says tie_word_embeddings is false ` +
                            `(set "tie_word_embeddings": true if the output layer shares the embedding)`,
                        {file: dir}
                    );
                throw new QloraError(
                    `tensor "${name}" is missing from the checkpoint (config.json describes ` +
                        `${cfg.numHiddenLayers} layers of a ${cfg.modelType} model); is the download complete?`,
                    {file: dir}
                );
            }
            const info = ckpt.info(name);
            if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i]))
                throw new QloraError(
                    `tensor "${name}" has shape [${info.shape.join(", ")}] but config.json implies ` +
                        `[${shape.join(", ")}]; the weights do not belong to this config.json`,
                    {file: fileOf(name)}
                );
            if (!["F32", "F16", "BF16"].includes(info.dtype))
                throw new QloraError(
                    `tensor "${name}" has dtype ${info.dtype}; expected F32, F16 or BF16 ` +
                        `(a quantized checkpoint needs --load-in-4bit support for its format)`,
                    {file: fileOf(name)}
                );
        }
    } catch (err) {
        await ckpt.close();
        throw err;
    }
    return ckpt;
}
