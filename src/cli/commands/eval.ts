// qlora eval: benchmark tasks (--task: MMLU, CMMLU, GSM8K, HumanEval or a task file), or loss and perplexity on a
// data file (--data), of a model with an optional adapter and 4-bit base; --compare runs the tasks on the base, the
// base + adapter, the merged model and its GGUF export, side by side.
import {Option, type Command} from "commander";
import cliProgress from "cli-progress";
import {
    checkResultsDir,
    compareJson,
    compareMarkdown,
    compareModels,
    evaluateLoss,
    evaluateTasks,
    parseCompareColumns,
    reportJson,
    reportMarkdown,
    writeCompareDir,
    writeResultsDir
} from "../../api/evaluate.js";
import {resolveModel} from "../../api/models.js";
import {cpu} from "../../backend/cpu.js";
import type {DataOptions} from "../../data/index.js";
import {QloraError} from "../../errors.js";
import {builtinTaskNames, loadTask} from "../../eval/task.js";
import {pc} from "../colors.js";
import {action, addModelOptions, escapeForTerminal, loadModelFromFlags, type ModelFlags, parseIntOption} from "../run.js";

interface EvalFlags extends ModelFlags {
    task?: string;
    data?: string;
    dataDir?: string;
    limit?: number;
    subjects?: string;
    numFewshot?: number;
    num_fewshot?: number;
    batchSize: number;
    batch_size?: number;
    output?: string;
    overwrite?: boolean;
    cache: boolean;
    datasetFormat?: string;
    maxSeqLength: number;
    allTokens?: boolean;
    json?: boolean;
    compare?: string;
    threads?: number;
}

export function registerEval(program: Command): void {
    const cmd = program
        .command("eval")
        .description(
            "benchmark a model (and adapter) on tasks as lm-evaluation-harness scores them (--task), or its loss and " +
                "perplexity on a data file (--data)"
        )
        .option(
            "-t, --task <tasks>",
            `comma-separated built-in tasks (${builtinTaskNames().join(", ")}) or task files (.yaml); see docs/EVAL.md`
        )
        .option("-d, --data <file>", "loss and perplexity on this data (any format qlora train reads)");
    addModelOptions(cmd)
        .option("--data-dir <dir>", "the folder of the benchmark data (default: $QLORA_EVAL_DATA, else ../shared/datasets/eval)")
        .option("--limit <n>", "score the first n questions (per subject for MMLU and CMMLU)", parseIntOption("--limit", 1))
        .option("--subjects <list>", "comma-separated subjects (MMLU, CMMLU), e.g. abstract_algebra,anatomy")
        .option("--num-fewshot <n>", "examples before each question (default: each task's)", parseIntOption("--num-fewshot", 0))
        .addOption(new Option("--num_fewshot <n>").hideHelp().argParser(parseIntOption("--num_fewshot", 0)))
        .option("--batch-size <n>", "prompts per forward pass", parseIntOption("--batch-size", 1), 8)
        .addOption(new Option("--batch_size <n>").hideHelp().argParser(parseIntOption("--batch_size", 1)))
        .option("-o, --output <dir>", "write results.json, results.md and samples_<task>.jsonl to this folder")
        .option("--overwrite", "replace the --output folder of an earlier qlora eval")
        .option("--no-cache", "recompute everything (default: reuse results cached for the same model, task and settings)")
        .option("--dataset-format <format>", "--data: alpaca, text, prompt_completion, messages or sharegpt (default: detected)")
        .option(
            "--max-seq-length <n>",
            "--data: truncate examples to this many tokens",
            parseIntOption("--max-seq-length", 2),
            1024
        )
        .option("--all-tokens", "--data: score every token, not only responses / assistant turns")
        .option(
            "--compare <columns>",
            "--task on several forms of the fine-tune, side by side: base, adapter, merged, gguf[:TYPE] (with --adapter; " +
                "TYPE q4_k_m by default, or f16, q8_0, f32)"
        )
        .option(
            "--threads <n>",
            "CPU threads of qlora's CPU backend and of llama.cpp (default: all cores)",
            parseIntOption("--threads", 1)
        )
        .option("--json", "print the results as one JSON line")
        .action(
            action(async (flags: EvalFlags) => {
                if (flags.threads) cpu().setNumThreads(flags.threads);
                if (flags.task !== undefined && flags.data !== undefined)
                    throw new QloraError("give --task (benchmark tasks) or --data (loss on a data file), not both");
                if (flags.compare !== undefined && flags.task === undefined)
                    throw new QloraError(
                        "--compare runs benchmark tasks: give them with --task (a task file with metric loss scores a data file)"
                    );
                if (flags.task !== undefined) return runTasks(flags);
                if (flags.data !== undefined) return runLoss(flags, flags.data);
                throw new QloraError(
                    `qlora eval needs --task (${builtinTaskNames().join(", ")} or a task file) or --data FILE (loss and perplexity)`
                );
            })
        );
}

