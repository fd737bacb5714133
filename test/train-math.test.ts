// Training math on the model level: gradient accumulation equals one big batch, packing leaves each
// sample's loss unchanged, and dropout is replayed under gradient checkpointing.
import {test} from "node:test";
import assert from "node:assert/strict";
import {DropoutClock} from "../src/backend/dropout.js";
import {Rng} from "../src/backend/rng.js";
import {collate, packSequences, type TokenizedRow} from "../src/data/index.js";
import {applyLora} from "../src/peft/inject.js";
import {DecoderModel} from "../src/model/decoder.js";
import {DecoderTrainer} from "../src/model/training.js";
import {MODEL_DIR} from "./helpers/paths.js";
import {centralDifference} from "./helpers/fixtures.js";

function row(ids: number[], promptLen: number): TokenizedRow {
    return {inputIds: Int32Array.from(ids), labels: Int32Array.from(ids.map((id, i) => (i < promptLen ? -100 : id)))};
}

function randomRows(n: number, seed: number): TokenizedRow[] {
    const rng = new Rng(seed);
    return Array.from({length: n}, () => {
        const len = 8 + rng.int(20);
        return row(
            Array.from({length: len}, () => rng.int(16000)),
            2 + rng.int(5)
        );
    });
}

async function loraModel(dropout = 0) {
    const model = await DecoderModel.load(MODEL_DIR);
    const dropoutClock = new DropoutClock(5);
    const lora = applyLora(
        model,
        {r: 4, lora_alpha: 8, target_modules: "all-linear", lora_dropout: dropout, init_lora_weights: false},
        {initRng: new Rng(3), dropoutClock}
    );
    return {model, lora, trainer: new DecoderTrainer(model, dropoutClock), dropoutClock};
}

function maxRelDiff(a: Float32Array, b: Float32Array): number {
    let num = 0,
        den = 0;
    for (let i = 0; i < a.length; i++) {
        num = Math.max(num, Math.abs(a[i] - b[i]));
        den = Math.max(den, Math.abs(b[i]));
    }
    return num / den;
}

test("gradient accumulation of 4 micro-batches of 1 gives the gradients of one batch of 4", async () => {
    const {lora, trainer} = await loraModel();
    const rows = randomRows(4, 11);
    const big = collate(rows, {padTokenId: 16381});
    const total = big.numTargets;
    lora.zeroGrad();
    const r1 = trainer.forwardBackward(big, {lossScale: 1 / total, gradientCheckpointing: false});
    const one = lora.trainableTensors().map((t) => t.grad.slice());
    lora.zeroGrad();
    let lossSum = 0;
    for (const r of rows) {
        const b = collate([r], {padTokenId: 16381});
        lossSum += trainer.forwardBackward(b, {lossScale: 1 / total, gradientCheckpointing: true}).lossSum;
    }
    const acc = lora.trainableTensors().map((t) => t.grad);
    let worst = 0;
    acc.forEach((g, i) => {
        worst = Math.max(worst, maxRelDiff(g, one[i]));
    });
    console.log(
        `loss ${(r1.lossSum / total).toFixed(6)} vs ${(lossSum / total).toFixed(6)}; worst gradient difference ${worst.toExponential(3)}`
    );
    assert.ok(Math.abs(r1.lossSum - lossSum) / r1.lossSum < 1e-5);
    assert.ok(worst < 1e-4, `gradients differ by ${worst} relative to their max`);
    // the gradients are not trivially zero
    assert.ok(acc.some((g) => g.some((v) => Math.abs(v) > 1e-6)));
});

