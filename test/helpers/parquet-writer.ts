// parquet-writer.ts: a minimal Parquet writer (thrift compact protocol, one data page per column, one row group) for the
// tests and the fuzz seeds, able to lie in chosen footer fields: the structural mutations of a Parquet file (sizes,
// counts, offsets, codec, types, run lengths) that random byte flips rarely produce. Columns are required, PLAIN, in a
// v1 data page unless a column asks for nulls (definition levels), a dictionary (a dictionary page and RLE_DICTIONARY
// indices), DELTA_BYTE_ARRAY values or a v2 page; levels and indices are written the way Parquet writers do (RLE for
// 8 or more equal values, else bit-packed groups of 8, the last one padded). Used by the reader tests and the fuzz
// seeds.
import {gzipSync} from "node:zlib";

class Compact {
    bytes: number[] = [];
    private last: number[] = [0];
    varint(v: bigint | number): void {
        let x = BigInt(v);
        if (x < 0n) x &= 0xffffffffffffffffn; // a negative lie is written as its 64-bit two's complement
        while (x >= 0x80n) {
            this.bytes.push(Number(x & 0x7fn) | 0x80);
            x >>= 7n;
        }
        this.bytes.push(Number(x));
    }
    zigzag(v: number | bigint): void {
        const x = BigInt(v);
        this.varint(x >= 0n ? x << 1n : (-x << 1n) - 1n);
    }
    field(id: number, type: number): void {
        const delta = id - this.last[this.last.length - 1];
        if (delta > 0 && delta <= 15) this.bytes.push((delta << 4) | type);
        else {
            this.bytes.push(type);
            this.zigzag(id);
        }
        this.last[this.last.length - 1] = id;
    }
    i32(id: number, v: number | bigint): void {
        this.field(id, 5);
        this.zigzag(v);
    }
    i64(id: number, v: number | bigint): void {
        this.field(id, 6);
        this.zigzag(v);
    }
    binary(id: number, s: string): void {
        this.field(id, 8);
        this.rawBinary(s);
    }
    rawBinary(s: string): void {
        const b = Buffer.from(s, "utf8");
        this.varint(b.length);
        this.bytes.push(...b);
    }
    list(id: number, elemType: number, n: number): void {
        this.field(id, 9);
        if (n < 15) this.bytes.push((n << 4) | elemType);
        else {
            this.bytes.push(0xf0 | elemType);
            this.varint(n);
        }
    }
    beginStruct(id?: number): void {
        if (id !== undefined) this.field(id, 12);
        this.last.push(0);
    }
    endStruct(): void {
        this.bytes.push(0);
        this.last.pop();
    }
}

interface ColumnOptions {
    /** OPTIONAL with definition levels (its values may then hold null); else REQUIRED */
    optional?: boolean;
    /** a dictionary page of the distinct values, and RLE_DICTIONARY indices in the data page; else PLAIN */
    dictionary?: boolean;
    /** a DATA_PAGE_V2 (its levels stored uncompressed before the values, their lengths in its header) */
    v2?: boolean;
    /** DELTA_BYTE_ARRAY values (each repeats the prefix it shares with the one before); strings only */
    delta?: boolean;
}
export type ParquetColumn =
    | ({name: string; kind: "string"; values: (string | null)[]} & ColumnOptions)
    | ({name: string; kind: "int64"; values: (number | null)[]} & ColumnOptions);

