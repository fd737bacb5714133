// evaluate.ts: evaluation of a loaded model: loss and perplexity on a data file (evaluateLoss), benchmark tasks
// (evaluateTasks: task files, built-in or the user's, scored as lm-evaluation-harness scores them; see
// docs/EVAL.md), and the same tasks on a fine-tune's forms side by side (compareModels: base, base + adapter, the
// 16-bit merge, its GGUF export through llama.cpp).
import {promises as fs, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {QloraError} from "../errors.js";
import {EvalCache, type ModelIdentity} from "../eval/cache.js";
import {type ColumnResult, type CompareColumn, type CompareReport, compareReport, parseCompareColumns} from "../eval/compare.js";
import {checkLlamaCpp, type GgufLm, openGgufLm} from "../eval/llama-cpp.js";
import {causalEvalLm, type EvalLm, type EvalModel} from "../eval/model.js";
import type {EvalReport, EvalRunConfig} from "../eval/results.js";
import {type EvalProgress, runTask, type TaskResult} from "../eval/run-task.js";
import {type LoadedTask, loadTask} from "../eval/task.js";
import {loadModelConfig} from "../io/hf-config.js";
import {mergeAdapter} from "../peft/merge.js";
import {exportGguf} from "./export-gguf.js";
import {type LoadedModel, loadModel, withAdapter} from "./models.js";

export {evaluateLoss} from "../eval/loss.js";
export type {EvalResult} from "../eval/loss.js";
export {builtinTaskNames, loadTask} from "../eval/task.js";
export {reportJson, reportMarkdown, checkResultsDir, writeResultsDir} from "../eval/results.js";
export type {EvalReport} from "../eval/results.js";
export type {EvalProgress, TaskResult} from "../eval/run-task.js";
export {compareJson, compareMarkdown, parseCompareColumns, writeCompareDir} from "../eval/compare.js";
export type {CompareColumn, CompareReport} from "../eval/compare.js";
export {compareHtml} from "../eval/compare-html.js";

export interface EvaluateTasksOptions {
    /** the adapter folder `loaded` carries (it tells cached results apart; required with the cache on) */
    adapter?: string;
    /** whether `loaded` was quantized to NF4 as it loaded (tells cached results apart) */
    loadIn4bit?: boolean;
    /** questions per subject (MMLU, CMMLU), in all for other tasks; the first ones in file order */
    limit?: number;
    /** only these subjects (tasks with subjects) */
    subjects?: string[];
    /** overrides each task's num_fewshot */
    numFewshot?: number;
    /** prompts per forward pass (default 8) */
    batchSize?: number;
    /** the folder ${QLORA_EVAL_DATA} of the task files stands for (default: $QLORA_EVAL_DATA, then ../shared/datasets/eval) */
    dataDir?: string;
    /** read and write cached results (default true) */
    cache?: boolean;
    /** the cache folder (default: $QLORA_CACHE/eval, $XDG_CACHE_HOME/qlora/eval or ~/.cache/qlora/eval) */
    cacheDir?: string;
    onProgress?: (p: EvalProgress) => void;
    onWarning?: (message: string) => void;
}

/** every task file read and validated, before the first one runs */
async function loadTasks(tasks: string[], dataDir: string | undefined): Promise<LoadedTask[]> {
    if (tasks.length === 0) throw new QloraError("no task to run: name a built-in task or a task file");
    const loadedTasks = [];
    for (const entry of tasks) loadedTasks.push(await loadTask(entry, {dataDir}));
    const names = loadedTasks.map((t) => t.name);
    const twice = names.find((n, i) => names.indexOf(n) !== i);
    if (twice !== undefined) throw new QloraError(`two tasks are named ${twice}; each task needs its own name in the results`);
    return loadedTasks;
}

function batchSizeOf(opts: EvaluateTasksOptions): number {
    const batchSize = opts.batchSize ?? 8;
    if (!Number.isSafeInteger(batchSize) || batchSize < 1)
        throw new QloraError(`batch size must be an integer >= 1 (got ${batchSize})`);
    return batchSize;
}

/** a model loaded by loadModel, as a task runs it */
function evalModelOf(loaded: LoadedModel, identity: ModelIdentity, open?: () => Promise<EvalLm>): EvalModel {
    let lm: Promise<EvalLm> | null = null;
    return {
        tokenizer: loaded.tokenizer,
        eosTokenIds: loaded.eosTokenIds,
        identity,
        contextLength: loaded.lm.config.maxPositionEmbeddings,
        lm: () => {
            lm ??= open ? open() : Promise.resolve(causalEvalLm(loaded.lm));
            return lm;
        }
    };
}

/** the tasks, one after another, on one model */
async function runTasks(
    model: EvalModel,
    tasks: LoadedTask[],
    opts: EvaluateTasksOptions,
    config: EvalRunConfig,
    progressPrefix = ""
): Promise<EvalReport> {
    const cache = (opts.cache ?? true) ? new EvalCache(opts.cacheDir) : null;
    const onProgress = opts.onProgress;
    const results: TaskResult[] = [];
    for (const task of tasks)
        results.push(
            await runTask(model, task, {
                limit: opts.limit,
                subjects: opts.subjects,
                numFewshot: opts.numFewshot,
                batchSize: config.batch_size,
                cache,
                onProgress: onProgress && ((p) => onProgress({...p, task: progressPrefix + p.task})),
                onWarning: opts.onWarning
            })
        );
    return {config, tasks: results, date: new Date().toISOString()};
}

function runConfig(loaded: LoadedModel, opts: EvaluateTasksOptions, adapter: string | undefined): EvalRunConfig {
    return {
        model: loaded.dir,
        adapter: adapter ? path.resolve(adapter) : null,
        load_in_4bit: opts.loadIn4bit ?? false,
        device: loaded.device,
        limit: opts.limit ?? null,
        num_fewshot: opts.numFewshot ?? null,
        subjects: opts.subjects ?? null,
        batch_size: batchSizeOf(opts)
    };
}

/**
 * Runs benchmark tasks (built-in names such as "mmlu", or task file paths) on a loaded model. Every task file is
 * read and validated before the first one runs.
 */
export async function evaluateTasks(loaded: LoadedModel, tasks: string[], opts: EvaluateTasksOptions = {}): Promise<EvalReport> {
    const loadedTasks = await loadTasks(tasks, opts.dataDir);
    if ((opts.cache ?? true) && loaded.lora && !opts.adapter)
        throw new QloraError(
            "evaluateTasks: the model carries an adapter: pass its folder as options.adapter so its cached results " +
                "are told apart from the base model's, or pass cache: false"
        );
    const config = runConfig(loaded, opts, opts.adapter);
    const model = evalModelOf(loaded, {
        modelDir: loaded.dir,
        adapterDir: opts.adapter ?? null,
        loadIn4bit: opts.loadIn4bit ?? false,
        device: loaded.device
    });
    return runTasks(model, loadedTasks, opts, config);
}

export interface CompareOptions extends EvaluateTasksOptions {
    /** the adapter compared: required for the adapter, merged and gguf columns */
    adapter?: string;
    /** llama.cpp's CPU threads for gguf columns (default: llama.cpp's, every core) */
    ggufThreads?: number;
    /** what is being done (a column starts; the adapter is merged; the merge is exported), for the user */
    onStatus?: (message: string) => void;
}

/**
 * The same tasks and settings on several forms of one fine-tune (see docs/EVAL.md, --compare): `base` is the
 * loaded model (without its adapter), `adapter` the base + options.adapter, `merged` the adapter merged into a
 * 16-bit copy of the base (in a temporary folder, removed afterwards; against the NF4-rounded base when
 * loadIn4bit), `gguf:TYPE` that copy exported to GGUF and run by llama.cpp (node-llama-cpp). Columns run one after
 * another; a column whose results are all cached loads, merges and exports nothing.
 */
export async function compareModels(
    base: LoadedModel,
    tasks: string[],
    columnNames: string[],
    opts: CompareOptions = {}
): Promise<CompareReport> {
    const adapter = opts.adapter;
    const columns = parseCompareColumns(columnNames, adapter);
    if (base.lora)
        throw new QloraError("compareModels: pass the base model without an adapter; the adapter goes in options.adapter");
    const loadedTasks = await loadTasks(tasks, opts.dataDir);
    if (columns.some((c) => c.kind === "gguf")) await checkLlamaCpp(base.device);
    const status = opts.onStatus ?? (() => undefined);
    const loadIn4bit = opts.loadIn4bit ?? false;
    const identity = (adapterDir: string | null, form?: string): ModelIdentity => ({
        modelDir: base.dir,
        adapterDir,
        loadIn4bit,
        device: base.device,
        ...(form ? {form} : {})
    });

    // the scratch folder of the merge and the GGUF files: made when first needed, removed at the end
    let scratch: string | null = null;
    let merged: Promise<string> | null = null;
    const mergedDir = (adapterDir: string) => {
        merged ??= (async () => {
            scratch ??= await fs.mkdtemp(path.join(os.tmpdir(), "qlora-compare-"));
            const out = path.join(scratch, "merged");
            const dtype = base.model.config.torchDtype === "float16" ? "f16" : "bf16";
            status(`merging the adapter into a ${dtype} copy of the base${loadIn4bit ? " as NF4 rounded it" : ""} (${out})`);
            // on the device the base runs on (equal to the host's merge but for rare one-ulp differences)
            await mergeAdapter({model: base.dir, adapter: adapterDir, out, dtype, againstNf4: loadIn4bit, device: base.device});
            return out;
        })();
        return merged;
    };
    const opened: GgufLm[] = [];
    const modelOf = (column: CompareColumn): EvalModel => {
        if (column.kind === "base") return evalModelOf(base, identity(null));
        const adapterDir = adapter as string;
        if (column.kind === "adapter")
            return evalModelOf(base, identity(adapterDir), async () => causalEvalLm((await withAdapter(base, adapterDir)).lm));
        if (column.kind === "merged")
            return evalModelOf(base, identity(adapterDir, "merged"), async () => {
                const dir = await mergedDir(adapterDir);
                return causalEvalLm((await loadModel(dir, {device: base.device})).lm);
            });
        const type = column.ggufType as NonNullable<CompareColumn["ggufType"]>;
        return evalModelOf(base, identity(adapterDir, column.name), async () => {
            const dir = await mergedDir(adapterDir);
            const file = path.join(scratch as string, `merged-${type}.gguf`);
            status(`exporting the merged model to GGUF ${type} (${file})`);
            await exportGguf({modelDir: dir, outtype: type, out: file});
            const lm = await openGgufLm(file, await loadModelConfig(dir), {device: base.device, threads: opts.ggufThreads});
            opened.push(lm);
            return lm;
        });
    };

    // Ctrl+C or a kill removes the temporary merge (a 16-bit copy of the model) before the process ends as it would
    const onSignal = (signal: NodeJS.Signals) => {
        if (scratch) rmSync(scratch, {recursive: true, force: true});
        process.removeListener("SIGINT", onSignal);
        process.removeListener("SIGTERM", onSignal);
        process.kill(process.pid, signal);
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
    const results: ColumnResult[] = [];
    try {
        for (const column of columns) {
            status(`${column.name}: ${loadedTasks.map((t) => t.name).join(", ")}`);
            const started = performance.now();
            const config: EvalRunConfig = {
                ...runConfig(base, opts, column.kind === "base" ? undefined : adapter),
                ...(column.kind === "merged" || column.kind === "gguf" ? {form: column.name} : {})
            };
            const report = await runTasks(modelOf(column), loadedTasks, opts, config, `${column.name} `);
            // llama.cpp's memory is given back before the next column
            for (const lm of opened.splice(0)) await lm.dispose();
            results.push({column, report, elapsedS: (performance.now() - started) / 1000});
        }
    } finally {
        for (const lm of opened) await lm.dispose().catch(() => undefined);
        process.removeListener("SIGINT", onSignal);
        process.removeListener("SIGTERM", onSignal);
        if (scratch) await fs.rm(scratch, {recursive: true, force: true});
    }
    return compareReport(results);
}
