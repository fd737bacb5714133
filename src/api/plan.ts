// plan.ts: "will it fit?": the GPU memory and speed of a training run, before anything is loaded (`qlora plan`,
// planTraining). It reads config.json (and the safetensors headers when the weights are there), resolves the
// training keys with the train config's own parser, replays the step's allocations (train/plan-memory.ts), and
// answers for a GPU: the verdict, what to change when it does not fit, a batch x length grid, the largest shapes
// that fit, a tokens/s estimate, and a train config that fits (writeRecipe).
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {stringify as toYaml} from "yaml";
import {QloraError} from "../errors.js";
import {cudaAvailability, type CudaProbe, systemCudaProbe} from "../backend/cuda.js";
import {writeFileAtomic} from "../io/atomic.js";
import {pathExists} from "../io/files.js";
import {loadModelConfig, type ModelConfig} from "../io/hf-config.js";
import {SafetensorsCheckpoint, SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE} from "../io/safetensors.js";
import {checkConfigAgainstCheckpoint, projModule, projNames, projShape} from "../model/weights.js";
import {resolveTrainConfig, type TrainConfig} from "../train/config.js";
import {
    checkPlanInputs,
    CUDA_CONTEXT_BYTES,
    fitSuggestions,
    GiB,
    planDeviceMemory,
    quantLayout,
    type MemoryPlan,
    type MemoryPlanOptions,
    type PreQuantized
} from "../train/plan-memory.js";
import {DEFAULT_MODEL_DIR, resolveModel} from "./models.js";
import {knownArchitecture} from "./plan-architectures.js";
import {estimateSpeed, gpuByDeviceName, gpuByName, GPUS, type GpuSpec, type SpeedEstimate} from "./plan-gpus.js";
import {planHostMemory, type HostPlan} from "./plan-host.js";

export {GPUS} from "./plan-gpus.js";
export {KNOWN_ARCHITECTURES} from "./plan-architectures.js";

export interface PlanTrainingOptions {
    /** a model folder, a Hub id, or a built-in architecture name (qwen2-7b, llama-3-8b, ...); default: config.model */
    model?: string | null;
    /** training keys as `qlora train` reads them (a config file's keys and flags); resolved by its parser */
    config?: Record<string, unknown>;
    /** a GPU by name (rtx3060-12gb, rtx4090-24gb, l4-24gb, a100-40gb, a100-80gb, h100-80gb, h200-141gb) */
    gpu?: string;
    /** or its memory in GiB */
    gpuMemoryGiB?: number;
    /** without gpu / gpuMemoryGiB: plan for this machine's GPU when one is usable (default true) */
    detectGpu?: boolean;
    /** what cudaAvailability looks at (tests) */
    probe?: CudaProbe;
}

/** the GPU a plan is checked against */
export interface PlanGpu {
    label: string;
    /** what the run can use: the card's memory (a named GPU), the given size, or this machine's free memory */
    availableBytes: number;
    source: "--gpu" | "--gpu-memory" | "this machine";
    /** its rates, for the speed estimate (null for a bare size) */
    spec: GpuSpec | null;
}

export type Verdict = "fits" | "fits, tight" | "does not fit";

export interface GridCell {
    batch: number;
    seq: number;
    totalBytes: number;
    fits: boolean | null;
}

export interface Recipe {
    settings: Pick<
        TrainConfig,
        | "per_device_train_batch_size"
        | "gradient_accumulation_steps"
        | "max_seq_length"
        | "gradient_checkpointing"
        | "gradient_checkpointing_offload"
        | "load_in_4bit"
    >;
    totalBytes: number;
    tokensPerSecond: number | null;
    /** what differs from the settings asked for */
    changes: string[];
}

