// engine.ts: where a training step runs. The trainer's loop is the same on both devices; an engine owns the
// step's compute (forward/backward), the gradients, clipping and the optimizer.
import {QloraError} from "../errors.js";
import type {LoraModel} from "../peft/inject.js";
import type {DecoderModel} from "../model/decoder.js";
import {CudaModel} from "../model/cuda-model.js";
import {CudaAdamW} from "../optim/cuda-adamw.js";
import {DecoderTrainer, type ForwardBackwardOptions, type LossResult, type TrainBatch} from "../model/training.js";
import {
    createOptimizer,
    optimizerDynamicMaps,
    optimizerOptionsFor,
    weightDecayFor,
    type AdamW,
    type OptimizerArgs,
    type OptimizerStateDict
} from "../optim/adamw.js";
import {clipGradNorm} from "../optim/clip.js";
import type {DropoutClock} from "../backend/dropout.js";

export interface TrainEngine {
    readonly device: "cpu" | "cuda";
    readonly computeDtype: string;
    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult;
    zeroGrad(): void;
    /** the gradient norm before clipping */
    clipGradNorm(maxNorm: number): number;
    optimizerStep(lr: number): void;
    /** makes the host trainable tensors (and with `withGrads` their gradients) current: before saving an adapter */
    syncToHost(withGrads?: boolean): void;
    optimizerState(): OptimizerStateDict;
    loadOptimizerState(state: OptimizerStateDict): void;
    /** training micro-batches done so far (the dropout masks derive from it; set on resume) */
    setMicroBatchIndex(n: number): void;
    /** the trainable tensors' gradients in host memory, which a data-parallel run sums over the ranks; null where
     * they live on the device */
    hostGradients(): {name: string; grad: Float32Array}[] | null;
    // memory is measured by memory.ts's memoryReport(device), for every caller alike
}

/**
 * fp16, bf16 and bnb_4bit_compute_dtype are TrainingArguments / BitsAndBytesConfig keys users carry over from the
 * Python recipe; what each engine can honour is checked here so none is silently ignored. The GPU engine computes
 * in bf16 (fp32 accumulation, fp32 LoRA masters); fp16 compute with loss scaling is not implemented. The CPU
 * engine computes in fp32, more precise than any setting asks for (the start line says so).
 */
export function checkComputeDtype(
    device: "cpu" | "cuda",
    cfg: {fp16: boolean; bf16: boolean; bnb_4bit_compute_dtype: string; load_in_4bit: boolean}
): void {
    if (cfg.fp16 && cfg.bf16) throw new QloraError("fp16 and bf16 are both true; choose one (qlora computes in bf16 on the GPU)");
    if (cfg.fp16 || (cfg.load_in_4bit && cfg.bnb_4bit_compute_dtype === "float16"))
        throw new QloraError(
            `${cfg.fp16 ? "fp16: true" : "bnb_4bit_compute_dtype: float16"} asks for fp16 compute, which qlora ` +
                "does not implement (every GPU it runs on, compute capability 8.0+, has bf16: the seed recipe's choice); " +
                `set ${cfg.fp16 ? "fp16: false, bf16: true" : "bnb_4bit_compute_dtype: bfloat16"}`
        );
    if (device === "cuda" && !cfg.bf16)
        throw new QloraError(
            "bf16: false asks for fp32 compute on the GPU, which qlora does not implement (it computes in " +
                "bf16 with fp32 accumulation and fp32 LoRA weights); set bf16: true, or --device cpu for fp32 compute"
        );
    if (device === "cuda" && cfg.load_in_4bit && cfg.bnb_4bit_compute_dtype === "float32")
        throw new QloraError(
            "bnb_4bit_compute_dtype: float32 is not implemented on the GPU (qlora computes in bf16 there); " +
                "set bnb_4bit_compute_dtype: bfloat16, or --device cpu for fp32 compute"
        );
}

