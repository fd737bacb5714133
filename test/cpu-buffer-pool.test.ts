// cpu-buffer-pool.test.ts: the CPU backend's reuse of a training step's tensors (CpuBufferPool, lent to the
// backend by DecoderTrainer for each step). A reused tensor is not zeroed, so the graph must write every tensor
// before reading it, as on CUDA: here the reused storage is filled with NaN, and several steps through the pool
// must give the bits of a step on fresh (zeroed) arrays, for every architecture and the graph's variants
// (checkpointing, dropout, DoRA, packed rows, the MLP in row chunks, trained biases and modules_to_save, 4-bit).
import {test} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {cpuBackend, CpuBufferPool} from "../src/backend/cpu-backend.js";
import {DropoutClock} from "../src/backend/dropout.js";
import {Rng} from "../src/backend/rng.js";
import {DecoderModel} from "../src/model/decoder.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";
import {DecoderTrainer, type TrainBatch} from "../src/model/training.js";
import {applyLora} from "../src/peft/inject.js";
import {bitsAndBytesConfig} from "../src/quant/config.js";
import {SMALL_VOCAB_ARCHS as ARCHS, tempDir} from "./helpers/arch-checks.js";
import {MODEL_DIR} from "./helpers/paths.js";

const tmp = tempDir("qlora-buffer-pool-");

interface Case {
    gradient_checkpointing: boolean;
    lora_dropout?: number;
    use_dora?: boolean;
    packing?: boolean;
    bias?: "none" | "all";
    modules_to_save?: string[];
    /** sequence length (640 x 2 rows: the MLP runs in two row chunks where its activations are not kept) */
    T?: number;
    quantize?: boolean;
}

function bitsEqual(a: Float32Array, b: Float32Array): boolean {
    return (
        Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0
    );
}

async function check(dir: string, c: Case): Promise<void> {
    const what = `${path.basename(dir)} ${JSON.stringify(c)}`;
    const model = await DecoderModel.load(
        dir,
        c.quantize ? {quantization: bitsAndBytesConfig({load_in_4bit: true, bnb_4bit_compute_dtype: "float32"})} : {}
    );
    const cfg = model.config;
    const peft = applyLora(
        model,
        {
            r: 8,
            lora_alpha: 16,
            target_modules: "all-linear",
            lora_dropout: c.lora_dropout ?? 0,
            use_dora: c.use_dora ?? false,
            bias: c.bias ?? "none",
            modules_to_save: c.modules_to_save ?? null
        },
        {initRng: new Rng(1), dropoutClock: new DropoutClock(0)}
    );
    // B = 0 leaves LoRA's product zero: random B, so every gradient is in play
    const rng = new Rng(5);
    for (const t of peft.trainableTensors())
        if (t.name.includes("lora_B")) for (let i = 0; i < t.param.length; i++) t.param[i] = rng.normal() * 0.02;
    const B = 2,
        T = c.T ?? 48,
        N = B * T;
    const inputIds = Int32Array.from({length: N}, () => rng.int(cfg.vocabSize));
    const half = T >> 1;
    const batch: TrainBatch = {
        B,
        T,
        inputIds,
        labels: inputIds,
        attentionMask: null,
        positionIds: Int32Array.from({length: N}, (_, i) => (c.packing ? (i % T) % half : i % T)),
        segIds: c.packing ? Int32Array.from({length: N}, (_, i) => (i % T < half ? 0 : 1)) : null
    };
    const opts = {lossScale: 1 / N, gradientCheckpointing: c.gradient_checkpointing};
    const grads = () => peft.trainableTensors().map((t) => t.grad.slice());

    // fresh arrays: the graph over the backend without a pool
    const graph = model.hostGraph({trainFull: true});
    peft.zeroGrad();
    const fresh = graph.forwardBackward(batch, opts);
    const want = grads();

    const pool = new CpuBufferPool();
    pool.poison = true;
    for (let step = 0; step < 3; step++) {
        peft.zeroGrad();
        const loss = cpuBackend().withPool(pool, () => graph.forwardBackward(batch, opts));
        assert.ok(Object.is(loss.lossSum, fresh.lossSum), `${what}, step ${step}: loss ${loss.lossSum} vs ${fresh.lossSum}`);
        const got = grads();
        got.forEach((g, i) => assert.ok(bitsEqual(g, want[i]), `${what}, step ${step}: ${peft.trainableTensors()[i].name}`));
        // the first step fills the pool, the others take from it
        assert.ok(pool.spareBytes() > 0, `${what}: the step freed tensors into the pool`);
    }
}

test("a training step through the buffer pool (reused storage NaN-filled) gives the bits of fresh arrays", async () => {
    for (const [name, config] of Object.entries(ARCHS)) {
        const dir = path.join(tmp, name);
        await writeSyntheticCheckpoint(dir, {config, seed: 1, dtype: "F32"});
        for (const gradient_checkpointing of [false, true]) await check(dir, {gradient_checkpointing, lora_dropout: 0.1});
    }
    for (const arch of ["qwen2", "gemma3"]) {
        const dir = path.join(tmp, arch);
        for (const gradient_checkpointing of [false, true]) {
            await check(dir, {gradient_checkpointing, use_dora: true, lora_dropout: 0.1});
            await check(dir, {gradient_checkpointing, packing: true, bias: "all", modules_to_save: ["lm_head"]});
            await check(dir, {gradient_checkpointing, T: 640});
        }
    }
    await check(MODEL_DIR, {gradient_checkpointing: true, quantize: true, T: 32});
});

test("DecoderTrainer steps reuse their tensors: the same loss and gradients step after step", async () => {
    const model = await DecoderModel.load(path.join(tmp, "qwen2"));
    const peft = applyLora(model, {r: 8, lora_alpha: 16, target_modules: "all-linear"}, {initRng: new Rng(1)});
    const rng = new Rng(9);
    const N = 96;
    const inputIds = Int32Array.from({length: N}, () => rng.int(model.config.vocabSize));
    const batch: TrainBatch = {
        B: 2,
        T: 48,
        inputIds,
        labels: inputIds,
        attentionMask: null,
        positionIds: Int32Array.from({length: N}, (_, i) => i % 48),
        segIds: null
    };
    const trainer = new DecoderTrainer(model);
    const runs = [0, 1, 2].map(() => {
        peft.zeroGrad();
        const loss = trainer.forwardBackward(batch, {lossScale: 1 / N, gradientCheckpointing: true});
        return {loss: loss.lossSum, grads: peft.trainableTensors().map((t) => t.grad.slice())};
    });
    for (const r of runs.slice(1)) {
        assert.ok(Object.is(r.loss, runs[0].loss));
        r.grads.forEach((g, i) => assert.ok(bitsEqual(g, runs[0].grads[i])));
    }
});
