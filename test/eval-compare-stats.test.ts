// The arithmetic of qlora eval --compare on hand-made results: a difference over the same questions is paired (the
// mean of the per-question differences, with the standard error of that mean, computed here by the formula), a
// macro average's difference averages the subjects' paired differences, a difference over different questions
// combines the two errors and is marked, a loss difference has no error; the columns parse as documented.
import {test} from "node:test";
import assert from "node:assert/strict";
import {type ColumnResult, compareMarkdown, compareReport, compareRows, parseCompareColumns} from "../src/eval/compare.js";
import type {EvalReport} from "../src/eval/results.js";
import type {GroupResult, TaskResult} from "../src/eval/run-task.js";

/** the sample standard deviation over √n, written out */
function stderrOf(xs: number[]): number {
    const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
    return Math.sqrt(xs.reduce((s, x) => s + (x - mean) ** 2, 0) / (xs.length - 1) / xs.length);
}
const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;
const close = (a: number | null, b: number, what: string) =>
    assert.ok(a !== null && Math.abs(a - b) < 1e-12, `${what}: ${a} vs ${b}`);

function group(subject: string, accs: number[], skip = -1): GroupResult {
    const samples = accs.flatMap((acc, i) =>
        i === skip ? [] : [{where: `${subject}.csv row ${i + 2}`, target: "A", prediction: acc ? "A" : "B", scores: {acc}}]
    );
    const values = samples.map((s) => s.scores.acc);
    return {
        subject,
        n: samples.length,
        truncated: 0,
        cached: false,
        scores: {acc: {mean: mean(values), stderr: stderrOf(values)}},
        samples
    };
}

function column(name: string, groups: GroupResult[], loss: number): ColumnResult {
    const all = groups.flatMap((g) => g.samples.map((s) => s.scores.acc));
    const task: TaskResult = {
        task: "mmlu",
        file: "mmlu.yaml",
        version: 1,
        metric: "choice_loglik",
        numFewshot: 0,
        n: all.length,
        truncated: 0,
        cached: false,
        elapsedS: 0,
        scores: {acc: {mean: mean(all), stderr: stderrOf(all)}},
        macro: {
            acc: {
                mean: mean(groups.map((g) => g.scores.acc.mean)),
                stderr: Math.sqrt(groups.reduce((s, g) => s + (g.scores.acc.stderr as number) ** 2, 0)) / groups.length
            }
        },
        groups
    };
    const lossTask: TaskResult = {
        ...task,
        task: "val",
        metric: "loss",
        n: 5,
        scores: {},
        macro: null,
        groups: [{subject: null, n: 5, truncated: 0, cached: false, scores: {}, samples: []}],
        loss: {loss, perplexity: Math.exp(loss), tokens: 100, rows: 5}
    };
    const report: EvalReport = {
        config: {
            model: "m",
            adapter: name === "base" ? null : "a",
            load_in_4bit: false,
            device: "cpu",
            limit: null,
            num_fewshot: null,
            subjects: null,
            batch_size: 8
        },
        tasks: [task, lossTask],
        date: ""
    };
    return {column: parseCompareColumns([name], "a")[0], report, elapsedS: 1};
}

const refA = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1];
const colA = [1, 1, 1, 1, 0, 0, 1, 0, 1, 1]; // one more right
const refB = [0, 0, 1, 0, 1, 0];
const colB = [1, 0, 1, 1, 1, 0]; // two more right

