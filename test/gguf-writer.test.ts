// The GGUF v3 writer: the byte layout (SPEC-gguf §1) read back by @huggingface/gguf and node-llama-cpp's reader,
// typed metadata, the strict offset rule, streamed tensor data, and failures that leave nothing under the name.
import {after, test} from "node:test";
import assert from "node:assert/strict";
import {existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {readGgufFileInfo} from "node-llama-cpp";
import {isQloraError} from "../src/errors.js";
import {alignUp, GgufMetadata, writeGguf, type GgufTensor} from "../src/io/gguf.js";
import {encodeTensor, GgmlType} from "../src/io/gguf-quants.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-gguf-writer-"));
after(() => rmSync(tmp, {recursive: true, force: true}));

function sampleMetadata(): GgufMetadata {
    return new GgufMetadata()
        .string("general.architecture", "qwen2")
        .string("general.type", "adapter")
        .u32("test.u32", 4000000000)
        .i32("test.i32", -7)
        .f32("test.f32", 0.5)
        .bool("test.bool", true)
        .u64("test.u64", 2n ** 40n)
        .set("test.u8", {type: "u8", value: 255})
        .set("test.f64", {type: "f64", value: Math.PI})
        .string("test.utf8", "床前明月光 Ġthe")
        .array("test.strings", "string", ["a", "Ġb", "中文"])
        .array("test.i32s", "i32", [1, -2, 3]);
}

const values = (n: number, seed: number) => Float32Array.from({length: n}, (_, i) => Math.sin(i * 0.37 + seed));

test("a file with every metadata type and three tensor types reads back, offsets following the running aligned sum", async () => {
    const file = path.join(tmp, "sample.gguf");
    const a = values(48 * 3, 1); // F32 [48, 3]
    const b = values(5, 2); // F32 [5]: 20 bytes, padded to 32
    const c = values(64 * 4, 3); // Q8_0 [64, 4], streamed in row chunks
    const tensors: GgufTensor[] = [
        {name: "a.weight", type: GgmlType.F32, ne: [48, 3], data: () => encodeTensor(GgmlType.F32, a, 48, 3)},
        {name: "b.bias", type: GgmlType.F32, ne: [5], data: () => encodeTensor(GgmlType.F32, b, 5, 1)},
        {
            name: "c.weight",
            type: GgmlType.Q8_0,
            ne: [64, 4],
            data: async function* () {
                for (let r = 0; r < 4; r++) yield encodeTensor(GgmlType.Q8_0, c.subarray(r * 64, (r + 1) * 64), 64, 1);
            }
        },
        {name: "d.weight", type: GgmlType.F16, ne: [3, 2], data: () => [encodeTensor(GgmlType.F16, values(6, 4), 3, 2)]}
    ];
    const seen: string[] = [];
    const result = await writeGguf(file, {metadata: sampleMetadata(), tensors}, {onTensor: (_, t) => seen.push(t.name)});
    assert.deepEqual(seen, ["a.weight", "b.bias", "c.weight", "d.weight"]);
    const bytes = readFileSync(file);
    assert.equal(result.bytes, bytes.length);
    // magic, version 3, tensor count, kv count
    assert.equal(bytes.toString("latin1", 0, 4), "GGUF");
    assert.equal(bytes.readUInt32LE(4), 3);
    assert.equal(bytes.readBigUInt64LE(8), 4n);
    assert.equal(bytes.readBigUInt64LE(16), 12n);
    assert.equal(bytes.readBigUInt64LE(24), 20n); // length of "general.architecture"

    const parsed = await gguf(file, {allowLocalFile: true});
    const md = parsed.metadata as unknown as Record<string, unknown>;
    assert.equal(md["test.u32"], 4000000000);
    assert.equal(md["test.i32"], -7);
    assert.equal(md["test.f32"], 0.5);
    assert.equal(md["test.bool"], true);
    assert.equal(md["test.u64"], 2n ** 40n);
    assert.equal(md["test.u8"], 255);
    assert.equal(md["test.f64"], Math.PI);
    assert.equal(md["test.utf8"], "床前明月光 Ġthe");
    assert.deepEqual(md["test.strings"], ["a", "Ġb", "中文"]);
    assert.deepEqual(md["test.i32s"], [1, -2, 3]);
    const infos = parsed.tensorInfos;
    assert.deepEqual(
        infos.map((t) => [t.name, t.shape.map(Number), t.dtype, Number(t.offset)]),
        [
            ["a.weight", [48, 3], GgmlType.F32, 0],
            ["b.bias", [5], GgmlType.F32, 576],
            ["c.weight", [64, 4], GgmlType.Q8_0, 608],
            ["d.weight", [3, 2], GgmlType.F16, 608 + 288] // 272 bytes of Q8_0 padded to 288
        ]
    );
    const dataStart = Number(parsed.tensorDataOffset);
    assert.equal(dataStart % 32, 0);
    assert.equal(bytes.length, dataStart + 896 + 32, "the last tensor is padded too");
    assert.deepEqual(new Float32Array(bytes.buffer.slice(bytes.byteOffset + dataStart, bytes.byteOffset + dataStart + 576)), a);
    const cBytes = bytes.subarray(dataStart + 608, dataStart + 608 + 272);
    assert.deepEqual(new Uint8Array(cBytes), encodeTensor(GgmlType.Q8_0, c, 64, 4));

    const info = await readGgufFileInfo(file);
    assert.equal(info.version, 3);
    assert.equal(info.tensorInfo?.length, 4);
    assert.deepEqual(
        readdirSync(tmp).filter((f) => f.includes(".tmp-")),
        []
    );
});

