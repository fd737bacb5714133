// run.ts: how every command reports failure: one line `error: ...` and exit code 1; the stack trace only
// with --debug (or QLORA_DEBUG=1).
import pc from "picocolors";
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
