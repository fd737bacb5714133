// app.ts: qlora ui's page: the run form, the run list with overlaid loss curves, the watched run (live curves from
// server-sent events, log, ETA, stop and resume) and the chat panel.
import type {ConfigReply, MetricRecord, PlanReply, PreviewReply, RunEvent, RunSummary, SchemaReply} from "../api-types.js";
import {api, apiUrl, runPath} from "./api.js";
import {COLORS, formatNumber, joinTables, StepChart} from "./charts.js";
import {ChatPanel} from "./chat.js";
import {formatBytes, formatDuration} from "./format.js";
import {RunForm} from "./form.js";

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;

let form: RunForm;
let runs: RunSummary[] = [];
const compared = new Set<string>();

// the watched run
let watched: string | null = null;
let events: EventSource | null = null;
let current: RunSummary | null = null;
let records: MetricRecord[] = [];
let logs: string[] = [];
/** the latest step event: the step, the total and when it came (for the ETA between logged steps) */
let lastStep: {step: number; total: number; time: number} | null = null;
/** seconds per step, from the step events of this session of the run */
let stepRate: {firstStep: number; firstTime: number} | null = null;

const charts = {
    loss: new StepChart("loss", $("chart-loss"), "loss", "loss", [
        {label: "train loss", color: COLORS[0]},
        {label: "eval loss", color: COLORS[1], points: true}
    ]),
    lr: new StepChart("lr", $("chart-lr"), "learning rate", "lr", [{label: "learning rate", color: COLORS[2]}]),
    tps: new StepChart("tps", $("chart-tps"), "throughput", "tokens/s", [{label: "tokens/s", color: COLORS[3]}]),
    mem: new StepChart("memory", $("chart-mem"), "memory", "MiB", [{label: "memory peak (MiB)", color: COLORS[4]}])
};
const compareChart = new StepChart("compare", $("compare-chart"), "train loss of the runs compared", "loss", []);
const chat = new ChatPanel(
    $("chat-messages"),
    $("chat-form") as HTMLFormElement,
    $("chat-input") as HTMLTextAreaElement,
    $("chat-error")
);

function showError(el: HTMLElement, err: unknown): void {
    el.textContent = err instanceof Error ? err.message : String(err);
}

async function withButton(button: HTMLButtonElement, errorEl: HTMLElement, fn: () => Promise<void>): Promise<void> {
    button.disabled = true;
    errorEl.textContent = "";
    try {
        await fn();
    } catch (err) {
        showError(errorEl, err);
    } finally {
        button.disabled = false;
    }
}

// ------------------------------------------------------------------ the form

async function checkForm(): Promise<ConfigReply> {
    const reply = await api<ConfigReply>("/api/config", {values: form.values()});
    const cmd = $("command");
    cmd.textContent = reply.command;
    cmd.hidden = false;
    return reply;
}

function renderPreview(p: PreviewReply): void {
    const out = $("preview-out");
    out.replaceChildren();
    const h = document.createElement("h3");
    h.textContent = `data: ${p.format}, ${p.rows} rows, ${p.tokens} tokens`;
    const summary = document.createElement("pre");
    summary.className = "command";
    summary.textContent = [
        ...p.summary,
        `prompt format ${p.promptFormat ?? "none (plain text)"}`,
        ...p.warnings.map((w) => `warning: ${w}`)
    ].join("\n");
    out.append(h, summary);
    p.samples.forEach((s, i) => {
        const title = document.createElement("div");
        title.className = "small";
        title.textContent = `sample ${i + 1}: ${s.tokens} tokens, ${s.trained} trained (highlighted)`;
        const div = document.createElement("div");
        div.className = "preview-sample";
        for (const seg of s.segments) {
            const span = document.createElement(seg.trained ? "mark" : "span");
            span.textContent = seg.text;
            div.append(span);
        }
        out.append(title, div);
    });
}

