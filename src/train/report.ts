// report.ts: a self-contained report.html (uPlot, the chart code and the metrics inlined; opens without a network):
// the training and evaluation loss, evaluation perplexity, learning rate, gradient norm, tokens/s and memory against
// the step, the run's summary, timing, hardware and config, and its health warnings (health.ts). The trainer writes
// it at every checkpoint and at the end, so a run that stops or crashes keeps the report of its last checkpoint.
import os from "node:os";
import type {DeviceChoice} from "../backend/cuda.js";
import {writeFileAtomic} from "../io/atomic.js";
import {CHARTS_JS, uplotAssets} from "./report-charts.js";

export interface MetricRecord {
    type: string;
    step?: number;
    [key: string]: unknown;
}

export interface ReportInput {
    title: string;
    /** the run's facts in rows: model, dataset, ... */
    summary: Record<string, string | number>;
    /** hardwareOf() */
    hardware: Record<string, string>;
    /** the run's resolved config */
    config: Record<string, unknown>;
    /** metrics.jsonl's records */
    records: MetricRecord[];
    /** when the report is written (now) */
    now?: Date;
}

const gib = (bytes: number) => `${(bytes / 2 ** 30).toFixed(1)} GiB`;

/** the machine a run computes on, as the report's rows */
export function hardwareOf(choice: DeviceChoice): Record<string, string> {
    const cpus = os.cpus();
    const gpus = choice.availability?.info?.devices ?? [];
    return {
        device: choice.line.replace(/^device: /, ""),
        GPU: gpus.length ? gpus.map((d) => `${d.index}: ${d.name} (${gib(d.totalBytes)})`).join("; ") : "none",
        CPU: `${cpus[0]?.model.trim() ?? "unknown"}, ${os.availableParallelism()} threads available`,
        "host memory": gib(os.totalmem()),
        system: `Node.js ${process.version}, ${process.platform} ${process.arch}`
    };
}

/** 3725 s as "1h 2m 5s" */
export function formatDuration(seconds: number): string {
    if (!Number.isFinite(seconds)) return "-";
    if (seconds < 60) return `${seconds.toFixed(1)}s`;
    const s = Math.round(seconds);
    const h = Math.floor(s / 3600),
        m = Math.floor((s % 3600) / 60);
    return (h ? `${h}h ` : "") + `${m}m ${s % 60}s`;
}

const num = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);

/**
 * The timing of a run from its records alone (so a report of an unfinished run has it too). elapsed_s counts from
 * the start of each session, so a resumed run's sessions are where it falls; each session's training time is its
 * last logged elapsed_s.
 */
export function timingOf(records: MetricRecord[], now: Date): Record<string, string> {
    const train = records.filter((r) => r.type === "train");
    const start = records.find((r) => r.type === "start");
    const end = records.find((r) => r.type === "end");
    let trainingSeconds = 0,
        sessions = 0,
        previous = Infinity;
    for (const r of train) {
        const e = num(r.elapsed_s) ?? 0;
        if (e < previous) sessions++;
        else trainingSeconds -= previous;
        trainingSeconds += e;
        previous = e;
    }
    const last = train[train.length - 1];
    const tokens = num(last?.num_tokens);
    const total = num(last?.total_steps) ?? num(start?.total_steps);
    const rows: Record<string, string> = {
        status: end
            ? `finished at step ${end.step}`
            : `not finished: ${last ? `step ${last.step}` : "no step logged"}${total ? ` of ${total}` : ""} when this report was written (${now.toISOString()})`,
        "logged steps": last ? `${last.step}${total ? ` of ${total}` : ""}` : "-",
        "tokens seen": tokens === null ? "-" : tokens.toLocaleString("en-US"),
        "training time": train.length
            ? formatDuration(trainingSeconds) + (sessions > 1 ? ` in ${sessions} sessions (resumed)` : "")
            : "-",
        "mean tokens/s": tokens !== null && trainingSeconds > 0 ? (tokens / trainingSeconds).toFixed(1) : "-"
    };
    const from = typeof start?.time === "string" ? new Date(start.time) : null;
    if (from && !Number.isNaN(from.getTime())) {
        const to = typeof end?.time === "string" ? new Date(end.time) : now;
        rows["wall clock"] =
            `${from.toISOString()} to ${end ? to.toISOString() : "now"} (${formatDuration((to.getTime() - from.getTime()) / 1000)})`;
    }
    return rows;
}

function escapeHtml(s: string): string {
    return s.replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]!);
}

function table(rows: Record<string, unknown>, id: string): string {
    const cells = Object.entries(rows)
        .map(
            ([k, v]) =>
                `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(typeof v === "string" ? v : (JSON.stringify(v) ?? "-"))}</td></tr>`
        )
        .join("");
    return `<table id="${id}">${cells}</table>`;
}

/** the records' series, as the page's script reads them */
function seriesOf(records: MetricRecord[]) {
    const train = records.filter((r) => r.type === "train");
    const evals = records.filter((r) => r.type === "eval");
    const col = (rs: MetricRecord[], key: string) => rs.map((r) => num(r[key]));
    return {
        train: {
            step: train.map((r) => r.step),
            loss: col(train, "loss"),
            lr: col(train, "learning_rate"),
            gradNorm: col(train, "grad_norm"),
            tokensPerSecond: col(train, "tokens_per_second"),
            memory: col(train, "memory_bytes"),
            peakMemory: col(train, "peak_memory_bytes"),
            hostPeakMemory: col(train, "host_peak_memory_bytes")
        },
        memoryKind: train.length ? String(train[train.length - 1].memory_kind) : "rss",
        eval: {step: evals.map((r) => r.step), loss: col(evals, "eval_loss"), perplexity: col(evals, "eval_perplexity")}
    };
}

