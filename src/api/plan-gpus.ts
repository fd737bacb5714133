// plan-gpus.ts: the GPUs `qlora plan --gpu NAME` knows, and the tokens/s estimate: the measured rates of this
// project on an H100-class GPU (README's benchmark), scaled by the work of a step (FLOPs, 4-bit dequantization
// traffic, a fixed cost per block) and by the GPU's bf16 dense rate and memory bandwidth. An estimate, labelled so.
import {QloraError} from "../errors.js";
import type {ModelConfig} from "../io/hf-config.js";
import {projNames, projShape} from "../model/weights.js";
import {resolveTrainConfig} from "../train/config.js";
import {GiB, type MemorySettings} from "../train/plan-memory.js";
import {requireArchitecture} from "./plan-architectures.js";

export interface GpuSpec {
    /** the name --gpu takes */
    name: string;
    label: string;
    /** the memory the driver reports for the card (a little under the marketed GB) */
    memoryBytes: number;
    /** bf16 tensor-core rate with fp32 accumulation, dense (no sparsity), TFLOP/s */
    bf16Tflops: number;
    /** memory bandwidth, GB/s */
    bandwidthGBs: number;
    computeCapability: number;
}

const gib = (x: number) => Math.round(x * GiB);

export const GPUS: readonly GpuSpec[] = [
    {
        name: "rtx3060-12gb",
        label: "RTX 3060 12 GB",
        memoryBytes: gib(11.76),
        bf16Tflops: 25.4,
        bandwidthGBs: 360,
        computeCapability: 8.6
    },
    {
        name: "rtx4090-24gb",
        label: "RTX 4090 24 GB",
        memoryBytes: gib(23.99),
        bf16Tflops: 165.2,
        bandwidthGBs: 1008,
        computeCapability: 8.9
    },
    {name: "l4-24gb", label: "L4 24 GB", memoryBytes: gib(22.49), bf16Tflops: 121, bandwidthGBs: 300, computeCapability: 8.9},
    {
        name: "a100-40gb",
        label: "A100 40 GB",
        memoryBytes: gib(39.39),
        bf16Tflops: 312,
        bandwidthGBs: 1555,
        computeCapability: 8.0
    },
    {
        name: "a100-80gb",
        label: "A100 80 GB",
        memoryBytes: gib(79.25),
        bf16Tflops: 312,
        bandwidthGBs: 2039,
        computeCapability: 8.0
    },
    {
        name: "h100-80gb",
        label: "H100 80 GB (SXM)",
        memoryBytes: gib(79.19),
        bf16Tflops: 989,
        bandwidthGBs: 3350,
        computeCapability: 9.0
    },
    {
        name: "h200-141gb",
        label: "H200 141 GB",
        memoryBytes: gib(139.8),
        bf16Tflops: 989,
        bandwidthGBs: 4800,
        computeCapability: 9.0
    }
];

/** the spec of a --gpu name */
export function gpuByName(name: string): GpuSpec {
    const key = name.toLowerCase();
    const gpu = GPUS.find((g) => g.name === key);
    if (!gpu)
        throw new QloraError(
            `unknown GPU "${name}"; known: ${GPUS.map((g) => g.name).join(", ")} (or give its memory with --gpu-memory GiB)`
        );
    return gpu;
}

/** the table's entry for a device name the driver reports ("NVIDIA H100 80GB HBM3"), when there is one */
export function gpuByDeviceName(deviceName: string, totalBytes: number): GpuSpec | null {
    const n = deviceName.toLowerCase();
    const family = (["rtx 3060", "rtx 4090", "l4", "a100", "h100", "h200"] as const).find((f) =>
        f === "l4" ? /\bl4\b/.test(n) : n.includes(f)
    );
    if (!family) return null;
    const key = family.replace(" ", "");
    // A100 40 GB and 80 GB: the nearer memory size
    const candidates = GPUS.filter((g) => g.name.startsWith(key));
    return candidates.reduce<GpuSpec | null>(
        (best, g) => (best === null || Math.abs(g.memoryBytes - totalBytes) < Math.abs(best.memoryBytes - totalBytes) ? g : best),
        null
    );
}

