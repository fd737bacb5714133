// trainer.ts: the fine-tuning loop of the seed recipe (transformers' Trainer + TRL's SFTTrainer semantics):
// gradient accumulation with the loss normalized over the whole accumulated batch, clipping, AdamW (32-bit,
// 8-bit, paged), LR schedules, logging, evaluation, checkpoints with exact resume, and the final adapter.
//
// It prints nothing: events go to a TrainReporter (the CLI prints them) and to output_dir/metrics.jsonl.
import {constants as fsConstants, promises as fs} from "node:fs";
import path from "node:path";
import {QloraError} from "../errors.js";
import {dataOptionsOf, type TrainConfig} from "./config.js";
import {cpu} from "../backend/cpu.js";
import {chooseDevice, type DeviceChoice} from "../backend/cuda.js";
import {DropoutClock} from "../backend/dropout.js";
import {Rng} from "../backend/rng.js";
import {assertDirOutput, writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {readTextFile} from "../io/files.js";
import {hubIdOfSnapshot} from "../io/hub.js";
import {DataLoader, loadDataset, padTokenIdOf, type PreparedDataset, type ShardBatch} from "../data/index.js";
import {BucketedAllReduce} from "../parallel/buckets.js";
import {checkSameOnEveryRank, broadcastJson, shardedSums, SoloCollective, type Collective} from "../parallel/collective.js";
import {distContextFromEnv, type DistContext} from "../parallel/context.js";
import {TcpCollective} from "../parallel/tcp.js";
import {loadAdapter, saveAdapter} from "../peft/adapter-files.js";
import {applyLora, trainableParametersLine, trainTargets, type LoraModel} from "../peft/inject.js";
import {DecoderModel} from "../model/decoder.js";
import {checkRowsFitContext} from "../model/training.js";
import {LRScheduler, resolveWarmupSteps} from "../optim/schedule.js";
import {bitsAndBytesConfig} from "../quant/config.js";
import {HfTokenizer} from "../tokenizer/index.js";
import {promptFormatTemplate} from "../data/prompt-format.js";
import {
    CHECKPOINT_KIND,
    CHECKPOINT_PREFIX,
    checkpointStep,
    copyTokenizerFiles,
    FINAL_ADAPTER_KIND,
    listCheckpoints,
    loadCheckpointState,
    readCheckpointTrainingArgs,
    resolveResumeDir,
    rotateCheckpoints,
    saveCheckpoint,
    type TrainerState
} from "./checkpoint.js";
import {checkComputeDtype, createEngine} from "./engine.js";
import {TrainingHealth, type HealthSample} from "./health.js";
import {formatPeakMemory, memoryReport} from "./memory.js";
import {gpuPreflight} from "./plan-memory.js";
import {checkOutputPolicy, markOutputDir, openOutputDir, removeEarlierRun, type OutputDir} from "./output-dir.js";
import {hardwareOf, writeReport, type MetricRecord} from "./report.js";
import {StopRequest, TrainingInterrupted, type StopSignal} from "./stop.js";
import {
    checkResumeData,
    checkResumeSettings,
    dataFingerprint,
    resumeOverrideProblem,
    trainingArgsOf,
    type ConfigChange,
    type SavedTrainingArgs
} from "./training-args.js";

export {TrainingInterrupted} from "./stop.js";

/** the trainer's settings: the config schema's keys with the model and data paths resolved */
export type TrainerConfig = Omit<TrainConfig, "model" | "dataset" | "task_type"> & {model: string; dataset: string};

export interface TrainStartInfo {
    modelDir: string;
    device: string;
    computeDtype: string;
    quantization: string;
    trainableLine: string;
    train: PreparedDataset;
    eval: PreparedDataset | null;
    totalSteps: number;
    warmupSteps: number;
    startStep: number;
    effectiveBatch: number;
    /** processes of a data-parallel run (WORLD_SIZE; 1 without one) */
    worldSize: number;
    resumedFrom: string | null;
    /** settings that differ from the resumed checkpoint's, applied because resume_override names them */
    overrides: ConfigChange[];
    /** the training format saved as the adapter's chat template ("alpaca", …; null: the base's template) */
    promptFormat: string | null;
}

export interface TrainLogRecord {
    step: number;
    total_steps: number;
    epoch: number;
    loss: number;
    learning_rate: number;
    grad_norm: number;
    tokens_per_second: number;
    num_tokens: number;
    elapsed_s: number;
    remaining_s: number;
    /** the process's resident memory on the CPU; the caching allocator's allocated bytes on the GPU */
    memory_bytes: number;
    /** high-water marks, not samples: the OS's max RSS on the CPU, the allocator's peak on the GPU */
    peak_memory_bytes: number;
    memory_kind: string;
    /** the process's max RSS (on the GPU too: host memory holds offloaded activations and paged states) */
    host_peak_memory_bytes: number;
}

export interface TrainReporter {
    onStart?(info: TrainStartInfo): void;
    onStep?(step: number, total: number): void;
    onLog?(rec: TrainLogRecord): void;
    onEval?(rec: {step: number; eval_loss: number; eval_perplexity: number; eval_tokens: number}): void;
    onSave?(dir: string, removed: string[]): void;
    onWarning?(message: string): void;
    /** the device the run takes and why (without this hook, auto passing over a GPU comes as a warning) */
    onDevice?(choice: DeviceChoice): void;
    /** a first SIGINT/SIGTERM: the run finishes its step, saves a checkpoint and stops */
    onStopping?(signal: StopSignal): void;
    /** every record as it is appended to metrics.jsonl (start, train, eval, warning, save, end): `qlora ui` streams them */
    onRecord?(rec: MetricRecord): void;
}

export interface TrainResult {
    outputDir: string;
    finalDir: string;
    globalStep: number;
    /** transformers' train_loss: the mean step loss of this run (of this session, when resumed) */
    trainLoss: number;
    /** the last step's loss */
    lastLoss: number;
    evalLoss: number | null;
    metricsFile: string;
    reportFile: string;
}

/** steps given as a float in [0, 1) are a ratio of the total steps, rounded up (transformers) */
function resolveSteps(value: number, total: number): number {
    return value < 1 ? Math.max(1, Math.ceil(value * total)) : Math.floor(value);
}

/** the longest row's length: a loop, since spreading a million rows into Math.max overflows the call stack */
export function longestRow(rows: readonly {inputIds: ArrayLike<number>}[]): number {
    let longest = 0;
    for (const row of rows) if (row.inputIds.length > longest) longest = row.inputIds.length;
    return longest;
}

/** lets the event loop run (signals, I/O) between the synchronous compute of micro-batches */
const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * metrics.jsonl of the run being resumed, up to its checkpoint's step. A line that does not parse (a kill
 * mid-append leaves a partial last line) is dropped with a warning; every other record is kept.
 */
