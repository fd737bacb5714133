// dropout.ts: where LoRA's dropout masks come from, on every backend. A mask is a pure function of a seed and
// the element index (native/include/qlora_dropout.h); the seed names the run, the training micro-batch and the
// projection. So the CPU and the GPU draw the same masks, a block recomputed under gradient checkpointing
// regenerates them, and a resumed run needs only the micro-batch count to continue the sequence exactly.

/** the micro-batch counter of a training run; every LoRA layer of the run reads its seeds from one clock */
export class DropoutClock {
    /** training micro-batches started so far (evaluation passes do not count); set on resume */
    microBatch = 0;
    /**
     * token rows of the micro-batch's [rows, T] layout before this process's first row: a rank of a data-parallel
     * run draws its rows' masks where they sit in the global micro-batch, so N ranks draw one process's masks
     */
    rowOffset = 0;

    constructor(readonly runSeed: number) {}

    /** the mask seed of projection `projection` in the current micro-batch (an integer < 2^53) */
    seedFor(projection: number): number {
        return (
            (((this.runSeed % 1024) + 1024) % 1024) * 2 ** 40 + (this.microBatch % 2 ** 24) * 2 ** 16 + (projection % 2 ** 16) + 1
        );
    }
}