function renderPlan(p: PlanReply): void {
    const out = $("plan-out");
    out.replaceChildren();
    const h = document.createElement("h3");
    const where = p.device === "cuda" ? `GPU ${p.gpu ?? "(none found: pick one)"}` : "CPU (host memory)";
    h.textContent = `memory plan: ${where}`;
    const verdict = document.createElement("div");
    verdict.className = "plan-verdict";
    verdict.textContent =
        `${p.verdict ?? "needs"} ${formatBytes(p.totalBytes)}` +
        (p.availableBytes !== null ? ` of ${formatBytes(p.availableBytes)}` : "") +
        (p.tokensPerSecond !== null ? ` · about ${Math.round(p.tokensPerSecond)} tokens/s` : "") +
        ` · host ${formatBytes(p.hostBytes)}`;
    const table = document.createElement("table");
    for (const t of p.terms) {
        const tr = table.insertRow();
        tr.insertCell().textContent = t.label;
        tr.insertCell().textContent = formatBytes(t.bytes);
    }
    out.append(h, verdict, table);
    for (const line of [...p.suggestions.map((s) => `to fit: ${s.change} (${formatBytes(s.totalBytes)})`), ...p.notes]) {
        const d = document.createElement("div");
        d.className = "small";
        d.textContent = line;
        out.append(d);
    }
}

// ------------------------------------------------------------------ the runs

function statusCell(r: RunSummary): HTMLElement {
    const span = document.createElement("span");
    span.className = `st-${r.status}`;
    span.textContent = r.status;
    return span;
}

function renderRuns(): void {
    const body = ($("runs") as HTMLTableElement).tBodies[0];
    body.replaceChildren();
    for (const r of runs) {
        const tr = body.insertRow();
        tr.dataset.run = r.name;
        if (r.name === watched) tr.classList.add("selected");
        const box = document.createElement("input");
        box.type = "checkbox";
        box.checked = compared.has(r.name);
        box.title = `overlay ${r.name}'s loss`;
        box.addEventListener("click", (e) => e.stopPropagation());
        box.addEventListener("change", () => {
            if (box.checked) compared.add(r.name);
            else compared.delete(r.name);
            void renderCompare();
        });
        tr.insertCell().append(box);
        tr.insertCell().textContent = r.name;
        tr.insertCell().append(statusCell(r));
        tr.insertCell().textContent = `${r.step}${r.totalSteps ? `/${r.totalSteps}` : ""}`;
        tr.insertCell().textContent = formatNumber(r.lastLoss);
        tr.insertCell().textContent = formatNumber(r.evalLoss);
        tr.addEventListener("click", () => watch(r.name));
    }
}

/** the watched run's row follows its records between the list's refreshes */
function updateListedRun(rec: MetricRecord): void {
    const row = runs.find((r) => r.name === watched);
    if (!row || typeof rec.step !== "number") return;
    row.step = Math.max(row.step, rec.step);
    if (rec.type === "train" && typeof rec.loss === "number") row.lastLoss = rec.loss;
    if (rec.type === "eval" && typeof rec.eval_loss === "number") row.evalLoss = rec.eval_loss;
    renderRuns();
}

async function refreshRuns(): Promise<void> {
    runs = (await api<{runs: RunSummary[]}>("/api/runs")).runs;
    for (const name of [...compared]) if (!runs.some((r) => r.name === name)) compared.delete(name);
    // a run of another process sends no status of its own when it ends: the list's is newer
    const listed = runs.find((r) => r.name === watched);
    if (listed && current?.elsewhere && listed.status !== current.status) {
        current = listed;
        renderStatus();
    }
    renderRuns();
}

const compareCache = new Map<string, {step: number; records: MetricRecord[]}>();

async function renderCompare(): Promise<void> {
    const names = runs.map((r) => r.name).filter((n) => compared.has(n));
    const tables: [number[], (number | null)[]][] = [];
    for (const name of names) {
        const run = runs.find((r) => r.name === name)!;
        let cached = compareCache.get(name);
        if (!cached || cached.step !== run.step) {
            cached = {step: run.step, records: (await api<{records: MetricRecord[]}>(runPath(name, "/metrics"))).records};
            compareCache.set(name, cached);
        }
        const train = cached.records.filter((r) => r.type === "train" && typeof r.step === "number");
        tables.push([train.map((r) => r.step as number), train.map((r) => r.loss as number)]);
    }
    compareChart.set(
        joinTables(tables),
        names.map((n, i) => ({label: n, color: COLORS[i % COLORS.length]}))
    );
}

