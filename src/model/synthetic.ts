// synthetic.ts: writes Hugging Face checkpoints with random weights for any architecture size (tests of
// configurations the embedded model does not have, and benchmarks of 0.5B / 7B shapes without a download).
import path from "node:path";
import {Rng} from "../backend/rng.js";
import {f32ToHalf} from "../backend/cpu.js";
import {writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {parseModelConfig, type ModelConfig} from "../io/hf-config.js";
import {writeShardedSafetensors, type TensorToWrite} from "../io/safetensors.js";
import {expectedTensors} from "./weights.js";

export interface SyntheticOptions {
    /** config.json contents (Hugging Face keys) */
    config: Record<string, unknown>;
    dtype?: "F32" | "BF16" | "F16";
    seed?: number;
    /** standard deviation of the projection and embedding weights */
    std?: number;
    maxShardBytes?: number;
    /** uniform instead of normal values of the same std (much faster for multi-billion-parameter benchmarks) */
    fast?: boolean;
}

/**
 * writes config.json + safetensors with N(0, std) weights, norms around 1 (gemma3's stored w - 1 around 0) and
 * small biases; returns the config
 */
export async function writeSyntheticCheckpoint(dir: string, opts: SyntheticOptions): Promise<ModelConfig> {
    const cfg = parseModelConfig(opts.config, path.join(dir, "config.json"));
    const rng = new Rng(opts.seed ?? 0);
    const std = opts.std ?? 0.02;
    const dtype = opts.dtype ?? "BF16";
    const normBase = cfg.rmsNormUnitOffset ? 0 : 1;
    const tensors: TensorToWrite[] = [];
    for (const [name, shape] of expectedTensors(cfg)) {
        const n = shape.reduce((a, b) => a * b, 1);
        const values = new Float32Array(n);
        const isNorm = name.endsWith("norm.weight");
        const isBias = name.endsWith(".bias");
        if (opts.fast) {
            // uniform on [-sqrt(3), sqrt(3)] (unit variance) from a xorshift32 seeded by the Rng
            let s = rng.nextU32() | 1;
            const scale = ((isNorm ? 0.1 : isBias ? 0.1 : std) * Math.sqrt(3)) / 2147483648;
            const base = isNorm ? normBase : 0;
            for (let i = 0; i < n; i++) {
                s ^= s << 13;
                s ^= s >>> 17;
                s ^= s << 5;
                values[i] = base + (s | 0) * scale;
            }
        } else {
            for (let i = 0; i < n; i++) {
                const z = rng.normal();
                values[i] = isNorm ? normBase + 0.1 * z : isBias ? 0.1 * z : std * z;
            }
        }
        tensors.push({name, dtype, shape, data: dtype === "F32" ? values : f32ToHalf(values, dtype)});
    }
    // a fresh folder swapped into place (an existing `dir` must be empty or an earlier synthetic checkpoint)
    await writeDirAtomic(
        dir,
        async (tmp) => {
            await writeShardedSafetensors(tmp, "model", tensors, opts.maxShardBytes ?? 4 * 2 ** 30, {format: "pt"});
            await writeFileAtomic(path.join(tmp, "config.json"), JSON.stringify(opts.config, null, 2) + "\n");
        },
        {replace: "owned", kind: "synthetic-model"}
    );
    return cfg;
}
