// training.ts: the training step on the CPU: the decoder graph (graph.ts) over the CPU backend, with the host
// layers (dense / 4-bit bases, LoRA, DoRA, trained biases) and full-weight gradients for modules_to_save.
import type {DropoutClock} from "../backend/dropout.js";
import type {DecoderModel} from "./decoder.js";
import type {DecoderGraph, ForwardBackwardOptions, LossResult, TrainBatch} from "./graph.js";
import {cpuBackend, CpuBufferPool, type CpuTensors} from "../backend/cpu-backend.js";

export {checkPositionsFitContext, checkRowsFitContext, shiftTargets} from "./graph.js";
export type {ForwardBackwardOptions, LossResult, TrainBatch} from "./graph.js";

export class DecoderTrainer {
    private readonly graph: DecoderGraph<CpuTensors>;
    /** the step's tensors, reused from one step to the next (held while the trainer is) */
    private readonly pool = new CpuBufferPool();

    /**
     * `dropoutClock`: the clock the model's LoRA layers seed their dropout masks from (applyLora's); each training
     * micro-batch advances it, so a block recomputed under gradient checkpointing draws the same masks.
     */
    constructor(
        readonly model: DecoderModel,
        private readonly dropoutClock: DropoutClock | null = null,
        options: {mlpChunkRows?: number} = {}
    ) {
        this.graph = model.hostGraph({trainFull: true, ...options});
    }

    /** runs forward (and backward unless noBackward) on one micro-batch; parameter gradients accumulate */
    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult {
        if (!opts.noBackward && this.dropoutClock) this.dropoutClock.microBatch++;
        return cpuBackend().withPool(this.pool, () => this.graph.forwardBackward(batch, opts));
    }

    /** after the optimizer updated the host tensors (DoRA's norms follow the weights) */
    afterOptimizerStep(): void {
        cpuBackend().withPool(this.pool, () => this.graph.afterUpdate());
    }
}
