// The token choice (src/backend/sampling.ts, the CPU reference of the CUDA kernel) against transformers' logits
// processors written out in float64: RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper, TopKLogitsWarper
// (ties with the k-th kept), TopPLogitsWarper (the most probable tokens whose mass reaches top_p), then a draw. An
// even sweep of the draw over [0, 2^32) must pick each kept token with its probability, and nothing else.
import {test} from "node:test";
import assert from "node:assert/strict";
import {drawBelow, pickTokensHost, type TokenPick} from "../src/backend/sampling.js";
import {Prng, randn32} from "./helpers/prng.js";

/** transformers' processors in float64: each token's probability after them */
function referenceProbs(logits: Float32Array, pick: TokenPick): Float64Array {
    const V = logits.length;
    const x = Float64Array.from(logits);
    for (const t of pick.seen ?? []) x[t] = x[t] < 0 ? x[t] * pick.repetitionPenalty : x[t] / pick.repetitionPenalty;
    for (let i = 0; i < V; i++) x[i] /= pick.temperature;
    if (pick.topK > 0 && pick.topK < V) {
        const kth = [...x].sort((a, b) => b - a)[pick.topK - 1];
        for (let i = 0; i < V; i++) if (x[i] < kth) x[i] = -Infinity;
    }
    const max = Math.max(...x);
    const p = x.map((v) => Math.exp(v - max));
    let sum = p.reduce((a, b) => a + b, 0);
    for (let i = 0; i < V; i++) p[i] /= sum;
    if (pick.topP < 1) {
        const order = [...p.keys()].sort((a, b) => p[b] - p[a]);
        let mass = 0,
            cut = 0;
        for (const i of order) {
            mass += p[i];
            if (mass >= pick.topP) {
                cut = p[i];
                break;
            }
        }
        for (let i = 0; i < V; i++) if (p[i] < cut) p[i] = 0;
        sum = p.reduce((a, b) => a + b, 0);
        for (let i = 0; i < V; i++) p[i] /= sum;
    }
    return p;
}

const V = 400;
const SWEEP = 10000;
const rng = new Prng(11);
const logits = randn32(rng, V, 2);
const seen = Int32Array.from([0, 5, 17, 100, 399]);
// make a penalized token the most likely one, and a negative one stay negative
logits[17] = 5;
logits[100] = -3;

for (const pick of [
    {temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1, seen: null},
    {temperature: 0.7, topK: 50, topP: 0.9, repetitionPenalty: 1, seen: null},
    {temperature: 1.5, topK: 0, topP: 0.6, repetitionPenalty: 1.3, seen},
    {temperature: 0.5, topK: 5, topP: 1, repetitionPenalty: 2, seen},
    {temperature: 3, topK: 399, topP: 0.95, repetitionPenalty: 0.7, seen}
] satisfies Omit<TokenPick, "u32">[]) {
    test(`sampling T=${pick.temperature} top_k=${pick.topK} top_p=${pick.topP} repetition_penalty=${pick.repetitionPenalty}: the draw sweep gives transformers' probabilities`, () => {
        const want = referenceProbs(logits, {...pick, u32: 0});
        const rows = new Float32Array(SWEEP * V);
        for (let j = 0; j < SWEEP; j++) rows.set(logits, j * V);
        const picks = Array.from({length: SWEEP}, (_, j) => ({...pick, u32: Math.floor(((j + 0.5) * 2 ** 32) / SWEEP)}));
        const {ids, nonFinite} = pickTokensHost(rows, V, picks);
        assert.equal(nonFinite, 0);
        const freq = new Float64Array(V);
        for (const id of ids) freq[id] += 1 / SWEEP;
        let worst = 0;
        for (let i = 0; i < V; i++) {
            if (want[i] === 0) assert.equal(freq[i], 0, `token ${i} is outside the kept set but was picked`);
            worst = Math.max(worst, Math.abs(freq[i] - want[i]));
        }
        // an even sweep of N draws lands within one draw of each token's share
        assert.ok(worst <= 1.01 / SWEEP, `the largest frequency error is ${worst} (> 1/${SWEEP})`);
        const kept = want.filter((p) => p > 0).length;
        console.log(`  kept ${kept} of ${V} tokens; largest |frequency - probability| ${worst.toExponential(2)}`);
    });
}

test("greedy: the first of equal maxima; the repetition penalty applies before the argmax", () => {
    const row = Float32Array.from([1, 4, 2, 4, -5]);
    const greedy = {temperature: 0, topK: 0, topP: 1, u32: 0, repetitionPenalty: 1, seen: null};
    assert.deepEqual([...pickTokensHost(row.slice(), 5, [greedy]).ids], [1]);
    // 4 / 2.5 = 1.6 < 2 for both maxima: token 2 wins
    const penalized = {...greedy, repetitionPenalty: 2.5, seen: Int32Array.from([1, 3])};
    assert.deepEqual([...pickTokensHost(row.slice(), 5, [penalized]).ids], [2]);
    // a NaN logit is counted, and the row is answered greedily
    const bad = Float32Array.from([1, Number.NaN, 3]);
    assert.deepEqual(pickTokensHost(bad, 3, [{...greedy, temperature: 1}]), {ids: Int32Array.from([2]), nonFinite: 1});
});

test("drawBelow is floor(u · total / 2^32) exactly for totals up to 2^53", () => {
    for (const [u, total] of [
        [0, 1],
        [2 ** 32 - 1, 1],
        [2 ** 32 - 1, 2 ** 53 - 1],
        [123456789, 400 * 2 ** 31 + 12345],
        [2 ** 31, 3]
    ]) {
        const exact = (BigInt(u) * BigInt(total)) / 2n ** 32n;
        assert.equal(drawBelow(u, total), Number(exact));
        assert.ok(drawBelow(u, total) < total);
    }
});
