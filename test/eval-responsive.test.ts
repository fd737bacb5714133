// Scoring and generation let the event loop run between steps: a CausalLm computes synchronously, so without it a
// whole task was one chain of promises and a SIGTERM (qlora eval --compare removes its temporary merge on one) or
// a progress bar's timer waited for the task's end. Checked with a model that answers at once: a callback queued
// on the event loop when the work starts runs after the first step, not after the last.
import {test} from "node:test";
import assert from "node:assert/strict";
import {generateUntil} from "../src/eval/generate-until.js";
import {loglikelihoodsOf} from "../src/eval/loglik.js";
import type {EvalLm} from "../src/eval/model.js";
import type {ModelConfig} from "../src/io/hf-config.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {MODEL_DIR} from "./helpers/paths.js";

const tokenizer = await HfTokenizer.load(MODEL_DIR);
const space = tokenizer.encode(" a")[0];

/** a model that computes nothing: every step is ready at once, as a synchronous CausalLm's is */
function instantLm(counter: {steps: number}): EvalLm {
    return {
        config: {maxPositionEmbeddings: 4096} as ModelConfig,
        rowOrder: "longest-first",
        tokenLogprobs: async (rows) => {
            counter.steps++;
            return rows.map((row) => row.reads.map(() => ({logprob: -1, greedy: true})));
        },
        async *greedySteps(prompts, opts) {
            for (let i = 0; i < opts.maxNewTokens; i++) {
                counter.steps++;
                yield prompts.map(() => space);
            }
        },
        lossSums: async () => ({lossSum: 0, targets: 0})
    };
}

/** the steps done when a callback queued on the event loop at the start of `work` ran */
async function stepsBeforeEventLoop(work: (counter: {steps: number}) => Promise<unknown>): Promise<{at: number; total: number}> {
    const counter = {steps: 0};
    let at = -1;
    setImmediate(() => {
        at = counter.steps;
    });
    await work(counter);
    return {at, total: counter.steps};
}

test("generation gives the event loop a turn after every step", async () => {
    const r = await stepsBeforeEventLoop((counter) =>
        generateUntil(instantLm(counter), {tokenizer, eosTokenIds: [16381]}, ["Question: 1 + 1?\nAnswer:"], {
            until: ["Question:"],
            maxGenToks: 300,
            batchSize: 1
        })
    );
    assert.equal(r.total, 300);
    assert.ok(r.at >= 1 && r.at <= 2, `the event loop ran after step ${r.at} of ${r.total}`);
});

test("log-likelihood scoring gives the event loop a turn after every batch", async () => {
    const requests = Array.from({length: 40}, (_, i) => ({context: `question ${i}`, continuations: [" A", " B"]}));
    const r = await stepsBeforeEventLoop((counter) => loglikelihoodsOf(instantLm(counter), tokenizer, requests, {batchSize: 4}));
    assert.equal(r.total, 10);
    assert.ok(r.at >= 1 && r.at <= 2, `the event loop ran after batch ${r.at} of ${r.total}`);
});
