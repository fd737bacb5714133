// run-task.ts: one task file run on one model: its questions loaded per subject, scored by the task's metric
// (choice_loglik, exact_match, pass_at_1, loss), per-subject and total scores with standard errors, each subject
// cached on its own (cache.ts).
import {QloraError} from "../errors.js";
import {EVAL_CACHE_VERSION, type EvalCache, fingerprint} from "./cache.js";
import {humanEvalProgram, requirePython3, runPythonTestsMany} from "./code-exec.js";
import {type Doc, type DocGroup, loadDocGroups, MAX_FOLDER_DEPTH} from "./docs.js";
import {exactMatch, extractAnswer} from "./extract.js";
import {generateUntil} from "./generate-until.js";
import {loglikelihoodsOf} from "./loglik.js";
import {evaluateLossOf} from "./loss.js";
import type {EvalModel} from "./model.js";
import {choiceTarget, fewshotPrefix, questionPrompt, renderTemplate} from "./prompt.js";
import {macroMean, type MeanStderr, meanStderr} from "./stats.js";
import type {LoadedTask, MetricKind} from "./task.js";

export interface EvalProgress {
    task: string;
    done: number;
    total: number;
}

export interface TaskSettings {
    /** questions per subject (mmlu_csv, cmmlu_csv), in all otherwise; the first ones in file order */
    limit?: number;
    subjects?: string[];
    /** overrides the task's num_fewshot */
    numFewshot?: number;
    batchSize: number;
    cache: EvalCache | null;
    onProgress?: (p: EvalProgress) => void;
    onWarning?: (message: string) => void;
}

/** one scored question */
export interface Sample {
    where: string;
    /** the right choice, or the reference answer */
    target: string;
    /** the chosen choice, or the answer taken from the output (the first filter's) */
    prediction: string | null;
    /** generation tasks: the text generated */
    output?: string;
    /** choice tasks: each choice's log-likelihood */
    logliks?: number[];
    /** each metric's score of this question (0 or 1) */
    scores: Record<string, number>;
}

export interface LossScores {
    loss: number;
    perplexity: number;
    tokens: number;
    rows: number;
}

export interface GroupResult {
    subject: string | null;
    n: number;
    /** prompts that lost tokens from the left to fit the context */
    truncated: number;
    cached: boolean;
    scores: Record<string, MeanStderr>;
    samples: Sample[];
    loss?: LossScores;
}

export interface TaskResult {
    task: string;
    file: string;
    version: number | null;
    metric: MetricKind;
    numFewshot: number;
    n: number;
    truncated: number;
    /** every subject came from the cache */
    cached: boolean;
    /** seconds this run spent on the task (reading the cache included) */
    elapsedS: number;
    /** over all questions (micro average), each with its standard error */
    scores: Record<string, MeanStderr>;
    /** the mean of the subjects' scores (macro average), when there are several subjects */
    macro: Record<string, MeanStderr> | null;
    groups: GroupResult[];
    loss?: LossScores;
}

/** a group before scoring: its questions' prompts and what scoring needs */
interface Pending {
    group: DocGroup;
    key: string;
    prompts: string[];
}

/** the scores of a set of samples, per metric */
function scoreSamples(samples: Sample[]): Record<string, MeanStderr> {
    const names = samples.length > 0 ? Object.keys(samples[0].scores) : [];
    return Object.fromEntries(names.map((m) => [m, meanStderr(samples.map((s) => s.scores[m]))]));
}

function groupResult(subject: string | null, samples: Sample[], truncated: number): GroupResult {
    return {subject, n: samples.length, truncated, cached: false, scores: scoreSamples(samples), samples};
}

/** the index of the largest value (the first of equal ones, as numpy's argmax) */
function argmax(values: number[]): number {
    let best = 0;
    for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
    return best;
}

/** choice_loglik: each question's choices scored by log-likelihood, the most likely one chosen */
async function runChoice(
    model: EvalModel,
    task: LoadedTask,
    pending: Pending[],
    settings: TaskSettings,
    progress: (n: number) => void
): Promise<GroupResult[]> {
    const {spec} = task;
    const choices = spec.doc_to_choice ?? [];
    const requests = pending.flatMap((p) =>
        p.prompts.map((context) => ({context, continuations: choices.map((c) => spec.target_delimiter + c)}))
    );
    const results = await loglikelihoodsOf(await model.lm(), model.tokenizer, requests, {
        batchSize: settings.batchSize,
        prefixTokenId: model.eosTokenIds[0],
        onProgress: (done) => progress(done)
    });
    let at = 0;
    return pending.map(({group}) => {
        let truncated = 0;
        const samples = group.docs.map((doc, i): Sample => {
            const r = results[at++];
            if (r.truncated) truncated++;
            const gold = choiceTarget(spec, doc, group.where[i]);
            const pred = argmax(r.logliks);
            return {
                where: group.where[i],
                target: choices[gold],
                prediction: choices[pred],
                logliks: r.logliks,
                scores: {acc: pred === gold ? 1 : 0}
            };
        });
        return groupResult(group.subject, samples, truncated);
    });
}