export async function readMetricsForResume(
    file: string,
    upToStep: number,
    warn: (message: string) => void
): Promise<MetricRecord[]> {
    const records = await readMetrics(file, warn);
    // the run goes on from the checkpoint: an "end" of an earlier finish of it is no longer the end
    return records.filter((r) => r.type === "start" || (r.type !== "end" && typeof r.step === "number" && r.step <= upToStep));
}

/** every record of a metrics.jsonl ([] when there is none); lines that do not parse are dropped with a warning */
export async function readMetrics(file: string, warn: (message: string) => void): Promise<MetricRecord[]> {
    let text: string;
    try {
        text = await readTextFile(file, {what: "metrics file"});
    } catch (err) {
        if (((err as Error).cause as NodeJS.ErrnoException | undefined)?.code === "ENOENT") return [];
        throw err;
    }
    const records: MetricRecord[] = [];
    const bad: number[] = [];
    text.split("\n").forEach((line, i) => {
        if (line.trim() === "") return;
        try {
            const rec = JSON.parse(line) as MetricRecord;
            if (typeof rec !== "object" || rec === null || typeof rec.type !== "string") throw new Error("not a record");
            records.push(rec);
        } catch {
            bad.push(i + 1);
        }
    });
    if (bad.length > 0)
        warn(
            `${file}: dropped ${bad.length} line${bad.length === 1 ? "" : "s"} that ${bad.length === 1 ? "is" : "are"} not a ` +
                `JSON record (line ${bad.slice(0, 3).join(", ")}${bad.length > 3 ? ", ..." : ""}: cut short by a kill?); kept the other ${records.length}`
        );
    return records;
}

/** what is known when the loss or the gradient norm is not finite, to say what caused it */
export interface DivergenceFacts {
    what: "loss" | "gradient norm";
    value: number;
    step: number;
    /** the first step this process computes (global_step + 1 at the start, after a resume) */
    firstStepHere: number;
    resumedFrom: string | null;
    /** the adapter's trainable weights are all finite */
    adapterFinite: boolean;
    learningRate: number;
    maxGradNorm: number;
}

/**
 * The message for a non-finite loss or gradient norm. Before any update of this run, the learning rate cannot be
 * the cause: the model's weights, the data, or (on resume) the checkpoint are; after updates with finite adapter
 * weights, it is the optimization (learning rate, clipping).
 */
