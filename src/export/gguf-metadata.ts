// gguf-metadata.ts: how a Hugging Face llama/qwen2/qwen3/phi3 decoder maps onto llama.cpp's GGUF model: architecture,
// tensor names, the q/k row permutation of llama, hyper-parameter metadata, the llama3 rope factors and phi3's
// longrope factor tensors (SPEC-gguf §5, §6; convert_hf_to_gguf's LlamaModel / Qwen2Model / Qwen3Model /
// Phi3MiniModel). Model knowledge, so it sits in export/ and
// io/ keeps only the GGUF format.
import {QloraError} from "../errors.js";
import type {ModelConfig} from "../io/hf-config.js";
import type {GgufMetadata} from "../io/gguf.js";
import type {ProjName} from "../model/weights.js";

/** the llama.cpp architectures qlora exports */
export type GgufArch = "qwen2" | "qwen3" | "phi3" | "llama";

const CAUSAL_LM_CLASSES = new Set([
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM"
]);

/**
 * The llama.cpp architecture of a model: qwen2 for Qwen2/2.5, qwen3 for Qwen3, phi3 for Phi-3 and Phi-4-mini,
 * llama for Llama and Mistral (as the converter does). Anything else is a QloraError naming config.json.
 */
export function ggufArchFor(cfg: ModelConfig): GgufArch {
    const unsupported = cfg.architectures.find((a) => !CAUSAL_LM_CLASSES.has(a));
    if (unsupported)
        throw new QloraError(
            `architecture ${unsupported} cannot be exported to GGUF (supported: ` + `${[...CAUSAL_LM_CLASSES].join(", ")})`,
            {file: cfg.file}
        );
    switch (cfg.modelType) {
        case "qwen2":
            return "qwen2";
        case "qwen3":
            // llama.cpp's qwen3 graph has no attention biases
            if (cfg.attentionBias)
                throw new QloraError(
                    `"attention_bias" is true: llama.cpp's qwen3 architecture has no attention biases, so this model cannot be exported to GGUF`,
                    {file: cfg.file}
                );
            return "qwen3";
        case "phi3":
            return "phi3";
        case "llama":
        case "mistral":
            return "llama";
        default:
            throw new QloraError(
                `model_type "${String(cfg.modelType)}" cannot be exported to GGUF (supported: qwen2, qwen3, llama, mistral, phi3)`,
                {file: cfg.file}
            );
    }
}

/**
 * The GGUF block tensor of each Hugging Face projection (tensor_mapping.py). llama.cpp's phi3 keeps the fused
 * modules fused: qkv_proj is attn_qkv, and gate_up_proj is ffn_up with 2 x intermediate_size rows (gate first),
 * which its graph splits in half.
 */
export const GGUF_PROJ_NAMES = {
    q_proj: "attn_q",
    k_proj: "attn_k",
    v_proj: "attn_v",
    qkv_proj: "attn_qkv",
    o_proj: "attn_output",
    gate_proj: "ffn_gate",
    up_proj: "ffn_up",
    gate_up_proj: "ffn_up",
    down_proj: "ffn_down"
} as const satisfies Record<ProjName, string>;

/** `blk.N.attn_q.weight` for a module name such as model.layers.N.self_attn.q_proj (suffix ".weight" or ".bias") */
export function ggufNameOfModule(module: string, suffix = "weight"): string | null {
    const m = /^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$/.exec(module);
    if (!m || !(m[2] in GGUF_PROJ_NAMES)) return null;
    return `blk.${m[1]}.${GGUF_PROJ_NAMES[m[2] as keyof typeof GGUF_PROJ_NAMES]}.${suffix}`;
}

/** qwen3's per-head norms: blk.N.attn_q_norm.weight / attn_k_norm.weight (Qwen3Model's tensor map) */
export function ggufQkNormNames(layer: number): {q: string; k: string} {
    return {q: `blk.${layer}.attn_q_norm.weight`, k: `blk.${layer}.attn_k_norm.weight`};
}

/** llama's q_proj/k_proj rows need the NORM-RoPE permutation (qwen2 uses NEOX RoPE: names only) */
export function permutesQk(arch: GgufArch): boolean {
    return arch === "llama";
}

/**
 * LlamaModel.permute: within each head of `headDim` rows, new row 2i + j = old row j·headDim/2 + i (j ∈ {0,1}),
 * turning Hugging Face's half-split RoPE layout into llama.cpp's interleaved pairs. `x` is [nHead·headDim, cols].
 */