/** the reference answer of an exact_match question: doc_to_target, or what target_regex finds in it */
function referenceAnswer(task: LoadedTask, doc: Doc, where: string): string {
    const target = renderTemplate(task.spec.doc_to_target ?? "", doc, "doc_to_target", where);
    if (!task.spec.target_regex) return target.trim();
    const found = extractAnswer(target, task.spec.target_regex, -1);
    if (found === null)
        throw new QloraError(`${where}: target_regex ${JSON.stringify(task.spec.target_regex)} finds nothing in doc_to_target`);
    return found;
}

/** exact_match and pass_at_1: greedy generation until a stop string, then extraction or execution */
async function runGeneration(
    model: EvalModel,
    task: LoadedTask,
    pending: Pending[],
    settings: TaskSettings,
    progress: (n: number) => void
): Promise<GroupResult[]> {
    const {spec} = task;
    const python = spec.metric === "pass_at_1" ? requirePython3() : null; // before hours of generation, not after
    const outputs = await generateUntil(
        await model.lm(),
        model,
        pending.flatMap((p) => p.prompts),
        {
            until: spec.generation_kwargs.until,
            maxGenToks: spec.generation_kwargs.max_gen_toks,
            batchSize: settings.batchSize,
            onProgress: (done) => progress(done)
        }
    );
    let at = 0;
    const perGroup = pending.map(({group}) => group.docs.map((doc, i) => ({doc, where: group.where[i], out: outputs[at++]})));
    if (python !== null) {
        const all = perGroup.flat();
        const programs = all.map(({doc, where, out}) => {
            for (const f of ["prompt", "test", "entry_point"])
                if (doc[f] === undefined)
                    throw new QloraError(
                        `${where}: a pass_at_1 record needs "prompt", "test" and "entry_point"; "${f}" is missing`
                    );
            return humanEvalProgram({prompt: doc.prompt, test: doc.test, entry_point: doc.entry_point}, out.text);
        });
        const runs = await runPythonTestsMany(programs, {timeoutMs: spec.timeout * 1000, python});
        let k = 0;
        return perGroup.map((items, g) => {
            const samples = items.map(({where, out}): Sample => {
                const run = runs[k++];
                return {
                    where,
                    target: "passed",
                    prediction: run.status === "passed" ? "passed" : `${run.status}: ${run.detail}`,
                    output: out.text,
                    scores: {"pass@1": run.status === "passed" ? 1 : 0}
                };
            });
            return groupResult(pending[g].group.subject, samples, items.filter((x) => x.out.truncated).length);
        });
    }
    const filters = spec.filters ?? null;
    return perGroup.map((items, g) => {
        const samples = items.map(({doc, where, out}): Sample => {
            const reference = referenceAnswer(task, doc, where);
            const answers = filters
                ? filters.map((f) => extractAnswer(out.text, f.regex_pattern, f.group_select))
                : [out.text.trim()];
            const matches = (answer: string | null) =>
                spec.normalize === "number" ? exactMatch(answer, reference) : answer !== null && answer.trim() === reference;
            const scores: Record<string, number> = {};
            if (filters) filters.forEach((f, i) => (scores[`exact_match,${f.name}`] = matches(answers[i]) ? 1 : 0));
            else scores.exact_match = matches(answers[0]) ? 1 : 0;
            return {where, target: reference, prediction: answers[0], output: out.text, scores};
        });
        return groupResult(pending[g].group.subject, samples, items.filter((x) => x.out.truncated).length);
    });
}

/** the cache key of one subject of a task: every input that changes its result */
async function groupKeys(
    model: EvalModel,
    task: LoadedTask,
    groups: (string | null)[],
    settings: TaskSettings,
    numFewshot: number
): Promise<string[]> {
    const {identity} = model;
    const base = {
        version: EVAL_CACHE_VERSION,
        model: await fingerprint(identity.modelDir),
        adapter: identity.adapterDir ? await fingerprint(identity.adapterDir) : null,
        load_in_4bit: identity.loadIn4bit,
        device: identity.device,
        // merged, gguf:TYPE (absent for the model as loaded, so the keys of earlier runs still match)
        form: identity.form,
        task_file: task.hash,
        data: await fingerprint(task.dataPath, MAX_FOLDER_DEPTH).catch(() => null),
        fewshot_data: task.fewshotPath ? await fingerprint(task.fewshotPath, MAX_FOLDER_DEPTH).catch(() => null) : null,
        limit: settings.limit ?? null,
        num_fewshot: numFewshot
    };
    return groups.map((subject) => JSON.stringify({...base, subject}));
}

