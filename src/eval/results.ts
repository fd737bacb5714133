// results.ts: an evaluation's results as JSON (lm-evaluation-harness's key names: acc, acc_stderr,
// "exact_match,strict-match", "exact_match_stderr,strict-match"), as a markdown table, and as an output folder
// (results.json, results.md, samples_<task>.jsonl) written atomically.
import {promises as fs} from "node:fs";
import path from "node:path";
import {assertDirOutput, assertOutputSeparate, writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import type {MeanStderr} from "./stats.js";
import type {TaskResult} from "./run-task.js";

/** the kind in the marker of a results folder: only such folders are replaced */
export const EVAL_RESULTS_KIND = "eval-results";

export interface EvalRunConfig {
    model: string;
    adapter: string | null;
    load_in_4bit: boolean;
    device: "cpu" | "cuda";
    limit: number | null;
    num_fewshot: number | null;
    subjects: string[] | null;
    batch_size: number;
    /** --compare: merged or gguf:TYPE when the model was made from model + adapter (absent otherwise) */
    form?: string;
}

export interface EvalReport {
    config: EvalRunConfig;
    tasks: TaskResult[];
    /** ISO time the run ended */
    date: string;
}

/** "exact_match,strict-match" + "_stderr" -> "exact_match_stderr,strict-match" (the harness's filter suffix) */
export function metricKey(metric: string, suffix: string): string {
    const comma = metric.indexOf(",");
    return comma < 0 ? `${metric}${suffix}` : `${metric.slice(0, comma)}${suffix}${metric.slice(comma)}`;
}

function putScores(out: Record<string, unknown>, scores: Record<string, MeanStderr>, suffix = ""): void {
    for (const [m, s] of Object.entries(scores)) {
        out[metricKey(m, suffix)] = s.mean;
        out[metricKey(m, `${suffix}_stderr`)] = s.stderr;
    }
}

/** one task's results as JSON (without the samples) */
export function taskJson(t: TaskResult): Record<string, unknown> {
    const out: Record<string, unknown> = {
        metric: t.metric,
        version: t.version,
        file: t.file,
        num_fewshot: t.numFewshot,
        n: t.n,
        truncated: t.truncated,
        cached: t.cached,
        elapsed_s: Number(t.elapsedS.toFixed(3))
    };
    if (t.loss) Object.assign(out, t.loss);
    putScores(out, t.scores);
    if (t.macro) putScores(out, t.macro, "_macro");
    if (t.groups.length > 1 || t.groups[0]?.subject) {
        const subjects: Record<string, unknown> = {};
        for (const g of t.groups) {
            const s: Record<string, unknown> = {n: g.n, truncated: g.truncated, cached: g.cached};
            putScores(s, g.scores);
            subjects[g.subject ?? ""] = s;
        }
        out.subjects = subjects;
    }
    return out;
}

export function reportJson(report: EvalReport): Record<string, unknown> {
    return {
        results: Object.fromEntries(report.tasks.map((t) => [t.task, taskJson(t)])),
        config: report.config,
        date: report.date
    };
}

const fmt = (x: number | null | undefined, digits = 4) =>
    x === null || x === undefined || Number.isNaN(x) ? "N/A" : x.toFixed(digits);

/** the results as a markdown table in the layout lm-evaluation-harness prints */
export function reportMarkdown(report: EvalReport): string {
    const rows: string[][] = [];
    for (const t of report.tasks) {
        const shots = String(t.numFewshot);
        if (t.loss) {
            rows.push([t.task, String(t.version ?? ""), "none", shots, "loss", String(t.n), fmt(t.loss.loss), ""]);
            rows.push(["", "", "none", shots, "perplexity", String(t.n), fmt(t.loss.perplexity, 3), ""]);
            continue;
        }
        for (const [m, s] of Object.entries(t.scores)) {
            const [metric, filter = "none"] = m.split(",");
            rows.push([t.task, String(t.version ?? ""), filter, shots, metric, String(t.n), fmt(s.mean), fmt(s.stderr)]);
            const macro = t.macro?.[m];
            if (macro)
                rows.push([
                    "",
                    "",
                    filter,
                    shots,
                    `${metric} (macro)`,
                    String(t.groups.length),
                    fmt(macro.mean),
                    fmt(macro.stderr)
                ]);
        }
        if (t.groups.length > 1)
            for (const g of t.groups)
                for (const [m, s] of Object.entries(g.scores)) {
                    const [metric, filter = "none"] = m.split(",");
                    rows.push([` - ${g.subject}`, "", filter, shots, metric, String(g.n), fmt(s.mean), fmt(s.stderr)]);
                }
    }
    const header = ["Task", "Version", "Filter", "n-shot", "Metric", "n", "Value", "± Stderr"];
    const line = (cells: string[]) => `| ${cells.map((c) => c.replace(/\|/g, "\\|")).join(" | ")} |`;
    const c = report.config;
    return [
        `model: ${c.model}${c.adapter ? `, adapter: ${c.adapter}` : ""}${c.form ? ` (${c.form})` : ""}` +
            `${c.load_in_4bit ? " (4-bit)" : ""}, device: ${c.device}` +
            `, limit: ${c.limit ?? "none"}, batch_size: ${c.batch_size}`,
        "",
        line(header),
        line(header.map(() => "---")),
        ...rows.map(line),
        ""
    ].join("\n");
}

/** how an existing results folder is treated: replaced only with --overwrite, and only when eval wrote it */
export function resultsDirOutput(overwrite: boolean) {
    return {replace: overwrite ? "owned" : "never", kind: EVAL_RESULTS_KIND, overwriteHint: "--overwrite"} as const;
}

/** the output folder check, before the evaluation runs: not an input; new, empty, or (--overwrite) earlier results */
export async function checkResultsDir(dir: string, inputs: {path: string; what: string}[], overwrite: boolean): Promise<void> {
    await assertOutputSeparate(dir, inputs, "--output");
    await assertDirOutput(dir, resultsDirOutput(overwrite));
}

/** writes results.json, results.md and samples_<task>.jsonl into `dir` (a folder being filled, made here) */
export async function fillResultsDir(dir: string, report: EvalReport): Promise<void> {
    await fs.mkdir(dir, {recursive: true});
    await writeFileAtomic(path.join(dir, "results.json"), JSON.stringify(reportJson(report), null, 2) + "\n");
    await writeFileAtomic(path.join(dir, "results.md"), reportMarkdown(report));
    for (const t of report.tasks) {
        const samples = t.groups.flatMap((g) => g.samples.map((s) => JSON.stringify({subject: g.subject, ...s})));
        if (samples.length > 0) await writeFileAtomic(path.join(dir, `samples_${t.task}.jsonl`), samples.join("\n") + "\n");
    }
}

/** writes results.json, results.md and samples_<task>.jsonl into `dir` as one atomic folder */
export async function writeResultsDir(dir: string, report: EvalReport, overwrite: boolean): Promise<void> {
    await writeDirAtomic(dir, (tmp) => fillResultsDir(tmp, report), resultsDirOutput(overwrite));
}
