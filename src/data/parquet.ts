// parquet.ts: Parquet records, one row group at a time, decoded by hyparquet in a child process.
//
// hyparquet trusts the sizes and counts a file gives, and an array grown past V8's limit aborts the process with a
// fatal error that no try/catch sees. So the decoding runs in a child (parquet-child.ts) with its own heap limit: a
// crash, an out-of-memory or a hang there becomes one QloraError naming the file, and the caller's process lives on.
// The footer checks run in the child too, before any page is decoded, and so do the page checks: a column chunk or
// page whose declared size cannot be real is refused with its row group and column named before hyparquet allocates
// from that size, and so is a data page whose runs would not fit the arrays hyparquet reads them into (an RLE run of
// levels or dictionary indices longer than the values left, which hyparquet writes past the end of its array until
// the heap is gone), or whose DELTA_BYTE_ARRAY prefixes would make it allocate gigabytes outside that heap. What a
// page holds in compressed bytes is checked on hyparquet's own decompression of it, just before it reads it.
import {fork} from "node:child_process";
import type {FileHandle} from "node:fs/promises";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {parquetMetadataAsync, parquetReadObjects, parquetSchema} from "hyparquet";
import type {AsyncBuffer, ColumnMetaData, CompressionCodec, Compressors, FileMetaData, PageHeader, SchemaTree} from "hyparquet";
import {parquetHeader} from "hyparquet/src/column.js";
import {deltaBinaryUnpack} from "hyparquet/src/delta.js";
import {getMaxDefinitionLevel, getMaxRepetitionLevel, getTreePath, isFlatColumn} from "hyparquet/src/schema.js";
import {compressors} from "hyparquet-compressors";
import {isQloraError, QloraError} from "../errors.js";
import {openRegularFile} from "../io/files.js";

export interface ParquetRowGroup {
    /** the index of the group's first row in the file */
    start: number;
    rows: Record<string, unknown>[];
}

/**
 * the child's heap, the backstop for damage the checks below miss: a damaged count that makes hyparquet grow an
 * array towards V8's 134M-element limit (about 1 GiB) is stopped a little earlier, as an out-of-memory. Row groups
 * of SFT text data decode to far less (a row group of 100k rows of 2 KB is about 400 MB as JS strings); a larger one
 * gets a message that says so.
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
            const deferred = new DeferredPageChecks();
            for (const chunk of chunks[group]) await checkPages(buffer, chunk, rowsName, file, deferred);
            try {
                rows = await parquetReadObjects({file: buffer, metadata, rowStart, rowEnd, compressors: deferred.compressors()});
            } catch (err) {
                // a deferred page check's refusal is already the one line
                if (isQloraError(err)) throw err;
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
    /** the highest repetition and definition levels of its schema path: which levels its pages hold */
    maxRepetition: number;
    maxDefinition: number;
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
            const schemaPath = getTreePath(schema, names);
            const flat = isFlatColumn(schemaPath);
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
            return {
                column,
                meta,
                start,
                end: start + stored,
                flat,
                values,
                maxRepetition: getMaxRepetitionLevel(schemaPath),
                maxDefinition: getMaxDefinitionLevel(schemaPath)
            };
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

/** how far a column chunk is read ahead: a chunk of many small pages costs few reads */
const READ_AHEAD = 1 << 16;

/**
 * The bytes of one column chunk, read in blocks: its page headers, each parsed by hyparquet's own parser so that the
 * sizes checked are the sizes it will use, and the pages whose levels and runs are checked.
 */
class ChunkReader {
    private start = 0;
    private bytes = new Uint8Array(0);
    constructor(
        private readonly buffer: AsyncBuffer,
        private readonly end: number
    ) {}

