// loader.ts: micro-batches over epochs in an order fixed by a seed. The position of the next batch
// ({epoch, index, rngState}) is plain JSON: a checkpoint stores it and a resumed run gets exactly the batches
// the interrupted run would have got.

import {Rng} from "../backend/rng.js";
import {QloraError, quoteValue} from "../errors.js";
import {collate} from "./collate.js";
import type {Batch, CollateOptions} from "./collate.js";
import type {TokenizedRow} from "./packing.js";

export interface LoaderPosition {
    /** the epoch of the next batch (0-based) */
    epoch: number;
    /** the index of the next batch within its epoch */
    index: number;
    /** the generator state at the start of `epoch`, before that epoch's shuffle */
    rngState: number[];
}

export interface DataLoaderOptions extends CollateOptions {
    /** rows per micro-batch (per_device_train_batch_size) */
    batchSize: number;
    /** shuffle the rows anew every epoch (default true; false for evaluation) */
    shuffle?: boolean;
    /** seed of the shuffles (default 42) */
    seed?: number;
    /** drop the last, smaller batch of an epoch (dataloader_drop_last, default false) */
    dropLast?: boolean;
}

export interface LoadedBatch {
    batch: Batch;
    /** the epoch and index of this batch */
    epoch: number;
    index: number;
    /** the row indices it holds, for logging and tests */
    rows: number[];
}

/** a rank's part of a global micro-batch (DataLoader.nextShard) */
export interface ShardBatch {
    /** null when the global batch has no rows for this rank (the short last batch of an epoch) */
    batch: Batch | null;
    epoch: number;
    index: number;
    /** the row indices this rank holds */
    rows: number[];
    /** rows in the global micro-batch */
    globalRows: number;
    /** this rank's first row within the global micro-batch */
    firstRow: number;
}

/**
 * Yields micro-batches forever, epoch after epoch (`next()`), or one pass (`epoch()` / iteration). Epoch e's order
 * is a Fisher-Yates shuffle drawn from an Rng whose state at the start of the epoch is saved in the position; the
 * state after the shuffle starts epoch e+1.
 */
export class DataLoader {
    readonly rows: readonly TokenizedRow[];
    readonly options: Readonly<DataLoaderOptions>;
    private epochIndex = 0;
    private batchIndex = 0;
    private epochStartState: number[];
    /** the generator state after this epoch's shuffle: the start of the next epoch */
    private nextEpochState: number[] = [];
    private order: number[] = [];

    constructor(rows: readonly TokenizedRow[], options: DataLoaderOptions, position?: LoaderPosition) {
        if (rows.length === 0) throw new QloraError("the data loader has no rows");
        if (!Number.isInteger(options.batchSize) || options.batchSize < 1)
            throw new QloraError(`batch size must be a positive integer, got ${options.batchSize}`);
        this.rows = rows;
        this.options = {shuffle: true, seed: 42, dropLast: false, ...options};
        if (this.batchesPerEpoch === 0)
            throw new QloraError(`with dropLast, ${rows.length} rows make no batch of ${options.batchSize}`);
        this.epochStartState = new Rng(this.options.seed).getState();
        if (position) this.seek(position);
        else this.startEpoch(0, this.epochStartState);
    }

    /** micro-batches in one epoch */
    get batchesPerEpoch(): number {
        const n = this.rows.length;
        const size = this.options.batchSize;
        return this.options.dropLast ? Math.floor(n / size) : Math.ceil(n / size);
    }

    /** where the next batch comes from; save it to resume */
    get position(): LoaderPosition {
        return {epoch: this.epochIndex, index: this.batchIndex, rngState: this.epochStartState.slice()};
    }

    /**
     * Moves to a saved position (the next batch will be the one at that position). A position that cannot come from
     * this data and batch size (an index past the end of an epoch, a malformed generator state) is refused with a
     * QloraError rather than resuming with other batches than the interrupted run would have had.
     */
    seek(position: LoaderPosition): void {
        const problem = positionProblem(position, this.batchesPerEpoch);
        if (problem !== null) {
            throw new QloraError(
                `invalid data loader position ${quoteValue(position, 200)}: ${problem}; ` +
                    `this data makes ${this.batchesPerEpoch} batches an epoch (${this.rows.length} rows, batch size ${this.options.batchSize}): ` +
                    "was the checkpoint made with other data or another batch size?"
            );
        }
        this.startEpoch(position.epoch, position.rngState);
        // a position at the end of an epoch moves on to the next one
        this.batchIndex = position.index;
        if (this.batchIndex >= this.batchesPerEpoch) this.nextEpoch();
    }

