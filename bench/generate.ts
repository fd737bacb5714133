// bench/generate.ts: generation throughput on the GPU for the Qwen2-7B architecture with random weights (written by
// the project's own code), beside transformers + peft `generate` measured by ../shared/bench/peer_generate.py in
// the same command, and the bandwidth floor of batch-1 decoding.
//
// The model: the NF4 + double-quant base (as QLoRA trains it) and the bf16 base, each with an r=16 adapter on all
// 7 projections attached unmerged, lora_B drawn from N(0, 0.01) so the adapter computes (peer_generate.py does the
// same). Greedy decoding of random prompt ids with EOS disabled, so every row decodes exactly --new tokens.
//   prefill tokens/s: one forward of [batch, prompt] into an empty KV cache, timed after a warm-up at that shape
//   decode tokens/s:  batch x (new - 1) tokens over the time from the first new token to the last
//   floor:            bytes of weights (and KV cache) read per batch-1 step / the HBM bandwidth a device-to-device
//                     copy reaches here
//   first token:      `qlora generate --chat --load-in-4bit -n 1` as a user runs it, process start to exit, from
//                     the bf16 checkpoint on local disk (loading and quantizing included)
//
//   node bench/generate.js [--model qwen2-7b|DIR] [--bases nf4,bf16] [--batches 1,8,32] [--prompt 512] [--new 256]
//                          [--dir /tmp/models] [--peer path/to/peer_generate.py] [--no-first-token]
//                          [--graphs on,off] (decoding steps replayed as CUDA graphs, or queued kernel by kernel)
//                          [--profile] (after each row, one decoding step timed op by op on the GPU: src/backend/cuda-profile.ts)
import {spawnSync} from "node:child_process";
import {copyFileSync, existsSync} from "node:fs";
import path from "node:path";
import {performance} from "node:perf_hooks";
import {fileURLToPath} from "node:url";
import {DEFAULT_MODEL_DIR} from "../src/api/models.js";
import {cuda, cudaAvailability, DeviceBuffer} from "../src/backend/cuda.js";
import {formatProfile, profileCuda} from "../src/backend/cuda-profile.js";
import {Rng} from "../src/backend/rng.js";
import {loadModelConfig} from "../src/io/hf-config.js";
import type {CausalLm} from "../src/model/causal-lm.js";
import {CudaModel} from "../src/model/cuda-model.js";
import {DecoderModel} from "../src/model/decoder.js";
import {decodeBatchSteps} from "../src/model/generate.js";
import {applyLora} from "../src/peft/inject.js";
import {bitsAndBytesConfig} from "../src/quant/config.js";
import {memoryReport} from "../src/train/memory.js";
import {syntheticModel} from "./models.js";

const arg = (name: string, def: string) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : def;
};
const name = arg("model", "qwen2-7b");
const bases = arg("bases", "nf4,bf16").split(",");
const batches = arg("batches", "1,8,32").split(",").map(Number);
const promptLen = Number(arg("prompt", "512"));
const newTokens = Number(arg("new", "256"));
const dir = arg("dir", "/tmp/models");
const peer = arg("peer", "");
const firstToken = !process.argv.includes("--no-first-token");
// --sample: decode with a chat setting (temperature 0.7, top-k 50, top-p 0.9, repetition penalty 1.1) instead of
// greedy, to see what choosing tokens on the device costs (the peer stays greedy)
const sampled = process.argv.includes("--sample");
const graphModes = arg("graphs", "on").split(",");
const profile = process.argv.includes("--profile");
const decoding = sampled ? {greedy: false, temperature: 0.7, topK: 50, topP: 0.9, repetitionPenalty: 1.1} : {greedy: true};
// --device cpu: the same measurements on the host model (a smoke run of this script on a machine with no GPU)
const onCpu = arg("device", "cuda") === "cpu";
const sync = () => {
    if (!onCpu) cuda().synchronize();
};
const R = 16;

interface Row {
    impl: string;
    base: string;
    batch: number;
    prefillTokS: number;
    decodeTokS: number;
    peakGiB: number;
    note: string;
}
const rows: Row[] = [];
const GiB = 2 ** 30;

