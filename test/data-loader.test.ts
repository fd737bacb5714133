import {test, describe, before} from "node:test";
import assert from "node:assert/strict";
import {Rng} from "../src/backend/rng.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {DataLoader, prepareRecords} from "../src/data/index.js";
import type {LoadedBatch, LoaderPosition, TokenizedRow} from "../src/data/index.js";
import {MODEL_DIR} from "./helpers/paths.js";

// 23 rows whose first token is their index, of varied lengths
const ROWS: TokenizedRow[] = Array.from({length: 23}, (_, i) => {
    const n = 2 + ((i * 7) % 5);
    const ids = Int32Array.from({length: n}, (_, t) => (t === 0 ? i : 1000 + t));
    return {inputIds: ids, labels: Int32Array.from(ids)};
});

function take(loader: DataLoader, n: number): LoadedBatch[] {
    return Array.from({length: n}, () => loader.next());
}

function same(a: LoadedBatch[], b: LoadedBatch[]): void {
    assert.equal(a.length, b.length);
    for (let i = 0; i < a.length; i++) {
        assert.deepEqual([a[i].epoch, a[i].index, a[i].rows], [b[i].epoch, b[i].index, b[i].rows], `batch ${i}`);
        assert.deepEqual(a[i].batch, b[i].batch, `batch ${i} contents`);
    }
}

describe("DataLoader", () => {
    test("each epoch is a permutation in micro-batches; the last batch is smaller unless dropLast", () => {
        const loader = new DataLoader(ROWS, {batchSize: 4, padTokenId: 0, seed: 3});
        assert.equal(loader.batchesPerEpoch, 6);
        const epoch0 = [...loader.epoch()];
        assert.equal(epoch0.length, 6);
        assert.deepEqual(
            epoch0.map((b) => b.batch.B),
            [4, 4, 4, 4, 4, 3]
        );
        assert.deepEqual(
            epoch0.flatMap((b) => b.rows).sort((a, b) => a - b),
            ROWS.map((_, i) => i)
        );
        // the rows' first tokens show which rows a batch holds
        for (const b of epoch0)
            assert.deepEqual(
                b.rows,
                Array.from({length: b.batch.B}, (_, r) => b.batch.inputIds[r * b.batch.T])
            );
        const epoch1 = [...loader.epoch()];
        assert.equal(epoch1[0].epoch, 1);
        assert.notDeepEqual(
            epoch1.flatMap((b) => b.rows),
            epoch0.flatMap((b) => b.rows),
            "a new order every epoch"
        );
        const dropping = new DataLoader(ROWS, {batchSize: 4, padTokenId: 0, dropLast: true});
        assert.equal(dropping.batchesPerEpoch, 5);
        assert.ok([...dropping.epoch()].every((b) => b.batch.B === 4));
    });

    test("shuffling is deterministic from the seed; shuffle false keeps the order", () => {
        const a = take(new DataLoader(ROWS, {batchSize: 3, padTokenId: 0, seed: 11}), 20);
        const b = take(new DataLoader(ROWS, {batchSize: 3, padTokenId: 0, seed: 11}), 20);
        same(a, b);
        const c = take(new DataLoader(ROWS, {batchSize: 3, padTokenId: 0, seed: 12}), 20);
        assert.notDeepEqual(
            a.map((x) => x.rows),
            c.map((x) => x.rows)
        );
        const ordered = [...new DataLoader(ROWS, {batchSize: 5, padTokenId: 0, shuffle: false})];
        assert.deepEqual(
            ordered.flatMap((x) => x.rows),
            ROWS.map((_, i) => i)
        );
        // the epoch's order is the Rng's Fisher-Yates shuffle from the seed
        const expected = new Rng(11).shuffle(ROWS.map((_, i) => i));
        assert.deepEqual(
            a.slice(0, 8).flatMap((x) => x.rows),
            expected
        );
    });

    test("a saved position (through JSON) resumes with exactly the remaining batches", () => {
        for (const stop of [0, 1, 5, 7, 8, 13, 16]) {
            const original = new DataLoader(ROWS, {batchSize: 3, padTokenId: 0, seed: 5, padToMultipleOf: 8});
            take(original, stop);
            const saved = JSON.parse(JSON.stringify(original.position)) as LoaderPosition;
            const expected = take(original, 20);
            const resumed = new DataLoader(ROWS, {batchSize: 3, padTokenId: 0, seed: 5, padToMultipleOf: 8}, saved);
            assert.deepEqual(resumed.position, saved);
            same(take(resumed, 20), expected);
        }
        const loader = new DataLoader(ROWS, {batchSize: 3, padTokenId: 0});
        assert.throws(() => loader.seek({epoch: -1, index: 0, rngState: [1, 2, 3, 4]}), /invalid data loader position/);
    });

    test("the position at an epoch's end moves to the next epoch", () => {
        const loader = new DataLoader(ROWS, {batchSize: 5, padTokenId: 0, seed: 9});
        take(loader, loader.batchesPerEpoch);
        assert.equal(loader.position.epoch, 1);
        assert.equal(loader.position.index, 0);
        const other = new DataLoader(ROWS, {batchSize: 5, padTokenId: 0, seed: 9});
        other.seek({epoch: 0, index: 5, rngState: other.position.rngState});
        assert.deepEqual(other.position, loader.position);
        same(take(other, 7), take(loader, 7));
    });
});

describe("shuffle_dataset", () => {
    let tokenizer: HfTokenizer;
    before(async () => {
        tokenizer = await HfTokenizer.load(MODEL_DIR);
    });

    test("shuffles before packing, deterministically from the seed", () => {
        const records = Array.from({length: 30}, (_, i) => ({text: `record ${i} ` + "x ".repeat(i % 7)}));
        const rowsOf = (seed: number): number[][] =>
            prepareRecords(records, tokenizer, {shuffle_dataset: true, seed}).rows.map((r) => Array.from(r.inputIds));
        assert.deepEqual(rowsOf(1), rowsOf(1));
        assert.notDeepEqual(rowsOf(1), rowsOf(2));
        const unshuffled = prepareRecords(records, tokenizer).rows.map((r) => Array.from(r.inputIds));
        assert.deepEqual([...rowsOf(1)].sort(), [...unshuffled].sort());
    });
});
