// gguf-quants.ts: ggml tensor types, their encoders (native, byte-identical to ggml's reference quantizers), and
// the choice of a type for each tensor of an export: the converter's f16/q8_0 rules and llama-quantize's Q4_K_M
// mix with its shape fallbacks (SPEC-gguf §3, §4).
import {QloraError} from "../errors.js";
import {loadGgufOps} from "../backend/native-gguf-types.js";

/** ggml type ids (gguf-py GGMLQuantizationType) */
export const GgmlType = {
    F32: 0,
    F16: 1,
    Q4_0: 2,
    Q4_1: 3,
    Q5_0: 6,
    Q5_1: 7,
    Q8_0: 8,
    Q2_K: 10,
    Q3_K: 11,
    Q4_K: 12,
    Q5_K: 13,
    Q6_K: 14,
    Q8_K: 15,
    BF16: 30
} as const;
export type GgmlType = (typeof GgmlType)[keyof typeof GgmlType];

interface TypeTraits {
    name: string;
    /** values per block */
    blockSize: number;
    /** bytes per block */
    typeSize: number;
}

/** block size and bytes per block (GGML_QUANT_SIZES) */
export const GGML_TYPE_TRAITS: Readonly<Record<GgmlType, TypeTraits>> = {
    [GgmlType.F32]: {name: "F32", blockSize: 1, typeSize: 4},
    [GgmlType.F16]: {name: "F16", blockSize: 1, typeSize: 2},
    [GgmlType.Q4_0]: {name: "Q4_0", blockSize: 32, typeSize: 18},
    [GgmlType.Q4_1]: {name: "Q4_1", blockSize: 32, typeSize: 20},
    [GgmlType.Q5_0]: {name: "Q5_0", blockSize: 32, typeSize: 22},
    [GgmlType.Q5_1]: {name: "Q5_1", blockSize: 32, typeSize: 24},
    [GgmlType.Q8_0]: {name: "Q8_0", blockSize: 32, typeSize: 34},
    [GgmlType.Q2_K]: {name: "Q2_K", blockSize: 256, typeSize: 84},
    [GgmlType.Q3_K]: {name: "Q3_K", blockSize: 256, typeSize: 110},
    [GgmlType.Q4_K]: {name: "Q4_K", blockSize: 256, typeSize: 144},
    [GgmlType.Q5_K]: {name: "Q5_K", blockSize: 256, typeSize: 176},
    [GgmlType.Q6_K]: {name: "Q6_K", blockSize: 256, typeSize: 210},
    [GgmlType.Q8_K]: {name: "Q8_K", blockSize: 256, typeSize: 292},
    [GgmlType.BF16]: {name: "BF16", blockSize: 1, typeSize: 2}
};

/** the types qlora can encode */
export const ENCODABLE_TYPES: readonly GgmlType[] = [
    GgmlType.F32,
    GgmlType.F16,
    GgmlType.Q8_0,
    GgmlType.Q5_0,
    GgmlType.Q4_K,
    GgmlType.Q6_K
];

export function ggmlTypeName(type: GgmlType): string {
    return GGML_TYPE_TRAITS[type]?.name ?? `type ${type}`;
}

/** bytes of a tensor with ggml dimensions ne (ne[0] = row length); throws if ne[0] is not a whole number of blocks */
export function ggmlTensorBytes(type: GgmlType, ne: readonly number[]): number {
    const traits = GGML_TYPE_TRAITS[type];
    if (!traits) throw new QloraError(`unknown ggml type ${type}`);
    if (ne[0] % traits.blockSize !== 0)
        throw new QloraError(`a row of ${ne[0]} values is not a whole number of ${traits.name} blocks (${traits.blockSize})`);
    const rows = ne.slice(1).reduce((a, b) => a * b, 1);
    return (ne[0] / traits.blockSize) * traits.typeSize * rows;
}

/**
 * Encodes `rows` rows of `rowLength` f32 values (row-major) as a ggml type: F32 (a copy of the bytes), F16, Q8_0,
 * Q5_0, Q4_K, Q6_K, with ggml's reference quantizers.
 */
export function encodeTensor(type: GgmlType, values: Float32Array, rowLength: number, rows: number): Uint8Array {
    if (!ENCODABLE_TYPES.includes(type)) throw new QloraError(`qlora cannot encode ggml type ${ggmlTypeName(type)}`);
    if (values.length !== rowLength * rows)
        throw new Error(`encodeTensor: ${values.length} values, expected ${rows} rows x ${rowLength}`);
    const out = new Uint8Array(ggmlTensorBytes(type, [rowLength, rows]));
    if (type === GgmlType.F32) {
        out.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
        return out;
    }
    loadGgufOps().ggufQuantize(out, values, type, rows, rowLength);
    return out;
}

