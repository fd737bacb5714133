// native-optim-types.ts: a hand-written mirror of the optimizer ops that native/addon/cpu_optim.cpp adds to the
// CPU addon's exports (native/include/qlora_optim.h documents the math). Buffers are typed arrays of the exact
// element type, updated in place; sizes are element counts. Outputs first, sizes last.
import {loadNative} from "./native.js";

export interface OptimAddon {
    /** torch.optim.AdamW single-tensor step (decay first, then Adam); scalars are doubles like torch's */
    adamwTorchStep(
        param: Float32Array,
        expAvg: Float32Array,
        expAvgSq: Float32Array,
        grad: Float32Array,
        lr: number,
        beta1: number,
        beta2: number,
        eps: number,
        weightDecay: number,
        step: number,
        n: number
    ): void;
    /** bitsandbytes 32-bit AdamW step (Adam, then decay); scalars rounded to float32 */
    adamwBnb32Step(
        param: Float32Array,
        state1: Float32Array,
        state2: Float32Array,
        grad: Float32Array,
        lr: number,
        beta1: number,
        beta2: number,
        eps: number,
        weightDecay: number,
        step: number,
        n: number
    ): void;
    /** bitsandbytes 8-bit blockwise AdamW step; absmax1/absmax2 hold ceil(n / blocksize) scales */
    adamwBnb8Step(
        param: Float32Array,
        state1: Uint8Array,
        state2: Uint8Array,
        absmax1: Float32Array,
        absmax2: Float32Array,
        grad: Float32Array,
        qmap1: Float32Array,
        qmap2: Float32Array,
        lr: number,
        beta1: number,
        beta2: number,
        eps: number,
        weightDecay: number,
        step: number,
        blocksize: number,
        n: number
    ): void;
    /** bnb's 256-entry dynamic map (signed for the first moment, unsigned for the second) into out[256] */
    optimDynamicMap(out: Float32Array, signed: boolean): void;
    /** sum of squares accumulated in double, independent of the thread count */
    optimSumSquares(x: Float32Array, n: number): number;
    /** x *= s (float32) */
    optimScale(x: Float32Array, s: number, n: number): void;
}

export function loadOptimOps(): OptimAddon {
    return loadNative() as unknown as OptimAddon;
}
