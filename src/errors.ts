// Errors meant for users: one line that names the file (or key) and says what is wrong and what to do.
// The CLI prints `error: <message>` without a stack trace for these unless --debug is given.

export class QloraError extends Error {
    /** the file (or config key) the problem is in, when there is one */
    readonly file?: string;
    constructor(message: string, options?: {file?: string; cause?: unknown}) {
        // one line by contract: line breaks that arrive inside quoted values or library messages (V8's JSON
        // errors, YAML keys) are folded, so every caller's message prints as one line
        const text = options?.file ? `${options.file}: ${message}` : message;
        super(shortenRuns(text.replace(/\s*[\r\n\u2028\u2029]+\s*/g, " ")), {cause: options?.cause});
        this.name = "QloraError";
        this.file = options?.file;
    }
}

/**
 * A value quoted from a file, for a message: JSON as the user wrote it, cut to `max` characters, and never a
 * throw (JSON.stringify overflows the stack on deeply nested input and throws on bigint).
 */
export function quoteValue(value: unknown, max = 80): string {
    let text: string;
    try {
        text = JSON.stringify(value) ?? String(value);
    } catch {
        text = Array.isArray(value) ? "[…] (nested too deeply to show)" : "{…} (nested too deeply to show)";
    }
    return text.length > max ? `${text.slice(0, max)}… (${text.length} chars)` : text;
}

/** messages quote values from files: an unbroken run of 200+ characters is cut, keeping its start and end (a
 * linear scan: a regex over a run of megabytes overflows V8's stack) */
function shortenRuns(text: string): string {
    let out = "",
        runStart = 0;
    for (let i = 0; i <= text.length; i++) {
        if (i < text.length && !/\s/.test(text[i])) continue;
        const run = text.slice(runStart, i);
        out += run.length >= 200 ? `${run.slice(0, 100)}…(${run.length} chars)…${run.slice(-40)}` : run;
        if (i < text.length) out += text[i];
        runStart = i + 1;
    }
    return out;
}

export function isQloraError(err: unknown): err is QloraError {
    return err instanceof QloraError;
}

/**
 * the key of `known` that `key` was meant to be, for "did you mean" messages: one a few letters apart (a typo), or
 * one written in part ("role" for role_tag, "lora_dropout_rate" for lora_dropout); `partOf` limits the second kind
 */
export function nearestKey(key: string, known: readonly string[], partOf: readonly string[] = known): string | null {
    let best: string | null = null,
        bestDistance = Infinity;
    for (const k of known) {
        const d = editDistance(key, k);
        if (d < bestDistance) [best, bestDistance] = [k, d];
    }
    if (best !== null && bestDistance <= Math.max(1, Math.floor(Math.min(key.length, best.length) / 4))) return best;
    // a suggestion from a part needs most of the letters in common (lora_r is not r)
    return (
        partOf.find(
            (k) => (k.includes(key) && key.length >= 4) || (key.includes(k) && k.length >= 4 && 2 * k.length >= key.length)
        ) ?? null
    );
}

function editDistance(a: string, b: string): number {
    let row = Array.from({length: b.length + 1}, (_, j) => j);
    for (let i = 1; i <= a.length; i++) {
        const next = [i];
        for (let j = 1; j <= b.length; j++)
            next[j] = Math.min(row[j] + 1, next[j - 1] + 1, row[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
        row = next;
    }
    return row[b.length];
}
