// models.ts: the model architectures the GPU benchmarks use (src/api/plan-architectures.ts, the table `qlora plan`
// knows), written once with random weights by the project's own code (the peers, peer_lora.py and
// peer_generate.py, read the same folder).
import {existsSync} from "node:fs";
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
