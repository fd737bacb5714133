// checkpoint.ts: output_dir/checkpoint-N/ folders as transformers' Trainer lays them out, with qlora's own
// non-pickle state files: the adapter in PEFT's format, optimizer.safetensors + optimizer.json,
// scheduler.json, rng_state.json (the data loader's position), trainer_state.json and
// training_args.json (the run's settings, checked on resume).
// Each folder is written under a temporary name and renamed (io/atomic.ts), so a killed run never leaves a half
// checkpoint. Everything read back on resume is validated: a damaged file is refused with a line naming the file
// and the field, never trusted into a run that silently goes wrong.
import {randomBytes} from "node:crypto";
import {CHAT_TEMPLATE_FILE_NAME, TOKENIZER_FOLDER_FILES} from "../tokenizer/index.js";
import {promises as fs} from "node:fs";
import path from "node:path";
import {z} from "zod";
import {QloraError, quoteValue} from "../errors.js";
import {writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {readRegularFile, readTextFile} from "../io/files.js";
import {SafetensorsFile, writeSafetensors, type TensorToWrite} from "../io/safetensors.js";
import {saveAdapter} from "../peft/adapter-files.js";
import type {LoraModel} from "../peft/inject.js";
import type {OptimizerStateDict, OptimizerStateTensor} from "../optim/adamw.js";
import {SCHEDULER_TYPES, type LRScheduler, type LRSchedulerState} from "../optim/schedule.js";
import type {LoaderPosition} from "../data/index.js";
import {parseTrainingArgs, TRAINING_ARGS_FILE, type SavedTrainingArgs} from "./training-args.js";

export const CHECKPOINT_PREFIX = "checkpoint-";
const CHECKPOINT_NAME = /^checkpoint-(\d+)$/;
/** the marker kinds (io/atomic.ts) of the folders a training run writes */
export const CHECKPOINT_KIND = "checkpoint";
export const FINAL_ADAPTER_KIND = "adapter";

const nonNegInt = z.number().int("expected an integer >= 0").min(0, "expected an integer >= 0");
const finite = z.number(); // zod refuses NaN and ±Infinity
const uint32 = z.number().int().min(0).max(0xffffffff);
const rngWords = z
    .array(uint32)
    .length(4)
    .refine((w) => w.some((x) => x !== 0), "the generator state cannot be all zeros");

const TrainerStateSchema = z.looseObject({
    global_step: nonNegInt,
    epoch: finite.min(0),
    max_steps: z.number().int().positive(),
    num_train_epochs: finite.positive(),
    logging_steps: finite.positive(),
    eval_steps: finite.positive(),
    save_steps: finite.positive(),
    train_batch_size: z.number().int().positive(),
    log_history: z.array(z.record(z.string(), z.unknown())),
    best_metric: finite.nullable(),
    best_model_checkpoint: z.string().nullable(),
    num_input_tokens_seen: nonNegInt,
    qlora_log_accumulator: z.object({lossSum: finite, steps: nonNegInt, tokens: nonNegInt})
});
export type TrainerState = z.infer<typeof TrainerStateSchema>;

const RngStateSchema = z.object({
    // checkpoints of earlier versions saved a dropout generator; the masks now follow from the step (DropoutClock)
    dropout: rngWords.optional(),
    loader: z.object({epoch: nonNegInt, index: nonNegInt, rngState: rngWords})
});
export interface RngStateFile {
    loader: LoaderPosition;
}

const SchedulerStateSchema = z.object({
    type: z.enum(SCHEDULER_TYPES),
    baseLr: finite.min(0),
    warmupSteps: nonNegInt,
    totalSteps: nonNegInt,
    kwargs: z.record(z.string(), z.unknown()),
    step: nonNegInt
});

const OptimizerMetadataSchema = z.object({
    format: z.literal("qlora.adamw"),
    version: z.literal(1),
    step: nonNegInt,
    options: z.looseObject({
        betas: z.tuple([finite.min(0).lt(1), finite.min(0).lt(1)]),
        eps: finite.min(0),
        weightDecay: finite.min(0),
        optimBits: z.union([z.literal(8), z.literal(32)]),
        paged: z.boolean(),
        min8bitSize: nonNegInt,
        blocksize: z.number().int().positive(),
        variant: z.enum(["torch", "bnb"])
    }),
    params: z.array(
        z.looseObject({
            name: z.string().min(1),
            numel: z.number().int().positive(),
            state: z.enum(["torch32", "bnb32", "bnb8"]),
            weightDecay: z.boolean(),
            paged: z.boolean()
        })
    )
});

export interface CheckpointParts {
    lora: LoraModel;
    optimizerState: OptimizerStateDict;
    scheduler: LRScheduler;
    trainerState: TrainerState;
    rng: RngStateFile;
    trainingArgs: SavedTrainingArgs;
    /** the model folder, for the tokenizer files */
    modelDir: string;
    /** the training format as a chat template (null: the base's, copied) */
    chatTemplate: string | null;
}

/**
 * copies the tokenizer files of the base model into dir (PEFT's save keeps them beside the adapter), with the
 * training format as its chat template (chat_template.jinja, data/prompt-format.ts) when the data had one; reads
 * go through io/files.ts, so a FIFO or a folder under one of these names is an error, not a hang
 */
export async function copyTokenizerFiles(modelDir: string, dir: string, chatTemplate: string | null): Promise<void> {
    if (chatTemplate !== null) await fs.writeFile(path.join(dir, CHAT_TEMPLATE_FILE_NAME), chatTemplate, {flag: "wx"});
    for (const f of TOKENIZER_FOLDER_FILES) {
        if (f === CHAT_TEMPLATE_FILE_NAME && chatTemplate !== null) continue;
        const source = path.join(modelDir, f);
        let data: Buffer;
        try {
            data = await readRegularFile(source, {what: "tokenizer file"});
        } catch (err) {
            if (((err as Error).cause as NodeJS.ErrnoException | undefined)?.code === "ENOENT") continue;
            throw err;
        }
        await fs.writeFile(path.join(dir, f), data, {flag: "wx"});
    }
}

export async function saveCheckpoint(dir: string, parts: CheckpointParts): Promise<void> {
    await writeDirAtomic(
        dir,
        async (tmp) => {
            await saveAdapter(tmp, parts.lora);
            await copyTokenizerFiles(parts.modelDir, tmp, parts.chatTemplate);
            const opt = parts.optimizerState;
            const tensors: TensorToWrite[] = Object.entries(opt.tensors).map(([name, data]) => ({
                name,
                dtype: data instanceof Uint8Array ? "U8" : "F32",
                shape: [data.length],
                data
            }));
            await writeSafetensors(path.join(tmp, "optimizer.safetensors"), tensors, {format: "qlora"});
            await writeFileAtomic(path.join(tmp, "optimizer.json"), JSON.stringify(opt.metadata, null, 2));
            await writeFileAtomic(path.join(tmp, "scheduler.json"), JSON.stringify(parts.scheduler.stateDict(), null, 2));
            await writeFileAtomic(path.join(tmp, "rng_state.json"), JSON.stringify(parts.rng, null, 2));
            await writeFileAtomic(path.join(tmp, "trainer_state.json"), JSON.stringify(parts.trainerState, null, 2));
            await writeFileAtomic(path.join(tmp, TRAINING_ARGS_FILE), JSON.stringify(parts.trainingArgs, null, 2));
        },
        {replace: "owned", kind: CHECKPOINT_KIND}
    );
}

export interface LoadedCheckpoint {
    dir: string;
    optimizer: OptimizerStateDict;
    scheduler: LRSchedulerState;
    rng: RngStateFile;
    trainerState: TrainerState;
    /** null for checkpoints of qlora versions that did not save the settings */
    trainingArgs: SavedTrainingArgs | null;
}

/** what the run that resumes expects of the checkpoint, for the cross-checks */
export interface ResumeExpectations {
    /** the run's total optimizer steps */
    maxSteps: number;
    /** micro-batches per epoch of the run's data loader */
    batchesPerEpoch: number;
    gradientAccumulationSteps: number;
}

/** what to do about a damaged checkpoint: the one before it, or a new run */
async function damagedAdvice(dir: string): Promise<string> {
    const step = checkpointStep(dir);
    const earlier = step === null ? [] : (await listCheckpoints(path.dirname(dir))).filter((c) => c.step < step);
    return (
        "the checkpoint is damaged: " +
        (earlier.length > 0
            ? `resume from an earlier one (--resume_from_checkpoint ${earlier[earlier.length - 1].dir})`
            : "resume from an earlier checkpoint, or start a new run (--overwrite_output_dir true)")
    );
}

function describe(value: unknown): string {
    if (value === undefined) return "missing";
    return `got ${quoteValue(value, 57)}`;
}

/** validates `json` against `schema`; a bad field is one line naming the file and the field */
function validate<T>(schema: z.ZodType<T>, json: unknown, file: string, advice: string): T {
    const r = schema.safeParse(json);
    if (r.success) return r.data;
    const issue = r.error.issues[0];
    let value: unknown = json;
    for (const key of issue.path) value = (value as Record<PropertyKey, unknown> | undefined)?.[key as PropertyKey];
    const field = issue.path.join(".") || "(top level)";
    const what =
        value === undefined && issue.path.length > 0
            ? "missing"
            : `${issue.message.replace(/^Invalid input: /, "")} (${describe(value)})`;
    throw new QloraError(`${field}: ${what}; ${advice}`, {file});
}

async function readJson(file: string, advice: string): Promise<unknown> {
    let text: string;
    try {
        text = await readTextFile(file, {what: "checkpoint file", maxBytes: 256 << 20});
    } catch (err) {
        throw new QloraError(`${(err as Error).message.replace(`${file}: `, "")}; ${advice}`, {file, cause: err});
    }
    try {
        return JSON.parse(text);
    } catch (err) {
        throw new QloraError(`not valid JSON (${(err as Error).message}); ${advice}`, {file});
    }
}

function inconsistent(file: string, message: string, advice: string): never {
    throw new QloraError(`${message}; ${advice}`, {file});
}

/** the state tensors each parameter needs, by state kind: [suffix, dtype, elements] */
function expectedStateTensors(
    state: "torch32" | "bnb32" | "bnb8",
    numel: number,
    blocksize: number
): [string, "F32" | "U8", number][] {
    if (state === "torch32")
        return [
            ["exp_avg", "F32", numel],
            ["exp_avg_sq", "F32", numel]
        ];
    if (state === "bnb32")
        return [
            ["state1", "F32", numel],
            ["state2", "F32", numel]
        ];
    const blocks = Math.ceil(numel / blocksize);
    return [
        ["state1", "U8", numel],
        ["state2", "U8", numel],
        ["absmax1", "F32", blocks],
        ["absmax2", "F32", blocks]
    ];
}

/** optimizer.safetensors: exactly the tensors optimizer.json's parameter list needs, of the right dtype and size, finite */
async function readOptimizerTensors(
    file: string,
    meta: z.infer<typeof OptimizerMetadataSchema>,
    advice: string
): Promise<Record<string, OptimizerStateTensor>> {
    let st: SafetensorsFile;
    try {
        st = await SafetensorsFile.open(file);
    } catch (err) {
        throw new QloraError(`${(err as Error).message.replace(`${file}: `, "")}; ${advice}`, {file, cause: err});
    }
    const tensors: Record<string, OptimizerStateTensor> = {};
    try {
        const expected = new Map<string, ["F32" | "U8", number]>();
        for (const p of meta.params)
            for (const [suffix, dtype, n] of expectedStateTensors(p.state, p.numel, meta.options.blocksize))
                expected.set(`state.${p.name}.${suffix}`, [dtype, n]);
        if (meta.params.some((p) => p.state === "bnb8")) {
            expected.set("qmap1", ["F32", 256]);
            expected.set("qmap2", ["F32", 256]);
        }
        const present = new Set(st.names());
        for (const name of present)
            if (!expected.has(name))
                inconsistent(file, `tensor "${name}" is not part of the state that optimizer.json describes`, advice);
        for (const [name, [dtype, n]] of expected) {
            if (!present.has(name)) {
                if (name === "qmap1" || name === "qmap2") continue; // optional: the map is bitsandbytes' fixed one
                inconsistent(file, `tensor "${name}" is missing (optimizer.json lists its parameter)`, advice);
            }
            const info = st.info(name);
            const numel = info.shape.reduce((a, b) => a * b, 1);
            if (info.dtype !== dtype || numel !== n)
                inconsistent(file, `tensor "${name}" is ${info.dtype}[${numel}], optimizer.json needs ${dtype}[${n}]`, advice);
            if (dtype === "U8") {
                tensors[name] = await st.readBytes(name);
                continue;
            }
            const data = await st.readF32(name);
            // moments and scales are finite; second moments and scales are never negative
            const nonNegative = /(exp_avg_sq|state2|absmax[12])$/.test(name);
            for (let i = 0; i < data.length; i++) {
                const v = data[i];
                if (!Number.isFinite(v) || (nonNegative && v < 0))
                    inconsistent(file, `tensor "${name}" holds ${v} at index ${i}`, advice);
            }
            tensors[name] = data;
        }
    } finally {
        await st.close();
    }
    return tensors;
}

/** the checkpoint's training_args.json, or null for a checkpoint of a qlora version that did not write one */
export async function readCheckpointTrainingArgs(dir: string, advice?: string): Promise<SavedTrainingArgs | null> {
    const file = path.join(dir, TRAINING_ARGS_FILE);
    let text: string;
    try {
        text = await readTextFile(file, {what: "checkpoint file", maxBytes: 16 << 20});
    } catch (err) {
        if (((err as Error).cause as NodeJS.ErrnoException | undefined)?.code === "ENOENT") return null;
        advice ??= await damagedAdvice(dir);
        throw new QloraError(`${(err as Error).message.replace(`${file}: `, "")}; ${advice}`, {file, cause: err});
    }
    return parseTrainingArgs(text, file, advice ?? (await damagedAdvice(dir)));
}

/** the N of a checkpoint-N folder, or null for a folder of another name */
export function checkpointStep(dir: string): number | null {
    const m = CHECKPOINT_NAME.exec(path.basename(dir));
    return m ? Number(m[1]) : null;
}

/**
 * Reads and validates a checkpoint's state files: each field's type and range, and the cross-checks between them
 * (global_step is the folder's N and the scheduler's and optimizer's step; with `expect`, global_step is within
 * max_steps and the data loader position is where global_step steps end). Errors name the file and the field.
 */
export async function loadCheckpointState(dir: string, expect?: ResumeExpectations): Promise<LoadedCheckpoint> {
    const advice = await damagedAdvice(dir);
    const f = (name: string) => path.join(dir, name);

    const stateFile = f("trainer_state.json");
    const trainerState = validate(TrainerStateSchema, await readJson(stateFile, advice), stateFile, advice);
    const step = trainerState.global_step;
    const folderStep = checkpointStep(dir);
    if (folderStep !== null && folderStep !== step)
        inconsistent(stateFile, `global_step: ${step} is not the step of the folder (${path.basename(dir)})`, advice);
    if (step > trainerState.max_steps)
        inconsistent(stateFile, `global_step: ${step} is beyond the run's max_steps (${trainerState.max_steps})`, advice);
    if (expect && step > expect.maxSteps)
        throw new QloraError(
            `global_step: the checkpoint is at step ${step}, beyond this run's ${expect.maxSteps} steps; ` +
                "to train longer, raise max_steps and name it in resume_override (--resume_override max_steps), or resume " +
                "from an earlier checkpoint",
            {file: stateFile}
        );

    const schedulerFile = f("scheduler.json");
    const scheduler = validate(
        SchedulerStateSchema,
        await readJson(schedulerFile, advice),
        schedulerFile,
        advice
    ) as LRSchedulerState;
    if (scheduler.step !== step)
        inconsistent(schedulerFile, `step: ${scheduler.step} differs from trainer_state.json's global_step ${step}`, advice);

    const rngFile = f("rng_state.json");
    const rng = validate(RngStateSchema, await readJson(rngFile, advice), rngFile, advice);
    if (expect) {
        const {epoch, index} = rng.loader;
        const consumed = epoch * expect.batchesPerEpoch + index;
        if (index > expect.batchesPerEpoch || consumed !== step * expect.gradientAccumulationSteps)
            throw new QloraError(
                `loader: the data position (epoch ${epoch}, batch ${index}) is not where step ${step} ends ` +
                    `with this data (${expect.batchesPerEpoch} batches an epoch, ${expect.gradientAccumulationSteps} per step): the ` +
                    `data or the batch size changed since the checkpoint, or ${advice}`,
                {file: rngFile}
            );
    }

    const optimizerFile = f("optimizer.json");
    const metadata = validate(OptimizerMetadataSchema, await readJson(optimizerFile, advice), optimizerFile, advice);
    if (metadata.step !== step)
        inconsistent(optimizerFile, `step: ${metadata.step} differs from trainer_state.json's global_step ${step}`, advice);
    const names = new Set<string>();
    for (const p of metadata.params) {
        if (names.has(p.name)) inconsistent(optimizerFile, `params: "${p.name}" is listed twice`, advice);
        names.add(p.name);
    }
    const tensors = await readOptimizerTensors(f("optimizer.safetensors"), metadata, advice);

    const trainingArgs = await readCheckpointTrainingArgs(dir, advice);

    return {
        dir,
        optimizer: {tensors, metadata: metadata as OptimizerStateDict["metadata"]},
        scheduler,
        rng,
        trainerState,
        trainingArgs
    };
}

/** the checkpoint-N folders of output_dir, oldest first */
export async function listCheckpoints(outputDir: string): Promise<{dir: string; step: number}[]> {
    let entries: import("node:fs").Dirent[] = [];
    try {
        entries = await fs.readdir(outputDir, {withFileTypes: true});
    } catch {
        return [];
    }
    return entries
        .filter((e) => e.isDirectory() && CHECKPOINT_NAME.test(e.name))
        .map((e) => ({dir: path.join(outputDir, e.name), step: Number(CHECKPOINT_NAME.exec(e.name)![1])}))
        .filter((c) => Number.isSafeInteger(c.step))
        .sort((a, b) => a.step - b.step);
}

/** `.NAME.removing-R`: a run's folder being deleted (renamed first, so it never stays half-deleted under its name) */
const REMOVING = /^\.(checkpoint-\d+|final)\.removing-[0-9a-f]{16}$/;

/** removes a checkpoint-N or final folder: renamed away in one step, then deleted */
export async function removeRunFolder(dir: string): Promise<void> {
    const aside = path.join(path.dirname(dir), `.${path.basename(dir)}.removing-${randomBytes(8).toString("hex")}`);
    await fs.rename(dir, aside);
    await fs.rm(aside, {recursive: true, force: true});
}

/** finishes deletions of checkpoints that a kill interrupted (call under the output folder's lock) */
export async function finishInterruptedRemovals(outputDir: string): Promise<string[]> {
    const done: string[] = [];
    for (const name of await fs.readdir(outputDir).catch(() => [] as string[])) {
        if (!REMOVING.test(name)) continue;
        await fs.rm(path.join(outputDir, name), {recursive: true, force: true});
        done.push(`removed ${name} (a folder whose deletion was interrupted)`);
    }
    return done;
}

/** save_total_limit: removes the oldest checkpoints beyond `limit`, never `keep` (the one just saved) */
export async function rotateCheckpoints(outputDir: string, limit: number | null, keep?: string): Promise<string[]> {
    if (!limit) return [];
    const all = (await listCheckpoints(outputDir)).filter((c) => c.dir !== keep);
    const remove = all.slice(0, Math.max(0, all.length + (keep ? 1 : 0) - limit));
    for (const c of remove) await removeRunFolder(c.dir);
    return remove.map((c) => c.dir);
}

/** resume_from_checkpoint: true means the latest checkpoint in output_dir */
export async function resolveResumeDir(outputDir: string, resume: boolean | string): Promise<string | null> {
    if (resume === false || resume === "false") return null;
    if (typeof resume === "string" && resume !== "true") {
        const dir = path.resolve(resume);
        try {
            await fs.access(path.join(dir, "trainer_state.json"));
        } catch {
            throw new QloraError(
                "resume_from_checkpoint: no trainer_state.json in this folder " +
                    "(pass a checkpoint-N folder of an earlier run, or true for the latest one)",
                {file: dir}
            );
        }
        return dir;
    }
    const all = await listCheckpoints(outputDir);
    if (all.length === 0)
        throw new QloraError(
            `resume_from_checkpoint: no checkpoint-N folder in ${outputDir} to resume from ` +
                "(train without resume_from_checkpoint to start the run)"
        );
    return all[all.length - 1].dir;
}
