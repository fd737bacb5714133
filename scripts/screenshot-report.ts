// screenshot-report.ts: docs/report.png, a screenshot of report.html in Debian's Chromium (test/helpers/browser.ts).
//
//     node --import tsx scripts/screenshot-report.ts                 # trains 60 CPU steps on the embedded model first
//     node --import tsx scripts/screenshot-report.ts run/report.html --out /tmp/report.png
import {mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {parseArgs} from "node:util";
import {fineTune} from "../src/api/index.js";
import {openBrowser} from "../test/helpers/browser.js";
import {REPO_ROOT} from "../test/helpers/paths.js";

const {values, positionals} = parseArgs({
    allowPositionals: true,
    options: {out: {type: "string", default: path.join(REPO_ROOT, "docs", "report.png")}}
});
if (positionals.length > 1 || !values.out!.endsWith(".png"))
    throw new Error("usage: screenshot-report.ts [report.html] [--out file.png]");

let report = positionals[0] ? path.resolve(positionals[0]) : null;
const tmp = report ? null : mkdtempSync(path.join(os.tmpdir(), "qlora-screenshot-"));
try {
    if (!report) {
        // a run with every chart: warmup then cosine, eval every 10 steps; paths relative to the checkout, as a
        // user would type them
        process.chdir(REPO_ROOT);
        const result = await fineTune({
            model: "models/tiny-qwen2",
            dataset: "examples/data/alpaca_train.json",
            eval_dataset: "examples/data/alpaca_eval.json",
            output_dir: path.join(tmp!, "tiny-qwen2-alpaca"),
            max_steps: 60,
            logging_steps: 2,
            eval_steps: 10,
            save_steps: 30,
            per_device_train_batch_size: 2,
            max_seq_length: 64,
            learning_rate: 2e-4,
            warmup_steps: 6,
            device: "cpu"
        });
        report = result.reportFile;
    }
    const b = await openBrowser(undefined, {width: 1100, height: 800, screenshotDir: path.dirname(values.out!)});
    try {
        await b.page.goto(`file://${report}`);
        await b.page.waitForFunction(() => "qloraCharts" in globalThis);
        if (b.errors.length) throw new Error(`the report has errors: ${b.errors.join("; ")}`);
        const file = await b.screenshot(path.basename(values.out!, ".png"));
        console.log(`wrote ${file}`);
    } finally {
        await b.close();
    }
} finally {
    if (tmp) rmSync(tmp, {recursive: true, force: true});
}