// a model folder, or an architecture written with random weights under --dir
const modelDir = existsSync(path.join(name, "config.json")) ? path.resolve(name) : await syntheticModel(dir, name);
const cfg = await loadModelConfig(modelDir);
const {hiddenSize: H, intermediateSize: I, numHiddenLayers: L, vocabSize: V} = cfg;
const kvDim = cfg.numKeyValueHeads * (H / cfg.numAttentionHeads);
// [in, out] of the 7 projections of one layer
const PROJ: [number, number][] = [
    [H, H],
    [H, kvDim],
    [H, kvDim],
    [H, H],
    [H, I],
    [H, I],
    [I, H]
];

/** the HBM bandwidth a device-to-device copy of 2 GiB reaches (read + write bytes over time), in bytes/s */
function copyBandwidth(): number {
    const n = 2 * GiB;
    const a = DeviceBuffer.zeros("u8", n),
        b = DeviceBuffer.zeros("u8", n);
    try {
        cuda().copy(b.ptr, a.ptr, n);
        cuda().synchronize();
        const reps = 10,
            t0 = performance.now();
        for (let i = 0; i < reps; i++) cuda().copy(i % 2 ? a.ptr : b.ptr, i % 2 ? b.ptr : a.ptr, n);
        cuda().synchronize();
        return (2 * n * reps) / ((performance.now() - t0) / 1000);
    } finally {
        a.free();
        b.free();
    }
}

/**
 * bytes one batch-1 decoding step must read: every projection (NF4: 4 bits per weight, one 8-bit absmax per 64
 * weights and one fp32 per 256 absmax blocks; bf16: 2 bytes), the bf16 adapter, the bf16 lm_head, and the KV
 * cache at the mean position of the decode. Norms, biases and the embedding row are left out (< 0.1%).
 */
function bytesPerStep(base: string): number {
    let proj = 0,
        lora = 0;
    for (const [i, o] of PROJ) {
        const n = i * o;
        proj += base === "nf4" ? n / 2 + n / 64 + (n / 64 / 256) * 4 : 2 * n;
        lora += 2 * R * (i + o);
    }
    const meanPos = promptLen + newTokens / 2;
    return L * (proj + lora + 2 * 2 * kvDim * meanPos) + 2 * V * H;
}

/** measures one base in this process (the parent runs each base in a child so the peaks do not add up) */
async function timeBase(base: string): Promise<void> {
    const t0 = performance.now();
    const quantization =
        base === "nf4"
            ? bitsAndBytesConfig({
                  load_in_4bit: true,
                  bnb_4bit_quant_type: "nf4",
                  bnb_4bit_use_double_quant: true,
                  bnb_4bit_compute_dtype: "bfloat16"
              })
            : null;
    const model = await DecoderModel.load(modelDir, {quantization});
    const lora = applyLora(model, {r: R, lora_alpha: 32, lora_dropout: 0, target_modules: "all-linear"}, {initRng: new Rng(0)});
    const rng = new Rng(2);
    for (const layer of lora.layers.values()) {
        const B = layer.lora?.B;
        if (B) for (let i = 0; i < B.length; i++) B[i] = 0.01 * rng.normal();
    }
    const lm: CausalLm = onCpu ? model : new CudaModel(model);
    const loadS = (performance.now() - t0) / 1000;
    const prng = new Rng(1);
    for (const graphs of onCpu ? ["off"] : graphModes)
        for (const bs of batches) {
            if (lm instanceof CudaModel) lm.cudaGraphs = graphs === "on";
            const prompts = Array.from({length: bs}, () => Array.from({length: promptLen}, () => prng.int(V)));
            const ids = Int32Array.from(prompts.flat());
            const logitRows = Array.from({length: bs}, (_, b) => b * promptLen + promptLen - 1);
            const decode = {...decoding, eosTokenIds: []};
            // warm-up at this shape: the attention and GEMM workspaces are set up outside the timings
            for (const _ of decodeBatchSteps(lm, prompts, {...decode, maxNewTokens: 4}));
            sync();
            if (!onCpu) cuda().resetPeakMemoryStats();
            const cache = lm.newCache(bs, promptLen + newTokens);
            let t = performance.now();
            lm.forward(ids, bs, promptLen, {cache, logitRows});
            sync();
            const prefillS = (performance.now() - t) / 1000;
            cache.release();
            let steps = 0,
                first = 0;
            const before = lm instanceof CudaModel ? lm.decodeGraphStats().replays : 0;
            t = performance.now();
            for (const _ of decodeBatchSteps(lm, prompts, {...decode, maxNewTokens: newTokens}))
                if (steps++ === 0) first = performance.now();
            sync();
            const decodeS = (performance.now() - first) / 1000;
            if (steps !== newTokens) throw new Error(`decoded ${steps} steps, expected ${newTokens}`);
            const replays = lm instanceof CudaModel ? lm.decodeGraphStats().replays - before : 0;
            const row: Row = {
                impl: onCpu ? "qlora (this project)" : `qlora (this project), CUDA graphs ${graphs}`,
                base,
                batch: bs,
                prefillTokS: (bs * promptLen) / prefillS,
                decodeTokS: (bs * (newTokens - 1)) / decodeS,
                // the process's max RSS on the CPU (loading included), the allocator's peak since the reset on the GPU
                peakGiB: memoryReport(onCpu ? "cpu" : "cuda").peak / GiB,
                note: `load ${loadS.toFixed(0)} s; first step ${((first - t) / 1000).toFixed(2)} s; ${replays} graph replays`
            };
            console.log(`ROW ${JSON.stringify(row)}`);
            if (profile && !onCpu) profileStep(lm, prompts, decode, `${base} batch ${bs}, CUDA graphs ${graphs}`);
        }
}