export function divergenceMessage(f: DivergenceFacts): string {
    const head = `the ${f.what} is ${f.value} at step ${f.step}`;
    const tuning = `lower learning_rate (now ${f.learningRate}) and keep max_grad_norm > 0 (now ${f.maxGradNorm})`;
    if (f.step === f.firstStepHere) {
        if (!f.adapterFinite && f.resumedFrom)
            return (
                `${head}, the first step after resuming: the adapter weights in ${f.resumedFrom} are not finite (NaN/Inf); ` +
                "resume from an earlier checkpoint"
            );
        if (!f.adapterFinite)
            return `${head}, before any update: the adapter's initial weights are not finite; check init_lora_weights and r`;
        return (
            `${head}, before any update${f.resumedFrom ? " of this run" : ""} (the adapter weights are finite), so it is ` +
            "not the learning rate: the base model's weights or the data give non-finite values; check the model files " +
            "for NaN/Inf weights and the data for broken examples"
        );
    }
    if (!f.adapterFinite)
        return `${head}: the update of step ${f.step - 1} made the adapter weights non-finite (training diverged); ${tuning}`;
    return (
        `${head}: training diverged (the adapter weights are finite but grew too large); ${tuning}, or check the ` +
        "data for broken examples"
    );
}

function allFinite(lora: LoraModel): boolean {
    for (const t of lora.trainableTensors()) {
        const p = t.param;
        for (let i = 0; i < p.length; i++) if (!Number.isFinite(p[i])) return false;
    }
    return true;
}

/**
 * A resumed run writes final/ and may save checkpoints the folder already holds (those after the one it resumes
 * from): each must be one qlora wrote, which is checked now rather than after the training.
 */
async function assertReplaceable(outputDir: string, resumeDir: string): Promise<void> {
    const from = checkpointStep(resumeDir) ?? -1;
    await assertDirOutput(path.join(outputDir, "final"), {replace: "owned", kind: FINAL_ADAPTER_KIND});
    for (const c of await listCheckpoints(outputDir))
        if (c.step > from) await assertDirOutput(c.dir, {replace: "owned", kind: CHECKPOINT_KIND});
}

/**
 * Trains one adapter. Under torchrun's variables (WORLD_SIZE > 1: `qlora train --nproc_per_node N` or torchrun) this
 * process is one rank of a data-parallel run (docs/DESIGN.md, "Several processes"): each rank computes its slice of
 * every global micro-batch, the gradients are summed over the ranks, and rank 0 alone writes output_dir.
 */
export async function train(config: TrainerConfig, reporter: TrainReporter = {}): Promise<TrainResult> {
    const dist = distContextFromEnv();
    // every rank reports the same run: rank 0 speaks for it (the others' errors still end their process)
    if (dist.rank !== 0) reporter = {};
    const choice = chooseDevice(config.device);
    const device = choice.device;
    if (reporter.onDevice) reporter.onDevice(choice);
    else if (device === "cpu" && choice.gpuSeen) reporter.onWarning?.(choice.line);
    checkComputeDtype(device, config);
    if (dist.worldSize > 1 && device === "cuda")
        throw new QloraError(
            `WORLD_SIZE=${dist.worldSize} on the GPU: data-parallel training there needs the NCCL all-reduce of the ` +
                "device gradients, which is not wired into the CUDA engine yet (NCCL's binding is, see parallel/nccl.ts); " +
                "run the ranks with --device cpu, or train on one GPU"
        );
    if (config.threads) cpu().setNumThreads(config.threads);
    const overrideProblem = resumeOverrideProblem(config.resume_override ?? []);
    if (overrideProblem) throw new QloraError(`resume_override: ${overrideProblem}`);
    const coll: Collective = dist.worldSize > 1 ? await TcpCollective.connect(dist) : new SoloCollective();
    try {
        // rank 0 alone takes output_dir (its lock, recovery, policy); the other ranks only read from it
        const out =
            dist.rank === 0
                ? await openOutputDir(config.output_dir, [
                      {path: config.model, what: "model folder"},
                      {path: config.dataset, what: "training dataset"},
                      {path: config.eval_dataset, what: "eval dataset"}
                  ])
                : null;
        const stop = new StopRequest((signal) => reporter.onStopping?.(signal));
        try {
            return await trainInOutputDir(config, reporter, choice, out, stop, dist, coll);
        } finally {
            stop.dispose();
            if (out) {
                await out.lock.release();
                // a folder this run created and never wrote into (it failed before the first write) goes again
                if (out.created) await fs.rmdir(out.dir).catch(() => undefined);
            }
        }
    } finally {
        await coll.close();
    }
}

