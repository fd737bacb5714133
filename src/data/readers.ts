// readers.ts: dataset files to plain records. JSON arrays, JSONL (streamed line by line, optionally gzipped),
// Parquet (hyparquet, all codecs through hyparquet-compressors, one row group at a time) and folders of those.
// streamRecords yields records in batches as they are read, so a large dataset is never held as text, records and
// tokens at once; readRecords collects them. Every record keeps where it came from (file, and line for JSONL) so
// later errors can say "file:LINE: record N: …". Files are opened through io/files.ts: a FIFO or a device given as
// a dataset is refused instead of blocking forever.

import {constants as bufferConstants, isUtf8} from "node:buffer";
import {promises as fs, type Dirent, type Stats} from "node:fs";
import path from "node:path";
import {createGunzip} from "node:zlib";
import {QloraError} from "../errors.js";
import {openRegularFile} from "../io/files.js";
import {checkNotUtf16, firstInvalidUtf8, notUtf8, splitLines} from "./lines.js";
import {decodeParquetIsolated} from "./parquet.js";

/** one dataset record as read from the file (a JSON object, a Parquet row) */
export type DataRecord = Record<string, unknown>;

export type FileFormat = "json" | "jsonl" | "parquet";

/** a run of consecutive records that came from one file */
export interface RecordSource {
    file: string;
    format: FileFormat;
    /** index of the source's first record in `records` */
    start: number;
    count: number;
    /** JSONL only: the 1-based line of each of the source's records */
    lines: number[] | null;
}

export interface ReadResult {
    records: DataRecord[];
    /** file format of the first file read */
    format: FileFormat;
    sources: RecordSource[];
}

/** records read one after the other from one file */
export interface RecordBatch {
    file: string;
    /** "jsonl" for a .json file that holds JSON Lines */
    format: FileFormat;
    records: DataRecord[];
    /** JSONL only: the 1-based line of each record */
    lines: number[] | null;
    /** the index in its file of records[0] */
    start: number;
}

export interface RecordLocation {
    file: string;
    /** 1-based line in a JSONL file */
    line?: number;
    /** 0-based index of the record inside its file */
    indexInFile: number;
}

export interface ReadOptions {
    /**
     * which split to read from a folder: "train" (default), "valid" (also found as validation/val/dev/eval) or
     * "test"; ignored for a file
     */
    split?: string;
}

// file names tried, per split, in a dataset folder (mlx-lm's train/valid/test.jsonl layout and HF hub layouts)
const SPLIT_ALIASES: Record<string, string[]> = {
    train: ["train"],
    valid: ["valid", "validation", "val", "dev", "eval"],
    validation: ["validation", "valid", "val", "dev", "eval"],
    eval: ["eval", "valid", "validation", "val", "dev"],
    test: ["test"]
};
const DATA_EXTENSIONS = [".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz"];
// keys that make a top-level JSON object one record rather than a wrapper around the record list
const RECORD_KEYS = ["messages", "conversations", "prompt", "completion", "instruction", "text", "input_ids"];
// metadata files of HF save_to_disk / hub folders, never data
const NON_DATA_FILES = new Set(["dataset_info.json", "state.json", "dataset_dict.json", "dataset_infos.json"]);

// records per batch of a JSON array (JSONL batches are the lines of one read chunk, Parquet ones a row group)
const JSON_BATCH = 4096;
// a JSON array is parsed whole, as one string: V8 strings stop at this many characters (UTF-8 has at least one
// byte a character, so a file of at most this many bytes always fits)
const MAX_JSON_BYTES = bufferConstants.MAX_STRING_LENGTH;
const READ_CHUNK_BYTES = 1 << 20;

