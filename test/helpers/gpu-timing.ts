// gpu-timing.ts: seconds per call of a GPU op, after a warm-up call, synchronizing around the timed calls.
import type {CudaAddon} from "../../src/backend/native-types.js";

export function timeIt(k: Pick<CudaAddon, "synchronize">, fn: () => void, iters = 10): number {
    fn();
    k.synchronize();
    const t0 = performance.now();
    for (let i = 0; i < iters; i++) fn();
    k.synchronize();
    return (performance.now() - t0) / iters / 1e3;
}
