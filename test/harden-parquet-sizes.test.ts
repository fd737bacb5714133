// Issue 8, the Parquet leftover: a column chunk or page whose declared size cannot be real, or a page whose runs or
// DELTA_BYTE_ARRAY lengths cannot fit what it holds, is refused with one line naming the file, the row group and the
// column, before hyparquet allocates from that size. Before, such a file ended as the decoder's out-of-memory after
// seconds, was read with a 2 GiB page buffer, or read as records with empty, missing or gigabyte-long values.
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gzipSync} from "node:zlib";
import {parquetMetadata} from "hyparquet";
import {QloraError} from "../src/errors.js";
import {readRecords} from "../src/data/index.js";
import {writeParquet, type ParquetColumn, type ParquetLies} from "./helpers/parquet-writer.js";

const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-parquet-sizes-"));
test.after(() => rmSync(dir, {recursive: true, force: true}));

// values of different lengths, so that the two column chunks' footer fields differ
const columns: ParquetColumn[] = [
    {name: "instruction", kind: "string", values: ["add 3 5", "add 1 1"]},
    {name: "output", kind: "string", values: ["8", "two"]}
];
/** the bytes gzip makes of a string column's PLAIN page (each value: its length as u32 LE, then its UTF-8) */
function gzippedPage(values: string[]): number {
    const parts = values.map((v) => {
        const b = Buffer.from(v, "utf8");
        const n = Buffer.alloc(4);
        n.writeUInt32LE(b.length);
        return Buffer.concat([n, b]);
    });
    return gzipSync(Buffer.concat(parts)).length;
}
const instructionGzipped = gzippedPage(columns[0].values as string[]);
const ADVICE = "; the file is damaged or not written by a Parquet writer; re-export it";

let count = 0;
function write(content: Buffer): string {
    const file = path.join(dir, `case-${count++}.parquet`);
    writeFileSync(file, content);
    return file;
}

/** the one-line QloraError reading `file` ends with, which must be `${file}: ${message}` exactly */
async function refused(file: string, message: string): Promise<void> {
    let caught: unknown;
    try {
        await readRecords(file);
    } catch (err) {
        caught = err;
    }
    assert.ok(
        caught instanceof QloraError,
        `expected a QloraError, got ${caught instanceof Error ? caught.stack : String(caught)}`
    );
    assert.equal(caught.message, `${file}: ${message}`);
}

/** the footer fields of column chunk `index` of the first row group */
function chunkMeta(file: Buffer, index: number) {
    return parquetMetadata(file).row_groups[0].columns[index].meta_data!;
}

function zigzagVarint(v: number): number[] {
    let x = BigInt(v) << 1n;
    const out: number[] = [];
    while (x >= 0x80n) {
        out.push(Number(x & 0x7fn) | 0x80);
        x >>= 7n;
    }
    out.push(Number(x));
    return out;
}

/**
 * `whole` with the footer's total_uncompressed_size of column chunk `index` set to `value`: the chunk's fields
 * 5–7 (num_values, total_uncompressed_size, total_compressed_size, i64 in thrift's compact protocol) are found by
 * their current values, and the footer length is rewritten.
 */
function withTotalUncompressed(whole: Buffer, index: number, value: number): Buffer {
    const footerLength = whole.readUInt32LE(whole.length - 8);
    const footerStart = whole.length - 8 - footerLength;
    const footer = whole.subarray(footerStart, whole.length - 8);
    const meta = chunkMeta(whole, index);
    const old = [
        0x16,
        ...zigzagVarint(Number(meta.num_values)),
        0x16,
        ...zigzagVarint(Number(meta.total_uncompressed_size)),
        0x16,
        ...zigzagVarint(Number(meta.total_compressed_size))
    ];
    const at = footer.indexOf(Buffer.from(old));
    assert.ok(at >= 0 && footer.indexOf(Buffer.from(old), at + 1) < 0, "the chunk's size fields are found once");
    const sizeAt = at + 1 + zigzagVarint(Number(meta.num_values)).length + 1;
    const patched = Buffer.concat([
        footer.subarray(0, sizeAt),
        Buffer.from(zigzagVarint(value)),
        footer.subarray(sizeAt + zigzagVarint(Number(meta.total_uncompressed_size)).length)
    ]);
    const length = Buffer.alloc(4);
    length.writeUInt32LE(patched.length);
    return Buffer.concat([whole.subarray(0, footerStart), patched, length, Buffer.from("PAR1")]);
}

const lying = (codec: "none" | "gzip", lies: ParquetLies) => write(writeParquet(columns, codec, lies));

