// readers.ts: dataset files to plain records. JSON arrays, JSONL (streamed, optionally gzipped), Parquet
// (hyparquet, all codecs through hyparquet-compressors) and folders of those. Every record keeps where it came
// from (file, and line for JSONL) so later errors can say "file:LINE: record N: …".

import {createReadStream, promises as fs} from "node:fs";
import path from "node:path";
import readline from "node:readline";
import {createGunzip} from "node:zlib";
import {asyncBufferFromFile, parquetReadObjects} from "hyparquet";
import {compressors} from "hyparquet-compressors";
import {QloraError} from "../errors.js";

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
 */
export async function readRecords(pathOrDir: string, options: ReadOptions = {}): Promise<ReadResult> {
    let stat;
    try {
        stat = await fs.stat(pathOrDir);
    } catch (err) {
        throw new QloraError("no such file or folder; give a .json, .jsonl or .parquet file or a folder of them", {file: pathOrDir, cause: err});
    }
    const files = stat.isDirectory() ? await findSplitFiles(pathOrDir, options.split ?? "train") : [pathOrDir];
    const result: ReadResult = {records: [], format: fileFormatOf(files[0]), sources: []};
    for (const file of files) {
        const start = result.records.length;
        const format = fileFormatOf(file);
        let lines: number[] | null = null;
        if (format === "parquet") {
            for (const record of await readParquet(file)) result.records.push(record);
        } else {
            const read = format === "jsonl" ? await readJsonl(file) : await readJson(file);
            for (const record of read.records) result.records.push(record);
            lines = read.lines;
        }
        result.sources.push({file, format: lines ? "jsonl" : format, start, count: result.records.length - start, lines});
    }
    if (result.records.length === 0) {
        throw new QloraError(
            "the dataset is empty (no records); check the file, or the split read from the folder",
            {file: files.length === 1 ? files[0] : pathOrDir}
        );
    }
    result.format = result.sources[0].format;
    return result;
}

