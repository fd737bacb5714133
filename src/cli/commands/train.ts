// qlora train [CONFIG.yaml|CONFIG.json] [--key value ...]: QLoRA fine-tuning with the seed recipe's keys.
import path from "node:path";
import type {Command} from "commander";
import cliProgress from "cli-progress";
import {pc} from "../colors.js";
import {DEFAULT_MODEL_DIR, resolveModel} from "../../api/models.js";
import {EXAMPLE_EVAL_DATA, EXAMPLE_TRAIN_DATA, runTraining} from "../../api/train.js";
import {loadTrainConfig, TrainConfigSchema} from "../../api/train-config.js";
import {TrainingInterrupted, type TrainLogRecord} from "../../train/trainer.js";
import {QloraError, quoteValue} from "../../errors.js";
import {failureLine, launchWorkers, takeNprocFlag} from "../../parallel/launch.js";
import {action} from "../run.js";

function formatDuration(s: number): string {
    if (!Number.isFinite(s)) return "?";
    s = Math.round(s);
    const h = Math.floor(s / 3600),
        m = Math.floor((s % 3600) / 60),
        sec = s % 60;
    return h ? `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}` : `${m}:${String(sec).padStart(2, "0")}`;
}

function logLine(r: TrainLogRecord): string {
    return (
        `step ${String(r.step).padStart(String(r.total_steps).length)}/${r.total_steps} | loss ${r.loss.toFixed(4)} | ` +
        `lr ${r.learning_rate.toExponential(2)} | grad_norm ${r.grad_norm.toFixed(3)} | ` +
        `${Math.round(r.tokens_per_second)} tok/s | ${formatDuration(r.elapsed_s)} elapsed, ${formatDuration(r.remaining_s)} left | ` +
        `${r.memory_kind} mem ${(r.memory_bytes / 2 ** 20).toFixed(0)} MiB (peak ${(r.peak_memory_bytes / 2 ** 20).toFixed(0)} MiB)`
    );
}

