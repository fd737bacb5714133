// plan-architectures.ts: the config.json of well-known model sizes, so `qlora plan --model qwen2-7b` answers before
// anything is downloaded; bench/ writes random-weight checkpoints of the same architectures.
import {QloraError} from "../errors.js";
import {parseModelConfig, type ModelConfig} from "../io/hf-config.js";

const QWEN2 = {
    architectures: ["Qwen2ForCausalLM"],
    model_type: "qwen2",
    max_position_embeddings: 32768,
    rope_theta: 1e6,
    rms_norm_eps: 1e-6,
    hidden_act: "silu",
    torch_dtype: "bfloat16",
    use_cache: true
};
const LLAMA3 = {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    vocab_size: 128256,
    max_position_embeddings: 8192,
    rope_theta: 500000,
    rms_norm_eps: 1e-5,
    hidden_act: "silu",
    torch_dtype: "bfloat16",
    tie_word_embeddings: false
};

/** config.json of each architecture, by the name `--model` takes */
export const KNOWN_ARCHITECTURES: Record<string, Record<string, unknown>> = {
    "qwen2-0.5b": {
        ...QWEN2,
        vocab_size: 151936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        tie_word_embeddings: true
    },
    "qwen2-1.5b": {
        ...QWEN2,
        vocab_size: 151936,
        hidden_size: 1536,
        intermediate_size: 8960,
        num_hidden_layers: 28,
        num_attention_heads: 12,
        num_key_value_heads: 2,
        tie_word_embeddings: true
    },
    "qwen2-7b": {
        ...QWEN2,
        vocab_size: 152064,
        hidden_size: 3584,
        intermediate_size: 18944,
        num_hidden_layers: 28,
        num_attention_heads: 28,
        num_key_value_heads: 4,
        tie_word_embeddings: false
    },
    "qwen2.5-14b": {
        ...QWEN2,
        vocab_size: 152064,
        hidden_size: 5120,
        intermediate_size: 13824,
        num_hidden_layers: 48,
        num_attention_heads: 40,
        num_key_value_heads: 8,
        tie_word_embeddings: false
    },
    "qwen2-72b": {
        ...QWEN2,
        vocab_size: 152064,
        hidden_size: 8192,
        intermediate_size: 29568,
        num_hidden_layers: 80,
        num_attention_heads: 64,
        num_key_value_heads: 8,
        tie_word_embeddings: false
    },
    "llama-3-8b": {
        ...LLAMA3,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 8
    },
    "llama-3-70b": {
        ...LLAMA3,
        hidden_size: 8192,
        intermediate_size: 28672,
        num_hidden_layers: 80,
        num_attention_heads: 64,
        num_key_value_heads: 8
    },
    "mistral-7b": {
        architectures: ["MistralForCausalLM"],
        model_type: "mistral",
        vocab_size: 32768,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        max_position_embeddings: 32768,
        rope_theta: 1e6,
        rms_norm_eps: 1e-5,
        hidden_act: "silu",
        torch_dtype: "bfloat16",
        sliding_window: null,
        tie_word_embeddings: false
    },
    "qwen3-8b": {
        architectures: ["Qwen3ForCausalLM"],
        model_type: "qwen3",
        vocab_size: 151936,
        hidden_size: 4096,
        intermediate_size: 12288,
        num_hidden_layers: 36,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 128,
        max_position_embeddings: 40960,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        hidden_act: "silu",
        torch_dtype: "bfloat16",
        attention_bias: false,
        tie_word_embeddings: false
    },
    // Phi-4-mini-instruct's sizes; its LongRoPE factors are left out (they change no size, only the positions)
    "phi-4-mini": {
        architectures: ["Phi3ForCausalLM"],
        model_type: "phi3",
        vocab_size: 200064,
        hidden_size: 3072,
        intermediate_size: 8192,
        num_hidden_layers: 32,
        num_attention_heads: 24,
        num_key_value_heads: 8,
        partial_rotary_factor: 0.75,
        max_position_embeddings: 4096,
        rope_theta: 10000,
        rms_norm_eps: 1e-5,
        hidden_act: "silu",
        torch_dtype: "bfloat16",
        sliding_window: null,
        tie_word_embeddings: true
    }
};

/** the parsed config of a known architecture name (case-insensitive), or null */
export function knownArchitecture(name: string): ModelConfig | null {
    const key = name.toLowerCase();
    const json = Object.hasOwn(KNOWN_ARCHITECTURES, key) ? KNOWN_ARCHITECTURES[key] : undefined;
    return json ? parseModelConfig(json, `${key} (built-in architecture)`) : null;
}

/** the same, or a one-line error listing the names */
export function requireArchitecture(name: string): ModelConfig {
    const cfg = knownArchitecture(name);
    if (!cfg)
        throw new QloraError(
            `unknown architecture "${name}"; known: ${Object.keys(KNOWN_ARCHITECTURES).join(", ")} (or pass a model folder)`
        );
    return cfg;
}
