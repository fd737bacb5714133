// Learning-rate schedules (transformers' formulas, SPEC-training.md §10), warmup resolution and scheduler resume.
import {test, describe} from "node:test";
import assert from "node:assert/strict";
import {QloraError} from "../src/errors.js";
import {LRScheduler, SCHEDULER_TYPES, lrLambda, resolveWarmupSteps, type LRSchedulerState} from "../src/optim/schedule.js";

function close(actual: number, expected: number, tol = 1e-12, what = ""): void {
    assert.ok(Math.abs(actual - expected) <= tol, `${what} ${actual} != ${expected}`);
}

describe("lrLambda", () => {
    test("worked check: cosine, peak 2e-4, W = 10, T = 100", () => {
        const s = new LRScheduler({type: "cosine", baseLr: 2e-4, warmupSteps: 10, totalSteps: 100});
        const lrs: number[] = [];
        for (let update = 1; update <= 100; update++) {
            lrs.push(s.getLr());
            s.step();
        }
        assert.equal(lrs[0], 0); // update 1
        close(lrs[10], 2e-4, 1e-18); // update 11
        close(lrs[55], 1e-4, 1e-18); // update 56 (t = 55)
        close(lrs[99], 6.09e-8, 0.01e-8); // update 100 (t = 99)
        close(lrs[99], 2e-4 * 0.5 * (1 + Math.cos((Math.PI * 89) / 90)), 1e-20);
        close(lrs[5], 1e-4, 1e-18); // warmup: t / W
    });

    test("constant ignores warmup; constant_with_warmup ramps", () => {
        assert.equal(lrLambda("constant", 0, 10, 100), 1);
        assert.equal(lrLambda("constant", 99, 10, 100), 1);
        assert.equal(lrLambda("constant_with_warmup", 0, 10, 100), 0);
        assert.equal(lrLambda("constant_with_warmup", 4, 10, 100), 0.4);
        assert.equal(lrLambda("constant_with_warmup", 10, 10, 100), 1);
        assert.equal(lrLambda("constant_with_warmup", 500, 10, 100), 1);
    });

    test("linear", () => {
        assert.equal(lrLambda("linear", 0, 0, 100), 1);
        assert.equal(lrLambda("linear", 5, 10, 100), 0.5);
        assert.equal(lrLambda("linear", 10, 10, 100), 1);
        assert.equal(lrLambda("linear", 55, 10, 100), 0.5);
        assert.equal(lrLambda("linear", 99, 10, 100), 1 / 90);
        assert.equal(lrLambda("linear", 100, 10, 100), 0);
        assert.equal(lrLambda("linear", 120, 10, 100), 0);
        assert.equal(lrLambda("linear", 0, 0, 0), 0); // max(1, T - W) guards the division
    });

    test("cosine with num_cycles", () => {
        assert.equal(lrLambda("cosine", 0, 0, 100), 1);
        close(lrLambda("cosine", 25, 0, 100), 0.5 * (1 + Math.cos(Math.PI / 4)));
        close(lrLambda("cosine", 50, 0, 100, {num_cycles: 1}), 0); // a full wave: back down at the middle
        close(lrLambda("cosine", 100, 0, 100, {num_cycles: 1}), 1); // and up again at the end
        assert.equal(lrLambda("cosine", 150, 0, 100), 0.5 * (1 + Math.cos(Math.PI * 1.5)));
    });

    test("cosine_with_restarts", () => {
        const f = (t: number, kw = {}) => lrLambda("cosine_with_restarts", t, 10, 110, kw);
        assert.equal(f(5), 0.5);
        assert.equal(f(10), 1);
        close(f(60), 0.5); // one cycle: progress 0.5 is halfway down
        close(f(109), 0.5 * (1 + Math.cos(Math.PI * 0.99)));
        close(f(35, {num_cycles: 2}), 0.5); // two cycles: (2 * 0.25) mod 1 = 0.5
        close(f(60, {num_cycles: 2}), 1); // restart at progress 0.5
        close(f(85, {num_cycles: 2}), 0.5);
        assert.equal(f(110), 0); // progress >= 1
        assert.equal(f(200), 0);
    });

    test("cosine_with_min_lr", () => {
        const rate = 0.1;
        close(lrLambda("cosine_with_min_lr", 0, 0, 100, {min_lr_rate: rate}), 1);
        close(lrLambda("cosine_with_min_lr", 50, 0, 100, {min_lr_rate: rate}), 0.5 * 0.9 + 0.1);
        close(lrLambda("cosine_with_min_lr", 100, 0, 100, {min_lr_rate: rate}), 0.1);
        close(lrLambda("cosine_with_min_lr", 100, 0, 100, {min_lr: 2e-5}, 2e-4), 0.1);
        assert.equal(lrLambda("cosine_with_min_lr", 3, 10, 100, {min_lr_rate: rate}), 0.3);
        assert.throws(() => lrLambda("cosine_with_min_lr", 0, 0, 100), /min_lr or min_lr_rate/);
        assert.throws(() => lrLambda("cosine_with_min_lr", 0, 0, 100, {min_lr: 1e-5, min_lr_rate: 0.1}, 1e-4), /only one/);
    });

    test("cosine_warmup_with_min_lr", () => {
        const kw = {min_lr_rate: 0.1};
        assert.equal(lrLambda("cosine_warmup_with_min_lr", 0, 10, 110, kw), 0.1); // (t + 1) / W
        assert.equal(lrLambda("cosine_warmup_with_min_lr", 9, 10, 110, kw), 1);
        close(lrLambda("cosine_warmup_with_min_lr", 59, 10, 110, kw), 0.5 * 0.9 + 0.1); // p = (t - W + 1) / (T - W)
        close(lrLambda("cosine_warmup_with_min_lr", 109, 10, 110, kw), 0.1);
        close(lrLambda("cosine_warmup_with_min_lr", 0, 10, 110, {...kw, warmup_lr_rate: 0.2}), 0.2);
        close(lrLambda("cosine_warmup_with_min_lr", 9, 10, 110, {...kw, warmup_lr_rate: 0.2}), 1);
    });

    test("polynomial", () => {
        const lr = 1e-3;
        const f = (t: number, kw = {}) => lrLambda("polynomial", t, 10, 110, kw, lr);
        assert.equal(f(5), 0.5);
        close(f(10), 1);
        close(f(60), ((lr - 1e-7) * 0.5 + 1e-7) / lr);
        close(f(60, {power: 2, lr_end: 1e-4}), ((lr - 1e-4) * 0.25 + 1e-4) / lr);
        close(f(110), 1e-7 / lr);
        close(f(111), 1e-7 / lr);
        assert.throws(() => lrLambda("polynomial", 0, 0, 10, {lr_end: 1e-3}, 1e-3), /smaller than/);
        assert.throws(() => lrLambda("polynomial", 0, 0, 10), /peak learning rate/);
    });

    test("inverse_sqrt", () => {
        assert.equal(lrLambda("inverse_sqrt", 5, 10, 100), 0.5);
        assert.equal(lrLambda("inverse_sqrt", 10, 10, 100), 1);
        close(lrLambda("inverse_sqrt", 30, 10, 100), 1 / Math.sqrt(3)); // timescale = W
        close(lrLambda("inverse_sqrt", 30_000, 0, 100), 1 / Math.sqrt(4)); // timescale 10,000 when W = 0
        close(lrLambda("inverse_sqrt", 40, 10, 100, {timescale: 20}), 1 / Math.sqrt(2.5));
    });

    test("warmup_stable_decay", () => {
        const kw = {num_decay_steps: 20};
        const f = (t: number, extra = {}) => lrLambda("warmup_stable_decay", t, 10, 100, {...kw, ...extra});
        assert.equal(f(5), 0.5); // linear warmup
        close(f(5, {warmup_type: "cosine"}), 0.5 * (1 - Math.cos(Math.PI * 0.5)));
        close(f(5, {warmup_type: "1-sqrt"}), 1 - Math.sqrt(0.5));
        assert.equal(f(10), 1);
        assert.equal(f(79), 1); // stable: T - W - D = 70 steps
        assert.equal(f(80), 1); // decay p = 0
        close(f(90), 0.5); // cosine decay, p = 0.5
        close(f(90, {decay_type: "linear"}), 0.5);
        close(f(90, {decay_type: "1-sqrt"}), 1 - Math.sqrt(0.5));
        close(f(90, {min_lr_ratio: 0.2}), 0.5 * 0.8 + 0.2);
        assert.equal(f(100, {min_lr_ratio: 0.2}), 0.2); // after the decay
        close(f(30, {num_stable_steps: 10}), 0.5); // W + S = 20, p = 10 / 20
        assert.throws(() => lrLambda("warmup_stable_decay", 0, 10, 100), /num_decay_steps/);
        assert.throws(() => f(5, {warmup_type: "exp"}), /warmup_type/);
    });

    test("unknown schedules and arguments are user errors", () => {
        assert.throws(
            () => lrLambda("cosine_annealing", 0, 0, 10),
            (err: unknown) => {
                assert.ok(err instanceof QloraError);
                assert.match(err.message, /^lr_scheduler_type: unknown schedule "cosine_annealing"/);
                for (const type of SCHEDULER_TYPES) assert.ok(err.message.includes(type));
                return true;
            }
        );
        assert.throws(() => lrLambda("reduce_lr_on_plateau", 0, 0, 10), /not supported/);
        assert.throws(() => lrLambda("linear", 0, 0, 10, {num_cycles: 2}), /not an argument of the linear/);
    });
});