    /** bytes [at, at + length) of the file, which the caller keeps within the chunk */
    async range(at: number, length: number): Promise<Uint8Array> {
        if (at < this.start || at + length > this.start + this.bytes.length) {
            this.start = at;
            this.bytes = new Uint8Array(await this.buffer.slice(at, Math.min(this.end, at + Math.max(length, READ_AHEAD))));
        }
        return this.bytes.subarray(at - this.start, at - this.start + length);
    }

    /** the page header at byte `at` and its length; throws when no header can be read there */
    async header(at: number): Promise<{header: PageHeader; length: number}> {
        for (let want = 1024; ; want *= 8) {
            await this.range(at, Math.min(want, this.end - at));
            // the parser may read on to the end of the block at hand
            const reader = {view: new DataView(this.bytes.buffer, this.bytes.byteOffset + at - this.start), offset: 0};
            try {
                const header = parquetHeader(reader);
                return {header, length: reader.offset};
            } catch (err) {
                // a header longer than the bytes at hand: read more, up to the chunk's end or the largest header
                if (this.start + this.bytes.length >= this.end || want >= MAX_PAGE_HEADER) throw err;
            }
        }
    }
}

/** the bits a level of at most `max` takes (hyparquet's bitWidth) */
function bitWidth(max: number): number {
    return 32 - Math.clz32(max);
}

/**
 * Walks the runs of one run-length / bit-packed hybrid array of a page (repetition levels, definition levels,
 * dictionary indices) the way hyparquet's readRleBitPackedHybrid reads them into an array of `values` items, from
 * byte `at` of `page` (the bytes hyparquet reads from), with every run header before `end`. hyparquet writes an RLE
 * run whole, so one longer than the values left grows its plain Array until the heap is gone; a bit-packed run stops
 * at the array's end, and its last group of 8 may pad up to 7. Returns how many values equal `match` (with the
 * definition levels: the non-null values, which size the page's dictionary indices).
 */
function walkHybridRuns(
    page: Uint8Array,
    at: number,
    end: number,
    width: number,
    values: number,
    match: number,
    damaged: (what: string) => Error
): number {
    let seen = 0;
    let matched = 0;
    while (seen < values) {
        // hyparquet's readVarInt: 7 bits a byte, folded into an int32
        let header = 0;
        for (let shift = 0; ; shift += 7) {
            if (at >= end) throw damaged(`stop after ${seen} of their ${values} values (no run header is left in their bytes)`);
            const byte = page[at++];
            header |= (byte & 0x7f) << shift;
            if (!(byte & 0x80)) break;
        }
        const left = values - seen;
        if (header & 1) {
            const count = (header >> 1) << 3; // int32, as hyparquet computes it
            if (count < 0 || count > left + 7) throw damaged(`have a bit-packed run of ${count} values where ${left} are left`);
            const size = (count >> 3) * width;
            if (size === 0) {
                if (at < page.length) at++; // hyparquet reads a byte even then
            } else {
                if (at + size > page.length) throw damaged("have a bit-packed run past the end of the page");
                if (match >= 0) {
                    // the values, least significant bit first, as hyparquet's readBitPacked emits them
                    const taken = Math.min(count, left);
                    for (let i = 0, pos = at, shift = 0; i < taken; i++) {
                        let value = 0;
                        for (let b = 0; b < width; b++) {
                            value |= ((page[pos] >> shift) & 1) << b;
                            if (++shift === 8) {
                                shift = 0;
                                pos++;
                            }
                        }
                        if (value === match) matched++;
                    }
                }
                at += size;
            }
            seen += Math.min(count, left);
        } else {
            const count = header >>> 1;
            if (count > left) throw damaged(`have a run of ${count} values where ${left} are left`);
            const size = (width + 7) >> 3;
            if (at + size > page.length) throw damaged("have a run past the end of the page");
            if (match >= 0) {
                let value = 0;
                for (let i = 0; i < size; i++) value |= page[at + i] << (i << 3);
                if (value === match) matched += count;
            }
            at += size;
            seen += count;
        }
    }
    return matched;
}