/** decodes rows of a ggml type back to f32 (ggml's dequantize_row_*) */
export function decodeTensor(type: GgmlType, bytes: Uint8Array, rowLength: number, rows: number): Float32Array {
    if (!ENCODABLE_TYPES.includes(type)) throw new QloraError(`qlora cannot decode ggml type ${ggmlTypeName(type)}`);
    const out = new Float32Array(rowLength * rows);
    if (bytes.length < ggmlTensorBytes(type, [rowLength, rows]))
        throw new Error(`decodeTensor: ${bytes.length} bytes, too few for ${rows} rows x ${rowLength} of ${ggmlTypeName(type)}`);
    loadGgufOps().ggufDequantize(out, bytes, type, rows, rowLength);
    return out;
}

// ------------------------------------------------------------------
// which tensor gets which type

/** the export types of `qlora export gguf` (the converter's --outtype, plus llama-quantize's Q4_K_M) */
export type GgufOuttype = "f32" | "f16" | "q8_0" | "q4_k_m";
export const GGUF_OUTTYPES: readonly GgufOuttype[] = ["f32", "f16", "q8_0", "q4_k_m"];

/** general.file_type (llama_ftype) of each export type */
export const GGUF_FILE_TYPE: Readonly<Record<GgufOuttype, number>> = {f32: 0, f16: 1, q8_0: 7, q4_k_m: 15};

export interface TypePlanContext {
    /** number of transformer blocks (use_more_bits counts layers) */
    blockCount: number;
    /** the file has no output.weight: llama.cpp uses token_embd as the output layer */
    tiedEmbeddings: boolean;
}

/** tensors that every export type keeps in F32: 1-D tensors, biases, norms (converter and llama-quantize agree) */
export function keepsF32(name: string, ne: readonly number[]): boolean {
    return ne.length < 2 || !name.endsWith("weight") || name.includes("_norm.weight");
}

/** llama.cpp's use_more_bits: the layers of attn_v / ffn_down that Q4_K_M gives Q6_K */
export function useMoreBits(layer: number, layers: number): boolean {
    const eighth = Math.trunc(layers / 8);
    return layer < eighth || layer >= Math.trunc((7 * layers) / 8) || (layer - eighth) % 3 === 2;
}

/**
 * llama-quantize's tensor_type_fallback: a 256-block type on rows that are not a multiple of 256 becomes a
 * 32-block type (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), and F16 when 32 does not divide the row either.
 */
export function typeFallback(type: GgmlType, rowLength: number): GgmlType {
    let result: GgmlType = type;
    if (rowLength % GGML_TYPE_TRAITS[type].blockSize !== 0) {
        switch (type) {
            case GgmlType.Q4_K:
                result = GgmlType.Q5_0;
                break;
            case GgmlType.Q5_K:
                result = GgmlType.Q5_1;
                break;
            case GgmlType.Q6_K:
                result = GgmlType.Q8_0;
                break;
            case GgmlType.Q2_K:
            case GgmlType.Q3_K:
                result = GgmlType.Q4_0;
                break;
            default:
                break;
        }
        if (rowLength % GGML_TYPE_TRAITS[result].blockSize !== 0) result = GgmlType.F16;
    }
    return result;
}

/** the layer index of a `blk.N.…` tensor name, or -1 */
function layerOf(name: string): number {
    const m = /^blk\.(\d+)\./.exec(name);
    return m ? Number(m[1]) : -1;
}

/**
 * The ggml type of a tensor in an export of the given type. `ne` is the GGUF shape (ne[0] = row length).
 * f16/q8_0/f32 follow convert_hf_to_gguf's prepare_tensors; q4_k_m follows llama-quantize's
 * llama_tensor_get_type for dense llama/qwen2 models (what `llama-quantize model-f16.gguf Q4_K_M` gives).
 */
export function tensorTypeFor(name: string, ne: readonly number[], outtype: GgufOuttype, ctx: TypePlanContext): GgmlType {
    if (outtype === "f32" || keepsF32(name, ne)) return GgmlType.F32;
    const rowLength = ne[0];
    switch (outtype) {
        case "f16":
            return GgmlType.F16;
        case "q8_0":
            return rowLength % 32 === 0 ? GgmlType.Q8_0 : GgmlType.F16;
        case "q4_k_m": {
            let type: GgmlType = GgmlType.Q4_K;
            if (name === "output.weight" || (ctx.tiedEmbeddings && name === "token_embd.weight")) {
                // the output layer (or the embedding that doubles as it) keeps more precision
                type = rowLength % GGML_TYPE_TRAITS[GgmlType.Q4_K].blockSize !== 0 ? GgmlType.Q8_0 : GgmlType.Q6_K;
            } else if (name.endsWith("attn_v.weight") || name.endsWith("attn_qkv.weight") || name.endsWith("ffn_down.weight")) {
                // a fused q/k/v (phi3) counts as attn_v (llama-quant.cpp's category_is_attn_v)
                if (useMoreBits(layerOf(name), ctx.blockCount)) type = GgmlType.Q6_K;
            }
            return typeFallback(type, rowLength);
        }
    }
}
