// qlora plan [CONFIG] [--model DIR|HUB_ID|ARCH] [--gpu NAME | --gpu-memory GiB] [--write-config FILE] [--json]
// [--key value ...]: the GPU memory and speed of a training run before anything is loaded, term by term.
import type {Command} from "commander";
import {pc} from "../colors.js";
import {GRID_BATCHES, GRID_SEQS, planTraining, writeRecipe, type TrainingPlan} from "../../api/plan.js";
import {GPUS} from "../../api/plan-gpus.js";
import {KNOWN_ARCHITECTURES} from "../../api/plan-architectures.js";
import {loadTrainConfig, parseFlags, readConfigFile} from "../../train/config.js";
import {GiB, isStaticTerm} from "../../train/plan-memory.js";
import {QloraError} from "../../errors.js";
import {action, escapeForTerminal} from "../run.js";

interface PlanFlags {
    gpu?: string;
    gpuMemory?: string;
    writeConfig?: string;
    json?: boolean;
}

const gib = (b: number) => (b / GiB).toFixed(2);

function settingsLine(p: TrainingPlan): string {
    const s = p.settings;
    const method = p.model.preQuantized
        ? "QLoRA (pre-quantized 4-bit checkpoint)"
        : s.load_in_4bit
          ? `QLoRA (${s.bnb_4bit_quant_type}${s.bnb_4bit_use_double_quant ? " + double quant" : ""})`
          : "LoRA (bf16 base)";
    const ckpt = s.gradient_checkpointing
        ? `gradient checkpointing${s.gradient_checkpointing_offload ? " with offload" : ""}`
        : "no gradient checkpointing";
    return (
        `${method}, r ${s.r} on ${p.memory.loraModules} projections, batch ${s.per_device_train_batch_size} x ` +
        `${s.max_seq_length} tokens (x ${s.gradient_accumulation_steps} accumulation), ${ckpt}, ${s.optim}`
    );
}

function printPlan(p: TrainingPlan): void {
    const m = p.memory,
        c = p.model.config;
    const row = (label: string, bytes: number, style = (t: string) => t) =>
        console.log(style(`  ${label.padEnd(66)} ${gib(bytes).padStart(8)}`));
    console.log(pc.bold(`qlora plan: ${escapeForTerminal(p.model.source)}`));
    console.log(
        `model     ${c.modelType}, ${(p.model.parameters / 1e9).toFixed(2)} B parameters, ${c.numHiddenLayers} layers, ` +
            `hidden ${c.hiddenSize}, vocabulary ${c.vocabSize}` +
            (p.model.weights
                ? `; checkpoint ${gib(p.model.weights.bytes)} GiB (${Object.keys(p.model.weights.dtypes).join(", ")})`
                : "")
    );
    console.log(`settings  ${settingsLine(p)}`);
    for (const n of p.notes) console.log(pc.yellow(`note      ${n}`));
    if (p.device === "cpu") {
        printHost(p);
        return;
    }
    console.log(`\nGPU memory, term by term (at the allocator's peak: ${m.peakPhase})${" ".repeat(4)}GiB`);
    let staticSum = 0;
    for (const t of m.terms.filter((t) => isStaticTerm(t.term))) {
        row(t.label, t.bytes);
        staticSum += t.bytes;
    }
    row("weights, trainable tensors and optimizer", staticSum, pc.dim);
    let actSum = 0;
    for (const t of m.terms.filter((t) => !isStaticTerm(t.term))) {
        row(t.label, t.bytes);
        actSum += t.bytes;
    }
    row("activations and temporaries of the step", actSum, pc.dim);
    row("caching allocator rounding (2 MiB size classes)", m.roundingBytes);
    row("peak allocated (what cudaMemoryStats().peakAllocated reports)", m.peakBytes, pc.bold);
    if (m.pagedOptimizerBytes > 0) row("paged optimizer states (managed memory, outside the allocator)", m.pagedOptimizerBytes);
    row("CUDA context (approx., outside the allocator)", m.contextBytes);
    row("total the GPU must have free", m.totalBytes, pc.bold);

    if (p.gpu && p.verdict) {
        const color = p.verdict === "fits" ? pc.green : p.verdict === "does not fit" ? pc.red : pc.yellow;
        console.log(
            `\n${color(p.verdict)} on ${escapeForTerminal(p.gpu.label)}: ${gib(m.totalBytes)} of ${gib(p.gpu.availableBytes)} GiB`
        );
        for (const sug of p.suggestions) console.log(`  fits with ${sug.change} (${gib(sug.totalBytes)} GiB)`);
        if (p.verdict === "does not fit" && p.suggestions.length === 0)
            console.log("  no single change fits it: a GPU with more memory, or a smaller model");
        if (p.largest)
            console.log(
                `largest that fits: ${p.largest.batch === null ? "no batch" : `batch ${p.largest.batch}`} at max_seq_length ` +
                    `${p.settings.max_seq_length}; ${p.largest.seq === null ? "no length" : `max_seq_length ${p.largest.seq}`} at batch 1`
            );
    }
    if (p.speed)
        console.log(
            `speed     about ${Math.round(p.speed.tokensPerSecond).toLocaleString("en-US")} tokens/s on ${p.speed.gpu} ` +
                pc.dim(`(${p.speed.basis})`)
        );
    printHost(p);
    printGrid(p);
    if (!p.gpu) printGpuTable(p);
    if (p.recipe && p.gpu) {
        const r = p.recipe;
        console.log(
            `\nrecipe for ${escapeForTerminal(p.gpu.label)} (${gib(r.totalBytes)} GiB` +
                (r.tokensPerSecond ? `, about ${Math.round(r.tokensPerSecond).toLocaleString("en-US")} tokens/s` : "") +
                `; --write-config FILE saves it):`
        );
        for (const [k, v] of Object.entries(r.settings)) console.log(`  ${k}: ${v}`);
        if (r.changes.length > 0) console.log(pc.dim(`  (changed: ${r.changes.join(", ")})`));
    }
}

