// Batched generation: several prompts of different lengths in one forward per step give each prompt the tokens
// generate() gives it alone (greedy and sampled), and the stop reasons per row.
import {test} from "node:test";
import assert from "node:assert/strict";
import {DecoderModel} from "../src/model/decoder.js";
import {generate, generateBatch} from "../src/model/generate.js";
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
