// models.ts: the model architectures the GPU benchmarks use (src/api/plan-architectures.ts, the table `qlora plan`
// knows), written once with random weights by the project's own code (the peers, peer_lora.py and
// peer_generate.py, read the same folder).
import {existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync} from "node:fs";
import path from "node:path";
import {performance} from "node:perf_hooks";
import {KNOWN_ARCHITECTURES} from "../src/api/plan-architectures.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";

export const CONFIGS = KNOWN_ARCHITECTURES;

/** the folder of `name` under `dir`, a bf16 checkpoint with random weights, written on first use */
export async function syntheticModel(dir: string, name: string): Promise<string> {
    const modelDir = path.join(dir, name);
    if (existsSync(path.join(modelDir, "config.json"))) return modelDir;
    if (!Object.hasOwn(CONFIGS, name)) throw new Error(`unknown model ${name}; known: ${Object.keys(CONFIGS).join(", ")}`);
    const t0 = performance.now();
    await writeSyntheticCheckpoint(modelDir, {config: CONFIGS[name], dtype: "BF16", seed: 0, std: 0.02, fast: true});
    console.log(`wrote ${modelDir} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    return modelDir;
}

/**
 * `modelDir` with max_position_embeddings raised to `positions` (as a user extending the context with RoPE
 * scaling sets it): a sibling folder whose weights are links to the original's, for sequences past the config's
 * context; the original when it is long enough
 */
export function longContextModel(modelDir: string, positions: number): string {
    const config = JSON.parse(readFileSync(path.join(modelDir, "config.json"), "utf8"));
    if (config.max_position_embeddings >= positions) return modelDir;
    const out = `${modelDir}-ctx${positions}`;
    if (existsSync(path.join(out, "config.json"))) return out;
    mkdirSync(out, {recursive: true});
    for (const f of readdirSync(modelDir))
        if (f !== "config.json" && !existsSync(path.join(out, f))) symlinkSync(path.join(modelDir, f), path.join(out, f));
    writeFileSync(path.join(out, "config.json"), JSON.stringify({...config, max_position_embeddings: positions}, null, 2));
    return out;
}