/** where record `index` of a read came from */
export function locateRecord(read: Pick<ReadResult, "sources">, index: number): RecordLocation | null {
    for (const source of read.sources) {
        if (index >= source.start && index < source.start + source.count) {
            const indexInFile = index - source.start;
            return source.lines ? {file: source.file, line: source.lines[indexInFile], indexInFile} : {file: source.file, indexInFile};
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
        "dataset.to_json(\"train.jsonl\") or dataset.to_parquet(\"train.parquet\") and give that file",
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
    let entries;
    try {
        entries = await fs.readdir(dir, {withFileTypes: true});
    } catch {
        return {files: [], dirs: []};
    }
    const files = entries.filter((e) => e.isFile() && isDataFile(e.name)).map((e) => e.name).sort();
    const dirs = entries.filter((e) => e.isDirectory()).map((e) => e.name).sort();
    return {files, dirs};
}

async function findSplitFiles(dir: string, split: string): Promise<string[]> {
    const names = SPLIT_ALIASES[split.toLowerCase()] ?? [split];
    for (const base of [dir, path.join(dir, "data")]) {
        const {files, dirs} = await listDir(base);
        for (const name of names) {
            // train.jsonl, then train.json, then train.parquet…: one file of the split
            const exact = DATA_EXTENSIONS.map((ext) => files.find((f) => f.toLowerCase() === name + ext)).find((f) => f !== undefined);
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

async function readText(file: string): Promise<string> {
    try {
        if (file.toLowerCase().endsWith(".gz")) {
            const chunks: Buffer[] = [];
            for await (const chunk of createReadStream(file).pipe(createGunzip())) chunks.push(chunk as Buffer);
            return Buffer.concat(chunks).toString("utf8");
        }
        return await fs.readFile(file, "utf8");
    } catch (err) {
        throw new QloraError(`cannot read the file: ${(err as Error).message}`, {file, cause: err});
    }
}

/** 1-based line and column of a character offset */
export function lineColumnAt(text: string, offset: number): {line: number; column: number} {
    let line = 1;
    let lineStart = 0;
    const end = Math.min(offset, text.length);
    for (let i = 0; i < end; i++) {
        if (text.charCodeAt(i) === 10) {
            line++;
            lineStart = i + 1;
        }
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

// "… in JSON at position 37 (line 4 column 3)" → "… at column 3": the line is in the file name already
function cleanJsonMessage(message: string, text: string): string {
    return message
        .replace(/\s*\(line \d+ column \d+\)/, "")
        .replace(/ in JSON at position (\d+)/, (_, position: string) => ` at column ${lineColumnAt(text, Number(position)).column}`);
}

async function readJson(file: string): Promise<{records: DataRecord[]; lines: number[] | null}> {
    const text = stripBom(await readText(file));
    let value: unknown;
    try {
        value = JSON.parse(text);
    } catch (err) {
        // JSON Lines saved as .json (a common mix-up): more than one top-level value, each on its own line
        if (/^\s*\{/.test(text) && looksLikeJsonLines(text)) return parseJsonLines(text, file);
        const message = (err as Error).message;
        const line = jsonErrorLine(message, text);
        throw new QloraError(
            `invalid JSON (${cleanJsonMessage(message, text)}); the file should hold a JSON array of records`,
            {file: line !== null ? `${file}:${line}` : file, cause: err}
        );
    }
    if (!Array.isArray(value)) {
        if (value === null || typeof value !== "object") {
            throw new QloraError(`holds ${describeJsonValue(value)}; it should hold a JSON array of records (objects), or use JSON Lines in a .jsonl file`, {file});
        }
        const object = value as DataRecord;
        // {"data": [...]}, {"train": [...]}: one array-valued key holding the records; anything else is one record
        const arrays = Object.entries(object).filter(([, v]) => Array.isArray(v));
        const isRecord = RECORD_KEYS.some((key) => key in object);
        value = !isRecord && arrays.length === 1 ? arrays[0][1] : [object];
    }
    const records = value as unknown[];
    for (let i = 0; i < records.length; i++) {
        if (records[i] === null || typeof records[i] !== "object" || Array.isArray(records[i])) {
            throw new QloraError(`record ${i} is ${describeJsonValue(records[i])}, not an object; every record must be a JSON object`, {file});
        }
    }
    return {records: records as DataRecord[], lines: null};
}

function looksLikeJsonLines(text: string): boolean {
    const lines = text.split("\n").filter((l) => l.trim() !== "");
    if (lines.length < 2) return false;
    try {
        JSON.parse(lines[0]);
        return true;
    } catch {
        return false;
    }
}

function parseJsonLines(text: string, file: string): {records: DataRecord[]; lines: number[]} {
    const records: DataRecord[] = [];
    const lines: number[] = [];
    const all = text.split("\n");
    for (let i = 0; i < all.length; i++) {
        const record = parseJsonLine(all[i], file, i + 1);
        if (record) {
            records.push(record);
            lines.push(i + 1);
        }
    }
    return {records, lines};
}

function parseJsonLine(raw: string, file: string, lineNumber: number): DataRecord | null {
    const line = lineNumber === 1 ? stripBom(raw) : raw;
    if (line.trim() === "") return null;
    let value: unknown;
    try {
        value = JSON.parse(line);
    } catch (err) {
        throw new QloraError(`invalid JSON (${cleanJsonMessage((err as Error).message, line)}); each line must be one JSON object`, {file: `${file}:${lineNumber}`, cause: err});
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
        throw new QloraError(`the line holds ${describeJsonValue(value)}, not a JSON object; each line must be one record object`, {file: `${file}:${lineNumber}`});
    }
    return value as DataRecord;
}

/** Streams a JSONL file (gzipped when it ends in .gz) with readline; blank lines are skipped. */
export async function readJsonl(file: string): Promise<{records: DataRecord[]; lines: number[]}> {
    const records: DataRecord[] = [];
    const lines: number[] = [];
    let input: NodeJS.ReadableStream;
    try {
        await fs.access(file);
        const stream = createReadStream(file);
        input = file.toLowerCase().endsWith(".gz") ? stream.pipe(createGunzip()) : stream;
    } catch (err) {
        throw new QloraError(`cannot read the file: ${(err as Error).message}`, {file, cause: err});
    }
    const reader = readline.createInterface({input, crlfDelay: Infinity});
    let lineNumber = 0;
    try {
        for await (const line of reader) {
            lineNumber++;
            const record = parseJsonLine(line, file, lineNumber);
            if (record) {
                records.push(record);
                lines.push(lineNumber);
            }
        }
    } catch (err) {
        if (err instanceof QloraError) throw err;
        throw new QloraError(`cannot read the file: ${(err as Error).message}`, {file, cause: err});
    } finally {
        reader.close();
    }
    return {records, lines};
}

/** Reads every row of a Parquet file as an object; int64 values become numbers (bigint when beyond 2^53). */
export async function readParquet(file: string): Promise<DataRecord[]> {
    let rows: Record<string, unknown>[];
    try {
        const buffer = await asyncBufferFromFile(file);
        rows = await parquetReadObjects({file: buffer, compressors});
    } catch (err) {
        throw new QloraError(`cannot read it as Parquet: ${(err as Error).message}`, {file, cause: err});
    }
    return rows.map((row) => normalizeParquetValue(row) as DataRecord);
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

function stripBom(text: string): string {
    return text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
}

export function describeJsonValue(value: unknown): string {
    if (value === null) return "null";
    if (Array.isArray(value)) return "an array";
    if (typeof value === "string") return `a string (${JSON.stringify(value.length > 40 ? value.slice(0, 40) + "…" : value)})`;
    return typeof value === "object" ? "an object" : `a ${typeof value}`;
}