/**
 * Reads a dataset file or folder into records.
 *
 * - `*.json`: a JSON array of objects (or an object holding one such array, e.g. `{"data": [...]}`); a `.json` file
 *   that holds one object per line is read as JSONL.
 * - `*.jsonl` (and `*.jsonl.gz`): one object per line, streamed; blank lines are skipped.
 * - `*.parquet`: every row as an object (int64 values become numbers).
 * - a folder: the files of one split (`options.split`, default "train"): `train.jsonl` / `train.json` /
 *   `train.parquet`, else `train-*.{parquet,jsonl,json}` or `train/*` (also under `data/`, the HF hub layout);
 *   for "train" only, a folder without split names is read whole (all data files, sorted by name). The other
 *   splits of the `{train,valid,test}` layout are read with `split: "valid"` / `"test"`.
 *
 * Throws a QloraError naming the file (and line) for unreadable or malformed data and for an empty dataset.
 * Holds every record; streamRecords reads the same data a batch at a time.
 */
export async function readRecords(pathOrDir: string, options: ReadOptions = {}): Promise<ReadResult> {
    const records: DataRecord[] = [];
    const sources: RecordSource[] = [];
    for await (const batch of streamRecords(pathOrDir, options)) {
        let source = sources[sources.length - 1];
        if (!source || source.file !== batch.file) {
            source = {file: batch.file, format: batch.format, start: records.length, count: 0, lines: batch.lines ? [] : null};
            sources.push(source);
        }
        // a loop, not push(...batch.records): a spread of a large array overflows the call stack
        for (const record of batch.records) records.push(record);
        if (source.lines && batch.lines) for (const line of batch.lines) source.lines.push(line);
        source.count += batch.records.length;
    }
    return {records, format: sources[0].format, sources};
}

/**
 * The records of a dataset file or folder (see readRecords for what is read), yielded in batches as they are read:
 * a JSONL file is never held whole, a JSON array's parsed records are released batch by batch, a Parquet file is
 * read one row group at a time. Throws the QloraErrors readRecords throws, an empty dataset included (at the end).
 */
export async function* streamRecords(pathOrDir: string, options: ReadOptions = {}): AsyncGenerator<RecordBatch> {
    let stat: Stats;
    try {
        stat = await fs.stat(pathOrDir);
    } catch (err) {
        throw new QloraError("no such file or folder; give a .json, .jsonl or .parquet file or a folder of them", {
            file: pathOrDir,
            cause: err
        });
    }
    const files = stat.isDirectory() ? await findSplitFiles(pathOrDir, options.split ?? "train") : [pathOrDir];
    let count = 0;
    for (const file of files) {
        const format = fileFormatOf(file);
        const batches = format === "parquet" ? parquetBatches(file) : format === "jsonl" ? jsonlBatches(file) : jsonBatches(file);
        for await (const batch of batches) {
            count += batch.records.length;
            yield batch;
        }
    }
    if (count === 0) {
        throw new QloraError("the dataset is empty (no records); check the file, or the split read from the folder", {
            file: files.length === 1 ? files[0] : pathOrDir
        });
    }
}

/** where record `index` of a read came from */
export function locateRecord(read: Pick<ReadResult, "sources">, index: number): RecordLocation | null {
    for (const source of read.sources) {
        if (index >= source.start && index < source.start + source.count) {
            const indexInFile = index - source.start;
            return source.lines
                ? {file: source.file, line: source.lines[indexInFile], indexInFile}
                : {file: source.file, indexInFile};
        }
    }
    return null;
}

function fileFormatOf(file: string): FileFormat {
    const name = file.toLowerCase();
    if (name.endsWith(".parquet")) return "parquet";
    if (name.endsWith(".jsonl") || name.endsWith(".jsonl.gz") || name.endsWith(".ndjson")) return "jsonl";
    if (name.endsWith(".json") || name.endsWith(".json.gz")) return "json";
    if (name.endsWith(".arrow")) throw arrowError(file);
    throw new QloraError("is not a dataset file qlora reads; use .json, .jsonl (.jsonl.gz) or .parquet", {file});
}

function arrowError(file: string): QloraError {
    return new QloraError(
        "Arrow files (datasets' save_to_disk format) are not read; export the split with " +
            'dataset.to_json("train.jsonl") or dataset.to_parquet("train.parquet") and give that file',
        {file}
    );
}

