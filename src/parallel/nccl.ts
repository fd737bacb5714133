// nccl.ts: NCCL's collectives over device buffers, for data-parallel training on GPUs (one GPU per rank, the
// device LOCAL_RANK). The communicator's unique id goes from rank 0 to the others over the TCP collective (the
// bootstrap torch does through its store). Built and type-checked here; not yet run (it needs 2 GPUs), and the
// CUDA engine does not call it yet: the trainer refuses WORLD_SIZE > 1 on the GPU until it does.
import {QloraError} from "../errors.js";
import {cuda} from "../backend/cuda.js";
import type {CudaNcclOps} from "../backend/cuda-nccl-types.js";
import type {Collective} from "./collective.js";
import type {DistContext} from "./context.js";

export class NcclCollective {
    private constructor(
        private readonly ops: CudaNcclOps,
        readonly rank: number,
        readonly worldSize: number
    ) {}

    /** loads NCCL, takes GPU LOCAL_RANK and joins every rank to one communicator (`bootstrap`: the TCP collective) */
    static async connect(ctx: DistContext, bootstrap: Collective): Promise<NcclCollective> {
        const ops = cuda() as unknown as CudaNcclOps;
        try {
            ops.ncclVersion();
        } catch (err) {
            throw new QloraError(`rank ${ctx.rank}: ${(err as Error).message}`);
        }
        ops.setDevice(ctx.localRank);
        const id = ctx.rank === 0 ? ops.ncclGetUniqueId() : new Uint8Array(128);
        await bootstrap.broadcast(id, 0);
        try {
            ops.ncclInitRank(id, ctx.worldSize, ctx.rank);
        } catch (err) {
            throw new QloraError(`rank ${ctx.rank} (GPU ${ctx.localRank}): ${(err as Error).message}`);
        }
        return new NcclCollective(ops, ctx.rank, ctx.worldSize);
    }

    /** sums `count` float32 (or float64) values at the device address over the ranks, in place, on the stream */
    allReduceSum(ptr: number, count: number, dtype: "f32" | "f64" = "f32"): void {
        this.ops.ncclAllReduceSum(ptr, count, dtype === "f32" ? 0 : 1);
    }

    broadcast(ptr: number, bytes: number, root = 0): void {
        this.ops.ncclBroadcast(ptr, bytes, root);
    }

    close(): void {
        this.ops.ncclDestroy();
    }
}