/** `offloadActivations`: offloaded gradient checkpointing on the GPU (on the CPU the block inputs are host memory already) */
export function createEngine(
    device: "cpu" | "cuda",
    model: DecoderModel,
    lora: LoraModel,
    optim: string,
    args: OptimizerArgs,
    dropoutClock: DropoutClock,
    offloadActivations = false
): TrainEngine {
    return device === "cuda"
        ? new CudaEngine(model, lora, optim, args, dropoutClock, offloadActivations)
        : new CpuEngine(model, lora, optim, args, dropoutClock);
}

class CpuEngine implements TrainEngine {
    readonly device = "cpu" as const;
    readonly computeDtype = "float32";
    private readonly trainer: DecoderTrainer;
    private readonly optimizer: AdamW;
    private readonly grads: Float32Array[];
    private readonly names: string[];

    constructor(
        model: DecoderModel,
        private readonly lora: LoraModel,
        optim: string,
        args: OptimizerArgs,
        private readonly dropoutClock: DropoutClock
    ) {
        this.trainer = new DecoderTrainer(model, dropoutClock);
        const tensors = lora.trainableTensors();
        this.optimizer = createOptimizer(
            optim,
            tensors.map((t) => ({
                name: t.name,
                param: t.param,
                grad: t.grad,
                weightDecay: t.decay && weightDecayFor(t.name),
                fp32State: t.fp32State
            })),
            args
        );
        this.grads = tensors.map((t) => t.grad);
        this.names = tensors.map((t) => t.name);
    }

    hostGradients(): {name: string; grad: Float32Array}[] {
        return this.grads.map((grad, i) => ({name: this.names[i], grad}));
    }

    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult {
        return this.trainer.forwardBackward(batch, opts);
    }
    zeroGrad(): void {
        this.lora.zeroGrad();
    }
    clipGradNorm(maxNorm: number): number {
        return clipGradNorm(this.grads, maxNorm);
    }
    optimizerStep(lr: number): void {
        this.optimizer.step(lr);
        this.trainer.afterOptimizerStep();
    }
    syncToHost(): void {}
    setMicroBatchIndex(n: number): void {
        this.dropoutClock.microBatch = n;
    }
    optimizerState(): OptimizerStateDict {
        return this.optimizer.stateDict();
    }
    loadOptimizerState(state: OptimizerStateDict): void {
        this.optimizer.loadStateDict(state);
    }
}

class CudaEngine implements TrainEngine {
    readonly device = "cuda" as const;
    readonly computeDtype = "bfloat16";
    private readonly trainer: CudaModel;
    private readonly optimizer: CudaAdamW;

    constructor(
        model: DecoderModel,
        lora: LoraModel,
        optim: string,
        args: OptimizerArgs,
        private readonly dropoutClock: DropoutClock,
        offloadActivations: boolean
    ) {
        this.trainer = new CudaModel(model, dropoutClock, offloadActivations);
        const names = new Set(lora.trainableTensors().map((t) => t.name));
        const device = this.trainer.deviceTensors();
        if (device.length !== names.size || device.some((t) => !names.has(t.name)))
            throw new Error("the device tensors do not match the LoRA model's trainable tensors");
        const o = optimizerOptionsFor(optim, args);
        this.optimizer = new CudaAdamW(
            device.map((t) => ({...t, decay: t.decay && weightDecayFor(t.name)})),
            o,
            optimizerDynamicMaps()
        );
    }

    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult {
        return this.trainer.forwardBackward(batch, opts);
    }
    zeroGrad(): void {
        this.trainer.zeroGrad();
    }
    clipGradNorm(maxNorm: number): number {
        return this.optimizer.clipGradNorm(maxNorm);
    }
    optimizerStep(lr: number): void {
        this.optimizer.step(lr);
        this.trainer.afterOptimizerStep();
    }
    syncToHost(withGrads = false): void {
        this.trainer.syncToHost(withGrads);
    }
    hostGradients(): null {
        return null;
    }
    setMicroBatchIndex(n: number): void {
        this.dropoutClock.microBatch = n;
    }
    optimizerState(): OptimizerStateDict {
        return this.optimizer.stateDict();
    }
    loadOptimizerState(state: OptimizerStateDict): void {
        this.optimizer.loadStateDict(state);
    }
}