/**
 * DELTA_BYTE_ARRAY values each repeat a prefix of the value before them: hyparquet allocates prefix + suffix bytes for
 * each (outside the heap that bounds the decoder) and copies the prefix into it, so damaged prefix lengths made a
 * page of 30 bytes take gigabytes. The lengths are decoded by hyparquet's own DELTA_BINARY_PACKED reader, into typed
 * arrays, which cannot grow; a value may repeat at most the bytes of the one before it, and add at most the bytes left.
 */
function checkDeltaPrefixes(page: Uint8Array, at: number, values: number, damaged: (what: string) => Error): void {
    const reader = {view: new DataView(page.buffer, page.byteOffset, page.byteLength), offset: at};
    const prefixes = new Int32Array(values);
    const suffixes = new Int32Array(values);
    try {
        deltaBinaryUnpack(reader, values, prefixes);
        deltaBinaryUnpack(reader, values, suffixes);
    } catch {
        return; // lengths that cannot be decoded: hyparquet fails on them too, before it allocates a value
    }
    let previous = 0;
    let left = page.length - reader.offset;
    for (let i = 0; i < values; i++) {
        if (prefixes[i] < 0 || prefixes[i] > previous)
            throw damaged(`say value ${i} repeats ${prefixes[i]} bytes of the ${previous} before it`);
        if (suffixes[i] < 0 || suffixes[i] > left)
            throw damaged(`say value ${i} adds ${suffixes[i]} bytes where ${left} are left`);
        left -= suffixes[i];
        previous = prefixes[i] + suffixes[i];
    }
}

/** the values of these encodings are run-length / bit-packed hybrid runs (dictionary indices, or RLE booleans) */
const RUN_ENCODINGS = new Set(["RLE", "PLAIN_DICTIONARY", "RLE_DICTIONARY"]);

type Decompress = (input: Uint8Array, outputLength: number) => Uint8Array;

/**
 * The compressed pages of a row group whose runs are checked on the bytes hyparquet decompresses, before it reads
 * them: decompressing each page here as well would add from a sixth (snappy) to two fifths or more (zstd, gzip) to
 * the time hyparquet takes. Its `compressors` are hyparquet-compressors' own, each handing a page it decompressed to
 * the check of the page whose stored bytes it was given.
 */
class DeferredPageChecks {
    private readonly byLength = new Map<number, {stored: Uint8Array; check: (page: Uint8Array) => void}[]>();

    add(stored: Uint8Array, check: (page: Uint8Array) => void): void {
        const same = this.byLength.get(stored.length);
        if (same) same.push({stored, check});
        else this.byLength.set(stored.length, [{stored, check}]);
    }

    compressors(): Compressors {
        const out: Compressors = {};
        for (const [codec, decompress] of Object.entries(compressors) as [CompressionCodec, Decompress][]) {
            out[codec] = (input: Uint8Array, size: number): Uint8Array => {
                const page = decompress(input, size);
                const same = this.byLength.get(input.length);
                // a page of the wrong size: hyparquet refuses it itself
                if (!same || page.length !== size) return page;
                const bytes = Buffer.from(input.buffer, input.byteOffset, input.length);
                // pages with the same stored bytes are all checked, so that none is passed for another
                const matching = same.filter(({stored}) => bytes.equals(stored));
                for (const {check} of matching) check(page);
                if (matching.length) same.splice(same.indexOf(matching[0]), 1);
                return page;
            };
        }
        return out;
    }
}

/**
 * The runs of a data page, checked before hyparquet reads them (its readDataPage and readDataPageV2, mirrored here:
 * which arrays, their bit widths, offsets and lengths): the repetition and definition levels, the values of
 * dictionary and RLE encodings, and the lengths of DELTA_BYTE_ARRAY values. A page passed here is read by hyparquet
 * within its arrays. What lies in compressed bytes is checked when hyparquet decompresses them (`deferred`).
 */