/** footer fields to write with a wrong value (each one is applied to every column chunk / page it names) */
export interface ParquetLies {
    /** page header: uncompressed_page_size */
    uncompressedPageSize?: number | bigint;
    /** page header: compressed_page_size */
    compressedPageSize?: number | bigint;
    /** page header and column chunk: num_values */
    numValues?: number | bigint;
    /** file and row group: num_rows */
    numRows?: number | bigint;
    /** column chunk: data_page_offset */
    dataPageOffset?: number | bigint;
    /** column chunk: codec (0 none, 1 snappy, 2 gzip, 4 brotli, 6 zstd, 7 lz4_raw, 99 unknown) */
    codec?: number;
    /** schema and column chunk: physical type (0 boolean, 1 int32, 2 int64, 6 byte_array, 7 fixed_len_byte_array) */
    physicalType?: number;
    /** schema root: num_children */
    numChildren?: number;
    /** schema: repetition type (0 required, 1 optional, 2 repeated) */
    repetition?: number;
    /** the footer length word before the closing magic */
    footerLength?: number;
    /** drop the leading or trailing "PAR1" */
    dropMagic?: "head" | "tail";
    /** an optional column's definition levels: one RLE run of this many values (of the first level) */
    definitionLevelRun?: number;
    /** a dictionary column's indices: one RLE run of this many values (of index 0) */
    dictionaryIndexRun?: number;
    /** a DELTA_BYTE_ARRAY column: every value after the first says it repeats this many bytes of the one before */
    deltaPrefixLength?: number;
}

function bitWidth(max: number): number {
    return 32 - Math.clz32(max);
}

/** `values`, `width` bits each, least significant bit first (a multiple of 8 values fills whole bytes) */
function packBits(values: number[], width: number): number[] {
    const out = new Array<number>(Math.ceil((values.length * width) / 8)).fill(0);
    values.forEach((v, i) => {
        for (let b = 0; b < width; b++) if (Math.floor(v / 2 ** b) % 2) out[(i * width + b) >> 3] |= 1 << ((i * width + b) & 7);
    });
    return out;
}

/** `values` as DELTA_BINARY_PACKED: blocks of 128 deltas, 4 miniblocks of 32 each packed at its own width */
function deltaBinaryPacked(values: number[]): number[] {
    const out = new Compact();
    out.varint(128);
    out.varint(4);
    out.varint(values.length);
    out.zigzag(values[0] ?? 0);
    for (let start = 1; start < values.length; start += 128) {
        const deltas = values.slice(start, start + 128).map((v, i) => v - values[start + i - 1]);
        const min = Math.min(...deltas);
        out.zigzag(min);
        const miniblocks = [0, 1, 2, 3].map((m) => deltas.slice(m * 32, m * 32 + 32).map((d) => d - min));
        const widths = miniblocks.map((mini) => (mini.length ? bitWidth(Math.max(...mini)) : 0));
        out.bytes.push(...widths);
        // a miniblock is padded to 32 values; those the block does not reach are not written
        miniblocks.forEach((mini, m) => {
            if (mini.length) out.bytes.push(...packBits([...mini, ...new Array(32 - mini.length).fill(0)], widths[m]));
        });
    }
    return out.bytes;
}

/** `values` as the run-length / bit-packed hybrid runs of Parquet, `width` bits each */
function hybridRuns(values: number[], width: number): number[] {
    const out = new Compact();
    const bytesPerValue = (width + 7) >> 3;
    const sameFrom = (i: number): number => {
        let j = i;
        while (j < values.length && values[j] === values[i]) j++;
        return j - i;
    };
    let i = 0;
    while (i < values.length) {
        const same = sameFrom(i);
        if (same >= 8) {
            out.varint(same << 1);
            for (let b = 0; b < bytesPerValue; b++) out.bytes.push((values[i] >> (8 * b)) & 0xff);
            i += same;
            continue;
        }
        // groups of 8 until a run of 8 equal values starts a group, the last group padded with zeros
        let end = i + 8;
        while (end < values.length && sameFrom(end) < 8) end += 8;
        out.varint((((end - i) / 8) << 1) | 1);
        const group = values.slice(i, end);
        out.bytes.push(...packBits([...group, ...new Array(end - i - group.length).fill(0)], width));
        i = end;
    }
    return out.bytes;
}

/** one RLE run of `count` values of `value` */
function rleRun(count: number, value: number, width: number): number[] {
    const out = new Compact();
    out.varint(BigInt(count) << 1n);
    for (let b = 0; b < (width + 7) >> 3; b++) out.bytes.push((value >> (8 * b)) & 0xff);
    return out.bytes;
}