/**
 * The project's measured training rates: `npm run bench:plan` on an H100 80GB HBM3 (random-weight Qwen2
 * architectures, r 16 alpha 32 on all 7 projections, paged_adamw_8bit for QLoRA and adamw_torch for LoRA, 3 timed
 * steps after 1 warm-up), [architecture, 4-bit base, batch x length, gradient checkpointing (on, off or offloaded),
 * tokens/s]. The step-time model below is fitted to all of them. The 7B rows are one run of this session's code
 * (docs/PLAN.md); the offloaded rows are of the copies on their own stream (native/cuda/offload.cpp).
 */
export type Checkpointing = "on" | "off" | "offload";
export const MEASURED_RUNS: readonly (readonly [string, boolean, string, Checkpointing, number])[] = [
    ["qwen2-0.5b", true, "1x512", "on", 11948],
    ["qwen2-0.5b", true, "4x512", "on", 45759],
    ["qwen2-0.5b", true, "1x4096", "on", 46416],
    ["qwen2-0.5b", true, "1x16384", "on", 34274],
    ["qwen2-0.5b", true, "1x512", "off", 19865],
    ["qwen2-0.5b", true, "4x512", "off", 62986],
    ["qwen2-0.5b", true, "1x4096", "off", 61954],
    ["qwen2-0.5b", true, "1x16384", "off", 44904],
    ["qwen2-0.5b", false, "1x512", "on", 16378],
    ["qwen2-0.5b", false, "4x512", "on", 49680],
    ["qwen2-0.5b", false, "1x4096", "on", 48079],
    ["qwen2-0.5b", false, "1x16384", "on", 34527],
    ["qwen2-0.5b", false, "1x512", "off", 23728],
    ["qwen2-0.5b", false, "4x512", "off", 66600],
    ["qwen2-0.5b", false, "1x4096", "off", 60470],
    ["qwen2-0.5b", false, "1x16384", "off", 45439],
    ["qwen2-1.5b", true, "1x512", "on", 11347],
    ["qwen2-1.5b", true, "4x512", "on", 24865],
    ["qwen2-1.5b", true, "1x4096", "on", 22597],
    ["qwen2-1.5b", true, "1x16384", "on", 17164],
    // ["qwen2-1.5b", true, "1x512", "off", 9059] is left out: a timing outlier of a 3-step run, slower than the same
    // run with checkpointing on (11,347), where every other pair is 1.3 to 1.9 times faster without checkpointing
    ["qwen2-1.5b", true, "4x512", "off", 32413],
    ["qwen2-1.5b", true, "1x4096", "off", 30932],
    ["qwen2-1.5b", true, "1x16384", "off", 22684],
    ["qwen2-1.5b", false, "1x512", "on", 9808],
    ["qwen2-1.5b", false, "4x512", "on", 23679],
    ["qwen2-1.5b", false, "1x4096", "on", 23573],
    ["qwen2-1.5b", false, "1x16384", "on", 17228],
    ["qwen2-1.5b", false, "1x512", "off", 14617],
    ["qwen2-1.5b", false, "4x512", "off", 34944],
    ["qwen2-1.5b", false, "1x4096", "off", 31403],
    ["qwen2-1.5b", false, "1x16384", "off", 22750],
    ["qwen2-7b", true, "1x512", "on", 5772],
    ["qwen2-7b", true, "4x512", "on", 9002],
    ["qwen2-7b", true, "1x4096", "on", 8407],
    ["qwen2-7b", true, "1x16384", "on", 6063],
    ["qwen2-7b", true, "1x512", "off", 8231],
    ["qwen2-7b", true, "4x512", "off", 12798],
    ["qwen2-7b", true, "1x4096", "off", 11651],
    ["qwen2-7b", true, "1x16384", "off", 8212],
    ["qwen2-7b", false, "1x512", "on", 7353],
    ["qwen2-7b", false, "4x512", "on", 9756],
    ["qwen2-7b", false, "1x4096", "on", 8662],
    ["qwen2-7b", false, "1x16384", "on", 6084],
    ["qwen2-7b", false, "1x512", "off", 9833],
    ["qwen2-7b", false, "4x512", "off", 13543],
    ["qwen2-7b", false, "1x4096", "off", 12024],
    // 7B LoRA 1x16384 without checkpointing needs 85 GiB: not run
    ["qwen2-0.5b", true, "1x512", "offload", 11229],
    ["qwen2-0.5b", true, "4x512", "offload", 44603],
    ["qwen2-0.5b", true, "1x4096", "offload", 45722],
    ["qwen2-0.5b", true, "1x16384", "offload", 33841],
    ["qwen2-0.5b", false, "1x512", "offload", 12557],
    ["qwen2-0.5b", false, "4x512", "offload", 46762],
    ["qwen2-0.5b", false, "1x4096", "offload", 47355],
    ["qwen2-0.5b", false, "1x16384", "offload", 33977],
    ["qwen2-1.5b", true, "1x512", "offload", 9955],
    ["qwen2-1.5b", true, "4x512", "offload", 24072],
    ["qwen2-1.5b", true, "1x4096", "offload", 22455],
    ["qwen2-1.5b", true, "1x16384", "offload", 16697],
    ["qwen2-1.5b", false, "1x512", "offload", 11311],
    ["qwen2-1.5b", false, "4x512", "offload", 26214],
    ["qwen2-1.5b", false, "1x4096", "offload", 23468],
    ["qwen2-1.5b", false, "1x16384", "offload", 16791],
    ["qwen2-7b", true, "1x512", "offload", 5887],
    ["qwen2-7b", true, "4x512", "offload", 8951],
    ["qwen2-7b", true, "1x4096", "offload", 8259],
    ["qwen2-7b", true, "1x16384", "offload", 5950],
    ["qwen2-7b", false, "1x512", "offload", 7729],
    ["qwen2-7b", false, "4x512", "offload", 9703],
    ["qwen2-7b", false, "1x4096", "offload", 8506],
    ["qwen2-7b", false, "1x16384", "offload", 5985]
];

