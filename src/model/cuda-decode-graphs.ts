// cuda-decode-graphs.ts: decoding steps replayed as CUDA graphs. A decoding step (one new token for each of B
// cache rows) queues about 30 kernels per layer; launched one by one from JavaScript, the host sets the pace (a
// 7B model decoded at batch 1 used a sixth of the GPU's memory bandwidth). The graph's own decoder forward
// (DecoderGraph.forwardStep) is recorded once per (cache, rows) and replayed: the step's inputs (token ids,
// positions, each row's cache length and block table) live in one device buffer written before each launch, the
// attention and the cache write read the lengths and blocks from it, and the final hidden states land in the
// same buffer every time.
// Choosing the tokens (logits GEMM, sampling) stays outside: its settings change from step to step.
import {CudaGraph, DeviceBuffer} from "../backend/cuda.js";
import {cudaBackend, type CudaTensors} from "../backend/cuda-backend.js";
import {type DecoderGraph, type KVCache, type StepInputs, type StepPlan, stepIndices, stepInputViews} from "./graph.js";

interface Recorded {
    graph: CudaGraph;
    /** i32: graph.ts stepIndices (ids | positions | cache lengths | block tables) */
    inputs: DeviceBuffer;
    /** the final hidden states [B, C] each replay writes */
    hidden: DeviceBuffer;
}

/** whether decoding uses CUDA graphs unless told otherwise: QLORA_CUDA_GRAPHS=0 turns them off (A/B, debugging) */
export function cudaGraphsByDefault(): boolean {
    return process.env.QLORA_CUDA_GRAPHS !== "0";
}

export class DecodeGraphs {
    /** per cache: the recorded steps by "firstRow/B", or the count of eager steps seen (recording waits for the second) */
    private readonly byCache = new Map<KVCache<DeviceBuffer>, Map<string, Recorded | number>>();
    /** why recording failed, once it has (decoding then stays eager) */
    failure: string | null = null;
    /** steps recorded and replays launched (the recording's own launch included), for tests and benchmarks */
    recorded = 0;
    replays = 0;

    constructor(private readonly graph: DecoderGraph<CudaTensors>) {}

    /** the caches this model made (only those: their release drops their graphs) */
    track(cache: KVCache<DeviceBuffer>): void {
        this.byCache.set(cache, new Map());
    }

    /** the final hidden states [B, C] of a one-token step over cache rows, or null when it must run eagerly */
    step(ids: Int32Array, plan: StepPlan<CudaTensors>): DeviceBuffer | null {
        const cache = plan.cache;
        const steps = cache ? this.byCache.get(cache) : undefined;
        if (this.failure !== null || !cache || !steps || plan.T !== 1 || plan.keyValid) return null;
        // a longrope step records the table it reads: short and long steps are different recordings
        const key = `${plan.firstRow}/${plan.B}${plan.longRope ? "/long" : ""}`;
        const seen = steps.get(key) ?? 0;
        // the first step of a shape runs eagerly: lazy setup (cuBLASLt plans, the GEMV's layout check, the
        // workspace) happens outside the recording
        if (seen === 0) {
            steps.set(key, 1);
            return null;
        }
        const host = stepIndices(ids, plan);
        let step: Recorded;
        if (typeof seen === "number") {
            const recorded = this.record(host, plan);
            if (!recorded) return null;
            steps.set(key, recorded);
            this.recorded++;
            step = recorded;
        } else {
            seen.inputs.upload(host);
            step = seen;
        }
        this.replays++;
        step.graph.launch();
        return step.hidden;
    }

    private record(host: Int32Array, plan: StepPlan<CudaTensors>): Recorded | null {
        const inputs = DeviceBuffer.from("i32", host);
        const stepInputs: StepInputs<CudaTensors> = {...stepInputViews(cudaBackend(), inputs, plan), keyValid: null, seg: null};
        let hidden: DeviceBuffer | null = null;
        try {
            const graph = CudaGraph.capture(() => {
                hidden = this.graph.forwardStep(stepInputs, plan);
            });
            return {graph, inputs, hidden: hidden!};
        } catch (err) {
            (hidden as DeviceBuffer | null)?.free();
            inputs.free();
            this.failure = err instanceof Error ? err.message : String(err);
            process.emitWarning(`decoding without CUDA graphs: recording a step failed (${this.failure})`);
            return null;
        }
    }

    /** drops a cache's recorded steps (before its buffers are freed) */
    drop(cache: KVCache<DeviceBuffer>): void {
        const steps = this.byCache.get(cache);
        if (!steps) return;
        this.byCache.delete(cache);
        for (const r of steps.values()) {
            if (typeof r === "number") continue;
            r.graph.destroy();
            r.hidden.free();
            r.inputs.free();
        }
    }
}