/** the command line that continues a stopped run: the same arguments, resuming from the latest checkpoint */
function resumeCommand(args: string[]): string {
    const kept: string[] = [];
    for (let i = 0; i < args.length; i++) {
        const a = args[i];
        if (/^--resume[-_]from[-_]checkpoint$/.test(a)) {
            if (args[i + 1] !== undefined && !args[i + 1].startsWith("--")) i++;
            continue;
        }
        if (/^--resume[-_]from[-_]checkpoint=/.test(a)) continue;
        kept.push(a);
    }
    const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`);
    return ["qlora", "train", ...kept, "--resume_from_checkpoint", "true"].map(quote).join(" ");
}

/** the keys, their defaults and descriptions, for --help */
function keysHelp(): string {
    const lines: string[] = [];
    for (const [key, schema] of Object.entries(TrainConfigSchema.shape)) {
        const parsed = (schema as {safeParse(v: unknown): {success: boolean; data?: unknown}}).safeParse(undefined);
        const def = parsed.success ? JSON.stringify(parsed.data) : "";
        const desc = (schema as {description?: string}).description ?? "";
        lines.push(`  --${key.padEnd(28)} ${pc.dim(`default ${def}`)}${desc ? `  ${desc}` : ""}`);
    }
    return lines.join("\n");
}

export function registerTrain(program: Command): void {
    program
        .command("train")
        .description("fine-tune a model with QLoRA (with no arguments: the embedded tiny-qwen2 on the example data)")
        .argument("[args...]", "an optional CONFIG.yaml or CONFIG.json, then --key value pairs")
        .allowUnknownOption(true)
        .helpOption("-h, --help", "show the keys")
        .addHelpText("after", `\nKeys (in the config file, or as --key value; flags override the file):\n${keysHelp()}\n`)
        .action(
            action(async (allArgs: string[]) => {
                // --nproc_per_node N (torchrun's flag): N ranks of this same command, each a process of its own
                const {nproc, rest: args} = takeNprocFlag(allArgs);
                if (nproc !== null && nproc > 1) {
                    const launched = await launchWorkers({
                        nproc,
                        execPath: process.execPath,
                        args: [...process.execArgv, process.argv[1], "train", ...args],
                        onMessage: process.send ? (m) => process.connected && process.send?.(m as object) : undefined
                    });
                    if (launched.failure) throw new QloraError(failureLine(launched.failure));
                    process.exit(launched.exitCode);
                }
                const configFile = args.length > 0 && !args[0].startsWith("--") ? args[0] : null;
                const flags = (configFile ? args.slice(1) : args).filter((a) => a !== "--debug");
                const notices: string[] = [];
                const config = await loadTrainConfig(configFile, flags, notices);
                for (const n of notices) console.error(pc.yellow(`notice: ${n}`));
                const usingExample = config.dataset === null;
                const model = await resolveModel(config.model ?? undefined);
                const resolved = {
                    ...config,
                    model,
                    dataset: config.dataset ?? EXAMPLE_TRAIN_DATA,
                    eval_dataset: config.eval_dataset ?? (usingExample ? EXAMPLE_EVAL_DATA : null)
                };
                const tty = process.stdout.isTTY === true;
                // `qlora ui` runs this command as a child process with an IPC channel: the metrics records and steps
                // go to it as they happen (a UI that went away loses them; the run goes on)
                const toParent = (msg: object) => {
                    if (process.connected) process.send?.(msg, undefined, {}, () => undefined);
                };
                let bar: cliProgress.SingleBar | null = null;
                const print = (line: string) => {
                    if (bar) bar.stop();
                    console.log(line);
                    if (bar) bar = null;
                };
                const run = runTraining(resolved, {
                    onStart(info) {
                        const kv = (k: string, v: string | number) => console.log(`${pc.dim(k.padEnd(14))} ${v}`);
                        console.log(pc.bold("qlora train"));
                        kv("model", `${info.modelDir}${info.modelDir === DEFAULT_MODEL_DIR ? " (embedded)" : ""}`);
                        kv("device", `${info.device} (compute ${info.computeDtype})`);
                        kv("quantization", info.quantization);
                        kv(
                            "data",
                            `${resolved.dataset} (${info.train.stats.format}, ${info.train.stats.rows} rows, ` +
                                `${info.train.stats.tokens} tokens${info.train.stats.truncated ? `, ${info.train.stats.truncated} truncated` : ""}` +
                                `${info.train.stats.dropped ? `, ${info.train.stats.dropped} dropped` : ""})`
                        );
                        if (info.eval) kv("eval data", `${resolved.eval_dataset} (${info.eval.stats.rows} rows)`);
                        kv(
                            "prompt format",
                            info.promptFormat
                                ? `${info.promptFormat} (saved with the adapter as chat_template.jinja: chat and serve use it)`
                                : "none (plain text data; the adapter keeps the base's chat template)"
                        );
                        kv(
                            "steps",
                            `${info.totalSteps} (warmup ${info.warmupSteps}; batch ${resolved.per_device_train_batch_size} x ` +
                                (info.worldSize > 1 ? `${info.worldSize} ranks x ` : "") +
                                `${resolved.gradient_accumulation_steps} accumulation = ${info.effectiveBatch})`
                        );
                        kv("optimizer", `${resolved.optim}, lr ${resolved.learning_rate}, ${resolved.lr_scheduler_type}`);
                        kv("output", path.resolve(resolved.output_dir));
                        if (info.resumedFrom) kv("resumed from", `${info.resumedFrom} (step ${info.startStep})`);
                        for (const c of info.overrides)
                            kv("override", `${c.key}: ${quoteValue(c.saved)} -> ${quoteValue(c.now)} (resume_override)`);
                        console.log(info.trainableLine);
                    },
                    onStep(step, total) {
                        toParent({type: "step", step, total});
                        if (!tty) return;
                        if (!bar) {
                            bar = new cliProgress.SingleBar(
                                {
                                    format: " {bar} {value}/{total} steps | {eta_formatted} left",
                                    hideCursor: true,
                                    clearOnComplete: true
                                },
                                cliProgress.Presets.shades_classic
                            );
                            bar.start(total, step);
                        } else bar.update(step);
                    },
                    onLog: (r) => print(logLine(r)),
                    onRecord: (record) => toParent({type: "record", record}),
                    onEval: (r) =>
                        print(
                            pc.cyan(
                                `eval  step ${r.step} | eval_loss ${r.eval_loss.toFixed(4)} | ` +
                                    `perplexity ${r.eval_perplexity.toFixed(2)} | ${r.eval_tokens} tokens`
                            )
                        ),
                    onSave: (dir, removed) =>
                        print(
                            pc.dim(
                                `save  ${dir}${removed.length ? ` (removed ${removed.map((d) => path.basename(d)).join(", ")})` : ""}`
                            )
                        ),
                    onWarning: (m) => print(pc.yellow(`warning: ${m}`)),
                    // the device line as the other commands print it; a GPU that auto passes over is a warning
                    onDevice: (c) => {
                        if (c.device === "cuda") console.error(pc.dim(c.line));
                        else if (c.gpuSeen) print(pc.yellow(`warning: ${c.line}`));
                    },
                    onStopping: (signal) =>
                        print(
                            pc.yellow(
                                `${signal}: finishing this step and saving a checkpoint ` +
                                    `(${signal === "SIGINT" ? "Ctrl+C again" : "a second SIGTERM"} stops at once)`
                            )
                        )
                });
                let result: Awaited<typeof run>;
                try {
                    result = await run;
                } catch (err) {
                    if (!(err instanceof TrainingInterrupted)) throw err;
                    (bar as cliProgress.SingleBar | null)?.stop();
                    console.error(
                        err.checkpointDir
                            ? `stopped by ${err.signal} after step ${err.step}; saved ${err.checkpointDir}. Resume with: ${resumeCommand(args)}`
                            : `stopped by ${err.signal} before the first step; nothing was trained`
                    );
                    process.exit(err.exitCode);
                }
                (bar as cliProgress.SingleBar | null)?.stop();
                console.log(
                    `${pc.green("done")}: ${result.globalStep} steps, train_loss ${result.trainLoss.toFixed(4)} (mean), ` +
                        `last loss ${result.lastLoss.toFixed(4)}` +
                        (result.evalLoss !== null ? `, eval loss ${result.evalLoss.toFixed(4)}` : "")
                );
                console.log(`adapter  ${result.finalDir}`);
                console.log(`metrics  ${result.metricsFile}`);
                console.log(`report   ${result.reportFile}`);
            })
        );
}
