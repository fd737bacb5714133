// tar.ts: the regular files of a .tar or .tar.gz archive (POSIX ustar, GNU and pax headers), read whole into
// memory under a size cap. Entry names that are absolute or climb out of the archive (`..`) are refused: nothing
// here writes to disk, but a name like that is never a file of a data set. Links and devices are skipped.
import {gunzipSync} from "node:zlib";
import {QloraError} from "../errors.js";
import {readRegularFile} from "./files.js";

export interface TarEntry {
    /** the path inside the archive, "/"-separated, without a leading "./" */
    name: string;
    data: Buffer;
}

/** archives (compressed and uncompressed) larger than this are refused unless the caller allows more */
export const DEFAULT_MAX_TAR_BYTES = 1 << 30;

const BLOCK = 512;

/** reads `file` (gzipped or not) and returns its regular files in archive order */
export async function readTarArchive(file: string, opts: {maxBytes?: number} = {}): Promise<TarEntry[]> {
    const maxBytes = opts.maxBytes ?? DEFAULT_MAX_TAR_BYTES;
    let bytes = await readRegularFile(file, {what: "archive", maxBytes});
    if (bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b) {
        try {
            bytes = gunzipSync(bytes, {maxOutputLength: maxBytes});
        } catch (err) {
            const code = (err as NodeJS.ErrnoException).code;
            if (code === "ERR_BUFFER_TOO_LARGE" || err instanceof RangeError)
                throw new QloraError(`decompresses to more than ${maxBytes} bytes; is this the right file?`, {file, cause: err});
            throw new QloraError(`is not a valid gzip file (${(err as Error).message})`, {file, cause: err});
        }
    }
    return parseTar(bytes, file);
}

/** the text of a NUL-terminated header field */
function field(header: Buffer, start: number, length: number): string {
    const raw = header.subarray(start, start + length);
    const end = raw.indexOf(0);
    return raw.subarray(0, end < 0 ? raw.length : end).toString("utf8");
}

function octal(header: Buffer, start: number, length: number, what: string, file: string): number {
    const text = field(header, start, length).trim();
    if (text === "") return 0;
    if (!/^[0-7]+$/.test(text)) throw new QloraError(`is not a tar archive, or is corrupt (bad ${what} "${text}")`, {file});
    return parseInt(text, 8);
}

/** "len key=value\n" records of a pax extended header */
function paxRecords(data: Buffer): Map<string, string> {
    const out = new Map<string, string>();
    let at = 0;
    while (at < data.length) {
        const space = data.indexOf(0x20, at);
        const len = space < 0 ? NaN : Number(data.subarray(at, space).toString("ascii"));
        if (!Number.isInteger(len) || len <= 0 || at + len > data.length) break;
        const record = data.subarray(space + 1, at + len - 1).toString("utf8");
        const eq = record.indexOf("=");
        if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
        at += len;
    }
    return out;
}

/** refuses names that are absolute or leave the archive's root; returns the name without "./" segments */
function safeName(name: string, file: string): string {
    const parts = name.split("/").filter((p) => p !== "" && p !== ".");
    if (name.startsWith("/") || /^[A-Za-z]:/.test(name) || name.includes("\\") || parts.includes(".."))
        throw new QloraError(`holds an entry named ${JSON.stringify(name)}, which points outside the archive; refusing it`, {
            file
        });
    return parts.join("/");
}

/** the regular files of an uncompressed tar archive held in memory (`file` names it in messages) */
export function parseTar(bytes: Buffer, file: string): TarEntry[] {
    const entries: TarEntry[] = [];
    let longName: string | null = null;
    let paxPath: string | null = null;
    let offset = 0;
    while (offset + BLOCK <= bytes.length) {
        const header = bytes.subarray(offset, offset + BLOCK);
        if (header.every((b) => b === 0)) return entries; // the end-of-archive blocks
        // the checksum sums the header with its own field read as spaces
        let sum = 0;
        for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : header[i];
        if (sum !== octal(header, 148, 8, "checksum", file))
            throw new QloraError(`is not a tar archive, or is corrupt (header checksum mismatch at byte ${offset})`, {file});
        const size = octal(header, 124, 12, "size", file);
        const type = String.fromCharCode(header[156] || 0x30);
        const dataStart = offset + BLOCK;
        if (dataStart + size > bytes.length)
            throw new QloraError(`is truncated (an entry of ${size} bytes runs past the end at byte ${offset})`, {file});
        const data = bytes.subarray(dataStart, dataStart + size);
        offset = dataStart + Math.ceil(size / BLOCK) * BLOCK;
        if (type === "L") {
            longName = field(data, 0, data.length); // GNU: the next entry's long name
            continue;
        }
        if (type === "x") {
            paxPath = paxRecords(data).get("path") ?? null;
            continue;
        }
        if (type === "K" || type === "g") continue; // a long link target, global pax settings: nothing to keep
        // only POSIX ustar puts the first part of a long name in the prefix field (GNU uses it for times)
        const ustar = header.subarray(257, 263).toString("latin1") === "ustar\0";
        const prefix = ustar ? field(header, 345, 155) : "";
        const headerName = prefix ? `${prefix}/${field(header, 0, 100)}` : field(header, 0, 100);
        const name = safeName(paxPath ?? longName ?? headerName, file);
        longName = paxPath = null;
        // "0" and NUL: regular files ("7": contiguous files, read the same); directories, links, devices and global
        // pax headers carry no file of their own
        if (type === "0" || type === "7") entries.push({name, data});
    }
    if (entries.length === 0 && bytes.length > 0 && offset === 0)
        throw new QloraError("is not a tar archive (shorter than one header)", {file});
    return entries;
}