/** runs one task; see TaskSettings for the options */
export async function runTask(model: EvalModel, task: LoadedTask, settings: TaskSettings): Promise<TaskResult> {
    const started = performance.now();
    const {spec} = task;
    const numFewshot = settings.numFewshot ?? spec.num_fewshot;
    const warn = settings.onWarning ?? (() => undefined);
    let cacheBroken = false;
    const cachePut = async (key: string, value: unknown) => {
        if (!settings.cache || cacheBroken) return;
        try {
            await settings.cache.put(task.name, key, value);
        } catch (err) {
            cacheBroken = true;
            warn(`results are not cached (${(err as Error).message})`);
        }
    };
    const finish = (groups: GroupResult[], loss?: LossScores): TaskResult => {
        const samples = groups.flatMap((g) => g.samples);
        const truncated = groups.reduce((s, g) => s + g.truncated, 0);
        if (truncated > 0)
            warn(
                `task ${task.name}: ${truncated} of ${samples.length} prompts were longer than the model's context ` +
                    `(${model.contextLength} tokens) and lost tokens from the left`
            );
        const scores = scoreSamples(samples);
        const macro =
            groups.length > 1
                ? Object.fromEntries(Object.keys(scores).map((m) => [m, macroMean(groups.map((g) => g.scores[m]))]))
                : null;
        return {
            task: task.name,
            file: task.file,
            version: spec.version ?? null,
            metric: spec.metric,
            numFewshot,
            n: loss ? loss.rows : samples.length,
            truncated,
            cached: groups.every((g) => g.cached),
            elapsedS: (performance.now() - started) / 1000,
            scores,
            macro,
            groups,
            ...(loss ? {loss} : {})
        };
    };

    if (spec.metric === "loss") {
        const [key] = await groupKeys(model, task, [null], {...settings, limit: undefined}, 0);
        const hit = settings.cache ? await settings.cache.get<LossScores>(task.name, key) : null;
        if (hit) return finish([{subject: null, n: hit.rows, truncated: 0, cached: true, scores: {}, samples: []}], hit);
        settings.onProgress?.({task: task.name, done: 0, total: 1});
        const r = await evaluateLossOf(
            await model.lm(),
            model.tokenizer,
            task.dataPath,
            {
                dataset_format: spec.dataset_format,
                template: spec.template,
                response_field: spec.response_field,
                max_seq_length: spec.max_seq_length,
                completion_only_loss: spec.completion_only_loss,
                assistant_only_loss: spec.completion_only_loss
            },
            settings.batchSize
        );
        for (const w of r.warnings) warn(`task ${task.name}: ${w}`);
        const loss: LossScores = {loss: r.loss, perplexity: r.perplexity, tokens: r.tokens, rows: r.rows};
        settings.onProgress?.({task: task.name, done: 1, total: 1});
        await cachePut(key, loss);
        return finish([{subject: null, n: r.rows, truncated: 0, cached: false, scores: {}, samples: []}], loss);
    }

    const groups = await loadDocGroups(task, {numFewshot, limit: settings.limit, subjects: settings.subjects});
    const keys = await groupKeys(
        model,
        task,
        groups.map((g) => g.subject),
        settings,
        numFewshot
    );
    const results: (GroupResult | null)[] = await Promise.all(
        keys.map(async (key) => {
            const hit = settings.cache ? await settings.cache.get<GroupResult>(task.name, key) : null;
            return hit ? {...hit, cached: true} : null;
        })
    );
    const pending: Pending[] = [];
    groups.forEach((group, g) => {
        if (results[g]) return;
        const prefix = fewshotPrefix(spec, group, group.where[0] ?? task.dataPath);
        pending.push({
            group,
            key: keys[g],
            prompts: group.docs.map((doc, i) => questionPrompt(spec, prefix, doc, group.where[i]))
        });
    });
    const total = groups.reduce((s, g) => s + g.docs.length, 0);
    const fromCache = total - pending.reduce((s, p) => s + p.prompts.length, 0);
    const progress = (done: number) => settings.onProgress?.({task: task.name, done: fromCache + done, total});
    progress(0);
    if (pending.length > 0) {
        const fresh =
            spec.metric === "choice_loglik"
                ? await runChoice(model, task, pending, settings, progress)
                : await runGeneration(model, task, pending, settings, progress);
        for (let i = 0; i < pending.length; i++) {
            results[groups.indexOf(pending[i].group)] = fresh[i];
            await cachePut(pending[i].key, fresh[i]);
        }
    }
    return finish(results as GroupResult[]);
}
