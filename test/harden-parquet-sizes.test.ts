// Issue 8, the Parquet leftover: a column chunk or page whose declared size cannot be real is refused with one
// line naming the file, the row group and the column, before hyparquet allocates from that size. Before, such a
// file ended as the decoder's out-of-memory after seconds, was read with a 2 GiB page buffer, or read as records
// with empty or missing values.
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