describe("resolveWarmupSteps", () => {
    test("steps, v5 fractional steps, and ratios round up", () => {
        assert.equal(resolveWarmupSteps({}, 100), 0);
        assert.equal(resolveWarmupSteps({warmup_steps: 5}, 100), 5);
        assert.equal(resolveWarmupSteps({warmup_steps: 5, warmup_ratio: 0.5}, 100), 5); // steps win
        assert.equal(resolveWarmupSteps({warmup_ratio: 0.03}, 100), 3);
        assert.equal(resolveWarmupSteps({warmup_ratio: 0.03}, 1000), 30);
        assert.equal(resolveWarmupSteps({warmup_ratio: 0.03}, 101), 4); // ceil(3.03)
        assert.equal(resolveWarmupSteps({warmup_steps: 0.1}, 55), 6); // ceil(5.5)
        assert.equal(resolveWarmupSteps({warmup_steps: 0, warmup_ratio: 0.1}, 55), 6);
        assert.throws(() => resolveWarmupSteps({warmup_steps: 2.5}, 100), /warmup_steps/);
        assert.throws(() => resolveWarmupSteps({warmup_ratio: 2}, 100), /warmup_ratio/);
    });
});

describe("LRScheduler state", () => {
    test("save/load continues identically", () => {
        const options = {
            type: "warmup_stable_decay",
            baseLr: 3e-4,
            warmupSteps: 7,
            totalSteps: 60,
            kwargs: {num_decay_steps: 13, decay_type: "1-sqrt" as const, min_lr_ratio: 0.05}
        };
        const a = new LRScheduler(options);
        const straight: number[] = [];
        for (let t = 0; t < 60; t++) {
            straight.push(a.getLr());
            a.step();
        }
        const b = new LRScheduler(options);
        const resumed: number[] = [];
        for (let t = 0; t < 25; t++) {
            resumed.push(b.getLr());
            b.step();
        }
        const saved = JSON.parse(JSON.stringify(b.stateDict())) as LRSchedulerState;
        assert.equal(saved.step, 25);
        const c = new LRScheduler({type: "constant", baseLr: 1, warmupSteps: 0, totalSteps: 1});
        c.loadStateDict(saved);
        assert.equal(c.stepCount, 25);
        assert.equal(c.type, "warmup_stable_decay");
        for (let t = 25; t < 60; t++) {
            resumed.push(c.getLr());
            c.step();
        }
        assert.deepEqual(resumed, straight);
    });

    test("bad options are refused at construction", () => {
        assert.throws(
            () => new LRScheduler({type: "cosine_with_min_lr", baseLr: 1e-4, warmupSteps: 0, totalSteps: 10}),
            /min_lr/
        );
        assert.throws(() => new LRScheduler({type: "linear", baseLr: 1e-4, warmupSteps: 1.5, totalSteps: 10}), /warmup_steps/);
        assert.throws(() => new LRScheduler({type: "linear", baseLr: -1, warmupSteps: 0, totalSteps: 10}), /learning_rate/);
    });
});
