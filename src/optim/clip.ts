// clip.ts: gradient clipping by the global L2 norm, as torch.nn.utils.clip_grad_norm_ (SPEC-training.md §11).
import {QloraError} from "../errors.js";
import {loadOptimOps} from "../backend/native-optim-types.js";

/** the L2 norm over all gradients together (sums of squares in double, in an order fixed by the data) */
export function gradNorm(grads: readonly Float32Array[]): number {
    const ops = loadOptimOps();
    let sum = 0;
    for (const g of grads) sum += ops.optimSumSquares(g, g.length);
    return Math.sqrt(sum);
}

/**
 * Scales every gradient in place by coef = maxNorm / (norm + 1e-6) when coef < 1 (torch clip_grad_norm_;
 * coef is rounded to float32 as torch computes it on float32 tensors) and returns the norm before clipping,
 * the `grad_norm` transformers logs. maxNorm 0 (or less) disables clipping; the norm is still returned.
 * A non-finite norm leaves the gradients as they are (coef < 1 is false for NaN).
 */
export function clipGradNorm(grads: readonly Float32Array[], maxNorm: number): number {
    if (!Number.isFinite(maxNorm)) throw new QloraError(`expected a finite number, got ${maxNorm}`, {file: "max_grad_norm"});
    const norm = gradNorm(grads);
    if (maxNorm <= 0) return norm;
    const coef = Math.fround(maxNorm / Math.fround(Math.fround(norm) + 1e-6));
    if (coef < 1) {
        const ops = loadOptimOps();
        for (const g of grads) ops.optimScale(g, coef, g.length);
    }
    return norm;
}
