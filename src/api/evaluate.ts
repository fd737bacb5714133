// evaluate.ts: evaluation of a loaded model: loss and perplexity on a data file (evaluateLoss), and benchmark
// tasks (evaluateTasks: task files, built-in or the user's, scored as lm-evaluation-harness scores them; see
// docs/EVAL.md).
import path from "node:path";
import {QloraError} from "../errors.js";
import {EvalCache} from "../eval/cache.js";
import type {EvalReport} from "../eval/results.js";
import {type EvalProgress, runTask, type TaskResult} from "../eval/run-task.js";
import {loadTask} from "../eval/task.js";
import type {LoadedModel} from "./models.js";

export {evaluateLoss} from "../eval/loss.js";
export type {EvalResult} from "../eval/loss.js";
export {builtinTaskNames, loadTask} from "../eval/task.js";
export {reportJson, reportMarkdown, checkResultsDir, writeResultsDir} from "../eval/results.js";
export type {EvalReport} from "../eval/results.js";
export type {EvalProgress, TaskResult} from "../eval/run-task.js";

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

/**
 * Runs benchmark tasks (built-in names such as "mmlu", or task file paths) on a loaded model. Every task file is
 * read and validated before the first one runs.
 */
export async function evaluateTasks(loaded: LoadedModel, tasks: string[], opts: EvaluateTasksOptions = {}): Promise<EvalReport> {
    if (tasks.length === 0) throw new QloraError("no task to run: name a built-in task or a task file");
    const useCache = opts.cache ?? true;
    if (useCache && loaded.lora && !opts.adapter)
        throw new QloraError(
            "evaluateTasks: the model carries an adapter: pass its folder as options.adapter so its cached results " +
                "are told apart from the base model's, or pass cache: false"
        );
    const loadedTasks = [];
    for (const entry of tasks) loadedTasks.push(await loadTask(entry, {dataDir: opts.dataDir}));
    const names = loadedTasks.map((t) => t.name);
    const twice = names.find((n, i) => names.indexOf(n) !== i);
    if (twice !== undefined) throw new QloraError(`two tasks are named ${twice}; each task needs its own name in the results`);
    const batchSize = opts.batchSize ?? 8;
    if (!Number.isSafeInteger(batchSize) || batchSize < 1)
        throw new QloraError(`batch size must be an integer >= 1 (got ${batchSize})`);
    const model = {
        lm: loaded.lm,
        tokenizer: loaded.tokenizer,
        eosTokenIds: loaded.eosTokenIds,
        identity: {
            modelDir: loaded.dir,
            adapterDir: opts.adapter ?? null,
            loadIn4bit: opts.loadIn4bit ?? false,
            device: loaded.device
        }
    };
    const cache = useCache ? new EvalCache(opts.cacheDir) : null;
    const results: TaskResult[] = [];
    for (const task of loadedTasks)
        results.push(
            await runTask(model, task, {
                limit: opts.limit,
                subjects: opts.subjects,
                numFewshot: opts.numFewshot,
                batchSize,
                cache,
                onProgress: opts.onProgress,
                onWarning: opts.onWarning
            })
        );
    return {
        config: {
            model: loaded.dir,
            adapter: opts.adapter ? path.resolve(opts.adapter) : null,
            load_in_4bit: opts.loadIn4bit ?? false,
            device: loaded.device,
            limit: opts.limit ?? null,
            num_fewshot: opts.numFewshot ?? null,
            subjects: opts.subjects ?? null,
            batch_size: batchSize
        },
        tasks: results,
        date: new Date().toISOString()
    };
}
