import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {QloraError} from "../src/errors.js";
import {
    SafetensorsCheckpoint,
    SafetensorsFile,
    bf16ToF32,
    f16ToF32,
    f32ToBf16,
    f32ToF16,
    writeSafetensors,
    writeShardedSafetensors,
    type TensorToWrite
} from "../src/io/safetensors.js";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const sharedDir = path.resolve(repoRoot, "..", "shared");
const fixturesDir = path.join(sharedDir, "fixtures", "ref-qwen2");
const tinyQwenDir = path.join(sharedDir, "models", "tiny-qwen2");

let tempDir: string;
before(async () => {
    tempDir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-safetensors-"));
});
after(async () => {
    await fs.rm(tempDir, {recursive: true, force: true});
});

function f32Bits(value: number): number {
    return new Uint32Array(new Float32Array([value]).buffer)[0];
}

function bitsToF32(bits: number): number {
    return new Float32Array(new Uint32Array([bits]).buffer)[0];
}

/** every tensor dtype with a few values, including the awkward ones */
function sampleTensors(): TensorToWrite[] {
    return [
        {name: "f64", dtype: "F64", shape: [2, 2], data: new Float64Array([1.5, -2.25, Math.PI, -0])},
        {name: "f32", dtype: "F32", shape: [3], data: new Float32Array([1, -0.5, 3.25])},
        {name: "f16", dtype: "F16", shape: [2], data: new Uint16Array([0x3c00, 0xc000])}, // 1, -2
        {name: "bf16", dtype: "BF16", shape: [2], data: new Uint16Array([0x3f80, 0x4040])}, // 1, 3
        {name: "i64", dtype: "I64", shape: [3], data: new BigInt64Array([1n, -7n, 2147483647n])},
        {name: "i32", dtype: "I32", shape: [1, 3], data: new Int32Array([-1, 0, 2147483647])},
        {name: "i16", dtype: "I16", shape: [2], data: new Int16Array([-32768, 32767])},
        {name: "i8", dtype: "I8", shape: [3], data: new Int8Array([-128, 0, 127])}, // odd byte length: misaligns what follows
        {name: "u8", dtype: "U8", shape: [2], data: new Uint8Array([0, 255])},
        {name: "bool", dtype: "BOOL", shape: [3], data: new Uint8Array([1, 0, 1])},
        {name: "scalar", dtype: "F32", shape: [], data: new Float32Array([42])},
        {name: "empty", dtype: "F32", shape: [0, 4], data: new Float32Array(0)}
    ];
}

/** a file with a hand-made header, for corruption tests */
async function writeRawFile(name: string, header: unknown, dataBytes: number, headerLengthOverride?: bigint): Promise<string> {
    const json = Buffer.from(typeof header === "string" ? header : JSON.stringify(header), "utf8");
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(headerLengthOverride ?? BigInt(json.length));
    const filePath = path.join(tempDir, name);
    await fs.writeFile(filePath, Buffer.concat([length, json, Buffer.alloc(dataBytes)]));
    return filePath;
}

async function assertOpenFails(filePath: string, pattern: RegExp): Promise<void> {
    await assert.rejects(SafetensorsFile.open(filePath), (err: unknown) => {
        assert.ok(err instanceof QloraError, `expected a QloraError, got ${String(err)}`);
        assert.ok(err.message.includes(path.basename(filePath)), `message should name the file: ${err.message}`);
        assert.match(err.message, pattern);
        return true;
    });
}

