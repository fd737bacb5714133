// parquet.ts: Parquet records, one row group at a time, decoded by hyparquet in a child process.
//
// hyparquet trusts the run lengths of damaged pages (an RLE run is written past the end of its output array),
// and an array grown past V8's limit aborts the process with a fatal error that no try/catch sees. So the
// decoding runs in a child (parquet-child.ts) with its own heap limit: a crash, an out-of-memory or a hang there
// becomes one QloraError naming the file, and the caller's process lives on. The footer checks run in the child
// too, before any page is decoded.
import {fork} from "node:child_process";
import type {FileHandle} from "node:fs/promises";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {parquetMetadataAsync, parquetReadObjects, parquetSchema} from "hyparquet";
import type {AsyncBuffer, FileMetaData, SchemaTree} from "hyparquet";
import {compressors} from "hyparquet-compressors";
import {QloraError} from "../errors.js";
import {openRegularFile} from "../io/files.js";

export interface ParquetRowGroup {
    /** the index of the group's first row in the file */
    start: number;
    rows: Record<string, unknown>[];
}

/**
 * the child's heap. A damaged run length makes hyparquet grow an array towards V8's 134M-element limit (about
 * 1 GiB); this stops it a little earlier, as an out-of-memory. Row groups of SFT text data decode to far less
 * (a row group of 100k rows of 2 KB is about 400 MB as JS strings); a larger one gets a message that says so.
 */
const CHILD_HEAP_MB = 1024;
/** no row group takes this long to decode on any machine: a child silent for longer is stuck */
const CHILD_SILENCE_MS = 10 * 60_000;

/** hyparquet's view of an open file: positioned reads of the byte ranges it asks for */
function fileAsyncBuffer(handle: FileHandle, size: number): AsyncBuffer {
    return {
        byteLength: size,
        async slice(start: number, end = size): Promise<ArrayBuffer> {
            const out = new Uint8Array(Math.max(0, end - start));
            let done = 0;
            while (done < out.length) {
                const {bytesRead} = await handle.read(out, done, out.length - done, start + done);
                if (bytesRead === 0) throw new Error(`the file ends before byte ${end} (is it truncated?)`);
                done += bytesRead;
            }
            return out.buffer;
        }
    };
}

/** decodes in this process: only the child calls it (see the header comment) */
export async function* decodeParquetInProcess(file: string): AsyncGenerator<ParquetRowGroup> {
    const {handle, size} = await openRegularFile(file, "dataset file");
    try {
        const buffer = fileAsyncBuffer(handle, size);
        let metadata: FileMetaData;
        try {
            metadata = await parquetMetadataAsync(buffer);
        } catch (err) {
            throw new QloraError(`cannot read it as Parquet: ${(err as Error).message}`, {file, cause: err});
        }
        // schema[0] is the root; the columns follow it
        if (metadata.schema.length <= 1) throw new QloraError("the Parquet file has no columns", {file});
        checkParquetColumns(metadata, file);
        let rowStart = 0;
        for (let group = 0; group < metadata.row_groups.length; group++) {
            const expected = Number(metadata.row_groups[group].num_rows);
            const rowEnd = rowStart + expected;
            let rows: Record<string, unknown>[];
            const rowsName = `records ${rowStart}–${rowEnd - 1} (row group ${group})`;
            try {
                rows = await parquetReadObjects({file: buffer, metadata, rowStart, rowEnd, compressors});
            } catch (err) {
                throw new QloraError(`cannot read ${rowsName} as Parquet: ${(err as Error).message}`, {file, cause: err});
            }
            if (rows.length !== expected) {
                throw new QloraError(
                    `${rowsName}: read ${rows.length} rows where the footer says ${expected}; the file is damaged`,
                    {file}
                );
            }
            yield {start: rowStart, rows};
            rowStart = rowEnd;
        }
    } finally {
        await handle.close().catch(() => undefined);
    }
}

/**
 * Every column chunk of every row group must name a column of the schema. hyparquet finds out only while it is
 * already reading the other columns, and the reads it started then fail as unhandled promise rejections, which
 * end the process.
 */
