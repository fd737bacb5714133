// task.ts: a benchmark task is data: a YAML file (the built-in ones in eval-tasks/, or the user's own) names the
// data file, its format, the prompt (lm-evaluation-harness's keys: description, doc_to_text, doc_to_target,
// doc_to_choice, target_delimiter, fewshot_delimiter, num_fewshot, generation_kwargs) and the metric. Templates use
// `{field}` placeholders, as the `template` key of a train config does. Validated here with zod; unknown keys are
// refused by name.
import {existsSync, readdirSync} from "node:fs";
import {createHash} from "node:crypto";
import path from "node:path";
import {parse as parseYaml} from "yaml";
import {z} from "zod";
import {packageRoot} from "../backend/native.js";
import {QloraError, quoteValue} from "../errors.js";
import {readTextFile} from "../io/files.js";
import {compileExtractionRegex} from "./extract.js";

/** where the built-in task files live */
export const BUILTIN_TASK_DIR = path.join(packageRoot, "eval-tasks");

/** the variable for the folder of the benchmark data in a task's `data` (see evalDataRoot) */
export const EVAL_DATA_VARIABLE = "QLORA_EVAL_DATA";
/** how a task file writes it: ${QLORA_EVAL_DATA} */
const EVAL_DATA_PLACEHOLDER = `\${${EVAL_DATA_VARIABLE}}`;

export const METRICS = ["choice_loglik", "exact_match", "pass_at_1", "loss"] as const;
export type MetricKind = (typeof METRICS)[number];

const nonEmpty = z.string().min(1);
/** a regular expression as lm-evaluation-harness writes it (Python syntax), checked to compile */
const regexString = nonEmpty.refine((s) => {
    try {
        compileExtractionRegex(s);
        return true;
    } catch {
        return false;
    }
}, "expected a valid regular expression");

export const TaskFileSchema = z
    .object({
        task: z
            .string()
            .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]*$/, "expected a name of letters, digits, _ . - (it names the results)")
            .describe("the task's name in the results"),
        version: z.number().optional().describe("the task's version, shown with its results"),
        source: z.string().optional().describe("where to get the data (shown when the data file is missing)"),
        data: nonEmpty.describe(
            `the data: a path relative to this file, or ${EVAL_DATA_PLACEHOLDER}/<file> under the benchmark data folder`
        ),
        format: z
            .enum(["mmlu_csv", "cmmlu_csv", "jsonl"])
            .optional()
            .describe("mmlu_csv, cmmlu_csv (archives or folders of per-subject CSV files) or jsonl (JSON Lines, JSON, .gz)"),
        test_split: nonEmpty.default("test").describe("the split scored (mmlu_csv, cmmlu_csv)"),
        fewshot_split: nonEmpty.default("dev").describe("the split the few-shot examples come from (mmlu_csv, cmmlu_csv)"),
        fewshot_data: nonEmpty
            .optional()
            .describe("jsonl: a file of few-shot examples; without it they are the first records of data, not scored"),
        num_fewshot: z.number().int().min(0).default(0).describe("examples shown before each question"),
        description: z.string().default("").describe("text before the examples; {subject} is the subject's name"),
        subject_names: z
            .record(z.string(), z.string())
            .optional()
            .describe("the name {subject} shows for a subject key (default: the key with _ as spaces)"),
        doc_to_text: z.string().optional().describe("the question, a template with {field} placeholders"),
        doc_to_target: z.string().optional().describe("the answer: a template; for choices, a choice or its index"),
        doc_to_choice: z.array(z.string()).min(2).optional().describe("the continuations scored, for choice_loglik"),
        target_delimiter: z.string().default(" ").describe("between the question and its answer"),
        fewshot_delimiter: z.string().default("\n\n").describe("between examples"),
        metric: z.enum(METRICS).describe(METRICS.join(", ")),
        generation_kwargs: z
            .object({
                until: z.array(nonEmpty).default([]),
                max_gen_toks: z.number().int().positive().default(256)
            })
            .strict()
            .default({until: [], max_gen_toks: 256})
            .describe("exact_match, pass_at_1: stop strings and the most new tokens"),
        filters: z
            .array(
                z
                    .object({
                        name: z.string().regex(/^[A-Za-z0-9_.-]+$/, "expected a name of letters, digits, _ . -"),
                        regex_pattern: regexString,
                        group_select: z.number().int().default(0)
                    })
                    .strict()
            )
            .min(1)
            .optional()
            .describe(
                "exact_match: answers taken from the output by regex_pattern (group_select: 0 the first match, -1 the " +
                    "last), one score per filter, as lm-evaluation-harness's regex filters"
            ),
        target_regex: regexString
            .optional()
            .describe("exact_match: the reference answer inside doc_to_target (the last match's first group)"),
        normalize: z
            .enum(["none", "number"])
            .default("none")
            .describe("exact_match: none compares the trimmed texts; number drops $ , and a final . (1,000.00 equals 1000)"),
        timeout: z.number().positive().default(3).describe("pass_at_1: seconds each program may run"),
        // loss: the train data options
        dataset_format: z
            .enum(["auto", "alpaca", "text", "prompt_completion", "messages", "sharegpt"])
            .optional()
            .describe("loss: the record format (default: detected)"),
        template: z.string().optional().describe("loss: a prompt template with {field} placeholders"),
        response_field: nonEmpty.optional().describe("loss: the field holding the response for template"),
        max_seq_length: z.number().int().min(2).default(1024).describe("loss: truncate examples to this many tokens"),
        completion_only_loss: z.boolean().default(true).describe("loss: score responses / assistant turns only")
    })
    .strict();

