// Errors meant for users: one line that names the file (or key) and says what is wrong and what to do.
// The CLI prints `error: <message>` without a stack trace for these unless --debug is given.

export class QloraError extends Error {
    /** the file (or config key) the problem is in, when there is one */
    readonly file?: string;
    constructor(message: string, options?: {file?: string; cause?: unknown}) {
        // one line by contract: line breaks that arrive inside quoted values or library messages (V8's JSON
        // errors, YAML keys) are folded, so every caller's message prints as one line
        const text = options?.file ? `${options.file}: ${message}` : message;
        super(text.replace(/\s*[\r\n\u2028\u2029]+\s*/g, " "), {cause: options?.cause});
        this.name = "QloraError";
        this.file = options?.file;
    }
}

export function isQloraError(err: unknown): err is QloraError {
    return err instanceof QloraError;
}