export function permuteQkRows(x: Float32Array, nHead: number, cols: number): Float32Array {
    const rows = x.length / cols;
    if (!Number.isInteger(rows) || rows % nHead !== 0 || (rows / nHead) % 2 !== 0)
        throw new Error(`permuteQkRows: ${x.length} values do not split into ${nHead} heads of an even size`);
    const headDim = rows / nHead,
        half = headDim / 2;
    const out = new Float32Array(x.length);
    for (let h = 0; h < nHead; h++)
        for (let i = 0; i < half; i++)
            for (let j = 0; j < 2; j++) {
                const src = (h * headDim + j * half + i) * cols;
                out.set(x.subarray(src, src + cols), (h * headDim + 2 * i + j) * cols);
            }
    return out;
}

/** heads of the permutation for a projection (q: attention heads, k: key/value heads), or 0 for none */
export function permutationHeads(arch: GgufArch, cfg: ModelConfig, proj: string): number {
    if (!permutesQk(arch)) return 0;
    if (proj === "q_proj") return cfg.numAttentionHeads;
    if (proj === "k_proj") return cfg.numKeyValueHeads;
    return 0;
}

/**
 * the llama.cpp architectures whose graph applies {arch}.attention.sliding_window: convert_hf_to_gguf.py writes the
 * key for them (Phi3MiniModel: the window, 0 for none) and for no other of ours (LlamaModel, which Mistral
 * converts to, and Qwen2Model/Qwen3Model write none, and llama.cpp's llama, qwen2 and qwen3 attend to every
 * position)
 */
const SLIDING_WINDOW_ARCHS: ReadonlySet<GgufArch> = new Set(["phi3"]);

/** what a GGUF of this model cannot carry: a sliding window its llama.cpp architecture ignores (null: nothing) */
export function ggufWindowNote(cfg: ModelConfig, arch: GgufArch): string | null {
    if (cfg.slidingWindow === null || SLIDING_WINDOW_ARCHS.has(arch)) return null;
    return (
        `llama.cpp's ${arch} architecture has no sliding window (convert_hf_to_gguf.py writes none for it either): ` +
        `past ${cfg.slidingWindow} tokens (sliding_window in config.json) its output differs from the model's`
    );
}

/** writes {arch}.* hyper-parameters (SPEC-gguf §6): counts as UINT32, floats as FLOAT32 */
export function addArchMetadata(md: GgufMetadata, cfg: ModelConfig, arch: GgufArch): void {
    const a = arch;
    md.u32(`${a}.context_length`, cfg.maxPositionEmbeddings);
    md.u32(`${a}.embedding_length`, cfg.hiddenSize);
    md.u32(`${a}.block_count`, cfg.numHiddenLayers);
    md.u32(`${a}.feed_forward_length`, cfg.intermediateSize);
    md.u32(`${a}.attention.head_count`, cfg.numAttentionHeads);
    md.u32(`${a}.attention.head_count_kv`, cfg.numKeyValueHeads);
    md.f32(`${a}.rope.freq_base`, cfg.ropeTheta);
    md.f32(`${a}.attention.layer_norm_rms_epsilon`, cfg.rmsNormEps);
    if (arch === "phi3") {
        addPhi3Metadata(md, cfg);
        return;
    }
    const explicitHeadDim = cfg.raw.head_dim !== undefined && cfg.raw.head_dim !== null;
    if (explicitHeadDim || cfg.headDim * cfg.numAttentionHeads !== cfg.hiddenSize) {
        md.u32(`${a}.attention.key_length`, cfg.headDim);
        md.u32(`${a}.attention.value_length`, cfg.headDim);
    }
    if (arch === "llama") {
        md.u32(`${a}.vocab_size`, cfg.vocabSize);
        md.u32(`${a}.rope.dimension_count`, cfg.rotaryDim);
    } else if (cfg.rotaryDim !== cfg.headDim || explicitHeadDim) {
        md.u32(`${a}.rope.dimension_count`, cfg.rotaryDim);
    }
    const scaling = cfg.ropeScaling;
    if (!scaling) return;
    switch (scaling.type) {
        case "linear":
            md.string(`${a}.rope.scaling.type`, "linear");
            md.f32(`${a}.rope.scaling.factor`, scaling.factor!);
            break;
        case "yarn":
            md.string(`${a}.rope.scaling.type`, "yarn");
            md.f32(`${a}.rope.scaling.factor`, scaling.factor!);
            md.u32(
                `${a}.rope.scaling.original_context_length`,
                scaling.originalMaxPositionEmbeddings ?? cfg.maxPositionEmbeddings
            );
            if (scaling.attentionFactor !== undefined) md.f32(`${a}.rope.scaling.yarn_attn_factor`, scaling.attentionFactor);
            if (scaling.betaFast !== undefined) md.f32(`${a}.rope.scaling.yarn_beta_fast`, scaling.betaFast);
            if (scaling.betaSlow !== undefined) md.f32(`${a}.rope.scaling.yarn_beta_slow`, scaling.betaSlow);
            break;
        case "llama3":
            // carried by the rope_freqs.weight tensor (llama3RopeFactors)
            if (arch !== "llama")
                throw new QloraError(`rope_scaling type "llama3" on a ${cfg.modelType} model cannot be exported to GGUF`, {
                    file: cfg.file
                });
            break;
        case "dynamic":
            // the converter writes nothing: dynamic NTK changes nothing within the trained context
            break;
        default:
            throw new QloraError(
                `rope_scaling type "${scaling.type}" is not supported by llama.cpp's ${arch} ` +
                    "architecture, so the model cannot be exported to GGUF",
                {file: cfg.file}
            );
    }
}