async function checkPageRuns(
    chunk: CheckedChunk,
    reader: ChunkReader,
    header: PageHeader,
    dataStart: number,
    pageAt: string,
    fail: (what: string) => Error,
    deferred: DeferredPageChecks
): Promise<void> {
    const {meta, maxRepetition, maxDefinition} = chunk;
    const runs = (section: string) => (what: string) => fail(`${pageAt} whose ${section} ${what}`);
    /** the end of a section that starts with its length as 4 bytes (hyparquet's readRleBitPackedHybrid without one) */
    const prefixed = (page: Uint8Array, at: number, section: string): number => {
        if (at + 4 > page.length) throw runs(section)("start past the end of the page");
        const length = new DataView(page.buffer, page.byteOffset + at, 4).getUint32(0, true);
        if (length > page.length - at - 4)
            throw runs(section)(`say they take ${length} bytes, past the end of the page (${page.length} bytes)`);
        return at + 4 + length;
    };
    /** the values from byte `at` that hyparquet sizes by what the page says: runs, or DELTA_BYTE_ARRAY prefixes */
    const checkValues = (page: Uint8Array, at: number, encoding: string, nonNull: number, boolean: boolean): void => {
        if (encoding === "DELTA_BYTE_ARRAY") {
            checkDeltaPrefixes(page, at, nonNull, runs("DELTA_BYTE_ARRAY lengths"));
            return;
        }
        if (boolean) {
            const end = prefixed(page, at, "RLE values");
            walkHybridRuns(page, at + 4, end, 1, nonNull, -1, runs("RLE values"));
            return;
        }
        const section = encoding === "RLE" ? "RLE values" : "dictionary indices";
        if (at >= page.length) throw runs(section)("start past the end of the page");
        const width = page[at];
        if (width > 32) throw runs(section)(`say they are ${width} bits wide (at most 32 can be)`);
        walkHybridRuns(page, at + 1, page.length, width, nonNull, -1, runs(section));
    };
    // hyparquet refuses a codec it has no decompressor for before it reads a compressed byte
    const compressed = meta.codec !== "UNCOMPRESSED";
    const decodable = !compressed || compressors[meta.codec] !== undefined;

    if (header.type === "DATA_PAGE") {
        const {num_values: values, encoding} = header.data_page_header!;
        const valuesChecked = RUN_ENCODINGS.has(encoding) || encoding === "DELTA_BYTE_ARRAY";
        if ((!maxRepetition && !maxDefinition && !valuesChecked) || !decodable) return;
        const check = (page: Uint8Array): void => {
            let at = 0;
            if (maxRepetition) {
                const end = prefixed(page, at, "repetition levels");
                walkHybridRuns(page, at + 4, end, bitWidth(maxRepetition), values, -1, runs("repetition levels"));
                at = end;
            }
            let nonNull = values;
            if (maxDefinition) {
                const end = prefixed(page, at, "definition levels");
                const width = bitWidth(maxDefinition);
                nonNull = walkHybridRuns(page, at + 4, end, width, values, maxDefinition, runs("definition levels"));
                at = end;
            }
            // v1 reads a BOOLEAN column's RLE values as 1 bit wide after a length; a bit width of 0 is all zeros
            if (valuesChecked && (meta.type === "BOOLEAN" || encoding === "DELTA_BYTE_ARRAY" || page[at] !== 0))
                checkValues(page, at, encoding, nonNull, meta.type === "BOOLEAN");
        };
        const stored = await reader.range(dataStart, header.compressed_page_size);
        if (compressed) deferred.add(stored, check);
        else check(stored);
        return;
    }
    const v2 = header.data_page_header_v2!;
    const {num_values: values, num_nulls: nulls, encoding} = v2;
    const repetitionBytes = v2.repetition_levels_byte_length;
    const definitionBytes = v2.definition_levels_byte_length;
    const stored = header.compressed_page_size;
    const levelBytes = repetitionBytes + definitionBytes;
    if (
        !Number.isSafeInteger(repetitionBytes) ||
        !Number.isSafeInteger(definitionBytes) ||
        repetitionBytes < 0 ||
        definitionBytes < 0 ||
        levelBytes > Math.min(stored, header.uncompressed_page_size)
    )
        throw fail(
            `${pageAt} that says its levels take ${repetitionBytes} + ${definitionBytes} bytes of the ${stored} it stores`
        );
    if (!Number.isSafeInteger(nulls) || nulls < 0 || nulls > values)
        throw fail(`${pageAt} that says ${nulls} of its ${values} values are null`);
    const valuesChecked = (RUN_ENCODINGS.has(encoding) || encoding === "DELTA_BYTE_ARRAY") && decodable;
    if (!maxRepetition && !maxDefinition && !valuesChecked) return;
    // v2 levels are stored uncompressed before the values, each within its byte length
    const bytes = await reader.range(dataStart, stored);
    if (maxRepetition) walkHybridRuns(bytes, 0, repetitionBytes, bitWidth(maxRepetition), values, -1, runs("repetition levels"));
    if (maxDefinition) {
        const end = repetitionBytes + definitionBytes;
        walkHybridRuns(bytes, repetitionBytes, end, bitWidth(maxDefinition), values, -1, runs("definition levels"));
    }
    if (!valuesChecked) return;
    // hyparquet's values start after the definition levels only where it read them; v2 reads RLE values as 1 bit
    // wide after a length, whatever the type, and walks a bit width of 0
    const check = (page: Uint8Array) => checkValues(page, 0, encoding, values - nulls, encoding === "RLE");
    const page = bytes.subarray(maxDefinition ? levelBytes : repetitionBytes);
    if (compressed && v2.is_compressed !== false) deferred.add(page, check);
    else check(page);
}

