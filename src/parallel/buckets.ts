// buckets.ts: the gradients of a data-parallel step are all-reduced in buckets, as torch's DistributedDataParallel
// does: tensors in the reverse of their order (the backward makes the last layers' gradients first), a bucket
// closed once it holds capBytes or more (the first one at 1 MiB, so the first all-reduce can start early), a
// tensor larger than the cap alone in its bucket. On the GPU the buckets are what can be reduced while the backward
// goes on; on the CPU they bound the staging copies.
import type {Collective} from "./collective.js";

export interface BucketTensor {
    name: string;
    numel: number;
}

export interface Bucket {
    /** indices into the tensor list, in the order the bucket lays them out */
    tensors: number[];
    numel: number;
}

export interface BucketOptions {
    /** DDP's bucket_cap_mb (transformers' ddp_bucket_cap_mb), in bytes: 25 MiB */
    capBytes?: number;
    /** DDP's first bucket: 1 MiB */
    firstBucketBytes?: number;
    bytesPerElement?: number;
}

export const DEFAULT_BUCKET_CAP_BYTES = 25 * 2 ** 20;
export const DEFAULT_FIRST_BUCKET_BYTES = 2 ** 20;

/** which tensors go in which bucket (torch's compute_bucket_assignment_by_size over the reversed tensor list) */
export function planBuckets(tensors: readonly BucketTensor[], opts: BucketOptions = {}): Bucket[] {
    const cap = opts.capBytes ?? DEFAULT_BUCKET_CAP_BYTES;
    const first = Math.min(cap, opts.firstBucketBytes ?? DEFAULT_FIRST_BUCKET_BYTES);
    const bytes = opts.bytesPerElement ?? 4;
    if (!(cap > 0)) throw new RangeError(`bucket cap must be positive, got ${cap}`);
    const buckets: Bucket[] = [];
    let current: Bucket = {tensors: [], numel: 0};
    for (let i = tensors.length - 1; i >= 0; i--) {
        current.tensors.push(i);
        current.numel += tensors[i].numel;
        const limit = buckets.length === 0 ? first : cap;
        if (current.numel * bytes >= limit) {
            buckets.push(current);
            current = {tensors: [], numel: 0};
        }
    }
    if (current.tensors.length > 0) buckets.push(current);
    return buckets;
}

/**
 * Sums host gradients over the ranks bucket by bucket: each bucket's tensors copied into one staging buffer,
 * all-reduced, copied back. The staging buffers are made once and reused every step.
 */
export class BucketedAllReduce {
    readonly buckets: Bucket[];
    private readonly staging: Float32Array[];

    constructor(
        private readonly grads: readonly Float32Array[],
        names: readonly string[],
        opts: BucketOptions = {}
    ) {
        this.buckets = planBuckets(
            grads.map((g, i) => ({name: names[i], numel: g.length})),
            opts
        );
        this.staging = this.buckets.map((b) => new Float32Array(b.numel));
    }

    async run(coll: Collective): Promise<void> {
        if (coll.worldSize === 1) return;
        for (let b = 0; b < this.buckets.length; b++) {
            const stage = this.staging[b];
            let at = 0;
            for (const i of this.buckets[b].tensors) {
                stage.set(this.grads[i], at);
                at += this.grads[i].length;
            }
            await coll.allReduceSum(stage);
            at = 0;
            for (const i of this.buckets[b].tensors) {
                this.grads[i].set(stage.subarray(at, at + this.grads[i].length));
                at += this.grads[i].length;
            }
        }
    }
}
