// weights.ts: reads a Hugging Face decoder checkpoint (llama / qwen2 / mistral names) into fp32 buffers,
// checking every tensor's shape against config.json before anything is computed.
import path from "node:path";
import {QloraError} from "../errors.js";
import {halfToF32} from "../backend/cpu.js";
import type {ModelConfig} from "../io/hf-config.js";
import {SafetensorsCheckpoint} from "../io/safetensors.js";

export type ProjName = "q_proj" | "k_proj" | "v_proj" | "o_proj" | "gate_proj" | "up_proj" | "down_proj";
export const PROJ_NAMES: readonly ProjName[] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/** the module path of a projection, as PEFT and Hugging Face name it */
export function projModule(layer: number, proj: ProjName): string {
    const group = proj.endsWith("_proj") && ["gate_proj", "up_proj", "down_proj"].includes(proj) ? "mlp" : "self_attn";
    return `model.layers.${layer}.${group}.${proj}`;
}

/** [out, in] of each projection, from the config */
export function projShape(cfg: ModelConfig, proj: ProjName): [number, number] {
    const C = cfg.hiddenSize, D = cfg.headDim;
    switch (proj) {
        case "q_proj": return [cfg.numAttentionHeads * D, C];
        case "k_proj":
        case "v_proj": return [cfg.numKeyValueHeads * D, C];
        case "o_proj": return [C, cfg.numAttentionHeads * D];
        case "gate_proj":
        case "up_proj": return [cfg.intermediateSize, C];
        case "down_proj": return [C, cfg.intermediateSize];
    }
}

export function projHasBias(cfg: ModelConfig, proj: ProjName): boolean {
    if (proj === "q_proj" || proj === "k_proj" || proj === "v_proj") return cfg.attentionBias;
    if (proj === "o_proj") return cfg.attentionOutputBias;
    return cfg.mlpBias;
}

/** every tensor name and shape the config implies */
export function expectedTensors(cfg: ModelConfig): Map<string, number[]> {
    const m = new Map<string, number[]>();
    m.set("model.embed_tokens.weight", [cfg.vocabSize, cfg.hiddenSize]);
    for (let l = 0; l < cfg.numHiddenLayers; l++) {
        m.set(`model.layers.${l}.input_layernorm.weight`, [cfg.hiddenSize]);
        m.set(`model.layers.${l}.post_attention_layernorm.weight`, [cfg.hiddenSize]);
        for (const p of PROJ_NAMES) {
            const shape = projShape(cfg, p);
            m.set(`${projModule(l, p)}.weight`, shape);
            if (projHasBias(cfg, p)) m.set(`${projModule(l, p)}.bias`, [shape[0]]);
        }
    }
    m.set("model.norm.weight", [cfg.hiddenSize]);
    if (!cfg.tieWordEmbeddings) m.set("lm_head.weight", [cfg.vocabSize, cfg.hiddenSize]);
    return m;
}

/** reads one tensor as fp32, whatever its float dtype */
export async function readTensorF32(ckpt: SafetensorsCheckpoint, name: string): Promise<Float32Array> {
    const info = ckpt.info(name);
    if (info.dtype === "BF16" || info.dtype === "F16") {
        const bits = (await ckpt.readTyped(name)) as Uint16Array;
        return halfToF32(bits, info.dtype);
    }
    return ckpt.readF32(name);
}

/**
 * Opens the checkpoint in `dir` and checks that every tensor the config implies exists with the right shape.
 * `skip` names tensors the caller reads itself (quantized projections).
 */
export async function openCheckpoint(dir: string, cfg: ModelConfig, skip: Set<string> = new Set()): Promise<SafetensorsCheckpoint> {
    const ckpt = await SafetensorsCheckpoint.open(dir);
    try {
        const fileOf = (name: string) => path.basename(ckpt.fileFor(name).path);
        for (const [name, shape] of expectedTensors(cfg)) {
            if (skip.has(name)) continue;
            if (!ckpt.has(name)) {
                if (name === "lm_head.weight")
                    throw new QloraError(`lm_head.weight is missing and config.json says tie_word_embeddings is false ` +
                        `(set "tie_word_embeddings": true if the output layer shares the embedding)`, {file: dir});
                throw new QloraError(`tensor "${name}" is missing from the checkpoint (config.json describes ` +
                    `${cfg.numHiddenLayers} layers of a ${cfg.modelType} model); is the download complete?`, {file: dir});
            }
            const info = ckpt.info(name);
            if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i]))
                throw new QloraError(`tensor "${name}" has shape [${info.shape.join(", ")}] but config.json implies ` +
                    `[${shape.join(", ")}]; the weights do not belong to this config.json`, {file: fileOf(name)});
            if (!["F32", "F16", "BF16"].includes(info.dtype))
                throw new QloraError(`tensor "${name}" has dtype ${info.dtype}; expected F32, F16 or BF16 ` +
                    `(a quantized checkpoint needs --load-in-4bit support for its format)`, {file: fileOf(name)});
        }
    } catch (err) {
        ckpt.close();
        throw err;
    }
    return ckpt;
}
