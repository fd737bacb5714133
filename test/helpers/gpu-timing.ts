// gpu-timing.ts: seconds per call of a GPU op, after a warm-up call, synchronizing around the timed calls.
import {cuda, CudaGraph} from "../../src/backend/cuda.js";
import type {CudaAddon} from "../../src/backend/native-types.js";

export function timeIt(k: Pick<CudaAddon, "synchronize">, fn: () => void, iters = 10): number {
    fn();
    k.synchronize();
    const t0 = performance.now();
    for (let i = 0; i < iters; i++) fn();
    k.synchronize();
    return (performance.now() - t0) / iters / 1e3;
}

/**
 * device microseconds per call of `call(i)`, i = 0 .. calls - 1: run once eagerly (lazy setup), recorded once into
 * a CUDA graph and replayed, so the host's launch pace is not in the figure
 */
export function graphMicros(call: (i: number) => void, calls: number, reps = 10): number {
    const addon = cuda();
    for (let i = 0; i < calls; i++) call(i);
    addon.synchronize();
    const graph = CudaGraph.capture(() => {
        for (let i = 0; i < calls; i++) call(i);
    });
    try {
        graph.launch();
        addon.synchronize();
        const t0 = performance.now();
        for (let r = 0; r < reps; r++) graph.launch();
        addon.synchronize();
        return ((performance.now() - t0) * 1000) / (reps * calls);
    } finally {
        graph.destroy();
    }
}
