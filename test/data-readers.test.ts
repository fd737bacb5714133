import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gzipSync} from "node:zlib";
import {QloraError} from "../src/errors.js";
import {lineColumnAt, locateRecord, readRecords} from "../src/data/index.js";
import {DATASETS} from "./helpers/paths.js";
import {writeParquet, type ParquetColumn as Column} from "./helpers/parquet-writer.js";

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
        assert.deepEqual(
            read.records.map((r) => r.text),
            ["a", "b", "c"]
        );
        assert.deepEqual(read.sources[0].lines, [1, 3, 5]);
    });

    test("malformed JSONL reports the file and line", async () => {
        const file = await write("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n\n{"text": "c",}\n{"text": "d"}\n');
        const err = await rejectsWith(readRecords(file), /bad\.jsonl:4: invalid JSON \(/);
        assert.equal(err.file, `${file}:4`);
        await rejectsWith(
            readRecords(await write("notobject.jsonl", '{"text": "a"}\n[1, 2]\n')),
            /notobject\.jsonl:2: .*not a JSON object/
        );
    });

    test("invalid JSON reports the line computed from the error position", async () => {
        const file = await write("bad.json", '[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n');
        await rejectsWith(readRecords(file), /bad\.json:4: invalid JSON \(/);
        assert.deepEqual(lineColumnAt("ab\ncd\nef", 7), {line: 3, column: 2});
    });

    test("a .json file holding JSON Lines, {data: [...]} wrappers and gzipped JSONL", async () => {
        const lines = await readRecords(await write("lines.json", '{"text": "a"}\n{"text": "b"}\n'));
        assert.deepEqual(
            lines.records.map((r) => r.text),
            ["a", "b"]
        );
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
