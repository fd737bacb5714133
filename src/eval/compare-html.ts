// compare-html.ts: the comparison as one self-contained HTML page: the table, then per task and metric a bar
// chart (inline SVG drawn here: one bar per column, error bars of ± one standard error). No script, no font, no
// link (inline SVG in HTML needs no namespace): it opens anywhere without a network.
import {type CompareDiff, type CompareReport, compareSummary, diffText, metricLabel, valueText} from "./compare.js";
import type {MeanStderr} from "./stats.js";

const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f"];

function escapeHtml(s: string): string {
    return s.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c] as string);
}

/** a number as an SVG coordinate */
const px = (x: number) => (Math.round(x * 10) / 10).toString();

/** a tick step of 1, 2 or 5 times a power of ten that gives about four ticks up to `top` */
function tickStep(top: number): number {
    const raw = top / 4;
    const power = 10 ** Math.floor(Math.log10(raw));
    return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) as number;
}

/** one bar chart: a bar per column with its error bar and value */
function barChart(title: string, names: string[], values: MeanStderr[], diffs: (CompareDiff | null)[], digits: number): string {
    const barWidth = 44,
        gap = 22,
        left = 52,
        top = 16,
        plotHeight = 160,
        bottom = 44;
    const width = left + names.length * (barWidth + gap) + gap;
    const height = top + plotHeight + bottom;
    const finite = values.filter((v) => Number.isFinite(v.mean));
    const highest = Math.max(0, ...finite.map((v) => v.mean + (v.stderr ?? 0)));
    const lowest = Math.min(0, ...finite.map((v) => v.mean - (v.stderr ?? 0)));
    const step = tickStep(highest - lowest || 1);
    const yMax = Math.ceil(highest / step) * step || step;
    const yMin = Math.floor(lowest / step) * step;
    const y = (v: number) => top + plotHeight * (1 - (v - yMin) / (yMax - yMin));
    const parts: string[] = [];
    for (let t = yMin; t <= yMax + step / 2; t += step) {
        parts.push(
            `<line class="grid" x1="${left}" x2="${width - gap / 2}" y1="${px(y(t))}" y2="${px(y(t))}"/>`,
            `<text class="tick" x="${left - 6}" y="${px(y(t) + 4)}" text-anchor="end">${escapeHtml(Number(t.toPrecision(6)).toString())}</text>`
        );
    }
    values.forEach((v, i) => {
        const x = left + gap + i * (barWidth + gap);
        const color = PALETTE[i % PALETTE.length];
        const d = diffs[i];
        const tip = `${names[i]}: ${valueText(v, digits)}${d ? ` (${names[i]} − ${names[0]}: ${diffText(d, digits)})` : ""}`;
        if (Number.isFinite(v.mean)) {
            const y0 = y(Math.max(0, yMin)),
                y1 = y(v.mean);
            parts.push(
                `<rect class="bar" data-column="${escapeHtml(names[i])}" x="${x}" y="${px(Math.min(y0, y1))}" width="${barWidth}" ` +
                    `height="${px(Math.abs(y1 - y0))}" fill="${color}"><title>${escapeHtml(tip)}</title></rect>`
            );
            if (v.stderr !== null && v.stderr > 0) {
                const cx = x + barWidth / 2,
                    lo = y(v.mean - v.stderr),
                    hi = y(v.mean + v.stderr);
                parts.push(
                    `<path class="err" d="M${px(cx)} ${px(lo)}V${px(hi)}M${px(cx - 6)} ${px(lo)}H${px(cx + 6)}M${px(cx - 6)} ${px(hi)}H${px(cx + 6)}"/>`
                );
            }
            parts.push(
                `<text class="value" x="${px(x + barWidth / 2)}" y="${px(y(v.mean + (v.stderr ?? 0)) - 4)}" text-anchor="middle">${escapeHtml(v.mean.toFixed(digits === 3 ? 2 : 3))}</text>`
            );
        }
        parts.push(
            `<text class="name" x="${px(x + barWidth / 2)}" y="${top + plotHeight + 16}" text-anchor="middle">${escapeHtml(names[i])}</text>`
        );
    });
    return (
        `<figure><figcaption>${escapeHtml(title)}</figcaption>` +
        `<svg role="img" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">` +
        `<title>${escapeHtml(title)}</title>${parts.join("")}</svg></figure>`
    );
}

export function compareHtml(report: CompareReport): string {
    const names = report.columns.map((c) => c.column.name);
    const digits = (metric: string) => (metric === "perplexity" ? 3 : 4);
    const head = ["Task", "Metric", "n", ...names, ...names.slice(1).map((n) => `${n} − ${names[0]}`)];
    const table = [
        `<tr>${head.map((h) => `<th>${escapeHtml(h)}</th>`).join("")}</tr>`,
        ...report.rows.map(
            (r) =>
                `<tr><td>${escapeHtml(r.task)}</td><td>${escapeHtml(metricLabel(r.metric))}</td><td>${r.n}</td>` +
                r.values.map((v) => `<td>${escapeHtml(valueText(v, digits(r.metric)))}</td>`).join("") +
                r.diffs
                    .slice(1)
                    .map((d) => `<td>${escapeHtml(diffText(d as CompareDiff, digits(r.metric)))}</td>`)
                    .join("") +
                "</tr>"
        )
    ].join("\n");
    const charts = report.rows
        .map((r) => barChart(`${r.task} · ${metricLabel(r.metric)}`, names, r.values, r.diffs, digits(r.metric)))
        .join("\n");
    const times = report.columns.map((c) => `${c.column.name} ${c.elapsedS.toFixed(1)} s`).join(", ");
    return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qlora eval --compare</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}p{color:#555}
table{border-collapse:collapse;margin:12px 0 20px}th,td{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th:nth-child(-n+2),td:nth-child(-n+2){text-align:left}
figure{display:inline-block;margin:0 20px 20px 0;vertical-align:top}figcaption{font-size:14px;margin-bottom:4px}
svg text{font-size:11px;fill:#333}.grid{stroke:#e4e4e4}.err{stroke:#222;stroke-width:1.5;fill:none}.value{font-size:10px}
</style></head><body>
<h1>qlora eval --compare</h1>
<p>${escapeHtml(compareSummary(report))}</p>
<table>
${table}
</table>
<p>± is one standard error. A difference to ${escapeHtml(names[0])} is paired: the mean of the per-question differences and
its standard error (a † marks one over different questions: the two errors combined); loss differences have none.
Error bars: ± one standard error. Wall time: ${escapeHtml(times)}. ${escapeHtml(report.date)}</p>
${charts}
</body></html>
`;
}
