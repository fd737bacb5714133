// gguf-metadata.ts: how a Hugging Face llama/qwen2/qwen3/phi3/gemma3_text decoder maps onto llama.cpp's GGUF model:
// architecture, tensor names, the q/k row permutation of llama, hyper-parameter metadata, the llama3 rope factors,
// phi3's longrope factor tensors and gemma3's layer pattern and norms (SPEC-gguf §5, §6; convert_hf_to_gguf's
// LlamaModel / Qwen2Model / Qwen3Model / Phi3MiniModel / Gemma3Model, and what llama.cpp's graphs read). Model
// knowledge, so it sits in export/ and io/ keeps only the GGUF format.
import {f32ToHalf, halfToF32} from "../backend/cpu.js";
import {QloraError} from "../errors.js";
import type {ModelConfig} from "../io/hf-config.js";
import type {GgufMetadata} from "../io/gguf.js";
import type {ProjName} from "../model/weights.js";

/** the llama.cpp architectures qlora exports */
export type GgufArch = "qwen2" | "qwen3" | "phi3" | "llama" | "gemma3";

const CAUSAL_LM_CLASSES = new Set([
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Gemma3ForCausalLM"
]);

/**
 * The llama.cpp architecture of a model: qwen2 for Qwen2/2.5, qwen3 for Qwen3, phi3 for Phi-3 and Phi-4-mini,
 * llama for Llama and Mistral (as the converter does), gemma3 for Gemma 3 text. Anything else, or a gemma3 model that
 * llama.cpp's graph cannot reproduce (checkGemma3), is a QloraError naming config.json.
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
        case "gemma3_text":
            checkGemma3(cfg);
            return "gemma3";
        default:
            throw new QloraError(
                `model_type "${String(cfg.modelType)}" cannot be exported to GGUF (supported: qwen2, qwen3, llama, mistral, phi3, gemma3_text)`,
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

/** qwen3's and gemma3's per-head norms: blk.N.attn_q_norm.weight / attn_k_norm.weight (tensor_mapping.py) */
export function ggufQkNormNames(layer: number): {q: string; k: string} {
    return {q: `blk.${layer}.attn_q_norm.weight`, k: `blk.${layer}.attn_k_norm.weight`};
}

/**
 * gemma3's norms of the attention's output (HF post_attention_layernorm) and of the MLP's (post_feedforward_layernorm):
 * blk.N.post_attention_norm.weight / post_ffw_norm.weight; its pre_feedforward_layernorm is ffn_norm as llama's
 * post_attention_layernorm is
 */
export function ggufSandwichNormNames(layer: number): {attnOut: string; mlpOut: string} {
    return {attnOut: `blk.${layer}.post_attention_norm.weight`, mlpOut: `blk.${layer}.post_ffw_norm.weight`};
}

/** llama's q_proj/k_proj rows need the NORM-RoPE permutation (qwen2, qwen3, phi3 and gemma3 use NEOX RoPE: names only) */
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
 * key for them (Phi3MiniModel: the window, 0 for none; Gemma3Model: the window of the sliding layers, whose period
 * gemma3SwaPattern writes beside it) and for no other of ours (LlamaModel, which Mistral
 * converts to, and Qwen2Model/Qwen3Model write none, and llama.cpp's llama, qwen2 and qwen3 attend to every
 * position)
 */
const SLIDING_WINDOW_ARCHS: ReadonlySet<GgufArch> = new Set(["phi3", "gemma3"]);

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
    if (arch === "gemma3") {
        addGemma3Metadata(md, cfg);
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
 * What llama.cpp's gemma3 graph (src/models/gemma3.cpp) cannot reproduce, refused naming the key: biases (it has
 * none), a layer pattern that no single period gives (gemma3SwaPattern), RoPE scaling on the sliding layers (it
 * runs them at scale 1) and global scalings other than linear (YaRN's attention factor would reach the sliding
 * layers too). query_pre_attn_scalar needs no refusal: gemma3QueryNormScale folds it into attn_q_norm.
 */
function checkGemma3(cfg: ModelConfig): void {
    const refuse = (what: string) =>
        new QloraError(`${what}, so this gemma3_text model cannot be exported to GGUF`, {file: cfg.file});
    if (cfg.attentionBias || cfg.attentionOutputBias || cfg.mlpBias)
        throw refuse(
            `it has ${cfg.mlpBias ? "MLP" : "attention"} biases (config.json), which llama.cpp's gemma3 architecture lacks`
        );
    gemma3SwaPattern(cfg);
    const local = cfg.localRope?.scaling;
    if (local)
        throw refuse(
            `its sliding layers' RoPE has "${local.type}" scaling (rope_parameters.sliding_attention), and llama.cpp's gemma3 runs them unscaled`
        );
    const scaling = cfg.ropeScaling;
    if (scaling && scaling.type !== "linear" && scaling.type !== "dynamic")
        throw refuse(
            `its rope scaling is "${scaling.type}"; llama.cpp's gemma3 takes linear scaling of the full-attention layers only`
        );
}

