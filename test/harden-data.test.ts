// Issue 8, finding 2 and the data readers: datasets of a million rows load (no call-stack overflow, no copy of
// the whole file per stage), and malformed data files give one QloraError naming the file and line (JSONL) or
// record (JSON, Parquet) instead of a crash, a hang or silently changed data.
import {describe, test, before} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdirSync, symlinkSync, writeFileSync} from "node:fs";
import path from "node:path";
import {gzipSync} from "node:zlib";
import {QloraError} from "../src/errors.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {bestFitDecreasing, collate, DataLoader, loadDataset, readRecords} from "../src/data/index.js";
import type {DataTokenizer, TokenizedRow} from "../src/data/index.js";
import {expectError, metrics, qlora, scratch, TINY} from "./helpers/harden-train.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";
import {writeParquet} from "./helpers/parquet-writer.js";

const dir = scratch("harden-data");

function write(name: string, content: string | Buffer): string {
    const file = path.join(dir, name);
    mkdirSync(path.dirname(file), {recursive: true});
    writeFileSync(file, content);
    return file;
}

/**
 * A tokenizer for scale tests: one id per space-separated word, the number itself for a numeric word, else the
 * word's length; no EOS. Cheap, so a million rows measure the data layer, not tokenization.
 */
const wordTokenizer: DataTokenizer = {
    encode: (text) => text.split(" ").map((w) => (/^\d+$/.test(w) ? Number(w) : w.length)),
    applyChatTemplate: () => "",
    eosTokenId: null,
    padTokenId: 0,
    idToToken: () => null,
    tokenToId: () => null
};

