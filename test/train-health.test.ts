// Training health warnings (src/train/health.ts): each kind fires at the logged step it should and not before,
// once until its condition clears; healthy runs (a real noisy one and synthetic ones) fire nothing; and a real
// `qlora train` whose gradient norm explodes prints the warning and records it in metrics.jsonl,
// trainer_state.json and report.html.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {TrainingHealth, type HealthSample, type HealthWarning} from "../src/train/health.js";
import {Prng} from "./helpers/prng.js";
import {REPO_ROOT} from "./helpers/paths.js";

const SETTINGS = {learningRate: 2e-4, maxGradNorm: 1, warmupSteps: 2};

/** feeds the sequences (steps 1, 2, ...) and returns every warning */
function run(
    losses: number[],
    gradNorms: number[] | number = 1,
    opts: {lr?: number | number[]; targets?: number | null; health?: TrainingHealth} = {}
): HealthWarning[] {
    const health = opts.health ?? new TrainingHealth(SETTINGS);
    const out: HealthWarning[] = [];
    losses.forEach((loss, i) => {
        const s: HealthSample = {
            step: i + 1,
            loss,
            gradNorm: typeof gradNorms === "number" ? gradNorms : gradNorms[i],
            learningRate: Array.isArray(opts.lr) ? opts.lr[i] : (opts.lr ?? 2e-4),
            targets: opts.targets
        };
        out.push(...health.observe(s));
    });
    return out;
}

const steps = (ws: HealthWarning[]) => ws.map((w) => `${w.kind}@${w.step}`);

// the default `qlora train --max_steps 60 --logging_steps 1` (embedded tiny-qwen2, example data, CPU): the logged
// loss, gradient norm and learning rate of every step; step losses range 1.42-9.81 with batches of 4
test("a real healthy run logged every step fires nothing", () => {
    const loss = [
        8.5716, 7.2955, 6.4863, 6.9819, 8.264, 7.2292, 8.2499, 7.535, 5.5697, 5.8025, 7.4248, 7.4314, 7.2246, 9.807, 7.2021,
        4.8442, 6.1661, 4.9564, 5.9641, 6.6637, 6.6469, 6.0943, 5.2405, 6.6909, 4.3492, 5.1203, 4.6635, 4.1188, 5.3787, 3.574,
        3.5874, 3.5186, 5.3524, 1.4193, 5.1752, 3.8914, 2.9063, 3.9135, 5.36, 4.7828, 3.3602, 5.5463, 3.2786, 5.377, 5.3375,
        3.026, 5.9063, 6.0626, 1.6458, 3.979, 4.6161, 6.0416, 4.436, 5.5722, 6.4694, 3.5063, 4.533, 6.486, 5.1403, 5.6438
    ];
    const grad = [
        4.495, 5.216, 6.571, 5.314, 4.894, 8.242, 8.836, 4.969, 7.34, 6.723, 6.092, 7.123, 6.108, 7.751, 7.56, 7.554, 6.157,
        5.586, 8.544, 6.55, 5.669, 6.479, 6.704, 5.008, 5.737, 7.486, 6.459, 5.19, 5.997, 6.118, 5.61, 6.486, 8.419, 3.247, 5.6,
        6.813, 5.873, 5.613, 5.646, 5.405, 5.269, 5.264, 5.416, 4.587, 4.364, 5.124, 6.491, 5.542, 5.001, 6.032, 4.785, 6.579,
        5.673, 4.762, 5.844, 5.527, 5.039, 6.018, 6.467, 5.395
    ];
    const lr = loss.map((_, i) => (i === 0 ? 0 : 2e-4 * 0.5 * (1 + Math.cos((Math.PI * (i - 1)) / 59))));
    assert.deepEqual(steps(run(loss, grad, {lr, targets: 300})), []);
});

test("synthetic healthy runs (noisy decreasing loss, steady gradient norm) fire nothing", () => {
    for (const seed of [1, 2, 3]) {
        const rng = new Prng(seed);
        const n = 2000;
        // a loss falling from 3 to 1 with 20% noise, then a plateau; gradient norms with 30% noise
        const loss = Array.from({length: n}, (_, i) => (1 + 2 * Math.exp(-i / 300)) * (1 + 0.2 * rng.normal()));
        const grad = Array.from({length: n}, () => Math.max(0.05, 0.8 * (1 + 0.3 * rng.normal())));
        assert.deepEqual(steps(run(loss, grad, {targets: 1000})), [], `seed ${seed}`);
    }
});