test("a non-default alignment is written as general.alignment and respected", async () => {
    const file = path.join(tmp, "aligned.gguf");
    const tensors: GgufTensor[] = [
        {name: "x", type: GgmlType.F32, ne: [3], data: () => encodeTensor(GgmlType.F32, values(3, 0), 3, 1)},
        {name: "y", type: GgmlType.F32, ne: [3], data: () => encodeTensor(GgmlType.F32, values(3, 1), 3, 1)}
    ];
    await writeGguf(file, {metadata: new GgufMetadata().string("general.architecture", "llama"), tensors, alignment: 64});
    const parsed = await gguf(file, {allowLocalFile: true});
    assert.equal((parsed.metadata as unknown as Record<string, unknown>)["general.alignment"], 64);
    assert.equal(Number(parsed.tensorDataOffset) % 64, 0);
    assert.deepEqual(
        parsed.tensorInfos.map((t) => Number(t.offset)),
        [0, 64]
    );
    assert.equal(alignUp(65, 64), 128);
});

test("metadata is checked: empty or repeated keys, empty arrays, out-of-range values", () => {
    const md = new GgufMetadata().u32("a.b", 1);
    const bad = (fn: () => unknown, re: RegExp) =>
        assert.throws(fn, (e: unknown) => isQloraError(e) && re.test((e as Error).message));
    bad(() => md.u32("a.b", 2), /set twice/);
    bad(() => md.u32("", 2), /not a dotted ASCII name/);
    bad(() => md.u32("a..b", 2), /not a dotted ASCII name/);
    bad(() => md.array("x.list", "string", []), /must not be empty/);
    bad(() => md.u32("x.neg", -1), /is not a u32/);
    bad(() => md.u32("x.frac", 1.5), /is not a u32/);
    bad(() => md.i32("x.big", 2 ** 31), /is not a i32/);
    bad(() => md.array("x.mixed", "i32", [1, "2"]), /is not a i32/);
    bad(() => md.set("x.str", {type: "string", value: 3}), /is not a string/);
});

test("tensor infos are checked before anything is written", async () => {
    const file = path.join(tmp, "bad.gguf");
    const md = new GgufMetadata().string("general.architecture", "llama");
    const t = (name: string, type: GgmlType, ne: number[]): GgufTensor => ({name, type, ne, data: () => new Uint8Array(0)});
    const cases: [GgufTensor[], RegExp][] = [
        [[t("x", GgmlType.F32, [4]), t("x", GgmlType.F32, [4])], /appears twice/],
        [[t("n".repeat(64), GgmlType.F32, [4])], /1 to 63 bytes/],
        [[t("q", GgmlType.Q8_0, [48, 2])], /cannot be stored as Q8_0/],
        [[t("z", GgmlType.F32, [1, 1, 1, 1, 1])], /1 to 4 positive integers/],
        [[t("z", GgmlType.F32, [0])], /1 to 4 positive integers/]
    ];
    for (const [tensors, re] of cases) {
        await assert.rejects(
            writeGguf(file, {metadata: md, tensors}),
            (e: unknown) => isQloraError(e) && re.test((e as Error).message)
        );
        assert.equal(existsSync(file), false);
    }
});

test("a failed write removes the temporary file and leaves an existing file of that name as it was", async () => {
    const file = path.join(tmp, "keep.gguf");
    writeFileSync(file, "the previous export");
    const md = new GgufMetadata().string("general.architecture", "llama");
    const tensor = (data: GgufTensor["data"]): GgufTensor[] => [{name: "w", type: GgmlType.F32, ne: [8], data}];
    // the producer returns the wrong number of bytes
    await assert.rejects(
        writeGguf(file, {metadata: md, tensors: tensor(() => new Uint8Array(12))}),
        (e: unknown) => isQloraError(e) && /keep\.gguf: .*produced 12 bytes, expected 32/.test((e as Error).message)
    );
    // the disk fills up (as a write would report it)
    const enospc = Object.assign(new Error("ENOSPC: no space left on device, write"), {code: "ENOSPC"});
    await assert.rejects(
        writeGguf(file, {
            metadata: md,
            tensors: tensor(() => {
                throw enospc;
            })
        }),
        (e: unknown) => isQloraError(e) && /keep\.gguf: the disk is full/.test((e as Error).message)
    );
    assert.equal(readFileSync(file, "utf8"), "the previous export");
    assert.deepEqual(
        readdirSync(tmp).filter((f) => f.includes(".tmp-")),
        []
    );
    // and a successful write replaces it
    await writeGguf(file, {metadata: md, tensors: tensor(() => new Uint8Array(32))});
    assert.ok(statSync(file).size > 32);
});