function withLength(bytes: number[]): Buffer {
    const length = Buffer.alloc(4);
    length.writeUInt32LE(bytes.length);
    return Buffer.concat([length, Buffer.from(bytes)]);
}

function plainValues(column: ParquetColumn, values: (string | number)[]): Buffer {
    const plain: Buffer[] = [];
    for (const v of values) {
        if (column.kind === "string") {
            const b = Buffer.from(v as string, "utf8");
            const len = Buffer.alloc(4);
            len.writeUInt32LE(b.length);
            plain.push(len, b);
        } else {
            const b = Buffer.alloc(8);
            b.writeBigInt64LE(BigInt(v));
            plain.push(b);
        }
    }
    return Buffer.concat(plain);
}

export function writeParquet(columns: ParquetColumn[], codec: "none" | "gzip" = "none", lies: ParquetLies = {}): Buffer {
    const rows = columns[0].values.length;
    const chunks: Buffer[] = lies.dropMagic === "head" ? [] : [Buffer.from("PAR1")];
    let offset = chunks.length ? 4 : 0;
    const metas: {
        offset: number;
        dataOffset: number;
        size: number;
        uncompressed: number;
        column: ParquetColumn;
    }[] = [];
    for (const column of columns) {
        const present = column.values.filter((v): v is string | number => v !== null);
        if (present.length !== column.values.length && !column.optional)
            throw new Error(`column "${column.name}" holds nulls: write it with optional: true`);
        const pages: Buffer[] = [];
        let uncompressed = 0;
        /** a page header and its bytes, compressed as the file is (but for `levels`, which a v2 page stores as they are) */
        const page = (type: number, raw: Buffer, typeHeader: (h: Compact) => void, levels: Buffer = Buffer.alloc(0)): void => {
            const data = Buffer.concat([levels, codec === "gzip" ? gzipSync(raw) : raw]);
            const header = new Compact();
            header.beginStruct();
            header.i32(1, type);
            header.i32(2, lies.uncompressedPageSize ?? levels.length + raw.length);
            header.i32(3, lies.compressedPageSize ?? data.length);
            typeHeader(header);
            header.endStruct();
            pages.push(Buffer.from(header.bytes), data);
            uncompressed += header.bytes.length + levels.length + raw.length;
        };
        let values: Buffer;
        let encoding = 0; // PLAIN
        if (column.dictionary) {
            const distinct = [...new Set(present)];
            page(2, plainValues(column, distinct), (h) => {
                h.beginStruct(7);
                h.i32(1, distinct.length);
                h.i32(2, 0); // PLAIN
                h.endStruct();
            });
            const width = Math.max(1, bitWidth(distinct.length - 1));
            const indices = present.map((v) => distinct.indexOf(v));
            const runs =
                lies.dictionaryIndexRun === undefined ? hybridRuns(indices, width) : rleRun(lies.dictionaryIndexRun, 0, width);
            values = Buffer.from([width, ...runs]);
            encoding = 8; // RLE_DICTIONARY
        } else if (column.delta) {
            const bytes = present.map((v) => Buffer.from(String(v), "utf8"));
            const prefixes = bytes.map((b, i) => {
                if (i === 0) return 0;
                if (lies.deltaPrefixLength !== undefined) return lies.deltaPrefixLength;
                let n = 0;
                while (n < b.length && n < bytes[i - 1].length && b[n] === bytes[i - 1][n]) n++;
                return n;
            });
            const suffixes = bytes.map((b, i) => b.subarray(Math.min(prefixes[i], b.length)));
            values = Buffer.concat([
                Buffer.from(deltaBinaryPacked(prefixes)),
                Buffer.from(deltaBinaryPacked(suffixes.map((b) => b.length))),
                ...suffixes
            ]);
            encoding = 7; // DELTA_BYTE_ARRAY
        } else values = plainValues(column, present);
        let levels: Buffer = Buffer.alloc(0);
        if (column.optional) {
            const defined = column.values.map((v) => (v === null ? 0 : 1));
            const runs =
                lies.definitionLevelRun === undefined ? hybridRuns(defined, 1) : rleRun(lies.definitionLevelRun, defined[0], 1);
            // v1 writes their length before them, v2 in its header
            levels = column.v2 ? Buffer.from(runs) : withLength(runs);
        }
        const dataOffset = offset + pages.reduce((n, b) => n + b.length, 0);
        if (column.v2)
            page(
                3,
                values,
                (h) => {
                    h.beginStruct(8);
                    h.i32(1, lies.numValues ?? rows);
                    h.i32(2, rows - present.length);
                    h.i32(3, rows);
                    h.i32(4, encoding);
                    h.i32(5, levels.length);
                    h.i32(6, 0);
                    h.endStruct();
                },
                levels
            );
        else
            page(0, Buffer.concat([levels, values]), (h) => {
                h.beginStruct(5);
                h.i32(1, lies.numValues ?? rows);
                h.i32(2, encoding);
                h.i32(3, 3); // RLE
                h.i32(4, 3);
                h.endStruct();
            });
        const size = pages.reduce((n, b) => n + b.length, 0);
        metas.push({offset, dataOffset, size, uncompressed, column});
        chunks.push(...pages);
        offset += size;
    }
    const typeOf = (c: ParquetColumn) => lies.physicalType ?? (c.kind === "string" ? 6 : 2); // BYTE_ARRAY / INT64
    const meta = new Compact();
    meta.beginStruct();
    meta.i32(1, 1);
    meta.list(2, 12, columns.length + 1);
    meta.beginStruct();
    meta.binary(4, "schema");
    meta.i32(5, lies.numChildren ?? columns.length);
    meta.endStruct();
    for (const column of columns) {
        meta.beginStruct();
        meta.i32(1, typeOf(column));
        meta.i32(3, lies.repetition ?? (column.optional ? 1 : 0)); // OPTIONAL or REQUIRED
        meta.binary(4, column.name);
        if (column.kind === "string") meta.i32(6, 0); // UTF8
        meta.endStruct();
    }
    meta.i64(3, lies.numRows ?? rows);
    meta.list(4, 12, 1);
    meta.beginStruct();
    meta.list(1, 12, columns.length);
    for (const m of metas) {
        meta.beginStruct();
        meta.i64(2, m.offset);
        meta.beginStruct(3);
        meta.i32(1, typeOf(m.column));
        // PLAIN (values or the dictionary), RLE (levels), RLE_DICTIONARY, DELTA_BYTE_ARRAY
        const encodings = m.column.dictionary ? [0, 3, 8] : m.column.delta ? [3, 7] : m.column.optional ? [0, 3] : [0];
        meta.list(2, 5, encodings.length);
        for (const e of encodings) meta.zigzag(e);
        meta.list(3, 8, 1);
        meta.rawBinary(m.column.name);
        meta.i32(4, lies.codec ?? (codec === "gzip" ? 2 : 0));
        meta.i64(5, lies.numValues ?? rows);
        meta.i64(6, m.uncompressed);
        meta.i64(7, m.size);
        meta.i64(9, lies.dataPageOffset ?? m.dataOffset);
        if (m.column.dictionary) meta.i64(11, m.offset);
        meta.endStruct();
        meta.endStruct();
    }
    meta.i64(
        2,
        metas.reduce((s, m) => s + m.size, 0)
    );
    meta.i64(3, lies.numRows ?? rows);
    meta.endStruct();
    meta.endStruct();
    const footer = Buffer.from(meta.bytes);
    const length = Buffer.alloc(4);
    length.writeUInt32LE((lies.footerLength ?? footer.length) >>> 0);
    return Buffer.concat([...chunks, footer, length, ...(lies.dropMagic === "tail" ? [] : [Buffer.from("PAR1")])]);
}
