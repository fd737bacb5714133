// qlora export: write a model (optionally with a PEFT adapter merged in) or an adapter alone as GGUF for
// llama.cpp and everything built on it (node-llama-cpp, ollama, LM Studio).
import path from "node:path";
import type {Command} from "commander";
import {pc} from "../colors.js";
import {QloraError} from "../../errors.js";
import {exportGguf, exportGgufLora, type ExportProgress, type GgufLoraOuttype} from "../../api/export-gguf.js";
import {exportOllama} from "../../api/export-ollama.js";
import {formatBytes} from "../../io/gguf.js";
import {GGUF_OUTTYPES, type GgufOuttype} from "../../io/gguf-quants.js";
import {action} from "../run.js";

interface GgufFlags {
    model?: string;
    adapter?: string;
    outtype: string;
    out: string;
    name?: string;
    preTokenizer?: string;
    overwrite?: boolean;
}

interface OllamaFlags {
    model?: string;
    adapter?: string;
    outtype: string;
    out: string;
    lora?: boolean;
    template?: string;
    overwrite?: boolean;
}

interface GgufLoraFlags {
    adapter: string;
    model?: string;
    outtype: string;
    out: string;
    name?: string;
    overwrite?: boolean;
}

/** one progress line per tensor on a terminal (overwritten in place); nothing in pipes and CI logs */
function progressPrinter(): ((p: ExportProgress) => void) | undefined {
    if (!process.stderr.isTTY) return undefined;
    return (p) => {
        process.stderr.write(`\r\x1b[2K${pc.dim(`[${p.index + 1}/${p.count}]`)} ${p.name} ${pc.dim(p.type)}`);
        if (p.index + 1 === p.count) process.stderr.write("\r\x1b[2K");
    };
}

export function registerExport(program: Command): void {
    const exp = program.command("export").description("export a model or an adapter to another format (GGUF for llama.cpp)");

    exp.command("gguf")
        .description("write a llama.cpp GGUF model (f16, q8_0 or q4_k_m), optionally with a PEFT adapter merged in")
        .requiredOption("-o, --out <file>", "the .gguf file to write")
        .option("-m, --model <dir>", "Hugging Face model folder (default: the embedded tiny-qwen2)")
        .option("-a, --adapter <dir>", "PEFT adapter folder to merge into the weights first (W + alpha/r · B·A, in f32)")
        .option("-t, --outtype <type>", `tensor type: ${GGUF_OUTTYPES.join(", ")}`, "f16")
        .option("--name <text>", "general.name written into the file (default: the model folder's name)")
        .option("--pre-tokenizer <name>", "llama.cpp pre-tokenizer name (tokenizer.ggml.pre) when it is not recognized")
        .option("--overwrite", "replace --out when it is an existing GGUF file")
        .action(
            action(async (flags: GgufFlags) => {
                if (!(GGUF_OUTTYPES as readonly string[]).includes(flags.outtype))
                    throw new QloraError(`--outtype must be one of ${GGUF_OUTTYPES.join(", ")}, got "${flags.outtype}"`);
                const started = Date.now();
                const result = await exportGguf({
                    modelDir: flags.model,
                    adapterDir: flags.adapter,
                    outtype: flags.outtype as GgufOuttype,
                    out: flags.out,
                    name: flags.name,
                    preTokenizer: flags.preTokenizer,
                    overwrite: flags.overwrite,
                    onProgress: progressPrinter()
                });
                const types = Object.entries(result.typeCounts)
                    .map(([t, n]) => `${t} ${n}`)
                    .join(", ");
                console.log(
                    `wrote ${result.file} (${result.arch}, ${flags.outtype}${flags.adapter ? ", adapter merged" : ""}): ` +
                        `${result.tensorCount} tensors [${types}], ${formatBytes(result.bytes)} in ` +
                        `${((Date.now() - started) / 1000).toFixed(1)} s`
                );
                for (const note of result.notes) console.log(`note: ${note}`);
            })
        );

    exp.command("ollama")
        .description("write a folder for `ollama create NAME -f DIR/Modelfile`: the GGUF and a Modelfile that prompts as trained")
        .requiredOption("-o, --out <dir>", "the folder to write (new or empty)")
        .option("-m, --model <dir>", "Hugging Face model folder (default: the embedded tiny-qwen2)")
        .option("-a, --adapter <dir>", "PEFT adapter folder: merged into the GGUF, or kept as a LoRA GGUF with --lora")
        .option("-t, --outtype <type>", `tensor type: ${GGUF_OUTTYPES.join(", ")}`, "q4_k_m")
        .option("--lora", "keep the adapter separate (Modelfile ADAPTER) instead of merging it")
        .option(
            "--template <file|base>",
            "the chat template to translate: a Jinja file, or base (default: the adapter's training format, else the model's)"
        )
        .option("--overwrite", "replace --out when an earlier qlora export ollama wrote it")
        .action(
            action(async (flags: OllamaFlags) => {
                if (!(GGUF_OUTTYPES as readonly string[]).includes(flags.outtype))
                    throw new QloraError(`--outtype must be one of ${GGUF_OUTTYPES.join(", ")}, got "${flags.outtype}"`);
                if (flags.lora && !flags.adapter) throw new QloraError("--lora needs --adapter (the adapter to keep separate)");
                const result = await exportOllama({
                    modelDir: flags.model,
                    adapterDir: flags.adapter,
                    out: flags.out,
                    outtype: flags.outtype as GgufOuttype,
                    lora: flags.lora,
                    template: flags.template,
                    overwrite: flags.overwrite
                });
                console.log(
                    `wrote ${result.dir} (${result.files.join(", ")}); stops ${result.stops.map((s) => JSON.stringify(s)).join(", ")}`
                );
                for (const note of result.notes) console.log(`note: ${note}`);
                console.log(`import it with: ollama create NAME -f ${path.join(result.dir, "Modelfile")}`);
            })
        );

    exp.command("gguf-lora")
        .description("write a PEFT LoRA adapter as a llama.cpp LoRA GGUF, to apply on top of the base model's GGUF")
        .requiredOption("-a, --adapter <dir>", "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
        .requiredOption("-o, --out <file>", "the .gguf file to write")
        .option("-m, --model <dir>", "the base model folder the adapter was trained on (default: the embedded tiny-qwen2)")
        .option("-t, --outtype <type>", "tensor type: f32 or f16", "f32")
        .option("--name <text>", "general.name written into the file (default: the adapter folder's name)")
        .option("--overwrite", "replace --out when it is an existing GGUF file")
        .action(
            action(async (flags: GgufLoraFlags) => {
                if (flags.outtype !== "f32" && flags.outtype !== "f16")
                    throw new QloraError(`--outtype must be f32 or f16 for a LoRA adapter, got "${flags.outtype}"`);
                const result = await exportGgufLora({
                    adapterDir: flags.adapter,
                    modelDir: flags.model,
                    out: flags.out,
                    outtype: flags.outtype as GgufLoraOuttype,
                    name: flags.name,
                    overwrite: flags.overwrite,
                    onProgress: progressPrinter()
                });
                console.log(
                    `wrote ${result.file} (${result.arch} LoRA, r ${result.r}, alpha ${result.alpha}): ` +
                        `${result.tensorCount} tensors, ${formatBytes(result.bytes)}`
                );
            })
        );
}
