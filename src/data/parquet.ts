// parquet.ts: Parquet records, one row group at a time, decoded by hyparquet in a child process.
//
// hyparquet trusts the run lengths of damaged pages (an RLE run is written past the end of its output array),
// and an array grown past V8's limit aborts the process with a fatal error that no try/catch sees. So the
// decoding runs in a child (parquet-child.ts) with its own heap limit: a crash, an out-of-memory or a hang there
// becomes one QloraError naming the file, and the caller's process lives on. The footer checks run in the child
// too, before any page is decoded, and so do the page-size checks: a column chunk or page whose declared size
// cannot be real is refused with its row group and column named before hyparquet allocates from that size.
import {fork} from "node:child_process";
import type {FileHandle} from "node:fs/promises";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {parquetMetadataAsync, parquetReadObjects, parquetSchema} from "hyparquet";
import type {AsyncBuffer, ColumnMetaData, CompressionCodec, FileMetaData, PageHeader, SchemaTree} from "hyparquet";
import {parquetHeader} from "hyparquet/src/column.js";
import {getTreePath, isFlatColumn} from "hyparquet/src/schema.js";
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
            // checked before the buffer is allocated: a damaged offset must not cost its size in memory
            if (end > size) throw new Error(`the file ends before byte ${end} (is it truncated?)`);
            if (!(start >= 0 && start <= end)) throw new Error(`bytes ${start}–${end} are not a range of the file`);
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
        const chunks = checkParquetColumns(metadata, size, file);
        let rowStart = 0;
        for (let group = 0; group < metadata.row_groups.length; group++) {
            const expected = Number(metadata.row_groups[group].num_rows);
            const rowEnd = rowStart + expected;
            let rows: Record<string, unknown>[];
            const rowsName = `records ${rowStart}–${rowEnd - 1} (row group ${group})`;
            for (const chunk of chunks[group]) await checkPages(buffer, chunk, rowsName, file);
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

/** a column chunk whose footer fields passed the checks: where its pages lie and what they must hold */
interface CheckedChunk {
    /** the column's path, as messages name it */
    column: string;
    meta: ColumnMetaData;
    /** its pages: [start, end) of the file, as hyparquet reads them */
    start: number;
    end: number;
    /** hyparquet reads a flat column's pages until it has the rows, a nested one's to the end of the chunk */
    flat: boolean;
    values: number;
}

/**
 * a footer field or page header field that cannot be real: the one-line error. `where` names the row group
 * ("it": the footer's checks, before any row is read) or the records being read (a page's checks).
 */
function damagedChunk(file: string, where: {group: number} | {rows: string}, column: string, what: string): QloraError {
    const head = "group" in where ? `it as Parquet: row group ${where.group}, ` : `${where.rows} as Parquet: `;
    return new QloraError(
        `cannot read ${head}column "${column}" ${what}; the file is damaged or not written by a Parquet writer; re-export it`,
        {file}
    );
}

/**
 * The most a page of each codec can expand, decoded bytes per stored byte: deflate's limit is 1032:1; a snappy
 * copy of 64 bytes takes 3; an LZ4 match grows by 255 bytes per length byte; a zstd RLE block makes 128 KiB of
 * 4 bytes. The headers of each format only lower the ratio, so no slack is needed: nothing stored decodes to
 * nothing (a page of 0 stored bytes that says it holds some is damaged). Brotli has no useful bound (a 16 MiB
 * meta-block can take a few bytes) and LZO is not decoded (hyparquet refuses it): their pages are bounded by the
 * column chunk's declared size instead.
 */
const MAX_EXPANSION: Partial<Record<CompressionCodec, number>> = {
    UNCOMPRESSED: 1,
    SNAPPY: 22,
    GZIP: 1032,
    LZ4: 256,
    LZ4_RAW: 256,
    ZSTD: 32768
};
/**
 * A column chunk declaring more than this uncompressed is refused before anything is read: the decoder's heap
 * (CHILD_HEAP_MB) cannot hold it (text takes at least 2 bytes of heap per 3 bytes of UTF-8, numbers and dictionary
 * indices more), so it could only end as an out-of-memory after seconds of work.
 */
const MAX_CHUNK_UNCOMPRESSED = 2 * 2 ** 30;
/** the largest page header read: its statistics hold a min and a max value, which writers keep far smaller */
const MAX_PAGE_HEADER = 16 << 20;

/** a footer integer (bigint in hyparquet's metadata; a number where a damaged file wrote another thrift type) */
function footerInt(v: unknown): number | null {
    const n = typeof v === "bigint" ? Number(v) : v;
    return typeof n === "number" && Number.isSafeInteger(n) ? n : null;
}

function describeBytes(n: number): string {
    return n >= 2 ** 30 ? `${n} bytes (${(n / 2 ** 30).toFixed(1)} GiB)` : `${n} bytes`;
}

/**
 * Every column chunk of every row group must name a column of the schema, and its declared sizes must be possible
 * in this file. hyparquet finds a bad name only while it is already reading the other columns, and the reads it
 * started then fail as unhandled promise rejections, which end the process; it allocates from a bad size. Returns
 * the checked chunks of each row group.
 */
function checkParquetColumns(metadata: FileMetaData, size: number, file: string): CheckedChunk[][] {
    let schema: SchemaTree;
    try {
        schema = parquetSchema(metadata);
    } catch (err) {
        throw new QloraError(`cannot read it as Parquet: its schema is damaged (${(err as Error).message})`, {file, cause: err});
    }
    // the pages lie between the leading "PAR1" and the footer
    const dataEnd = size - 8 - metadata.metadata_length;
    let total = 0;
    const out = metadata.row_groups.map((group, index) => {
        const rows = Number(group.num_rows);
        if (!Number.isSafeInteger(rows) || rows < 0)
            throw new QloraError(
                `cannot read it as Parquet: row group ${index} says it holds ${group.num_rows} rows; the file is damaged`,
                {file}
            );
        total += rows;
        return group.columns.map((chunk): CheckedChunk => {
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
            const meta = chunk.meta_data!;
            const column = names.join(".");
            // a flat column (no repeated level) holds one value, or null, per row: the counts must agree before
            // anything is allocated from them
            const flat = isFlatColumn(getTreePath(schema, names));
            const values = footerInt(meta.num_values);
            if (flat && values !== rows)
                throw new QloraError(
                    `cannot read it as Parquet: row group ${index} says it holds ${rows} rows but its column ` +
                        `"${column}" holds ${meta.num_values} values; the file is damaged`,
                    {file}
                );
            if (values === null || values < 0)
                throw damagedChunk(file, {group: index}, column, `says it holds ${meta.num_values} values`);
            // hyparquet reads [dictionary_page_offset || data_page_offset, + total_compressed_size)
            const start = footerInt(meta.dictionary_page_offset || meta.data_page_offset);
            const stored = footerInt(meta.total_compressed_size);
            if (start === null || stored === null || start < 0 || stored < 0 || start + stored > dataEnd)
                throw damagedChunk(
                    file,
                    {group: index},
                    column,
                    `says its pages take ${meta.total_compressed_size} bytes from byte ${start ?? meta.data_page_offset}, ` +
                        `which is not within the ${dataEnd} bytes before the footer`
                );
            const unpacked = footerInt(meta.total_uncompressed_size);
            if (unpacked === null || unpacked < 0)
                throw damagedChunk(file, {group: index}, column, `says it is ${meta.total_uncompressed_size} bytes uncompressed`);
            if (unpacked > MAX_CHUNK_UNCOMPRESSED)
                throw new QloraError(
                    `cannot read it as Parquet: row group ${index}, column "${column}" says it is ` +
                        `${describeBytes(unpacked)} uncompressed, more than one column of a row group can have to be ` +
                        `decoded here (${MAX_CHUNK_UNCOMPRESSED / 2 ** 30} GiB); the file is damaged, or write it again ` +
                        "with smaller row groups (pyarrow: row_group_size)",
                    {file}
                );
            const expansion = MAX_EXPANSION[meta.codec];
            if (expansion !== undefined && unpacked > stored * expansion)
                throw damagedChunk(
                    file,
                    {group: index},
                    column,
                    `says it is ${describeBytes(unpacked)} uncompressed from ${stored} bytes of ${meta.codec}, ` +
                        `more than ${meta.codec} can expand (${expansion}:1)`
                );
            return {column, meta, start, end: start + stored, flat, values};
        });
    });
    if (total !== Number(metadata.num_rows))
        throw new QloraError(
            `cannot read it as Parquet: the footer says ${metadata.num_rows} rows but its row groups hold ${total}; ` +
                "the file is damaged",
            {file}
        );
    return out;
}

/**
 * The page headers of one column chunk, read in blocks (a chunk of many small pages costs few reads), each header
 * parsed by hyparquet's own parser, so that the sizes checked are the sizes it will use.
 */
class PageHeaderReader {
    private start = 0;
    private view = new DataView(new ArrayBuffer(0));
    constructor(
        private readonly buffer: AsyncBuffer,
        private readonly end: number
    ) {}

    /** the header at byte `at` and its length; throws when no header can be read there */
    async read(at: number): Promise<{header: PageHeader; length: number}> {
        for (let want = 1024; ; want *= 8) {
            const ahead = Math.min(want, this.end - at);
            if (at < this.start || at - this.start + ahead > this.view.byteLength) {
                this.start = at;
                this.view = new DataView(await this.buffer.slice(at, Math.min(this.end, at + Math.max(want, 1 << 16))));
            }
            const reader = {view: this.view, offset: at - this.start};
            try {
                const header = parquetHeader(reader);
                return {header, length: reader.offset - (at - this.start)};
            } catch (err) {
                // a header longer than the bytes at hand: read more, up to the chunk's end or the largest header
                if (this.start + this.view.byteLength >= this.end || want >= MAX_PAGE_HEADER) throw err;
            }
        }
    }
}

/**
 * Walks the page headers of a column chunk the way hyparquet will read them and refuses a page that cannot be
 * real before hyparquet allocates from it: stored bytes past the chunk's end, an uncompressed size its codec cannot
 * reach (or, for a codec without a bound, above the chunk's declared total), or pages whose values do not add up
 * to the chunk's (fewer would make hyparquet build the missing rows as empty records, or run out of memory).
 */
async function checkPages(buffer: AsyncBuffer, chunk: CheckedChunk, rows: string, file: string): Promise<void> {
    const {column, meta, start, end, flat, values: expected} = chunk;
    const fail = (what: string) => damagedChunk(file, {rows}, column, what);
    const expansion = MAX_EXPANSION[meta.codec];
    const chunkUnpacked = Number(meta.total_uncompressed_size);
    const headers = new PageHeaderReader(buffer, end);
    let at = start;
    let values = 0;
    // hyparquet's loop: a flat column until it has its rows, a nested one until (one byte before) the chunk's end
    while (at < end - 1 && (!flat || values < expected)) {
        let page: {header: PageHeader; length: number};
        try {
            page = await headers.read(at);
        } catch (err) {
            throw fail(`has a page header at byte ${at} that cannot be read (${(err as Error).message})`);
        }
        const {type, compressed_page_size: stored, uncompressed_page_size: unpacked} = page.header;
        if (type !== "DATA_PAGE" && type !== "DATA_PAGE_V2" && type !== "DICTIONARY_PAGE")
            throw fail(`has a page of type ${type ?? "unknown"} at byte ${at}`);
        const dataStart = at + page.length;
        const where = `has a ${type} at byte ${at} that`;
        if (!Number.isSafeInteger(stored) || stored < 0 || dataStart + stored > end)
            throw fail(`${where} says it stores ${stored} bytes, past the end of the column chunk (byte ${end})`);
        if (!Number.isSafeInteger(unpacked) || unpacked < 0) throw fail(`${where} says it is ${unpacked} bytes uncompressed`);
        if (meta.codec === "UNCOMPRESSED" ? unpacked !== stored : expansion !== undefined && unpacked > stored * expansion)
            throw fail(
                meta.codec === "UNCOMPRESSED"
                    ? `${where} stores ${stored} bytes uncompressed but says they are ${unpacked}`
                    : `${where} says it is ${describeBytes(unpacked)} uncompressed from ${stored} bytes of ${meta.codec}, ` +
                          `more than ${meta.codec} can expand (${expansion}:1)`
            );
        if (expansion === undefined && unpacked > chunkUnpacked)
            throw fail(
                `${where} says it is ${describeBytes(unpacked)} uncompressed, more than the whole column chunk (${chunkUnpacked} bytes)`
            );
        const pageValues =
            type === "DATA_PAGE"
                ? page.header.data_page_header?.num_values
                : type === "DATA_PAGE_V2"
                  ? page.header.data_page_header_v2?.num_values
                  : 0;
        if (pageValues === undefined || !Number.isSafeInteger(pageValues) || pageValues < 0)
            throw fail(`${where} says it holds ${pageValues ?? "an unknown number of"} values`);
        values += pageValues;
        at = dataStart + stored;
    }
    if (values !== expected) throw fail(`holds ${values} values in its pages where the footer says ${expected}`);
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
