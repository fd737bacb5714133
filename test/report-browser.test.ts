// report.html (src/train/report.ts) in a real browser (test/helpers/browser.ts: Debian's Chromium through
// playwright-core): the report of a real CPU training run on the embedded model, the one a checkpoint leaves before
// the run ends, and edge cases written from records. The axis labels are read from the uPlot instances the page
// keeps (window.qloraCharts): each axis's `_values` are the labels it drew, `_splits` the values they stand for.
import {test} from "node:test";
import assert from "node:assert/strict";
import {copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmdirSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {fineTune} from "../src/api/index.js";
import {formatDuration, timingOf, writeReport, type MetricRecord} from "../src/train/report.js";
import {type BrowserSession, browserSkipReason, openBrowser} from "./helpers/browser.js";
import {REPO_ROOT} from "./helpers/paths.js";

const skip = browserSkipReason();

test("the browser harness: npm installs no browser; a page renders, reports its errors and screenshots as PNG", {
    skip
}, async (t) => {
    // playwright-core has no install script (the `playwright` package would download browsers)
    const lock = JSON.parse(readFileSync(path.join(REPO_ROOT, "package-lock.json"), "utf8"));
    const pw = lock.packages["node_modules/playwright-core"];
    assert.ok(pw, "playwright-core is in package-lock.json");
    assert.equal(pw.hasInstallScript, undefined, "playwright-core runs nothing at install");
    for (const name of ["node_modules/playwright", "node_modules/puppeteer"])
        assert.equal(lock.packages[name], undefined, `${name} would download a browser at install`);

    const b = await openBrowser(t, {width: 400, height: 300});
    await b.page.setContent(`<h1 style="color:#f00">hello</h1><script>console.error("seen"); throw new Error("thrown")</script>`);
    assert.equal(await b.page.textContent("h1"), "hello");
    assert.deepEqual(b.errors, ["console error: seen", "page error: thrown"]);
    const png = readFileSync(await b.screenshot("harness", {fullPage: false}));
    assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], "a PNG signature");
    assert.equal(png.readUInt32BE(16), 400, "the viewport's width");
    assert.equal(png.readUInt32BE(20), 300, "the viewport's height");
});

interface ChartState {
    title: string;
    seriesLabels: string[];
    /** per axis: its label ("step", "tokens/s", "MiB", ...) */
    axisLabels: string[];
    /** per axis: the labels drawn and the values they stand for */
    labels: string[][];
    splits: number[][];
    data: (number | null)[][];
}

/** opens a report and reads every chart's axes, series and data */
async function openReport(b: BrowserSession, file: string): Promise<Record<string, ChartState>> {
    await b.page.goto(`file://${file}`);
    // every chart drawn (uPlot draws in a microtask after its constructor)
    await b.page.waitForFunction(() => {
        // biome-ignore lint/suspicious/noExplicitAny: uPlot's instances, read in the page
        const charts = (globalThis as any).qloraCharts as Record<string, any> | undefined;
        // biome-ignore lint/suspicious/noExplicitAny: as above
        return charts !== undefined && Object.values(charts).every((u) => u.axes.every((a: any) => a._values));
    });
    return b.page.evaluate(() => {
        // biome-ignore lint/suspicious/noExplicitAny: uPlot's instances, read in the page
        const charts = (globalThis as any).qloraCharts as Record<string, any>;
        return Object.fromEntries(
            Object.entries(charts).map(([id, u]) => [
                id,
                {
                    title: u.root.querySelector(".u-title")?.textContent ?? "",
                    // biome-ignore lint/suspicious/noExplicitAny: as above
                    seriesLabels: u.series.map((s: any) => s.label),
                    // biome-ignore lint/suspicious/noExplicitAny: as above
                    axisLabels: u.axes.map((a: any) => a.label),
                    // biome-ignore lint/suspicious/noExplicitAny: as above
                    labels: u.axes.map((a: any) => a._values),
                    // biome-ignore lint/suspicious/noExplicitAny: as above
                    splits: u.axes.map((a: any) => a._splits),
                    data: u.data.map((s: ArrayLike<number | null>) => Array.from(s))
                }
            ])
        );
    });
}

