import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gzipSync} from "node:zlib";
import {QloraError} from "../src/errors.js";
import {lineColumnAt, locateRecord, readRecords} from "../src/data/index.js";
import {DATASETS} from "./helpers/paths.js";

let dir: string;

before(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-data-readers-"));
});
after(async () => {
    await fs.rm(dir, {recursive: true, force: true});
});

async function write(name: string, content: string | Buffer): Promise<string> {
    const file = path.join(dir, name);
    await fs.mkdir(path.dirname(file), {recursive: true});
    await fs.writeFile(file, content);
    return file;
}

async function rejectsWith(promise: Promise<unknown>, pattern: RegExp): Promise<QloraError> {
    try {
        await promise;
    } catch (err) {
        assert.ok(err instanceof QloraError, `expected a QloraError, got ${String(err)}`);
        assert.match(err.message, pattern);
        return err;
    }
    assert.fail(`expected a rejection matching ${pattern}`);
}

// ---- a minimal Parquet writer (thrift compact protocol, PLAIN pages, one row group) to test the reader ----

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

type Column = {name: string; kind: "string"; values: string[]} | {name: string; kind: "int64"; values: number[]};

function writeParquet(columns: Column[], codec: "none" | "gzip"): Buffer {
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

describe("readRecords", () => {
    test("reads the shared JSON array and JSONL data sets", async () => {
        const zh = await readRecords(path.join(DATASETS, "alpaca_zh_demo.json"));
        assert.equal(zh.format, "json");
        assert.equal(zh.records.length, 1000);
        assert.deepEqual(Object.keys(zh.records[0]).sort(), ["input", "instruction", "output"]);
        const en = await readRecords(path.join(DATASETS, "alpaca_en_demo.json"));
        assert.equal(en.records.length, 999);
        const messages = await readRecords(path.join(DATASETS, "messages_demo.jsonl"));
        assert.equal(messages.format, "jsonl");
        assert.equal(messages.records.length, 500);
        assert.deepEqual(locateRecord(messages, 7), {file: path.join(DATASETS, "messages_demo.jsonl"), line: 8, indexInFile: 7});
        const sharegpt = await readRecords(path.join(DATASETS, "sharegpt_demo.json"));
        assert.equal(sharegpt.records.length, 500);
    });

    test("JSONL: blank lines are skipped and lines are remembered", async () => {
        const file = await write("blank.jsonl", '{"text": "a"}\n\n{"text": "b"}\r\n   \n{"text": "c"}');
        const read = await readRecords(file);
        assert.deepEqual(read.records.map((r) => r.text), ["a", "b", "c"]);
        assert.deepEqual(read.sources[0].lines, [1, 3, 5]);
    });

    test("malformed JSONL reports the file and line", async () => {
        const file = await write("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n\n{"text": "c",}\n{"text": "d"}\n');
        const err = await rejectsWith(readRecords(file), /bad\.jsonl:4: invalid JSON \(/);
        assert.equal(err.file, `${file}:4`);
        await rejectsWith(readRecords(await write("notobject.jsonl", '{"text": "a"}\n[1, 2]\n')), /notobject\.jsonl:2: .*not a JSON object/);
    });

    test("invalid JSON reports the line computed from the error position", async () => {
        const file = await write("bad.json", '[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n');
        await rejectsWith(readRecords(file), /bad\.json:4: invalid JSON \(/);
        assert.deepEqual(lineColumnAt("ab\ncd\nef", 7), {line: 3, column: 2});
    });

    test("a .json file holding JSON Lines, {data: [...]} wrappers and gzipped JSONL", async () => {
        const lines = await readRecords(await write("lines.json", '{"text": "a"}\n{"text": "b"}\n'));
        assert.deepEqual(lines.records.map((r) => r.text), ["a", "b"]);
        assert.equal(lines.format, "jsonl");
        const wrapped = await readRecords(await write("wrapped.json", '{"version": 1, "data": [{"text": "x"}]}'));
        assert.deepEqual(wrapped.records, [{text: "x"}]);
        const single = await readRecords(await write("single.json", '{"messages": [{"role": "user", "content": "hi"}]}'));
        assert.deepEqual(single.records, [{messages: [{role: "user", content: "hi"}]}]);
        const gz = await readRecords(await write("g.jsonl.gz", gzipSync(Buffer.from('{"text": "z"}\n'))));
        assert.deepEqual(gz.records, [{text: "z"}]);
        await rejectsWith(readRecords(await write("scalars.json", "[1, 2]")), /record 0 is a number, not an object/);
    });

    test("empty data sets are errors", async () => {
        await rejectsWith(readRecords(await write("empty.json", "[]")), /empty\.json: the dataset is empty/);
        await rejectsWith(readRecords(await write("empty.jsonl", "\n\n")), /empty\.jsonl: the dataset is empty/);
        await rejectsWith(readRecords(path.join(dir, "missing.jsonl")), /no such file or folder/);
        await rejectsWith(readRecords(await write("data.csv", "a,b")), /not a dataset file/);
    });

    test("Parquet, uncompressed and gzip, with int64 columns as numbers", async () => {
        const columns: Column[] = [
            {name: "instruction", kind: "string", values: ["把下面的数字相加。", "Count the letters."]},
            {name: "input", kind: "string", values: ["3 5", "apple"]},
            {name: "output", kind: "string", values: ["8", "5"]},
            {name: "id", kind: "int64", values: [7, 9]}
        ];
        for (const codec of ["none", "gzip"] as const) {
            const read = await readRecords(await write(`pq-${codec}/train.parquet`, writeParquet(columns, codec)));
            assert.equal(read.format, "parquet");
            assert.deepEqual(read.records, [
                {instruction: "把下面的数字相加。", input: "3 5", output: "8", id: 7},
                {instruction: "Count the letters.", input: "apple", output: "5", id: 9}
            ]);
        }
        await rejectsWith(readRecords(await write("broken.parquet", "PAR1 not really")), /cannot read it as Parquet/);
    });

    test("folders: train/valid/test files, shards, split folders", async () => {
        await write("mlx/train.jsonl", '{"text": "train"}\n');
        await write("mlx/valid.jsonl", '{"text": "valid"}\n');
        await write("mlx/test.jsonl", '{"text": "test"}\n');
        assert.deepEqual((await readRecords(path.join(dir, "mlx"))).records, [{text: "train"}]);
        assert.deepEqual((await readRecords(path.join(dir, "mlx"), {split: "valid"})).records, [{text: "valid"}]);
        assert.deepEqual((await readRecords(path.join(dir, "mlx"), {split: "test"})).records, [{text: "test"}]);

        await write("json/train.json", '[{"text": "j"}]');
        assert.deepEqual((await readRecords(path.join(dir, "json"))).records, [{text: "j"}]);

        const shard = (text: string): Buffer => writeParquet([{name: "text", kind: "string", values: [text]}], "none");
        await write("hub/data/train-00000-of-00002.parquet", shard("s0"));
        await write("hub/data/train-00001-of-00002.parquet", shard("s1"));
        await write("hub/data/validation-00000-of-00001.parquet", shard("v"));
        const hub = await readRecords(path.join(dir, "hub"));
        assert.deepEqual(hub.records, [{text: "s0"}, {text: "s1"}]);
        assert.equal(hub.sources.length, 2);
        assert.deepEqual((await readRecords(path.join(dir, "hub"), {split: "valid"})).records, [{text: "v"}]);

        await write("plain/a.parquet", shard("a"));
        await write("plain/b.jsonl", '{"text": "b"}\n');
        assert.deepEqual((await readRecords(path.join(dir, "plain"))).records, [{text: "a"}, {text: "b"}]);

        await rejectsWith(readRecords(path.join(dir, "mlx"), {split: "nope"}), /has no "nope" split/);
        await write("arrow/data-00000-of-00001.arrow", "x");
        await rejectsWith(readRecords(path.join(dir, "arrow")), /Arrow files/);
    });
});
