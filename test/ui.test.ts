// qlora ui over HTTP: the form's schema (every train key with its default), bad form values answered with the CLI's
// own message, a short CPU training on the embedded model started from the API with its records streamed as
// server-sent events, stopped (a checkpoint), resumed to the end, the run list, a chat with the result through the
// official `openai` client (the same answer as `qlora serve`'s handler), and the access rules: Host names on
// loopback, the token elsewhere (the CLI command prints it).
import {after, before, describe, test} from "node:test";
import assert from "node:assert/strict";
import {spawn} from "node:child_process";
import {existsSync, mkdirSync, mkdtempSync, rmSync} from "node:fs";
import http from "node:http";
import type {AddressInfo} from "node:net";
import os from "node:os";
import path from "node:path";
import OpenAI from "openai";
import {loadModel, withAdapter} from "../src/api/models.js";
import {TRAIN_CONFIG_KEYS, TrainConfigSchema} from "../src/train/config.js";
import {createServer} from "../src/serve/server.js";
import {tokenFor} from "../src/ui/server.js";
import type {ConfigReply, MetricRecord, RunEvent, RunSummary, SchemaReply} from "../src/ui/api-types.js";
import {CLI, runCli, TSX} from "./helpers/cli.js";
import {REPO_ROOT} from "./helpers/paths.js";
import {buildPage, call, EventReader, startUi, type RunningUi} from "./helpers/ui.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-ui-"));
const root = path.join(tmp, "runs");
mkdirSync(root);
let assets: string;
let app: RunningUi;

before(async () => {
    assets = buildPage(path.join(tmp, "page"));
    app = await startUi({outputRoot: root, assetsDir: assets});
});
after(async () => {
    await app?.close();
    rmSync(tmp, {recursive: true, force: true});
});

/** a short run: the embedded model on the example data, a step logged each step, no eval, checkpoints only when stopped */
const SHORT = {device: "cpu", max_steps: "10", logging_steps: "1", eval_strategy: "no", save_steps: "1000", threads: "2"};

