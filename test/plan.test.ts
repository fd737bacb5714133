// qlora plan: the predicted GPU memory against the peaks the project's allocator measured on an H100, the terms
// against what src/quant and the graph allocate, the fit searches, suggestions, recipes, the train preflight, the
// speed estimate, and the command's output and errors.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {knownArchitecture, requireArchitecture} from "../src/api/plan-architectures.js";
import {
    BENCHMARK_SETTINGS,
    benchmarkSettings,
    estimateSpeed,
    gpuByDeviceName,
    gpuByName,
    MEASURED_RUNS,
    measuredRunSettings
} from "../src/api/plan-gpus.js";
import {planHostMemory} from "../src/api/plan-host.js";
import {planTraining, writeRecipe} from "../src/api/plan.js";
import type {DeviceChoice} from "../src/backend/cuda.js";
import {QloraError} from "../src/errors.js";
import {SafetensorsCheckpoint} from "../src/io/safetensors.js";
import {PROJ_NAMES, projShape} from "../src/model/weights.js";
import {loadTrainConfig, resolveTrainConfig} from "../src/train/config.js";
import {allocatorRound, GiB, gpuPreflight, halveBatchToFit, planDeviceMemory, type MemoryPlan} from "../src/train/plan-memory.js";
import {FIXTURES, MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-plan-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

/** the benchmark's run (README): r 16, alpha 32, all 7 projections, batch 4 x 512, gradient checkpointing */
const bench = (mode: "qlora" | "lora", patch: Record<string, unknown> = {}) =>
    resolveTrainConfig({
        ...BENCHMARK_SETTINGS,
        load_in_4bit: mode === "qlora",
        optim: mode === "qlora" ? "paged_adamw_8bit" : "adamw_torch",
        ...patch
    });
const termOf = (plan: MemoryPlan, term: string) => plan.terms.find((t) => t.term === term)?.bytes ?? 0;

/** runs fn as with QLORA_CUDA_EMBED_ON_HOST=0 (the input embedding in device memory, as before 2026-12-08) */
function embedOnDevice<T>(fn: () => T): T {
    const saved = process.env.QLORA_CUDA_EMBED_ON_HOST;
    process.env.QLORA_CUDA_EMBED_ON_HOST = "0";
    try {
        return fn();
    } finally {
        if (saved === undefined) delete process.env.QLORA_CUDA_EMBED_ON_HOST;
        else process.env.QLORA_CUDA_EMBED_ON_HOST = saved;
    }
}

test("the plan predicts the allocator peaks measured on an H100 within 10%", () => {
    // bench/gpu.ts measured both methods in one process, QLoRA first, and never freed the QLoRA model's device
    // buffers: its LoRA peaks hold the QLoRA model too (the cuBLASLt workspace is the process's, counted once).
    // These runs kept the input embedding in device memory
    const measured = [
        {arch: "qwen2-7b", mode: "qlora", gib: 7.09},
        {arch: "qwen2-7b", mode: "lora", gib: 22.5},
        {arch: "qwen2-0.5b", mode: "qlora", gib: 1.08},
        {arch: "qwen2-0.5b", mode: "lora", gib: 2.3}
    ] as const;
    const lines = [
        "model       method  predicted GiB  measured GiB  error %  (LoRA: its own peak + the QLoRA model left on the device)"
    ];
    for (const m of measured) {
        const cfg = requireArchitecture(m.arch);
        const plan = embedOnDevice(() => planDeviceMemory(cfg, bench(m.mode)));
        let predicted = plan.peakBytes;
        let own = "";
        if (m.mode === "lora") {
            const qlora = embedOnDevice(() => planDeviceMemory(cfg, bench("qlora")));
            predicted += qlora.staticBytes - termOf(qlora, "gemm_workspace");
            own = `  (${(plan.peakBytes / GiB).toFixed(2)} + ${((predicted - plan.peakBytes) / GiB).toFixed(2)})`;
        }
        const err = (100 * (predicted / GiB - m.gib)) / m.gib;
        lines.push(
            `${m.arch.padEnd(11)} ${m.mode.padEnd(7)} ${(predicted / GiB).toFixed(2).padStart(13)} ${m.gib.toFixed(2).padStart(13)} ` +
                `${err.toFixed(1).padStart(8)}${own}`
        );
        assert.ok(Math.abs(err) <= 10, `${m.arch} ${m.mode}: predicted ${(predicted / GiB).toFixed(3)} GiB, measured ${m.gib}`);
    }
    console.log(lines.join("\n"));
});

test("the terms are what src/quant stores and the CUDA model uploads", () => {
    const cfg = requireArchitecture("qwen2-7b");
    const plan = planDeviceMemory(cfg, bench("qlora"));
    let codes = 0,
        scales = 0,
        biggest = 0,
        lora = 0;
    for (const p of PROJ_NAMES) {
        const [out, inF] = projShape(cfg, p);
        const n = out * inF,
            nblocks = Math.ceil(n / 64);
        codes += Math.ceil(n / 2);
        // 8-bit scale codes, their fp32 scales per 256, the 256-entry map and the 16-entry code table
        scales += nblocks + 4 * Math.ceil(nblocks / 256) + 4 * 256 + 4 * 16;
        biggest = Math.max(biggest, n);
        lora += 16 * (out + inF);
    }
    const L = cfg.numHiddenLayers,
        VC = cfg.vocabSize * cfg.hiddenSize;
    assert.equal(termOf(plan, "base_4bit"), codes * L);
    assert.equal(termOf(plan, "base_4bit_state"), scales * L);
    // Qwen2-7B's input embedding is frozen and untied: pinned host memory, unless turned off or trained
    assert.equal(termOf(plan, "embed"), 0);
    assert.equal(
        termOf(
            embedOnDevice(() => planDeviceMemory(cfg, bench("qlora"))),
            "embed"
        ),
        2 * VC
    );
    assert.equal(termOf(planDeviceMemory(cfg, bench("qlora", {modules_to_save: ["embed_tokens"]})), "embed"), 2 * VC);
    const pinned = (settings: ReturnType<typeof bench>) =>
        planHostMemory(cfg, settings, "cuda", null).terms.find((t) => t.label.startsWith("input embedding"))?.bytes ?? 0;
    assert.equal(pinned(bench("qlora")), 2 * VC);
    assert.equal(pinned(bench("qlora", {modules_to_save: ["embed_tokens"]})), 0);
    // a tied embedding is the output layer's weight too: on the device
    assert.equal(termOf(planDeviceMemory(requireArchitecture("qwen2-0.5b"), bench("qlora")), "embed"), 2 * 151936 * 896);
    assert.equal(termOf(plan, "lm_head"), 2 * VC, "Qwen2-7B does not tie its output layer");
    assert.equal(termOf(plan, "dequant_scratch"), 2 * biggest);
    assert.equal(termOf(plan, "lora_params"), 4 * lora * L);
    assert.equal(termOf(plan, "lora_grads"), 4 * lora * L);
    assert.equal(termOf(plan, "lora_copies"), 2 * lora * L);
    assert.equal(termOf(plan, "optimizer"), 4 * 256 * 2 + 8, "paged 8-bit states live in managed memory: only the maps");
    // paged_adamw_8bit: a byte per state and value, an fp32 scale per 256-block, two states
    let paged = 0;
    for (const p of PROJ_NAMES) {
        const [out, inF] = projShape(cfg, p);
        for (const n of [16 * inF, out * 16]) paged += 2 * (n + 4 * Math.ceil(n / 256));
    }
    assert.equal(plan.pagedOptimizerBytes, paged * L);
    assert.equal(plan.totalBytes, plan.peakBytes + plan.pagedOptimizerBytes + 0.5 * GiB);
    // the tied 0.5B model has one embedding, and bf16 LoRA keeps adamw_torch's two fp32 states on the device
    const small = planDeviceMemory(requireArchitecture("qwen2-0.5b"), bench("lora"));
    assert.equal(termOf(small, "lm_head"), 0);
    assert.equal(termOf(small, "optimizer"), 2 * termOf(small, "lora_params") + 8);
    assert.equal(small.pagedOptimizerBytes, 0);
});

test("the allocator's size classes: 512 bytes below 1 MiB, 2 MiB above", () => {
    assert.equal(allocatorRound(0), 512);
    assert.equal(allocatorRound(513), 1024);
    assert.equal(allocatorRound((1 << 20) - 1), 1 << 20);
    assert.equal(allocatorRound(1 << 20), 2 << 20);
    assert.equal(allocatorRound((2 << 20) + 1), 4 << 20);
});

test("checkpointing, offload and shape move the peak the way the graph allocates", () => {
    const cfg = requireArchitecture("qwen2-7b");
    const at = (patch: Record<string, unknown>) => planDeviceMemory(cfg, bench("qlora", patch));
    const ckpt = at({max_seq_length: 4096, per_device_train_batch_size: 1});
    const none = at({max_seq_length: 4096, per_device_train_batch_size: 1, gradient_checkpointing: false});
    const offload = at({max_seq_length: 4096, per_device_train_batch_size: 1, gradient_checkpointing_offload: true});
    const activations = (p: MemoryPlan) => p.peakBytes - p.staticBytes;
    assert.ok(activations(none) > 5 * activations(ckpt), "without checkpointing every block's activations stay");
    assert.ok(offload.peakBytes < ckpt.peakBytes, "offloaded block inputs leave the device");
    // the kept block inputs: L + 1 of [N, C] bf16 under checkpointing, at most three with offload
    const N = 4096,
        C = cfg.hiddenSize;
    assert.equal(termOf(ckpt, "block_inputs"), (cfg.numHiddenLayers + 1) * 2 * N * C);
    assert.ok(termOf(offload, "block_inputs") <= 3 * 2 * N * C);
    // the static part does not depend on the shape; the step's part grows with the tokens
    const small = at({}),
        big = at({per_device_train_batch_size: 8});
    assert.equal(small.staticBytes, big.staticBytes);
    assert.ok(big.peakBytes - big.staticBytes > 1.8 * (small.peakBytes - small.staticBytes));
    // an evaluation pass of 8 x 4096 rows outgrows a training micro-batch of 1 x 4096 with checkpointing
    const withEval = planDeviceMemory(cfg, bench("qlora", {max_seq_length: 4096, per_device_train_batch_size: 1}), {
        evaluation: true
    });
    assert.ok(withEval.peakBytes > ckpt.peakBytes);
});

test("auto_find_batch_size halves the batch and doubles accumulation until the plan fits", () => {
    const cfg = requireArchitecture("qwen2-7b");
    const s = bench("qlora", {per_device_train_batch_size: 16, gradient_accumulation_steps: 2, max_seq_length: 4096});
    const budget = 24 * GiB;
    assert.ok(planDeviceMemory(cfg, s).totalBytes > budget);
    const fit = halveBatchToFit(cfg, s, budget)!;
    assert.ok(fit.plan.totalBytes <= budget);
    assert.equal(fit.settings.per_device_train_batch_size * fit.settings.gradient_accumulation_steps, 32);
    const twice = planDeviceMemory(cfg, {...s, per_device_train_batch_size: fit.settings.per_device_train_batch_size * 2});
    assert.ok(twice.totalBytes > budget, "the largest halving that fits");
    assert.equal(halveBatchToFit(cfg, s, 2 * GiB), null, "nothing fits 2 GiB");
});

test("the train preflight refuses a run above the free memory, naming both sizes and settings that fit", async () => {
    const dir = path.join(tmp, "qwen2-7b");
    mkdirSync(dir, {recursive: true});
    writeFileSync(path.join(dir, "config.json"), JSON.stringify(requireArchitecture("qwen2-7b").raw));
    const gpu = (freeBytes?: number): DeviceChoice => ({
        device: "cuda",
        reason: "fake",
        gpuSeen: true,
        line: "device: cuda (fake)",
        availability: {
            usable: true,
            reason: null,
            info: {
                runtimeVersion: 12080,
                driverVersion: 12080,
                error: null,
                cublasLt: "libcublasLt.so.12",
                devices: [{index: 0, name: "NVIDIA GeForce RTX 4090", major: 8, minor: 9, totalBytes: 24 * GiB, freeBytes}]
            }
        }
    });
    const config = {...bench("qlora", {per_device_train_batch_size: 16, max_seq_length: 4096}), model: dir, dataset: "d.jsonl"};
    const free = 23 * GiB;
    const plan = planDeviceMemory(requireArchitecture("qwen2-7b"), config);
    const logs: string[] = [];
    const small = {...config, per_device_train_batch_size: 1, max_seq_length: 512};
    assert.equal(await gpuPreflight(small, gpu(free), (m) => logs.push(m)), small, "a run that fits goes on unchanged");
    await assert.rejects(
        gpuPreflight(config, gpu(free), (m) => logs.push(m)),
        (err: Error) => {
            assert.ok(err instanceof QloraError);
            assert.ok(!err.message.includes("\n"));
            const need = ((plan.peakBytes + plan.pagedOptimizerBytes) / GiB).toFixed(2);
            assert.ok(
                err.message.startsWith(
                    `this run (batches of 16 x 4096 tokens) needs about ${need} GiB of GPU memory (the allocator's peak`
                ),
                err.message
            );
            assert.match(
                err.message,
                /but the GPU has 23\.00 GiB free; settings that fit: per_device_train_batch_size 16 -> 8, gradient_accumulation_steps 1 -> 2/
            );
            return true;
        }
    );
    assert.equal(logs.length, 0);
    const shrunk = await gpuPreflight({...config, auto_find_batch_size: true}, gpu(free), (m) => logs.push(m));
    assert.deepEqual([shrunk.per_device_train_batch_size, shrunk.gradient_accumulation_steps], [8, 2]);
    assert.equal(logs.length, 1);
    assert.match(
        logs[0],
        /^auto_find_batch_size: per_device_train_batch_size 16 -> 8, gradient_accumulation_steps 1 -> 2 \(the plan needs/
    );
    // the same halving the planner reports, which fits
    const fit = halveBatchToFit(requireArchitecture("qwen2-7b"), config, free + 0.5 * GiB)!;
    assert.equal(fit.settings.per_device_train_batch_size, 8);
    // data whose longest row is 512 tokens: batches of 16 x 512 fit, and the settings come back as given
    assert.equal(await gpuPreflight(config, gpu(free), (m) => logs.push(m), 512), config);
    // ... and rows of 4000 do not: the message counts the rows the data has
    await assert.rejects(
        gpuPreflight(config, gpu(free), () => undefined, 4000),
        /: this run \(batches of 16 x 4000 tokens\) needs about/
    );
    // halved for rows of 4000, max_seq_length as given
    const halved = await gpuPreflight({...config, auto_find_batch_size: true}, gpu(free), () => undefined, 4000);
    assert.deepEqual(
        [halved.per_device_train_batch_size, halved.gradient_accumulation_steps, halved.max_seq_length],
        [8, 2, 4096]
    );
    // no free memory reported (an older addon): no preflight
    assert.equal(await gpuPreflight(config, gpu(undefined), () => undefined), config);
});

test("the speed estimate is within 25% of every run measured on the H100, and scales by the GPU's rate", () => {
    const s = resolveTrainConfig({...BENCHMARK_SETTINGS});
    const h100 = gpuByName("h100-80gb");
    let worst = 0;
    for (const [arch, quantized, shape, ckpt, rate] of MEASURED_RUNS) {
        const est = estimateSpeed(requireArchitecture(arch), measuredRunSettings(shape, ckpt), quantized, h100).tokensPerSecond;
        const err = (100 * (est - rate)) / rate;
        worst = Math.max(worst, Math.abs(err));
        console.log(
            `${arch} ${quantized ? "QLoRA" : "LoRA "} ${shape} checkpointing ${ckpt}: estimated ` +
                `${Math.round(est)} tokens/s, measured ${rate} (${err.toFixed(1)}%)`
        );
        assert.ok(Math.abs(err) <= 25, `${arch} ${quantized} ${shape} ${ckpt}: ${err.toFixed(1)}%`);
    }
    console.log(`largest speed error ${worst.toFixed(1)}% over ${MEASURED_RUNS.length} runs`);
    const on = (gpu: string) => estimateSpeed(requireArchitecture("qwen2-7b"), s, true, gpuByName(gpu)).tokensPerSecond;
    assert.ok(
        on("rtx3060-12gb") < on("rtx4090-24gb") && on("rtx4090-24gb") < on("a100-80gb") && on("a100-80gb") < on("h100-80gb")
    );
    assert.equal(gpuByDeviceName("NVIDIA H100 80GB HBM3", 85_045_870_592)?.name, "h100-80gb");
    assert.equal(gpuByDeviceName("NVIDIA A100-SXM4-40GB", 42_298_834_944)?.name, "a100-40gb");
    assert.equal(gpuByDeviceName("NVIDIA L4", 23_580_000_000)?.name, "l4-24gb");
    assert.equal(gpuByDeviceName("Tesla T4", 15_843_721_216), null);
});

test("planTraining: a GPU that cannot hold the run gets a verdict, checked suggestions, a grid and the largest fits", async () => {
    const plan = await planTraining({
        model: "qwen2-7b",
        config: {load_in_4bit: false, optim: "adamw_torch"},
        gpu: "rtx3060-12gb"
    });
    assert.equal(plan.verdict, "does not fit");
    assert.equal(plan.gpu?.availableBytes, gpuByName("rtx3060-12gb").memoryBytes);
    assert.ok(plan.suggestions.some((s) => s.change === "load_in_4bit true (QLoRA)"));
    for (const s of plan.suggestions) assert.ok(s.totalBytes <= plan.gpu!.availableBytes, s.change);
    assert.equal(plan.grid.length, 25);
    for (const c of plan.grid) assert.equal(c.fits, false, "a bf16 7B base alone is 12 GiB");
    assert.deepEqual(plan.largest, {batch: null, seq: null});
    // the per-GPU table: 80 GB cards hold it, 24 GB ones do not
    const fits = Object.fromEntries(plan.gpus.map((g) => [g.name, g.fits]));
    assert.deepEqual(fits, {
        "rtx3060-12gb": false,
        "rtx4090-24gb": true,
        "l4-24gb": true,
        "a100-40gb": true,
        "a100-80gb": true,
        "h100-80gb": true,
        "h200-141gb": true
    });
    // the recipe turns QLoRA on and fits with headroom
    assert.equal(plan.recipe?.settings.load_in_4bit, true);
    assert.ok(plan.recipe!.totalBytes <= 0.9 * plan.gpu!.availableBytes);

    const q = await planTraining({model: "qwen2-7b", gpuMemoryGiB: 24});
    assert.equal(q.verdict, "fits");
    const largest = q.largest!;
    const cell = (batch: number, seq: number) => q.grid.find((c) => c.batch === batch && c.seq === seq)!;
    assert.ok(cell(16, 2048).fits && !cell(16, 4096).fits);
    // the largest batch at 512 fits and one more does not
    const at = (batch: number) =>
        planDeviceMemory(q.model.config, {...q.settings, per_device_train_batch_size: batch}).totalBytes;
    assert.ok(at(largest.batch!) <= 24 * GiB && at(largest.batch! + 1) > 24 * GiB);
});

test("planTraining reads a model folder's headers: the embedded model, and a bnb 4-bit checkpoint", async () => {
    const tiny = await planTraining({model: MODEL_DIR, detectGpu: false});
    assert.equal(tiny.model.dir, MODEL_DIR);
    assert.ok(tiny.model.weights && tiny.model.weights.bytes > 0);
    assert.equal(tiny.gpu, null);
    assert.equal(tiny.verdict, null);
    assert.ok(tiny.memory.peakBytes > 0 && tiny.memory.peakBytes < 0.2 * GiB);

    const bnbDir = path.join(FIXTURES, "bnb-4bit");
    const bnb = await planTraining({model: bnbDir, config: {load_in_4bit: false}, detectGpu: false});
    assert.deepEqual(bnb.model.preQuantized, {blocksize: 64, doubleQuant: true});
    assert.ok(bnb.notes.some((n) => n.includes("4-bit already")));
    // the packed codes the plan puts on the device are the checkpoint's own
    const ckpt = await SafetensorsCheckpoint.open(bnbDir);
    let packed = 0;
    for (const name of ckpt.names()) if (/proj\.weight$/.test(name)) packed += ckpt.info(name).byteLength;
    await ckpt.close();
    assert.equal(termOf(bnb.memory, "base_4bit"), packed);
    assert.equal(termOf(bnb.memory, "base_bf16"), 0);
});

test("writeRecipe writes a config qlora train reads, and never replaces a file", async () => {
    const given = {r: 32, lora_alpha: 64, dataset: "data.jsonl"};
    const plan = await planTraining({model: MODEL_DIR, config: given, gpuMemoryGiB: 1});
    const file = path.join(tmp, "recipe.yaml");
    await writeRecipe(plan, file, given);
    const text = readFileSync(file, "utf8");
    assert.match(text, /^# qlora plan: /);
    const back = await loadTrainConfig(file, []);
    assert.equal(back.r, 32);
    assert.equal(back.dataset, "data.jsonl");
    assert.equal(back.model, MODEL_DIR);
    assert.equal(back.per_device_train_batch_size, plan.recipe!.settings.per_device_train_batch_size);
    assert.equal(back.per_device_train_batch_size * back.gradient_accumulation_steps >= 16, true);
    const before = readFileSync(file, "utf8");
    await assert.rejects(writeRecipe(plan, file, given), /already exists/);
    assert.equal(readFileSync(file, "utf8"), before);
    await assert.rejects(writeRecipe({...plan, recipe: null}, path.join(tmp, "none.yaml")), /no settings fit/);
    assert.equal(existsSync(path.join(tmp, "none.yaml")), false);
});

const CLI = path.join(REPO_ROOT, "src", "cli", "main.ts");
function qlora(...args: string[]) {
    const r = spawnSync(process.execPath, ["--import", "tsx", CLI, ...args], {encoding: "utf8", cwd: REPO_ROOT, timeout: 60000});
    return {code: r.status, stdout: r.stdout, stderr: r.stderr};
}

test("qlora plan: the table, --json, --write-config, and one-line errors", () => {
    const recipe = path.join(tmp, "q.yaml");
    const r = qlora(
        "plan",
        "--model",
        "qwen2-7b",
        "--gpu",
        "rtx4090-24gb",
        "--per_device_train_batch_size",
        "2",
        "--write-config",
        recipe
    );
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /frozen projections: 4-bit codes\s+3\.04/);
    assert.match(r.stdout, /fits on RTX 4090 24 GB/);
    assert.match(r.stdout, /recipe for RTX 4090 24 GB/);
    assert.match(readFileSync(recipe, "utf8"), /per_device_train_batch_size: \d+/);
    const j = qlora("plan", "--model", "qwen2-0.5b", "--gpu-memory", "1.5", "--json");
    assert.equal(j.code, 0, j.stderr);
    const plan = JSON.parse(j.stdout);
    assert.equal(plan.verdict, "does not fit");
    assert.equal(plan.settings.per_device_train_batch_size, 4);
    assert.ok(plan.suggestions.length > 0);
    for (const [args, fragment] of [
        [["--gpu", "rtx9090"], /unknown GPU "rtx9090"; known: rtx3060-12gb/],
        [["--gpu", "l4-24gb", "--gpu-memory", "24"], /give --gpu or --gpu-memory, not both/],
        [
            ["--per_device_train_batchsize", "2"],
            /unknown option --per_device_train_batchsize; did you mean --per_device_train_batch_size/
        ],
        [["--model", "qwen9-1b"], /qwen9-1b/],
        [["--write-config", recipe, "--gpu", "l4-24gb"], /q\.yaml: already exists/]
    ] as const) {
        const e = qlora("plan", ...args);
        assert.equal(e.code, 1, e.stderr);
        const lines = e.stderr.trim().split("\n");
        assert.equal(lines.length, 1, e.stderr);
        assert.match(lines[0], fragment);
    }
    assert.equal(knownArchitecture("QWEN2-7B")?.hiddenSize, 3584);
});

test("the host plan of an offloaded run counts the pinned block inputs, bf16, every layer", () => {
    const cfg = requireArchitecture("qwen2-7b");
    const at = (offload: boolean, checkpointing = true) =>
        planHostMemory(cfg, benchmarkSettings(1, 16384, offload ? "offload" : checkpointing ? "on" : "off"), "cuda", null);
    const off = at(true),
        on = at(false);
    const pinned = off.terms.find((t) => t.label.startsWith("offloaded block inputs"));
    // 28 layers x 16,384 tokens x 3,584 x 2 bytes = 3.06 GiB
    assert.equal(pinned?.bytes, 28 * 16384 * 3584 * 2);
    assert.equal(off.bytes - on.bytes, pinned.bytes);
    assert.ok(!on.terms.some((t) => t.label.startsWith("offloaded")));
});