function printHost(p: TrainingPlan): void {
    const h = p.host;
    console.log(`\nhost RAM ${p.device === "cpu" ? "of training on the CPU" : "while training on the GPU"}${" ".repeat(34)}GiB`);
    for (const t of h.terms) console.log(`  ${t.label.padEnd(66)} ${gib(t.bytes).padStart(8)}`);
    console.log(pc.bold(`  ${"total".padEnd(66)} ${gib(h.bytes).padStart(8)}`));
    console.log(pc.dim(`  ${h.note}; this machine has ${gib(p.hostRam.totalBytes)} GiB (${gib(p.hostRam.freeBytes)} GiB free)`));
}

function printGrid(p: TrainingPlan): void {
    const where = p.gpu ? `x: does not fit ${escapeForTerminal(p.gpu.label)}` : "no GPU given: sizes only";
    console.log(`\nGPU memory (GiB) by batch (rows) and max_seq_length (columns); ${where}`);
    console.log(`  ${"batch".padEnd(7)}${GRID_SEQS.map((s) => String(s).padStart(9)).join("")}`);
    for (const b of GRID_BATCHES) {
        const cells = GRID_SEQS.map((seq) => {
            const c = p.grid.find((g) => g.batch === b && g.seq === seq)!;
            const text = `${(c.totalBytes / GiB).toFixed(1)}${c.fits === false ? "x" : " "}`;
            return (c.fits === false ? pc.red : c.fits ? pc.green : (t: string) => t)(text.padStart(9));
        });
        console.log(`  ${String(b).padEnd(7)}${cells.join("")}`);
    }
}

function printGpuTable(p: TrainingPlan): void {
    console.log(
        `\n${"GPU".padEnd(22)}${"memory GiB".padStart(11)}  fits  largest batch at max_seq_length ${p.settings.max_seq_length}`
    );
    for (const g of p.gpus)
        console.log(
            `${g.label.padEnd(22)}${gib(g.memoryBytes).padStart(11)}  ${(g.fits ? pc.green("yes") : pc.red("no ")).padEnd(4)}  ` +
                `${g.largestBatch ?? "-"}`
        );
}

/** the plan as JSON: the model config without the whole file */
function planJson(p: TrainingPlan): unknown {
    const {raw: _raw, ...config} = p.model.config;
    return {...p, model: {...p.model, config}};
}

export function registerPlan(program: Command): void {
    program
        .command("plan")
        .description("will it fit? the GPU memory (term by term) and speed of a training run, before anything is loaded")
        .argument("[args...]", "an optional CONFIG.yaml, then the training keys as --key value (as qlora train takes them)")
        .option("--gpu <name>", `a GPU to check against: ${GPUS.map((g) => g.name).join(", ")}`)
        .option("--gpu-memory <GiB>", "or the GPU's memory in GiB (default: this machine's GPU, when it has one)")
        .option("--write-config <file>", "write a train config that fits the GPU (never replaces a file)")
        .option("--json", "print the plan as JSON")
        .allowUnknownOption(true)
        .addHelpText(
            "after",
            `\n--model takes a folder, a Hub id or a built-in architecture: ${Object.keys(KNOWN_ARCHITECTURES).join(", ")}.\n` +
                "The training keys are qlora train's (qlora train --help lists them).\n"
        )
        .action(
            action(async (args: string[], flags: PlanFlags) => {
                const configFile = args.length > 0 && !args[0].startsWith("--") ? args[0] : null;
                const keyFlags = (configFile ? args.slice(1) : args).filter((a) => a !== "--debug");
                const notices: string[] = [];
                await loadTrainConfig(configFile, keyFlags, notices); // errors name the file or the flag
                for (const n of notices) console.error(pc.yellow(`notice: ${n}`));
                const given = {...(configFile ? await readConfigFile(configFile) : {}), ...parseFlags(keyFlags)};
                let gpuMemoryGiB: number | undefined;
                if (flags.gpuMemory !== undefined) {
                    gpuMemoryGiB = Number(flags.gpuMemory.replace(/\s*gi?b$/i, ""));
                    if (!Number.isFinite(gpuMemoryGiB))
                        throw new QloraError(`--gpu-memory expects a size in GiB such as 24, got "${flags.gpuMemory}"`);
                }
                const plan = await planTraining({config: given, gpu: flags.gpu, gpuMemoryGiB});
                if (flags.writeConfig) await writeRecipe(plan, flags.writeConfig, given);
                if (flags.json) console.log(JSON.stringify(planJson(plan), null, 2));
                else printPlan(plan);
                if (flags.writeConfig && !flags.json) console.log(`\nwrote ${flags.writeConfig}`);
            })
        );
}