// ------------------------------------------------------------------ the watched run

function series(type: string, field: string, scale = 1): [number[], (number | null)[]] {
    const rs = records.filter((r) => r.type === type && typeof r.step === "number");
    return [rs.map((r) => r.step as number), rs.map((r) => (typeof r[field] === "number" ? (r[field] as number) / scale : null))];
}

function renderCharts(): void {
    charts.loss.set(joinTables([series("train", "loss"), series("eval", "eval_loss")]));
    charts.lr.set(series("train", "learning_rate"));
    charts.tps.set(series("train", "tokens_per_second"));
    const memKind = records.filter((r) => r.type === "train").at(-1)?.memory_kind;
    charts.mem.set(series("train", "peak_memory_bytes", 2 ** 20), [
        {label: `${memKind === "rss" ? "max RSS" : "GPU allocator peak"} (MiB)`, color: COLORS[4]}
    ]);
    // a chart drawn before the others were shown had the whole row
    for (const c of Object.values(charts)) c.resize();
}

/** seconds left: from the step events' pace in this session, else from the last logged record */
function eta(): number | null {
    if (lastStep && stepRate && lastStep.step > stepRate.firstStep) {
        const perStep = (lastStep.time - stepRate.firstTime) / 1000 / (lastStep.step - stepRate.firstStep);
        return perStep * (lastStep.total - lastStep.step);
    }
    const last = records.filter((r) => r.type === "train").at(-1);
    return typeof last?.remaining_s === "number" ? last.remaining_s : null;
}

function renderStatus(): void {
    if (!current) return;
    const r = current;
    const lastTrain = records.filter((x) => x.type === "train").at(-1);
    const step = Math.max(r.step, lastStep?.step ?? 0);
    const total = lastStep?.total ?? r.totalSteps;
    const parts = [r.elsewhere ? `${r.status} in ${r.elsewhere}` : r.status, `step ${step}${total ? `/${total}` : ""}`];
    if (lastTrain) parts.push(`loss ${formatNumber(lastTrain.loss as number)}`);
    if (r.status === "running" && total) parts.push(`ETA ${formatDuration(eta())}`);
    if (lastTrain && typeof lastTrain.tokens_per_second === "number")
        parts.push(`${Math.round(lastTrain.tokens_per_second)} tokens/s`);
    const st = $("run-status");
    st.textContent = parts.join(" · ");
    st.className = `status st-${r.status}`;
    // a run of another process is stopped where it runs (Ctrl+C there)
    ($("stop") as HTMLButtonElement).disabled = r.status !== "running" || r.elsewhere !== null;
    ($("resume") as HTMLButtonElement).disabled = !r.resumable;
    $("run-command").textContent = r.command ?? "";
    // the report is written at each checkpoint and at the end
    const report = $("run-report") as HTMLAnchorElement;
    report.hidden = r.adapter === null;
    report.href = apiUrl(runPath(r.name, "/report.html"));
    $("run-error").textContent = r.error ?? "";
    // chat: the run's adapter, once there is one
    const chatPanel = $("chat-panel");
    chatPanel.hidden = !r.adapter;
    $("chat-run").textContent = r.name;
    $("chat-adapter").textContent = r.adapter ? `adapter ${r.adapter}` : "";
    chat.use(r.adapter ? r.name : null);
}

function renderLog(): void {
    const log = $("log");
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = logs.join("\n") || "(the log of runs this UI started)";
    if (atEnd) log.scrollTop = log.scrollHeight;
}