test("packing leaves each sample's loss unchanged (position ids restart, no attention across samples)", async () => {
    const {trainer} = await loraModel();
    const rows = randomRows(5, 23);
    let separate = 0,
        targets = 0;
    for (const r of rows) {
        const res = trainer.forwardBackward(collate([r], {padTokenId: 16381}), {
            lossScale: 0,
            gradientCheckpointing: false,
            noBackward: true
        });
        separate += res.lossSum;
        targets += res.targets;
    }
    const packed = packSequences(rows, 64, "bfd");
    assert.ok(packed.length < rows.length, "several samples share a row");
    const b = collate(packed, {padTokenId: 16381});
    assert.ok(b.segIds, "packed batches carry segment ids");
    const res = trainer.forwardBackward(b, {lossScale: 0, gradientCheckpointing: false, noBackward: true});
    console.log(
        `${rows.length} samples in ${packed.length} packed rows: loss sum ${res.lossSum.toFixed(5)} vs ${separate.toFixed(5)} separately`
    );
    // packing drops the first label of each sample, which is a prompt token (-100) here, so the targets are the same
    assert.equal(res.targets, targets);
    assert.ok(Math.abs(res.lossSum - separate) / separate < 1e-5, `${res.lossSum} vs ${separate}`);
    // without segment ids the samples would see each other and the loss would change
    const leaky = trainer.forwardBackward(
        {...b, segIds: null, positionIds: b.positionIds},
        {lossScale: 0, gradientCheckpointing: false, noBackward: true}
    );
    assert.ok(Math.abs(leaky.lossSum - separate) / separate > 1e-3, "the segment mask matters");
});

test("a block recomputed under gradient checkpointing draws the dropout masks of its first forward", async () => {
    const rows = randomRows(2, 31);
    const b = collate(rows, {padTokenId: 16381});
    const grads = async (checkpointing: boolean) => {
        const {lora, trainer} = await loraModel(0.3);
        const r = trainer.forwardBackward(b, {lossScale: 1 / 50, gradientCheckpointing: checkpointing});
        return {loss: r.lossSum, g: lora.trainableTensors().map((t) => t.grad.slice())};
    };
    const a = await grads(false),
        c = await grads(true);
    assert.equal(a.loss, c.loss);
    let worst = 0;
    a.g.forEach((g, i) => {
        worst = Math.max(worst, maxRelDiff(c.g[i], g));
    });
    assert.ok(worst < 1e-6, `checkpointed gradients differ by ${worst}`);
});

test("the MLP in chunks of rows (checkpointed forward, its recomputation in the backward, inference) gives the whole MLP's loss, gradients and hidden states", async () => {
    const rows = randomRows(3, 37);
    const b = collate(rows, {padTokenId: 16381});
    const N = b.B * b.T;
    const run = async (checkpointing: boolean, mlpChunkRows?: number) => {
        const {model, lora, dropoutClock} = await loraModel(0.3);
        const trainer = new DecoderTrainer(model, dropoutClock, {mlpChunkRows});
        const r = trainer.forwardBackward(b, {lossScale: 1 / 50, gradientCheckpointing: checkpointing});
        const hidden = model.hostGraph({mlpChunkRows}).forwardHidden(b.inputIds, b.B, b.T);
        return {loss: r.lossSum, g: lora.trainableTensors().map((t) => t.grad.slice()), hidden};
    };
    // the whole MLP, its activations saved: the reference
    const whole = await run(false);
    // chunks of 7 rows (the last one ragged) with dropout 0.3: each element keeps its mask in the whole tensor
    assert.ok(N % 7 !== 0 && N > 14, `${N} rows`);
    const chunked = await run(true, 7);
    assert.ok(Math.abs(chunked.loss - whole.loss) / whole.loss < 1e-6, `loss ${chunked.loss} vs ${whole.loss}`);
    let worst = 0;
    whole.g.forEach((g, i) => {
        worst = Math.max(worst, maxRelDiff(chunked.g[i], g));
    });
    console.log(
        `${N} rows in chunks of 7: loss ${chunked.loss} vs ${whole.loss}; worst gradient difference ${worst.toExponential(3)}`
    );
    // the parameter gradients are sums over chunks instead of one GEMM over all rows: fp32 rounding only
    assert.ok(worst < 1e-5, `chunked gradients differ by ${worst}`);
    assert.ok(maxRelDiff(chunked.hidden, whole.hidden) < 1e-6);
    // a chunk whose masks restarted at element 0 would train on other masks: the gradients would differ
    assert.ok(whole.g.some((g) => g.some((v) => Math.abs(v) > 1e-6)));
});

