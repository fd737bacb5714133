// gguf-reference.ts: a qlora model whose weights went through the same GGUF encoding as an export (encode, then
// decode), the reference a quantized GGUF should match in llama.cpp up to llama.cpp's own activation rounding.
// Rows are encoded independently, so llama's q/k row permutation commutes with the round trip and is left out.
import {DenseLinear} from "../../src/backend/linear.js";
import {decodeTensor, encodeTensor, tensorTypeFor, type GgufOuttype} from "../../src/io/gguf-quants.js";
import {GGUF_PROJ_NAMES} from "../../src/export/gguf-metadata.js";
import {DecoderModel, type DecoderLayer} from "../../src/model/decoder.js";
import {projNames, type ProjName} from "../../src/model/weights.js";

export function roundTripModel(model: DecoderModel, outtype: GgufOuttype): DecoderModel {
    const cfg = model.config;
    const ctx = {blockCount: cfg.numHiddenLayers, tiedEmbeddings: cfg.tieWordEmbeddings};
    const roundTrip = (name: string, w: Float32Array, rows: number, cols: number) => {
        const type = tensorTypeFor(name, [cols, rows], outtype, ctx);
        return decodeTensor(type, encodeTensor(type, w, cols, rows), cols, rows);
    };
    const p = model.params;
    const embed = roundTrip("token_embd.weight", p.embed, cfg.vocabSize, cfg.hiddenSize);
    const lmHead = cfg.tieWordEmbeddings ? embed : roundTrip("output.weight", p.lmHead, cfg.vocabSize, cfg.hiddenSize);
    // norms stay f32 in every outtype: only the projections change
    const layers: DecoderLayer[] = p.layers.map((layer, l) => ({
        ...layer,
        proj: Object.fromEntries(
            projNames(cfg).map((proj) => {
                const base = layer.proj[proj] as DenseLinear;
                const {outFeatures, inFeatures} = base;
                const weight = roundTrip(`blk.${l}.${GGUF_PROJ_NAMES[proj]}.weight`, base.dense.weight, outFeatures, inFeatures);
                return [proj, new DenseLinear({outFeatures, inFeatures, weight, bias: base.bias})];
            })
        ) as unknown as Record<ProjName, DenseLinear>
    }));
    return new DecoderModel(cfg, {embed, layers, norm: p.norm, lmHead});
}
