// harden-fuzz.test.ts: issue 8, "keep it so": seeded mutations of every input format qlora reads (safetensors,
// GGUF export inputs, JSON/JSONL/Parquet data, config.json, tokenizer_config.json, adapter_config.json,
// trainer_state.json and the other checkpoint state files, YAML/JSON training configs) must end in success or a
// one-line QloraError: no crash, hang, stack trace, memory blow-up, half-written file, changed input or silently
// accepted NaN. Fixed seed, so a failure here replays with the command it prints; `npm run fuzz` runs more.
import {after, before, describe, test} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {exportGgufLora} from "../src/api/export-gguf.js";
import {
    checkDisk,
    checkOutputFile,
    checkSafetensorsBytes,
    describeFailure,
    formatTable,
    FuzzSession,
    isFailure,
    snapshot,
    summarize,
    type FormatSummary
} from "./fuzz/harness.js";
import {mutateJson, mutateSafetensors, serializeJson, Raw, splitSafetensors, harvest} from "./fuzz/mutators.js";
import {caseSeed, FuzzRng} from "./fuzz/rng.js";

const SEED = 20240806;
// cases per format in the worker, sized so the whole file takes about two minutes on two busy cores once nothing
// fails (a failing case costs more: a hang waits out its time limit, a crash restarts the worker). Parquet is read
// by a decoder process qlora forks per file (about 0.8 s), hence its few cases; `npm run fuzz` runs many more.
const CASES: Record<string, number> = {
    safetensors: 120,
    gguf: 50,
    "dataset-json": 80,
    "dataset-jsonl": 120,
    "dataset-parquet": 30,
    config: 200,
    tokenizer_config: 50,
    adapter_config: 200,
    trainer_state: 30,
    yaml: 80
};
const CLI_CASES = 2;

describe("fuzz harness", () => {
    test("mutations are reproducible from (seed, format, case) and produce what they log", () => {
        assert.equal(caseSeed(1, "config", 5), caseSeed(1, "config", 5));
        assert.notEqual(caseSeed(1, "config", 5), caseSeed(1, "config", 6));
        assert.notEqual(caseSeed(1, "config", 5), caseSeed(2, "config", 5));
        const seed = Buffer.from(JSON.stringify({a: 1, b: [1, 2, {c: "x"}]}));
        const run = (s: number) => {
            const log: string[] = [];
            const out = mutateJson(seed, new FuzzRng(s), harvest(JSON.parse(seed.toString())), log);
            return {out: out.toString("utf8"), log};
        };
        assert.deepEqual(run(3), run(3));
        // raw tokens survive serialization: JSON.parse reads 1e400 as Infinity, which a config must not accept
        assert.equal(serializeJson({x: new Raw("1e400")}), '{"x":1e400}');
        assert.equal(JSON.parse(serializeJson({x: new Raw("1e400")})).x, Infinity);
    });

    test("the safetensors checker of outputs rejects what the mutator breaks", () => {
        const header = JSON.stringify({t: {dtype: "F32", shape: [2], data_offsets: [0, 8]}});
        const len = Buffer.alloc(8);
        len.writeBigUInt64LE(BigInt(header.length));
        const valid = Buffer.concat([len, Buffer.from(header), Buffer.alloc(8)]);
        assert.equal(checkSafetensorsBytes(valid), null);
        assert.match(checkSafetensorsBytes(valid.subarray(0, valid.length - 1)) ?? "", /data_offsets|data section/);
        let broken = 0;
        for (let s = 0; s < 50; s++) {
            const log: string[] = [];
            const out = mutateSafetensors(valid, new FuzzRng(s), log);
            assert.equal(log.length, 1, "one logged mutation");
            if (checkSafetensorsBytes(out) !== null) broken++;
            else assert.ok(splitSafetensors(out), "a file the checker accepts splits into header and data");
        }
        assert.ok(broken > 25, `most mutations break the file (${broken} of 50)`);
    });
});