export interface TrainingPlan {
    model: {
        /** what --model named */
        source: string;
        /** the folder, or null for a built-in architecture */
        dir: string | null;
        config: ModelConfig;
        /** parameters of the base model (a tied embedding counted once) */
        parameters: number;
        /** the safetensors headers read, or null when the weights are not there (planned from config.json alone) */
        weights: {bytes: number; dtypes: Record<string, number>} | null;
        preQuantized: PreQuantized | null;
    };
    /** the resolved training keys */
    settings: TrainConfig;
    /** where the run trains: the GPU plan is the main answer unless device is cpu */
    device: "cuda" | "cpu";
    memory: MemoryPlan;
    gpu: PlanGpu | null;
    verdict: Verdict | null;
    suggestions: {change: string; totalBytes: number}[];
    grid: GridCell[];
    /** the largest batch at max_seq_length, the longest max_seq_length at batch 1 (null: none fits) */
    largest: {batch: number | null; seq: number | null} | null;
    speed: SpeedEstimate | null;
    host: HostPlan;
    /** this machine's RAM, for the host plan */
    hostRam: {totalBytes: number; freeBytes: number};
    /** each known GPU: does the run fit, and the largest batch at max_seq_length */
    gpus: {name: string; label: string; memoryBytes: number; fits: boolean; largestBatch: number | null}[];
    recipe: Recipe | null;
    notes: string[];
}

export const GRID_BATCHES = [1, 2, 4, 8, 16];
export const GRID_SEQS = [512, 1024, 2048, 4096, 8192];
/** a plan within this share of the memory is "tight": fragmentation and the driver can tip it over */
const TIGHT_SHARE = 0.95;
/** recipes keep this share of the memory free */
const RECIPE_SHARE = 0.9;
/** the effective batch recipes keep (batch x gradient accumulation) when the config does not set one */
const RECIPE_EFFECTIVE_BATCH = 16;

/** the model's config and what its safetensors headers add (dtype, size, pre-quantized layout) */
async function resolvePlanModel(name: string | null | undefined): Promise<TrainingPlan["model"]> {
    const arch = name ? knownArchitecture(name) : null;
    if (name && arch && !(await pathExists(path.resolve(name))))
        return {source: name, dir: null, config: arch, parameters: parameterCount(arch), weights: null, preQuantized: null};
    // a Hub id: the config and tokenizer files are enough (no weights are downloaded for a plan)
    const dir = await resolveModel(name ?? DEFAULT_MODEL_DIR, {weights: false});
    const config = await loadModelConfig(dir);
    const hasWeights =
        (await pathExists(path.join(dir, SAFETENSORS_SINGLE_FILE))) || (await pathExists(path.join(dir, SAFETENSORS_INDEX_FILE)));
    if (!hasWeights)
        return {source: name ?? dir, dir, config, parameters: parameterCount(config), weights: null, preQuantized: null};
    const ckpt = await SafetensorsCheckpoint.open(dir);
    try {
        checkConfigAgainstCheckpoint(config, ckpt);
        const dtypes: Record<string, number> = {};
        for (const t of ckpt.names()) {
            const info = ckpt.info(t);
            dtypes[info.dtype] = (dtypes[info.dtype] ?? 0) + info.byteLength;
        }
        return {
            source: name ?? dir,
            dir,
            config,
            parameters: parameterCount(config),
            weights: {bytes: ckpt.totalBytes, dtypes},
            preQuantized: preQuantizedLayout(config, ckpt)
        };
    } finally {
        await ckpt.close();
    }
}

/** a bitsandbytes 4-bit checkpoint's layout, from its first projection's headers (bnb-checkpoint.ts names) */
function preQuantizedLayout(cfg: ModelConfig, ckpt: SafetensorsCheckpoint): PreQuantized | null {
    const first = projNames(cfg)[0];
    const weight = `${projModule(0, first)}.weight`;
    if (!ckpt.has(`${weight}.absmax`)) return null;
    const [out, inF] = projShape(cfg, first);
    const nblocks = ckpt.info(`${weight}.absmax`).shape.reduce((a, b) => a * b, 1);
    return {blocksize: Math.ceil((out * inF) / Math.max(1, nblocks)), doubleQuant: ckpt.has(`${weight}.nested_absmax`)};
}