/**
 * The period llama.cpp's gemma3 reads from {arch}.attention.sliding_window_pattern (a u32; default 6): layer i slides
 * unless i % p == p - 1 (llama_hparams::set_swa_pattern), as transformers' sliding_window_pattern does. null when no
 * layer slides (then no window is written and every layer attends to all positions on the global RoPE). layer_types
 * that no period gives cannot be expressed (an array value is ignored by this llama.cpp's gemma3): a QloraError.
 */
export function gemma3SwaPattern(cfg: ModelConfig): number | null {
    const sliding = cfg.layerTypes.map((t) => t === "sliding_attention");
    if (!sliding.includes(true)) return null;
    const gives = (p: number) => sliding.every((s, i) => s === i % p < p - 1);
    // Gemma 3's own period first, so released models get the value llama.cpp assumes
    for (const p of [6, ...Array.from({length: sliding.length}, (_, i) => i + 2)]) if (gives(p)) return p;
    throw new QloraError(
        `layer_types [${cfg.layerTypes.join(", ")}] is no periodic pattern (every p-th layer full): llama.cpp's gemma3 ` +
            "derives the sliding layers from one period (sliding_window_pattern), so this model cannot be exported to GGUF",
        {file: cfg.file}
    );
}

/**
 * llama.cpp's gemma3 scales q by 1/sqrt(head_dim) (1/sqrt(hidden_size / heads) for a 62-layer model, Gemma 3 27B),
 * transformers by query_pre_attn_scalar^-0.5: the ratio of the two, which the export multiplies into attn_q_norm
 * (q's RMSNorm weight, RoPE and the score scale are linear in it), or 1 where they agree (the released models)
 */
export function gemma3QueryNormScale(cfg: ModelConfig): number {
    const denominator = cfg.numHiddenLayers === 62 ? Math.floor(cfg.hiddenSize / cfg.numAttentionHeads) : cfg.headDim;
    const ratio = cfg.attentionScale * Math.sqrt(denominator);
    return Math.abs(ratio - 1) < 1e-6 ? 1 : ratio;
}

/**
 * gemma3: llama.cpp multiplies the embeddings by sqrt(hidden_size) in f32, transformers (and qlora on the GPU) by its
 * bf16 rounding when the activations are bf16 (Gemma3TextScaledWordEmbedding casts the scale to the weights' dtype):
 * a sentence where the two differ (Gemma 3 1B: 33.94 against 34), else null
 */
export function gemma3EmbedScaleNote(cfg: ModelConfig): string | null {
    const exact = Math.fround(Math.sqrt(cfg.hiddenSize));
    const bf16 = halfToF32(f32ToHalf(Float32Array.of(exact), "BF16"), "BF16")[0];
    if (bf16 === exact) return null;
    return (
        `llama.cpp scales the embeddings by sqrt(${cfg.hiddenSize}) = ${exact.toFixed(3)}, where transformers and ` +
        `qlora running in bf16 use its bf16 rounding ${bf16} (fp32 runs use ${exact.toFixed(3)} as llama.cpp does)`
    );
}

/**
 * Gemma3Model.set_gguf_parameters: head_dim as key/value length, the soft cap, for sliding layers the window and
 * their RoPE base (rope.freq_base is the full layers'), linear scaling of the full layers as rope.scaling (llama.cpp
 * applies it to those only); and the layer period, which the converter leaves at llama.cpp's default of 6
 */
function addGemma3Metadata(md: GgufMetadata, cfg: ModelConfig): void {
    md.u32("gemma3.attention.key_length", cfg.headDim);
    md.u32("gemma3.attention.value_length", cfg.headDim);
    if (cfg.finalLogitSoftcap !== null) md.f32("gemma3.final_logit_softcapping", cfg.finalLogitSoftcap);
    const pattern = gemma3SwaPattern(cfg);
    if (pattern !== null) {
        md.u32("gemma3.attention.sliding_window", cfg.slidingWindow!);
        md.u32("gemma3.attention.sliding_window_pattern", pattern);
        md.f32("gemma3.rope.freq_base_swa", cfg.localRope?.theta ?? 10_000);
    }
    if (cfg.ropeScaling?.type === "linear") {
        md.string("gemma3.rope.scaling.type", "linear");
        md.f32("gemma3.rope.scaling.factor", cfg.ropeScaling.factor!);
    }
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
