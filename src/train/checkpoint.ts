// checkpoint.ts: output_dir/checkpoint-N/ folders as transformers' Trainer lays them out, with qlora's own
// non-pickle state files: the adapter in PEFT's format, optimizer.safetensors + optimizer.json,
// scheduler.json, rng_state.json (dropout generator and data position) and trainer_state.json.
// Each folder is written under a temporary name and renamed, so a killed run never leaves a half checkpoint.
import {promises as fs} from "node:fs";
import path from "node:path";
import {QloraError} from "../errors.js";
import {writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {SafetensorsFile, writeSafetensors, type TensorToWrite} from "../io/safetensors.js";
import {saveAdapter, type LoraModel} from "../lora/adapter.js";
import type {OptimizerStateDict} from "../optim/adamw.js";
import type {LRScheduler, LRSchedulerState} from "../optim/schedule.js";
import type {LoaderPosition} from "../data/index.js";

export const CHECKPOINT_PREFIX = "checkpoint-";
const TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json"];

export interface TrainerState {
    global_step: number;
    epoch: number;
    max_steps: number;
    num_train_epochs: number;
    logging_steps: number;
    eval_steps: number;
    save_steps: number;
    train_batch_size: number;
    log_history: Record<string, unknown>[];
    best_metric: number | null;
    best_model_checkpoint: string | null;
    num_input_tokens_seen: number;
    /** qlora: the losses and tokens accumulated since the last log line, so a resumed run logs the same */
    qlora_log_accumulator: {lossSum: number; steps: number; tokens: number};
}

export interface RngStateFile {
    dropout: number[];
    loader: LoaderPosition;
}

export interface CheckpointParts {
    lora: LoraModel;
    optimizerState: OptimizerStateDict;
    scheduler: LRScheduler;
    trainerState: TrainerState;
    rng: RngStateFile;
    /** the model folder, for the tokenizer files */
    modelDir: string;
}

/** copies the tokenizer files of the base model into dir (PEFT's save keeps them beside the adapter) */
export async function copyTokenizerFiles(modelDir: string, dir: string): Promise<void> {
    for (const f of TOKENIZER_FILES) {
        try {
            await fs.copyFile(path.join(modelDir, f), path.join(dir, f));
        } catch (err) {
            if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
        }
    }
}

export async function saveCheckpoint(dir: string, parts: CheckpointParts): Promise<void> {
    await writeDirAtomic(dir, async (tmp) => {
        await saveAdapter(tmp, parts.lora);
        await copyTokenizerFiles(parts.modelDir, tmp);
        const opt = parts.optimizerState;
        const tensors: TensorToWrite[] = Object.entries(opt.tensors).map(([name, data]) => ({
            name, dtype: data instanceof Uint8Array ? "U8" : "F32", shape: [data.length], data,
        }));
        await writeSafetensors(path.join(tmp, "optimizer.safetensors"), tensors, {format: "qlora"});
        await writeFileAtomic(path.join(tmp, "optimizer.json"), JSON.stringify(opt.metadata, null, 2));
        await writeFileAtomic(path.join(tmp, "scheduler.json"), JSON.stringify(parts.scheduler.stateDict(), null, 2));
        await writeFileAtomic(path.join(tmp, "rng_state.json"), JSON.stringify(parts.rng, null, 2));
        await writeFileAtomic(path.join(tmp, "trainer_state.json"), JSON.stringify(parts.trainerState, null, 2));
    });
}

export interface LoadedCheckpoint {
    dir: string;
    optimizer: OptimizerStateDict;
    scheduler: LRSchedulerState;
    rng: RngStateFile;
    trainerState: TrainerState;
}

async function readJson<T>(file: string): Promise<T> {
    try {
        return JSON.parse(await fs.readFile(file, "utf8")) as T;
    } catch (err) {
        throw new QloraError(`cannot read the checkpoint file (${(err as Error).message}); ` +
            "the checkpoint is incomplete: resume from an earlier one", {file});
    }
}

export async function loadCheckpointState(dir: string): Promise<LoadedCheckpoint> {
    const metadata = await readJson<OptimizerStateDict["metadata"]>(path.join(dir, "optimizer.json"));
    const st = await SafetensorsFile.open(path.join(dir, "optimizer.safetensors"));
    const tensors: OptimizerStateDict["tensors"] = {};
    try {
        for (const name of st.names())
            tensors[name] = st.info(name).dtype === "U8" ? await st.readBytes(name) : await st.readF32(name);
    } finally {
        await st.close();
    }
    return {
        dir,
        optimizer: {tensors, metadata},
        scheduler: await readJson<LRSchedulerState>(path.join(dir, "scheduler.json")),
        rng: await readJson<RngStateFile>(path.join(dir, "rng_state.json")),
        trainerState: await readJson<TrainerState>(path.join(dir, "trainer_state.json")),
    };
}

/** the checkpoint-N folders of output_dir, oldest first */
export async function listCheckpoints(outputDir: string): Promise<{dir: string; step: number}[]> {
    let names: string[] = [];
    try {
        names = await fs.readdir(outputDir);
    } catch {
        return [];
    }
    return names
        .map((n) => ({n, m: new RegExp(`^${CHECKPOINT_PREFIX}(\\d+)$`).exec(n)}))
        .filter((x) => x.m)
        .map((x) => ({dir: path.join(outputDir, x.n), step: Number(x.m![1])}))
        .sort((a, b) => a.step - b.step);
}

/** save_total_limit: removes the oldest checkpoints beyond `limit` */
export async function rotateCheckpoints(outputDir: string, limit: number | null): Promise<string[]> {
    if (!limit) return [];
    const all = await listCheckpoints(outputDir);
    const remove = all.slice(0, Math.max(0, all.length - limit));
    for (const c of remove) await fs.rm(c.dir, {recursive: true, force: true});
    return remove.map((c) => c.dir);
}

/** resume_from_checkpoint: true means the latest checkpoint in output_dir */
export async function resolveResumeDir(outputDir: string, resume: boolean | string): Promise<string | null> {
    if (resume === false) return null;
    if (typeof resume === "string" && resume !== "true") {
        const dir = path.resolve(resume);
        try {
            await fs.access(path.join(dir, "trainer_state.json"));
        } catch {
            throw new QloraError("resume_from_checkpoint: no trainer_state.json in this folder " +
                "(pass a checkpoint-N folder of an earlier run, or true for the latest one)", {file: dir});
        }
        return dir;
    }
    const all = await listCheckpoints(outputDir);
    if (all.length === 0)
        throw new QloraError(`resume_from_checkpoint: no checkpoint-N folder in ${outputDir} to resume from`);
    return all[all.length - 1].dir;
}
