// cuda-nccl-types.ts: a hand-written mirror of the NCCL functions native/addon/cuda_nccl.cpp adds to the CUDA
// addon (native/cuda/nccl.cpp: libnccl.so.2 opened with dlopen on first use; each call throws NCCL's message, or
// "libnccl.so.2 not found ..." where NCCL is missing). Collectives are queued on the addon's stream.
import type {CudaAddon} from "./native-types.js";

export interface CudaNcclOps extends CudaAddon {
    /** NCCL's version code (22304 for 2.23.4); loads the library */
    ncclVersion(): number;
    /** rank 0's id of a new communicator (128 bytes), shared with the other ranks out of band */
    ncclGetUniqueId(): Uint8Array;
    /** joins this process (its current device) to the communicator of `id` */
    ncclInitRank(id: Uint8Array, nranks: number, rank: number): void;
    /** buf[count] summed over the ranks in place; dtype 0 float32, 1 float64 */
    ncclAllReduceSum(buf: number, count: number, dtype: number): void;
    /** root's bytes of buf on every rank */
    ncclBroadcast(buf: number, bytes: number, root: number): void;
    ncclDestroy(): void;
}