function parameterCount(cfg: ModelConfig): number {
    let n = cfg.vocabSize * cfg.hiddenSize * (cfg.tieWordEmbeddings ? 1 : 2);
    for (const p of projNames(cfg)) {
        const [out, inF] = projShape(cfg, p);
        n += out * inF * cfg.numHiddenLayers;
    }
    // qwen3's q_norm and k_norm: head_dim each per layer
    const qkNorms = cfg.qkNorm ? 2 * cfg.headDim * cfg.numHiddenLayers : 0;
    return n + cfg.hiddenSize * (2 * cfg.numHiddenLayers + 1) + qkNorms;
}

/** the GPU the plan answers for: --gpu, --gpu-memory, or this machine's (its free memory) */
function resolvePlanGpu(opts: PlanTrainingOptions): PlanGpu | null {
    if (opts.gpu !== undefined && opts.gpuMemoryGiB !== undefined) throw new QloraError("give --gpu or --gpu-memory, not both");
    if (opts.gpu !== undefined) {
        const spec = gpuByName(opts.gpu);
        return {label: spec.label, availableBytes: spec.memoryBytes, source: "--gpu", spec};
    }
    if (opts.gpuMemoryGiB !== undefined) {
        if (!(Number.isFinite(opts.gpuMemoryGiB) && opts.gpuMemoryGiB > 0 && opts.gpuMemoryGiB < 1e6))
            throw new QloraError(`--gpu-memory expects a size in GiB such as 24, got ${opts.gpuMemoryGiB}`);
        return {
            label: `${opts.gpuMemoryGiB} GiB GPU`,
            availableBytes: opts.gpuMemoryGiB * GiB,
            source: "--gpu-memory",
            spec: null
        };
    }
    if (opts.detectGpu === false) return null;
    const a = cudaAvailability(opts.probe ?? systemCudaProbe);
    const d = a.usable ? a.info?.devices[0] : undefined;
    if (!d) return null;
    // free memory is measured with this process's CUDA context already made: the context is in the plan's total
    const free = d.freeBytes ?? d.totalBytes;
    return {
        label: `${d.name} (this machine: ${(free / GiB).toFixed(1)} of ${(d.totalBytes / GiB).toFixed(1)} GiB free)`,
        availableBytes: free + CUDA_CONTEXT_BYTES,
        source: "this machine",
        spec: gpuByDeviceName(d.name, d.totalBytes)
    };
}

function verdictOf(totalBytes: number, budget: number): Verdict {
    if (totalBytes > budget) return "does not fit";
    return totalBytes > TIGHT_SHARE * budget ? "fits, tight" : "fits";
}

/** the largest value in [1, max] for which ok(value) holds, given ok is monotone (true then false); null if none */
function largestFitting(ok: (v: number) => boolean, max: number, step = 1): number | null {
    if (!ok(step)) return null;
    let lo = step,
        hi = step;
    while (hi < max && ok(Math.min(max, hi * 2))) {
        lo = Math.min(max, hi * 2);
        hi = lo;
    }
    if (lo >= max) return max;
    let bad = Math.min(max, hi * 2);
    while (bad - lo > step) {
        const mid = Math.floor((lo + bad) / 2 / step) * step;
        if (mid <= lo) break;
        if (ok(mid)) lo = mid;
        else bad = mid;
    }
    return lo;
}