/** the QloraError `promise` rejects with; fails on any other outcome (a TypeError, a RangeError, success) */
async function qloraError(promise: Promise<unknown>, ...fragments: (string | RegExp)[]): Promise<QloraError> {
    let caught: unknown;
    try {
        await promise;
    } catch (err) {
        caught = err;
    }
    assert.ok(
        caught instanceof QloraError,
        `expected a QloraError, got ${caught instanceof Error ? caught.stack : String(caught)}`
    );
    assert.equal(caught.message.split("\n").length, 1, `one line: ${caught.message}`);
    for (const f of fragments)
        assert.match(caught.message, typeof f === "string" ? new RegExp(f.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")) : f);
    return caught;
}

describe("a million rows", () => {
    const N = 1_000_000;
    // row i is "t <i>": two tokens, [1, i], so the order and the content of every row can be checked
    const checkRows = (rows: readonly TokenizedRow[]): void => {
        assert.equal(rows.length, N);
        for (let i = 0; i < N; i += 9973) assert.deepEqual(Array.from(rows[i].inputIds), [1, i], `row ${i}`);
        assert.deepEqual(Array.from(rows[N - 1].inputIds), [1, N - 1]);
    };

    test("JSONL and a JSON array of 1M rows load through loadDataset, every row in order", {timeout: 120_000}, async () => {
        const lines: string[] = new Array(N);
        for (let i = 0; i < N; i++) lines[i] = `{"text":"t ${i}"}`;
        const jsonl = write("million.jsonl", lines.join("\n") + "\n");
        const json = write("million.json", "[" + lines.join(",\n") + "]");
        lines.length = 0;
        for (const file of [jsonl, json]) {
            const data = await loadDataset(file, wordTokenizer, {max_seq_length: 64});
            assert.equal(data.stats.records, N);
            assert.equal(data.stats.tokens, 2 * N);
            assert.equal(data.stats.targets, N); // one target per row after the shift
            assert.equal(data.stats.lengths.length, N);
            checkRows(data.rows);
            // the tokens live in a few large shared buffers, not in two small arrays per row (which cost ~1 KB a row)
            const buffers = new Set<ArrayBufferLike>();
            for (const row of data.rows) buffers.add(row.inputIds.buffer).add(row.labels.buffer);
            assert.ok(buffers.size <= 8, `${buffers.size} buffers`);
            // a batch of many rows and a loader over all of them
            const loader = new DataLoader(data.rows, {batchSize: 4, padTokenId: 0, seed: 1});
            assert.equal(loader.batchesPerEpoch, N / 4);
            assert.equal(loader.next().batch.B, 4);
        }
    });

    test("qlora train starts training on 150k rows (a spread of the rows into Math.max overflowed the stack at ~120k)", {
        timeout: 120_000
    }, () => {
        const rows = Array.from({length: 150_000}, (_, i) => `{"text": "n ${i}"}`).join("\n");
        const file = write("150k.jsonl", rows + "\n");
        const out = path.join(dir, "150k-out");
        const r = qlora(dir, "train", "--dataset", file, "--max_steps", "1", "--output_dir", out, ...TINY);
        assert.equal(r.code, 0, r.stderr);
        assert.match(r.stdout, /\(text, 150000 rows, \d+ tokens\)/);
        const train = metrics(out).filter((m) => m.type === "train");
        assert.equal(train.length, 1);
        assert.ok(Number.isFinite(train[0].loss), JSON.stringify(train[0]));
    });

    test("collating 300k rows in one batch does not spread them into Math.max", () => {
        const ids = Int32Array.of(5, 6);
        const rows: TokenizedRow[] = Array.from({length: 300_000}, () => ({inputIds: ids, labels: ids}));
        rows[123_456] = {inputIds: Int32Array.of(1, 2, 3), labels: Int32Array.of(1, 2, 3)};
        const batch = collate(rows, {padTokenId: 0});
        assert.equal(batch.B, 300_000);
        assert.equal(batch.T, 3);
        assert.equal(batch.numTargets, 300_001);
    });

    test("best-fit-decreasing packs 1M sequences in linear time (no Array.shift over long queues)", () => {
        // 500k bins of 40 tokens, then 500k sequences of 24 that each take the oldest bin with 24 left: with
        // Array.prototype.shift on one queue of 500k bins this took 15 s on an idle machine (quadratic), now < 1 s
        const lengths = Array.from({length: N}, (_, i) => (i % 2 === 0 ? 40 : 24));
        const start = Date.now();
        const bins = bestFitDecreasing(lengths, 64);
        const seconds = (Date.now() - start) / 1000;
        assert.ok(seconds < 10, `packing 1M sequences took ${seconds} s`);
        assert.equal(bins.length, N / 2);
        assert.deepEqual(bins[0], [0, 1]);
        assert.deepEqual(bins[N / 2 - 1], [N - 2, N - 1]);
    });
});

describe("malformed data files", () => {
    let tokenizer: HfTokenizer;
    before(async () => {
        tokenizer = await HfTokenizer.load(MODEL_DIR);
    });
    const load = (file: string, options = {}) => loadDataset(file, tokenizer, options);
    const alpaca = (fields: Record<string, unknown>): string =>
        JSON.stringify({instruction: "add 3 5", input: "", output: "8", ...fields});

    test("wrong field types name the line (JSONL) or the record (JSON)", async () => {
        const good = alpaca({});
        const number = write("number.jsonl", `${good}\n${alpaca({output: 8})}\n`);
        await qloraError(load(number), `${number}:2: record 1: "output" is a number, not a string (write it in quotes: "8")`);
        const nul = write("null.jsonl", `${good}\n\n${alpaca({instruction: null})}\n`);
        await qloraError(load(nul), `${nul}:3: record 1: "instruction" is null, not a string`);
        // a null value is named as null, not as a missing key (Parquet and HF datasets rows hold nulls)
        const nullPrompt = write("null-prompt.jsonl", `{"prompt": null, "completion": "8"}\n`);
        await qloraError(
            load(nullPrompt),
            `${nullPrompt}:1: record 0: "prompt" is null, not a string or a list of messages; prompt_completion records need`
        );
        const nullField = write("null-field.jsonl", `{"q": null, "a": "8"}\n`);
        await qloraError(
            load(nullField, {dataset_format: "template", template: "Q: {q}\nA: ", response_field: "a"}),
            `${nullField}:1: record 0: "q" is null; the template needs "q", "a"`
        );
        const nested = write("nested.json", `[${good}, ${good}, ${alpaca({instruction: {text: "add"}})}]`);
        await qloraError(load(nested), `${nested}: record 2: "instruction" is an object, not a string`);
        const list = write("list.jsonl", `{"text": ["a", "b"]}\n`);
        await qloraError(load(list), `${list}:1: record 0: "text" is an array, not a string`);
        const role = write("role.jsonl", `{"messages": [{"role": 1, "content": "hi"}]}\n`);
        await qloraError(load(role), `${role}:1: record 0: messages[0] has no "role"`);
        // pre-tokenized ids must be token ids of the tokenizer (they index the embedding table)
        const ids = write("ids.jsonl", `{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 99999999]}\n`);
        await qloraError(
            load(ids),
            `${ids}:2: record 1: input_ids[1] is 99999999, not a token id (0 to ${tokenizer.vocabSize - 1})`
        );
        const negative = write("negative.jsonl", `{"input_ids": [1, 2], "labels": [-100, -5]}\n`);
        await qloraError(load(negative), `${negative}:1: record 0: labels[1] is -5, not a token id`);
    });

    test("bytes that are not UTF-8 are refused with their line, not decoded to U+FFFD", async () => {
        const bad = Buffer.concat([
            Buffer.from(`${alpaca({})}\n${alpaca({})}\n{"instruction": "a`),
            Buffer.from([0xff, 0xfe]),
            Buffer.from(`", "output": "b"}\n`)
        ]);
        const jsonl = write("latin1.jsonl", bad);
        await qloraError(
            load(jsonl),
            `${jsonl}:3: the line is not valid UTF-8 (byte 0xff at byte 19 of the line); save the file as UTF-8`
        );
        const json = write(
            "latin1.json",
            Buffer.concat([Buffer.from("[\n"), bad.subarray(0, bad.length - 1), Buffer.from("]\n")])
        );
        await qloraError(load(json), `${json}:4: the line is not valid UTF-8 (byte 0xff`);
        // a surrogate encoded in UTF-8 (CESU-8) is not UTF-8 either
        const cesu = write(
            "cesu.jsonl",
            Buffer.concat([Buffer.from('{"text": "'), Buffer.from([0xed, 0xa0, 0x80]), Buffer.from('"}\n')])
        );
        await qloraError(load(cesu), `${cesu}:1: the line is not valid UTF-8 (byte 0xed at byte 11`);
        const utf16 = write("utf16.jsonl", Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(`${alpaca({})}\n`, "utf16le")]));
        await qloraError(load(utf16), `${utf16}: is UTF-16 text`);
    });

    test("a BOM and CRLF line ends are read as the text they frame; CR-only line ends are named", async () => {
        const records = [{text: "first"}, {text: "second"}];
        const crlf = records.map((r) => JSON.stringify(r)).join("\r\n") + "\r\n";
        for (const name of ["bom.jsonl", "bom.json"]) {
            const body = name.endsWith(".json") ? `[${records.map((r) => JSON.stringify(r)).join(",\r\n")}]\r\n` : crlf;
            const read = await readRecords(write(name, Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(body)])));
            assert.deepEqual(read.records, records, name);
        }
        const gz = await readRecords(write("crlf.jsonl.gz", gzipSync(Buffer.from(crlf))));
        assert.deepEqual(gz.records, records);
        const cr = write("cr.jsonl", records.map((r) => JSON.stringify(r)).join("\r") + "\r");
        await qloraError(readRecords(cr), `${cr}:1: invalid JSON (`, "the file has CR line ends");
    });

    test("a line longer than 64 MiB is refused without reading the file into one string", async () => {
        const huge = write("huge.jsonl", Buffer.concat([Buffer.from(`${alpaca({})}\n`), Buffer.alloc((64 << 20) + 1, "a")]));
        await qloraError(readRecords(huge), `${huge}:2: the line is longer than 64 MiB`);
    });

    test("empty lines are skipped and later lines keep their numbers", async () => {
        const file = write("gaps.jsonl", `\n${alpaca({})}\n\n   \n\r\n${alpaca({})}\n\n{"instruction": "x", "output": 1}\n`);
        await qloraError(load(file), `${file}:8: record 2: "output" is a number`);
        const blank = write("blank.jsonl", "\n \n\r\n");
        await qloraError(load(blank), `${blank}: the dataset is empty`);
    });

    test("a JSON top level that is not an array of objects", async () => {
        const text = write("string.json", '"hello"');
        await qloraError(load(text), `${text}: holds a string ("hello"); it should hold a JSON array of records`);
        const numbers = write("numbers.json", "[1, 2]");
        await qloraError(load(numbers), `${numbers}: record 0 is a number, not an object`);
        const mixed = write("mixed.json", `[${alpaca({})}, [1], null]`);
        await qloraError(load(mixed), `${mixed}: record 1 is an array, not an object`);
        const nul = write("null.json", "null");
        await qloraError(load(nul), `${nul}: holds null`);
        const truncated = write("truncated.json", `[${alpaca({})},\n${alpaca({})}`);
        await qloraError(load(truncated), `${truncated}:2: invalid JSON (`);
        // V8 quotes the text around a syntax error, line ends included: the message stays one line
        const quoted = write("quoted.json", `[${alpaca({})},\n}]`);
        await qloraError(load(quoted), `${quoted}: invalid JSON (Unexpected token '}', ..."ut":"8"},\\n}]" is not valid JSON)`);
    });

    test("deeply nested JSON is a QloraError, whether the parser or a later step hits the depth", async () => {
        const depth = 1_000_000;
        const arrays = write("deep.json", "[".repeat(depth) + "]".repeat(depth));
        await qloraError(load(arrays), `${arrays}: record 0 is an array, not an object`);
        const line = write("deep.jsonl", `{"text": ${"[".repeat(depth / 10)}${"]".repeat(depth / 10)}}\n`);
        await qloraError(load(line), `${line}:1: record 0: "text" is an array, not a string`);
        // where JSON.parse itself gives up on the depth (V8 versions differ), its RangeError becomes a QloraError
        const parse = JSON.parse;
        JSON.parse = () => {
            throw new RangeError("Maximum call stack size exceeded");
        };
        try {
            await qloraError(
                load(arrays),
                `${arrays}: cannot be parsed as JSON (Maximum call stack size exceeded): it nests too deeply`
            );
            await qloraError(
                load(line),
                `${line}:1: cannot be parsed as JSON (Maximum call stack size exceeded): it nests too deeply`
            );
        } finally {
            JSON.parse = parse;
        }
        // a template renders a nested value with JSON.stringify, which recurses
        const objects = write(
            "deep-object.jsonl",
            `{"meta": ${'{"a":'.repeat(200_000)}1${"}".repeat(200_000)}, "output": "x"}\n`
        );
        await qloraError(
            load(objects, {template: "{meta} {output}"}),
            `${objects}:1: record 0: "meta" is nested too deeply to place in the template as JSON`
        );
    });

    test("Parquet: a truncated file, a damaged row group, no usable columns", async () => {
        const columns = [
            {name: "instruction", kind: "string" as const, values: ["add 3 5", "add 1 1"]},
            {name: "output", kind: "string" as const, values: ["8", "2"]}
        ];
        const whole = writeParquet(columns, "none");
        const ok = write("pq/ok.parquet", whole);
        assert.equal((await load(ok)).stats.records, 2);
        const cut = write("pq/cut.parquet", whole.subarray(0, whole.length - 9));
        await qloraError(load(cut), `${cut}: cannot read it as Parquet: `);
        const tiny = write("pq/tiny.parquet", whole.subarray(0, 3));
        await qloraError(load(tiny), `${tiny}: cannot read it as Parquet: `);
        // the footer intact, the pages zeroed: the row group cannot be decoded
        const footerStart = whole.length - 8 - whole.readUInt32LE(whole.length - 8);
        const hollow = write(
            "pq/hollow.parquet",
            Buffer.concat([whole.subarray(0, 4), Buffer.alloc(footerStart - 4), whole.subarray(footerStart)])
        );
        await qloraError(load(hollow), `${hollow}: cannot read records 0–1 (row group 0) as Parquet: `);
        // a column chunk naming a column the schema lacks, after a column whose page is damaged: hyparquet notices
        // the name while the first column's read is under way, and that read's failure used to escape as an
        // unhandled rejection (which ends the process)
        const renamed = Buffer.from(whole);
        renamed.write("outQut", renamed.lastIndexOf("output"));
        renamed.writeUInt32LE(0x7fffff00, renamed.indexOf("add 3 5") - 4);
        const leaked: unknown[] = [];
        const onLeak = (reason: unknown): void => void leaked.push(reason);
        process.on("unhandledRejection", onLeak);
        try {
            const file = write("pq/renamed.parquet", renamed);
            await qloraError(
                load(file),
                `${file}: cannot read it as Parquet: row group 0 holds a column "outQut" its schema does not have`
            );
            await new Promise((resolve) => setTimeout(resolve, 50));
            assert.deepEqual(leaked, []);
        } finally {
            process.off("unhandledRejection", onLeak);
        }
        const idsOnly = write("pq/ids.parquet", writeParquet([{name: "id", kind: "int64", values: [1, 2]}], "none"));
        await qloraError(load(idsOnly), `${idsOnly}: record 0: cannot tell the dataset format from its keys (id)`);
    });

    test("a corrupt gzip file", async () => {
        const whole = gzipSync(Buffer.from(`${alpaca({})}\n`.repeat(1000)));
        const cut = write("cut.jsonl.gz", whole.subarray(0, whole.length >> 1));
        await qloraError(load(cut), `${cut}: is not valid gzip data (`);
        const notGzip = write("plain.json.gz", "[]");
        await qloraError(load(notGzip), `${notGzip}: is not valid gzip data (`);
    });

    test("a FIFO or a device as the dataset fails at once instead of waiting for a writer", {timeout: 30_000}, async () => {
        const fifo = path.join(dir, "fifo.jsonl");
        const made = spawnSync("mkfifo", [fifo]);
        assert.equal(made.status, 0, `mkfifo: ${made.stderr}`);
        await qloraError(load(fifo), `${fifo}: expected a regular dataset file, found a FIFO (named pipe)`);
        const fifoDir = path.join(dir, "fifo-dir");
        mkdirSync(fifoDir);
        assert.equal(spawnSync("mkfifo", [path.join(fifoDir, "train.jsonl")]).status, 0);
        await qloraError(load(fifoDir), `${fifoDir}: has no "train" split`);
        // a device: /dev/zero would never end
        const device = path.join(dir, "zero.jsonl");
        symlinkSync("/dev/zero", device);
        await qloraError(load(device), `${device}: expected a regular dataset file, found a device`);
    });

    test("qlora train --dataset FIFO exits with one line instead of hanging", {timeout: 120_000}, () => {
        const fifo = path.join(dir, "cli-fifo.jsonl");
        assert.equal(spawnSync("mkfifo", [fifo]).status, 0);
        const r = spawnSync(
            process.execPath,
            [
                "--import",
                "tsx",
                path.join(REPO_ROOT, "src", "cli", "main.ts"),
                "train",
                "--dataset",
                fifo,
                "--max_steps",
                "1",
                "--output_dir",
                path.join(dir, "cli-fifo-out"),
                ...TINY
            ],
            {encoding: "utf8", cwd: REPO_ROOT, timeout: 100_000}
        );
        assert.notEqual(r.signal, "SIGTERM", "timed out: the FIFO was opened for a blocking read");
        expectError({code: r.status, stdout: r.stdout, stderr: r.stderr}, fifo, "FIFO (named pipe)");
    });

    test("linked data files in a dataset folder are read (the Hugging Face cache links every file)", async () => {
        const target = write("blobs/abc123", `${alpaca({})}\n`);
        const snapshot = path.join(dir, "snapshot");
        mkdirSync(snapshot);
        symlinkSync(target, path.join(snapshot, "train.jsonl"));
        assert.equal((await readRecords(snapshot)).records.length, 1);
    });
});

