// trainer.ts: the fine-tuning loop of the seed recipe (transformers' Trainer + TRL's SFTTrainer semantics):
// gradient accumulation with the loss normalized over the whole accumulated batch, clipping, AdamW (32-bit,
// 8-bit, paged), LR schedules, logging, evaluation, checkpoints with exact resume, and the final adapter.
//
// It prints nothing: events go to a TrainReporter (the CLI prints them) and to output_dir/metrics.jsonl.
import {promises as fs} from "node:fs";
import path from "node:path";
import {QloraError} from "../errors.js";
import {cpu} from "../backend/cpu.js";
import {resolveDevice} from "../backend/cuda.js";
import {Rng} from "../backend/rng.js";
import {writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {DataLoader, loadDataset, padTokenIdOf, type Batch, type DataOptions, type PreparedDataset} from "../data/index.js";
import {applyLora, loadAdapter, saveAdapter, trainableParametersLine, type LoraModel} from "../lora/adapter.js";
import {DecoderModel} from "../model/decoder.js";
import {LRScheduler, resolveWarmupSteps} from "../optim/schedule.js";
import {bitsAndBytesConfig} from "../quant/config.js";
import {HfTokenizer} from "../tokenizer/index.js";
import {
    CHECKPOINT_PREFIX, copyTokenizerFiles, loadCheckpointState, resolveResumeDir, rotateCheckpoints, saveCheckpoint,
    type TrainerState,
} from "./checkpoint.js";
import {createEngine} from "./engine.js";
import {writeReport, type MetricRecord} from "./report.js";

/** the trainer's settings: the seed's names (a TrainConfig from src/api satisfies it) */
export interface TrainerConfig {
    model: string;
    dataset: string;
    eval_dataset: string | null;
    dataset_format: string;
    template: string | null;
    max_seq_length: number;
    packing: boolean;
    completion_only_loss: boolean;
    assistant_only_loss: boolean;
    load_in_4bit: boolean;
    bnb_4bit_quant_type: "nf4" | "fp4";
    bnb_4bit_compute_dtype: "bfloat16" | "float16" | "float32";
    bnb_4bit_use_double_quant: boolean;
    r: number;
    lora_alpha: number;
    target_modules: string[] | string;
    lora_dropout: number;
    bias: "none" | "all" | "lora_only";
    use_rslora: boolean;
    use_dora: boolean;
    modules_to_save: string[] | null;
    init_lora_weights: boolean | "gaussian";
    output_dir: string;
    num_train_epochs: number;
    max_steps: number;
    per_device_train_batch_size: number;
    per_device_eval_batch_size: number;
    gradient_accumulation_steps: number;
    learning_rate: number;
    weight_decay: number;
    adam_beta1: number;
    adam_beta2: number;
    adam_epsilon: number;
    max_grad_norm: number;
    optim: string;
    lr_scheduler_type: string;
    warmup_ratio: number;
    warmup_steps: number;
    fp16: boolean;
    bf16: boolean;
    gradient_checkpointing: boolean;
    gradient_checkpointing_offload: boolean;
    logging_steps: number;
    eval_steps: number | null;
    save_steps: number;
    save_total_limit: number | null;
    seed: number;
    resume_from_checkpoint: boolean | string;
    device: "auto" | "cpu" | "cuda";
    threads: number | null;
}

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
    resumedFrom: string | null;
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
    peak_memory_bytes: number;
    memory_kind: string;
}

export interface TrainReporter {
    onStart?(info: TrainStartInfo): void;
    onStep?(step: number, total: number): void;
    onLog?(rec: TrainLogRecord): void;
    onEval?(rec: {step: number; eval_loss: number; eval_perplexity: number; eval_tokens: number}): void;
    onSave?(dir: string, removed: string[]): void;
    onWarning?(message: string): void;
}

export interface TrainResult {
    outputDir: string;
    finalDir: string;
    globalStep: number;
    trainLoss: number;
    evalLoss: number | null;
    metricsFile: string;
    reportFile: string;
}

/** steps given as a float in [0, 1) are a ratio of the total steps, rounded up (transformers) */
function resolveSteps(value: number, total: number): number {
    return value < 1 ? Math.max(1, Math.ceil(value * total)) : Math.floor(value);
}