// the page's own script: one chart per metric, two columns on a wide window; the uPlot instances in
// window.qloraCharts (tests read their axes)
const PAGE_JS = `
const d = JSON.parse(document.getElementById("metrics").textContent);
const full = Math.max(360, Math.min(1240, document.documentElement.clientWidth - 48));
const width = full >= 900 ? Math.floor((full - 24) / 2) : full;
const charts = (window.qloraCharts = {});
const t = d.train, e = d.eval;
function add(id, c) {
  const el = document.createElement("div");
  el.className = "chart";
  el.id = "chart-" + id;
  document.getElementById("charts").appendChild(el);
  charts[id] = qloraStepChart(el, {width, ...c});
}
if (t.step.length === 0 && e.step.length === 0) {
  document.getElementById("charts").textContent = "no step logged yet";
} else {
  // train and eval losses on one x: the union of their steps, each series null where it was not measured
  const steps = [...new Set([...t.step, ...e.step])].sort((a, b) => a - b);
  const at = (xs, ys) => { const m = new Map(xs.map((s, i) => [s, ys[i]])); return steps.map((s) => (m.has(s) ? m.get(s) : null)); };
  add("loss", {title: "loss", yLabel: "loss", x: steps, series: [
    {label: "train loss", color: "#1f77b4", values: at(t.step, t.loss)},
    {label: "eval loss", color: "#d62728", values: at(e.step, e.loss), points: true}]});
  if (e.step.length) add("eval", {title: "evaluation perplexity", yLabel: "perplexity", x: e.step, series: [
    {label: "eval perplexity", color: "#d62728", values: e.perplexity, points: true}]});
  add("lr", {title: "learning rate", yLabel: "learning rate", x: t.step, series: [{label: "learning rate", color: "#2ca02c", values: t.lr}]});
  add("grad_norm", {title: "gradient norm (before clipping)", yLabel: "grad norm", x: t.step, series: [{label: "grad norm", color: "#9467bd", values: t.gradNorm}]});
  add("tokens_per_second", {title: "throughput", yLabel: "tokens/s", x: t.step, series: [{label: "tokens/s", color: "#ff7f0e", values: t.tokensPerSecond}]});
  const maxBytes = Math.max(0, ...t.peakMemory, ...t.hostPeakMemory);
  const [unit, scale] = maxBytes >= 2 ** 30 ? ["GiB", 2 ** 30] : ["MiB", 2 ** 20];
  const inUnit = (xs) => xs.map((v) => (v == null ? null : v / scale));
  const gpu = d.memoryKind === "gpu";
  add("memory", {title: gpu ? "GPU memory (qlora's caching allocator)" : "host memory (resident set)", yLabel: unit, x: t.step, series: gpu
    ? [{label: "allocated", color: "#8c564b", values: inUnit(t.memory)}, {label: "allocator peak", color: "#e377c2", values: inUnit(t.peakMemory)},
       {label: "host max RSS", color: "#7f7f7f", values: inUnit(t.hostPeakMemory)}]
    : [{label: "RSS", color: "#8c564b", values: inUnit(t.memory)}, {label: "max RSS", color: "#e377c2", values: inUnit(t.peakMemory)}]});
}
`;

export async function writeReport(file: string, input: ReportInput): Promise<void> {
    const {js, css} = uplotAssets();
    const {records} = input;
    const warnings = records.filter((r) => r.type === "warning");
    const warningList = warnings.length
        ? `<h2>health warnings</h2><ul class="warnings">${warnings
              .map((w) => `<li>step ${escapeHtml(String(w.step))}: ${escapeHtml(String(w.message))}</li>`)
              .join("")}</ul>`
        : "<p>health warnings: none</p>";
    // JSON in a non-executed <script> block: escape "<" so no "</script>" in a value can end it early
    const json = JSON.stringify(seriesOf(records)).replace(/</g, "\\u003c");
    const configKeys = Object.keys(input.config).length;
    const html = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(input.title)}</title>
<style>${css}
body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}h2{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse}th{text-align:left;padding:2px 12px 2px 0;color:#666;font-weight:normal;vertical-align:top}
td{padding:2px 0;word-break:break-word}.facts{display:flex;flex-wrap:wrap;gap:8px 40px}.facts>div{max-width:620px}
#charts{display:flex;flex-wrap:wrap;gap:12px 24px;margin-top:12px}.warnings li{color:#a15c00;margin:4px 0}
details{margin-top:16px}summary{cursor:pointer;font-size:15px}</style>
</head><body><h1>${escapeHtml(input.title)}</h1>
<div class="facts"><div><h2>run</h2>${table(input.summary, "summary")}</div>
<div><h2>timing</h2>${table(timingOf(records, input.now ?? new Date()), "timing")}</div>
<div><h2>hardware</h2>${table(input.hardware, "hardware")}</div></div>
${warningList}
<div id="charts"></div>
<details><summary>config (${configKeys} keys)</summary>${table(input.config, "config")}</details>
<script type="application/json" id="metrics">${json}</script>
<script>${js}</script>
<script>${CHARTS_JS}</script>
<script>${PAGE_JS}</script>
</body></html>
`;
    await writeFileAtomic(file, html);
}