/** the fastest settings that fit `budget` with headroom and keep the effective batch (a train config recipe) */
function recipeFor(
    s: TrainConfig,
    budget: number,
    spec: GpuSpec | null,
    planOf: (patch: Partial<TrainConfig>) => MemoryPlan,
    cfg: ModelConfig,
    preQuantized: boolean,
    effectiveBatch: number
): Recipe | null {
    const rateSpec = spec ?? gpuByName("h100-80gb"); // a bare size: rank the candidates by relative speed
    for (let seq = s.max_seq_length; seq >= 128; seq = Math.floor(seq / 2)) {
        for (const load_in_4bit of s.load_in_4bit || preQuantized ? [true] : [false, true]) {
            let best: Recipe | null = null;
            for (const [ckpt, offload] of [
                [false, false],
                [true, false],
                [true, true]
            ] as const) {
                for (let batch = Math.min(effectiveBatch, 64); batch >= 1; batch = batch === 1 ? 0 : Math.floor(batch / 2)) {
                    const settings = {
                        ...s,
                        load_in_4bit,
                        max_seq_length: seq,
                        per_device_train_batch_size: batch,
                        gradient_accumulation_steps: Math.max(1, Math.ceil(effectiveBatch / batch)),
                        gradient_checkpointing: ckpt,
                        gradient_checkpointing_offload: offload
                    };
                    const plan = planOf(settings);
                    if (plan.totalBytes > RECIPE_SHARE * budget) continue;
                    const speed = estimateSpeed(cfg, settings, load_in_4bit || preQuantized, rateSpec);
                    if (!best || speed.tokensPerSecond > (best.tokensPerSecond ?? 0))
                        best = {
                            settings: {
                                per_device_train_batch_size: batch,
                                gradient_accumulation_steps: settings.gradient_accumulation_steps,
                                max_seq_length: seq,
                                gradient_checkpointing: ckpt,
                                gradient_checkpointing_offload: offload,
                                load_in_4bit
                            },
                            totalBytes: plan.totalBytes,
                            tokensPerSecond: speed.tokensPerSecond,
                            changes: []
                        };
                    break; // the largest batch that fits this mode is its fastest
                }
            }
            if (best) {
                const asked: Record<string, unknown> = s;
                best.changes = Object.entries(best.settings)
                    .filter(([k, v]) => asked[k] !== v)
                    .map(([k, v]) => `${k} ${String(asked[k])} -> ${String(v)}`);
                if (!spec) best.tokensPerSecond = null;
                return best;
            }
        }
    }
    return null;
}

/** plans a training run: see TrainingPlan */
export async function planTraining(opts: PlanTrainingOptions = {}): Promise<TrainingPlan> {
    const raw = opts.config ?? {};
    const config = resolveTrainConfig({...raw}, "plan");
    const model = await resolvePlanModel(opts.model ?? config.model);
    const cfg = model.config;
    const settings = {...config};
    checkPlanInputs(settings);
    const notes: string[] = [];
    if (model.preQuantized && !config.load_in_4bit)
        notes.push("the checkpoint is 4-bit already: it trains as QLoRA whatever load_in_4bit says");
    if (model.dir && !model.weights) notes.push("no weights in the folder: planned from config.json alone");
    if (settings.max_seq_length > cfg.maxPositionEmbeddings)
        notes.push(
            `max_seq_length ${settings.max_seq_length} is longer than the model's context (max_position_embeddings ` +
                `${cfg.maxPositionEmbeddings}): qlora train refuses rows that long`
        );
    const evaluation = config.eval_dataset !== null && config.eval_strategy !== "no";
    const planOpts: MemoryPlanOptions = {evaluation, preQuantized: model.preQuantized};
    const quantized = settings.load_in_4bit || !!model.preQuantized;
    // the grid, the searches and the per-GPU table ask for the same shapes again: each is replayed once
    const plans = new Map<string, MemoryPlan>();
    const planOf = (patch: Partial<TrainConfig>) => {
        const s = {...settings, ...patch};
        const key = [
            s.per_device_train_batch_size,
            s.max_seq_length,
            s.gradient_checkpointing,
            s.gradient_checkpointing_offload,
            s.load_in_4bit
        ].join();
        let p = plans.get(key);
        if (!p) plans.set(key, (p = planDeviceMemory(cfg, s, planOpts)));
        return p;
    };
    const memory = planOf({});
    const gpu = resolvePlanGpu(opts);
    const budget = gpu?.availableBytes ?? null;
    const grid: GridCell[] = [];
    for (const seq of GRID_SEQS)
        for (const batch of GRID_BATCHES) {
            const total = planOf({per_device_train_batch_size: batch, max_seq_length: seq}).totalBytes;
            grid.push({batch, seq, totalBytes: total, fits: budget === null ? null : total <= budget});
        }
    const largestOn = (b: number) => ({
        batch: largestFitting((batch) => planOf({per_device_train_batch_size: batch}).totalBytes <= b, 4096),
        seq: largestFitting(
            (seq) => planOf({per_device_train_batch_size: 1, max_seq_length: seq}).totalBytes <= b,
            cfg.maxPositionEmbeddings,
            128
        )
    });
    const explicitBatch = "per_device_train_batch_size" in raw || "gradient_accumulation_steps" in raw;
    const effectiveBatch = explicitBatch
        ? settings.per_device_train_batch_size * settings.gradient_accumulation_steps
        : RECIPE_EFFECTIVE_BATCH;
    const host = planHostMemory(
        cfg,
        settings,
        config.device === "cpu" ? "cpu" : "cuda",
        quantLayout(settings, model.preQuantized)
    );
    const hostRam = {totalBytes: os.totalmem(), freeBytes: os.freemem()};
    if (host.bytes > hostRam.totalBytes)
        notes.push(
            `the run needs about ${(host.bytes / GiB).toFixed(1)} GiB of host RAM, more than this machine's ` +
                `${(hostRam.totalBytes / GiB).toFixed(1)} GiB` +
                (quantized ? "" : " (load_in_4bit keeps the host copy of the projections 4-bit)")
        );
    // without a GPU to answer for, the speed is an H100's
    const speedSpec = gpu ? gpu.spec : gpuByName("h100-80gb");
    return {
        model,
        settings,
        device: config.device === "cpu" ? "cpu" : "cuda",
        memory,
        gpu,
        verdict: budget === null ? null : verdictOf(memory.totalBytes, budget),
        suggestions: budget !== null && memory.totalBytes > budget ? fitSuggestions(cfg, settings, budget, planOpts) : [],
        grid,
        largest: budget === null ? null : largestOn(budget),
        speed: speedSpec ? estimateSpeed(cfg, settings, quantized, speedSpec) : null,
        host,
        hostRam,
        gpus: GPUS.map((g) => ({
            name: g.name,
            label: g.label,
            memoryBytes: g.memoryBytes,
            fits: memory.totalBytes <= g.memoryBytes,
            largestBatch: largestOn(g.memoryBytes).batch
        })),
        recipe:
            budget === null
                ? null
                : recipeFor(settings, budget, gpu?.spec ?? null, planOf, cfg, !!model.preQuantized, effectiveBatch),
        notes
    };
}