/** where metrics.jsonl, checkpoints and report.html go; fails early when it cannot be written */
async function prepareOutputDir(dir: string): Promise<void> {
    try {
        await fs.mkdir(dir, {recursive: true});
        const probe = path.join(dir, `.write-test-${process.pid}`);
        await fs.writeFile(probe, "");
        await fs.rm(probe);
        // temporary folders of a run that was killed while saving (never valid checkpoints)
        for (const name of await fs.readdir(dir))
            if (/^\..+\.(tmp|old)-\d+$/.test(name)) await fs.rm(path.join(dir, name), {recursive: true, force: true});
    } catch (err) {
        throw new QloraError(`the output folder cannot be written (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); ` +
            "choose another output_dir", {file: dir});
    }
}

export async function train(config: TrainerConfig, reporter: TrainReporter = {}): Promise<TrainResult> {
    const device = resolveDevice(config.device);
    if (config.threads) cpu().setNumThreads(config.threads);
    const outputDir = path.resolve(config.output_dir);
    await prepareOutputDir(outputDir);
    const resumeDir = await resolveResumeDir(outputDir, config.resume_from_checkpoint);

    // model, tokenizer and data
    const tokenizer = await HfTokenizer.load(config.model);
    const quantization = config.load_in_4bit ? bitsAndBytesConfig({
        load_in_4bit: true, bnb_4bit_quant_type: config.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype: config.bnb_4bit_compute_dtype, bnb_4bit_use_double_quant: config.bnb_4bit_use_double_quant,
    }) : null;
    const model = await DecoderModel.load(config.model, {quantization});
    const dataOptions: DataOptions = {
        dataset_format: config.dataset_format === "auto" ? undefined : config.dataset_format as DataOptions["dataset_format"],
        template: config.template ?? undefined,
        max_seq_length: config.max_seq_length,
        packing: config.packing,
        completion_only_loss: config.completion_only_loss,
        assistant_only_loss: config.assistant_only_loss,
        seed: config.seed,
    };
    const trainData = await loadDataset(config.dataset, tokenizer, dataOptions);
    const evalData = config.eval_dataset ? await loadDataset(config.eval_dataset, tokenizer, {...dataOptions, packing: false}) : null;
    for (const w of [...trainData.warnings, ...(evalData?.warnings ?? [])]) reporter.onWarning?.(w);
    const maxLen = Math.max(...trainData.rows.map((r) => r.inputIds.length));
    if (maxLen > model.config.maxPositionEmbeddings)
        throw new QloraError(`max_seq_length ${config.max_seq_length} lets rows of ${maxLen} tokens through, longer than ` +
            `the model's context (${model.config.maxPositionEmbeddings}); lower max_seq_length`);

    // LoRA: fresh (PEFT's init from the seed), or the adapter of the checkpoint being resumed
    const dropoutRng = new Rng(config.seed + 1);
    let lora: LoraModel;
    if (resumeDir) lora = await loadAdapter(resumeDir, model, {dropoutRng});
    else lora = applyLora(model, {
        r: config.r, lora_alpha: config.lora_alpha, target_modules: config.target_modules, lora_dropout: config.lora_dropout,
        bias: config.bias, use_rslora: config.use_rslora, use_dora: config.use_dora, modules_to_save: config.modules_to_save,
        init_lora_weights: config.init_lora_weights, base_model_name_or_path: path.basename(config.model),
    }, {initRng: new Rng(config.seed), dropoutRng});
    lora.config.base_model_name_or_path ??= path.basename(config.model);
    lora.setTraining(true);
    const engine = createEngine(device, model, lora, config.optim, {adam_beta1: config.adam_beta1,
        adam_beta2: config.adam_beta2, adam_epsilon: config.adam_epsilon, weight_decay: config.weight_decay},
    dropoutRng, config.seed, config.gradient_checkpointing && config.gradient_checkpointing_offload);

    // steps: one step = gradient_accumulation_steps micro-batches
    const loader = new DataLoader(trainData.rows, {batchSize: config.per_device_train_batch_size,
        padTokenId: padTokenIdOf(tokenizer), shuffle: true, seed: config.seed});
    const GA = config.gradient_accumulation_steps;
    const stepsPerEpoch = Math.max(1, Math.ceil(loader.batchesPerEpoch / GA));
    const totalSteps = config.max_steps > 0 ? config.max_steps : Math.ceil(config.num_train_epochs * stepsPerEpoch);
    const warmupSteps = resolveWarmupSteps({warmup_steps: config.warmup_steps, warmup_ratio: config.warmup_ratio}, totalSteps);
    const scheduler = new LRScheduler({type: config.lr_scheduler_type, baseLr: config.learning_rate, warmupSteps, totalSteps});
    const loggingSteps = resolveSteps(config.logging_steps, totalSteps);
    const evalSteps = resolveSteps(config.eval_steps ?? config.logging_steps, totalSteps);
    const saveSteps = resolveSteps(config.save_steps, totalSteps);

    let state: TrainerState = {
        global_step: 0, epoch: 0, max_steps: totalSteps, num_train_epochs: config.num_train_epochs,
        logging_steps: loggingSteps, eval_steps: evalSteps, save_steps: saveSteps,
        train_batch_size: config.per_device_train_batch_size, log_history: [], best_metric: null,
        best_model_checkpoint: null, num_input_tokens_seen: 0, qlora_log_accumulator: {lossSum: 0, steps: 0, tokens: 0},
    };
    if (resumeDir) {
        const saved = await loadCheckpointState(resumeDir);
        engine.loadOptimizerState(saved.optimizer);
        scheduler.loadStateDict(saved.scheduler);
        dropoutRng.setState(saved.rng.dropout);
        loader.seek(saved.rng.loader);
        state = saved.trainerState;
        if (state.max_steps !== totalSteps)
            reporter.onWarning?.(`the checkpoint was made for ${state.max_steps} steps, this run has ${totalSteps}`);
        state.max_steps = totalSteps;
        engine.setMicroBatchIndex(state.global_step * GA);
    }

    // metrics.jsonl: on resume, keep only what happened up to the checkpoint
    const metricsFile = path.join(outputDir, "metrics.jsonl");
    let records: MetricRecord[] = [];
    if (resumeDir) {
        try {
            records = (await fs.readFile(metricsFile, "utf8")).split("\n").filter(Boolean).map((l) => JSON.parse(l) as MetricRecord)
                .filter((r) => r.type === "start" || (r.step ?? 0) <= state.global_step);
        } catch {
            records = [];
        }
    }
    const writeMetrics = () => writeFileAtomic(metricsFile, records.map((r) => JSON.stringify(r)).join("\n") + "\n");
    const emit = async (rec: MetricRecord) => {
        records.push(rec);
        await fs.appendFile(metricsFile, JSON.stringify(rec) + "\n");
    };
    await writeMetrics();

    const trainableLine = trainableParametersLine(lora);
    reporter.onStart?.({
        modelDir: config.model, device, computeDtype: engine.computeDtype,
        quantization: quantization ? `${quantization.bnb_4bit_quant_type}${quantization.bnb_4bit_use_double_quant ? " + double quant" : ""}`
            : (model.quantized ? "pre-quantized 4-bit" : "none (16-bit LoRA)"),
        trainableLine, train: trainData, eval: evalData, totalSteps, warmupSteps, startStep: state.global_step,
        effectiveBatch: config.per_device_train_batch_size * GA, resumedFrom: resumeDir,
    });
    if (!resumeDir) await emit({type: "start", time: new Date().toISOString(), trainable: trainableLine, total_steps: totalSteps,
        config: config as unknown as Record<string, unknown>});

    const evaluate = (): {loss: number; tokens: number} | null => {
        if (!evalData) return null;
        lora.setTraining(false);
        const evalLoader = new DataLoader(evalData.rows, {batchSize: config.per_device_eval_batch_size,
            padTokenId: padTokenIdOf(tokenizer), shuffle: false, seed: 0});
        let sum = 0, count = 0;
        for (const {batch} of evalLoader.epoch()) {
            const r = engine.forwardBackward(batch, {lossScale: 0, gradientCheckpointing: false, noBackward: true});
            sum += r.lossSum;
            count += r.targets;
        }
        lora.setTraining(true);
        return {loss: sum / Math.max(1, count), tokens: count};
    };
    const checkpointParts = () => {
        engine.syncToHost();
        return {lora, optimizerState: engine.optimizerState(), scheduler, trainerState: state, modelDir: config.model,
            rng: {dropout: dropoutRng.getState(), loader: loader.position}};
    };
    const startTime = Date.now();
    const startStep = state.global_step;
    let windowStart = Date.now();
    let lastLoss = NaN;
    while (state.global_step < totalSteps) {
        // one optimizer step over GA micro-batches: count the targets first (SPEC-training §8)
        const micro: Batch[] = [];
        let epoch = 0;
        for (let i = 0; i < GA; i++) {
            const next = loader.next();
            micro.push(next.batch);
            epoch = next.epoch + (next.index + 1) / loader.batchesPerEpoch;
        }
        const numItems = micro.reduce((a, b) => a + b.numTargets, 0);
        engine.zeroGrad();
        let lossSum = 0, tokens = 0;
        for (const b of micro) {
            if (b.numTargets === 0) continue;
            const r = engine.forwardBackward(b, {lossScale: 1 / numItems,
                gradientCheckpointing: config.gradient_checkpointing});
            lossSum += r.lossSum;
            tokens += b.attentionMask.reduce((a, v) => a + v, 0);
        }
        const loss = lossSum / Math.max(1, numItems);
        const step = state.global_step + 1;
        if (!Number.isFinite(loss))
            throw new QloraError(`the loss is ${loss} at step ${step}: training diverged. Lower learning_rate ` +
                `(now ${config.learning_rate}), keep max_grad_norm > 0, or check the data for empty or broken examples`);
        const gradNorm = engine.clipGradNorm(config.max_grad_norm);
        if (!Number.isFinite(gradNorm))
            throw new QloraError(`the gradient norm is ${gradNorm} at step ${step}: training diverged. Lower learning_rate ` +
                `(now ${config.learning_rate}) or max_grad_norm`);
        const lr = scheduler.getLr();
        engine.optimizerStep(lr);
        scheduler.step();
        state.global_step = step;
        state.epoch = epoch;
        state.num_input_tokens_seen += tokens;
        lastLoss = loss;
        const acc = state.qlora_log_accumulator;
        acc.lossSum += loss;
        acc.steps += 1;
        acc.tokens += tokens;
        reporter.onStep?.(step, totalSteps);

        if (step % loggingSteps === 0 || step === totalSteps) {
            const now = Date.now();
            const elapsed = (now - startTime) / 1000;
            const rec: TrainLogRecord = {
                step, total_steps: totalSteps, epoch: Number(epoch.toFixed(4)),
                loss: Number((acc.lossSum / acc.steps).toFixed(4)), learning_rate: lr, grad_norm: gradNorm,
                tokens_per_second: acc.tokens / Math.max(1e-9, (now - windowStart) / 1000),
                num_tokens: state.num_input_tokens_seen, elapsed_s: elapsed,
                remaining_s: elapsed / (step - startStep) * (totalSteps - step), memory_bytes: engine.memory().current,
                peak_memory_bytes: engine.memory().peak, memory_kind: engine.memory().label,
            };
            state.log_history.push({loss: rec.loss, grad_norm: gradNorm, learning_rate: lr, epoch: rec.epoch, step});
            state.qlora_log_accumulator = {lossSum: 0, steps: 0, tokens: 0};
            windowStart = now;
            await emit({type: "train", ...rec});
            reporter.onLog?.(rec);
        }
        if (evalData && (step % evalSteps === 0 || step === totalSteps)) {
            const ev = evaluate()!;
            const rec = {step, eval_loss: ev.loss, eval_perplexity: Math.exp(ev.loss), eval_tokens: ev.tokens};
            state.log_history.push({eval_loss: ev.loss, epoch: state.epoch, step});
            await emit({type: "eval", ...rec});
            reporter.onEval?.(rec);
        }
        if (step % saveSteps === 0 || step === totalSteps) {
            const dir = path.join(outputDir, `${CHECKPOINT_PREFIX}${step}`);
            await saveCheckpoint(dir, checkpointParts());
            const removed = await rotateCheckpoints(outputDir, config.save_total_limit);
            await emit({type: "save", step, dir});
            reporter.onSave?.(dir, removed);
        }
    }

    // the final adapter, PEFT's layout, with the tokenizer files beside it
    const finalDir = path.join(outputDir, "final");
    engine.syncToHost();
    await writeDirAtomic(finalDir, async (tmp) => {
        await saveAdapter(tmp, lora);
        await copyTokenizerFiles(config.model, tmp);
    });
    const trainLogs = records.filter((r) => r.type === "train");
    const evalLogs = records.filter((r) => r.type === "eval");
    const evalLoss = evalLogs.length ? Number(evalLogs[evalLogs.length - 1].eval_loss) : null;
    await emit({type: "end", step: state.global_step, final_dir: finalDir, train_loss: lastLoss, eval_loss: evalLoss,
        time: new Date().toISOString()});
    const reportFile = path.join(outputDir, "report.html");
    const first = trainLogs[0], last = trainLogs[trainLogs.length - 1];
    await writeReport(reportFile, `qlora training report: ${path.basename(config.model)}`, {
        model: config.model, dataset: config.dataset, "eval dataset": config.eval_dataset ?? "none",
        steps: state.global_step, trainable: trainableLine,
        "first / last logged loss": first && last ? `${first.loss} / ${last.loss}` : "-",
        "final eval loss": evalLoss === null ? "-" : evalLoss.toFixed(4),
        "final adapter": finalDir,
    }, records);
    return {outputDir, finalDir, globalStep: state.global_step, trainLoss: lastLoss, evalLoss, metricsFile, reportFile};
}