export type TaskFile = z.infer<typeof TaskFileSchema>;
const TASK_KEYS = Object.keys(TaskFileSchema.shape);

/** a task ready to run: its file, its parsed keys, the data files resolved */
export interface LoadedTask {
    name: string;
    /** the YAML file it came from */
    file: string;
    /** sha256 of the file's text (the cache key) */
    hash: string;
    spec: TaskFile;
    /** the data path, resolved */
    dataPath: string;
    fewshotPath: string | null;
}

/** the built-in task names (eval-tasks/*.yaml) */
export function builtinTaskNames(): string[] {
    if (!existsSync(BUILTIN_TASK_DIR)) return [];
    return readdirSync(BUILTIN_TASK_DIR)
        .filter((f) => f.endsWith(".yaml"))
        .map((f) => f.slice(0, -".yaml".length))
        .sort();
}

/** a --task entry as a file: a path (has a / or ends in .yaml/.yml), else a built-in name */
export function taskFileOf(entry: string): string {
    if (entry.includes("/") || entry.includes(path.sep) || /\.ya?ml$/i.test(entry)) return path.resolve(entry);
    const names = builtinTaskNames();
    if (!names.includes(entry))
        throw new QloraError(
            `unknown task ${quoteValue(entry)}; the built-in tasks are ${names.join(", ") || "(none found)"}, ` +
                "or give the path of a task file (.yaml)"
        );
    return path.join(BUILTIN_TASK_DIR, `${entry}.yaml`);
}

/**
 * The folder `${QLORA_EVAL_DATA}` stands for: --data-dir, else the QLORA_EVAL_DATA environment variable, else
 * `../shared/datasets/eval` beside the package when it exists; null when none is set.
 */
export function evalDataRoot(dataDir?: string): string | null {
    if (dataDir) return path.resolve(dataDir);
    const env = process.env[EVAL_DATA_VARIABLE];
    if (env) return path.resolve(env);
    const beside = path.resolve(packageRoot, "..", "shared", "datasets", "eval");
    return existsSync(beside) ? beside : null;
}

