// lines.ts: a byte stream cut into text lines for JSON Lines readers. Working on bytes rather than with readline
// lets it cap a line's length (a file without newlines is an error, not one giant string that exhausts memory),
// check that each line is UTF-8 (instead of decoding bad bytes to U+FFFD, a silent change of the data) and say
// which line is wrong. A UTF-8 byte order mark at the start and the \r of CRLF line ends are removed.

import {isUtf8} from "node:buffer";
import {QloraError} from "../errors.js";

/** a JSONL record larger than this is no training example; the cap keeps a file without newlines from exhausting memory */
export const MAX_LINE_BYTES = 64 << 20;

export interface TextLine {
    /** the line without its line end */
    text: string;
    /** 1-based */
    line: number;
}

const LF = 0x0a;
const CR = 0x0d;

/**
 * Splits `chunks` into lines, yielding the lines completed by each chunk (batches, so a million short lines do not
 * cost a million promise round trips). Throws a QloraError naming `file` and the line for a line longer than
 * `maxLineBytes`, for bytes that are not UTF-8 and for a UTF-16 file.
 */
export async function* splitLines(
    chunks: AsyncIterable<Buffer>,
    file: string,
    maxLineBytes = MAX_LINE_BYTES
): AsyncGenerator<TextLine[]> {
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    let lineNumber = 0;
    for await (const chunk of chunks) {
        const lines: TextLine[] = [];
        let start = 0;
        for (let newline = chunk.indexOf(LF, start); newline >= 0; newline = chunk.indexOf(LF, start)) {
            let bytes = chunk.subarray(start, newline);
            if (pendingBytes > 0) {
                pending.push(bytes);
                bytes = Buffer.concat(pending, pendingBytes + bytes.length);
                pending = [];
                pendingBytes = 0;
            }
            lineNumber++;
            if (bytes.length > maxLineBytes) throw lineTooLong(file, lineNumber, maxLineBytes);
            lines.push({text: decodeLine(bytes, file, lineNumber), line: lineNumber});
            start = newline + 1;
        }
        if (start < chunk.length) {
            pending.push(chunk.subarray(start));
            pendingBytes += chunk.length - start;
            if (pendingBytes > maxLineBytes) throw lineTooLong(file, lineNumber + 1, maxLineBytes);
        }
        if (lines.length > 0) yield lines;
    }
    if (pendingBytes > 0) {
        lineNumber++;
        yield [{text: decodeLine(Buffer.concat(pending, pendingBytes), file, lineNumber), line: lineNumber}];
    }
}

function lineTooLong(file: string, line: number, maxLineBytes: number): QloraError {
    return new QloraError(
        `the line is longer than ${formatBytes(maxLineBytes)}; JSON Lines files hold one record per line ` +
            "(is this a JSON array or a file without line ends? give it a .json name, or split the records into lines)",
        {file: `${file}:${line}`}
    );
}

function decodeLine(bytes: Buffer, file: string, line: number): string {
    let end = bytes.length;
    if (end > 0 && bytes[end - 1] === CR) end--;
    let start = 0;
    if (line === 1) {
        checkNotUtf16(bytes, file);
        if (end >= 3 && bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) start = 3;
    }
    const text = bytes.subarray(start, end);
    if (!isUtf8(text)) throw notUtf8(file, line, text);
    return text.toString("utf8");
}

/** throws when `bytes` (the start of a file) begin with a UTF-16 byte order mark */
export function checkNotUtf16(bytes: Uint8Array, file: string): void {
    if (bytes.length >= 2 && ((bytes[0] === 0xff && bytes[1] === 0xfe) || (bytes[0] === 0xfe && bytes[1] === 0xff))) {
        throw new QloraError("is UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8", {file});
    }
}

/** a QloraError for text that is not UTF-8, naming the column (in bytes) of the first bad byte */
export function notUtf8(file: string, line: number, bytes: Uint8Array): QloraError {
    const at = firstInvalidUtf8(bytes);
    return new QloraError(
        `the line is not valid UTF-8 (byte 0x${bytes[at].toString(16).padStart(2, "0")} at byte ${at + 1} of the line); ` +
            "save the file as UTF-8",
        {file: `${file}:${line}`}
    );
}

/** the offset of the first byte that does not belong to a valid UTF-8 sequence (bytes.length when all are valid) */
export function firstInvalidUtf8(bytes: Uint8Array): number {
    let i = 0;
    while (i < bytes.length) {
        const b = bytes[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        // the length of the sequence and the range of its second byte (RFC 3629: no overlongs, no surrogates)
        let n: number,
            lo = 0x80,
            hi = 0xbf;
        if (b >= 0xc2 && b <= 0xdf) n = 2;
        else if (b >= 0xe0 && b <= 0xef) {
            n = 3;
            if (b === 0xe0) lo = 0xa0;
            if (b === 0xed) hi = 0x9f;
        } else if (b >= 0xf0 && b <= 0xf4) {
            n = 4;
            if (b === 0xf0) lo = 0x90;
            if (b === 0xf4) hi = 0x8f;
        } else return i;
        if (i + n > bytes.length) return i;
        if (bytes[i + 1] < lo || bytes[i + 1] > hi) return i;
        for (let k = 2; k < n; k++) if (bytes[i + k] < 0x80 || bytes[i + k] > 0xbf) return i;
        i += n;
    }
    return bytes.length;
}

function formatBytes(bytes: number): string {
    return bytes >= 1 << 20 && bytes % (1 << 20) === 0 ? `${bytes / (1 << 20)} MiB` : `${bytes} bytes`;
}
