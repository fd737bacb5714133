// row-store.ts: compact storage for tokenized rows. The tokens of many rows share large Int32Array chunks and each
// row's inputIds/labels are views into them: a million short rows cost their tokens plus one small object each,
// where an Int32Array of its own per row costs several times its tokens in allocator overhead.

import type {TokenizedRow} from "./packing.js";

/** tokens per chunk (4 MiB of ids and 4 MiB of labels); a longer row gets a chunk of its own size */
const CHUNK_TOKENS = 1 << 20;

export class RowStore {
    private ids = new Int32Array(0);
    private labels = new Int32Array(0);
    private used = 0;

    /** copies a row's tokens into the store and returns views of them */
    add(inputIds: ArrayLike<number>, labels: ArrayLike<number>): TokenizedRow {
        const n = inputIds.length;
        if (labels.length !== n) throw new RangeError(`a row has ${n} input ids and ${labels.length} labels`);
        if (this.used + n > this.ids.length) {
            // rows never straddle chunks, so each is one view; the unused tail of the last chunk is the only waste
            const size = Math.max(CHUNK_TOKENS, n);
            this.ids = new Int32Array(size);
            this.labels = new Int32Array(size);
            this.used = 0;
        }
        const start = this.used;
        this.used += n;
        const rowIds = this.ids.subarray(start, start + n);
        const rowLabels = this.labels.subarray(start, start + n);
        rowIds.set(inputIds);
        rowLabels.set(labels);
        return {inputIds: rowIds, labels: rowLabels};
    }
}

/** an Int32Array that grows as values are appended (doubling) */
export class GrowableInt32Array {
    private data = new Int32Array(1024);
    length = 0;

    push(value: number): void {
        if (this.length === this.data.length) {
            const bigger = new Int32Array(this.data.length * 2);
            bigger.set(this.data);
            this.data = bigger;
        }
        this.data[this.length++] = value;
    }

    /** a copy of the values, exactly as long as needed */
    toArray(): Int32Array {
        return this.data.slice(0, this.length);
    }
}