describe("fuzz: every input format ends in success or a one-line error", () => {
    let session: FuzzSession;
    const rows: FormatSummary[] = [];
    before(async () => {
        // a hang is a case that never answers; 60 s keeps a slow, shared CI machine from calling a slow but finite
        // case one (a 4M-character word through the BPE tokenizer takes 10-25 s on two busy cores)
        session = await FuzzSession.create({seed: SEED, timeoutMs: 60_000, log: (l) => console.log(l)});
    });
    after(async () => {
        await session?.close();
        if (rows.length) console.log(`fuzz seed ${SEED}\n${formatTable(rows)}`);
    });

    test("the worker's outcomes are classified: hang, memory, crash, escaped exception, stack trace, clean error", {
        timeout: 120_000
    }, async () => {
        const run = (kind: Parameters<FuzzSession["runInWorker"]>[0], params: Record<string, unknown> = {}, timeoutMs = 20_000) =>
            session.runInWorker(kind, params, timeoutMs);
        assert.equal((await run("probe-hang", {}, 1500)).primary, "hang");
        // filling memory up to the limit takes seconds on a busy machine
        const mem = await run("probe-alloc", {}, 45_000);
        assert.equal(mem.primary, "memory", mem.detail);
        assert.ok(mem.peakRssMb > 1000, `peak RSS ${mem.peakRssMb} MiB`);
        assert.equal((await run("probe-abort")).primary, "crash");
        const escaped = await run("probe-escape");
        assert.equal(escaped.primary, "crash");
        assert.match(escaped.detail, /escaped the case: .*thrown from a timer/);
        const stack = await run("probe-throw");
        assert.equal(stack.primary, "stack");
        assert.match(stack.detail, /TypeError: probe: not a QloraError/);
        const clean = await run("probe-qlora-error");
        assert.deepEqual([clean.primary, clean.badMessage], ["clean", null]);
        assert.match((await run("probe-qlora-error", {message: "first\nsecond"})).badMessage ?? "", /2 lines/);
        assert.match((await run("probe-qlora-error", {message: "x".repeat(5000)})).badMessage ?? "", /5\d{3}-character/);
    });

    test("disk checks: leftover temporaries, unparseable outputs, missing outputs and touched inputs are caught", async () => {
        const dir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-fuzz-disk-"));
        try {
            await fs.writeFile(path.join(dir, "input.json"), "{}");
            await fs.writeFile(path.join(dir, "other.json"), "{}");
            const before = await snapshot(dir);
            const spec = {writes: [/^out(\/|$)/], expectOutputs: ["out/lora.gguf"]};
            assert.deepEqual(await checkDisk(spec, dir, before, "clean"), {halfWritten: [], inputsChanged: []});
            // a GGUF qlora writes passes; the same file cut short does not
            const out = path.join(dir, "out", "lora.gguf");
            await exportGgufLora({adapterDir: session.seeds.adapter, modelDir: session.seeds.small, out});
            assert.equal(await checkOutputFile(out), null);
            assert.deepEqual(await checkDisk(spec, dir, before, "ok"), {halfWritten: [], inputsChanged: []});
            const bytes = await fs.readFile(out);
            await fs.writeFile(out, bytes.subarray(0, bytes.length - 100));
            await fs.mkdir(path.join(dir, "out", ".final.tmp-1234"));
            await fs.writeFile(path.join(dir, "input.json"), '{"x": 1}');
            await fs.rm(path.join(dir, "other.json"));
            await fs.writeFile(path.join(dir, "stray.txt"), "");
            const found = await checkDisk(spec, dir, before, "ok");
            assert.deepEqual(found.inputsChanged.sort(), ["input.json changed", "other.json vanished", "stray.txt appeared"]);
            assert.equal(found.halfWritten.length, 2, found.halfWritten.join("; "));
            assert.match(found.halfWritten.join("; "), /out\/lora\.gguf: tensor data ends at \d+, the file has \d+ bytes/);
            assert.match(found.halfWritten.join("; "), /\.final\.tmp-1234: a temporary/);
            await fs.rm(out);
            assert.match(
                (await checkDisk(spec, dir, before, "ok")).halfWritten.join("; "),
                /out\/lora\.gguf: not written although the run succeeded/
            );
        } finally {
            await fs.rm(dir, {recursive: true, force: true});
        }
    });

    for (const [format, cases] of Object.entries(CASES)) {
        test(`${format}: ${cases} mutated cases + ${CLI_CASES} through the CLI`, {timeout: 600_000}, async () => {
            const {control, lib, cli} = await session.runFormat(format, cases, CLI_CASES);
            rows.push(summarize(format, "lib", lib), summarize(format, "cli", cli));
            for (const c of control) assert.equal(c.primary, "ok", `the unmutated seed files must load: ${describeFailure(c)}`);
            const failures = [...lib, ...cli].filter(isFailure);
            assert.ok(
                lib.some((r) => r.primary === "ok") && lib.some((r) => r.primary === "clean"),
                "the cases reach both success and clean errors (mutations neither all harmless nor all fatal)"
            );
            assert.equal(failures.length, 0, `${failures.length} failing cases:\n${failures.map(describeFailure).join("\n")}`);
        });
    }
});