/** the rows of one of the report's tables */
async function tableRows(b: BrowserSession, id: string): Promise<Record<string, string>> {
    return b.page.$$eval(`#${id} tr`, (trs) =>
        Object.fromEntries(trs.map((tr) => [tr.querySelector("th")!.textContent!, tr.querySelector("td")!.textContent!]))
    );
}

/** every x axis is labelled with whole steps inside [1, lastStep]; every y label reads back as its tick */
function checkAxes(charts: Record<string, ChartState>, lastStep: number): void {
    for (const [id, c] of Object.entries(charts)) {
        assert.equal(c.axisLabels[0], "step", id);
        const [x, y] = c.labels;
        assert.ok(x.length >= 2, `${id}: x labels ${JSON.stringify(x)}`);
        for (const label of x) {
            assert.match(label, /^\d+$/, `${id}: the x axis is labelled with steps, not times: ${JSON.stringify(x)}`);
            assert.ok(Number(label) >= 0 && Number(label) <= lastStep + 1, `${id}: x label ${label} outside the steps`);
        }
        assert.ok(y.length >= 2, `${id}: y labels ${JSON.stringify(y)}`);
        const spacing = Math.min(...c.splits[1].slice(1).map((v, i) => v - c.splits[1][i]));
        y.forEach((label, i) => {
            assert.match(label, /^-?\d+(\.\d+)?(e-?\d+)?$/, `${id}: y label ${label}`);
            assert.ok(
                Math.abs(Number(label) - c.splits[1][i]) <= 1e-6 * spacing,
                `${id}: the label ${label} stands for ${c.splits[1][i]} (labels ${JSON.stringify(y)})`
            );
        });
    }
}

const LR = 2e-4;