describe("the form", () => {
    test("the page and its scripts are served, with nothing from outside this server", async () => {
        const page = await fetch(`${app.base}/`);
        assert.equal(page.status, 200);
        const html = await page.text();
        assert.match(html, /<script type="module" src="assets\/app.js">/);
        assert.doesNotMatch(html, /https?:\/\//, "no CDN: the page works offline");
        assert.match(page.headers.get("content-security-policy") ?? "", /default-src 'self'/);
        for (const asset of [
            "app.js",
            "form.js",
            "charts.js",
            "style.css",
            "uPlot.iife.min.js",
            "uPlot.min.css",
            "report-charts.js"
        ]) {
            const r = await fetch(`${app.base}/assets/${asset}`);
            assert.equal(r.status, 200, asset);
            assert.ok((await r.text()).length > 100, asset);
        }
        assert.equal((await fetch(`${app.base}/assets/..%2Fpackage.json`)).status, 404);
    });

    test("the schema has every train key with its default and description, each key in one section", async () => {
        const {status, body} = await call<SchemaReply>(`${app.base}/api/schema`);
        assert.equal(status, 200);
        const defaults = TrainConfigSchema.parse({}) as Record<string, unknown>;
        assert.deepEqual(Object.keys(body.schema.properties), TRAIN_CONFIG_KEYS);
        for (const key of TRAIN_CONFIG_KEYS) assert.deepEqual(body.schema.properties[key].default, defaults[key], key);
        assert.equal(body.schema.properties.learning_rate.default, 2e-4);
        assert.match(body.schema.properties.max_steps.description ?? "", /total optimizer steps/);
        assert.deepEqual(
            body.sections.flatMap((s) => s.keys),
            TRAIN_CONFIG_KEYS
        );
        assert.equal(body.outputRoot, root);
        assert.match(body.suggestedOutputDir, /^run-\d{8}-\d{6}/);
    });

    test("bad values are answered with the message `qlora train` prints for the same flags", async () => {
        const cases: Record<string, string>[] = [
            {learning_rate: "-1"},
            {lora_alpah: "16"},
            {optim: "adam"},
            {columns: "{not json"}
        ];
        for (const values of cases) {
            const flags = Object.entries(values).map(([k, v]) => `--${k}=${v}`);
            const cli = runCli(["train", ...flags]);
            assert.equal(cli.code, 1, `${flags}: ${cli.stderr}`);
            const cliMessage = cli.stderr.trim().replace(/^error: /, "");
            const ui = await call<{error: {message: string}}>(`${app.base}/api/config`, {values: {...values, output_dir: "x"}});
            assert.equal(ui.status, 400, JSON.stringify(values));
            assert.equal(ui.body.error.message, cliMessage, JSON.stringify(values));
        }
        const outside = await call<{error: {message: string}}>(`${app.base}/api/config`, {values: {output_dir: "../elsewhere"}});
        assert.equal(outside.status, 400);
        assert.match(outside.body.error.message, /^output_dir: "\.\.\/elsewhere" is not a folder directly in the output root/);
        const notText = await call<{error: {message: string}}>(`${app.base}/api/config`, {values: {r: 8}});
        assert.equal(notText.status, 400);
        assert.match(notText.body.error.message, /values\.r must be text/);
    });

    test("good values give the command line of the run", async () => {
        const {status, body} = await call<ConfigReply>(`${app.base}/api/config`, {
            values: {...SHORT, template: "--{instruction}", output_dir: "cmd"}
        });
        assert.equal(status, 200);
        assert.equal(body.outputDir, path.join(root, "cmd"));
        assert.equal(body.config.max_steps, 10);
        assert.equal(body.config.template, "--{instruction}", "a value that starts with -- stays a value");
        assert.match(body.command, /^qlora train .*--max_steps=10 .*--output_dir=/);
    });

    test("the data preview and the memory plan of the form's values", async () => {
        const preview = await call<{format: string; rows: number; samples: {segments: {trained: boolean}[]}[]}>(
            `${app.base}/api/preview`,
            {values: {max_seq_length: "64", output_dir: "x"}}
        );
        assert.equal(preview.status, 200);
        assert.equal(preview.body.format, "alpaca");
        assert.equal(preview.body.rows, 400);
        assert.equal(preview.body.samples.length, 3);
        assert.ok(
            preview.body.samples[0].segments.some((s) => s.trained) && preview.body.samples[0].segments.some((s) => !s.trained)
        );
        const plan = await call<{device: string; gpu: string; verdict: string; totalBytes: number}>(`${app.base}/api/plan`, {
            values: {output_dir: "x"},
            gpu: "l4-24gb"
        });
        assert.equal(plan.status, 200);
        assert.equal(plan.body.gpu, "L4 24 GB");
        assert.equal(plan.body.verdict, "fits");
        assert.ok(plan.body.totalBytes > 0);
        const badGpu = await call<{error: {message: string}}>(`${app.base}/api/plan`, {values: {output_dir: "x"}, gpu: "tpu"});
        assert.equal(badGpu.status, 400);
        assert.match(badGpu.body.error.message, /gpu: expected one of rtx3060-12gb/);
    });
});

describe("a run: start, live records, stop, resume, chat", () => {
    const name = "short";
    let reader: EventReader;
    after(() => reader?.close());

    test("starts from the form and streams its records as they are written", async () => {
        const started = await call<RunSummary>(`${app.base}/api/runs`, {values: {...SHORT, output_dir: name}});
        assert.equal(started.status, 201, JSON.stringify(started.body));
        assert.equal(started.body.status, "running");
        assert.match(started.body.command ?? "", /^qlora train .*--max_steps=10/);
        reader = new EventReader(`${app.base}/api/runs/${name}/events`);
        const first = await reader.waitFor((e) => e.type === "snapshot", 10_000);
        assert.equal(first.index, 0);
        // the second train record has come while the run goes on: live, not read from a finished file
        await reader.waitFor((e) => e.type === "record" && e.record.type === "train" && e.record.step === 2, 90_000);
        const trains = reader.events.flatMap((e) => (e.type === "record" && e.record.type === "train" ? [e.record] : []));
        assert.deepEqual(
            trains.slice(0, 2).map((r) => r.step),
            [1, 2]
        );
        for (const r of trains) {
            assert.ok(typeof r.loss === "number" && r.loss > 0 && r.loss < 20);
            assert.equal(r.total_steps, 10);
            assert.ok(typeof r.remaining_s === "number");
        }
        assert.ok(reader.events.some((e) => e.type === "step"));
        assert.ok(
            reader.events.some((e) => e.type === "log" && /^step +1\/10 \| loss/.test(e.line)),
            "the CLI's log lines"
        );
        assert.ok(reader.events.some((e) => e.type === "record" && e.record.type === "start"));
        const again = await call<RunSummary>(`${app.base}/api/runs`, {values: {...SHORT, output_dir: name}});
        assert.equal(again.status, 409, "one child per run");
    });

    test("stop saves a checkpoint (SIGINT, as Ctrl+C) and the run can be resumed", async () => {
        const stop = await call<RunSummary>(`${app.base}/api/runs/${name}/stop`, {});
        assert.equal(stop.status, 200);
        assert.equal(stop.body.status, "stopping");
        const {event} = await reader.waitFor((e) => e.type === "status" && e.run.status !== "stopping", 60_000);
        const run = (event as Extract<RunEvent, {type: "status"}>).run;
        assert.equal(run.status, "stopped", JSON.stringify(run));
        assert.equal(run.exitCode, 130);
        assert.ok(run.step >= 2 && run.step < 10, `stopped at ${run.step}`);
        assert.ok(run.resumable);
        assert.equal(run.adapter, path.join(root, name, `checkpoint-${run.step}`));
        assert.ok(existsSync(path.join(root, name, `checkpoint-${run.step}`, "adapter_model.safetensors")));
        assert.ok(reader.events.some((e) => e.type === "log" && /stopped by SIGINT after step/.test(e.line)));
        const notRunning = await call(`${app.base}/api/runs/${name}/stop`, {});
        assert.equal(notRunning.status, 409);

        const from = reader.events.length;
        const resumed = await call<RunSummary>(`${app.base}/api/runs/${name}/resume`, {});
        assert.equal(resumed.status, 200, JSON.stringify(resumed.body));
        assert.match(resumed.body.command ?? "", /--resume_from_checkpoint=true/);
        const snap = await reader.waitFor((e) => e.type === "snapshot", 10_000, from);
        const kept = (snap.event as Extract<RunEvent, {type: "snapshot"}>).records;
        assert.equal(kept.filter((r) => r.type === "train").length, run.step, "the records up to the checkpoint");
        const done = await reader.waitFor((e) => e.type === "status" && e.run.status !== "running", 120_000, from);
        const end = (done.event as Extract<RunEvent, {type: "status"}>).run;
        assert.equal(end.status, "finished", JSON.stringify(end));
        assert.equal(end.step, 10);
        assert.equal(end.adapter, path.join(root, name, "final"));
        // every step once: the records kept at the resume, then the resumed run's
        const live = reader.events
            .slice(snap.index + 1)
            .flatMap((e) => (e.type === "record" && e.record.type === "train" ? [e.record.step] : []));
        assert.deepEqual(
            [...kept.filter((r) => r.type === "train").map((r) => r.step), ...live],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        );
        const metrics = await call<{records: MetricRecord[]}>(`${app.base}/api/runs/${name}/metrics`);
        assert.deepEqual(
            metrics.body.records.filter((r) => r.type === "train").map((r) => r.step),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        );
        assert.ok(reader.events.some((e, i) => i > from && e.type === "log" && /resumed from/.test(e.line)));
    });

    test("the run list has the run; a folder without metrics is not a run", async () => {
        mkdirSync(path.join(root, "not-a-run"));
        const list = await call<{runs: RunSummary[]}>(`${app.base}/api/runs`);
        const run = list.body.runs.find((r) => r.name === name);
        assert.ok(run);
        assert.equal(run.status, "finished");
        assert.equal(run.totalSteps, 10);
        assert.ok(run.lastLoss !== null && run.lastLoss > 0);
        assert.ok(!list.body.runs.some((r) => r.name === "not-a-run"));
        const report = await fetch(`${app.base}/api/runs/${name}/report.html`);
        assert.equal(report.status, 200);
        assert.match(await report.text(), /<html/);
        assert.match(report.headers.get("content-security-policy") ?? "", /^sandbox allow-scripts; default-src 'none'/);
        assert.equal((await fetch(`${app.base}/api/runs/not-a-run/report.html`)).status, 404);
        assert.equal((await call(`${app.base}/api/runs/nope`)).status, 404);
        assert.equal((await call(`${app.base}/api/runs/a%2Fb`)).status, 400);
    });

    test("a run started into a folder that holds an earlier run: the CLI's refusal, and the earlier run unchanged", async () => {
        const from = reader.events.length;
        const started = await call<RunSummary>(`${app.base}/api/runs`, {values: {...SHORT, output_dir: name}});
        assert.equal(started.status, 201);
        const {event} = await reader.waitFor((e) => e.type === "status" && e.run.exitCode !== null, 60_000, from);
        const run = (event as Extract<RunEvent, {type: "status"}>).run;
        assert.match(run.error ?? "", /--overwrite_output_dir true to replace it/);
        assert.equal(run.exitCode, 1);
        assert.equal(run.status, "finished", "the folder's run, not the refused one");
        assert.equal(run.step, 10);
        assert.equal(
            (await call<{records: MetricRecord[]}>(`${app.base}/api/runs/${name}/metrics`)).body.records.length > 10,
            true
        );
    });

    test("chat with the run's adapter through the openai client: the answer of qlora serve's handler", async () => {
        const client = new OpenAI({baseURL: `${app.base}/api/runs/${name}/v1`, apiKey: "unused", maxRetries: 0});
        const ask = {model: name, messages: [{role: "user" as const, content: "Name a color."}], max_tokens: 12, temperature: 0};
        const answer = await client.chat.completions.create(ask);
        const text = answer.choices[0].message.content ?? "";
        assert.ok(answer.usage && answer.usage.completion_tokens > 0);
        let streamed = "";
        for await (const chunk of await client.chat.completions.create({...ask, stream: true}))
            streamed += chunk.choices[0]?.delta?.content ?? "";
        assert.equal(streamed, text);
        // `qlora serve --adapter` on the same folder answers the same
        const loaded = await withAdapter(
            await loadModel(undefined, {device: "cpu", loadIn4bit: true}),
            path.join(root, name, "final")
        );
        const serve = createServer({models: [{id: name, loaded}], maxQueue: 4, maxBodyBytes: 1 << 20});
        await new Promise<void>((resolve) => serve.listen(0, "127.0.0.1", resolve));
        try {
            const port = (serve.address() as AddressInfo).port;
            const direct = new OpenAI({baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused", maxRetries: 0});
            assert.equal((await direct.chat.completions.create(ask)).choices[0].message.content, text);
        } finally {
            serve.close();
        }
    });
});

describe("a run of another process", () => {
    test("qlora train in a terminal: listed as running there, not resumable here, its records followed from metrics.jsonl", async () => {
        const dir = path.join(root, "from-cli");
        const child = spawn(
            process.execPath,
            [
                "--import",
                TSX,
                CLI,
                "train",
                ...Object.entries({...SHORT, max_steps: "200"}).map(([k, v]) => `--${k}=${v}`),
                `--output_dir=${dir}`
            ],
            {cwd: REPO_ROOT, stdio: "ignore"}
        );
        const exited = new Promise<number | null>((resolve) => child.once("exit", resolve));
        let reader: EventReader | null = null;
        try {
            // its first records
            let run: RunSummary | undefined;
            for (let i = 0; i < 300 && !(run && run.step >= 1); i++) {
                await new Promise((r) => setTimeout(r, 200));
                run = (await call<{runs: RunSummary[]}>(`${app.base}/api/runs`)).body.runs.find((r) => r.name === "from-cli");
            }
            assert.ok(run, "listed");
            assert.equal(run.status, "running");
            assert.match(run.elsewhere ?? "", new RegExp(`^pid ${child.pid} \\(qlora train\\)$`));
            assert.equal(run.live, false);
            assert.equal((await call(`${app.base}/api/runs/from-cli/stop`, {})).status, 409, "not this UI's to stop");
            reader = new EventReader(`${app.base}/api/runs/from-cli/events`);
            const snap = await reader.waitFor((e) => e.type === "snapshot", 10_000);
            const had = (snap.event as Extract<RunEvent, {type: "snapshot"}>).records.filter((r) => r.type === "train").length;
            const next = await reader.waitFor((e) => e.type === "record" && e.record.type === "train", 60_000);
            assert.equal((next.event as Extract<RunEvent, {type: "record"}>).record.step, had + 1, "the next step, once");
        } finally {
            reader?.close();
            child.kill("SIGINT");
            await exited;
        }
        const after = await call<RunSummary>(`${app.base}/api/runs/from-cli`);
        assert.equal(after.body.status, "stopped");
        assert.equal(after.body.elsewhere, null);
        assert.equal(after.body.resumable, true, "stopped with a checkpoint: this UI may resume it now");
    });
});

describe("access", () => {
    test("a loopback UI needs no token and answers only loopback Host names", async () => {
        assert.equal(tokenFor("127.0.0.1"), null);
        assert.equal(tokenFor("localhost"), null);
        assert.equal(tokenFor("::1"), null);
        assert.match(tokenFor("0.0.0.0") ?? "", /^[\w-]{22}$/);
        assert.notEqual(tokenFor("192.168.1.5"), tokenFor("192.168.1.5"));
        assert.equal((await call(`${app.base}/api/runs`)).status, 200);
        const rebinding = await new Promise<number>((resolve, reject) => {
            const req = http.get(`${app.base}/api/runs`, {headers: {host: "attacker.example:80"}}, (res) => {
                res.resume();
                resolve(res.statusCode ?? 0);
            });
            req.on("error", reject);
        });
        assert.equal(rebinding, 403);
        // a change must be JSON: a cross-site form post cannot be
        const form = await fetch(`${app.base}/api/runs`, {
            method: "POST",
            body: "values=x",
            headers: {"content-type": "application/x-www-form-urlencoded"}
        });
        assert.equal(form.status, 415);
    });

    test("with a token, every request must carry it (URL, cookie or bearer)", async () => {
        const token = tokenFor("0.0.0.0")!;
        const guarded = await startUi({outputRoot: root, assetsDir: assets, token});
        try {
            assert.equal((await fetch(`${guarded.base}/`)).status, 401);
            assert.equal((await fetch(`${guarded.base}/api/runs`)).status, 401);
            assert.equal((await fetch(`${guarded.base}/api/runs?token=${token.slice(0, -1)}x`)).status, 401);
            assert.equal((await fetch(`${guarded.base}/assets/app.js`)).status, 401);
            const page = await fetch(`${guarded.base}/?token=${token}`);
            assert.equal(page.status, 200);
            const cookie = (page.headers.get("set-cookie") ?? "").split(";")[0];
            assert.match(page.headers.get("set-cookie") ?? "", /HttpOnly; SameSite=Strict/);
            assert.equal((await fetch(`${guarded.base}/assets/app.js`, {headers: {cookie}})).status, 200);
            assert.equal((await fetch(`${guarded.base}/api/runs`, {headers: {authorization: `Bearer ${token}`}})).status, 200);
            // any Host is fine once the token is right (the UI is meant to be reached by other names)
            const client = new OpenAI({baseURL: `${guarded.base}/api/runs/short/v1`, apiKey: token, maxRetries: 0});
            assert.equal((await client.models.list()).data[0].id, "short");
            await assert.rejects(
                new OpenAI({baseURL: `${guarded.base}/api/runs/short/v1`, apiKey: "wrong", maxRetries: 0}).models.list(),
                /401/
            );
        } finally {
            await guarded.close();
        }
    });

    test("qlora ui --host 0.0.0.0 prints a URL with its token and refuses requests without it", async () => {
        const child = spawn(
            process.execPath,
            ["--import", TSX, CLI, "ui", "--host", "0.0.0.0", "--port", "0", "--output-root", root],
            {
                cwd: REPO_ROOT,
                stdio: ["ignore", "ignore", "pipe"]
            }
        );
        try {
            const line = await new Promise<string>((resolve, reject) => {
                let err = "";
                child.stderr.setEncoding("utf8");
                child.stderr.on("data", (d: string) => {
                    err += d;
                    const m = /qlora ui: .*\n/.exec(err);
                    if (m) resolve(m[0]);
                });
                child.once("exit", (code) => reject(new Error(`exited ${code}: ${err}`)));
            });
            const m = /^qlora ui: http:\/\/0\.0\.0\.0:(\d+)\/\?token=([\w-]+) \(runs in (.*)\)$/.exec(line.trim());
            assert.ok(m, line);
            assert.equal(m[3], root);
            assert.equal((await fetch(`http://127.0.0.1:${m[1]}/api/runs`)).status, 401);
            const ok = await fetch(`http://127.0.0.1:${m[1]}/api/runs?token=${m[2]}`);
            assert.equal(ok.status, 200);
            assert.ok(((await ok.json()) as {runs: RunSummary[]}).runs.some((r) => r.name === "short"));
        } finally {
            child.kill("SIGTERM");
            await new Promise((resolve) => child.once("exit", resolve));
        }
    });
});
