// browser.ts: browser tests in a real Chromium: Debian's package (/usr/bin/chromium, `apt-get install chromium`; .ci/run
// installs it) driven by playwright-core, which downloads no browser. Outside CI a machine without Chromium skips
// these tests with the reason; in CI (process.env.CI) the test runs and fails, since a skip there would hide it.
//
//     test("...", {skip: browserSkipReason()}, async (t) => {
//         const b = await openBrowser(t);          // closed after the test
//         await b.page.goto(url);
//         await b.screenshot("report");            // a PNG under b.screenshotDir
//         assert.deepEqual(b.errors, []);          // no uncaught exception or console error on the page
//     });
import {existsSync, mkdirSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import type {TestContext} from "node:test";
import {type Browser, type BrowserContext, chromium, type Page} from "playwright-core";

/** the Chromium binary: $QLORA_CHROMIUM, else Debian's */
export const CHROMIUM_PATH = process.env.QLORA_CHROMIUM ?? "/usr/bin/chromium";

/**
 * Flags for a headless Chromium in a container: root cannot use Chromium's sandbox (--no-sandbox); Docker's /dev/shm
 * is 64 MiB, too small for the renderer's shared memory (--disable-dev-shm-usage: /tmp instead); there is no GPU
 * (--disable-gpu: software rendering, the same pixels on every machine). The rest keep a test run quiet and offline:
 * no first-run dialogs, no component updates or other background requests.
 */
export const CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--font-render-hinting=none"
];

/** for node:test's `skip`: false when the browser tests can run (or must, in CI), else why they cannot */
export function browserSkipReason(): string | false {
    if (existsSync(CHROMIUM_PATH) || process.env.CI) return false;
    return `no Chromium at ${CHROMIUM_PATH} (apt-get install -y chromium, or set QLORA_CHROMIUM)`;
}

export interface BrowserSession {
    browser: Browser;
    context: BrowserContext;
    page: Page;
    /** uncaught page exceptions and console errors, in order */
    errors: string[];
    /** every URL the page requested */
    requests: string[];
    /** where screenshot() writes */
    screenshotDir: string;
    /** a PNG of the page (the whole page unless `fullPage: false`) as <screenshotDir>/<name>.png; returns its path */
    screenshot(name: string, options?: {fullPage?: boolean}): Promise<string>;
    close(): Promise<void>;
}

export interface OpenBrowserOptions {
    /** the viewport (1200 x 900) */
    width?: number;
    height?: number;
    /** $QLORA_SCREENSHOT_DIR, else a folder under the OS's temporary directory */
    screenshotDir?: string;
}

/** launches Chromium headless with one page; given the test's context, closes it when the test ends */
export async function openBrowser(t?: TestContext, options: OpenBrowserOptions = {}): Promise<BrowserSession> {
    if (!existsSync(CHROMIUM_PATH))
        throw new Error(
            `no Chromium at ${CHROMIUM_PATH}: install Debian's package (apt-get install -y chromium, as .ci/run does) or set QLORA_CHROMIUM`
        );
    const browser = await chromium.launch({executablePath: CHROMIUM_PATH, headless: true, args: CHROMIUM_ARGS, timeout: 60_000});
    const close = () => browser.close();
    t?.after(close);
    const context = await browser.newContext({
        viewport: {width: options.width ?? 1200, height: options.height ?? 900},
        deviceScaleFactor: 1
    });
    const page = await context.newPage();
    const errors: string[] = [];
    const requests: string[] = [];
    page.on("pageerror", (err) => errors.push(`page error: ${err.message}`));
    page.on("console", (msg) => {
        if (msg.type() === "error") errors.push(`console error: ${msg.text()}`);
    });
    page.on("request", (req) => requests.push(req.url()));
    const screenshotDir =
        options.screenshotDir ?? process.env.QLORA_SCREENSHOT_DIR ?? path.join(os.tmpdir(), `qlora-screenshots-${process.pid}`);
    return {
        browser,
        context,
        page,
        errors,
        requests,
        screenshotDir,
        async screenshot(name, opts = {}) {
            mkdirSync(screenshotDir, {recursive: true});
            const file = path.join(screenshotDir, `${name}.png`);
            await page.screenshot({path: file, fullPage: opts.fullPage ?? true});
            return file;
        },
        close
    };
}
