// compare.ts: `qlora eval --compare`: the same tasks on several forms of one fine-tune (base, base + adapter, the
// 16-bit merge, its GGUF export) side by side, each column's difference to the first one with its standard error.
// When two columns scored the same questions (they always do: same tasks, same settings) the difference is paired:
// the mean of the per-question differences and the standard error of that mean, which is far smaller than the
// errors of the two scores combined when the models mostly agree (that is what makes a small difference
// meaningful). The results as JSON, a markdown table and (compare-html.ts) an HTML page with a chart.
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {GGUF_OUTTYPES, type GgufOuttype} from "../io/gguf-quants.js";
import {compareHtml} from "./compare-html.js";
import {type EvalReport, fillResultsDir, metricKey, reportJson, resultsDirOutput} from "./results.js";
import type {GroupResult, TaskResult} from "./run-task.js";
import {macroMean, type MeanStderr, meanStderr} from "./stats.js";

export type CompareColumnKind = "base" | "adapter" | "merged" | "gguf";

export interface CompareColumn {
    /** as the table shows it: base, adapter, merged, gguf:TYPE */
    name: string;
    kind: CompareColumnKind;
    /** gguf: the export's type (default q4_k_m) */
    ggufType?: GgufOuttype;
}

export const DEFAULT_GGUF_COMPARE_TYPE: GgufOuttype = "q4_k_m";

/**
 * the columns of `--compare base,adapter,merged,gguf[:TYPE]`, checked: known names, each once, and an adapter for
 * every column but base
 */
export function parseCompareColumns(names: string[], adapter: string | undefined): CompareColumn[] {
    const columns = names.map((name): CompareColumn => {
        if (name === "base" || name === "adapter" || name === "merged") return {name, kind: name};
        const gguf = /^gguf(?::(.*))?$/.exec(name);
        if (!gguf)
            throw new QloraError(
                `--compare: unknown column ${quoteValue(name)}; expected base, adapter, merged or gguf[:TYPE] ` +
                    `(TYPE: ${GGUF_OUTTYPES.join(", ")}; default ${DEFAULT_GGUF_COMPARE_TYPE})`
            );
        const type = (gguf[1] ?? DEFAULT_GGUF_COMPARE_TYPE) as GgufOuttype;
        if (!GGUF_OUTTYPES.includes(type))
            throw new QloraError(
                `--compare: ${quoteValue(name)} names no GGUF type; expected ${GGUF_OUTTYPES.map((t) => `gguf:${t}`).join(", ")}`
            );
        return {name: `gguf:${type}`, kind: "gguf", ggufType: type};
    });
    if (columns.length === 0) throw new QloraError("--compare needs at least one column: base, adapter, merged or gguf[:TYPE]");
    const twice = columns.find((c, i) => columns.findIndex((d) => d.name === c.name) !== i);
    if (twice) throw new QloraError(`--compare names ${twice.name} twice; name each column once`);
    const needAdapter = columns.filter((c) => c.kind !== "base");
    if (needAdapter.length > 0 && !adapter)
        throw new QloraError(
            `--compare ${needAdapter.map((c) => c.name).join(",")} needs --adapter DIR: the adapter to compare with the base`
        );
    return columns;
}

/** one column's results and how long it took (merging and exporting included) */
export interface ColumnResult {
    column: CompareColumn;
    report: EvalReport;
    elapsedS: number;
}

export interface CompareDiff extends MeanStderr {
    /** per-question differences (the same questions in both columns); else the two errors combined */
    paired: boolean;
}

export interface CompareRow {
    task: string;
    /** the harness's key: acc, acc_macro, exact_match,strict-match, pass@1, loss, perplexity */
    metric: string;
    /** questions (subjects for a macro average, examples for a loss) */
    n: number;
    /** per column */
    values: MeanStderr[];
    /** per column: its value minus the first column's; null for the first */
    diffs: (CompareDiff | null)[];
}

export interface CompareReport {
    columns: ColumnResult[];
    rows: CompareRow[];
    /** ISO time the comparison ended */
    date: string;
}

/** a question's key within a task: its subject and where it came from */
const questionKey = (subject: string | null, where: string) => `${subject ?? ""}\u0000${where}`;

function perQuestion(groups: GroupResult[], metric: string): Map<string, number> {
    const out = new Map<string, number>();
    for (const g of groups) for (const s of g.samples) out.set(questionKey(g.subject, s.where), s.scores[metric]);
    return out;
}

