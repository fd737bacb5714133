// run.ts: how every command reports failure: one line `error: ...` and exit code 1; the stack trace only
// with --debug (or QLORA_DEBUG=1).
import type {Command} from "commander";
import pc from "picocolors";
import {DEFAULT_SAMPLING} from "../model/generate.js";
import {isQloraError, QloraError} from "../errors.js";

export function debugEnabled(): boolean {
    return process.argv.includes("--debug") || process.env.QLORA_DEBUG === "1";
}

export function reportError(err: unknown): never {
    const debug = debugEnabled();
    if (debug && err instanceof Error && err.stack) console.error(err.stack);
    else {
        const message = err instanceof Error ? err.message : String(err);
        const hint = isQloraError(err) ? "" : pc.dim(" (an internal error: run again with --debug for the stack trace)");
        console.error(`${pc.red("error:")} ${message.split("\n")[0]}${hint}`);
    }
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

/** the model options every command that runs a model shares: --model, --adapter, --load-in-4bit */
export function addModelOptions(cmd: Command, adapterHelp = "a PEFT adapter folder to apply (e.g. qlora_output/final)"): Command {
    return cmd
        .option("-m, --model <dir>", "Hugging Face model folder (default: the embedded tiny-qwen2)")
        .option("-a, --adapter <dir>", adapterHelp)
        .option("--load-in-4bit", "quantize the base to NF4 as QLoRA trained it");
}

/** the decoding options of generate and chat: --greedy, --temperature, --top-k, --top-p */
export function addSamplingOptions(cmd: Command): Command {
    return cmd
        .option("--greedy", "greedy decoding (argmax) instead of sampling")
        .option("--temperature <t>", "sampling temperature", parseFloatOption("--temperature"), DEFAULT_SAMPLING.temperature)
        .option("--top-k <k>", "sample from the k most likely tokens (0: all)", parseIntOption("--top-k", 0), DEFAULT_SAMPLING.topK)
        .option("--top-p <p>", "nucleus sampling mass", parseFloatOption("--top-p"), DEFAULT_SAMPLING.topP);
}