test("a difference over the same questions is paired: the mean and standard error of the per-question differences", () => {
    const rows = compareRows([
        column("base", [group("a", refA), group("b", refB)], 2.5),
        column("adapter", [group("a", colA), group("b", colB)], 2.25)
    ]);
    assert.deepEqual(
        rows.map((r) => r.metric),
        ["acc", "acc_macro", "loss", "perplexity"]
    );
    const [acc, macro, loss] = rows;
    const diffs = [...colA.map((x, i) => x - refA[i]), ...colB.map((x, i) => x - refB[i])];
    const d = acc.diffs[1];
    assert.ok(d);
    assert.equal(d.paired, true);
    close(d.mean, 3 / 16, "mean difference");
    close(d.stderr, stderrOf(diffs), "paired stderr");
    // the point of pairing: smaller than the two scores' errors combined (0.10 vs 0.18 here)
    const combined = Math.sqrt((acc.values[0].stderr as number) ** 2 + (acc.values[1].stderr as number) ** 2);
    assert.ok((d.stderr as number) < 0.6 * combined, `${d.stderr} vs ${combined}`);
    assert.equal(acc.diffs[0], null);
    // macro: each subject's paired difference, averaged; errors combined as the macro average combines them
    const dA = colA.map((x, i) => x - refA[i]);
    const dB = colB.map((x, i) => x - refB[i]);
    close(macro.diffs[1]?.mean ?? null, (mean(dA) + mean(dB)) / 2, "macro difference");
    close(macro.diffs[1]?.stderr ?? null, Math.sqrt(stderrOf(dA) ** 2 + stderrOf(dB) ** 2) / 2, "macro stderr");
    assert.equal(macro.n, 2);
    // a loss: the difference of the two, no standard error
    assert.deepEqual(loss.diffs[1], {mean: 2.25 - 2.5, stderr: null, paired: false});
    assert.deepEqual(loss.values[0], {mean: 2.5, stderr: null});
});

test("different questions: the two errors combined, marked † in the table", () => {
    const ref = column("base", [group("a", refA), group("b", refB)], 2.5);
    const col = column("merged", [group("a", colA, 3), group("b", colB)], 2.5);
    const report = compareReport([ref, col]);
    const [acc] = report.rows;
    const d = acc.diffs[1];
    assert.ok(d);
    assert.equal(d.paired, false);
    close(d.mean, acc.values[1].mean - acc.values[0].mean, "difference of means");
    close(d.stderr, Math.sqrt((acc.values[0].stderr as number) ** 2 + (acc.values[1].stderr as number) ** 2), "combined");
    const md = compareMarkdown(report);
    const line = md.split("\n").find((l) => l.startsWith("| mmlu | acc |"));
    assert.equal(
        line,
        `| mmlu | acc | 16 | ${acc.values[0].mean.toFixed(4)} ± ${(acc.values[0].stderr as number).toFixed(4)} | ` +
            `${acc.values[1].mean.toFixed(4)} ± ${(acc.values[1].stderr as number).toFixed(4)} | ` +
            `+${d.mean.toFixed(4)} ± ${(d.stderr as number).toFixed(4)} † |`
    );
    assert.match(md, /^\| val \| loss \| 5 \| 2\.5000 \| 2\.5000 \| \+0\.0000 \|$/m);
    assert.match(md, /† marks one over different questions/);
    assert.match(md, /^\| Task \| Metric \| n \| base \| merged \| merged − base \|$/m);
});

test("--compare columns: gguf means gguf:q4_k_m; every column but base needs the adapter", () => {
    assert.deepEqual(
        parseCompareColumns(["base", "adapter", "merged", "gguf", "gguf:f16"], "dir").map((c) => [c.name, c.kind, c.ggufType]),
        [
            ["base", "base", undefined],
            ["adapter", "adapter", undefined],
            ["merged", "merged", undefined],
            ["gguf:q4_k_m", "gguf", "q4_k_m"],
            ["gguf:f16", "gguf", "f16"]
        ]
    );
    assert.deepEqual(
        parseCompareColumns(["base"], undefined).map((c) => c.name),
        ["base"]
    );
    assert.throws(() => parseCompareColumns(["gguf", "gguf:q4_k_m"], "dir"), /gguf:q4_k_m twice/);
    assert.throws(
        () => parseCompareColumns(["base", "merged", "gguf"], undefined),
        /--compare merged,gguf:q4_k_m needs --adapter DIR/
    );
});
