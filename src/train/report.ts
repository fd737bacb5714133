// report.ts: a self-contained report.html (uPlot and the metrics inlined; opens without a network) with the
// training and evaluation loss, the learning rate and the gradient norm against the step, and the run's health
// warnings (health.ts).
import {readFileSync} from "node:fs";
import {createRequire} from "node:module";
import path from "node:path";
import {writeFileAtomic} from "../io/atomic.js";

const require = createRequire(import.meta.url);

export interface MetricRecord {
    type: string;
    step?: number;
    [key: string]: unknown;
}

function uplotAssets(): {js: string; css: string} {
    const dist = path.dirname(require.resolve("uplot/dist/uPlot.iife.min.js"));
    return {
        js: readFileSync(path.join(dist, "uPlot.iife.min.js"), "utf8"),
        css: readFileSync(path.join(dist, "uPlot.min.css"), "utf8")
    };
}

function escapeHtml(s: string): string {
    return s.replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]!);
}

export async function writeReport(
    file: string,
    title: string,
    summary: Record<string, string | number>,
    records: MetricRecord[]
): Promise<void> {
    const {js, css} = uplotAssets();
    const train = records.filter((r) => r.type === "train");
    const evals = records.filter((r) => r.type === "eval");
    const data = {
        train: {
            step: train.map((r) => r.step),
            loss: train.map((r) => r.loss),
            lr: train.map((r) => r.learning_rate),
            gradNorm: train.map((r) => r.grad_norm)
        },
        eval: {step: evals.map((r) => r.step), loss: evals.map((r) => r.eval_loss)}
    };
    const rows = Object.entries(summary)
        .map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(String(v))}</td></tr>`)
        .join("");
    const warnings = records.filter((r) => r.type === "warning");
    const warningList = warnings.length
        ? `<h2>health warnings</h2><ul class="warnings">${warnings
              .map((w) => `<li>step ${escapeHtml(String(w.step))}: ${escapeHtml(String(w.message))}</li>`)
              .join("")}</ul>`
        : "<p>health warnings: none</p>";
    // the JSON goes into a <script> block: escape "<" so no "</script>" can end it early
    const json = JSON.stringify(data).replace(/</g, "\\u003c");
    const html = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title>
<style>${css}
body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}table{border-collapse:collapse;margin-bottom:16px}
th{text-align:left;padding:2px 12px 2px 0;color:#666;font-weight:normal}td{padding:2px 0}.chart{margin:12px 0}
h2{font-size:16px}.warnings li{color:#a15c00;margin:4px 0}</style>
</head><body><h1>${escapeHtml(title)}</h1><table>${rows}</table>${warningList}
<div id="loss" class="chart"></div><div id="lr" class="chart"></div><div id="gn" class="chart"></div>
<script>${js}</script>
<script>
const d = ${json};
const w = Math.min(900, window.innerWidth - 48);
function merge(a, b) {
  const steps = [...new Set([...a.step, ...b.step])].sort((x, y) => x - y);
  const ia = new Map(a.step.map((s, i) => [s, i])), ib = new Map(b.step.map((s, i) => [s, i]));
  return [steps, steps.map(s => ia.has(s) ? a.loss[ia.get(s)] : null), steps.map(s => ib.has(s) ? b.loss[ib.get(s)] : null)];
}
new uPlot({title: "loss", width: w, height: 300, spanGaps: true,
  series: [{label: "step"}, {label: "train loss", stroke: "#1f77b4"}, {label: "eval loss", stroke: "#d62728", points: {show: true}}]},
  merge(d.train, d.eval), document.getElementById("loss"));
new uPlot({title: "learning rate", width: w, height: 200, series: [{label: "step"}, {label: "lr", stroke: "#2ca02c"}]},
  [d.train.step, d.train.lr], document.getElementById("lr"));
new uPlot({title: "gradient norm (before clipping)", width: w, height: 200, series: [{label: "step"}, {label: "grad norm", stroke: "#9467bd"}]},
  [d.train.step, d.train.gradNorm], document.getElementById("gn"));
</script></body></html>
`;
    await writeFileAtomic(file, html);
}
