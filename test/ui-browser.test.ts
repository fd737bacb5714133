// qlora ui in a real Chromium (test/helpers/browser.ts): the form drawn from the schema, a bad value answered with the
// CLI's message, a short CPU training started from the form with its loss chart growing while it runs, stopped
// (a checkpoint), resumed to the end, a chat with the result, and the runs compared. The charts are read from the
// uPlot instances the page keeps (window.qloraCharts): the x axes are labelled with steps and the learning rate's
// labels are not all "0"; screenshots are taken during the run and at the end.
import {after, before, test} from "node:test";
import assert from "node:assert/strict";
import {mkdirSync, mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import type {Page} from "playwright-core";
import {TRAIN_CONFIG_KEYS} from "../src/train/config.js";
import {browserSkipReason, openBrowser} from "./helpers/browser.js";
import {buildPage, call, startUi, type RunningUi} from "./helpers/ui.js";

const skip = browserSkipReason();
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-ui-browser-"));
const root = path.join(tmp, "runs");
mkdirSync(root);
let app: RunningUi;

before(async () => {
    app = await startUi({outputRoot: root, assetsDir: buildPage(path.join(tmp, "page"))});
});
after(async () => {
    await app?.close();
    rmSync(tmp, {recursive: true, force: true});
});

/** window.qloraCharts as the page's code below reads it */
type Drawn = {qloraCharts?: Record<string, {data: number[][]}>};

interface DrawnChart {
    axisLabels: string[];
    /** per axis: the labels uPlot drew */
    labels: string[][];
    data: (number | null)[][];
}

/** the charts drawn on the page now, read from their uPlot instances */
function charts(page: Page): Promise<Record<string, DrawnChart>> {
    return page.evaluate(() => {
        // biome-ignore lint/suspicious/noExplicitAny: uPlot's instances, read in the page
        const drawn = (globalThis as {qloraCharts?: Record<string, any>}).qloraCharts ?? {};
        return Object.fromEntries(
            Object.entries(drawn).map(([id, u]) => [
                id,
                {
                    // biome-ignore lint/suspicious/noExplicitAny: as above
                    axisLabels: u.axes.map((a: any) => a.label),
                    // biome-ignore lint/suspicious/noExplicitAny: as above
                    labels: u.axes.map((a: any) => a._values ?? []),
                    data: u.data.map((s: ArrayLike<number | null>) => Array.from(s))
                }
            ])
        );
    });
}

/** x axes labelled with whole steps; y labels that are numbers, not all the same (2e-4 is not "0") */
function checkAxes(drawn: Record<string, DrawnChart>, ids: string[]): void {
    for (const id of ids) {
        const c = drawn[id];
        assert.ok(c, `chart ${id} drawn`);
        assert.equal(c.axisLabels[0], "step", id);
        const [x, y] = c.labels;
        assert.ok(x.length >= 2, `${id}: x labels ${JSON.stringify(x)}`);
        for (const label of x) assert.match(label, /^\d+$/, `${id}: the x axis is labelled with steps: ${JSON.stringify(x)}`);
        assert.ok(y.length >= 2, `${id}: y labels ${JSON.stringify(y)}`);
        for (const label of y) assert.match(label, /^-?\d+(\.\d+)?(e-?\d+)?$/, `${id}: y label ${label}`);
        assert.ok(new Set(y).size === y.length, `${id}: y labels tell their ticks apart: ${JSON.stringify(y)}`);
    }
}

/** waits until the run's status line matches */
const waitForStatus = (page: Page, pattern: RegExp, timeout: number) =>
    page.locator("#run-status", {hasText: pattern}).waitFor({timeout});

const statusText = (page: Page) => page.textContent("#run-status").then((t) => t ?? "");

test("the UI in Chromium: form, a run watched live, stop, resume, chat, compare", {skip, timeout: 600_000}, async (t) => {
    const b = await openBrowser(t, {width: 1400, height: 1100});
    const page = b.page;
    await page.goto(app.base);
    await page.waitForSelector("#f-max_steps", {state: "attached"});

    // one field per key of the schema, in its order, each holding its default
    const names = await page.$$eval("#run-form [name]", (els) => els.map((e) => e.getAttribute("name")));
    assert.deepEqual(names, TRAIN_CONFIG_KEYS);
    assert.equal(await page.inputValue("#f-learning_rate"), "0.0002");
    assert.equal(await page.inputValue("#f-optim"), "paged_adamw_8bit");
    assert.equal(await page.inputValue("#f-target_modules"), "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj");
    assert.match(await page.inputValue("#f-output_dir"), /^run-\d{8}-\d{6}/);
    await page.$$eval("details.section", (ds) => ds.forEach((d) => d.setAttribute("open", "")));

    // a bad value: the message of `qlora train` (test/ui.test.ts compares the API's with the CLI's)
    await page.fill("#f-learning_rate", "-1");
    await page.click("#check");
    await page.locator("#form-error", {hasText: /./}).waitFor();
    const expected = await call<{error: {message: string}}>(`${app.base}/api/config`, {
        values: {learning_rate: "-1", output_dir: "x"}
    });
    assert.equal(await page.textContent("#form-error"), expected.body.error.message);
    assert.match(expected.body.error.message, /^command line: learning_rate: /);

    // a short run from the form
    const form: Record<string, string> = {
        learning_rate: "2e-4",
        max_steps: "12",
        logging_steps: "1",
        eval_steps: "4",
        save_steps: "1000",
        warmup_steps: "3",
        per_device_train_batch_size: "2",
        max_seq_length: "64",
        device: "cpu",
        output_dir: "browser-run"
    };
    for (const [key, value] of Object.entries(form)) {
        if ((await page.locator(`#f-${key}`).evaluate((e) => e.tagName)) === "SELECT")
            await page.selectOption(`#f-${key}`, value);
        else await page.fill(`#f-${key}`, value);
    }
    await page.click("#start");
    await waitForStatus(page, /running · step \d+\/12/, 60_000);
    assert.equal(await page.textContent("#form-error"), "");
    assert.match((await page.textContent("#run-command")) ?? "", /^qlora train .*--max_steps=12 .*--output_dir=/);

    // the loss chart grows while the run goes on: points added by the events, not by a reload
    const lossPoints = async () => {
        const now = await charts(page);
        return now.loss ? now.loss.data[0].length : 0;
    };
    await page.waitForFunction(() => ((globalThis as unknown as Drawn).qloraCharts?.loss?.data[0].length ?? 0) >= 2, undefined, {
        timeout: 60_000
    });
    const before = await lossPoints();
    await page.waitForFunction((n) => ((globalThis as unknown as Drawn).qloraCharts?.loss?.data[0].length ?? 0) > n, before, {
        timeout: 60_000
    });
    const during = await statusText(page);
    const later = await lossPoints();
    assert.ok(later > before, `${before} -> ${later} points`);
    assert.match(during, /^running · step \d+\/12 · loss \d/);
    assert.match(during, /ETA \d+:\d\d/);
    const running = await charts(page);
    checkAxes(running, ["loss", "lr", "tps", "memory"]);
    assert.ok(
        running.lr.labels[1].some((l) => l !== "0" && /e-/.test(l)),
        `learning rate labels ${JSON.stringify(running.lr.labels[1])}`
    );
    const shot = readFileSync(await b.screenshot("ui-running", {fullPage: false}));
    assert.equal(shot.readUInt32BE(16), 1400, "a PNG of the viewport");
    assert.match((await page.textContent("#log")) ?? "", /step +\d+\/12 \| loss/);

    // stop: a checkpoint, then resume to the end
    await page.click("#stop");
    await waitForStatus(page, /^stopped · step \d+\/12/, 60_000);
    const stoppedAt = Number(/step (\d+)\//.exec(await statusText(page))![1]);
    assert.ok(stoppedAt >= 2 && stoppedAt < 12, `stopped at ${stoppedAt}`);
    assert.ok(await page.isEnabled("#resume"));
    assert.ok(await page.isDisabled("#stop"));
    assert.match((await page.textContent("#log")) ?? "", /stopped by SIGINT after step \d+; saved .*checkpoint-\d+/);
    await page.click("#resume");
    await waitForStatus(page, /^finished · step 12\/12/, 120_000);
    const done = await charts(page);
    assert.deepEqual(done.loss.data[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "every step once over the stop and the resume");
    assert.deepEqual(
        done.loss.data[2].flatMap((v, i) => (v === null || v === undefined ? [] : [done.loss.data[0][i]])),
        [4, 8, 12],
        "eval points"
    );
    checkAxes(done, ["loss", "lr", "tps", "memory"]);
    for (const label of done.loss.labels[0]) assert.ok(Number(label) >= 0 && Number(label) <= 13, `x label ${label}`);

    // chat with the result
    await page.waitForSelector("#chat-panel:not([hidden])");
    assert.match((await page.textContent("#chat-adapter")) ?? "", /browser-run\/final$/);
    await page.fill("#chat-input", "Give me a color.");
    await page.click("#chat-send");
    await page.locator(".msg.assistant:not(.pending)", {hasText: /./}).waitFor({timeout: 60_000});
    assert.equal(await page.textContent("#chat-error"), "");
    assert.equal(await page.textContent(".msg.user"), "Give me a color.");

    // compare: the run's loss in the overlay chart
    await page.locator("#runs tbody tr", {hasText: "browser-run"}).locator("input").check();
    await page.waitForFunction(
        () => ((globalThis as unknown as Drawn).qloraCharts?.compare?.data[0].length ?? 0) === 12,
        undefined,
        {
            timeout: 10_000
        }
    );
    checkAxes(await charts(page), ["compare"]);
    await b.screenshot("ui-finished");

    // the one failed request is the bad value's 400; nothing else went wrong on the page
    assert.deepEqual(b.errors, [
        "console error: Failed to load resource: the server responded with a status of 400 (Bad Request)"
    ]);
    for (const url of b.requests)
        assert.ok(url.startsWith(app.base) || url.startsWith("data:"), `a request outside the UI: ${url}`);
});