/** col − ref over the same questions (paired), else from the two means and their errors */
function difference(
    ref: MeanStderr,
    col: MeanStderr,
    refGroups: GroupResult[],
    colGroups: GroupResult[],
    metric: string
): CompareDiff {
    const a = perQuestion(refGroups, metric);
    const b = perQuestion(colGroups, metric);
    if (a.size > 0 && a.size === b.size && [...a.keys()].every((k) => b.has(k))) {
        const diffs = [...a.entries()].map(([k, x]) => (b.get(k) as number) - x);
        return {...meanStderr(diffs), paired: true};
    }
    const stderr = ref.stderr === null || col.stderr === null ? null : Math.sqrt(ref.stderr ** 2 + col.stderr ** 2);
    return {mean: col.mean - ref.mean, stderr, paired: false};
}

/** the macro average's difference: the subjects' paired differences, averaged as macroMean averages scores */
function macroDifference(ref: TaskResult, col: TaskResult, metric: string): CompareDiff {
    const subjects = ref.groups.map((g) => g.subject);
    const same = subjects.length === col.groups.length && col.groups.every((g) => subjects.includes(g.subject));
    const refMacro = ref.macro?.[metric] as MeanStderr;
    const colMacro = col.macro?.[metric] as MeanStderr;
    if (!same) return difference(refMacro, colMacro, [], [], metric);
    const perSubject = ref.groups.map((g) => {
        const other = col.groups.find((h) => h.subject === g.subject) as GroupResult;
        return difference(g.scores[metric], other.scores[metric], [g], [other], metric);
    });
    return {...macroMean(perSubject), paired: perSubject.every((d) => d.paired)};
}

/** the table: per task and metric, each column's value and its difference to the first column */
export function compareRows(columns: ColumnResult[]): CompareRow[] {
    const [first] = columns;
    const rows: CompareRow[] = [];
    for (const refTask of first.report.tasks) {
        const tasks = columns.map((c) => {
            const t = c.report.tasks.find((x) => x.task === refTask.task);
            if (!t) throw new Error(`column ${c.column.name} has no results for task ${refTask.task}`);
            return t;
        });
        const row = (metric: string, n: number, values: MeanStderr[], diff: (t: TaskResult, i: number) => CompareDiff) =>
            rows.push({task: refTask.task, metric, n, values, diffs: tasks.map((t, i) => (i === 0 ? null : diff(t, i)))});
        if (refTask.loss) {
            // per-example losses are not kept (the loss is a token mean): the difference has no standard error
            for (const m of ["loss", "perplexity"] as const) {
                const values = tasks.map((t) => ({mean: t.loss?.[m] ?? Number.NaN, stderr: null}));
                row(m, refTask.n, values, (_, i) => ({mean: values[i].mean - values[0].mean, stderr: null, paired: false}));
            }
            continue;
        }
        for (const m of Object.keys(refTask.scores)) {
            row(
                m,
                refTask.n,
                tasks.map((t) => t.scores[m]),
                (t) => difference(refTask.scores[m], t.scores[m], refTask.groups, t.groups, m)
            );
            if (refTask.macro?.[m])
                row(
                    metricKey(m, "_macro"),
                    refTask.groups.length,
                    tasks.map((t) => t.macro?.[m] as MeanStderr),
                    (t) => macroDifference(refTask, t, m)
                );
        }
    }
    return rows;
}

export function compareReport(columns: ColumnResult[]): CompareReport {
    return {columns, rows: compareRows(columns), date: new Date().toISOString()};
}

const round = (x: number | null) => (x === null || Number.isNaN(x) ? null : x);

export function compareJson(report: CompareReport): Record<string, unknown> {
    const names = report.columns.map((c) => c.column.name);
    return {
        columns: names,
        reference: names[0],
        rows: report.rows.map((r) => ({
            task: r.task,
            metric: r.metric,
            n: r.n,
            values: Object.fromEntries(r.values.map((v, i) => [names[i], {value: round(v.mean), stderr: round(v.stderr)}])),
            diffs: Object.fromEntries(
                r.diffs.flatMap((d, i) =>
                    d ? [[names[i], {value: round(d.mean), stderr: round(d.stderr), paired: d.paired}]] : []
                )
            )
        })),
        // each column's results as `qlora eval --json` gives them for that model alone
        models: Object.fromEntries(
            report.columns.map((c) => [c.column.name, {...reportJson(c.report), elapsed_s: Number(c.elapsedS.toFixed(3))}])
        ),
        date: report.date
    };
}