function checkParquetColumns(metadata: FileMetaData, file: string): void {
    let schema: SchemaTree;
    try {
        schema = parquetSchema(metadata);
    } catch (err) {
        throw new QloraError(`cannot read it as Parquet: its schema is damaged (${(err as Error).message})`, {file, cause: err});
    }
    let total = 0;
    metadata.row_groups.forEach((group, index) => {
        const rows = Number(group.num_rows);
        if (!Number.isSafeInteger(rows) || rows < 0)
            throw new QloraError(
                `cannot read it as Parquet: row group ${index} says it holds ${group.num_rows} rows; the file is damaged`,
                {file}
            );
        total += rows;
        for (const chunk of group.columns) {
            const names = chunk.meta_data?.path_in_schema;
            let node: SchemaTree | undefined = schema;
            for (const name of names ?? []) node = node?.children.find((child) => child.element.name === name);
            if (!names || !node || chunk.file_path) {
                const what = !names
                    ? "a column without metadata"
                    : chunk.file_path
                      ? `column data in another file (${chunk.file_path})`
                      : `a column "${names.join(".")}" its schema does not have`;
                throw new QloraError(
                    `cannot read it as Parquet: row group ${index} holds ${what}; the file is damaged or not supported`,
                    {file}
                );
            }
            // a flat column (no repeated level) holds one value, or null, per row: the counts must agree before
            // anything is allocated from them
            const repeated = node.element.repetition_type === "REPEATED" || names.length > 1;
            const values = Number(chunk.meta_data!.num_values);
            if (!repeated && values !== rows)
                throw new QloraError(
                    `cannot read it as Parquet: row group ${index} says it holds ${rows} rows but its column ` +
                        `"${names.join(".")}" holds ${values} values; the file is damaged`,
                    {file}
                );
        }
    });
    if (total !== Number(metadata.num_rows))
        throw new QloraError(
            `cannot read it as Parquet: the footer says ${metadata.num_rows} rows but its row groups hold ${total}; ` +
                "the file is damaged",
            {file}
        );
}

/** what the child sends: a row group, the end, or the one-line error of a QloraError it threw */
export type ParquetChildMessage =
    | {kind: "group"; group: ParquetRowGroup}
    | {kind: "done"}
    | {kind: "error"; message: string; user: boolean};

/** the child entry beside this module, run the way this module runs (compiled .js, or .ts under tsx) */
function childEntry(): string {
    const self = fileURLToPath(import.meta.url);
    return path.join(path.dirname(self), `parquet-child${path.extname(self)}`);
}

/** the loader flags of this process (tsx in development), without test-runner or inspector flags */
function loaderArgs(): string[] {
    const out: string[] = [];
    const argv = process.execArgv;
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === "--import" || a === "--loader" || a === "--experimental-loader" || a === "--require" || a === "-r") {
            if (i + 1 < argv.length) out.push(a, argv[++i]);
        } else if (/^--(import|loader|experimental-loader|require)=/.test(a)) out.push(a);
    }
    return out;
}

/** decodes `file` in a child process; yields its row groups in order */
export async function* decodeParquetIsolated(file: string): AsyncGenerator<ParquetRowGroup> {
    const child = fork(childEntry(), [file], {
        execArgv: [...loaderArgs(), `--max-old-space-size=${CHILD_HEAP_MB}`],
        serialization: "advanced", // bigint, Uint8Array and Date survive the trip
        stdio: ["ignore", "ignore", "pipe", "ipc"]
    });
    let stderr = "";
    child.stderr?.on("data", (chunk: Buffer) => {
        if (stderr.length < 4096) stderr += chunk.toString("utf8");
    });
    const queue: ParquetChildMessage[] = [];
    let exited: {code: number | null; signal: NodeJS.Signals | null} | null = null;
    let spawnError: Error | null = null;
    let wake: (() => void) | null = null;
    const notify = () => {
        wake?.();
        wake = null;
    };
    child.on("message", (m) => {
        queue.push(m as ParquetChildMessage);
        notify();
    });
    child.on("exit", (code, signal) => {
        exited = {code, signal};
        notify();
    });
    child.on("error", (err) => {
        spawnError = err;
        notify();
    });
    let rowsSoFar = 0;
    try {
        for (;;) {
            while (queue.length === 0 && !exited && !spawnError) {
                let timer: NodeJS.Timeout | undefined;
                const silent = await new Promise<boolean>((resolve) => {
                    wake = () => resolve(false);
                    timer = setTimeout(() => resolve(true), CHILD_SILENCE_MS);
                });
                clearTimeout(timer);
                if (silent)
                    throw new QloraError(
                        `cannot read it as Parquet: decoding the rows after record ${rowsSoFar} ` +
                            `made no progress in ${CHILD_SILENCE_MS / 60_000} minutes; the file is damaged`,
                        {file}
                    );
            }
            const m = queue.shift();
            if (m?.kind === "group") {
                rowsSoFar = m.group.start + m.group.rows.length;
                yield m.group;
            } else if (m?.kind === "done") return;
            else if (m?.kind === "error") {
                throw new QloraError(m.user ? m.message : `cannot read it as Parquet: ${m.message}`, m.user ? undefined : {file});
            } else if (spawnError) {
                throw new QloraError(`cannot start the Parquet decoder (${(spawnError as Error).message})`, {file});
            } else {
                const how = exited!.signal ? `was killed by ${exited!.signal}` : `exited with code ${exited!.code}`;
                const oom = /heap out of memory|invalid size error|Allocation failed/i.test(stderr);
                throw new QloraError(
                    `cannot read it as Parquet: the decoder ${oom ? "ran out of memory" : "crashed"} on the ` +
                        `rows after record ${rowsSoFar} (it ${how}); the file is damaged, or a row group is larger than ` +
                        `${CHILD_HEAP_MB} MiB decoded`,
                    {file}
                );
            }
        }
    } finally {
        if (!exited) child.kill("SIGKILL");
    }
}
