// run.ts: how every command reports failure: one line `error: ...` and exit code 1; the stack trace only
// with --debug (or QLORA_DEBUG=1).
import type {Command} from "commander";
import {pc} from "./colors.js";
import {DEFAULT_SAMPLING, type SamplingOptions} from "../model/generate.js";
import {isQloraError, QloraError, quoteValue} from "../errors.js";
import {loadModel, type LoadedModel} from "../api/models.js";

export function debugEnabled(): boolean {
    return process.argv.includes("--debug") || process.env.QLORA_DEBUG === "1";
}

/**
 * Text from files (tensor names, JSON strings, template output) can hold ESC sequences, carriage returns,
 * backspaces or bidi overrides that would rewrite the user's terminal: every message is printed with those
 * escaped (\xNN, \u{NNNN}) and on one line.
 */
export function escapeForTerminal(text: string): string {
    return text.replace(/[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, (c) => {
        if (c === "\n") return "\\n";
        if (c === "\r") return "\\r";
        if (c === "\t") return "\\t";
        const code = c.codePointAt(0)!;
        return code < 0x100 ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u{${code.toString(16)}}`;
    });
}

/** what the operating system's error codes mean for a user, with what to do */
const SYSTEM_ERRORS: Record<string, string> = {
    ENOENT: "no such file or folder",
    EACCES: "permission denied",
    EPERM: "operation not permitted",
    ENOSPC: "the disk is full; free some space or write to another disk",
    EDQUOT: "the disk quota is exceeded; free some space or write to another disk",
    EROFS: "the file system is read-only; write somewhere else",
    EISDIR: "expected a file, found a folder",
    ENOTDIR: "a part of the path is not a folder",
    ENAMETOOLONG: "the path is too long",
    ELOOP: "too many levels of symbolic links",
    EMFILE: "too many open files; raise the limit (ulimit -n)",
    ENFILE: "too many open files in the system",
    EIO: "an input/output error (a failing disk or network file system?)",
    EFBIG: "the file is larger than the file system or ulimit -f allows",
    ENOMEM: "out of memory"
};

/**
 * The one line a failure prints. QloraErrors are written for users already. An operating-system error is
 * named by its path and meaning; out-of-memory errors of V8 say so. Anything else is a bug in qlora: its
 * message is kept and the user is pointed at --debug.
 */
export function errorLine(err: unknown): string {
    if (isQloraError(err)) return escapeForTerminal(err.message);
    const e = err as NodeJS.ErrnoException | undefined;
    if (e && typeof e === "object" && typeof e.code === "string" && SYSTEM_ERRORS[e.code]) {
        const where = e.path ? `${e.path}: ` : "";
        return escapeForTerminal(`${where}${SYSTEM_ERRORS[e.code]} (${e.code}${e.syscall ? ` in ${e.syscall}` : ""})`);
    }
    const message = err instanceof Error ? err.message : String(err);
    if (
        err instanceof RangeError &&
        /Array buffer allocation failed|Invalid (typed )?array length|Invalid string length/.test(message)
    )
        return escapeForTerminal(`out of memory: ${message}; the input is larger than this machine can hold, or corrupt`);
    return escapeForTerminal(message) + pc.dim(" (an internal error: run again with --debug for the stack trace)");
}

export function reportError(err: unknown): never {
    if (debugEnabled() && err instanceof Error && err.stack) console.error(err.stack);
    else console.error(`${pc.red("error:")} ${errorLine(err)}`);
    process.exit(1);
}

/** wraps a command's action so that every failure goes through reportError */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void>): (...args: A) => Promise<void> {
    return async (...args: A) => {
        try {
            await fn(...args);
        } catch (err) {
            reportError(err);
        }
    };
}

export function parseIntOption(name: string, min: number): (value: string) => number {
    return (value: string) => {
        const n = Number(value);
        if (!Number.isInteger(n) || n < min) reportError(new QloraError(`${name} expects an integer >= ${min}, got "${value}"`));
        return n;
    };
}

export function parseFloatOption(name: string): (value: string) => number {
    return (value: string) => {
        const n = Number(value);
        if (!Number.isFinite(n)) reportError(new QloraError(`${name} expects a number, got "${value}"`));
        return n;
    };
}

/** the model options every command that runs a model shares: --model, --adapter, --load-in-4bit, --device */
export function addModelOptions(cmd: Command, adapterHelp = "a PEFT adapter folder to apply (e.g. qlora_output/final)"): Command {
    return cmd
        .option("-m, --model <dir>", "Hugging Face model folder (default: the embedded tiny-qwen2)")
        .option("-a, --adapter <dir>", adapterHelp)
        .option("--load-in-4bit", "quantize the base to NF4 as QLoRA trained it")
        .option("--device <device>", "auto (default: the GPU when one is usable), cuda, or cpu", parseDevice, "auto")
        .option(
            "--template <file|base>",
            "the chat template: a Jinja file, or base for the model's own (default: the adapter's training format when it has one)"
        );
}

/** --device's value: auto, cpu or cuda (anything else: a one-line error) */
export function parseDevice(value: string): "auto" | "cpu" | "cuda" {
    if (value === "auto" || value === "cpu" || value === "cuda") return value;
    return reportError(new QloraError(`--device expects auto, cpu or cuda, got ${quoteValue(value)}`));
}

export interface ModelFlags {
    model?: string;
    adapter?: string;
    loadIn4bit?: boolean;
    device?: "auto" | "cpu" | "cuda";
    template?: string;
}

/** loads what the model options name, and says on stderr which device runs it when that is worth telling */
export async function loadModelFromFlags(flags: ModelFlags): Promise<LoadedModel> {
    const loaded = await loadModel(flags.model, {
        adapter: flags.adapter,
        loadIn4bit: flags.loadIn4bit,
        device: flags.device,
        template: flags.template
    });
    if (loaded.deviceNote) console.error(pc.dim(escapeForTerminal(loaded.deviceNote)));
    return loaded;
}

/** the flags addSamplingOptions adds */
export interface SamplingFlags {
    greedy?: boolean;
    temperature: number;
    topK: number;
    topP: number;
    repetitionPenalty: number;
}

/** the sampling settings of those flags (generate()'s options) */
export function samplingOf(flags: SamplingFlags): Omit<SamplingOptions, "seed"> {
    return {
        greedy: flags.greedy ?? false,
        temperature: flags.temperature,
        topK: flags.topK,
        topP: flags.topP,
        repetitionPenalty: flags.repetitionPenalty
    };
}

/** the decoding options of generate and chat: --greedy, --temperature, --top-k, --top-p, --repetition-penalty */
export function addSamplingOptions(cmd: Command): Command {
    return cmd
        .option("--greedy", "greedy decoding (argmax) instead of sampling")
        .option("--temperature <t>", "sampling temperature", parseFloatOption("--temperature"), DEFAULT_SAMPLING.temperature)
        .option(
            "--top-k <k>",
            "sample from the k most likely tokens (0: all)",
            parseIntOption("--top-k", 0),
            DEFAULT_SAMPLING.topK
        )
        .option("--top-p <p>", "nucleus sampling mass", parseFloatOption("--top-p"), DEFAULT_SAMPLING.topP)
        .option(
            "--repetition-penalty <x>",
            "divide the logits of tokens already in the prompt or the output by x (transformers' repetition_penalty; 1: off)",
            parseFloatOption("--repetition-penalty"),
            DEFAULT_SAMPLING.repetitionPenalty
        );
}
