// inspect.ts: a description of a model folder, read from its headers only (no weights are loaded).
import path from "node:path";
import {loadModelConfig, type ModelConfig} from "../io/hf-config.js";
import {SafetensorsCheckpoint} from "../io/safetensors.js";
import {expectedTensors} from "../model/weights.js";
import {HfTokenizer} from "../tokenizer/index.js";

export interface ModelDescription {
    dir: string;
    config: ModelConfig;
    parameters: number;
    /** number of parameters stored in each dtype */
    dtypes: Record<string, number>;
    files: string[];
    bytes: number;
    /** tensors of the checkpoint that config.json does not describe (the model ignores them when it loads) */
    unusedTensors: string[];
    tokenizer: {
        vocabSize: number;
        eosTokenId: number | null;
        padTokenId: number | null;
        bosTokenId: number | null;
        specialTokens: {content: string; id: number}[];
        hasChatTemplate: boolean;
    };
}

export async function inspectModel(dir: string): Promise<ModelDescription> {
    const config = await loadModelConfig(dir);
    const expected = expectedTensors(config);
    const ckpt = await SafetensorsCheckpoint.open(dir);
    const dtypes: Record<string, number> = {};
    let parameters = 0,
        bytes = 0;
    const files = new Set<string>();
    const unusedTensors: string[] = [];
    try {
        for (const name of ckpt.names()) {
            // a pre-quantized weight's quant state sits beside it as "<weight>.absmax" and the like
            const weightEnd = name.indexOf(".weight.");
            const quantState = weightEnd >= 0 && expected.has(name.slice(0, weightEnd + ".weight".length));
            if (!expected.has(name) && !quantState) unusedTensors.push(name);
            const info = ckpt.info(name);
            const numel = info.shape.reduce((a, b) => a * b, 1);
            parameters += numel;
            bytes += info.byteLength;
            dtypes[info.dtype] = (dtypes[info.dtype] ?? 0) + numel;
            files.add(path.basename(ckpt.fileFor(name).path));
        }
    } finally {
        await ckpt.close();
    }
    const tok = await HfTokenizer.load(dir);
    return {
        dir,
        config,
        parameters,
        dtypes,
        files: [...files],
        bytes,
        unusedTensors,
        tokenizer: {
            vocabSize: tok.vocabSize,
            eosTokenId: tok.eosTokenId,
            padTokenId: tok.padTokenId,
            bosTokenId: tok.bosTokenId,
            specialTokens: tok.specialTokens.map((t) => ({content: t.content, id: t.id})),
            hasChatTemplate: tok.hasChatTemplate
        }
    };
}
