// Scoring on the CPU on top of a cached prefix (src/eval/model.ts PrefixCachedScorer): each row's log-probabilities
// equal those of the row scored alone in one padded forward (a read inside the shared part, a row that is a prefix
// of the previous one, a row sharing nothing, a row longer than the cache so far), only the unshared tokens run, and
// 5-shot MMLU runs each subject's few-shot examples once, not once per question.
import {test} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {loadModel} from "../src/api/models.js";
import type {CausalLm} from "../src/model/causal-lm.js";
import {loadDocGroups} from "../src/eval/docs.js";
import {loglikelihoods} from "../src/eval/loglik.js";
import {causalTokenLogprobs, PrefixCachedScorer, type ScoreRow} from "../src/eval/model.js";
import {fewshotPrefix, questionPrompt} from "../src/eval/prompt.js";
import {loadTask} from "../src/eval/task.js";
import {DATASETS, MODEL_DIR} from "./helpers/paths.js";

const {lm, tokenizer} = await loadModel(MODEL_DIR, {device: "cpu"});

/** the row scored alone, without a cache: the reference */
const alone = (row: ScoreRow) => causalTokenLogprobs(lm, [row])[0];

function assertSameScores(got: {logprob: number; greedy: boolean}[], want: {logprob: number; greedy: boolean}[], what: string) {
    assert.equal(got.length, want.length, what);
    got.forEach((g, j) => {
        assert.ok(Math.abs(g.logprob - want[j].logprob) < 1e-5, `${what}, read ${j}: ${g.logprob} vs ${want[j].logprob}`);
        assert.equal(g.greedy, want[j].greedy, `${what}, read ${j}`);
    });
}

test("rows on a cached prefix score as each row alone; only the unshared tokens run", () => {
    const shared = tokenizer.encode(
        "The following are multiple choice questions (with answers) about anatomy.\n\n" +
            "Which of these bones is in the arm?\nA. femur\nB. humerus\nC. tibia\nD. fibula\nAnswer: B\n\n"
    );
    const q1 = tokenizer.encode("What is the largest organ of the body?\nA. skin\nB. liver\nC. heart\nD. lung\nAnswer:");
    const q2 = tokenizer.encode("Where is the patella?\nA. knee\nB. hip\nC. hand\nD. skull\nAnswer:");
    const letters = [" A", " B", " C", " D"].map((l) => tokenizer.encode(l)[0]);
    const lastReads = (ids: number[]) => letters.map((token) => ({at: ids.length - 1, token}));
    const row1 = [...shared, ...q1];
    const row2 = [...shared, ...q2];
    // a row longer than the first cache (256 positions): the cache grows and starts over
    const long = [...shared, ...tokenizer.encode(" and so on".repeat(90)), ...q1];
    assert.ok(long.length > 256 && row2.length < 256, `${long.length} ${row2.length}`);
    const rows: ScoreRow[] = [
        {ids: row1, reads: lastReads(row1)},
        // shares the few-shot part with row1
        {ids: row2, reads: lastReads(row2)},
        // a prefix of row2 with reads inside it: runs from its first read on, not from the end of what it shares
        {ids: row2.slice(0, 30), reads: [20, 25, 29].map((at) => ({at, token: row2[at + 1]}))},
        // shares nothing with the previous row
        {ids: q2, reads: lastReads(q2)},
        {ids: long, reads: lastReads(long)},
        // shares the few-shot part with `long` (in a new cache)
        {ids: row1, reads: lastReads(row1)}
    ];
    const scorer = new PrefixCachedScorer(lm);
    const got = scorer.score(rows);
    rows.forEach((row, i) => assertSameScores(got[i], alone(row), `row ${i}`));
    const expected = row1.length + q2.length + (30 - 20) + q2.length + long.length + (row1.length - shared.length);
    // row2 shares the few-shot part and the tokens its question starts with (none here: "What" vs "Where")
    const firstDifferent = row2.findIndex((t, j) => t !== row1[j]);
    assert.equal(firstDifferent, shared.length, "row1 and row2 differ from their question's first token on");
    assert.equal(scorer.tokensRun, expected);
    scorer.release();
});

/** a CausalLm that counts the tokens it runs */
function counting(model: CausalLm): {lm: CausalLm; tokens: () => number} {
    let n = 0;
    const proxy: CausalLm = {
        config: model.config,
        device: model.device,
        forward: (ids, B, T, opts) => {
            n += B * T;
            return model.forward(ids, B, T, opts);
        },
        pickForward: (ids, B, T, opts, picks) => model.pickForward(ids, B, T, opts, picks),
        newCache: (batch, capacity, blocks) => model.newCache(batch, capacity, blocks),
        score: (batch) => model.score(batch)
    };
    return {lm: proxy, tokens: () => n};
}

test("5-shot MMLU on the CPU runs each subject's few-shot examples once, and scores as each prompt alone", async () => {
    const task = await loadTask("mmlu", {dataDir: path.join(DATASETS, "eval")});
    const groups = await loadDocGroups(task, {numFewshot: 5, limit: 3, subjects: ["anatomy", "astronomy"]});
    const requests: {context: string; continuations: string[]}[] = [];
    let prefixTokens = 0;
    // the two subjects' questions interleaved: scoring sorts them so that a subject's questions follow each other
    for (let i = 0; i < 3; i++)
        for (const g of groups) {
            const prefix = fewshotPrefix(task.spec, g, g.where[0]);
            if (i === 0) prefixTokens += tokenizer.encode(prefix).length;
            requests.push({
                context: questionPrompt(task.spec, prefix, g.docs[i], g.where[i]),
                continuations: [" A", " B", " C", " D"]
            });
        }
    const count = counting(lm);
    const results = loglikelihoods(count.lm, tokenizer, requests, {batchSize: 8});
    const promptTokens = requests.map((r) => tokenizer.encode(r.context).length);
    const whole = promptTokens.reduce((s, n) => s + n, 0);
    // at most: every prompt's own tokens, plus each subject's examples once (its prefix's last token may merge
    // with the question's first)
    const bound = whole - 2 * (prefixTokens - groups.length);
    console.log(`tokens run: ${count.tokens()} of ${whole} (bound ${bound}; few-shot prefixes ${prefixTokens} tokens)`);
    assert.ok(count.tokens() <= bound, `${count.tokens()} tokens run, more than ${bound}`);
    // each question scores as its prompt alone (one forward of the whole prompt, log-softmax at its last position)
    requests.forEach((r, i) => {
        const ids = tokenizer.encode(r.context);
        const reads = r.continuations.map((c) => ({at: ids.length - 1, token: tokenizer.encode(r.context + c)[ids.length]}));
        const want = alone({ids, reads});
        results[i].logliks.forEach((x, c) =>
            assert.ok(Math.abs(x - want[c].logprob) < 1e-5, `question ${i}, ${r.continuations[c]}: ${x} vs ${want[c].logprob}`)
        );
        assert.deepEqual(
            results[i].greedy,
            want.map((w) => w.greedy)
        );
    });
});
