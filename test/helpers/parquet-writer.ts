// parquet-writer.ts: a minimal Parquet writer (thrift compact protocol, PLAIN pages, one row group) to test the
// reader with; hyparquet only reads.
import {gzipSync} from "node:zlib";

class Compact {
    bytes: number[] = [];
    private last: number[] = [0];
    varint(v: bigint | number): void {
        let x = BigInt(v);
        while (x >= 0x80n) {
            this.bytes.push(Number(x & 0x7fn) | 0x80);
            x >>= 7n;
        }
        this.bytes.push(Number(x));
    }
    zigzag(v: number | bigint): void {
        const x = BigInt(v);
        this.varint(x >= 0n ? x << 1n : ((-x) << 1n) - 1n);
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
    i32(id: number, v: number): void {
        this.field(id, 5);
        this.zigzag(v);
    }
    i64(id: number, v: number): void {
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

export type Column = {name: string; kind: "string"; values: string[]} | {name: string; kind: "int64"; values: number[]};

export function writeParquet(columns: Column[], codec: "none" | "gzip"): Buffer {
    const rows = columns[0].values.length;
    const chunks: Buffer[] = [Buffer.from("PAR1")];
    let offset = 4;
    const metas: {offset: number; size: number; uncompressed: number; column: Column}[] = [];
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
        header.i32(2, raw.length);
        header.i32(3, data.length);
        header.beginStruct(5);
        header.i32(1, rows);
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
    const meta = new Compact();
    meta.beginStruct();
    meta.i32(1, 1);
    meta.list(2, 12, columns.length + 1);
    meta.beginStruct();
    meta.binary(4, "schema");
    meta.i32(5, columns.length);
    meta.endStruct();
    for (const column of columns) {
        meta.beginStruct();
        meta.i32(1, column.kind === "string" ? 6 : 2); // BYTE_ARRAY / INT64
        meta.i32(3, 0); // REQUIRED
        meta.binary(4, column.name);
        if (column.kind === "string") meta.i32(6, 0); // UTF8
        meta.endStruct();
    }
    meta.i64(3, rows);
    meta.list(4, 12, 1);
    meta.beginStruct();
    meta.list(1, 12, columns.length);
    for (const m of metas) {
        meta.beginStruct();
        meta.i64(2, m.offset);
        meta.beginStruct(3);
        meta.i32(1, m.column.kind === "string" ? 6 : 2);
        meta.list(2, 5, 1);
        meta.zigzag(0);
        meta.list(3, 8, 1);
        meta.rawBinary(m.column.name);
        meta.i32(4, codec === "gzip" ? 2 : 0);
        meta.i64(5, rows);
        meta.i64(6, m.uncompressed);
        meta.i64(7, m.size);
        meta.i64(9, m.offset);
        meta.endStruct();
        meta.endStruct();
    }
    meta.i64(2, metas.reduce((s, m) => s + m.size, 0));
    meta.i64(3, rows);
    meta.endStruct();
    meta.endStruct();
    const footer = Buffer.from(meta.bytes);
    const length = Buffer.alloc(4);
    length.writeUInt32LE(footer.length);
    return Buffer.concat([...chunks, footer, length, Buffer.from("PAR1")]);
}