describe("DataLoader.seek", () => {
    const rows: TokenizedRow[] = Array.from({length: 10}, (_, i) => ({
        inputIds: Int32Array.of(i, 1),
        labels: Int32Array.of(i, 1)
    }));

    test("refuses a position that does not fit the data with a QloraError", () => {
        const loader = new DataLoader(rows, {batchSize: 3, padTokenId: 0}); // 4 batches an epoch
        const state = loader.position.rngState;
        const refuse = (position: unknown, fragment: string): void => {
            assert.throws(
                () => loader.seek(position as never),
                (err: unknown) => {
                    assert.ok(err instanceof QloraError, `a QloraError, got ${String(err)}`);
                    assert.match(err.message, /^invalid data loader position /);
                    assert.ok(err.message.includes(fragment), err.message);
                    assert.ok(err.message.includes("this data makes 4 batches an epoch (10 rows, batch size 3)"), err.message);
                    return true;
                }
            );
        };
        refuse({epoch: 0, index: 5, rngState: state}, "the batch index must be a whole number from 0 to 4");
        refuse({epoch: 0, index: 1.5, rngState: state}, "the batch index must be");
        refuse({epoch: -1, index: 0, rngState: state}, "the epoch must be a whole number ≥ 0");
        refuse({epoch: 0, index: 0, rngState: [1, 2, 3]}, "the generator state must be 4 whole numbers");
        refuse({epoch: 0, index: 0, rngState: [1, 2, 3, 2 ** 32]}, "the generator state must be 4 whole numbers");
        refuse({epoch: 0, index: 0, rngState: [0, 0, 0, 0]}, "the generator state is all zeros");
        refuse(null, "it is not an object");
        // the loader is where it was; a position that fits still works, the end of an epoch included
        assert.deepEqual(loader.position, {epoch: 0, index: 0, rngState: state});
        loader.seek({epoch: 2, index: 4, rngState: state});
        assert.deepEqual([loader.position.epoch, loader.position.index], [3, 0]);
    });
});