function onEvent(ev: RunEvent): void {
    switch (ev.type) {
        case "snapshot":
            current = ev.run;
            records = ev.records;
            logs = ev.logs.slice();
            lastStep = null;
            stepRate = null;
            renderCharts();
            renderLog();
            break;
        case "record":
            records.push(ev.record);
            if (typeof ev.record.step === "number" && current) current.step = Math.max(current.step, ev.record.step);
            if (ev.record.type !== "save") renderCharts();
            updateListedRun(ev.record);
            break;
        case "step":
            lastStep = {step: ev.step, total: ev.total, time: ev.time};
            stepRate ??= {firstStep: ev.step, firstTime: ev.time};
            if (current) current.totalSteps = ev.total;
            break;
        case "log":
            logs.push(ev.line);
            if (logs.length > 2000) logs.splice(0, logs.length - 2000);
            renderLog();
            break;
        case "status":
            current = ev.run;
            void refreshRuns();
            break;
    }
    renderStatus();
}

function watch(name: string): void {
    if (watched === name && events) return;
    events?.close();
    watched = name;
    current = null;
    records = [];
    logs = [];
    $("run-panel").hidden = false;
    $("run-name").textContent = name;
    renderRuns();
    events = new EventSource(apiUrl(runPath(name, "/events")));
    events.onmessage = (m) => onEvent(JSON.parse(m.data) as RunEvent);
}

// ------------------------------------------------------------------ start

async function main(): Promise<void> {
    const schema = await api<SchemaReply>("/api/schema");
    $("output-root").textContent = schema.outputRoot;
    form = new RunForm($("run-form") as HTMLFormElement, schema);
    const gpuSelect = $("plan-gpu") as HTMLSelectElement;
    gpuSelect.append(new Option("this machine", ""));
    const formError = $("form-error");

    $("check").addEventListener("click", (e) =>
        withButton(e.currentTarget as HTMLButtonElement, formError, async () => void (await checkForm()))
    );
    $("preview").addEventListener("click", (e) =>
        withButton(e.currentTarget as HTMLButtonElement, formError, async () => {
            $("preview-out").textContent = "reading the data…";
            try {
                renderPreview(await api<PreviewReply>("/api/preview", {values: form.values()}));
            } catch (err) {
                $("preview-out").textContent = "";
                throw err;
            }
        })
    );
    $("plan").addEventListener("click", (e) =>
        withButton(e.currentTarget as HTMLButtonElement, formError, async () => {
            const plan = await api<PlanReply>("/api/plan", {values: form.values(), gpu: gpuSelect.value});
            if (gpuSelect.options.length === 1) for (const g of plan.gpus) gpuSelect.append(new Option(g.label, g.name));
            renderPlan(plan);
        })
    );
    $("start").addEventListener("click", (e) =>
        withButton(e.currentTarget as HTMLButtonElement, formError, async () => {
            await checkForm();
            const run = await api<RunSummary>("/api/runs", {values: form.values()});
            await refreshRuns();
            watch(run.name);
            // the next run gets a new folder
            const next = await api<SchemaReply>("/api/schema");
            form.set("output_dir", next.suggestedOutputDir);
        })
    );
    $("stop").addEventListener("click", (e) =>
        withButton(e.currentTarget as HTMLButtonElement, $("run-error"), async () => {
            if (watched) onEvent({type: "status", run: await api<RunSummary>(runPath(watched, "/stop"), {})});
        })
    );
    $("resume").addEventListener("click", (e) =>
        withButton(e.currentTarget as HTMLButtonElement, $("run-error"), async () => {
            if (watched) await api<RunSummary>(runPath(watched, "/resume"), {});
        })
    );
    window.addEventListener("resize", () => {
        for (const c of [...Object.values(charts), compareChart]) c.resize();
    });

    await refreshRuns();
    const first = runs.find((r) => r.status === "running") ?? runs[0];
    if (first) watch(first.name);
    // the list's steps and losses (the watched run's curves come by events)
    setInterval(() => void refreshRuns().catch((err) => showError($("global-error"), err)), 5000);
}

main().catch((err) => showError($("global-error"), err));