/** one decoding step (the fifth token: past the eager first step and the recording) timed op by op */
function profileStep(
    lm: CausalLm,
    prompts: number[][],
    decode: Omit<Parameters<typeof decodeBatchSteps>[2], "maxNewTokens">,
    what: string
): void {
    const steps = decodeBatchSteps(lm, prompts, {...decode, maxNewTokens: 8});
    for (let i = 0; ; i++) {
        if (i !== 4) {
            if (steps.next().done) break;
            continue;
        }
        const {result, profile: p} = profileCuda(() => steps.next());
        console.log(`\n${formatProfile(p, `profile of one decoding step, ${what}`)}\n`);
        if (result.done) break;
    }
}

/** runs `args` of this script in a child process, echoing its output; the ROW lines become table rows */
function child(args: string[], what: string): void {
    const r = spawnSync(process.execPath, [...process.execArgv, fileURLToPath(import.meta.url), ...args], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "inherit"],
        maxBuffer: 64 << 20
    });
    for (const line of r.stdout.split("\n")) {
        if (line.startsWith("ROW ")) rows.push(JSON.parse(line.slice(4)));
        // everything is echoed as it comes, so a run cut short still shows what it measured
        if (line) console.log(line);
    }
    if (r.status !== 0) console.log(`${what} exited with ${r.status}`);
}

/** `qlora generate --chat --load-in-4bit -n 1` from the bf16 checkpoint, process start to exit, in seconds */
function firstTokenSeconds(): number | null {
    // the synthetic checkpoint has no tokenizer: the embedded model's (16k ids, all valid for the 152k vocabulary)
    for (const f of ["tokenizer.json", "tokenizer_config.json"])
        if (!existsSync(path.join(modelDir, f))) copyFileSync(path.join(DEFAULT_MODEL_DIR, f), path.join(modelDir, f));
    const here = fileURLToPath(import.meta.url);
    const cli = path.join(path.dirname(here), "..", "src", "cli", `main${path.extname(here)}`);
    const args = [...(path.extname(here) === ".ts" ? ["--import", "tsx"] : []), cli, "generate", "--model", modelDir];
    args.push(
        "--load-in-4bit",
        "--device",
        onCpu ? "cpu" : "cuda",
        "--chat",
        "-p",
        "Hello, who are you?",
        "-n",
        "1",
        "--greedy",
        "--json"
    );
    const t0 = performance.now();
    const r = spawnSync(process.execPath, args, {encoding: "utf8"});
    const s = (performance.now() - t0) / 1000;
    if (r.status !== 0) {
        console.log(`first-token run failed (${r.status}): ${r.stderr.slice(-400)}`);
        return null;
    }
    console.log(`first token: ${s.toFixed(1)} s (${r.stderr.trim().split("\n").join("; ")})`);
    return s;
}