/**
 * Walks the page headers of a column chunk the way hyparquet will read them and refuses a page that cannot be
 * real before hyparquet allocates from it: stored bytes past the chunk's end, an uncompressed size its codec cannot
 * reach (or, for a codec without a bound, above the chunk's declared total), pages whose values do not add up
 * to the chunk's (fewer would make hyparquet build the missing rows as empty records, or run out of memory), or a
 * data page whose level or value runs would not fit the arrays hyparquet reads them into (checkPageRuns).
 */
async function checkPages(
    buffer: AsyncBuffer,
    chunk: CheckedChunk,
    rows: string,
    file: string,
    deferred: DeferredPageChecks
): Promise<void> {
    const {column, meta, start, end, flat, values: expected} = chunk;
    const fail = (what: string) => damagedChunk(file, {rows}, column, what);
    const expansion = MAX_EXPANSION[meta.codec];
    const chunkUnpacked = Number(meta.total_uncompressed_size);
    const reader = new ChunkReader(buffer, end);
    let at = start;
    let values = 0;
    // hyparquet's loop: a flat column until it has its rows, a nested one until (one byte before) the chunk's end
    while (at < end - 1 && (!flat || values < expected)) {
        let page: {header: PageHeader; length: number};
        try {
            page = await reader.header(at);
        } catch (err) {
            throw fail(`has a page header at byte ${at} that cannot be read (${(err as Error).message})`);
        }
        const {type, compressed_page_size: stored, uncompressed_page_size: unpacked} = page.header;
        if (type !== "DATA_PAGE" && type !== "DATA_PAGE_V2" && type !== "DICTIONARY_PAGE")
            throw fail(`has a page of type ${type ?? "unknown"} at byte ${at}`);
        const dataStart = at + page.length;
        const pageAt = `has a ${type} at byte ${at}`;
        const where = `${pageAt} that`;
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
        if (type !== "DICTIONARY_PAGE") await checkPageRuns(chunk, reader, page.header, dataStart, pageAt, fail, deferred);
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
