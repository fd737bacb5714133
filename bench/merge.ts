// bench/merge.ts: the time of `qlora merge` (src/peft/merge.ts) on a random-weight model of a known architecture
// (bench/models.ts) with a random LoRA adapter on all seven projections of every layer, on each device asked for,
// into the 16-bit weights and against the NF4 base (--against-nf4).
//
//   node --import tsx bench/merge.ts [--model qwen2-0.5b] [--r 16] [--devices cpu,cuda] [--modes original,nf4]
//                                    [--dora] [--dir /tmp/models] [--repeat 1]
// The model folder is written once under --dir (as bench:gpu's); the adapter beside it, the merged folders in a
// temporary folder removed at the end. Each row: the whole mergeAdapter call (reading, merging, converting and
// writing every tensor), the best of --repeat runs, as wall time and as the process's CPU time (user + system).
import {mkdtempSync, rmSync} from "node:fs";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {performance} from "node:perf_hooks";
import {Rng} from "../src/backend/rng.js";
import {loadModelConfig} from "../src/io/hf-config.js";
import {writeFileAtomic} from "../src/io/atomic.js";
import {writeSafetensors, type TensorToWrite} from "../src/io/safetensors.js";
import {LORA_DEFAULTS, type LoraConfig} from "../src/lora/config.js";
import {projShape} from "../src/model/weights.js";
import {adapterConfigJson, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE} from "../src/peft/adapter-files.js";
import {linearModules} from "../src/peft/inject.js";
import {mergeAdapter} from "../src/peft/merge.js";
import {syntheticModel} from "./models.js";

const arg = (name: string, def: string) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : def;
};
const modelName = arg("model", "qwen2-0.5b");
const r = Number(arg("r", "16"));
const devices = arg("devices", "cpu").split(",") as ("cpu" | "cuda")[];
const modes = arg("modes", "original,nf4").split(",");
const dora = process.argv.includes("--dora");
const dir = arg("dir", "/tmp/models");
const repeat = Number(arg("repeat", "1"));

/** a random adapter of rank r on every projection: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming bound), B ~ N(0, 0.01) */
async function randomAdapter(modelDir: string, out: string): Promise<void> {
    const cfg = await loadModelConfig(modelDir);
    const rng = new Rng(1);
    const tensors: TensorToWrite[] = [];
    const modules = linearModules(cfg);
    for (const m of modules) {
        const [outF, inF] = projShape(cfg, m.proj);
        const A = new Float32Array(r * inF),
            B = new Float32Array(outF * r);
        const bound = 1 / Math.sqrt(inF);
        for (let i = 0; i < A.length; i++) A[i] = (2 * rng.next() - 1) * bound;
        for (let i = 0; i < B.length; i++) B[i] = 0.01 * rng.normal();
        const prefix = `base_model.model.${m.name}`;
        tensors.push({name: `${prefix}.lora_A.weight`, dtype: "F32", shape: [r, inF], data: A});
        tensors.push({name: `${prefix}.lora_B.weight`, dtype: "F32", shape: [outF, r], data: B});
        if (dora) {
            const mag = new Float32Array(outF);
            for (let i = 0; i < outF; i++) mag[i] = 0.5 + rng.next();
            tensors.push({name: `${prefix}.lora_magnitude_vector`, dtype: "F32", shape: [outF], data: mag});
        }
    }
    await fs.mkdir(out, {recursive: true});
    await writeSafetensors(path.join(out, ADAPTER_WEIGHTS_FILE), tensors, {format: "pt"});
    const config: LoraConfig = {...LORA_DEFAULTS, r, lora_alpha: 2 * r, use_dora: dora, target_modules: null};
    const names = [...new Set(modules.map((m) => m.proj as string))];
    await writeFileAtomic(path.join(out, ADAPTER_CONFIG_FILE), adapterConfigJson(config, names));
}

const modelDir = await syntheticModel(dir, modelName);
const adapterDir = path.join(dir, `${modelName}-adapter-r${r}${dora ? "-dora" : ""}`);
await randomAdapter(modelDir, adapterDir);
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-bench-merge-"));
try {
    for (const device of devices)
        for (const mode of modes) {
            let best = Number.POSITIVE_INFINITY;
            let bestCpu = Number.POSITIVE_INFINITY;
            let merged = 0;
            for (let i = 0; i < repeat; i++) {
                const out = path.join(tmp, `${device}-${mode}`);
                const c0 = process.cpuUsage();
                const t0 = performance.now();
                const res = await mergeAdapter({
                    model: modelDir,
                    adapter: adapterDir,
                    out,
                    againstNf4: mode === "nf4",
                    device,
                    overwrite: true
                });
                best = Math.min(best, (performance.now() - t0) / 1000);
                const c = process.cpuUsage(c0);
                bestCpu = Math.min(bestCpu, (c.user + c.system) / 1e6);
                merged = res.merged;
            }
            console.log(
                JSON.stringify({
                    model: modelName,
                    r,
                    dora,
                    device,
                    base: mode === "nf4" ? "--against-nf4" : "original",
                    modules: merged,
                    seconds: Number(best.toFixed(2)),
                    // the host's work: all threads' user + system time (the wall time of a shared machine varies)
                    cpuSeconds: Number(bestCpu.toFixed(2))
                })
            );
        }
} finally {
    rmSync(tmp, {recursive: true, force: true});
}
