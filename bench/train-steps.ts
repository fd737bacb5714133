// train-steps.ts: the training step the benchmarks time (bench/gpu.ts, bench/plan-check.ts), written once: a model
// folder loaded as QLoRA (NF4 + double quant) or bf16 LoRA, r=16 alpha 32 dropout 0.05 on all 7 projections, the
// trainer's engine (paged_adamw_8bit for QLoRA, adamw_torch for LoRA), random token batches, warm-up steps, then
// timed steps (forward + backward, clipping, optimizer), and the caching allocator's peak.
import {performance} from "node:perf_hooks";
import {benchmarkSettings, type Checkpointing} from "../src/api/plan-gpus.js";
import {cuda, cudaMemoryStats} from "../src/backend/cuda.js";
import {type Profile, profileCuda} from "../src/backend/cuda-profile.js";
import {DropoutClock} from "../src/backend/dropout.js";
import {Rng} from "../src/backend/rng.js";
import {DecoderModel} from "../src/model/decoder.js";
import type {TrainBatch} from "../src/model/graph.js";
import {applyLora} from "../src/peft/inject.js";
import {bitsAndBytesConfig} from "../src/quant/config.js";
import {createEngine, type TrainEngine} from "../src/train/engine.js";

export type TrainMode = "qlora" | "lora";

/** the optimizer each mode trains with (the seed recipe's, and peft's usual one for bf16 LoRA) */
export const MODE_OPTIM: Record<TrainMode, string> = {qlora: "paged_adamw_8bit", lora: "adamw_torch"};

export type {Checkpointing};

/** the train settings of a benchmark step (what `qlora plan` is asked about it) */
export const benchSettings = (mode: TrainMode, batch: number, seq: number, ckpt: Checkpointing) =>
    benchmarkSettings(batch, seq, ckpt, {load_in_4bit: mode === "qlora", optim: MODE_OPTIM[mode]});

/** a model with its LoRA adapter and an engine on `device`, as the trainer builds them */
export interface TrainSetup {
    engine: TrainEngine;
    vocabSize: number;
    loadSeconds: number;
    /** the allocator's bytes in use before the engine was made (what earlier setups of the process left) */
    allocatedBefore: number;
}

export async function setupTraining(
    modelDir: string,
    mode: TrainMode,
    opts: {device?: "cuda" | "cpu"; offload?: boolean} = {}
): Promise<TrainSetup> {
    const device = opts.device ?? "cuda";
    const t0 = performance.now();
    const model = await DecoderModel.load(modelDir, {
        quantization:
            mode === "qlora"
                ? bitsAndBytesConfig({
                      load_in_4bit: true,
                      bnb_4bit_quant_type: "nf4",
                      bnb_4bit_use_double_quant: true,
                      bnb_4bit_compute_dtype: device === "cuda" ? "bfloat16" : "float32"
                  })
                : null
    });
    // the dropout masks are seeded from the run's micro-batch clock, as the trainer seeds them
    const dropoutClock = new DropoutClock(0);
    const lora = applyLora(
        model,
        {r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: "all-linear"},
        {initRng: new Rng(0), dropoutClock}
    );
    let allocatedBefore = 0;
    if (device === "cuda") {
        cuda().emptyCache();
        cuda().resetPeakMemoryStats();
        allocatedBefore = cudaMemoryStats().allocated;
    }
    const engine = createEngine(device, model, lora, MODE_OPTIM[mode], {}, dropoutClock, opts.offload ?? false);
    return {engine, vocabSize: model.config.vocabSize, loadSeconds: (performance.now() - t0) / 1000, allocatedBefore};
}

/** random full rows (no padding), the labels the inputs themselves */
export function randomBatches(count: number, batch: number, seq: number, vocabSize: number, seed = 1): TrainBatch[] {
    const rng = new Rng(seed),
        N = batch * seq;
    return Array.from({length: count}, () => {
        const ids = Int32Array.from({length: N}, () => rng.int(vocabSize));
        return {
            B: batch,
            T: seq,
            inputIds: ids,
            labels: ids,
            attentionMask: null,
            positionIds: Int32Array.from({length: N}, (_, i) => i % seq),
            segIds: null
        };
    });
}

export interface StepTiming {
    tokensPerSecond: number;
    samplesPerSecond: number;
    stepMs: number;
    /** the allocator's peak during the steps, less what was allocated before the engine (GPU), bytes */
    peakBytes: number | null;
    lossFirst: number;
    lossLast: number;
}

/** `warmup` then `steps` timed optimizer steps of batch x seq random tokens */
export function timeSteps(
    setup: TrainSetup,
    o: {batch: number; seq: number; steps: number; warmup: number; gradientCheckpointing: boolean}
): StepTiming {
    const {engine} = setup;
    const onGpu = engine.device === "cuda";
    const sync = () => {
        if (onGpu) cuda().synchronize();
    };
    const batches = randomBatches(4, o.batch, o.seq, setup.vocabSize);
    const N = o.batch * o.seq;
    if (onGpu) {
        sync();
        cuda().resetPeakMemoryStats();
    }
    let t1 = performance.now();
    const losses: number[] = [];
    for (let i = 0; i < o.warmup + o.steps; i++) {
        if (i === o.warmup) {
            sync();
            t1 = performance.now();
        }
        const r = trainStep(engine, batches[i % batches.length], o);
        losses.push(r.lossSum / r.targets);
    }
    sync();
    const dt = (performance.now() - t1) / 1000;
    return {
        tokensPerSecond: (o.steps * N) / dt,
        samplesPerSecond: (o.steps * o.batch) / dt,
        stepMs: (1000 * dt) / o.steps,
        peakBytes: onGpu ? cudaMemoryStats().peakAllocated - setup.allocatedBefore : null,
        lossFirst: losses[0],
        lossLast: losses[losses.length - 1]
    };
}

/** one step as the benchmarks run it: forward + backward, clipping, the optimizer */
function trainStep(engine: TrainEngine, batch: TrainBatch, o: {batch: number; seq: number; gradientCheckpointing: boolean}) {
    engine.zeroGrad();
    const r = engine.forwardBackward(batch, {
        lossScale: 1 / (o.batch * o.seq - o.batch),
        gradientCheckpointing: o.gradientCheckpointing
    });
    engine.clipGradNorm(0);
    engine.optimizerStep(2e-4);
    return r;
}

/** one more step timed op by op on the GPU (src/backend/cuda-profile.ts; after timeSteps, so nothing is cold) */
export function profileStep(setup: TrainSetup, o: {batch: number; seq: number; gradientCheckpointing: boolean}): Profile {
    const [batch] = randomBatches(1, o.batch, o.seq, setup.vocabSize, 7);
    cuda().synchronize();
    // a 7B step queues about 10,000 ops: the hold must outlast the host's queuing of the work before the first wait
    return profileCuda(() => trainStep(setup.engine, batch, o), {holdUs: 1_000_000}).profile;
}