/** a data path of a task file: `${QLORA_EVAL_DATA}` replaced, relative paths taken from the task file's folder */
function resolveDataPath(value: string, key: string, file: string, spec: TaskFile, dataDir: string | undefined): string {
    const variables = [...value.matchAll(/\$\{([^}]*)\}/g)].map((m) => m[1]);
    const unknown = variables.find((v) => v !== EVAL_DATA_VARIABLE);
    if (unknown !== undefined)
        throw new QloraError(`${key}: \${${unknown}} is not a known variable (only ${EVAL_DATA_PLACEHOLDER} is)`, {file});
    if (variables.length > 0) {
        const root = evalDataRoot(dataDir);
        if (root === null)
            throw new QloraError(
                `task ${spec.task} reads its data from ${EVAL_DATA_PLACEHOLDER}, which is not set: pass --data-dir ` +
                    `DIR or set ${EVAL_DATA_VARIABLE} to the folder holding ${path.basename(value)}` +
                    (spec.source ? ` (get it from ${spec.source})` : "")
            );
        value = value.split(EVAL_DATA_PLACEHOLDER).join(root);
    }
    return path.resolve(path.dirname(file), value);
}

/** one-line message for the first problem zod found */
function schemaProblem(error: z.ZodError, input: Record<string, unknown>): string {
    const issue = error.issues[0];
    const key = issue.path.join(".");
    if (issue.code === "unrecognized_keys") {
        const keys = (issue as {keys: string[]}).keys;
        return `${key ? `${key}: ` : ""}unknown key ${quoteValue(keys[0])}`;
    }
    const top = String(issue.path[0] ?? "");
    const got = issue.path.length === 1 && top in input ? ` (got ${quoteValue(input[top])})` : "";
    return `${key || "task file"}: ${issue.message}${got}`;
}

/** the keys each metric needs, checked after the schema */
function checkCombination(spec: TaskFile, file: string): void {
    const fail = (message: string) => {
        throw new QloraError(message, {file});
    };
    if (spec.metric === "loss") return;
    if (!spec.format) fail(`format: required for metric ${spec.metric} (mmlu_csv, cmmlu_csv or jsonl)`);
    if (spec.doc_to_text === undefined) fail(`doc_to_text: required for metric ${spec.metric} (the question template)`);
    if (spec.metric === "choice_loglik") {
        if (!spec.doc_to_choice) fail("doc_to_choice: required for metric choice_loglik (the continuations scored)");
        if (spec.doc_to_target === undefined) fail("doc_to_target: required for metric choice_loglik (the right choice)");
    }
    if (spec.metric === "exact_match" && spec.doc_to_target === undefined)
        fail("doc_to_target: required for metric exact_match (the reference answer)");
    if (spec.metric === "pass_at_1" && spec.format !== "jsonl")
        fail("format: metric pass_at_1 reads HumanEval-style JSONL records (prompt, test, entry_point)");
    if (spec.fewshot_data !== undefined && spec.format !== "jsonl") fail("fewshot_data: only for format jsonl");
}

/** reads and validates a task file; data paths are resolved (see resolveDataPath) but not opened */
export async function loadTask(entry: string, opts: {dataDir?: string} = {}): Promise<LoadedTask> {
    const file = taskFileOf(entry);
    // a task file is a few kB; 1 MiB keeps a hostile YAML from exhausting the parser
    const text = await readTextFile(file, {what: "task file", maxBytes: 1 << 20});
    let parsed: unknown;
    try {
        parsed = parseYaml(text);
    } catch (err) {
        throw new QloraError(`invalid YAML: ${(err as Error).message.split("\n")[0]}`, {file});
    }
    if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed))
        throw new QloraError("expected a mapping of task keys to values (task, data, format, doc_to_text, metric, ...)", {file});
    const input = parsed as Record<string, unknown>;
    for (const key of Object.keys(input))
        if (!TASK_KEYS.includes(key))
            throw new QloraError(`unknown key ${quoteValue(key)} (the keys of a task file: ${TASK_KEYS.join(", ")})`, {file});
    const result = TaskFileSchema.safeParse(input);
    if (!result.success) throw new QloraError(schemaProblem(result.error, input), {file});
    const spec = result.data;
    checkCombination(spec, file);
    return {
        name: spec.task,
        file,
        hash: createHash("sha256").update(text).digest("hex"),
        spec,
        dataPath: resolveDataPath(spec.data, "data", file, spec, opts.dataDir),
        fewshotPath: spec.fewshot_data ? resolveDataPath(spec.fewshot_data, "fewshot_data", file, spec, opts.dataDir) : null
    };
}