function isDataFile(name: string): boolean {
    const lower = name.toLowerCase();
    return DATA_EXTENSIONS.some((ext) => lower.endsWith(ext)) && !NON_DATA_FILES.has(lower);
}

function stripDataExtension(name: string): string {
    const lower = name.toLowerCase();
    const ext = DATA_EXTENSIONS.filter((e) => lower.endsWith(e)).sort((a, b) => b.length - a.length)[0];
    return ext ? name.slice(0, name.length - ext.length) : name;
}

async function listDir(dir: string): Promise<{files: string[]; dirs: string[]}> {
    let entries: Dirent[];
    try {
        entries = await fs.readdir(dir, {withFileTypes: true});
    } catch {
        return {files: [], dirs: []};
    }
    const files: string[] = [];
    const dirs: string[] = [];
    for (const entry of entries) {
        let isFile = entry.isFile();
        let isDir = entry.isDirectory();
        // links are followed: the Hugging Face cache stores every file of a snapshot as a link into blobs/
        if (entry.isSymbolicLink()) {
            const target = await fs.stat(path.join(dir, entry.name)).catch(() => null);
            isFile = target?.isFile() ?? false;
            isDir = target?.isDirectory() ?? false;
        }
        if (isFile && isDataFile(entry.name)) files.push(entry.name);
        else if (isDir) dirs.push(entry.name);
    }
    return {files: files.sort(), dirs: dirs.sort()};
}

async function findSplitFiles(dir: string, split: string): Promise<string[]> {
    const names = SPLIT_ALIASES[split.toLowerCase()] ?? [split];
    for (const base of [dir, path.join(dir, "data")]) {
        const {files, dirs} = await listDir(base);
        for (const name of names) {
            // train.jsonl, then train.json, then train.parquet…: one file of the split
            const exact = DATA_EXTENSIONS.map((ext) => files.find((f) => f.toLowerCase() === name + ext)).find(
                (f) => f !== undefined
            );
            if (exact) return [path.join(base, exact)];
            // shards: train-00000-of-00002.parquet, train_0.jsonl
            const shards = files.filter((f) => new RegExp(`^${escapeRegExp(name)}[-_.]`, "i").test(stripDataExtension(f) + "."));
            if (shards.length > 0) return shards.map((f) => path.join(base, f));
            // a folder per split
            const splitDir = dirs.find((d) => d.toLowerCase() === name);
            if (splitDir) {
                const inner = await listDir(path.join(base, splitDir));
                if (inner.files.length > 0) return inner.files.map((f) => path.join(base, splitDir, f));
            }
        }
    }
    if (split.toLowerCase() === "train") {
        // a folder without split names: all its data files, unless they are named for other splits
        const otherSplit = /^(valid|validation|val|dev|eval|test)([-_.]|$)/i;
        for (const base of [dir, path.join(dir, "data")]) {
            const {files} = await listDir(base);
            const all = files.filter((f) => !otherSplit.test(stripDataExtension(f)));
            if (all.length > 0) return all.map((f) => path.join(base, f));
        }
    }
    const {files} = await listDir(dir);
    if (files.length === 0 && (await hasArrowFiles(dir))) throw arrowError(dir);
    throw new QloraError(
        `has no "${split}" split: looked for ${names[0]}.jsonl, ${names[0]}.json, ${names[0]}.parquet, ${names[0]}-*.parquet ` +
            `and a ${names[0]}/ folder (also under data/)` +
            (files.length > 0 ? `; found ${files.slice(0, 5).join(", ")}` : "; found no .json, .jsonl or .parquet files"),
        {file: dir}
    );
}

async function hasArrowFiles(dir: string): Promise<boolean> {
    try {
        return (await fs.readdir(dir)).some((f) => f.endsWith(".arrow"));
    } catch {
        return false;
    }
}

function isGzip(file: string): boolean {
    return file.toLowerCase().endsWith(".gz");
}

