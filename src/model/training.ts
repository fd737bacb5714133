// training.ts: the training step on the CPU: the decoder graph (graph.ts) over the CPU backend, with the host
// layers (dense / 4-bit bases, LoRA, DoRA, trained biases) and full-weight gradients for modules_to_save.
import type {Rng} from "../backend/rng.js";
import type {DecoderModel} from "./decoder.js";
import type {DecoderGraph, DropoutReplay, ForwardBackwardOptions, LossResult, TrainBatch} from "./graph.js";
import type {CpuTensors} from "../backend/cpu-backend.js";

export {checkPositionsFitContext, checkRowsFitContext, shiftTargets} from "./graph.js";
export type {ForwardBackwardOptions, LossResult, TrainBatch} from "./graph.js";

export class DecoderTrainer {
    private readonly graph: DecoderGraph<CpuTensors>;

    /**
     * `dropoutRng`: the generator the LoRA dropout masks come from; with gradient checkpointing its state is
     * replayed when a block is recomputed, so the recomputed block sees the masks of the first forward.
     */
    constructor(readonly model: DecoderModel, dropoutRng: Rng | null = null) {
        const replay: DropoutReplay | null = dropoutRng
            ? {save: () => dropoutRng.getState(), restore: (state) => dropoutRng.setState(state as number[])} : null;
        this.graph = model.hostGraph({replay, fullGrads: model.params.fullGrads});
    }

    /** runs forward (and backward unless noBackward) on one micro-batch; parameter gradients accumulate */
    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult {
        return this.graph.forwardBackward(batch, opts);
    }
}