/** the work of one micro-batch: the terms of the step-time model */
export interface StepWork {
    /** FLOPs of the GEMMs (frozen projections, LoRA, lm_head) */
    gemmFlops: number;
    /** FLOPs of the attention kernels (slower per FLOP than GEMMs: softmax, masking, the causal triangle) */
    attentionFlops: number;
    /** bytes the 4-bit dequantization moves */
    dequantBytes: number;
    /** block passes (each a fixed number of kernel launches and host calls) */
    blockPasses: number;
    /** activation elements the memory-bound kernels (norms, RoPE, SwiGLU, residuals, dropout) touch */
    elementwise: number;
    /** bytes copied to host memory and back (offloaded checkpointing) */
    offloadBytes: number;
    tokens: number;
}

/** the work of a training micro-batch of batch x seq tokens (every row full) */
export function stepWork(cfg: ModelConfig, s: MemorySettings, quantized: boolean): StepWork {
    const B = s.per_device_train_batch_size,
        T = s.max_seq_length,
        tokens = B * T;
    const ckpt = s.gradient_checkpointing;
    // forward, the backward's input gradient, and the forward again when the block is recomputed (frozen weights
    // get no weight gradient)
    const passes = ckpt ? 3 : 2;
    let projWeights = 0,
        loraWeights = 0;
    for (const p of projNames(cfg)) {
        const [out, inF] = projShape(cfg, p);
        projWeights += out * inF;
        loraWeights += s.r * (out + inF);
    }
    const L = cfg.numHiddenLayers;
    const projFlops = 2 * projWeights * L * passes;
    // LoRA: the forward's two thin GEMMs per pass, four in the backward (upper bound: all 7 projections)
    const loraFlops = 2 * loraWeights * L * (passes - 1 + 2);
    // lm_head: the forward and the input gradient (the loss is not recomputed)
    const headFlops = 4 * cfg.vocabSize * cfg.hiddenSize;
    // causal attention, T/2 keys per query on average: forward 2 GEMMs, backward about 2.5 times the forward
    const attnForward = 2 * 2 * (T / 2) * cfg.numAttentionHeads * cfg.headDim;
    const attnFlops = attnForward * L * (passes - 1 + 2.5);
    // each pass dequantizes every projection once: 0.5 byte read + 2 bytes written a weight
    const dequantBytes = quantized ? projWeights * L * passes * 2.5 : 0;
    const offloadBytes = ckpt && s.gradient_checkpointing_offload ? 2 * 2 * tokens * cfg.hiddenSize * L : 0;
    return {
        gemmFlops: (projFlops + loraFlops + headFlops) * tokens,
        attentionFlops: attnFlops * tokens,
        dequantBytes,
        blockPasses: L * passes,
        elementwise: tokens * (cfg.hiddenSize + cfg.intermediateSize) * L * passes,
        offloadBytes,
        tokens
    };
}

