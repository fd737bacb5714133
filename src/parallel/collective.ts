// collective.ts: what the ranks of a data-parallel run do together. allReduceSum sums a buffer over the ranks in
// place, broadcast copies the root's buffer to every rank, barrier waits for all. The CPU implementation is
// tcp.ts (used on the CPU device and by the tests); nccl.ts holds NCCL's for device buffers.
import {QloraError} from "../errors.js";

export type ReduceBuffer = Float32Array | Float64Array;
export type BroadcastBuffer = Uint8Array | Float32Array | Float64Array;

export interface Collective {
    readonly rank: number;
    readonly worldSize: number;
    /** buf = the sum of every rank's buf, the same bits on every rank */
    allReduceSum(buf: ReduceBuffer): Promise<void>;
    /** buf = root's buf on every rank */
    broadcast(buf: BroadcastBuffer, root?: number): Promise<void>;
    barrier(): Promise<void>;
    close(): Promise<void>;
}

/** the collective of a one-process run: every operation is the identity */
export class SoloCollective implements Collective {
    readonly rank = 0;
    readonly worldSize = 1;
    async allReduceSum(): Promise<void> {}
    async broadcast(): Promise<void> {}
    async barrier(): Promise<void> {}
    async close(): Promise<void> {}
}

/**
 * The items (the same sequence on every rank) split over the ranks, item i computed on rank i mod W, each giving
 * `width` numbers; returns, on every rank, their sums over the items in item order: the bits one process computing
 * every item would get (each item's slot is filled by one rank and zero on the others, so the float64 all-reduce
 * adds only zeros to it). For evaluation passes: the ranks share the batches instead of each running them all.
 */
export async function shardedSums<T>(
    coll: Collective,
    items: Iterable<T>,
    width: number,
    compute: (item: T, index: number) => Promise<number[]> | number[]
): Promise<number[]> {
    const mine: number[] = [];
    let n = 0;
    for (const item of items) {
        const values = n % coll.worldSize === coll.rank ? await compute(item, n) : new Array<number>(width).fill(0);
        if (values.length !== width) throw new Error(`shardedSums: item ${n} gave ${values.length} values, not ${width}`);
        mine.push(...values);
        n++;
    }
    const parts = Float64Array.from(mine);
    await coll.allReduceSum(parts);
    const sums = new Array<number>(width).fill(0);
    for (let i = 0; i < n; i++) for (let k = 0; k < width; k++) sums[k] += parts[i * width + k];
    return sums;
}

/** rank 0's value (JSON) on every rank; the others pass what they have, which is replaced */
export async function broadcastJson<T>(coll: Collective, value: T): Promise<T> {
    if (coll.worldSize === 1) return value;
    const bytes = coll.rank === 0 ? new TextEncoder().encode(JSON.stringify(value)) : new Uint8Array(0);
    const length = new Float64Array([bytes.length]);
    await coll.broadcast(length);
    const buf = coll.rank === 0 ? bytes : new Uint8Array(length[0]);
    await coll.broadcast(buf);
    return JSON.parse(new TextDecoder().decode(buf)) as T;
}

/**
 * Every rank must run the same training: rank 0's `what` (settings, data fingerprint) is compared on each rank
 * and a rank that differs stops the run naming the first key that differs.
 */
export async function checkSameOnEveryRank(coll: Collective, what: string, value: Record<string, unknown>): Promise<void> {
    if (coll.worldSize === 1) return;
    const ref = await broadcastJson(coll, value);
    let differs: string | null = null;
    for (const key of new Set([...Object.keys(ref), ...Object.keys(value)]))
        if (JSON.stringify(ref[key]) !== JSON.stringify(value[key])) {
            differs = key;
            break;
        }
    const flags = new Float64Array([differs === null ? 0 : 1]);
    await coll.allReduceSum(flags);
    if (differs !== null)
        throw new QloraError(
            `rank ${coll.rank}: ${what} differs from rank 0's at ${differs} (${JSON.stringify(value[differs!])} here, ` +
                `${JSON.stringify(ref[differs!])} on rank 0); start every rank with the same command, files and variables`
        );
    if (flags[0] > 0)
        throw new QloraError(
            `${flags[0]} rank(s) have ${what} that differ from rank 0's (see their errors); start every rank the same way`
        );
}
