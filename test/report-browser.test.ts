// report.html in a real browser (test/helpers/browser.ts: Debian's Chromium through playwright-core).
import {test} from "node:test";
import assert from "node:assert/strict";
import {readFileSync} from "node:fs";
import path from "node:path";
import {browserSkipReason, openBrowser} from "./helpers/browser.js";
import {REPO_ROOT} from "./helpers/paths.js";

test("the browser harness: npm installs no browser; a page renders, reports its errors and screenshots as PNG", {
    skip: browserSkipReason()
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
