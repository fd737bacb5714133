// dropout.test.ts: LoRA's dropout masks (native/include/qlora_dropout.h, backend/dropout.ts) are a pure function
// of (seed, element): checked against an independent BigInt splitmix64, and the run's clock advances only with
// training micro-batches, so a resumed run (clock set from the step) draws the masks of an uninterrupted one.
import {test} from "node:test";
import assert from "node:assert/strict";
import {cpu} from "../src/backend/cpu.js";
import {DropoutClock} from "../src/backend/dropout.js";
import {Rng} from "../src/backend/rng.js";
import {collate, type TokenizedRow} from "../src/data/index.js";
import {applyLora} from "../src/peft/inject.js";
import {DecoderModel} from "../src/model/decoder.js";
import {DecoderTrainer} from "../src/model/training.js";
import {MODEL_DIR} from "./helpers/paths.js";

const M64 = (1n << 64n) - 1n;

/** splitmix64 of (seed, i) -> keep when the top 24 bits / 2^24 >= p: the header's rule, written independently */
function keepRef(seed: bigint, i: bigint, p: number): boolean {
    let z = (seed + (i + 1n) * 0x9e3779b97f4a7c15n) & M64;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M64;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M64;
    z ^= z >> 31n;
    return Number(z >> 40n) / 16777216 >= p;
}

test("dropoutMask keeps exactly the elements the splitmix64 rule keeps, scaled by 1 / (1 - p)", () => {
    for (const [seed, p] of [
        [1, 0.1],
        [2 ** 52 + 12345, 0.3],
        [0, 0.05],
        [987654321, 0.5]
    ] as const) {
        const n = 20_001;
        const mask = new Float32Array(n).fill(NaN);
        cpu().dropoutMask(mask, seed, p, n, 0);
        const scale = Math.fround(1 / Math.fround(1 - p));
        let kept = 0;
        for (let i = 0; i < n; i++) {
            const keep = keepRef(BigInt(seed), BigInt(i), p);
            assert.equal(mask[i], keep ? scale : 0, `seed ${seed} p ${p} element ${i}`);
            if (keep) kept++;
        }
        // the rate is right (a binomial 5-sigma band)
        const sd = Math.sqrt(n * p * (1 - p));
        assert.ok(Math.abs(kept - n * (1 - p)) < 5 * sd, `kept ${kept} of ${n} at p ${p}`);
    }
    assert.throws(() => cpu().dropoutMask(new Float32Array(4), 1, 1, 4, 0), /0 <= p < 1/);
    // from element `first`: the masks of elements first, first + 1, ... of the whole tensor
    const first = 2 ** 40 + 3;
    const part = new Float32Array(1000);
    cpu().dropoutMask(part, 77, 0.2, 1000, first);
    for (let i = 0; i < 1000; i++) assert.equal(part[i] !== 0, keepRef(77n, BigInt(first + i), 0.2), `element ${first + i}`);
    assert.throws(() => cpu().dropoutMask(new Float32Array(4), 1, 0.1, 4, -1), /first must be >= 0/);
});

test("the clock: seeds differ by run, micro-batch and projection; evaluation passes do not advance it", async () => {
    const a = new DropoutClock(7),
        b = new DropoutClock(8);
    const seeds = new Set([a.seedFor(0), a.seedFor(1), b.seedFor(0)]);
    a.microBatch = 1;
    seeds.add(a.seedFor(0));
    assert.equal(seeds.size, 4);
    assert.ok(Number.isSafeInteger(new DropoutClock(2 ** 31).seedFor(2 ** 16 - 1)));

    const model = await DecoderModel.load(MODEL_DIR);
    const clock = new DropoutClock(5);
    const lora = applyLora(
        model,
        {r: 4, lora_alpha: 8, target_modules: ["q_proj"], lora_dropout: 0.2, init_lora_weights: false},
        {initRng: new Rng(3), dropoutClock: clock}
    );
    const trainer = new DecoderTrainer(model, clock);
    const row = (n: number): TokenizedRow => ({
        inputIds: Int32Array.from({length: n}, (_, i) => 100 + i),
        labels: Int32Array.from({length: n}, (_, i) => 100 + i)
    });
    const batch = collate([row(9)], {padTokenId: 0});
    const step = () => {
        lora.zeroGrad();
        return trainer.forwardBackward(batch, {lossScale: 1, gradientCheckpointing: false}).lossSum;
    };
    const first = step();
    trainer.forwardBackward(batch, {lossScale: 0, gradientCheckpointing: false, noBackward: true});
    assert.equal(clock.microBatch, 1, "an evaluation pass leaves the clock alone");
    const second = step();
    assert.notEqual(first, second, "the next micro-batch draws other masks");
    clock.microBatch = 1; // what a resume at this point sets
    assert.equal(step(), second, "the same micro-batch number draws the same masks");
});