test("a zero gradient norm warns at its third logging interval, once, and again after it clears", () => {
    const grad = [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    const ws = run(
        grad.map((_, i) => 2 + 0.1 * (i % 2)),
        grad,
        {targets: 120}
    );
    assert.deepEqual(steps(ws), ["grad_norm_zero@5", "grad_norm_zero@11"]);
    assert.match(ws[0].message, /has been 0 \(< 1e-8\) since step 3: nothing trains/);
    assert.match(ws[0].message, /step 5 had 120 label tokens/);
    assert.match(ws[1].message, /since step 9/);
    // below 1e-8 counts as zero; 1e-7 does not
    assert.deepEqual(steps(run([2, 2, 2], 5e-9)), ["grad_norm_zero@3"]);
    assert.deepEqual(steps(run([2, 2, 2, 2, 2], 1e-7)), ["loss_flat@5"]);
});

test("a zero gradient with no label tokens says every label is masked", () => {
    const ws = run([0, 0, 0], 0, {targets: 0});
    assert.deepEqual(steps(ws), ["grad_norm_zero@3"]);
    assert.match(ws[0].message, /Step 3 had no label tokens \(every label masked\)/);
    assert.match(ws[0].message, /completion_only_loss/);
});

test("a flat loss warns after five logging intervals while the learning rate is > 0", () => {
    const flat = [3, 2.5, 2.0, 2.0001, 2.0, 1.9999, 2.0, 2.0, 2.0];
    const ws = run(flat, 0.5);
    // steps 3-7 are the first five within 0.1%
    assert.deepEqual(steps(ws), ["loss_flat@7"]);
    assert.match(ws[0].message, /stayed at 2 \(within 0\.1%\) for 5 logging intervals \(steps 3-7\)/);
    assert.match(ws[0].message, /Raise learning_rate \(now 0\.0002\)/);
    // a spread of 0.15% is not flat
    assert.deepEqual(steps(run([2, 2.003, 2, 2.003, 2, 2.003, 2], 0.5)), []);
    // a learning rate of 0 in the window (warmup's first step) holds it back
    assert.deepEqual(steps(run([2, 2, 2, 2, 2, 2], 0.5, {lr: [0, 1e-4, 2e-4, 2e-4, 2e-4, 2e-4]})), ["loss_flat@6"]);
    // a learned loss near 0 is not a collapse
    assert.deepEqual(steps(run([0.001, 0.001, 0.001, 0.001, 0.001, 0.001], 0.5)), []);
});

test("a gradient norm over 10x its recent median warns at that step, and a non-finite one at once", () => {
    const grad = [1, 1.2, 0.9, 1.1, 1, 9.5, 1, 12, 1, 13];
    const ws = run(
        Array(grad.length)
            .fill(2)
            .map((x, i) => x - i * 0.1),
        grad
    );
    // 9.5 is under 10x the median 1; 12 is over; 13 again, after it cleared at step 9
    assert.deepEqual(steps(ws), ["grad_norm_spike@8", "grad_norm_spike@10"]);
    assert.match(ws[0].message, /the gradient norm is 12 at step 8, 12x its recent median \(1\)/);
    assert.match(ws[0].message, /lower learning_rate \(now 0\.0002\)/);
    assert.match(ws[0].message, /smaller max_grad_norm \(now 1; the QLoRA recipe uses 0\.3\)/);
    // one earlier log is too few for a median
    assert.deepEqual(steps(run([2, 2], [1, 100])), []);
    assert.deepEqual(steps(run([2, 2, 2], [1, 1, 100])), ["grad_norm_spike@3"]);
    const inf = run([2], [Infinity]);
    assert.deepEqual(steps(inf), ["grad_norm_spike@1"]);
    assert.match(inf[0].message, /the gradient norm is Infinity at step 1/);
    // with clipping off, the advice turns it on
    const noClip = new TrainingHealth({...SETTINGS, maxGradNorm: 0, warmupSteps: 0});
    const ws2 = run([2, 2, 2], [1, 1, 50], {health: noClip});
    assert.match(ws2[0].message, /turn clipping on with max_grad_norm 0\.3 \(now 0: off\); add a warmup/);
});

/** logs 1-20 alternate 1.05 / 0.95, then `high` logs alternate 2.05 / 1.95, then back to the first */
function stepUp(high: number, total = 40): number[] {
    return Array.from({length: total}, (_, i) => {
        const step = i + 1;
        return (step > 20 && step <= 20 + high ? 2 : 1) + (step % 2 ? -0.05 : 0.05);
    });
}

test("a rising loss warns at its fourth log whose 5-log median is over 1.5x the lowest 20-log median", () => {
    // the lowest 20-log median is 0.95 (logs 1-5); the typical change 0.1, so the bar is 1.425 and 0.95 + 0.4.
    // Logs 21 on are ~2: the 5-log median passes the bar at log 23 (three of five high), then 24, 25 and 26
    const ws = run(stepUp(20), 1);
    assert.deepEqual(steps(ws), ["loss_diverging@26"]);
    assert.match(
        ws[0].message,
        /the loss is rising: 2\.05 \(median of the last 5 logs\) against a lowest 0\.95 \(median of 20\), for 4 logging intervals/
    );
    assert.match(ws[0].message, /lower learning_rate/);
    // three high logs make three high medians, then it falls back: nothing
    assert.deepEqual(steps(run(stepUp(3), 1)), []);
    assert.deepEqual(steps(run(stepUp(4), 1)), ["loss_diverging@26"]);
});

test("the same 1.7x rise is divergence in a quiet run and noise in a noisy one", () => {
    const shifted = (noise: number, seed: number) => {
        const rng = new Prng(seed);
        return Array.from({length: 60}, (_, i) => (i < 30 ? 1 : 1.7) * (1 + noise * (2 * rng.uniform() - 1)));
    };
    for (const seed of [1, 2, 3, 4, 5]) {
        const quiet = run(shifted(0.05, seed), 1);
        assert.equal(quiet.length, 1, `seed ${seed}: ${steps(quiet)}`);
        assert.equal(quiet[0].kind, "loss_diverging");
        // three of five logs high (log 33), then three more logs
        assert.equal(quiet[0].step, 36, `seed ${seed}`);
        assert.deepEqual(steps(run(shifted(0.5, seed), 1)), [], `seed ${seed}`);
    }
});

test("a resumed run continues the medians from log_history and says a standing condition again", () => {
    const history: HealthSample[] = [1, 2, 3, 4].map((step) => ({step, loss: 2 - step * 0.1, gradNorm: 1, learningRate: 2e-4}));
    const resumed = new TrainingHealth(SETTINGS);
    resumed.replay(history);
    // without the history the first log has no median to compare with
    assert.deepEqual(steps(run([1.5], [20], {health: resumed})), ["grad_norm_spike@1"]);
    assert.deepEqual(steps(run([1.5], [20])), []);
    // a zero gradient norm that held at the checkpoint warns at the first log after the resume
    const zero = new TrainingHealth(SETTINGS);
    zero.replay([1, 2, 3].map((step) => ({step, loss: 0, gradNorm: 0, learningRate: 2e-4})));
    assert.deepEqual(steps(run([0], [0], {health: zero})), ["grad_norm_zero@1"]);
});

const CLI = path.join(REPO_ROOT, "src", "cli", "main.ts");

test("qlora train with learning_rate 1: the gradient norm explodes at step 3, warned on stdout and recorded", () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-health-"));
    try {
        const out = path.join(dir, "run");
        // step 1 trains with warmup's lr 0, step 2 with lr 1: the gradient of step 3 is ~500x the first two
        const r = spawnSync(
            process.execPath,
            [
                "--import",
                "tsx",
                CLI,
                "train",
                ...["--output_dir", out, "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1"],
                ...["--per_device_train_batch_size", "2", "--max_seq_length", "64", "--eval_strategy", "no"]
            ],
            {encoding: "utf8", cwd: REPO_ROOT}
        );
        assert.equal(r.status, 0, r.stderr);
        const warnings = r.stdout.split("\n").filter((l) => l.startsWith("warning:"));
        assert.equal(warnings.length, 1, r.stdout);
        assert.match(
            warnings[0],
            /^warning: step 3: the gradient norm is [\d.]+ at step 3, [\d.]+x its recent median \([\d.]+\): lower learning_rate \(now 1\)/
        );
        // the warning comes after step 3's log line, and the steps before it are quiet
        const lines = r.stdout.split("\n");
        assert.ok(lines.findIndex((l) => l.startsWith("step 3/3")) < lines.indexOf(warnings[0]));
        const records = readFileSync(path.join(out, "metrics.jsonl"), "utf8")
            .trim()
            .split("\n")
            .map((l) => JSON.parse(l));
        const trainLogs = records.filter((x) => x.type === "train");
        assert.ok(trainLogs[2].grad_norm > 10 * Math.max(trainLogs[0].grad_norm, trainLogs[1].grad_norm));
        const rec = records.filter((x) => x.type === "warning");
        assert.deepEqual(
            rec.map((x) => [x.step, x.kind]),
            [[3, "grad_norm_spike"]]
        );
        assert.equal(`warning: step 3: ${rec[0].message}`, warnings[0]);
        const state = JSON.parse(readFileSync(path.join(out, "checkpoint-3", "trainer_state.json"), "utf8"));
        assert.deepEqual(
            state.log_history
                .filter((h: {warning?: string}) => h.warning)
                .map((h: {step: number; warning: string}) => [h.step, h.warning]),
            [[3, "grad_norm_spike"]]
        );
        const html = readFileSync(path.join(out, "report.html"), "utf8");
        assert.match(html, /<h2>health warnings<\/h2><ul class="warnings"><li>step 3: the gradient norm is/);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});