/**
 * Phi3MiniModel.set_gguf_parameters: the pretrained context, the rotary dimensions, the sliding window (0: none),
 * and for longrope the attention factor (its factor tensors: phi3RopeFactors)
 */
function addPhi3Metadata(md: GgufMetadata, cfg: ModelConfig): void {
    const original = phi3OriginalContext(cfg);
    md.u32("phi3.rope.scaling.original_context_length", original);
    md.u32("phi3.rope.dimension_count", cfg.rotaryDim);
    md.u32("phi3.attention.sliding_window", cfg.slidingWindow ?? 0);
    const scaling = cfg.ropeScaling;
    if (!scaling) return;
    if (scaling.type !== "longrope")
        throw new QloraError(
            `rope_scaling type "${scaling.type}" on a phi3 model cannot be exported to GGUF (llama.cpp's phi3 reads longrope only)`,
            {file: cfg.file}
        );
    // the converter's attention factor: from the context ratio, whatever attention_factor says
    const scale = cfg.maxPositionEmbeddings / original;
    md.f32("phi3.rope.scaling.attn_factor", scale > 1 ? Math.sqrt(1 + Math.log(scale) / Math.log(original)) : 1);
}

/**
 * llama.cpp gives a model whose general.name contains "phi-3" or "phi3" Phi-3's SentencePiece token attributes,
 * looking up </s>, <unk>, <s> and <|endoftext|> by text: without them the GGUF fails to load ("_Map_base::at").
 * The problem as a sentence, or null.
 */
export function phi3NameProblem(name: string, tokens: readonly string[]): string | null {
    if (!/phi-?3/i.test(name)) return null;
    const have = new Set(tokens);
    const missing = ["</s>", "<unk>", "<s>", "<|endoftext|>"].filter((t) => !have.has(t));
    if (missing.length === 0) return null;
    return (
        `general.name "${name}" makes llama.cpp treat the vocabulary as Phi-3's and look up ${missing.join(", ")}, ` +
        "which this tokenizer lacks (the file would not load); give another name with --name"
    );
}

/** original_max_position_embeddings of a phi3 config (top level in transformers 4, rope_parameters in 5) */
function phi3OriginalContext(cfg: ModelConfig): number {
    const top = cfg.raw.original_max_position_embeddings;
    if (typeof top === "number" && Number.isSafeInteger(top) && top > 0) return top;
    return cfg.ropeScaling?.originalMaxPositionEmbeddings ?? cfg.maxPositionEmbeddings;
}

/** phi3 longrope: rope_factors_long.weight and rope_factors_short.weight [rotaryDim/2] as the converter writes them */
export function phi3RopeFactors(cfg: ModelConfig): {long: Float32Array; short: Float32Array} | null {
    const s = cfg.ropeScaling;
    if (s?.type !== "longrope") return null;
    return {long: Float32Array.from(s.raw.long_factor as number[]), short: Float32Array.from(s.raw.short_factor as number[])};
}

/** llama3 rope scaling: the per-frequency divisors llama.cpp reads from rope_freqs.weight [rotaryDim/2], else null */
export function llama3RopeFactors(cfg: ModelConfig): Float32Array | null {
    const s = cfg.ropeScaling;
    if (s?.type !== "llama3") return null;
    const dim = cfg.headDim;
    const factor = s.factor ?? 8,
        low = s.lowFreqFactor ?? 1,
        high = s.highFreqFactor ?? 4;
    const oldContext = s.originalMaxPositionEmbeddings ?? 8192;
    const lowWavelen = oldContext / low,
        highWavelen = oldContext / high;
    const out = new Float32Array(dim / 2);
    for (let k = 0; k < out.length; k++) {
        const freq = Math.fround(1 / Math.fround(cfg.ropeTheta ** Math.fround((2 * k) / dim)));
        const wavelen = (2 * Math.PI) / freq;
        if (wavelen < highWavelen) out[k] = 1;
        else if (wavelen > lowWavelen) out[k] = factor;
        else {
            const smooth = (oldContext / wavelen - low) / (high - low);
            out[k] = 1 / ((1 - smooth) / factor + smooth);
        }
    }
    return out;
}