test("the unmodified files read, so the checks below refuse only the lies", async () => {
    for (const codec of ["none", "gzip"] as const) {
        const read = await readRecords(write(writeParquet(columns, codec)));
        assert.deepEqual(read.records, [
            {instruction: "add 3 5", output: "8"},
            {instruction: "add 1 1", output: "two"}
        ]);
    }
    // the footer patch alone (the same value written back) keeps the file readable
    const whole = writeParquet(columns, "gzip");
    const total = Number(chunkMeta(whole, 1).total_uncompressed_size);
    assert.equal((await readRecords(write(withTotalUncompressed(whole, 1, total)))).records.length, 2);
});

test("a page header's uncompressed size beyond what its codec can expand", async () => {
    // gzip: hyparquet allocated the 2 GiB it was told and read the file as if nothing were wrong
    const gzip = lying("gzip", {uncompressedPageSize: 2 ** 31 - 1});
    await refused(
        gzip,
        'cannot read records 0–1 (row group 0) as Parquet: column "instruction" has a DATA_PAGE at byte 4 that says it is ' +
            `2147483647 bytes (2.0 GiB) uncompressed from ${instructionGzipped} bytes of GZIP, more than GZIP can expand (1032:1)` +
            ADVICE
    );
    // an uncompressed column stores exactly what it holds
    const none = lying("none", {uncompressedPageSize: 2 ** 31 - 1});
    await refused(
        none,
        'cannot read records 0–1 (row group 0) as Parquet: column "instruction" has a DATA_PAGE at byte 4 that stores 22 bytes ' +
            `uncompressed but says they are 2147483647${ADVICE}`
    );
});

test("a page header's stored size: 0 bytes that decode to something, or past the end of the column chunk", async () => {
    // hyparquet decoded the empty page as zeros: the records came back with empty strings
    const empty = lying("gzip", {compressedPageSize: 0});
    await refused(
        empty,
        'cannot read records 0–1 (row group 0) as Parquet: column "instruction" has a DATA_PAGE at byte 4 that says it is ' +
            `22 bytes uncompressed from 0 bytes of GZIP, more than GZIP can expand (1032:1)${ADVICE}`
    );
    const past = lying("none", {compressedPageSize: 1_000_000});
    await refused(
        past,
        'cannot read records 0–1 (row group 0) as Parquet: column "instruction" has a DATA_PAGE at byte 4 that says it stores ' +
            `1000000 bytes, past the end of the column chunk (byte 45)${ADVICE}`
    );
});

test("pages holding fewer values than the footer says (the decoder ran out of memory building the rest)", async () => {
    // 2^31 wraps to 0 in the page header's i32 while the footer's i64 keeps it: before, the child grew to its heap
    // limit building 2^31 empty rows, and the error came after about 20 s as an out-of-memory
    const file = lying("none", {numValues: 2 ** 31, numRows: 2 ** 31});
    await refused(
        file,
        'cannot read records 0–2147483647 (row group 0) as Parquet: column "instruction" holds 0 values in its pages where the footer ' +
            `says 2147483648${ADVICE}`
    );
});

test("a column chunk outside the file, or declaring more than can be decoded", async () => {
    // before: hyparquet read an empty range and returned two records without fields
    const far = lying("none", {dataPageOffset: 2n ** 62n});
    await refused(
        far,
        'cannot read it as Parquet: row group 0, column "instruction" says its pages take 39 bytes from byte ' +
            `4611686018427387904, which is not within the 72 bytes before the footer${ADVICE}`
    );
    const whole = writeParquet(columns, "gzip");
    const huge = write(withTotalUncompressed(whole, 1, 3 * 2 ** 30));
    await refused(
        huge,
        'cannot read it as Parquet: row group 0, column "output" says it is 3221225472 bytes (3.0 GiB) uncompressed, ' +
            "more than one column of a row group can have to be decoded here (2 GiB); the file is damaged, or write " +
            "it again with smaller row groups (pyarrow: row_group_size)"
    );
    const ratio = write(withTotalUncompressed(whole, 1, 10_000_000));
    const stored = chunkMeta(whole, 1).total_compressed_size;
    await refused(
        ratio,
        'cannot read it as Parquet: row group 0, column "output" says it is 10000000 bytes uncompressed from ' +
            `${stored} bytes of GZIP, more than GZIP can expand (1032:1)${ADVICE}`
    );
});