const fmt = (x: number | null | undefined, digits = 4) =>
    x === null || x === undefined || Number.isNaN(x) ? "N/A" : x.toFixed(digits);
const signed = (x: number, digits = 4) => (Number.isNaN(x) ? "N/A" : `${x >= 0 ? "+" : "−"}${Math.abs(x).toFixed(digits)}`);

/** a metric key as the table shows it: acc_macro -> acc (macro), exact_match,strict-match -> exact_match (strict-match) */
export function metricLabel(metric: string): string {
    const [name, filter] = metric.split(",");
    const shown = name.endsWith("_macro") ? `${name.slice(0, -"_macro".length)} (macro)` : name;
    return filter ? `${shown} (${filter})` : shown;
}

/** a value with its standard error, as the table shows it */
export function valueText(v: MeanStderr, digits = 4): string {
    return v.stderr === null ? fmt(v.mean, digits) : `${fmt(v.mean, digits)} ± ${fmt(v.stderr, digits)}`;
}

/** a difference with its standard error; † marks one that is not paired */
export function diffText(d: CompareDiff, digits = 4): string {
    const text = d.stderr === null ? signed(d.mean, digits) : `${signed(d.mean, digits)} ± ${fmt(d.stderr, digits)}`;
    return d.paired || d.stderr === null ? text : `${text} †`;
}

/** what the comparison ran on, in one line */
export function compareSummary(report: CompareReport): string {
    const c = report.columns[0].report.config;
    const adapter = report.columns.find((x) => x.report.config.adapter)?.report.config.adapter ?? null;
    return (
        `model: ${c.model}${adapter ? `, adapter: ${adapter}` : ""}${c.load_in_4bit ? " (4-bit base)" : ""}, device: ${c.device}` +
        `, limit: ${c.limit ?? "none"}, num_fewshot: ${c.num_fewshot ?? "each task's own"}, batch_size: ${c.batch_size}`
    );
}

export function compareMarkdown(report: CompareReport): string {
    const names = report.columns.map((c) => c.column.name);
    const header = ["Task", "Metric", "n", ...names, ...names.slice(1).map((n) => `${n} − ${names[0]}`)];
    const line = (cells: string[]) => `| ${cells.map((c) => c.replace(/\|/g, "\\|")).join(" | ")} |`;
    const digits = (metric: string) => (metric === "perplexity" ? 3 : 4);
    const rows = report.rows.map((r) =>
        line([
            r.task,
            metricLabel(r.metric),
            String(r.n),
            ...r.values.map((v) => valueText(v, digits(r.metric))),
            ...r.diffs.slice(1).map((d) => diffText(d as CompareDiff, digits(r.metric)))
        ])
    );
    const unpaired = report.rows.some((r) => r.diffs.some((d) => d && !d.paired && d.stderr !== null));
    return [
        compareSummary(report),
        "",
        line(header),
        line(header.map(() => "---")),
        ...rows,
        "",
        `± is one standard error. A difference to ${names[0]} is paired: the mean of the per-question differences ` +
            "and its standard error" +
            (unpaired ? "; † marks one over different questions (the two errors combined)" : "") +
            "; loss differences have none.",
        `wall time: ${report.columns.map((c) => `${c.column.name} ${c.elapsedS.toFixed(1)} s`).join(", ")}`,
        ""
    ].join("\n");
}

/** a column's folder name in the output: gguf:q4_k_m -> gguf-q4_k_m */
export const columnFolder = (name: string) => name.replace(/:/g, "-");

/**
 * writes compare.md, compare.json, compare.html and each column's results (results.json, results.md, samples) in
 * a subfolder, as one folder, atomically; the folder is an eval results folder (replaced only with --overwrite)
 */
export async function writeCompareDir(dir: string, report: CompareReport, overwrite: boolean): Promise<void> {
    await writeDirAtomic(
        dir,
        async (tmp) => {
            await writeFileAtomic(path.join(tmp, "compare.md"), compareMarkdown(report));
            await writeFileAtomic(path.join(tmp, "compare.json"), JSON.stringify(compareJson(report), null, 2) + "\n");
            await writeFileAtomic(path.join(tmp, "compare.html"), compareHtml(report));
            for (const c of report.columns) await fillResultsDir(path.join(tmp, columnFolder(c.column.name)), c.report);
        },
        resultsDirOutput(overwrite)
    );
}
