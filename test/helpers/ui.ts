// ui.ts: `qlora ui` as its tests run it: the page built into a folder of the test's own, the server in this process
// with its runs as `qlora train` children through tsx, and a reader of a run's server-sent events.
import {spawnSync} from "node:child_process";
import http from "node:http";
import type {AddressInfo} from "node:net";
import path from "node:path";
import {createUiServer, type UiServer} from "../../src/ui/server.js";
import type {RunEvent} from "../../src/ui/api-types.js";
import {CLI, TSX} from "./cli.js";
import {REPO_ROOT} from "./paths.js";

/** builds the page (scripts/build-ui.mjs) into `dir`; returns the folder to serve */
export function buildPage(dir: string): string {
    const r = spawnSync(process.execPath, [path.join(REPO_ROOT, "scripts", "build-ui.mjs"), dir], {encoding: "utf8"});
    if (r.status !== 0) throw new Error(`build-ui failed: ${r.stdout}${r.stderr}`);
    return path.join(dir, "client");
}

export interface RunningUi {
    ui: UiServer;
    /** http://127.0.0.1:PORT */
    base: string;
    close(): Promise<void>;
}

export async function startUi(opts: {outputRoot: string; assetsDir: string; token?: string | null}): Promise<RunningUi> {
    const ui = createUiServer({
        outputRoot: opts.outputRoot,
        assetsDir: opts.assetsDir,
        qloraCommand: [process.execPath, "--import", TSX, CLI],
        token: opts.token ?? null,
        cwd: REPO_ROOT
    });
    await new Promise<void>((resolve) => ui.server.listen(0, "127.0.0.1", resolve));
    const base = `http://127.0.0.1:${(ui.server.address() as AddressInfo).port}`;
    return {ui, base, close: () => ui.close()};
}

/** a JSON request; the reply's status and parsed body */
export async function call<T = Record<string, unknown>>(
    url: string,
    body?: unknown,
    headers: Record<string, string> = {}
): Promise<{status: number; body: T; headers: Headers}> {
    const res = await fetch(url, {
        method: body === undefined ? "GET" : "POST",
        headers: body === undefined ? headers : {"content-type": "application/json", ...headers},
        body: body === undefined ? undefined : JSON.stringify(body)
    });
    const text = await res.text();
    return {status: res.status, body: JSON.parse(text) as T, headers: res.headers};
}

/** a run's event stream, read as it comes */
export class EventReader {
    readonly events: RunEvent[] = [];
    private readonly req: http.ClientRequest;
    private waiters: (() => void)[] = [];

    constructor(url: string) {
        this.req = http.get(url, (res) => {
            let buffer = "";
            res.setEncoding("utf8");
            res.on("data", (chunk: string) => {
                buffer += chunk;
                const parts = buffer.split("\n\n");
                buffer = parts.pop() ?? "";
                for (const p of parts) if (p.startsWith("data: ")) this.events.push(JSON.parse(p.slice(6)) as RunEvent);
                for (const w of this.waiters.splice(0)) w();
            });
        });
        this.req.on("error", () => undefined);
    }

    /** resolves with the first event (from `from` on) that passes `test`; rejects after timeoutMs */
    async waitFor(test: (e: RunEvent) => boolean, timeoutMs: number, from = 0): Promise<{event: RunEvent; index: number}> {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
            const index = this.events.findIndex((e, i) => i >= from && test(e));
            if (index >= 0) return {event: this.events[index], index};
            const left = deadline - Date.now();
            if (left <= 0)
                throw new Error(
                    `no such event within ${timeoutMs} ms; last events: ${JSON.stringify(this.events.slice(-3)).slice(0, 800)}`
                );
            await new Promise<void>((resolve) => {
                const t = setTimeout(resolve, left);
                this.waiters.push(() => {
                    clearTimeout(t);
                    resolve();
                });
            });
        }
    }

    close(): void {
        this.req.destroy();
    }
}