// The runs of a page: hyparquet writes an RLE run of definition levels or dictionary indices whole, so a damaged run
// length grew its array until the decoder died at its heap limit, and the file was refused after about 20 s as an
// out-of-memory. Now the run is refused before hyparquet reads it, in v1 and v2 pages, stored or compressed.
const ROWS = 20;
const taskOf = (i: number) => (i < 10 ? "add the numbers" : `task ${i % 3}`); // an RLE run of indices, then bit-packed
const inputOf = (i: number) => (i % 3 === 1 || i >= 8 ? null : `${i} ${i + 2}`); // bit-packed levels, then an RLE run
const outputOf = (i: number) => (i % 4 === 0 ? null : ["8", "two", "5"][i % 3]);
function nullableColumns(v2: boolean): ParquetColumn[] {
    const rows = Array.from({length: ROWS}, (_, i) => i);
    return [
        {name: "instruction", kind: "string", values: rows.map(taskOf), dictionary: true, v2},
        {name: "input", kind: "string", values: rows.map(inputOf), optional: true, v2},
        {name: "output", kind: "string", values: rows.map(outputOf), optional: true, dictionary: true, v2}
    ];
}

test("nullable and dictionary-encoded columns, v1 and v2 pages, stored or gzipped, read as written", async () => {
    const expected = Array.from({length: ROWS}, (_, i) => ({instruction: taskOf(i), input: inputOf(i), output: outputOf(i)}));
    for (const v2 of [false, true])
        for (const codec of ["none", "gzip"] as const) {
            const read = await readRecords(write(writeParquet(nullableColumns(v2), codec)));
            assert.deepEqual(read.records, expected, `v2 ${v2}, ${codec}`);
        }
});

/** refused with `message` (which names the page by the byte offset of its data page) in well under the old 20 s */
async function refusedQuickly(whole: Buffer, column: number, message: (pageAt: string) => string): Promise<void> {
    const started = Date.now();
    await refused(write(whole), message(`at byte ${chunkMeta(whole, column).data_page_offset}`));
    const elapsed = Date.now() - started;
    assert.ok(elapsed < 5000, `refused after ${elapsed} ms`);
}

test("a definition-level run longer than its page is refused before hyparquet grows its array", async () => {
    for (const [v2, codec] of [
        [false, "none"],
        [false, "gzip"],
        [true, "gzip"]
    ] as const) {
        const whole = writeParquet(nullableColumns(v2), codec, {definitionLevelRun: 2 ** 31 - 1});
        await refusedQuickly(
            whole,
            1,
            (pageAt) =>
                `cannot read records 0–19 (row group 0) as Parquet: column "input" has a ${v2 ? "DATA_PAGE_V2" : "DATA_PAGE"} ` +
                `${pageAt} whose definition levels have a run of 2147483647 values where 20 are left${ADVICE}`
        );
    }
});

test("a dictionary-index run longer than its page is refused before hyparquet grows its array", async () => {
    for (const [v2, codec] of [
        [false, "none"],
        [false, "gzip"],
        [true, "gzip"]
    ] as const) {
        const whole = writeParquet(nullableColumns(v2), codec, {dictionaryIndexRun: 2 ** 31 - 1});
        await refusedQuickly(
            whole,
            0,
            (pageAt) =>
                `cannot read records 0–19 (row group 0) as Parquet: column "instruction" has a ${v2 ? "DATA_PAGE_V2" : "DATA_PAGE"} ` +
                `${pageAt} whose dictionary indices have a run of 2147483647 values where 20 are left${ADVICE}`
        );
    }
});

test("DELTA_BYTE_ARRAY values repeating more bytes than the value before them are refused before hyparquet allocates", async () => {
    // each value was allocated its prefix length and filled from the one before: a page of a few dozen bytes took
    // gigabytes outside the decoder's heap
    const texts = ["add 3 5", "add 1 1", "add 2 2"];
    for (const v2 of [false, true]) {
        const columns: ParquetColumn[] = [{name: "text", kind: "string", values: texts, delta: true, v2}];
        const read = await readRecords(write(writeParquet(columns, "gzip")));
        assert.deepEqual(
            read.records,
            texts.map((text) => ({text}))
        );
        await refusedQuickly(
            writeParquet(columns, "gzip", {deltaPrefixLength: 2 ** 28}),
            0,
            (pageAt) =>
                `cannot read records 0–2 (row group 0) as Parquet: column "text" has a ${v2 ? "DATA_PAGE_V2" : "DATA_PAGE"} ` +
                `${pageAt} whose DELTA_BYTE_ARRAY lengths say value 1 repeats 268435456 bytes of the 7 before it${ADVICE}`
        );
    }
});