/**
 * Writes the plan's recipe as a train config (YAML, the format `qlora train CONFIG` reads): the keys given to the
 * plan with the recipe's settings over them. An existing file is never replaced.
 */
export async function writeRecipe(plan: TrainingPlan, file: string, given: Record<string, unknown> = {}): Promise<string> {
    if (!plan.recipe)
        throw new QloraError(
            plan.gpu
                ? `no settings fit ${plan.gpu.label} (even batch 1, checkpointing with offload, 4-bit, max_seq_length 128): use a larger GPU`
                : "--write-config needs a GPU to fit: pass --gpu NAME or --gpu-memory GiB"
        );
    // anything under the name (a file, a folder, a link) stays: qlora plan never replaces it
    if (
        await fs.lstat(file).then(
            () => true,
            () => false
        )
    )
        throw new QloraError("already exists; qlora plan never replaces a file: choose another path", {file});
    const keys: Record<string, unknown> = {...given, ...plan.recipe.settings};
    if (plan.model.dir) keys.model = plan.model.dir;
    else delete keys.model;
    resolveTrainConfig(keys, file); // what is written is a config qlora train accepts
    const r = plan.recipe;
    const header = [
        `# qlora plan: ${plan.model.source} on ${plan.gpu!.label}`,
        `# predicted GPU memory ${(r.totalBytes / GiB).toFixed(2)} GiB of ${(plan.gpu!.availableBytes / GiB).toFixed(2)} GiB` +
            (r.tokensPerSecond ? `, about ${Math.round(r.tokensPerSecond).toLocaleString("en-US")} tokens/s (an estimate)` : ""),
        `# effective batch ${r.settings.per_device_train_batch_size * r.settings.gradient_accumulation_steps} ` +
            `(per_device_train_batch_size x gradient_accumulation_steps)`,
        ...(plan.model.dir
            ? []
            : [`# model: the folder of a ${plan.model.source} checkpoint (a built-in architecture was planned)`]),
        `# train with: qlora train ${path.basename(file)}`
    ];
    await writeFileAtomic(file, `${header.join("\n")}\n${toYaml(keys)}`);
    return file;
}