    /** The next micro-batch; at the end of an epoch the next one starts with a new order. */
    next(): LoadedBatch {
        const {epoch, index, rows} = this.advance();
        const batch = collate(
            rows.map((i) => this.rows[i]),
            this.options
        );
        return {batch, epoch, index, rows};
    }

    /**
     * Rank `rank`'s part of the next micro-batch of a data-parallel run. The loader's batchSize is the global
     * micro-batch (per_device_train_batch_size x worldSize rows); rank r takes its rows [r * per, (r + 1) * per):
     * the batches of one process with the global batch size, cut into consecutive slices, which is what accelerate's
     * BatchSamplerShard gives (rank r's i-th batch is batch i * worldSize + r of per-device size). The last,
     * shorter batch of an epoch is cut as it is, so a rank may get fewer rows or none (batch null), where
     * accelerate's even_batches repeats rows from the start: the N-rank run then sees exactly the 1-process rows.
     * `padToGlobal`: pad to the global micro-batch's longest row, so the rank's rows sit in the same [rows, T]
     * layout as in one process (the dropout masks are drawn over that layout).
     */
    nextShard(rank: number, worldSize: number, padToGlobal: boolean): ShardBatch {
        const per = this.options.batchSize / worldSize;
        if (!Number.isInteger(per) || rank < 0 || rank >= worldSize)
            throw new RangeError(`nextShard: rank ${rank} of ${worldSize} with a global batch of ${this.options.batchSize}`);
        const {epoch, index, rows: globalRows} = this.advance();
        let longest = 0;
        for (const i of globalRows) longest = Math.max(longest, this.rows[i].inputIds.length);
        const rows = globalRows.slice(rank * per, (rank + 1) * per);
        const batch =
            rows.length === 0
                ? null
                : collate(
                      rows.map((i) => this.rows[i]),
                      padToGlobal
                          ? {...this.options, padToLength: Math.max(longest, this.options.padToLength ?? 0)}
                          : this.options
                  );
        return {batch, epoch, index, rows, globalRows: globalRows.length, firstRow: rank * per};
    }

    /** the rows of the next batch, and moves past it */
    private advance(): {epoch: number; index: number; rows: number[]} {
        const epoch = this.epochIndex;
        const index = this.batchIndex;
        const size = this.options.batchSize;
        const rows = this.order.slice(index * size, Math.min((index + 1) * size, this.order.length));
        this.batchIndex++;
        if (this.batchIndex >= this.batchesPerEpoch) this.nextEpoch();
        return {epoch, index, rows};
    }

    /** The batches left in the current epoch (all of it when at its start). */
    *epoch(): Generator<LoadedBatch> {
        const epoch = this.epochIndex;
        while (this.epochIndex === epoch) yield this.next();
    }

    [Symbol.iterator](): Generator<LoadedBatch> {
        return this.epoch();
    }

    private startEpoch(epoch: number, state: readonly number[]): void {
        this.epochIndex = epoch;
        this.batchIndex = 0;
        this.epochStartState = state.slice();
        const indices = this.rows.map((_, i) => i);
        if (this.options.shuffle) {
            const rng = Rng.fromState(state.slice());
            rng.shuffle(indices);
            this.nextEpochState = rng.getState();
        } else {
            this.nextEpochState = state.slice();
        }
        this.order = indices;
    }

    private nextEpoch(): void {
        this.startEpoch(this.epochIndex + 1, this.nextEpochState);
    }
}

/** what is wrong with a saved position for data of `batchesPerEpoch` batches an epoch, or null */
function positionProblem(position: LoaderPosition, batchesPerEpoch: number): string | null {
    if (position === null || typeof position !== "object") return "it is not an object";
    const {epoch, index, rngState} = position;
    if (!Number.isSafeInteger(epoch) || epoch < 0) return "the epoch must be a whole number ≥ 0";
    // index == batchesPerEpoch is the end of an epoch (the next batch starts the next one)
    if (!Number.isSafeInteger(index) || index < 0 || index > batchesPerEpoch)
        return `the batch index must be a whole number from 0 to ${batchesPerEpoch}`;
    if (
        !Array.isArray(rngState) ||
        rngState.length !== 4 ||
        !rngState.every((w) => Number.isInteger(w) && w >= 0 && w <= 0xffffffff)
    ) {
        return "the generator state must be 4 whole numbers from 0 to 2^32-1";
    }
    // xoshiro's all-zero state yields only zeros: every epoch would keep the same order
    if (rngState.every((w) => w === 0)) return "the generator state is all zeros";
    return null;
}
