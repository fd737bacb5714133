// Batched generation: several prompts of different lengths in one forward per step give each prompt the tokens
// generate() gives it alone (greedy and sampled), and the stop reasons per row.
import {test} from "node:test";
import assert from "node:assert/strict";
import {DecoderModel} from "../src/model/decoder.js";
import {generate, generateBatch, SlotDecoder} from "../src/model/generate.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {MODEL_DIR} from "./helpers/paths.js";

const model = await DecoderModel.load(MODEL_DIR);
const tok = await HfTokenizer.load(MODEL_DIR);
const prompts = ["Hello", "The capital of France is", "1, 2, 3, 4, 5, 6, 7, 8,", "写一首诗"].map((p) => tok.encode(p));

test("batched greedy generation equals one-by-one generation for prompts of different lengths", () => {
    assert.ok(new Set(prompts.map((p) => p.length)).size > 2, "the prompts differ in length");
    const opts = {maxNewTokens: 12, greedy: true, eosTokenIds: [-1]};
    const batch = generateBatch(model, prompts, opts);
    prompts.forEach((p, b) => {
        const one = generate(model, p, opts);
        assert.deepEqual(batch[b].newIds, one.newIds, `prompt ${b}`);
        assert.deepEqual(batch[b].outputIds, one.outputIds);
        assert.equal(batch[b].stopReason, "max_new_tokens");
    });
});

test("batched sampling gives each row the tokens of its own seeded run", () => {
    const opts = {maxNewTokens: 10, greedy: false, temperature: 0.9, topK: 20, topP: 0.95, seed: 5};
    const batch = generateBatch(model, prompts, opts);
    prompts.forEach((p, b) => assert.deepEqual(batch[b].newIds, generate(model, p, opts).newIds, `prompt ${b}`));
});

test("a row that reaches an end-of-sequence id stops while the others go on", () => {
    // the first prompt's third greedy token becomes its eos: that row ends at 3 tokens, the others run to 8
    const first = generate(model, prompts[0], {maxNewTokens: 3, greedy: true, eosTokenIds: [-1]});
    const stopId = first.newIds[2];
    const batch = generateBatch(model, prompts, {maxNewTokens: 8, greedy: true, eosTokenIds: [stopId]});
    assert.equal(batch[0].stopReason, "eos");
    assert.equal(batch[0].newIds.length, 3);
    prompts.forEach((p, b) => {
        const one = generate(model, p, {maxNewTokens: 8, greedy: true, eosTokenIds: [stopId]});
        assert.deepEqual(batch[b].newIds, one.newIds, `prompt ${b}`);
        assert.equal(batch[b].stopReason, one.stopReason);
    });
});

/** greedy continuation by a full forward pass of the whole sequence per token: no KV cache, no batch */
function greedyByRecompute(prompt: number[], n: number): number[] {
    const ids = [...prompt];
    const V = model.config.vocabSize;
    for (let i = 0; i < n; i++) {
        const logits = model.forward(Int32Array.from(ids), 1, ids.length, {logitRows: [ids.length - 1]});
        let best = 0;
        for (let v = 1; v < V; v++) if (logits[v] > logits[best]) best = v;
        ids.push(best);
    }
    return ids.slice(prompt.length);
}

test("continuous batching: rows join a running batch and leave it, each gets the tokens of its prompt alone", () => {
    const greedy = {greedy: true};
    const dec = new SlotDecoder(model, 2, 64, [-1]);
    const a = dec.join(prompts[0], {...greedy, maxNewTokens: 5});
    dec.step();
    dec.step();
    // b joins a row that is 3 tokens ahead: the two rows now sit at different cache lengths
    const b = dec.join(prompts[1], {...greedy, maxNewTokens: 9});
    assert.equal(dec.free, 0);
    while (!a.done) dec.step();
    // a (cache row 0) ended: b moved into its row, and c takes the freed one at once
    assert.equal(dec.active, 1);
    const c = dec.join(prompts[2], {maxNewTokens: 7, greedy: false, temperature: 0.8, topK: 30, topP: 0.9, seed: 3});
    while (dec.active > 0) dec.step();
    dec.release();
    assert.deepEqual(a.result.newIds, greedyByRecompute(prompts[0], 5));
    assert.deepEqual(b.result.newIds, greedyByRecompute(prompts[1], 9));
    assert.deepEqual(
        c.result.newIds,
        generate(model, prompts[2], {maxNewTokens: 7, greedy: false, temperature: 0.8, topK: 30, topP: 0.9, seed: 3}).newIds
    );
    assert.deepEqual(
        [a, b, c].map((r) => r.result.stopReason),
        ["max_new_tokens", "max_new_tokens", "max_new_tokens"]
    );
});

test("continuous batching: a row that leaves frees its place; a full row stops at the context", () => {
    const dec = new SlotDecoder(model, 2, prompts[3].length + 3, [-1]);
    const gone = dec.join(prompts[0], {greedy: true, maxNewTokens: 20});
    const kept = dec.join(prompts[3], {greedy: true, maxNewTokens: 20});
    dec.step();
    dec.leave(gone);
    assert.equal(gone.result.stopReason, "cancelled");
    assert.deepEqual([dec.active, dec.free], [1, 1]);
    while (dec.active > 0) dec.step();
    // the prompt fills all but 3 positions: 4 tokens (the last needs no place), then the context is full
    assert.equal(kept.result.stopReason, "context");
    assert.deepEqual(kept.result.newIds, greedyByRecompute(prompts[3], 4));
    dec.release();
});

