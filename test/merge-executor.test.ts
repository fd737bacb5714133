// qlora merge through its executors (src/peft/merge-executor.ts): the CPU executor gives the bits of the merge as
// it was written before the executors (readTensorF32, the NF4 round trip, addDeltaWeight, applyDoraMagnitude,
// f32ToHalf, restated here as the reference), mergeProjection runs the steps in order and frees what it holds,
// and --device picks and refuses as generate/chat/eval do. The CUDA executor against this one: test/gpu/merge.test.ts.
import {test} from "node:test";
import assert from "node:assert/strict";
import {existsSync, mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {deviceLine} from "../src/api/models.js";
import {f32ToHalf} from "../src/backend/cpu.js";
import {chooseDevice, cudaAvailability} from "../src/backend/cuda.js";
import {loadModelConfig} from "../src/io/hf-config.js";
import {SafetensorsCheckpoint} from "../src/io/safetensors.js";
import {addDeltaWeight, applyDoraMagnitude} from "../src/lora/layer.js";
import {readTensorF32} from "../src/model/weights.js";
import {readAdapter, type AdapterBranch} from "../src/peft/adapter-files.js";
import {mergeAdapter, mergeProjection} from "../src/peft/merge.js";
import type {MergeExecutor} from "../src/peft/merge-executor.js";
import {dequantize4bit, quantize4bit} from "../src/quant/nf4.js";
import {expectOneLineError, runCli} from "./helpers/cli.js";
import {FIXTURES, MODEL_DIR} from "./helpers/paths.js";
import {doraAdapter} from "./helpers/dora-adapter.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-merge-exec-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));
const ADAPTER = path.join(FIXTURES, "adapter");

/** the merge of one tensor as merge.ts computed it before the executors: the reference of the CPU path */
async function referenceTensor(
    ckpt: SafetensorsCheckpoint,
    name: string,
    shape: readonly number[],
    branch: AdapterBranch | undefined,
    againstNf4: boolean,
    dtype: "BF16" | "F16"
): Promise<Uint16Array> {
    let w = await readTensorF32(ckpt, name);
    if (branch) {
        if (againstNf4)
            w = dequantize4bit(quantize4bit({bf16: f32ToHalf(w, "BF16")}, {shape: [shape[0], shape[1]]}), {roundToDtype: false});
        addDeltaWeight(w, branch, shape[0], shape[1]);
        if (branch.magnitude) applyDoraMagnitude(w, branch.magnitude, shape[0], shape[1]);
    }
    return f32ToHalf(w, dtype);
}

for (const c of [
    {what: "the fixture adapter, bf16", adapter: () => Promise.resolve(ADAPTER), nf4: false, dtype: "bf16"},
    {what: "the fixture adapter, bf16, --against-nf4", adapter: () => Promise.resolve(ADAPTER), nf4: true, dtype: "bf16"},
    {what: "the fixture adapter, f16, --against-nf4", adapter: () => Promise.resolve(ADAPTER), nf4: true, dtype: "f16"},
    {what: "a DoRA adapter, bf16", adapter: () => doraAdapter(tmp), nf4: false, dtype: "bf16"},
    {what: "a DoRA adapter, f16, --against-nf4", adapter: () => doraAdapter(tmp), nf4: true, dtype: "f16"}
] as const)
    test(`--device cpu: ${c.what} merges to the bits of the merge before the executors`, async () => {
        const adapterDir = await c.adapter();
        const out = path.join(tmp, `out-${c.what.replace(/\W+/g, "-")}`);
        const r = await mergeAdapter({
            model: MODEL_DIR,
            adapter: adapterDir,
            out,
            againstNf4: c.nf4,
            dtype: c.dtype,
            device: "cpu"
        });
        assert.equal(r.device, "cpu");
        const adapter = await readAdapter(adapterDir, await loadModelConfig(MODEL_DIR));
        const base = await SafetensorsCheckpoint.open(MODEL_DIR);
        const merged = await SafetensorsCheckpoint.open(out);
        const halfDtype = c.dtype === "bf16" ? "BF16" : "F16";
        let branches = 0;
        for (const name of merged.names()) {
            const info = merged.info(name);
            const branch = adapter.branches.get(name.replace(/\.weight$/, ""));
            if (branch) branches++;
            const want = await referenceTensor(base, name, info.shape, branch, c.nf4, halfDtype);
            const got = (await merged.readTyped(name)) as Uint16Array;
            assert.equal(info.dtype, halfDtype, name);
            assert.deepEqual(Buffer.from(got.buffer, got.byteOffset, got.byteLength), Buffer.from(want.buffer), name);
        }
        assert.equal(branches, adapter.branches.size);
        assert.equal(r.merged, adapter.branches.size);
        const meta = merged.fileFor(merged.names()[0]).metadata;
        assert.equal(meta?.qlora_merge_device, "cpu");
        assert.equal(meta?.qlora_merge, c.nf4 ? "dequantized-nf4 base + lora" : "16-bit base + lora");
        await base.close();
        await merged.close();
    });

/** an executor of named handles that records every step (the handles are strings) */
function recordingExecutor(failAt?: string): {ex: MergeExecutor<string>; log: string[]; live: Set<string>} {
    const log: string[] = [];
    const live = new Set<string>();
    let made = 0;
    const make = (what: string) => {
        const h = `${what}${made++}`;
        live.add(h);
        return h;
    };
    const step = (s: string) => {
        log.push(s);
        if (s.startsWith(failAt ?? "\0")) throw new Error(`${s} failed`);
    };
    const ex: MergeExecutor<string> = {
        device: "cpu",
        weight: () => make("w"),
        nf4RoundTrip: (W, R, C) => {
            step(`nf4(${W}, ${R}x${C})`);
            return make("q");
        },
        addDelta: (W, b) => step(`delta(${W}, r${b.r})`),
        applyMagnitude: (W) => step(`dora(${W})`),
        toHalf: (W, dtype) => {
            step(`half(${W}, ${dtype})`);
            return new Uint16Array(1);
        },
        free: (W) => {
            log.push(`free(${W})`);
            assert.ok(live.delete(W), `${W} freed twice or never made`);
        },
        close: () => {}
    };
    return {ex, log, live};
}

test("mergeProjection: the NF4 round trip replaces the base, DoRA only with a magnitude, every handle freed once", () => {
    const branch = (magnitude: boolean): AdapterBranch => ({
        r: 2,
        scaling: 1,
        A: new Float32Array(6),
        B: new Float32Array(8),
        magnitude: magnitude ? new Float32Array(4) : null,
        outFeatures: 4,
        inFeatures: 3
    });
    let {ex, log, live} = recordingExecutor();
    mergeProjection(ex, ex.weight({dtype: "F32", values: new Float32Array(12)}), branch(false), false, "BF16");
    assert.deepEqual(log, ["delta(w0, r2)", "half(w0, BF16)", "free(w0)"]);
    assert.equal(live.size, 0);
    ({ex, log, live} = recordingExecutor());
    mergeProjection(ex, ex.weight({dtype: "F32", values: new Float32Array(12)}), branch(true), true, "F16");
    assert.deepEqual(log, ["nf4(w0, 4x3)", "free(w0)", "delta(q1, r2)", "dora(q1)", "half(q1, F16)", "free(q1)"]);
    assert.equal(live.size, 0);
    // a step that throws leaves nothing allocated
    for (const failAt of ["nf4", "delta", "dora", "half"]) {
        ({ex, log, live} = recordingExecutor(failAt));
        assert.throws(
            () => mergeProjection(ex, ex.weight({dtype: "F32", values: new Float32Array(12)}), branch(true), true, "BF16"),
            new RegExp(`^Error: ${failAt}`)
        );
        assert.equal(live.size, 0, `${failAt}: ${log.join(" ")}`);
    }
});

test("qlora merge --device: a bad value and cuda without a usable GPU are one-line errors; auto merges on the CPU here", () => {
    const args = ["merge", "--adapter", ADAPTER, "--model", MODEL_DIR];
    expectOneLineError(
        runCli([...args, "--out", path.join(tmp, "cli-gpu"), "--device", "gpu"]),
        '--device expects auto, cpu or cuda, got "gpu"'
    );
    assert.ok(!existsSync(path.join(tmp, "cli-gpu")));
    const auto = chooseDevice("auto");
    if (auto.device !== "cpu") return; // a machine with a usable GPU: test/gpu/merge.test.ts
    const cudaOut = path.join(tmp, "cli-cuda");
    expectOneLineError(runCli([...args, "--out", cudaOut, "--device", "cuda"]), /--device cuda: /, auto.availability!.reason!);
    assert.ok(!existsSync(cudaOut), "nothing written");
    const r = runCli([...args, "--out", path.join(tmp, "cli-auto"), "--device", "auto"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^merged 56 modules into \d+ tensors on the CPU \(bf16\): /);
    // the device line of generate/chat/eval: the reason auto passed over a GPU the machine shows; nothing without one
    if (auto.gpuSeen) assert.ok(r.stderr.includes(auto.line), r.stderr);
    else assert.equal(r.stderr, "");
    const cpu = runCli([...args, "--out", path.join(tmp, "cli-cpu"), "--device", "cpu"]);
    assert.equal(cpu.code, 0, cpu.stderr);
    assert.equal(cpu.stderr, "");
    assert.match(cpu.stdout, / on the CPU \(bf16\): /);
});

test("auto's line names why it passed over a GPU the machine shows (the CUDA addon missing)", () => {
    const probe = {deviceInfo: () => null, addonError: () => "qlora_cuda.node was not built", gpuPresent: () => true};
    const c = chooseDevice("auto", probe);
    assert.equal(c.device, "cpu");
    assert.equal(
        deviceLine(c),
        "device: cpu (auto: the CUDA backend is not built: qlora_cuda.node was not built. Install the CUDA toolkit (nvcc) and run: npm run build:native)"
    );
    assert.equal(deviceLine(chooseDevice("auto", {...probe, gpuPresent: () => false})), null);
});

test("mergeAdapter with device cuda and no usable GPU: the reason, before anything is read or written", {
    skip: cudaAvailability().usable
}, async () => {
    const out = path.join(tmp, "api-cuda");
    await assert.rejects(
        mergeAdapter({model: MODEL_DIR, adapter: ADAPTER, out, device: "cuda"}),
        /^QloraError: CUDA is not usable: /
    );
    assert.ok(!existsSync(out));
});