/** seconds per unit of each term of StepWork on the reference GPU (H100 SXM), fitted to MEASURED_RUNS */
type SpeedModel = [gemm: number, attention: number, dequant: number, block: number, elementwise: number, offload: number];

const terms = (w: StepWork): SpeedModel => [
    w.gemmFlops,
    w.attentionFlops,
    w.dequantBytes,
    w.blockPasses,
    w.elementwise,
    w.offloadBytes
];

/** the benchmark's settings (README): r 16, all 7 projections, batch 4 x 512, gradient checkpointing */
export const BENCHMARK_SETTINGS = {
    r: 16,
    lora_alpha: 32,
    lora_dropout: 0.05,
    target_modules: "all-linear",
    per_device_train_batch_size: 4,
    max_seq_length: 512,
    gradient_checkpointing: true
} as const;

/** the settings of a MEASURED_RUNS row */
export function measuredRunSettings(shape: string, checkpointing: Checkpointing): MemorySettings {
    const [B, T] = shape.split("x").map(Number);
    return benchmarkSettings(B, T, checkpointing);
}

/** the benchmark's settings at another batch x length and checkpointing, with any other train keys over them */
export function benchmarkSettings(
    batch: number,
    seq: number,
    checkpointing: Checkpointing,
    keys: Record<string, unknown> = {}
): MemorySettings {
    return resolveTrainConfig({
        ...BENCHMARK_SETTINGS,
        per_device_train_batch_size: batch,
        max_seq_length: seq,
        gradient_checkpointing: checkpointing !== "off",
        gradient_checkpointing_offload: checkpointing === "offload",
        ...keys
    });
}

/** non-negative weighted least squares of rows x·c = y: a term whose cost would come out negative is dropped */
function nonNegativeFit(rows: {x: number[]; y: number}[], weights: number[], terms: number[]): number[] {
    let active = terms;
    for (;;) {
        const n = active.length;
        // normal equations A^T W A c = A^T W y over the active terms
        const m = Array.from({length: n}, (_, i) =>
            Array.from({length: n + 1}, (_, j) =>
                rows.reduce((sum, r, k) => sum + weights[k] * r.x[active[i]] * (j < n ? r.x[active[j]] : r.y), 0)
            )
        );
        for (let c = 0; c < n; c++) {
            const p = m.slice(c).reduce((best, row, k) => (Math.abs(row[c]) > Math.abs(m[best][c]) ? c + k : best), c);
            [m[c], m[p]] = [m[p], m[c]];
            for (let r = 0; r < n; r++)
                if (r !== c) {
                    const f = m[r][c] / m[c][c];
                    for (let k = c; k <= n; k++) m[r][k] -= f * m[c][k];
                }
        }
        const cost = m.map((row, i) => row[n] / row[i]);
        const negative = cost.findIndex((c) => c < 0);
        if (negative < 0) {
            const model = terms.map(() => 0);
            active.forEach((t, i) => {
                model[terms.indexOf(t)] = cost[i];
            });
            return model;
        }
        active = active.filter((_, i) => i !== negative);
    }
}

