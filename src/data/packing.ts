// packing.ts: best-fit-decreasing packing of tokenized examples into rows of max_seq_length tokens, as TRL's
// `_pack_bfd` (SPEC-training §5). Each row keeps the lengths of the sequences inside it (`seqLengths`), from which
// collation derives restarting position ids and segment ids; the label at the first token of every packed
// sequence is set to -100 so that no token is trained to predict the next sequence's first token.

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
    const order = lengths.map((_, i) => i).filter((i) => lengths[i] > 0);
    order.sort((a, b) => lengths[b] - lengths[a] || a - b);
    const tree = new SpaceTree(maxLength);
    // queues of bins by remaining space; FIFO within one space value
    const binsBySpace = new Map<number, number[]>();
    const bins: number[][] = [];
    const space: number[] = [];
    for (const index of order) {
        const length = lengths[index];
        if (length > maxLength) throw new RangeError(`sequence ${index} has ${length} tokens, more than the packing length ${maxLength}`);
        const fit = tree.findAtLeast(length);
        let bin: number;
        if (fit < 0) {
            bin = bins.length;
            bins.push([]);
            space.push(maxLength);
        } else {
            const queue = binsBySpace.get(fit)!;
            bin = queue.shift()!;
            if (queue.length === 0) {
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
                binsBySpace.set(left, [bin]);
                tree.set(left, true);
            }
        }
    }
    return bins;
}

/**
 * Packs sequences into rows of at most `maxLength` tokens. "bfd" truncates each sequence to `maxLength` first
 * (the overflow is discarded); "bfd_split" cuts it into `maxLength`-token fragments packed as independent
 * sequences. Empty sequences are dropped. In each row the first label of every sequence becomes -100.
 */
export function packSequences(sequences: readonly {inputIds: ArrayLike<number>; labels: ArrayLike<number>}[], maxLength: number, strategy: PackingStrategy = "bfd"): TokenizedRow[] {
    const pieces: {inputIds: ArrayLike<number>; labels: ArrayLike<number>; start: number; length: number}[] = [];
    for (const seq of sequences) {
        const total = seq.inputIds.length;
        if (strategy === "bfd_split") {
            for (let start = 0; start < total; start += maxLength) pieces.push({...seq, start, length: Math.min(maxLength, total - start)});
        } else if (total > 0) {
            pieces.push({...seq, start: 0, length: Math.min(maxLength, total)});
        }
    }
    const bins = bestFitDecreasing(pieces.map((p) => p.length), maxLength);
    return bins.map((bin) => {
        const length = bin.reduce((sum, i) => sum + pieces[i].length, 0);
        const inputIds = new Int32Array(length);
        const labels = new Int32Array(length);
        let offset = 0;
        for (const i of bin) {
            const piece = pieces[i];
            for (let t = 0; t < piece.length; t++) {
                inputIds[offset + t] = piece.inputIds[piece.start + t];
                labels[offset + t] = t === 0 ? IGNORE_INDEX : piece.labels[piece.start + t];
            }
            offset += piece.length;
        }
        return {inputIds, labels, seqLengths: bin.map((i) => pieces[i].length)};
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
