// models.ts: the model architectures the GPU benchmarks use, written once with random weights by the project's own
// code (the peers, peer_lora.py and peer_generate.py, read the same folder).
import {existsSync} from "node:fs";
import path from "node:path";
import {performance} from "node:perf_hooks";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";

export const CONFIGS: Record<string, Record<string, unknown>> = {
    "qwen2-0.5b": {
        vocab_size: 151936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        tie_word_embeddings: true
    },
    "qwen2-7b": {
        vocab_size: 152064,
        hidden_size: 3584,
        intermediate_size: 18944,
        num_hidden_layers: 28,
        num_attention_heads: 28,
        num_key_value_heads: 4,
        tie_word_embeddings: false
    }
};

/** the folder of `name` under `dir`, a bf16 checkpoint with random weights, written on first use */
export async function syntheticModel(dir: string, name: string): Promise<string> {
    const modelDir = path.join(dir, name);
    if (existsSync(path.join(modelDir, "config.json"))) return modelDir;
    if (!CONFIGS[name]) throw new Error(`unknown model ${name}; known: ${Object.keys(CONFIGS).join(", ")}`);
    const t0 = performance.now();
    await writeSyntheticCheckpoint(modelDir, {
        config: {
            architectures: ["Qwen2ForCausalLM"],
            model_type: "qwen2",
            ...CONFIGS[name],
            max_position_embeddings: 32768,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            hidden_act: "silu",
            torch_dtype: "bfloat16",
            use_cache: true
        },
        dtype: "BF16",
        seed: 0,
        std: 0.02,
        fast: true
    });
    console.log(`wrote ${modelDir} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    return modelDir;
}