test("modules_to_save trains full copies of lm_head and embed_tokens: gradients match finite differences; saved, loaded and merged", async () => {
    const {mkdtempSync, rmSync} = await import("node:fs");
    const os = await import("node:os");
    const path = await import("node:path");
    const {loadAdapter, saveAdapter} = await import("../src/peft/adapter-files.js");
    const {trainableParametersLine} = await import("../src/peft/inject.js");
    const {mergeAdapter} = await import("../src/peft/merge.js");
    const {SafetensorsFile} = await import("../src/io/safetensors.js");
    const model = await DecoderModel.load(MODEL_DIR);
    const lora = applyLora(
        model,
        {r: 4, lora_alpha: 8, target_modules: ["q_proj"], modules_to_save: ["lm_head", "embed_tokens"]},
        {initRng: new Rng(3)}
    );
    assert.notEqual(model.params.lmHead, model.params.embed, "the tied output layer is untied into two trained copies");
    const names = lora.trainableTensors().map((t) => t.name);
    assert.ok(names.includes("base_model.model.lm_head.weight") && names.includes("base_model.model.model.embed_tokens.weight"));
    // all params = base + LoRA + the two copies, as peft counts them
    // q_proj LoRA (8 layers x 4 x (256 + 256)) + two 16384 x 256 copies; all = the base (tied embedding once) + those
    const trainable = 8 * 4 * 512 + 2 * 16384 * 256,
        all = 10_494_208 + trainable;
    assert.equal(
        trainableParametersLine(lora),
        `trainable params: ${trainable.toLocaleString("en-US")} || all params: ` +
            `${all.toLocaleString("en-US")} || trainable%: ${((100 * trainable) / all).toFixed(4)}`
    );
    const trainer = new DecoderTrainer(model);
    const rows = randomRows(1, 41);
    const b = collate(rows, {padTokenId: 16381});
    lora.zeroGrad();
    trainer.forwardBackward(b, {lossScale: 1, gradientCheckpointing: true});
    const loss = () => trainer.forwardBackward(b, {lossScale: 0, gradientCheckpointing: false, noBackward: true}).lossSum;
    const C = model.config.hiddenSize;
    for (const t of lora.trainableTensors().filter((x) => !x.name.includes("lora_"))) {
        // an element of a row the batch actually uses: the first target token's row (head) / the first input id's row (embedding)
        const row = t.name.includes("lm_head") ? rows[0].labels[rows[0].labels.length - 1] : rows[0].inputIds[0];
        for (const i of [row * C, row * C + 7]) {
            const fd = centralDifference(t.param, i, 1e-2, loss);
            assert.ok(Math.abs(fd - t.grad[i]) <= 2e-2 * Math.max(1e-2, Math.abs(fd)), `${t.name}[${i}]: ${t.grad[i]} vs ${fd}`);
        }
    }
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-mts-"));
    try {
        for (const t of lora.trainableTensors()) if (!t.name.includes("lora_")) t.param[5] += 0.5; // make the copies differ
        await saveAdapter(path.join(dir, "a"), lora);
        const st = await SafetensorsFile.open(path.join(dir, "a", "adapter_model.safetensors"));
        assert.deepEqual(st.info("base_model.model.lm_head.weight").shape, [16384, 256]);
        await st.close();
        const ids = Int32Array.from(rows[0].inputIds);
        const ref = model.forward(ids, 1, ids.length);
        const back = await loadAdapter(path.join(dir, "a"), await DecoderModel.load(MODEL_DIR));
        assert.deepEqual(Array.from(back.model.forward(ids, 1, ids.length)), Array.from(ref));
        await mergeAdapter({model: MODEL_DIR, adapter: path.join(dir, "a"), out: path.join(dir, "m"), dtype: "f16"});
        const merged = await DecoderModel.load(path.join(dir, "m"));
        assert.equal(merged.config.tieWordEmbeddings, false);
        const x = merged.forward(ids, 1, ids.length);
        let d = 0;
        for (let i = 0; i < x.length; i++) d = Math.max(d, Math.abs(x[i] - ref[i]));
        assert.ok(d < 0.05, `merged vs adapter: ${d}`);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});
