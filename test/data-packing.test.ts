import {test, describe, before} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {Rng} from "../src/backend/rng.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {
    IGNORE_INDEX,
    bestFitDecreasing,
    collate,
    packSequences,
    padTokenIdOf,
    prepareRecords,
    readRecords
} from "../src/data/index.js";
import type {Batch, TokenizedRow} from "../src/data/index.js";
import {DATASETS, MODEL_DIR} from "./helpers/paths.js";

let tokenizer: HfTokenizer;
before(async () => {
    tokenizer = await HfTokenizer.load(MODEL_DIR);
});

const seq = (ids: number[]): {inputIds: number[]; labels: number[]} => ({inputIds: ids, labels: ids.slice()});
const WORKED_EXAMPLE = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]].map(seq);

/** a reference for the BFD rule: scan every bin; smallest space ≥ L, then the bin that reached that space first */
function referenceBfd(lengths: number[], max: number): number[][] {
    const order = lengths
        .map((_, i) => i)
        .filter((i) => lengths[i] > 0)
        .sort((a, b) => lengths[b] - lengths[a] || a - b);
    const bins: {items: number[]; space: number; reachedAt: number}[] = [];
    let clock = 0;
    for (const i of order) {
        let best: (typeof bins)[number] | null = null;
        for (const bin of bins) {
            if (bin.space < lengths[i] || bin.space === 0) continue;
            if (!best || bin.space < best.space || (bin.space === best.space && bin.reachedAt < best.reachedAt)) best = bin;
        }
        if (!best) bins.push((best = {items: [], space: max, reachedAt: 0}));
        best.items.push(i);
        best.space -= lengths[i];
        best.reachedAt = clock++;
    }
    return bins.map((b) => b.items);
}

/** every (row, t) whose target labels[t+1] is trained must be inside one segment: t and t+1 in the same sequence */
function assertTargetsStayInSegments(batch: Batch): number {
    assert.ok(batch.segIds, "packed batches have segment ids");
    let targets = 0;
    for (let b = 0; b < batch.B; b++) {
        for (let t = 0; t + 1 < batch.T; t++) {
            const next = b * batch.T + t + 1;
            if (batch.labels[next] === IGNORE_INDEX) continue;
            targets++;
            const here = b * batch.T + t;
            assert.equal(batch.segIds[here], batch.segIds[next], `row ${b}: position ${t} predicts across a segment boundary`);
            assert.notEqual(batch.segIds[next], -1, "padding is never a target");
            assert.equal(batch.positionIds[next], batch.positionIds[here] + 1);
            assert.equal(batch.attentionMask[next], 1);
        }
    }
    assert.equal(targets, batch.numTargets);
    return targets;
}

describe("best-fit decreasing", () => {
    test("the SPEC-training §5 worked example, bfd", () => {
        assert.deepEqual(bestFitDecreasing([4, 2, 3, 1], 4), [[0], [2, 3], [1]]);
        const rows = packSequences(WORKED_EXAMPLE, 4, "bfd");
        assert.deepEqual(
            rows.map((r) => Array.from(r.inputIds)),
            [
                [1, 2, 3, 4],
                [8, 9, 10, 11],
                [6, 7]
            ]
        );
        assert.deepEqual(
            rows.map((r) => r.seqLengths),
            [[4], [3, 1], [2]]
        );
        // the first label of every packed sequence is -100
        assert.deepEqual(
            rows.map((r) => Array.from(r.labels)),
            [
                [-100, 2, 3, 4],
                [-100, 9, 10, -100],
                [-100, 7]
            ]
        );
    });

    test("the SPEC-training §5 worked example, bfd_split", () => {
        const rows = packSequences(WORKED_EXAMPLE, 4, "bfd_split");
        assert.deepEqual(
            rows.map((r) => Array.from(r.inputIds)),
            [
                [1, 2, 3, 4],
                [8, 9, 10, 5],
                [6, 7, 11]
            ]
        );
        assert.deepEqual(
            rows.map((r) => r.seqLengths),
            [[4], [3, 1], [2, 1]]
        );
    });

    test("equals a brute-force reference on random lengths; every sequence lands exactly once", () => {
        const rng = new Rng(7);
        for (let trial = 0; trial < 200; trial++) {
            const max = 1 + rng.int(64);
            const lengths = Array.from({length: rng.int(60)}, () => rng.int(max + 1));
            const bins = bestFitDecreasing(lengths, max);
            assert.deepEqual(bins, referenceBfd(lengths, max), `trial ${trial}`);
            const seen = bins.flat().sort((a, b) => a - b);
            assert.deepEqual(
                seen,
                lengths.map((_, i) => i).filter((i) => lengths[i] > 0)
            );
            for (const bin of bins) assert.ok(bin.reduce((s, i) => s + lengths[i], 0) <= max);
        }
    });
});