async function trainInOutputDir(
    config: TrainerConfig,
    reporter: TrainReporter,
    choice: DeviceChoice,
    /** null on ranks other than 0, which write nothing */
    out: OutputDir | null,
    stop: StopRequest,
    dist: DistContext,
    coll: Collective
): Promise<TrainResult> {
    const device = choice.device;
    const W = dist.worldSize;
    const outputDir = out?.dir ?? path.resolve(config.output_dir);
    for (const line of out?.recovered ?? []) reporter.onWarning?.(`output_dir: ${line}`);
    // rank 0 decides what is resumed (the folder is its to change); every rank then reads that checkpoint
    let resumeDir = out ? await resolveResumeDir(outputDir, config.resume_from_checkpoint) : null;
    const earlierRun = out ? checkOutputPolicy(out, {resumeDir, overwrite: config.overwrite_output_dir ?? false}) : [];
    if (out && resumeDir && earlierRun.length === 0) await assertReplaceable(outputDir, resumeDir);
    resumeDir = await broadcastJson(coll, resumeDir);

    // model, tokenizer and data
    const tokenizer = await HfTokenizer.load(config.model);
    const quantization = config.load_in_4bit
        ? bitsAndBytesConfig({
              load_in_4bit: true,
              bnb_4bit_quant_type: config.bnb_4bit_quant_type,
              bnb_4bit_compute_dtype: config.bnb_4bit_compute_dtype,
              bnb_4bit_use_double_quant: config.bnb_4bit_use_double_quant
          })
        : null;
    const dataOptions = dataOptionsOf(config);
    const trainData = await loadDataset(config.dataset, tokenizer, dataOptions);
    const evalData =
        config.eval_dataset && config.eval_strategy !== "no"
            ? await loadDataset(config.eval_dataset, tokenizer, {...dataOptions, packing: false})
            : null;
    for (const w of [...trainData.warnings, ...(evalData?.warnings ?? [])]) reporter.onWarning?.(w);
    // the training format, saved with every adapter as its chat template: chat and serve prompt it as trained
    const promptFormat = promptFormatTemplate({
        format: trainData.options.format,
        eosToken: trainData.options.eosToken,
        template: config.template,
        tokenizerTemplate: tokenizer.chatTemplateText()
    });
    const maxLen = longestRow(trainData.rows);
    // a run the GPU cannot hold is refused (or, with auto_find_batch_size, shrunk) before the weights load; a
    // batch is padded to its longest row, so the data's longest row (train or eval) bounds the plan's rows
    if (device === "cuda") {
        const dataLongest = Math.max(maxLen, evalData ? longestRow(evalData.rows) : 0);
        config = await gpuPreflight(config, choice, (m) => reporter.onWarning?.(m), dataLongest);
    }
    // a resumed run must be the run that was interrupted: its settings (as the preflight left them) are checked
    // before the weights load, its data right after
    let savedArgs: SavedTrainingArgs | null = null;
    let overrides: ConfigChange[] = [];
    if (resumeDir) {
        savedArgs = await readCheckpointTrainingArgs(resumeDir);
        if (savedArgs) overrides = checkResumeSettings(savedArgs, config, resumeDir, W);
        else
            reporter.onWarning?.(
                `${resumeDir} has no training_args.json (a checkpoint of an older qlora): changed ` +
                    "settings cannot be checked; resuming with the checkpoint's adapter, optimizer state and schedule"
            );
    }
    const model = await DecoderModel.load(config.model, {quantization});
    checkRowsFitContext(model.config, maxLen, "max_seq_length", config.max_seq_length);
    const fingerprint = dataFingerprint(trainData.rows);
    if (savedArgs && resumeDir) checkResumeData(savedArgs, fingerprint, resumeDir);
    // the ranks must run one training: the same settings (paths resolved) and the same tokenized data
    await checkSameOnEveryRank(coll, "the training run", {
        ...trainingArgsOf(config, fingerprint, W).config,
        data: fingerprint,
        resume: resumeDir,
        output_dir: outputDir
    });
    if (stop.signal) throw new TrainingInterrupted(stop.signal, 0, null);

    // LoRA: fresh (PEFT's init from the seed), or the adapter of the checkpoint being resumed
    const dropoutClock = new DropoutClock(config.seed);
    let lora: LoraModel;
    if (resumeDir) lora = await loadAdapter(resumeDir, model, {dropoutClock});
    else
        lora = applyLora(
            model,
            {
                r: config.r,
                lora_alpha: config.lora_alpha,
                target_modules: trainTargets(model.config, config.target_modules),
                lora_dropout: config.lora_dropout,
                bias: config.bias,
                use_rslora: config.use_rslora,
                use_dora: config.use_dora,
                modules_to_save: config.modules_to_save,
                init_lora_weights: config.init_lora_weights,
                base_model_name_or_path: baseModelName(config.model)
            },
            {initRng: new Rng(config.seed), dropoutClock}
        );
    lora.config.base_model_name_or_path ??= baseModelName(config.model);
    const engine = createEngine(
        device,
        model,
        lora,
        config.optim,
        {
            adam_beta1: config.adam_beta1,
            adam_beta2: config.adam_beta2,
            adam_epsilon: config.adam_epsilon,
            weight_decay: config.weight_decay
        },
        dropoutClock,
        config.gradient_checkpointing && config.gradient_checkpointing_offload
    );

    // steps: one step = gradient_accumulation_steps global micro-batches of per_device_train_batch_size x
    // WORLD_SIZE rows, each cut into one slice per rank (DataLoader.nextShard)
    const loader = new DataLoader(trainData.rows, {
        batchSize: config.per_device_train_batch_size * W,
        padTokenId: padTokenIdOf(tokenizer),
        shuffle: true,
        seed: config.seed
    });
    const GA = config.gradient_accumulation_steps;
    const stepsPerEpoch = Math.max(1, Math.ceil(loader.batchesPerEpoch / GA));
    const totalSteps = config.max_steps > 0 ? config.max_steps : Math.ceil(config.num_train_epochs * stepsPerEpoch);
    const warmupSteps = resolveWarmupSteps({warmup_steps: config.warmup_steps, warmup_ratio: config.warmup_ratio}, totalSteps);
    const scheduler = new LRScheduler({type: config.lr_scheduler_type, baseLr: config.learning_rate, warmupSteps, totalSteps});
    const loggingSteps = resolveSteps(config.logging_steps, totalSteps);
    const evalSteps = resolveSteps(config.eval_steps ?? config.logging_steps, totalSteps);
    const saveSteps = resolveSteps(config.save_steps, totalSteps);

    let state: TrainerState = {
        global_step: 0,
        epoch: 0,
        max_steps: totalSteps,
        num_train_epochs: config.num_train_epochs,
        logging_steps: loggingSteps,
        eval_steps: evalSteps,
        save_steps: saveSteps,
        train_batch_size: config.per_device_train_batch_size,
        log_history: [],
        best_metric: null,
        best_model_checkpoint: null,
        num_input_tokens_seen: 0,
        qlora_log_accumulator: {lossSum: 0, steps: 0, tokens: 0}
    };
    if (resumeDir) {
        const saved = await loadCheckpointState(resumeDir, {
            maxSteps: totalSteps,
            batchesPerEpoch: loader.batchesPerEpoch,
            gradientAccumulationSteps: GA
        });
        state = saved.trainerState;
        if (savedArgs) {
            // the settings equal the checkpoint's or were overridden on purpose: the optimizer's hyperparameters and
            // the schedule are the run's (the schedule continues at the checkpoint's step)
            saved.optimizer.metadata.options = {
                ...saved.optimizer.metadata.options,
                betas: [config.adam_beta1, config.adam_beta2],
                eps: config.adam_epsilon,
                weightDecay: config.weight_decay
            };
            scheduler.loadStateDict({...scheduler.stateDict(), step: state.global_step});
        } else {
            scheduler.loadStateDict(saved.scheduler);
            if (state.max_steps !== totalSteps)
                reporter.onWarning?.(`the checkpoint was made for ${state.max_steps} steps, this run has ${totalSteps}`);
        }
        try {
            engine.loadOptimizerState(saved.optimizer);
        } catch (err) {
            if (!(err instanceof QloraError)) throw err;
            throw new QloraError(
                `${err.message.replace(/^optimizer state: /, "")}; the optimizer state does not fit this ` +
                    "run's trainable parameters: resume with the settings of the run, or from another checkpoint",
                {file: path.join(resumeDir, "optimizer.json"), cause: err}
            );
        }
        loader.seek(saved.rng.loader);
        state.max_steps = totalSteps;
        engine.setMicroBatchIndex(state.global_step * GA);
    }
    const trainingArgs = trainingArgsOf(config, fingerprint, W);
    const gradients = engine.hostGradients();
    if (W > 1 && !gradients) throw new Error("a data-parallel run needs the engine's host gradients");
    const bucketed =
        W > 1
            ? new BucketedAllReduce(
                  gradients!.map((g) => g.grad),
                  gradients!.map((g) => g.name)
              )
            : null;
    // rank r's rows keep their place in the global micro-batch's [rows, T] layout, where their dropout masks are
    const padToGlobal = W > 1 && lora.trainableTensors().length > 0 && config.lora_dropout > 0;

    // metrics.jsonl: on resume, keep only what happened up to the checkpoint
    const metricsFile = path.join(outputDir, "metrics.jsonl");
    const records: MetricRecord[] =
        resumeDir && out ? await readMetricsForResume(metricsFile, state.global_step, (m) => reporter.onWarning?.(m)) : [];
    if (stop.signal) throw new TrainingInterrupted(stop.signal, state.global_step, resumeDir);

    // the first write: the earlier run goes (overwrite_output_dir), the folder is marked as a training run's
    if (out && earlierRun.length > 0) await removeEarlierRun(outputDir, earlierRun);
    if (out) await markOutputDir(out);
    const writeMetrics = () => writeFileAtomic(metricsFile, records.map((r) => JSON.stringify(r)).join("\n") + "\n");
    const emit = async (rec: MetricRecord) => {
        if (!out) return;
        records.push(rec);
        // O_NOFOLLOW: the file is the regular one written above; a link planted under its name is not written through
        await fs.appendFile(metricsFile, JSON.stringify(rec) + "\n", {
            flag: fsConstants.O_WRONLY | fsConstants.O_APPEND | fsConstants.O_CREAT | fsConstants.O_NOFOLLOW
        });
        reporter.onRecord?.(rec);
    };
    if (out) await writeMetrics();

    const trainableLine = trainableParametersLine(lora);
    reporter.onStart?.({
        modelDir: config.model,
        device,
        computeDtype: engine.computeDtype,
        quantization: quantization
            ? `${quantization.bnb_4bit_quant_type}${quantization.bnb_4bit_use_double_quant ? " + double quant" : ""}`
            : model.quantized
              ? "pre-quantized 4-bit"
              : "none (16-bit LoRA)",
        trainableLine,
        train: trainData,
        eval: evalData,
        totalSteps,
        warmupSteps,
        startStep: state.global_step,
        effectiveBatch: config.per_device_train_batch_size * W * GA,
        worldSize: W,
        resumedFrom: resumeDir,
        promptFormat: promptFormat?.source ?? null,
        overrides
    });
    if (!resumeDir)
        await emit({
            type: "start",
            time: new Date().toISOString(),
            trainable: trainableLine,
            total_steps: totalSteps,
            config: config as unknown as Record<string, unknown>
        });

    const evaluate = async (): Promise<{loss: number; tokens: number} | null> => {
        if (!evalData) return null;
        const evalLoader = new DataLoader(evalData.rows, {
            batchSize: config.per_device_eval_batch_size,
            padTokenId: padTokenIdOf(tokenizer),
            shuffle: false,
            seed: 0
        });
        // the ranks share the batches (batch i on rank i mod WORLD_SIZE); the sums come out in batch order, the
        // bits of one process
        const [sum, count] = await shardedSums(coll, evalLoader.epoch(), 2, async ({batch}) => {
            const r = engine.forwardBackward(batch, {lossScale: 0, gradientCheckpointing: false, noBackward: true});
            await yieldToEventLoop();
            return [r.lossSum, r.targets];
        });
        return {loss: sum / Math.max(1, count), tokens: count};
    };
    const checkpointParts = () => {
        engine.syncToHost();
        return {
            lora,
            optimizerState: engine.optimizerState(),
            scheduler,
            trainerState: state,
            modelDir: config.model,
            chatTemplate: promptFormat?.template ?? null,
            rng: {loader: loader.position},
            trainingArgs
        };
    };
    let lastSaved: string | null = resumeDir && path.dirname(resumeDir) === outputDir ? resumeDir : null;
    // report.html, rewritten at each checkpoint and at the end: a run that stops or crashes keeps its last one
    const hardware = hardwareOf(choice);
    const writeRunReport = (finalDir: string | null) => {
        const trainLogs = records.filter((r) => r.type === "train");
        const first = trainLogs[0],
            last = trainLogs[trainLogs.length - 1];
        const evalLogs = records.filter((r) => r.type === "eval");
        return writeReport(path.join(outputDir, "report.html"), {
            title: `qlora training report: ${path.basename(config.model)}`,
            summary: {
                model: config.model,
                dataset: config.dataset,
                "eval dataset": config.eval_dataset ?? "none",
                steps: state.global_step,
                trainable: trainableLine,
                "first / last logged loss": first && last ? `${first.loss} / ${last.loss}` : "-",
                [finalDir ? "final eval loss" : "last eval loss"]: evalLogs.length
                    ? Number(evalLogs[evalLogs.length - 1].eval_loss).toFixed(4)
                    : "-",
                "peak memory": formatPeakMemory(memoryReport(engine.device)),
                "final adapter": finalDir ?? "not yet (the run has not finished)"
            },
            hardware,
            config: config as unknown as Record<string, unknown>,
            records
        });
    };
    const save = async (step: number): Promise<string> => {
        const dir = path.join(outputDir, `${CHECKPOINT_PREFIX}${step}`);
        lastSaved = dir;
        if (!out) return dir;
        await saveCheckpoint(dir, checkpointParts());
        const removed = await rotateCheckpoints(outputDir, config.save_total_limit, dir);
        await emit({type: "save", step, dir});
        // the checkpoint is what a resume needs: a report that cannot be written is said, not fatal
        await writeRunReport(null).catch((err: Error) =>
            reporter.onWarning?.(`report.html not refreshed at ${path.basename(dir)}: ${err.message}`)
        );
        reporter.onSave?.(dir, removed);
        return dir;
    };
    // health warnings continue over a resume: the earlier session's logs feed the medians and minima
    const health = new TrainingHealth({
        learningRate: config.learning_rate,
        maxGradNorm: config.max_grad_norm,
        warmupSteps
    });
    health.replay(
        state.log_history.flatMap((h): HealthSample[] =>
            typeof h.loss === "number" && typeof h.grad_norm === "number" && typeof h.learning_rate === "number"
                ? [{step: Number(h.step), loss: h.loss, gradNorm: h.grad_norm, learningRate: h.learning_rate}]
                : []
        )
    );
    const startTime = Date.now();
    const startStep = state.global_step;
    let windowStart = Date.now();
    let lastLoss = NaN;
    // transformers' train_loss: the mean of the step losses of this run (of this session, when resumed)
    let sessionLossSum = 0,
        sessionSteps = 0;
    while (state.global_step < totalSteps) {
        // one optimizer step over GA micro-batches: count the targets first (SPEC-training §8)
        const micro: ShardBatch[] = [];
        let epoch = 0;
        for (let i = 0; i < GA; i++) {
            const next = loader.nextShard(dist.rank, W, padToGlobal);
            micro.push(next);
            epoch = next.epoch + (next.index + 1) / loader.batchesPerEpoch;
        }
        // the loss scale is 1 / (targets of the whole global batch): each rank's gradient is its share of the
        // token mean, and their sum over the ranks is the gradient of one process with the global batch
        const counts = new Float64Array(2);
        for (const {batch} of micro)
            if (batch) {
                counts[0] += batch.numTargets;
                counts[1] += batch.attentionMask.reduce((a, v) => a + v, 0);
            }
        await coll.allReduceSum(counts);
        const [numItems, tokens] = counts;
        engine.zeroGrad();
        let lossSum = 0;
        for (let m = 0; m < GA; m++) {
            const {batch, firstRow} = micro[m];
            // the masks follow the global micro-batch's index, computed or not (a rank may have no targets in it)
            engine.setMicroBatchIndex(state.global_step * GA + m);
            if (!batch || batch.numTargets === 0) continue;
            dropoutClock.rowOffset = firstRow * batch.T;
            const r = engine.forwardBackward(batch, {
                lossScale: 1 / numItems,
                gradientCheckpointing: config.gradient_checkpointing
            });
            lossSum += r.lossSum;
            await yieldToEventLoop();
        }
        if (bucketed) {
            await bucketed.run(coll);
            const sums = new Float64Array([lossSum]);
            await coll.allReduceSum(sums);
            lossSum = sums[0];
        }
        const loss = lossSum / Math.max(1, numItems);
        const step = state.global_step + 1;
        const diverged = (what: DivergenceFacts["what"], value: number) => {
            engine.syncToHost();
            return new QloraError(
                divergenceMessage({
                    what,
                    value,
                    step,
                    firstStepHere: startStep + 1,
                    resumedFrom: resumeDir,
                    adapterFinite: allFinite(lora),
                    learningRate: scheduler.getLr(),
                    maxGradNorm: config.max_grad_norm
                })
            );
        };
        if (!Number.isFinite(loss)) throw diverged("loss", loss);
        const gradNorm = engine.clipGradNorm(config.max_grad_norm);
        if (!Number.isFinite(gradNorm)) throw diverged("gradient norm", gradNorm);
        const lr = scheduler.getLr();
        engine.optimizerStep(lr);
        scheduler.step();
        state.global_step = step;
        state.epoch = epoch;
        state.num_input_tokens_seen += tokens;
        lastLoss = loss;
        sessionLossSum += loss;
        sessionSteps++;
        const acc = state.qlora_log_accumulator;
        acc.lossSum += loss;
        acc.steps += 1;
        acc.tokens += tokens;
        reporter.onStep?.(step, totalSteps);

        if (step % loggingSteps === 0 || step === totalSteps) {
            const now = Date.now();
            const elapsed = (now - startTime) / 1000;
            const memory = memoryReport(engine.device);
            const meanLoss = acc.lossSum / acc.steps;
            const rec: TrainLogRecord = {
                step,
                total_steps: totalSteps,
                epoch: Number(epoch.toFixed(4)),
                loss: Number(meanLoss.toFixed(4)),
                learning_rate: lr,
                grad_norm: gradNorm,
                tokens_per_second: acc.tokens / Math.max(1e-9, (now - windowStart) / 1000),
                num_tokens: state.num_input_tokens_seen,
                elapsed_s: elapsed,
                remaining_s: (elapsed / (step - startStep)) * (totalSteps - step),
                memory_bytes: memory.current,
                peak_memory_bytes: memory.peak,
                memory_kind: memory.kind,
                host_peak_memory_bytes: memory.host.peakRssBytes
            };
            state.log_history.push({loss: rec.loss, grad_norm: gradNorm, learning_rate: lr, epoch: rec.epoch, step});
            state.qlora_log_accumulator = {lossSum: 0, steps: 0, tokens: 0};
            windowStart = now;
            await emit({type: "train", ...rec});
            reporter.onLog?.(rec);
            for (const w of health.observe({step, loss: meanLoss, gradNorm, learningRate: lr, targets: numItems})) {
                state.log_history.push({warning: w.kind, message: w.message, epoch: rec.epoch, step});
                await emit({type: "warning", step, kind: w.kind, message: w.message});
                reporter.onWarning?.(`step ${step}: ${w.message}`);
            }
        }
        // every rank evaluates its share of the batches (rank 0 alone writes the record)
        if (evalData && (step % evalSteps === 0 || step === totalSteps)) {
            const ev = (await evaluate())!;
            const rec = {step, eval_loss: ev.loss, eval_perplexity: Math.exp(ev.loss), eval_tokens: ev.tokens};
            state.log_history.push({eval_loss: ev.loss, epoch: state.epoch, step});
            await emit({type: "eval", ...rec});
            reporter.onEval?.(rec);
        }
        if (config.save_strategy !== "no" && (step % saveSteps === 0 || step === totalSteps)) await save(step);
        await yieldToEventLoop();
        // the ranks stop together: a signal seen by any rank (the launcher forwards one to each) stops all after this step
        let stopSignal: StopSignal | null = stop.signal;
        if (W > 1) {
            const flag = new Float64Array([stop.signal ? 1 : 0]);
            await coll.allReduceSum(flag);
            if (flag[0] > 0) stopSignal ??= "SIGTERM";
        }
        if (stopSignal) {
            // SIGINT/SIGTERM: the step is done; keep it in a checkpoint (unless this step's was just saved)
            const dir = lastSaved === path.join(outputDir, `${CHECKPOINT_PREFIX}${step}`) ? lastSaved : await save(step);
            // no rank ends before rank 0's checkpoint is complete (a launcher stops the others when one ends)
            await coll.barrier();
            throw new TrainingInterrupted(stopSignal, step, dir);
        }
    }

    // a run resumed at its last step trains nothing more: its last logged loss is the final one
    if (!Number.isFinite(lastLoss)) {
        const logged = state.log_history.filter((h) => typeof h.loss === "number");
        if (logged.length > 0) lastLoss = logged[logged.length - 1].loss as number;
    }
    const trainLoss = sessionSteps > 0 ? sessionLossSum / sessionSteps : lastLoss;
    // the final adapter, PEFT's layout, with the tokenizer files beside it
    const finalDir = path.join(outputDir, "final");
    engine.syncToHost();
    const reportFile = path.join(outputDir, "report.html");
    if (!out) {
        await coll.barrier();
        return {outputDir, finalDir, globalStep: state.global_step, trainLoss, lastLoss, evalLoss: null, metricsFile, reportFile};
    }
    await writeDirAtomic(
        finalDir,
        async (tmp) => {
            await saveAdapter(tmp, lora);
            await copyTokenizerFiles(config.model, tmp, promptFormat?.template ?? null);
        },
        {replace: "owned", kind: FINAL_ADAPTER_KIND}
    );
    const evalLogs = records.filter((r) => r.type === "eval");
    const evalLoss = evalLogs.length ? Number(evalLogs[evalLogs.length - 1].eval_loss) : null;
    const memory = memoryReport(engine.device);
    await emit({
        type: "end",
        step: state.global_step,
        final_dir: finalDir,
        train_loss: trainLoss,
        last_loss: lastLoss,
        eval_loss: evalLoss,
        memory_kind: memory.kind,
        peak_memory_bytes: memory.peak,
        host_peak_memory_bytes: memory.host.peakRssBytes,
        time: new Date().toISOString()
    });
    await writeRunReport(finalDir);
    // the other ranks end once the final adapter and the report are written
    await coll.barrier();
    return {outputDir, finalDir, globalStep: state.global_step, trainLoss, lastLoss, evalLoss, metricsFile, reportFile};
}

/** what the adapter records as its base: the Hub id of a model from the Hugging Face cache (as PEFT does), else the folder's name */
function baseModelName(modelDir: string): string {
    return hubIdOfSnapshot(modelDir) ?? path.basename(modelDir);
}