test("repetition penalty: the prompt's and the answer's tokens are penalized at every step, batched or alone", () => {
    const penalty = 1.8;
    const n = 8;
    const V = model.config.vocabSize;
    // the reference: a full forward per token, transformers' penalty over the distinct ids so far, then the argmax
    const reference = (prompt: number[]) => {
        const ids = [...prompt];
        for (let i = 0; i < n; i++) {
            const logits = model.forward(Int32Array.from(ids), 1, ids.length, {logitRows: [ids.length - 1]});
            for (const t of new Set(ids)) logits[t] = logits[t] < 0 ? logits[t] * penalty : logits[t] / penalty;
            let best = 0;
            for (let v = 1; v < V; v++) if (logits[v] > logits[best]) best = v;
            ids.push(best);
        }
        return ids.slice(prompt.length);
    };
    const opts = {maxNewTokens: n, greedy: true, repetitionPenalty: penalty, eosTokenIds: [-1]};
    const batch = generateBatch(model, prompts, opts);
    let changed = 0;
    prompts.forEach((p, b) => {
        assert.deepEqual(batch[b].newIds, reference(p), `prompt ${b}`);
        assert.deepEqual(generate(model, p, opts).newIds, batch[b].newIds, `prompt ${b} alone`);
        if (generate(model, p, {...opts, repetitionPenalty: 1}).newIds.join() !== batch[b].newIds.join()) changed++;
    });
    assert.ok(changed > 0, "the penalty changed no answer");
    // sampled with a penalty: a row's tokens are those of its own seeded run
    const sampled = {maxNewTokens: 8, greedy: false, temperature: 0.9, topK: 0, topP: 0.95, repetitionPenalty: 1.3, seed: 9};
    const rows = generateBatch(model, prompts, sampled);
    prompts.forEach((p, b) => assert.deepEqual(rows[b].newIds, generate(model, p, sampled).newIds, `sampled prompt ${b}`));
    assert.throws(() => generate(model, prompts[0], {maxNewTokens: 2, repetitionPenalty: 0}), /repetition_penalty must be > 0/);
});

test("paged KV cache: rows of different lengths share a pool smaller than rows x capacity; a row waits for blocks", () => {
    // 3 rows of up to 256 positions (4 blocks of 64 each unpaged: 12) in a pool of 5 blocks
    const dec = new SlotDecoder(model, 3, 256, [-1], 5);
    const long = [...prompts[2], ...prompts[2], ...prompts[2]];
    assert.ok(long.length > 64 && long.length + 20 <= 128, `a prompt of ${long.length} tokens takes 2 blocks`);
    const a = dec.join(prompts[0], {greedy: true, maxNewTokens: 30}); // 1 block
    const b = dec.join(long, {greedy: true, maxNewTokens: 20}); // 2 blocks
    assert.equal(dec.canJoin(prompts[1].length, 150), false, "3 blocks asked, 2 free");
    assert.equal(dec.canJoin(prompts[1].length, 40), true);
    const c = dec.join(prompts[1], {greedy: true, maxNewTokens: 40}); // 1 block
    assert.equal(dec.canJoin(prompts[3].length, 80), false, "2 blocks asked, 1 free");
    assert.throws(
        () => dec.join(prompts[3], {greedy: true, maxNewTokens: 2}),
        (err: unknown) => err instanceof Error && /no free row/.test(err.message),
        "the rows are taken"
    );
    while (!b.done) dec.step();
    // b's 2 blocks went back to the pool when it left (c, the last row, moved into its place without a copy)
    assert.equal(dec.canJoin(prompts[3].length, 80), true);
    const d = dec.join(prompts[3], {greedy: true, maxNewTokens: 80});
    while (dec.active > 0) dec.step();
    dec.release();
    // every row gets the tokens of its prompt alone (recomputed from scratch, no cache)
    assert.deepEqual(a.result.newIds, greedyByRecompute(prompts[0], 30));
    assert.deepEqual(b.result.newIds, greedyByRecompute(long, 20));
    assert.deepEqual(c.result.newIds, greedyByRecompute(prompts[1], 40));
    assert.deepEqual(d.result.newIds, greedyByRecompute(prompts[3], 80));
});

test("paged KV cache: a full pool is a one-line error and reserves nothing", async () => {
    const {KVCache} = await import("../src/model/graph.js");
    const cache = new KVCache(model.config, 2, 200, undefined, undefined, 3);
    cache.reserve(0, 130); // 3 blocks
    assert.equal(cache.freeBlockCount, 0);
    assert.throws(
        () => cache.reserve(1, 10),
        (err: unknown) =>
            err instanceof Error &&
            /the key\/value cache is full: a row needs 1 more blocks of 64 positions and 0 of 3 are free/.test(err.message)
    );
    assert.equal(cache.heldBlocks(1), 0);
    cache.moveRow(0, 1);
    assert.deepEqual([cache.heldBlocks(0), cache.heldBlocks(1), cache.freeBlockCount], [0, 3, 0]);
    cache.clearRow(1);
    assert.equal(cache.freeBlockCount, 3);
});