/**
 * Fits the step-time model to MEASURED_RUNS: seconds = Σ cost_i · term_i on the relative error (each run's
 * equation divided by its measured seconds), the costs kept >= 0, the largest error made small rather than the
 * sum of squares (Lawson's reweighting of least squares toward the minimax fit: a few short runs of small models
 * must not be given up for the many that a least-squares fit already matches)
 */
function fitSpeedModel(): SpeedModel {
    const rows = MEASURED_RUNS.map(([arch, quantized, shape, ckpt, rate]) => {
        const w = stepWork(requireArchitecture(arch), measuredRunSettings(shape, ckpt), quantized);
        const seconds = w.tokens / rate;
        return {x: terms(w).map((t) => t / seconds), y: 1};
    });
    // a term no run exercises has no cost to fit
    const used = [0, 1, 2, 3, 4, 5].filter((t) => rows.some((r) => r.x[t] > 0));
    let weights = rows.map(() => 1 / rows.length);
    let best: {cost: number[]; worst: number} | null = null;
    for (let iteration = 0; iteration < 50; iteration++) {
        const cost = nonNegativeFit(rows, weights, used);
        const errors = rows.map((r) => Math.abs(used.reduce((sum, t, i) => sum + r.x[t] * cost[i], 0) - r.y));
        const worst = Math.max(...errors);
        if (!best || worst < best.worst) best = {cost, worst};
        const total = weights.reduce((sum, w, k) => sum + w * errors[k], 0);
        if (!(total > 0)) break;
        weights = weights.map((w, k) => (w * errors[k]) / total);
    }
    const model: SpeedModel = [0, 0, 0, 0, 0, 0];
    used.forEach((t, i) => {
        model[t] = best!.cost[i];
    });
    return model;
}

let fitted: SpeedModel | null = null;

export interface SpeedEstimate {
    tokensPerSecond: number;
    /** seconds of one micro-batch */
    stepSeconds: number;
    gpu: string;
    basis: string;
}

/** estimated training tokens/s of a run on `gpu` (the step-time model is fitted once, on first use) */
export function estimateSpeed(cfg: ModelConfig, s: MemorySettings, quantized: boolean, gpu: GpuSpec): SpeedEstimate {
    fitted ??= fitSpeedModel();
    const ref = gpuByName("h100-80gb");
    const w = stepWork(cfg, s, quantized);
    const [gemm, attention, dequant, block, elementwise, offload] = terms(w).map((t, i) => t * fitted![i]);
    // other GPUs: compute scales with the bf16 rate, memory traffic with the bandwidth; launch costs stay
    const compute = ref.bf16Tflops / gpu.bf16Tflops,
        memory = ref.bandwidthGBs / gpu.bandwidthGBs;
    // the offload term: what the copies to host and back add beside the compute they overlap (host-bound, kept)
    const seconds = (gemm + attention) * compute + (dequant + elementwise) * memory + block + offload;
    return {
        tokensPerSecond: w.tokens / seconds,
        stepSeconds: seconds,
        gpu: gpu.label,
        basis:
            `estimate: a step-time model (GEMM and attention FLOPs, dequantization and element-wise traffic, launches per ` +
            `block, offloaded bytes) fitted to ${MEASURED_RUNS.length} training runs measured on an H100 (Qwen2 0.5B to 7B, QLoRA and LoRA, ` +
            `512 to 16,384 tokens), scaled by the GPU's bf16 rate (${gpu.bf16Tflops} TFLOP/s) and bandwidth ` +
            `(${gpu.bandwidthGBs} GB/s)`
    };
}
