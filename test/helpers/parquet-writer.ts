// parquet-writer.ts: a minimal Parquet writer (thrift compact protocol, PLAIN pages, one row group) for the tests and the fuzz
// seeds, able to lie in chosen footer fields: the structural mutations of a Parquet file (sizes, counts, offsets,
// codec, types) that random byte flips rarely produce. Used by the reader tests and the fuzz seeds.
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

export type ParquetColumn = {name: string; kind: "string"; values: string[]} | {name: string; kind: "int64"; values: number[]};

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
}

export function writeParquet(columns: ParquetColumn[], codec: "none" | "gzip" = "none", lies: ParquetLies = {}): Buffer {
    const rows = columns[0].values.length;
    const chunks: Buffer[] = lies.dropMagic === "head" ? [] : [Buffer.from("PAR1")];
    let offset = chunks.length ? 4 : 0;
    const metas: {offset: number; size: number; uncompressed: number; column: ParquetColumn}[] = [];
    for (const column of columns) {
        const plain: Buffer[] = [];
        for (const v of column.values) {
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
        const raw = Buffer.concat(plain);
        const data = codec === "gzip" ? gzipSync(raw) : raw;
        const header = new Compact();
        header.beginStruct();
        header.i32(1, 0); // DATA_PAGE
        header.i32(2, lies.uncompressedPageSize ?? raw.length);
        header.i32(3, lies.compressedPageSize ?? data.length);
        header.beginStruct(5);
        header.i32(1, lies.numValues ?? rows);
        header.i32(2, 0); // PLAIN
        header.i32(3, 3); // RLE
        header.i32(4, 3);
        header.endStruct();
        header.endStruct();
        const page = Buffer.concat([Buffer.from(header.bytes), data]);
        metas.push({offset, size: page.length, uncompressed: header.bytes.length + raw.length, column});
        chunks.push(page);
        offset += page.length;
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
        meta.i32(3, lies.repetition ?? 0); // REQUIRED
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
        meta.list(2, 5, 1);
        meta.zigzag(0);
        meta.list(3, 8, 1);
        meta.rawBinary(m.column.name);
        meta.i32(4, lies.codec ?? (codec === "gzip" ? 2 : 0));
        meta.i64(5, lies.numValues ?? rows);
        meta.i64(6, m.uncompressed);
        meta.i64(7, m.size);
        meta.i64(9, lies.dataPageOffset ?? m.offset);
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