/** --data: the loss and perplexity of the data, as before tasks existed */
async function runLoss(flags: EvalFlags, data: string): Promise<void> {
    const loaded = await loadModelFromFlags(flags);
    const options: DataOptions = {
        dataset_format: flags.datasetFormat as DataOptions["dataset_format"],
        max_seq_length: flags.maxSeqLength,
        completion_only_loss: !flags.allTokens,
        assistant_only_loss: !flags.allTokens
    };
    const r = await evaluateLoss(loaded, data, options, flags.batch_size ?? flags.batchSize);
    // on stderr, so --json output stays one line; truncated examples change what the loss measures
    for (const w of r.warnings) console.error(`warning: ${w}`);
    if (flags.json) {
        console.log(
            JSON.stringify({
                loss: r.loss,
                perplexity: r.perplexity,
                tokens: r.tokens,
                rows: r.rows,
                format: r.stats.format,
                adapter: flags.adapter ?? null
            })
        );
        return;
    }
    console.log(`data        ${data} (${r.stats.format}, ${r.rows} examples, ${r.tokens} scored tokens)`);
    console.log(`loss        ${r.loss.toFixed(4)}`);
    console.log(`perplexity  ${r.perplexity.toFixed(3)}`);
}

function splitList(value: string, flag: string): string[] {
    const items = value
        .split(",")
        .map((s) => s.trim())
        .filter(Boolean);
    if (items.length === 0) throw new QloraError(`${flag} expects a comma-separated list, got "${value}"`);
    return items;
}

/** a progress bar on stderr when it is a terminal, one per task; warnings stop it so they show on their own line */
function progressBar() {
    let bar: cliProgress.SingleBar | null = null;
    let barTask = "";
    const stop = () => {
        bar?.stop();
        bar = null;
    };
    return {
        stop,
        onWarning: (m: string) => {
            stop();
            console.error(pc.yellow(`warning: ${escapeForTerminal(m)}`));
        },
        onStatus: (m: string) => {
            stop();
            console.error(pc.dim(escapeForTerminal(m)));
        },
        onProgress: ({task, done, total}: {task: string; done: number; total: number}) => {
            if (process.stderr.isTTY !== true) return;
            if (!bar || barTask !== task) {
                stop();
                barTask = task;
                bar = new cliProgress.SingleBar(
                    {
                        format: ` {bar} {value}/{total} ${escapeForTerminal(task)} | {eta_formatted} left`,
                        hideCursor: true,
                        clearOnComplete: true,
                        stream: process.stderr
                    },
                    cliProgress.Presets.shades_classic
                );
                bar.start(total, done);
            } else bar.update(done);
        }
    };
}

/** --task: benchmark tasks (on several forms of the fine-tune with --compare), with a progress bar on a terminal */
async function runTasks(flags: EvalFlags): Promise<void> {
    const tasks = splitList(flags.task ?? "", "--task");
    // the columns, the output folder and the task files are checked before the model loads (and hours of work)
    const columns = flags.compare === undefined ? null : splitList(flags.compare, "--compare");
    if (columns) parseCompareColumns(columns, flags.adapter);
    const modelDir = await resolveModel(flags.model);
    if (flags.output)
        await checkResultsDir(
            flags.output,
            [{path: modelDir, what: "model folder"}, ...(flags.adapter ? [{path: flags.adapter, what: "adapter folder"}] : [])],
            flags.overwrite === true
        );
    for (const task of tasks) await loadTask(task, {dataDir: flags.dataDir});
    const progress = progressBar();
    const options = {
        adapter: flags.adapter,
        loadIn4bit: flags.loadIn4bit,
        limit: flags.limit,
        subjects: flags.subjects === undefined ? undefined : splitList(flags.subjects, "--subjects"),
        numFewshot: flags.num_fewshot ?? flags.numFewshot,
        batchSize: flags.batch_size ?? flags.batchSize,
        dataDir: flags.dataDir,
        cache: flags.cache,
        onWarning: progress.onWarning,
        onProgress: progress.onProgress
    };
    // file text (task names, subjects) reaches the terminal escaped, line by line
    const print = (markdown: string) => process.stdout.write(markdown.split("\n").map(escapeForTerminal).join("\n"));
    if (columns) {
        // the base alone: the adapter is applied, merged and exported per column
        const base = await loadModelFromFlags({...flags, adapter: undefined});
        const report = await compareModels(base, tasks, columns, {
            ...options,
            ggufThreads: flags.threads,
            onStatus: progress.onStatus
        });
        progress.stop();
        if (flags.output) await writeCompareDir(flags.output, report, flags.overwrite === true);
        if (flags.json) console.log(JSON.stringify(compareJson(report)));
        else {
            print(compareMarkdown(report));
            if (flags.output) console.log(`\nresults  ${flags.output}/compare.md, compare.json, compare.html`);
        }
        return;
    }
    const loaded = await loadModelFromFlags(flags);
    const report = await evaluateTasks(loaded, tasks, options);
    progress.stop();
    if (flags.output) await writeResultsDir(flags.output, report, flags.overwrite === true);
    if (flags.json) console.log(JSON.stringify(reportJson(report)));
    else {
        print(reportMarkdown(report));
        if (flags.output) console.log(`\nresults  ${flags.output}/results.json, results.md`);
    }
}