describe("safetensors write/read round trip", () => {
    test("every dtype comes back bit-exact, with metadata", async () => {
        const filePath = path.join(tempDir, "all-dtypes.safetensors");
        const tensors = sampleTensors();
        await writeSafetensors(filePath, tensors, {format: "pt", note: "héllo"});

        // header padded so data starts 8-aligned, temp file gone
        const raw = await fs.readFile(filePath);
        assert.equal(Number(raw.readBigUInt64LE(0)) % 8, 0);
        assert.deepEqual(
            (await fs.readdir(tempDir)).filter((f) => f.includes(".tmp-")),
            []
        );

        const file = await SafetensorsFile.open(filePath);
        try {
            assert.deepEqual(file.metadata, {format: "pt", note: "héllo"});
            assert.deepEqual(
                file.names(),
                tensors.map((t) => t.name)
            );
            for (const tensor of tensors) {
                const data = tensor.data as ArrayBufferView;
                const info = file.info(tensor.name);
                assert.equal(info.dtype, tensor.dtype);
                assert.deepEqual(info.shape, tensor.shape);
                assert.equal(info.byteLength, data.byteLength);
                const bytes = await file.readBytes(tensor.name);
                assert.deepEqual(bytes, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
                const typed = await file.readTyped(tensor.name);
                assert.equal(typed.constructor, tensor.dtype === "BOOL" ? Uint8Array : data.constructor);
                assert.deepEqual(
                    Array.from(typed as ArrayLike<number | bigint>),
                    Array.from(data as unknown as ArrayLike<number | bigint>)
                );
            }
            assert.deepEqual(Array.from(await file.readF32("f64")), [1.5, -2.25, Math.fround(Math.PI), -0]);
            assert.deepEqual(Array.from(await file.readF32("f16")), [1, -2]);
            assert.deepEqual(Array.from(await file.readF32("bf16")), [1, 3]);
            assert.deepEqual(Array.from(await file.readI32("i64")), [1, -7, 2147483647]);
            assert.deepEqual(Array.from(await file.readI32("i8")), [-128, 0, 127]);
            assert.deepEqual(Array.from(await file.readI32("bool")), [1, 0, 1]);
            assert.deepEqual(Array.from(await file.readF32("scalar")), [42]);
            assert.equal((await file.readF32("empty")).length, 0);
        } finally {
            await file.close();
        }
    });

    test("readI32 refuses I64 values outside int32 and readF32 refuses integers", async () => {
        const filePath = path.join(tempDir, "range.safetensors");
        await writeSafetensors(filePath, [
            {name: "big", dtype: "I64", shape: [2], data: new BigInt64Array([5n, 3000000000n])},
            {name: "ids", dtype: "I32", shape: [1], data: new Int32Array([1])}
        ]);
        const file = await SafetensorsFile.open(filePath);
        try {
            await assert.rejects(file.readI32("big"), /"big" holds 3000000000 at index 1, outside the int32 range/);
            await assert.rejects(file.readF32("ids"), /"ids" is I32, not a floating-point tensor/);
            await assert.rejects(
                file.readBytes("nope"),
                (err: unknown) => err instanceof QloraError && /no tensor named "nope"/.test(err.message)
            );
        } finally {
            await file.close();
        }
    });

    test("writer validates data sizes and names and leaves nothing behind", async () => {
        const filePath = path.join(tempDir, "bad-write.safetensors");
        await assert.rejects(
            writeSafetensors(filePath, [{name: "x", dtype: "F32", shape: [2, 2], data: new Float32Array(3)}]),
            /tensor "x" is F32 \[2, 2\] \(16 bytes\) but its data has 12 bytes/
        );
        await assert.rejects(
            writeSafetensors(filePath, [
                {name: "x", dtype: "F32", shape: [1], data: new Float32Array(1)},
                {name: "x", dtype: "F32", shape: [1], data: new Float32Array(1)}
            ]),
            /given twice/
        );
        await assert.rejects(writeSafetensors(path.join(tempDir, "no-such-dir", "a.safetensors"), []), QloraError);
        assert.deepEqual(
            (await fs.readdir(tempDir)).filter((f) => f.startsWith("bad-write") || f.includes(".tmp-")),
            []
        );
    });

    test("sharded write gives HF names and an index, and reads back through the checkpoint", async () => {
        const dir = path.join(tempDir, "sharded");
        const tensors: TensorToWrite[] = [];
        for (let i = 0; i < 5; i++) {
            tensors.push({name: `layers.${i}.weight`, dtype: "F32", shape: [10], data: new Float32Array(10).fill(i)});
        }
        tensors.push({name: "ids", dtype: "I64", shape: [2], data: new BigInt64Array([3n, 4n])});
        // 40-byte tensors, 100-byte shards: two layers per shard; the 16-byte ids fit in the last one
        const result = await writeShardedSafetensors(dir, "model", tensors, 100, {format: "pt"});
        assert.equal(result.totalSize, 5 * 40 + 16);
        assert.deepEqual((await fs.readdir(dir)).sort(), [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json"
        ]);
        const index = JSON.parse(await fs.readFile(path.join(dir, "model.safetensors.index.json"), "utf8"));
        assert.deepEqual(index.metadata, {total_size: 216});
        assert.equal(index.weight_map["layers.4.weight"], "model-00003-of-00003.safetensors");
        assert.equal(index.weight_map.ids, "model-00003-of-00003.safetensors");
        assert.deepEqual(Object.keys(index.weight_map), Object.keys(index.weight_map).sort());

        const checkpoint = await SafetensorsCheckpoint.open(dir);
        try {
            assert.equal(checkpoint.files.length, 3);
            assert.equal(checkpoint.totalBytes, 216);
            assert.deepEqual(checkpoint.names().sort(), tensors.map((t) => t.name).sort());
            assert.ok(checkpoint.has("layers.2.weight") && !checkpoint.has("layers.9.weight"));
            assert.deepEqual(Array.from(await checkpoint.readF32("layers.3.weight")), new Array(10).fill(3));
            assert.deepEqual(Array.from(await checkpoint.readI32("ids")), [3, 4]);
            assert.equal(checkpoint.info("layers.0.weight").file, path.join(dir, "model-00001-of-00003.safetensors"));
            assert.equal(checkpoint.fileFor("ids").metadata.format, "pt");
        } finally {
            await checkpoint.close();
        }

        // a second save into a folder that already holds weights is refused and deletes nothing (the folder
        // writers fill fresh temporary folders); everything fits in one file: one model.safetensors, no index
        const before = (await fs.readdir(dir)).sort();
        await assert.rejects(
            writeShardedSafetensors(dir, undefined, tensors, 10_000),
            /already holds model-00001-of-00003\.safetensors/
        );
        assert.deepEqual((await fs.readdir(dir)).sort(), before);
        const singleDir = path.join(tempDir, "single");
        const single = await writeShardedSafetensors(singleDir, undefined, tensors, 10_000);
        assert.equal(single.indexFile, null);
        assert.deepEqual(await fs.readdir(singleDir), ["model.safetensors"]);
        const reopened = await SafetensorsCheckpoint.open(singleDir);
        assert.equal(reopened.indexPath, null);
        assert.equal(reopened.names().length, 6);
        await reopened.close();
    });

    test("lazy tensors are made one at a time as the writer reaches them; a wrong size is refused, nothing left", async () => {
        const dir = path.join(tempDir, "lazy");
        const made: string[] = [];
        let alive = 0,
            mostAlive = 0;
        // each producer's array is dropped by the writer before the next is asked for: at most one at a time
        const lazy = (name: string, value: number): TensorToWrite => ({
            name,
            dtype: "F32",
            shape: [10],
            data: async () => {
                made.push(name);
                mostAlive = Math.max(mostAlive, ++alive);
                await new Promise((r) => setImmediate(r));
                alive--;
                return new Float32Array(10).fill(value);
            }
        });
        const tensors = [lazy("a", 1), lazy("b", 2), lazy("c", 3)];
        assert.deepEqual(made, [], "nothing is made before writing");
        const result = await writeShardedSafetensors(dir, "model", tensors, 100);
        assert.deepEqual(made, ["a", "b", "c"]);
        assert.equal(mostAlive, 1);
        assert.equal(result.totalSize, 120);
        const ckpt = await SafetensorsCheckpoint.open(dir);
        assert.deepEqual(Array.from(await ckpt.readF32("c")), new Array(10).fill(3));
        await ckpt.close();
        const badPath = path.join(tempDir, "lazy-bad.safetensors");
        await assert.rejects(
            writeSafetensors(badPath, [lazy("a", 1), {name: "short", dtype: "F32", shape: [4], data: () => new Float32Array(3)}]),
            /tensor "short" is F32 \[4\] \(16 bytes\) but its data has 12 bytes/
        );
        assert.deepEqual(
            (await fs.readdir(tempDir)).filter((f) => f.startsWith("lazy-bad") || f.includes(".tmp-")),
            []
        );
    });

    test("a tensor larger than the shard limit gets a shard of its own", async () => {
        const dir = path.join(tempDir, "big-tensor");
        const result = await writeShardedSafetensors(
            dir,
            "model",
            [
                {name: "a", dtype: "U8", shape: [10], data: new Uint8Array(10)},
                {name: "huge", dtype: "U8", shape: [500], data: new Uint8Array(500)},
                {name: "b", dtype: "U8", shape: [10], data: new Uint8Array(10)}
            ],
            100
        );
        assert.deepEqual(
            result.files.map((f) => path.basename(f)),
            ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
        );
    });
});

describe("safetensors checkpoint errors", () => {
    test("a missing shard is named together with the index", async () => {
        const dir = path.join(tempDir, "missing-shard");
        await writeShardedSafetensors(
            dir,
            "model",
            [
                {name: "a", dtype: "F32", shape: [4], data: new Float32Array(4)},
                {name: "b", dtype: "F32", shape: [4], data: new Float32Array(4)}
            ],
            16
        );
        await fs.rm(path.join(dir, "model-00002-of-00002.safetensors"));
        await assert.rejects(SafetensorsCheckpoint.open(dir), (err: unknown) => {
            assert.ok(err instanceof QloraError);
            assert.match(err.message, /model\.safetensors\.index\.json/);
            assert.match(err.message, /"model-00002-of-00002\.safetensors"/);
            return true;
        });
    });

    test("an index that points at the wrong shard is reported", async () => {
        const dir = path.join(tempDir, "wrong-index");
        await writeShardedSafetensors(
            dir,
            "model",
            [
                {name: "a", dtype: "F32", shape: [4], data: new Float32Array(4)},
                {name: "b", dtype: "F32", shape: [4], data: new Float32Array(4)}
            ],
            16
        );
        const indexPath = path.join(dir, "model.safetensors.index.json");
        const index = JSON.parse(await fs.readFile(indexPath, "utf8"));
        index.weight_map.a = "model-00002-of-00002.safetensors";
        index.weight_map.b = "model-00001-of-00002.safetensors";
        await fs.writeFile(indexPath, JSON.stringify(index));
        await assert.rejects(
            SafetensorsCheckpoint.open(dir),
            /tensor "a" is in "model-00002-of-00002.safetensors", but it is in "model-00001-of-00002.safetensors"/
        );
    });

    test("a folder without weights says what it expected", async () => {
        const dir = path.join(tempDir, "no-weights");
        await fs.mkdir(dir);
        await fs.writeFile(path.join(dir, "pytorch_model.bin"), "x");
        await assert.rejects(
            SafetensorsCheckpoint.open(dir),
            /neither model\.safetensors nor model\.safetensors\.index\.json.*safe_serialization/
        );
        await assert.rejects(SafetensorsCheckpoint.open(path.join(tempDir, "does-not-exist")), QloraError);
    });
});

describe("safetensors header validation", () => {
    test("file shorter than 8 bytes", async () => {
        const filePath = path.join(tempDir, "tiny.safetensors");
        await fs.writeFile(filePath, Buffer.from([1, 2, 3]));
        await assertOpenFails(filePath, /3 bytes, too few/);
    });

    test("header length beyond the file", async () => {
        const filePath = await writeRawFile("long-header.safetensors", {}, 0, 5000n);
        await assertOpenFails(filePath, /says 5000 bytes but only 2 bytes follow/);
    });

    test("header length above 100 MB", async () => {
        const filePath = await writeRawFile("huge-header.safetensors", {}, 0, 1n << 40n);
        await assertOpenFails(filePath, /above safetensors' 100 MB limit/);
    });

    test("header that is not JSON", async () => {
        const filePath = await writeRawFile("bad-json.safetensors", '{"a": [1, 2', 0);
        await assertOpenFails(filePath, /not valid JSON/);
    });

    test("header that is not UTF-8", async () => {
        const json = Buffer.from([0x7b, 0xff, 0xfe, 0x7d]);
        const length = Buffer.alloc(8);
        length.writeBigUInt64LE(BigInt(json.length));
        const filePath = path.join(tempDir, "bad-utf8.safetensors");
        await fs.writeFile(filePath, Buffer.concat([length, json]));
        await assertOpenFails(filePath, /not valid UTF-8/);
    });

    test("header that is a JSON array", async () => {
        const filePath = await writeRawFile("array.safetensors", [1, 2], 0);
        await assertOpenFails(filePath, /not a JSON object/);
    });

    test("truncated data section", async () => {
        const filePath = await writeRawFile(
            "truncated.safetensors",
            {x: {dtype: "F32", shape: [25], data_offsets: [0, 100]}},
            60
        );
        await assertOpenFails(
            filePath,
            /header says tensor "x" ends at byte 100 but the file's data section has 60 bytes \(truncated download\? re-download the file\)/
        );
    });

    test("size that disagrees with shape and dtype", async () => {
        const filePath = await writeRawFile("size.safetensors", {x: {dtype: "BF16", shape: [2, 3], data_offsets: [0, 10]}}, 16);
        await assertOpenFails(filePath, /tensor "x" is BF16 \[2, 3\] \(12 bytes\) but its data_offsets \[0, 10\] span 10 bytes/);
    });

    test("overlapping tensors", async () => {
        const filePath = await writeRawFile(
            "overlap.safetensors",
            {
                a: {dtype: "F32", shape: [4], data_offsets: [0, 16]},
                b: {dtype: "F32", shape: [4], data_offsets: [8, 24]}
            },
            24
        );
        await assertOpenFails(filePath, /tensors "a" .* and "b" .* overlap/);
    });

    test("unknown dtype names the tensor", async () => {
        const filePath = await writeRawFile("dtype.safetensors", {w: {dtype: "F8_E4M3", shape: [4], data_offsets: [0, 4]}}, 4);
        await assertOpenFails(filePath, /tensor "w" has dtype "F8_E4M3", which qlora cannot read \(supported: F64, F32/);
    });

    test("bad shape, bad offsets and bad metadata", async () => {
        await assertOpenFails(
            await writeRawFile("shape.safetensors", {w: {dtype: "F32", shape: [2, -1], data_offsets: [0, 4]}}, 4),
            /tensor "w" has shape \[2,-1\]/
        );
        await assertOpenFails(
            await writeRawFile("offsets.safetensors", {w: {dtype: "F32", shape: [1], data_offsets: [4, 0]}}, 4),
            /tensor "w" has data_offsets \[4,0\]/
        );
        await assertOpenFails(
            await writeRawFile("meta.safetensors", {__metadata__: {format: 1}}, 0),
            /"__metadata__" key "format" is a number/
        );
    });

    test("a file can't be read after close", async () => {
        const filePath = path.join(tempDir, "closed.safetensors");
        await writeSafetensors(filePath, [{name: "x", dtype: "U8", shape: [1], data: new Uint8Array([7])}]);
        const file = await SafetensorsFile.open(filePath);
        await file.close();
        await file.close(); // idempotent
        await assert.rejects(file.readBytes("x"), /already closed/);
    });
});

describe("safetensors fixtures", () => {
    test("batch.safetensors: int64 [2, 64] input_ids, attention_mask, labels", async () => {
        const file = await SafetensorsFile.open(path.join(fixturesDir, "batch.safetensors"));
        try {
            for (const name of ["input_ids", "attention_mask", "labels"]) {
                const info = file.info(name);
                assert.equal(info.dtype, "I64");
                assert.deepEqual(info.shape, [2, 64]);
            }
            const inputIds = await file.readI32("input_ids");
            assert.deepEqual(Array.from(inputIds.subarray(0, 4)), [3915, 559, 1954, 621]); // 床前明月, as in greedy.json
            const typed = await file.readTyped("input_ids");
            assert.ok(typed instanceof BigInt64Array);
            assert.equal(typed[0], 3915n);
            const labels = await file.readI32("labels");
            assert.deepEqual(Array.from(labels.subarray(0, 5)), [-100, -100, -100, -100, -100]);
            const mask = await file.readI32("attention_mask");
            // row 1 is right-padded with 16381 where the mask is 0
            for (let t = 0; t < 64; t++) {
                if (mask[64 + t] === 0) assert.equal(inputIds[64 + t], 16381);
            }
        } finally {
            await file.close();
        }
    });

    test("tiny-qwen2 model folder: bf16 weights read as f32", async () => {
        const checkpoint = await SafetensorsCheckpoint.open(tinyQwenDir);
        try {
            assert.equal(checkpoint.indexPath, null);
            const embed = checkpoint.info("model.embed_tokens.weight");
            assert.equal(embed.dtype, "BF16");
            assert.deepEqual(embed.shape, [16384, 256]);
            const bits = (await checkpoint.readTyped("model.embed_tokens.weight")) as Uint16Array;
            const values = await checkpoint.readF32("model.embed_tokens.weight");
            assert.equal(values.length, 16384 * 256);
            for (const i of [0, 1, 12345, values.length - 1]) assert.equal(f32Bits(values[i]) >>> 16, bits[i]);
            assert.ok(values.every(Number.isFinite));
            assert.deepEqual(checkpoint.info("model.layers.0.self_attn.q_proj.bias").shape, [256]);
            assert.equal(
                checkpoint.totalBytes,
                checkpoint.names().reduce((sum, n) => sum + checkpoint.info(n).byteLength, 0)
            );
        } finally {
            await checkpoint.close();
        }
        // a single file path works the same way
        const single = await SafetensorsCheckpoint.open(path.join(tinyQwenDir, "model.safetensors"));
        assert.ok(single.has("model.norm.weight"));
        await single.close();
    });
});

describe("half-precision conversions", () => {
    test("f16 edge values decode exactly", () => {
        const bits = new Uint16Array([
            0x0000, 0x8000, 0x3c00, 0xc000, 0x7bff, 0x0400, 0x03ff, 0x0001, 0x8001, 0x7c00, 0xfc00, 0x3555
        ]);
        const values = f16ToF32(bits);
        assert.deepEqual(Array.from(values.subarray(0, 10)), [
            0,
            -0,
            1,
            -2,
            65504,
            2 ** -14,
            1023 * 2 ** -24,
            2 ** -24,
            -(2 ** -24),
            Infinity
        ]);
        assert.ok(Object.is(values[1], -0));
        assert.equal(values[10], -Infinity);
        assert.equal(values[11], Math.fround(0.333251953125));
        const nan = f16ToF32(new Uint16Array([0x7e00, 0x7c01]));
        assert.ok(Number.isNaN(nan[0]) && Number.isNaN(nan[1]));
    });

    test("f16 -> f32 -> f16 is the identity on all 65,536 bit patterns", () => {
        const all = new Uint16Array(65536).map((_, i) => i);
        assert.deepEqual(f32ToF16(f16ToF32(all)), all);
    });

    test("f32 -> f16 rounds to nearest even, overflows to inf, keeps subnormals", () => {
        const cases: Array<[number, number]> = [
            [65504, 0x7bff],
            [65519, 0x7bff], // just below the midpoint to inf
            [65520, 0x7c00], // the midpoint rounds to even, which is inf
            [1e6, 0x7c00],
            [-1e6, 0xfc00],
            [1 + 2 ** -11, 0x3c00], // tie between 1 and 1+2^-10: even is 1
            [1 + 3 * 2 ** -11, 0x3c02], // tie between 1+2^-10 and 1+2^-9: even is the latter
            [1 + 2 ** -11 + 2 ** -20, 0x3c01], // above the tie
            [2 ** -24, 0x0001],
            [2 ** -25, 0x0000], // tie between 0 and the smallest subnormal: even is 0
            [1.5 * 2 ** -25, 0x0001],
            [3 * 2 ** -25, 0x0002], // tie between subnormals 1 and 2: even is 2
            [2 ** -14 - 2 ** -25, 0x0400], // largest subnormal + half ulp rounds up into the normals
            [1e-10, 0x0000],
            [-1e-10, 0x8000],
            [Infinity, 0x7c00],
            [-Infinity, 0xfc00]
        ];
        const halves = f32ToF16(new Float32Array(cases.map(([value]) => value)));
        cases.forEach(([value, expected], i) =>
            assert.equal(halves[i], expected, `f32ToF16(${value}) = 0x${halves[i].toString(16)}`)
        );
        const nan = f32ToF16(new Float32Array([NaN, bitsToF32(0x7f800001), bitsToF32(0xffc00000)]));
        assert.ok(Array.from(f16ToF32(nan)).every(Number.isNaN));
        assert.equal(nan[2] & 0x8000, 0x8000); // sign kept
    });

    test("f32 -> f16 matches a nearest-value search on random inputs", () => {
        // independent reference: all finite positive halves in order, pick the nearest (ties to the even code)
        const positive = f16ToF32(new Uint16Array(0x7c00).map((_, i) => i));
        const nearestHalf = (x: number): number => {
            const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
            const a = Math.abs(x);
            if (a >= 65520) return sign | 0x7c00;
            let lo = 0;
            let hi = positive.length - 1;
            while (hi - lo > 1) {
                const mid = (lo + hi) >> 1;
                if (positive[mid] <= a) lo = mid;
                else hi = mid;
            }
            const dLo = a - positive[lo];
            const dHi = positive[hi] - a;
            const code = dLo < dHi ? lo : dHi < dLo ? hi : lo % 2 === 0 ? lo : hi;
            return sign | code;
        };
        let seed = 12345;
        const random = (): number => {
            seed = (seed * 1103515245 + 12345) >>> 0;
            return seed / 2 ** 32;
        };
        const inputs = new Float32Array(20000);
        for (let i = 0; i < inputs.length; i++) inputs[i] = (random() - 0.5) * 2 ** Math.floor(random() * 44 - 28);
        const halves = f32ToF16(inputs);
        for (let i = 0; i < inputs.length; i++) assert.equal(halves[i], nearestHalf(inputs[i]), `input ${inputs[i]}`);
    });

    test("bf16 conversions: widening is exact, narrowing rounds to nearest even and keeps NaN", () => {
        const all = new Uint16Array(65536).map((_, i) => i);
        const widened = bf16ToF32(all);
        for (const i of [0, 0x3f80, 0x8000, 0x7f7f, 0x0001]) assert.equal(f32Bits(widened[i]), (i << 16) >>> 0);
        // every non-NaN bf16 survives the round trip; NaNs stay NaN
        const back = f32ToBf16(widened);
        for (let i = 0; i < 65536; i++) {
            if (Number.isNaN(widened[i])) assert.ok(Number.isNaN(bf16ToF32(new Uint16Array([back[i]]))[0]));
            else assert.equal(back[i], i);
        }
        const cases: Array<[number, number]> = [
            [bitsToF32(0x3f808000), 0x3f80], // tie, even stays
            [bitsToF32(0x3f818000), 0x3f82], // tie, odd rounds up
            [bitsToF32(0x3f808001), 0x3f81], // above the tie
            [bitsToF32(0x7f7fffff), 0x7f80], // largest f32 rounds to inf
            [-0, 0x8000],
            [1, 0x3f80],
            [-Infinity, 0xff80]
        ];
        const narrowed = f32ToBf16(new Float32Array(cases.map(([value]) => value)));
        cases.forEach(([value, expected], i) => assert.equal(narrowed[i], expected, `f32ToBf16(${value})`));
        const nan = f32ToBf16(new Float32Array([NaN, bitsToF32(0x7f800001)]));
        assert.ok(Array.from(bf16ToF32(nan)).every(Number.isNaN));
    });

    test("conversions accept views at an offset", () => {
        const backing = new Float32Array([9, 1.5, -2]);
        const view = backing.subarray(1);
        assert.deepEqual(Array.from(f16ToF32(f32ToF16(view))), [1.5, -2]);
        assert.deepEqual(Array.from(bf16ToF32(f32ToBf16(view))), [1.5, -2]);
    });
});
