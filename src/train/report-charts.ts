// report-charts.ts: uPlot and the browser code that draws a metric against the training step, for report.html and any
// other page that shows training curves (inlined into a <script>, so it works offline).
//
// Two uPlot defaults are wrong for training curves: x is taken as Unix time (steps 1..30 drawn as "1/1/70 12:00am",
// ":30"), so the x scale is set `time: false` with integer tick steps; and y ticks are formatted with a fixed
// number of decimals, so a learning rate of 2e-4 reads "0". qloraFormatTicks gives every tick as many significant
// digits as it takes to read back as its value, in exponent form below 1e-3 and from 1e6 up.
import {readFileSync} from "node:fs";
import {createRequire} from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);

let assets: {js: string; css: string} | null = null;

/** uPlot's script and style sheet (read once: the report is rewritten at every checkpoint) */
export function uplotAssets(): {js: string; css: string} {
    if (!assets) {
        const dist = path.dirname(require.resolve("uplot/dist/uPlot.iife.min.js"));
        assets = {
            js: readFileSync(path.join(dist, "uPlot.iife.min.js"), "utf8"),
            css: readFileSync(path.join(dist, "uPlot.min.css"), "utf8")
        };
    }
    return assets;
}

/**
 * Browser code, run after uPlot's script. Defines:
 * - qloraFormatValue(v, digits = 4): one number for a legend or table ("0.0002" as "2e-4", 1234.5 as "1235");
 * - qloraFormatTicks(values): axis labels with the fewest significant digits that read back as the ticks;
 * - qloraStepChart(element, {title, yLabel, x, series: [{label, color, values, points?}], width, height,
 *   format?}): a uPlot chart of the series against the step (x: integer steps), returned so that a live page can
 *   setData() it. `format` turns the y ticks into labels (default qloraFormatTicks). The legend shows the last
 *   step's values.
 */
export const CHARTS_JS = `
function qloraNumber(v, digits, exponent) {
  if (v == null || !isFinite(v)) return "";
  if (v === 0) return "0";
  if (exponent) {
    const [m, e] = v.toExponential(digits - 1).split("e");
    return Number(m) + "e" + Number(e);
  }
  return String(Number(v.toPrecision(digits)));
}
function qloraUseExponent(values) {
  const big = Math.max(0, ...values.filter((v) => v != null && isFinite(v)).map(Math.abs));
  return big !== 0 && (big < 1e-3 || big >= 1e6);
}
function qloraFormatValue(v, digits) {
  return qloraNumber(v, digits || 4, qloraUseExponent([v]));
}
function qloraFormatTicks(values) {
  // enough digits that every label reads back as its tick (12.5 must not show as "13"), no more
  const exponent = qloraUseExponent(values);
  const sorted = values.filter((v) => v != null && isFinite(v)).sort((a, b) => a - b);
  let spacing = Infinity;
  for (let i = 1; i < sorted.length; i++) if (sorted[i] > sorted[i - 1]) spacing = Math.min(spacing, sorted[i] - sorted[i - 1]);
  if (!isFinite(spacing)) spacing = Math.abs(sorted[0] || 1);
  for (let digits = 1; digits < 12; digits++) {
    const labels = values.map((v) => qloraNumber(v, digits, exponent));
    if (values.every((v, i) => v == null || !isFinite(v) || Math.abs(Number(labels[i]) - v) <= 1e-6 * spacing)) return labels;
  }
  return values.map((v) => qloraNumber(v, 12, exponent));
}
// tick spacings for the step axis: whole steps only
const QLORA_STEP_INCRS = [1, 2, 5];
while (QLORA_STEP_INCRS[QLORA_STEP_INCRS.length - 1] < 1e9) QLORA_STEP_INCRS.push(...QLORA_STEP_INCRS.slice(-3).map((v) => v * 10));
function qloraAxisSize(u, labels, axisIdx, cycle) {
  if (!labels) return 50;
  const longest = Math.max(1, ...labels.map((l) => (l == null ? 0 : String(l).length)));
  return Math.ceil(longest * 7.2) + 16;
}
function qloraStepChart(element, c) {
  const format = c.format || qloraFormatTicks;
  const opts = {
    title: c.title,
    width: c.width,
    height: c.height || 220,
    // steps, not seconds since 1970; one step alone gets a step either side (uPlot would pad it to 0..2x)
    scales: {x: {time: false, range: (u, min, max) => (u.data[0].length === 1 ? [u.data[0][0] - 1, u.data[0][0] + 1] : [min, max])}},
    series: [
      {label: "step", value: (u, v) => (v == null ? "-" : String(v))},
      ...c.series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: 1.5,
        spanGaps: true,
        points: {show: s.points ?? c.x.length <= 60},
        value: (u, v) => (v == null ? "-" : qloraFormatValue(v))
      }))
    ],
    axes: [
      {label: "step", incrs: QLORA_STEP_INCRS, values: (u, splits) => splits.map((v) => String(v))},
      {label: c.yLabel, size: qloraAxisSize, values: (u, splits) => format(splits)}
    ]
  };
  // the legend shows the last step's values until the cursor picks another
  opts.hooks = {ready: [(u) => u.data[0].length && u.setLegend({idx: u.data[0].length - 1})]};
  return new uPlot(opts, [c.x, ...c.series.map((s) => s.values)], element);
}
`;
