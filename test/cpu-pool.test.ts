// The CPU ops' worker pool (native/cpu/threads.cpp): its own C++ test with workers stopped and stalled by
// signals (a region completes without them; no chunk runs twice or after its region), and training steps that
// give the same bits on 1, 2, 3 and 8 threads (a chunk's arithmetic does not depend on the thread or the
// number of chunks). And the vectorized expf of the SwiGLU and cross-entropy loops (native/cpu/ops.cpp): bit for
// bit glibc's expf and the scalar loops' values (native/cpu/test_exp.cpp).
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {cpu} from "../src/backend/cpu.js";
import {Rng} from "../src/backend/rng.js";
import {DecoderModel} from "../src/model/decoder.js";
import {DecoderTrainer} from "../src/model/training.js";
import {createOptimizer, weightDecayFor} from "../src/optim/adamw.js";
import {applyLora} from "../src/peft/inject.js";
import {bitsAndBytesConfig} from "../src/quant/config.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const compiler = process.env.CXX ?? "c++";
const canBuild = process.platform === "linux" && spawnSync(compiler, ["--version"]).status === 0;
const skip = canBuild ? false : "needs Linux and a C++ compiler (CXX)";
const skipX64 = canBuild && process.arch === "x64" ? false : "needs Linux on x86-64 and a C++ compiler (CXX)";
const nativeDir = path.join(REPO_ROOT, "native");

/** builds native/cpu/<sources> with `flags` into a temporary folder, runs it and returns its output lines */
function buildAndRun(name: string, sources: string[], flags: string[]): string[] {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-cpu-pool-"));
    try {
        const exe = path.join(dir, name);
        const files = sources.map((f) => path.join(nativeDir, "cpu", f));
        const build = spawnSync(compiler, [...flags, `-I${path.join(nativeDir, "include")}`, ...files, "-o", exe], {
            encoding: "utf8"
        });
        assert.equal(build.status, 0, build.stderr);
        const run = spawnSync(exe, {encoding: "utf8", timeout: 90_000});
        const lines = run.stdout.trim().split("\n");
        assert.deepEqual(
            lines.filter((l) => l.startsWith("FAIL")),
            [],
            run.stdout + run.stderr
        );
        assert.equal(run.status, 0, `exit ${run.status} (signal ${run.signal}): ${run.stdout}${run.stderr}`);
        assert.equal(lines.at(-1), "ALL OK");
        return lines;
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
}

test("the pool: regions complete with every worker parked, and stalled workers never run a chunk twice", {skip}, () => {
    const lines = buildAndRun("test_pool", ["test_pool.cpp", "threads.cpp"], ["-O2", "-std=c++17", "-pthread"]);
    // every check ran: a run that stopped early would miss some
    assert.equal(lines.filter((l) => l.startsWith("ok")).length, 12, lines.join("\n"));
});

test("the vectorized expf is glibc's bit for bit, and SwiGLU and cross-entropy give the scalar loops' values", {
    skip: skipX64
}, () => {
    // ops.cpp as CMakeLists.txt compiles it (contraction and vectorization as in the addon)
    const flags = ["-O3", "-std=gnu++17", "-mavx2", "-mfma", "-mf16c", "-fno-math-errno", "-fopenmp-simd", "-pthread"];
    const lines = buildAndRun("test_exp", ["test_exp.cpp", "ops.cpp", "threads.cpp"], flags);
    // the checks run once per vector expf the CPU has (AVX-512 and AVX2, or AVX2)
    const variants = lines.filter((l) => l.trim().startsWith("(expf lanes:")).length;
    assert.ok(variants >= 1, lines.join("\n"));
    assert.equal(lines.filter((l) => l.startsWith("ok")).length, 4 * variants, lines.join("\n"));
    // glibc 2.27+ has the expf the vector loop copies; elsewhere the ops keep the scalar loops
    const glibc = (process.report.getReport() as {header: {glibcVersionRuntime?: string}}).header.glibcVersionRuntime;
    if (glibc && Number(glibc.split(".")[1]) >= 27 && glibc.startsWith("2."))
        assert.ok(
            lines.some((l) => l.trim() === "(vectorized expf in use: yes)"),
            `glibc ${glibc}: ${lines.join("\n")}`
        );
});

// losses, gradients and updated parameters of three QLoRA steps (checkpointing on, off, on) as bytes
async function trainingBits(threads: number): Promise<{losses: number[]; bytes: Buffer}> {
    cpu().setNumThreads(threads);
    const B = 2,
        T = 48,
        N = B * T;
    const model = await DecoderModel.load(MODEL_DIR, {
        quantization: bitsAndBytesConfig({load_in_4bit: true, bnb_4bit_compute_dtype: "float32"})
    });
    const lora = applyLora(model, {r: 8, lora_alpha: 16, target_modules: "all-linear"}, {initRng: new Rng(3)});
    const tensors = lora.trainableTensors();
    const opt = createOptimizer(
        "paged_adamw_8bit",
        tensors.map((t) => ({name: t.name, param: t.param, grad: t.grad, weightDecay: weightDecayFor(t.name)}))
    );
    const trainer = new DecoderTrainer(model);
    const rng = new Rng(11);
    const inputIds = Int32Array.from({length: N}, () => rng.int(model.config.vocabSize - 3));
    const batch = {
        B,
        T,
        inputIds,
        labels: inputIds,
        attentionMask: null,
        positionIds: Int32Array.from({length: N}, (_, i) => i % T),
        segIds: null
    };
    const losses: number[] = [];
    const parts: Buffer[] = [];
    for (let step = 0; step < 3; step++) {
        lora.zeroGrad();
        const res = trainer.forwardBackward(batch, {lossScale: 1 / N, gradientCheckpointing: step !== 1});
        losses.push(res.lossSum);
        for (const t of tensors) parts.push(Buffer.from(new Float32Array(t.grad).buffer));
        opt.step(1e-3);
    }
    for (const t of tensors) parts.push(Buffer.from(new Float32Array(t.param).buffer));
    return {losses, bytes: Buffer.concat(parts)};
}

test("training steps give the same bits on 1, 2, 3 and 8 threads", async () => {
    const before = cpu().getNumThreads();
    try {
        const ref = await trainingBits(1);
        assert.ok(ref.losses.every(Number.isFinite) && ref.losses[2] < ref.losses[0], `losses ${ref.losses}`);
        for (const threads of [2, 3, 8]) {
            const got = await trainingBits(threads);
            assert.deepEqual(got.losses, ref.losses, `losses on ${threads} threads`);
            assert.ok(got.bytes.equals(ref.bytes), `gradients and parameters on ${threads} threads differ from 1 thread`);
        }
    } finally {
        cpu().setNumThreads(before);
    }
});