test("report.html of a real CPU run: steps on the x axes, readable learning rates, tokens/s, memory, eval, timing, hardware, config; one per checkpoint; one over a resumed run", {
    skip
}, async (t) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-report-browser-"));
    t.after(() => rmSync(dir, {recursive: true, force: true}));
    const out = path.join(dir, "run");
    // the report a checkpoint leaves, copied before the run goes on (what a run that crashes after it keeps)
    const atSave = path.join(dir, "report-at-6.html");
    const settings = {
        output_dir: out,
        max_steps: 12,
        logging_steps: 1,
        eval_steps: 4,
        save_steps: 6,
        per_device_train_batch_size: 2,
        max_seq_length: 64,
        learning_rate: LR,
        warmup_steps: 3,
        device: "cpu" as const
    };
    await fineTune(settings, {
        onSave: (d) => d.endsWith("checkpoint-6") && copyFileSync(path.join(out, "report.html"), atSave)
    });
    const records = readFileSync(path.join(out, "metrics.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
    const train = records.filter((r) => r.type === "train");
    assert.equal(train.length, 12);

    const b = await openBrowser(t);
    const charts = await openReport(b, path.join(out, "report.html"));
    assert.deepEqual(Object.keys(charts).sort(), ["eval", "grad_norm", "loss", "lr", "memory", "tokens_per_second"]);
    checkAxes(charts, 12);

    // the learning rate: warmup to LR then cosine; its labels are not "0" and have LR's scale
    const lr = charts.lr.labels[1].map(Number);
    assert.ok(
        charts.lr.labels[1].some((l) => l !== "0"),
        `learning-rate labels ${JSON.stringify(charts.lr.labels[1])}`
    );
    assert.ok(
        Math.max(...lr) >= LR / 2 && Math.max(...lr) <= LR * 2,
        `learning-rate labels ${JSON.stringify(charts.lr.labels[1])}`
    );
    assert.deepEqual(
        charts.lr.data[1],
        train.map((r) => r.learning_rate)
    );
    assert.deepEqual(charts.lr.data[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    // the legend shows the last step's values
    const legend = await b.page.$$eval("#chart-lr .u-legend .u-value", (els) => els.map((e) => e.textContent!));
    assert.equal(legend[0], "12");
    assert.ok(Math.abs(Number(legend[1]) / train[11].learning_rate - 1) < 1e-3, `legend ${JSON.stringify(legend)}`);

    // tokens/s and memory: one positive value per logged step
    const tps = charts.tokens_per_second.data[1];
    assert.deepEqual(
        tps,
        train.map((r) => r.tokens_per_second)
    );
    assert.ok(tps.every((v) => v !== null && v > 0));
    assert.deepEqual(charts.memory.seriesLabels, ["step", "RSS", "max RSS"]);
    assert.match(charts.memory.title, /resident set/);
    const unit = charts.memory.axisLabels[1];
    assert.match(unit, /^(MiB|GiB)$/);
    const peak = charts.memory.data[2];
    assert.equal(peak.length, 12);
    const scale = unit === "GiB" ? 2 ** 30 : 2 ** 20;
    peak.forEach((v, i) => assert.ok(Math.abs(v! * scale - train[i].peak_memory_bytes) < 1, `peak at step ${i + 1}`));

    // train and eval loss on one chart; eval at steps 4, 8, 12 with its perplexity
    const evals = records.filter((r) => r.type === "eval");
    assert.deepEqual(
        evals.map((r) => r.step),
        [4, 8, 12]
    );
    assert.deepEqual(
        charts.loss.data[2].filter((v) => v !== null),
        evals.map((r) => r.eval_loss)
    );
    assert.deepEqual(
        charts.eval.data[1],
        evals.map((r) => r.eval_perplexity)
    );

    const timing = await tableRows(b, "timing");
    assert.equal(timing.status, "finished at step 12");
    assert.equal(timing["logged steps"], "12 of 12");
    assert.equal(timing["tokens seen"], train[11].num_tokens.toLocaleString("en-US"));
    assert.ok(
        Math.abs(Number(timing["mean tokens/s"]) - train[11].num_tokens / train[11].elapsed_s) < 0.1,
        JSON.stringify(timing)
    );
    assert.match(timing["wall clock"], /^\d{4}-\d\d-\d\dT.* to .* \(\d+(\.\d)?s\)$/);
    const hardware = await tableRows(b, "hardware");
    assert.equal(hardware.device, "cpu (--device cpu)");
    assert.match(hardware.CPU, /\d+ threads available$/);
    const config = await tableRows(b, "config");
    assert.equal(config.learning_rate, String(LR));
    assert.equal(config.max_steps, "12");
    const summary = await tableRows(b, "summary");
    assert.equal(summary["final adapter"], path.join(out, "final"));

    assert.deepEqual(b.errors, []);
    assert.deepEqual(
        b.requests.filter((u) => !u.startsWith("file:")),
        [],
        "the report loads nothing from the network"
    );
    console.log(`screenshot: ${await b.screenshot("report-cpu-run")}`);

    // the checkpoint's report: the run up to step 6, marked unfinished
    const partial = await openReport(b, atSave);
    checkAxes(partial, 6);
    assert.deepEqual(partial.lr.data[0], [1, 2, 3, 4, 5, 6]);
    assert.ok(partial.lr.labels[0].every((l) => Number(l) <= 6));
    const partialTiming = await tableRows(b, "timing");
    assert.match(partialTiming.status, /^not finished: step 6 of 12 when this report was written/);
    assert.match((await tableRows(b, "summary"))["final adapter"], /^not yet/);
    assert.deepEqual(b.errors, []);
    console.log(`screenshot: ${await b.screenshot("report-at-checkpoint-6")}`);

    // resumed from checkpoint-12 for 4 more steps: one report over both sessions
    await fineTune({...settings, max_steps: 16, resume_from_checkpoint: true, resume_override: ["max_steps"]});
    const resumed = await openReport(b, path.join(out, "report.html"));
    checkAxes(resumed, 16);
    assert.deepEqual(
        resumed.lr.data[0],
        Array.from({length: 16}, (_, i) => i + 1)
    );
    const resumedTiming = await tableRows(b, "timing");
    assert.equal(resumedTiming.status, "finished at step 16");
    assert.match(resumedTiming["training time"], / in 2 sessions \(resumed\)$/);
    assert.deepEqual(b.errors, []);
});

/** train records as the trainer writes them */
function trainRecords(steps: number[], f: (step: number) => Partial<MetricRecord>): MetricRecord[] {
    return steps.map((step) => ({
        type: "train",
        step,
        total_steps: steps[steps.length - 1],
        loss: 0.5 + 0.001 * Math.cos(step),
        learning_rate: 3e-5,
        grad_norm: 0.25,
        tokens_per_second: 12_345.6,
        num_tokens: step * 4096,
        elapsed_s: step * 0.5,
        memory_bytes: 5.5 * 2 ** 30,
        peak_memory_bytes: 7.25 * 2 ** 30,
        memory_kind: "gpu",
        host_peak_memory_bytes: 3 * 2 ** 30,
        ...f(step)
    }));
}

test("report.html from records: 2,000 steps, a small cosine learning rate, flat losses, GPU memory, one logged step; nothing in a record runs as script", {
    skip
}, async (t) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-report-records-"));
    t.after(() => rmSync(dir, {recursive: true, force: true}));
    const steps = Array.from({length: 200}, (_, i) => (i + 1) * 10);
    const hostile = `</script><script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">`;
    const records: MetricRecord[] = [
        {type: "start", time: "2025-01-01T00:00:00.000Z", total_steps: 2000, config: {}},
        ...trainRecords(steps, (s) => ({learning_rate: 3e-5 * 0.5 * (1 + Math.cos((Math.PI * s) / 2000))})),
        {type: "warning", step: 20, kind: "x", message: hostile}
    ];
    const file = path.join(dir, "report.html");
    await writeReport(file, {
        title: `a run ${hostile}`,
        summary: {model: hostile},
        hardware: {device: "cuda (a GPU)"},
        config: {learning_rate: 3e-5, note: hostile, unset: undefined, target_modules: ["q_proj", "v_proj"]},
        records,
        now: new Date("2025-01-01T00:30:00.000Z")
    });
    const b = await openBrowser(t);
    const charts = await openReport(b, file);
    checkAxes(charts, 2000);
    assert.equal(charts.eval, undefined, "no evaluation chart without eval records");
    // 3e-5 and below: exponent labels, not "0"
    assert.ok(
        charts.lr.labels[1].some((l) => /^[1-9](\.\d+)?e-5$/.test(l)),
        JSON.stringify(charts.lr.labels[1])
    );
    // losses that differ in the third decimal keep their digits
    assert.ok(new Set(charts.loss.labels[1]).size === charts.loss.labels[1].length, JSON.stringify(charts.loss.labels[1]));
    assert.match(charts.memory.title, /GPU memory/);
    assert.equal(charts.memory.axisLabels[1], "GiB");
    assert.deepEqual(charts.memory.seriesLabels, ["step", "allocated", "allocator peak", "host max RSS"]);
    assert.deepEqual(new Set(charts.memory.data[2]), new Set([7.25]), "the allocator's peak in GiB");
    assert.deepEqual(new Set(charts.tokens_per_second.data[1]), new Set([12_345.6]));
    const timing = await tableRows(b, "timing");
    assert.match(timing.status, /^not finished: step 2000 of 2000 when this report was written \(2025-01-01T00:30:00.000Z\)/);
    assert.equal(timing["mean tokens/s"], "8192.0");
    assert.equal(timing["wall clock"], "2025-01-01T00:00:00.000Z to now (30m 0s)");
    // what the records said is shown as text, never run
    assert.equal(await b.page.evaluate(() => (globalThis as {pwned?: number}).pwned), undefined);
    assert.equal(await b.page.textContent(".warnings li"), `step 20: ${hostile}`);
    assert.deepEqual(await tableRows(b, "config"), {
        learning_rate: "0.00003",
        note: hostile,
        unset: "-",
        target_modules: '["q_proj","v_proj"]'
    });
    assert.deepEqual(b.errors, []);
    console.log(`screenshot: ${await b.screenshot("report-records")}`);

    // one logged step: the charts still draw, x labelled with whole steps
    await writeReport(file, {title: "one step", summary: {}, hardware: {}, config: {}, records: trainRecords([1], () => ({}))});
    const one = await openReport(b, file);
    for (const [id, c] of Object.entries(one))
        assert.ok(
            c.labels[0].every((l) => /^\d+$/.test(l)),
            `${id}: ${JSON.stringify(c.labels[0])}`
        );
    // no step logged yet (a checkpoint before the first log): a line instead of charts
    await writeReport(file, {title: "none", summary: {}, hardware: {}, config: {}, records: []});
    assert.deepEqual(await openReport(b, file), {});
    assert.equal(await b.page.textContent("#charts"), "no step logged yet");
    assert.deepEqual(b.errors, []);
});

test("timingOf: training time over resumed sessions (elapsed_s starts again at each), mean tokens/s, status", () => {
    const records: MetricRecord[] = [
        {type: "start", time: "2025-01-01T00:00:00.000Z", total_steps: 40},
        // session 1: steps 10 and 20 at 5 s and 10 s; session 2 (resumed at 20): 30 and 40 at 4 s and 8 s
        ...trainRecords([10, 20], (s) => ({elapsed_s: s / 2, total_steps: 40})),
        ...trainRecords([30, 40], (s) => ({elapsed_s: (s - 20) / 2.5, total_steps: 40})),
        {type: "end", step: 40, time: "2025-01-01T01:00:00.000Z"}
    ];
    const rows = timingOf(records, new Date("2025-01-02T00:00:00.000Z"));
    assert.equal(rows.status, "finished at step 40");
    assert.equal(rows["logged steps"], "40 of 40");
    assert.equal(rows["training time"], "18.0s in 2 sessions (resumed)");
    assert.equal(rows["tokens seen"], (40 * 4096).toLocaleString("en-US"));
    assert.equal(rows["mean tokens/s"], ((40 * 4096) / 18).toFixed(1));
    assert.equal(rows["wall clock"], "2025-01-01T00:00:00.000Z to 2025-01-01T01:00:00.000Z (1h 0m 0s)");
    assert.equal(
        timingOf([], new Date(0)).status,
        `not finished: no step logged when this report was written (${new Date(0).toISOString()})`
    );
    assert.equal(formatDuration(59.94), "59.9s");
    assert.equal(formatDuration(3725), "1h 2m 5s");
});

test("a report that cannot be written at a checkpoint is a warning, not the end of the run", async (t) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-report-unwritable-"));
    t.after(() => rmSync(dir, {recursive: true, force: true}));
    const out = path.join(dir, "run");
    const report = path.join(out, "report.html");
    const warnings: string[] = [];
    const result = await fineTune(
        {output_dir: out, max_steps: 3, save_steps: 2, per_device_train_batch_size: 1, max_seq_length: 32, device: "cpu"},
        {
            // a folder in the report's place: renaming the new report over it fails
            onStep: (step) => step === 1 && mkdirSync(report),
            onSave: (saved) => saved.endsWith("checkpoint-2") && rmdirSync(report),
            onWarning: (w) => warnings.push(w)
        }
    );
    assert.equal(result.globalStep, 3);
    assert.deepEqual(
        warnings.filter((w) => w.includes("report.html")).map((w) => w.replace(/: .*/, "")),
        ["report.html not refreshed at checkpoint-2"]
    );
    assert.match(readFileSync(report, "utf8"), /finished at step 3/);
});
