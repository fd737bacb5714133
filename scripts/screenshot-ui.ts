// screenshot-ui.ts: docs/ui.png, qlora ui during a run, in Debian's Chromium (test/helpers/browser.ts). It trains a
// short earlier run to compare with, starts a second one from the form (the embedded model on the example data, on
// the CPU), waits for its curves and takes the picture while it runs; then stops it.
//
//     node --import tsx scripts/screenshot-ui.ts [--out docs/ui.png]
import {mkdirSync, mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {parseArgs} from "node:util";
import {fineTune} from "../src/api/index.js";
import {openBrowser} from "../test/helpers/browser.js";
import {REPO_ROOT} from "../test/helpers/paths.js";
import {buildPage, startUi} from "../test/helpers/ui.js";

const {values} = parseArgs({options: {out: {type: "string", default: path.join(REPO_ROOT, "docs", "ui.png")}}});
if (!values.out!.endsWith(".png")) throw new Error("usage: screenshot-ui.ts [--out file.png]");

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-ui-screenshot-"));
const root = path.join(tmp, "runs");
mkdirSync(root);
process.chdir(REPO_ROOT);
const common = {
    max_steps: 60,
    logging_steps: 2,
    eval_steps: 10,
    per_device_train_batch_size: 2,
    max_seq_length: 64,
    device: "cpu" as const
};
try {
    // the run to compare with: a higher learning rate
    await fineTune({...common, learning_rate: 1e-3, warmup_steps: 6, save_steps: 60, output_dir: path.join(root, "lr-1e-3")});
    const app = await startUi({outputRoot: root, assetsDir: buildPage(path.join(tmp, "page"))});
    const b = await openBrowser(undefined, {width: 1400, height: 1250, screenshotDir: path.dirname(values.out!)});
    try {
        const page = b.page;
        await page.goto(app.base);
        await page.waitForSelector("#f-max_steps", {state: "attached"});
        // the keys set below are in several sections of the form
        await page.$$eval("details.section", (ds) => ds.forEach((d) => d.setAttribute("open", "")));
        const form: Record<string, string> = {
            output_dir: "lr-2e-4",
            learning_rate: "2e-4",
            warmup_steps: "6",
            save_steps: "60",
            ...Object.fromEntries(Object.entries(common).map(([k, v]) => [k, String(v)]))
        };
        for (const [key, value] of Object.entries(form)) {
            const el = page.locator(`#f-${key}`);
            if ((await el.evaluate((e) => e.tagName)) === "SELECT") await el.selectOption(value);
            else await el.fill(value);
        }
        await page.click("#start");
        // curves with a few points, an eval point, while it runs
        await page.locator("#run-status", {hasText: /running · step (2[0-9]|[3-5][0-9])\//}).waitFor({timeout: 300_000});
        await page.locator("#runs tbody tr", {hasText: "lr-1e-3"}).locator("input").check();
        await page.locator("#runs tbody tr", {hasText: "lr-2e-4"}).locator("input").check();
        // the form's first section on screen again
        await page.$$eval("details.section", (ds) =>
            ds.forEach((d, i) => (i === 0 ? d.setAttribute("open", "") : d.removeAttribute("open")))
        );
        await page.$eval("#new-run", (panel) => panel.scrollTo(0, 0));
        await page.waitForTimeout(500);
        if (b.errors.length) throw new Error(`the page has errors: ${b.errors.join("; ")}`);
        const file = await b.screenshot(path.basename(values.out!, ".png"), {fullPage: false});
        console.log(`wrote ${file}`);
    } finally {
        await b.close();
        await app.close();
    }
} finally {
    rmSync(tmp, {recursive: true, force: true});
}