describe("collation", () => {
    test("right padding: pad id, labels -100, attention mask, positions, pad_to_multiple_of, numTargets", () => {
        const rows: TokenizedRow[] = [
            {inputIds: Int32Array.from([5, 6, 7]), labels: Int32Array.from([-100, 6, 7])},
            {inputIds: Int32Array.from([8, 9, 10, 11, 12]), labels: Int32Array.from([8, -100, 10, 11, 12])}
        ];
        const batch = collate(rows, {padTokenId: padTokenIdOf(tokenizer), padToMultipleOf: 4});
        assert.equal(padTokenIdOf(tokenizer), 16381);
        assert.equal(batch.B, 2);
        assert.equal(batch.T, 8);
        assert.deepEqual(
            Array.from(batch.inputIds),
            [5, 6, 7, 16381, 16381, 16381, 16381, 16381, 8, 9, 10, 11, 12, 16381, 16381, 16381]
        );
        assert.deepEqual(
            Array.from(batch.labels),
            [-100, 6, 7, -100, -100, -100, -100, -100, 8, -100, 10, 11, 12, -100, -100, -100]
        );
        assert.deepEqual(Array.from(batch.attentionMask), [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]);
        assert.deepEqual(Array.from(batch.positionIds), [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]);
        assert.equal(batch.segIds, null);
        // after the shift, row 0 has targets 6, 7 and row 1 has 10, 11, 12 (the label 8 at t = 0 is no target)
        assert.equal(batch.numTargets, 5);
        assert.equal(padTokenIdOf({padTokenId: null, eosTokenId: 2}), 2);
    });

    test("packed rows: positions restart, segment ids per sequence, -1 for padding", () => {
        const rows = packSequences(WORKED_EXAMPLE, 4, "bfd");
        const batch = collate(rows, {padTokenId: 0});
        assert.equal(batch.T, 4);
        assert.deepEqual(Array.from(batch.positionIds), [0, 1, 2, 3, 0, 1, 2, 0, 0, 1, 0, 1]);
        assert.deepEqual(Array.from(batch.segIds!), [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, -1, -1]);
        assert.equal(assertTargetsStayInSegments(batch), 3 + 2 + 1);
    });

    test("packed alpaca and chat rows never let a target cross a segment boundary", async () => {
        for (const file of ["alpaca_zh_demo.json", "messages_demo.jsonl"]) {
            for (const strategy of ["bfd", "bfd_split"] as const) {
                const records = (await readRecords(path.join(DATASETS, file))).records.slice(0, 300);
                const prepared = prepareRecords(records, tokenizer, {
                    max_seq_length: 256,
                    packing: true,
                    packing_strategy: strategy
                });
                assert.ok(prepared.rows.length < prepared.stats.examples, "packing merges examples");
                let targets = 0;
                let multi = 0;
                for (let i = 0; i < prepared.rows.length; i += 4) {
                    const rows = prepared.rows.slice(i, i + 4);
                    for (const row of rows) {
                        assert.ok(row.inputIds.length <= 256);
                        assert.equal(
                            row.seqLengths!.reduce((s, n) => s + n, 0),
                            row.inputIds.length
                        );
                        if (row.seqLengths!.length > 1) multi++;
                    }
                    targets += assertTargetsStayInSegments(collate(rows, {padTokenId: 16381}));
                }
                assert.equal(targets, prepared.stats.targets);
                assert.ok(multi > 0);
            }
        }
    });
});