const only = arg("child", "");
if (only) {
    await timeBase(only);
    process.exit(0);
}

const gpu = onCpu ? "CPU" : (cudaAvailability().info?.devices[0]?.name ?? "GPU");
const bandwidth = onCpu ? Number.NaN : copyBandwidth();
console.log(`${gpu}: device-to-device copy ${(bandwidth / 1e9).toFixed(0)} GB/s`);
const passOn = [
    "--device",
    onCpu ? "cpu" : "cuda",
    "--model",
    name,
    "--batches",
    batches.join(","),
    "--prompt",
    String(promptLen),
    "--new",
    String(newTokens),
    "--graphs",
    graphModes.join(","),
    ...(sampled ? ["--sample"] : []),
    ...(profile ? ["--profile"] : [])
];
for (const base of bases) child([...passOn, "--dir", dir, "--child", base], `the ${base} run`);
if (peer) {
    const r = spawnSync(
        "python3",
        [
            peer,
            "--model",
            name,
            "--dir",
            dir,
            "--batches",
            batches.join(","),
            "--prompt",
            String(promptLen),
            "--new",
            String(newTokens)
        ],
        {encoding: "utf8"}
    );
    for (const line of r.stdout.split("\n").filter((l) => l.startsWith("{"))) {
        console.log(`peer ${line}`);
        const j = JSON.parse(line);
        rows.push({
            impl: "transformers + peft (adapter unmerged)",
            base: "bf16",
            batch: j.batch,
            prefillTokS: j.prefill_tok_s,
            decodeTokS: j.decode_tok_s,
            peakGiB: j.peak_gib,
            note: `measured in this run, ${j.new_tokens} new tokens`
        });
    }
    if (r.status !== 0) console.log(`peer exited with ${r.status}: ${r.stderr.slice(-800)}`);
}
const firstS = firstToken ? firstTokenSeconds() : null;

console.log(
    `\n${gpu}, ${name} architecture (random weights), r=${R} adapter on all 7 projections unmerged, ` +
        `${sampled ? "sampled (T 0.7, top-k 50, top-p 0.9, repetition penalty 1.1; the peer greedy)" : "greedy"}, ` +
        `prompt ${promptLen}, ${newTokens} new tokens\n`
);
console.log("| implementation | base | batch | prefill tok/s | decode tok/s | peak GiB | notes |");
console.log("|---|---|---|---|---|---|---|");
for (const r of rows)
    console.log(
        `| ${r.impl} | ${r.base} | ${r.batch} | ${r.prefillTokS.toFixed(0)} | ${r.decodeTokS.toFixed(1)} | ` +
            `${r.peakGiB.toFixed(2)} | ${r.note} |`
    );
console.log("");
for (const base of bases) {
    const ours = rows.find((r) => r.impl.startsWith("qlora") && r.base === base && r.batch === 1);
    if (!ours) continue;
    const floor = bandwidth / bytesPerStep(base);
    const peer1 = rows.find((r) => r.impl.startsWith("transformers") && r.batch === 1);
    console.log(
        `${base} batch 1: ${ours.decodeTokS.toFixed(1)} tok/s = ${((100 * ours.decodeTokS) / floor).toFixed(0)}% of the ` +
            `bandwidth floor (${floor.toFixed(0)} tok/s: ${(bytesPerStep(base) / 1e9).toFixed(2)} GB per step at ` +
            `${(bandwidth / 1e9).toFixed(0)} GB/s)` +
            (peer1 ? `; ${(ours.decodeTokS / peer1.decodeTokS).toFixed(1)}x transformers + peft` : "")
    );
}
if (firstS !== null) console.log(`first token of qlora generate --chat --load-in-4bit from bf16 on disk: ${firstS.toFixed(1)} s`);
