// packing.ts: best-fit-decreasing packing of tokenized examples into rows of max_seq_length tokens, as TRL's
// `_pack_bfd` (SPEC-training §5). Each row keeps the lengths of the sequences inside it (`seqLengths`), from which
// collation derives restarting position ids and segment ids; the label at the first token of every packed
// sequence is set to -100 so that no token is trained to predict the next sequence's first token.

import {RowStore} from "./row-store.js";
import {IGNORE_INDEX} from "./tokenize.js";

export type PackingStrategy = "bfd" | "bfd_split";

/** a tokenized training row: one example, or several packed ones */
export interface TokenizedRow {
    inputIds: Int32Array;
    /** not shifted; -100 where not trained */
    labels: Int32Array;
    /** packed rows: the lengths of the sequences in the row, in order (they sum to the row length) */
    seqLengths?: number[];
}

/**
 * Best-fit decreasing over sequence lengths (each ≤ maxLength, > 0): sequences sorted by length, longest first
 * (stable), each put into the open bin with the smallest remaining space that fits it, bins with equal space taken
 * in the order they reached it; a new bin when none fits. Returns the bins in creation order, each the indices of
 * its sequences in insertion order.
 */
export function bestFitDecreasing(lengths: readonly number[], maxLength: number): number[][] {
    if (!Number.isInteger(maxLength) || maxLength < 1) throw new RangeError(`packing needs max_seq_length ≥ 1, got ${maxLength}`);
    const order = longestFirst(lengths, maxLength);
    const tree = new SpaceTree(maxLength);
    // queues of bins by remaining space; FIFO within one space value
    const binsBySpace = new Map<number, Fifo>();
    const bins: number[][] = [];
    const space: number[] = [];
    for (const index of order) {
        const length = lengths[index];
        const fit = tree.findAtLeast(length);
        let bin: number;
        if (fit < 0) {
            bin = bins.length;
            bins.push([]);
            space.push(maxLength);
        } else {
            const queue = binsBySpace.get(fit)!;
            bin = queue.shift();
            if (queue.size === 0) {
                binsBySpace.delete(fit);
                tree.set(fit, false);
            }
        }
        bins[bin].push(index);
        space[bin] -= length;
        const left = space[bin];
        if (left > 0) {
            const queue = binsBySpace.get(left);
            if (queue) queue.push(bin);
            else {
                binsBySpace.set(left, new Fifo(bin));
                tree.set(left, true);
            }
        }
    }
    return bins;
}

/**
 * The indices of the non-empty sequences, longest first and in index order among equal lengths: a counting sort,
 * since lengths are bounded by maxLength (linear where a comparison sort of a million indices takes seconds)
 */
function longestFirst(lengths: readonly number[], maxLength: number): Int32Array {
    const count = new Int32Array(maxLength + 2);
    for (let i = 0; i < lengths.length; i++) {
        const length = lengths[i];
        if (length > maxLength)
            throw new RangeError(`sequence ${i} has ${length} tokens, more than the packing length ${maxLength}`);
        if (length > 0) count[length]++;
    }
    // next[length]: where the next index of that length goes; longer lengths first
    const next = new Int32Array(maxLength + 2);
    let total = 0;
    for (let length = maxLength; length >= 1; length--) {
        next[length] = total;
        total += count[length];
    }
    const order = new Int32Array(total);
    for (let i = 0; i < lengths.length; i++) if (lengths[i] > 0) order[next[lengths[i]]++] = i;
    return order;
}

/** a first-in first-out queue with O(1) shift (Array.prototype.shift copies a large array on every call) */
class Fifo {
    private items: number[];
    private head = 0;

    constructor(first: number) {
        this.items = [first];
    }

    get size(): number {
        return this.items.length - this.head;
    }

    push(item: number): void {
        this.items.push(item);
    }

    shift(): number {
        const item = this.items[this.head++];
        // drop the consumed front now and then, so a long-lived queue does not keep growing
        if (this.head >= 1024 && this.head * 2 >= this.items.length) {
            this.items = this.items.slice(this.head);
            this.head = 0;
        }
        return item;
    }
}

/**
 * Packs sequences into rows of at most `maxLength` tokens. "bfd" truncates each sequence to `maxLength` first
 * (the overflow is discarded); "bfd_split" cuts it into `maxLength`-token fragments packed as independent
 * sequences. Empty sequences are dropped. In each row the first label of every sequence becomes -100.
 */
export function packSequences(
    sequences: readonly {inputIds: ArrayLike<number>; labels: ArrayLike<number>}[],
    maxLength: number,
    strategy: PackingStrategy = "bfd"
): TokenizedRow[] {
    // pieces as parallel lists (sequence, start, length): a million small objects would cost more than the tokens
    const pieceSequence: number[] = [];
    const pieceStart: number[] = [];
    const pieceLength: number[] = [];
    sequences.forEach((seq, index) => {
        const total = seq.inputIds.length;
        const step = strategy === "bfd_split" ? maxLength : Math.max(total, 1);
        for (let start = 0; start < total; start += step) {
            pieceSequence.push(index);
            pieceStart.push(start);
            pieceLength.push(Math.min(maxLength, total - start));
        }
    });
    const bins = bestFitDecreasing(pieceLength, maxLength);
    const store = new RowStore();
    const inputIds = new Int32Array(maxLength);
    const labels = new Int32Array(maxLength);
    return bins.map((bin) => {
        let offset = 0;
        const seqLengths: number[] = [];
        for (const piece of bin) {
            const seq = sequences[pieceSequence[piece]];
            const start = pieceStart[piece];
            const length = pieceLength[piece];
            for (let t = 0; t < length; t++) {
                inputIds[offset + t] = seq.inputIds[start + t];
                labels[offset + t] = t === 0 ? IGNORE_INDEX : seq.labels[start + t];
            }
            offset += length;
            seqLengths.push(length);
        }
        const row = store.add(inputIds.subarray(0, offset), labels.subarray(0, offset));
        return {...row, seqLengths};
    });
}

// which remaining-space values (1..maxLength) have an open bin, with "smallest present value ≥ L" in O(log n)
class SpaceTree {
    private readonly size: number;
    private readonly present: Uint8Array;

    constructor(maxLength: number) {
        let size = 1;
        while (size < maxLength + 1) size *= 2;
        this.size = size;
        this.present = new Uint8Array(2 * size);
    }

    set(value: number, on: boolean): void {
        let node = this.size + value;
        this.present[node] = on ? 1 : 0;
        for (node >>= 1; node >= 1; node >>= 1) this.present[node] = this.present[2 * node] | this.present[2 * node + 1];
    }

    /** the smallest present value ≥ min, or -1 */
    findAtLeast(min: number): number {
        return this.find(1, 0, this.size - 1, min);
    }

    private find(node: number, lo: number, hi: number, min: number): number {
        if (hi < min || this.present[node] === 0) return -1;
        if (lo === hi) return lo;
        const mid = (lo + hi) >> 1;
        const left = this.find(2 * node, lo, mid, min);
        return left >= 0 ? left : this.find(2 * node + 1, mid + 1, hi, min);
    }
}