/** the bytes of a dataset file (decompressed when it ends in .gz), a chunk at a time */
async function* fileChunks(file: string): AsyncGenerator<Buffer> {
    const {handle} = await openRegularFile(file, "dataset file");
    const raw = handle.createReadStream({highWaterMark: READ_CHUNK_BYTES});
    const gzip = isGzip(file);
    const stream = gzip ? raw.pipe(createGunzip()) : raw;
    if (gzip) raw.on("error", (err) => stream.destroy(err)); // pipe() does not pass on the source's errors
    try {
        for await (const chunk of stream) yield chunk as Buffer;
    } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ?? "";
        if (gzip && code.startsWith("Z_"))
            throw new QloraError(`is not valid gzip data (${(err as Error).message}); is the file complete?`, {file, cause: err});
        throw new QloraError(`cannot read the file (${code || (err as Error).message})`, {file, cause: err});
    } finally {
        // also closes the file handle
        stream.destroy();
        raw.destroy();
    }
}

/** a whole JSON file as text, refusing one that cannot be one string and bytes that are not UTF-8 */
async function readJsonText(file: string): Promise<string> {
    const tooLarge = (what: string): QloraError =>
        new QloraError(
            `${what} more than ${MAX_JSON_BYTES} bytes, the most a JSON array can have: it is parsed whole; convert it to ` +
                "JSON Lines (a .jsonl file, one record per line), which is read line by line",
            {file}
        );
    let bytes: Buffer;
    if (isGzip(file)) {
        const chunks: Buffer[] = [];
        let total = 0;
        for await (const chunk of fileChunks(file)) {
            total += chunk.length;
            if (total > MAX_JSON_BYTES) throw tooLarge("decompresses to");
            chunks.push(chunk);
        }
        bytes = Buffer.concat(chunks, total);
    } else {
        const {handle, size} = await openRegularFile(file, "dataset file");
        try {
            if (size > MAX_JSON_BYTES) throw tooLarge(`is ${size} bytes,`);
            bytes = await handle.readFile();
        } catch (err) {
            if (err instanceof QloraError) throw err;
            throw new QloraError(`cannot read the file (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, {
                file,
                cause: err
            });
        } finally {
            await handle.close().catch(() => undefined);
        }
        if (bytes.length > MAX_JSON_BYTES) throw tooLarge(`is ${bytes.length} bytes,`);
    }
    checkNotUtf16(bytes, file);
    if (!isUtf8(bytes)) {
        // name the line of the first bad byte
        const at = firstInvalidUtf8(bytes);
        const lineStart = at === 0 ? 0 : bytes.lastIndexOf(0x0a, at - 1) + 1;
        const lineEnd = bytes.indexOf(0x0a, at);
        let line = 1;
        for (let i = bytes.indexOf(0x0a); i >= 0 && i < at; i = bytes.indexOf(0x0a, i + 1)) line++;
        throw notUtf8(file, line, bytes.subarray(lineStart, lineEnd < 0 ? bytes.length : lineEnd));
    }
    const bom = bytes.length >= 3 && bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf;
    return bytes.toString("utf8", bom ? 3 : 0);
}

/** 1-based line and column of a character offset */
export function lineColumnAt(text: string, offset: number): {line: number; column: number} {
    let line = 1;
    let lineStart = 0;
    const end = Math.min(offset, text.length);
    for (let i = text.indexOf("\n"); i >= 0 && i < end; i = text.indexOf("\n", i + 1)) {
        line++;
        lineStart = i + 1;
    }
    return {line, column: end - lineStart + 1};
}

// V8's JSON.parse messages carry "at position N" (and, in newer versions, "(line L column C)")
function jsonErrorLine(message: string, text: string): number | null {
    const withLine = /line (\d+) column \d+/.exec(message);
    if (withLine) return Number(withLine[1]);
    const position = /at position (\d+)/.exec(message);
    if (position) return lineColumnAt(text, Number(position[1])).line;
    if (/Unexpected end of JSON input/.test(message)) return lineColumnAt(text, text.length).line;
    return null;
}

// "… in JSON at position 37 (line 4 column 3)" → "… at column 3": the line is in the file name already; V8 quotes
// the text around the error, whose line ends would break the one-line message
function cleanJsonMessage(message: string, text: string): string {
    return message
        .replace(/\r?\n|\r/g, "\\n")
        .replace(/\s*\(line \d+ column \d+\)/, "")
        .replace(
            / in JSON at position (\d+)/,
            (_, position: string) => ` at column ${lineColumnAt(text, Number(position)).column}`
        );
}

/**
 * JSON.parse, with its failures other than a syntax error as QloraErrors (V8 throws RangeError on input nested
 * beyond its limits); a SyntaxError is returned for the caller to describe
 */
function parseJson(text: string, where: string): {value: unknown} | {syntaxError: SyntaxError} {
    try {
        return {value: JSON.parse(text)};
    } catch (err) {
        if (err instanceof SyntaxError) return {syntaxError: err};
        throw new QloraError(
            `cannot be parsed as JSON (${(err as Error).message}): it nests too deeply or is too large; records are ` +
                "objects of strings and lists of messages",
            {file: where, cause: err}
        );
    }
}

async function* jsonBatches(file: string): AsyncGenerator<RecordBatch> {
    let text: string | null = await readJsonText(file);
    const parsed = parseJson(text, file);
    if ("syntaxError" in parsed) {
        // JSON Lines saved as .json (a common mix-up): more than one top-level value, each on its own line
        if (/^\s*\{/.test(text) && looksLikeJsonLines(text)) {
            text = null;
            yield* jsonlBatches(file);
            return;
        }
        const message = parsed.syntaxError.message;
        const line = jsonErrorLine(message, text);
        throw new QloraError(`invalid JSON (${cleanJsonMessage(message, text)}); the file should hold a JSON array of records`, {
            file: line !== null ? `${file}:${line}` : file,
            cause: parsed.syntaxError
        });
    }
    text = null; // the parsed records are all that is needed now
    let value = parsed.value;
    if (!Array.isArray(value)) {
        if (value === null || typeof value !== "object") {
            throw new QloraError(
                `holds ${describeJsonValue(value)}; it should hold a JSON array of records (objects), or use JSON Lines in a .jsonl file`,
                {file}
            );
        }
        const object = value as DataRecord;
        // {"data": [...]}, {"train": [...]}: one array-valued key holding the records; anything else is one record
        const arrays = Object.entries(object).filter(([, v]) => Array.isArray(v));
        const isRecord = RECORD_KEYS.some((key) => key in object);
        value = !isRecord && arrays.length === 1 ? arrays[0][1] : [object];
    }
    const records = value as unknown[];
    value = null;
    // checked before any record is used: a bad record late in the file fails at once, not after tokenizing the rest
    for (let i = 0; i < records.length; i++) {
        if (records[i] === null || typeof records[i] !== "object" || Array.isArray(records[i])) {
            throw new QloraError(
                `record ${i} is ${describeJsonValue(records[i])}, not an object; every record must be a JSON object`,
                {file}
            );
        }
    }
    for (let start = 0; start < records.length; start += JSON_BATCH) {
        const end = Math.min(records.length, start + JSON_BATCH);
        yield {file, format: "json", records: records.slice(start, end) as DataRecord[], lines: null, start};
        records.fill(null, start, end); // let the records already used be collected
    }
}

function looksLikeJsonLines(text: string): boolean {
    const firstEnd = text.indexOf("\n");
    if (firstEnd < 0 || !/\S/.test(text.slice(firstEnd + 1, firstEnd + 4096))) return false;
    return !("syntaxError" in safeParse(text.slice(0, firstEnd)));
}

function safeParse(text: string): {value: unknown} | {syntaxError: unknown} {
    try {
        return {value: JSON.parse(text)};
    } catch (err) {
        return {syntaxError: err};
    }
}

function parseJsonLine(line: string, file: string, lineNumber: number): DataRecord | null {
    if (isBlank(line)) return null;
    const where = `${file}:${lineNumber}`;
    const parsed = parseJson(line, where);
    if ("syntaxError" in parsed) {
        // a file with CR-only line ends (old Mac) arrives as one line
        const hint = line.includes("\r") ? " (the file has CR line ends: save it with LF or CRLF line ends)" : "";
        throw new QloraError(
            `invalid JSON (${cleanJsonMessage(parsed.syntaxError.message, line)}); each line must be one JSON object${hint}`,
            {file: where, cause: parsed.syntaxError}
        );
    }
    const value = parsed.value;
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
        throw new QloraError(
            `the line holds ${describeJsonValue(value)}, not a JSON object; each line must be one record object`,
            {file: where}
        );
    }
    return value as DataRecord;
}

function isBlank(line: string): boolean {
    return line.length === 0 || /^\s*$/.test(line);
}

async function* jsonlBatches(file: string): AsyncGenerator<RecordBatch> {
    let start = 0;
    for await (const lines of splitLines(fileChunks(file), file)) {
        const records: DataRecord[] = [];
        const numbers: number[] = [];
        for (const {text, line} of lines) {
            const record = parseJsonLine(text, file, line);
            if (record) {
                records.push(record);
                numbers.push(line);
            }
        }
        if (records.length === 0) continue;
        yield {file, format: "jsonl", records, lines: numbers, start};
        start += records.length;
    }
}

/** Reads a JSONL file (gzipped when it ends in .gz) line by line; blank lines are skipped. */
export async function readJsonl(file: string): Promise<{records: DataRecord[]; lines: number[]}> {
    const records: DataRecord[] = [];
    const lines: number[] = [];
    for await (const batch of jsonlBatches(file)) {
        for (const record of batch.records) records.push(record);
        for (const line of batch.lines!) lines.push(line);
    }
    return {records, lines};
}

/**
 * Parquet is decoded in a child process (data/parquet-child.ts): hyparquet trusts run lengths in damaged pages
 * and can grow an array past V8's limit, which aborts the whole process (a fatal error no try/catch sees). In a
 * child that abort, an out-of-memory or a hang is one clean error naming the file; the records come back over
 * IPC one row group at a time.
 */
async function* parquetBatches(file: string): AsyncGenerator<RecordBatch> {
    for await (const {start, rows} of decodeParquetIsolated(file))
        if (rows.length > 0)
            yield {
                file,
                format: "parquet",
                records: rows.map((row) => normalizeParquetValue(row) as DataRecord),
                lines: null,
                start
            };
}

/** Reads every row of a Parquet file as an object; int64 values become numbers (bigint when beyond 2^53). */
export async function readParquet(file: string): Promise<DataRecord[]> {
    const records: DataRecord[] = [];
    for await (const batch of parquetBatches(file)) for (const record of batch.records) records.push(record);
    return records;
}

function normalizeParquetValue(value: unknown): unknown {
    if (typeof value === "bigint") {
        return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
    }
    if (Array.isArray(value)) return value.map(normalizeParquetValue);
    if (value !== null && typeof value === "object" && !(value instanceof Uint8Array) && !(value instanceof Date)) {
        const out: Record<string, unknown> = {};
        for (const [k, v] of Object.entries(value)) out[k] = normalizeParquetValue(v);
        return out;
    }
    return value;
}

function escapeRegExp(text: string): string {
    return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

export function describeJsonValue(value: unknown): string {
    if (value === null) return "null";
    if (Array.isArray(value)) return "an array";
    if (typeof value === "string") return `a string (${JSON.stringify(value.length > 40 ? value.slice(0, 40) + "…" : value)})`;
    if (value instanceof Uint8Array) return "binary data";
    if (value instanceof Date) return "a date";
    return typeof value === "object" ? "an object" : `a ${typeof value}`;
}
