// LoRA against peft: loading peft's adapter, the trainable-parameter line, and the gradients of one
// forward/backward on the fixture batch (lora_grads.safetensors), with and without gradient checkpointing.
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {DecoderModel} from "../src/model/decoder.js";
import {DecoderTrainer} from "../src/model/training.js";
import {SafetensorsFile} from "../src/io/safetensors.js";
import {loadAdapter, saveAdapter} from "../src/peft/adapter-files.js";
import {applyLora, trainableParametersLine} from "../src/peft/inject.js";
import {bitsAndBytesConfig} from "../src/quant/config.js";
import {FIXTURES, MODEL_DIR} from "./helpers/paths.js";
import {fixtureBatch, relL2} from "./helpers/fixtures.js";

export async function checkGrads(
    modelLoader: () => Promise<DecoderModel>,
    fixtureFile: string,
    refLossValue: number,
    checkpointing: boolean
): Promise<void> {
    const model = await modelLoader();
    const lora = await loadAdapter(path.join(FIXTURES, "adapter"), model);
    const trainer = new DecoderTrainer(model);
    const batch = await fixtureBatch();
    // two passes: the first counts targets, as the trainer does before scaling the loss
    const {targets} = trainer.forwardBackward(batch, {lossScale: 0, gradientCheckpointing: false, noBackward: true});
    const res = trainer.forwardBackward(batch, {lossScale: 1 / targets, gradientCheckpointing: checkpointing, lossChunkRows: 37});
    const loss = res.lossSum / res.targets;
    const ref = await SafetensorsFile.open(path.join(FIXTURES, fixtureFile));
    const refLoss = (await ref.readF32("loss"))[0];
    let worst = 0,
        checked = 0;
    for (const t of lora.trainableTensors()) {
        const g = await ref.readF32(t.name);
        const err = relL2(t.grad, g);
        worst = Math.max(worst, err);
        checked++;
        assert.ok(err <= 1e-3, `${t.name}: relative L2 error ${err}`);
    }
    await ref.close();
    console.log(
        `${fixtureFile} (checkpointing ${checkpointing}): loss ${loss.toFixed(6)} vs ${refLoss.toFixed(6)}, ` +
            `${checked} tensors, worst relative L2 ${worst.toExponential(3)}`
    );
    assert.equal(checked, 112);
    assert.ok(Math.abs(loss - refLoss) < 1e-4);
    assert.ok(Math.abs(refLoss - refLossValue) < 1e-4, "the fixture is the one the README describes");
}

test("peft's adapter loads and the trainable-parameter line equals peft's", async () => {
    const model = await DecoderModel.load(MODEL_DIR);
    const lora = await loadAdapter(path.join(FIXTURES, "adapter"), model);
    assert.equal(lora.layers.size, 56);
    const expected = readFileSync(path.join(FIXTURES, "trainable_r8.txt"), "utf8").trim();
    assert.equal(trainableParametersLine(lora), expected);
    // a fresh adapter with the same config gives the same line
    const fresh = applyLora(await DecoderModel.load(MODEL_DIR), {r: 8, lora_alpha: 16, target_modules: "all-linear"});
    assert.equal(trainableParametersLine(fresh), expected);
});

test("LoRA gradients match peft (fp32 base)", async () => {
    await checkGrads(() => DecoderModel.load(MODEL_DIR), "lora_grads.safetensors", 3.76989, false);
});

test("LoRA gradients match peft with gradient checkpointing", async () => {
    await checkGrads(() => DecoderModel.load(MODEL_DIR), "lora_grads.safetensors", 3.76989, true);
});

test("an adapter saved by qlora has peft's key names, shapes, dtypes and config fields, and loads back", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-adapter-"));
    try {
        const model = await DecoderModel.load(MODEL_DIR);
        const lora = applyLora(model, {
            r: 8,
            lora_alpha: 16,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            base_model_name_or_path: "tiny-qwen2"
        });
        for (const t of lora.trainableTensors())
            t.param.forEach((_, i, a) => {
                a[i] = Math.sin(i + t.name.length);
            });
        await saveAdapter(dir, lora);
        const ours = await SafetensorsFile.open(path.join(dir, "adapter_model.safetensors"));
        const peft = await SafetensorsFile.open(path.join(FIXTURES, "adapter", "adapter_model.safetensors"));
        assert.deepEqual(ours.names().sort(), peft.names().sort());
        for (const n of peft.names()) {
            assert.deepEqual(ours.info(n).shape, peft.info(n).shape, n);
            assert.equal(ours.info(n).dtype, peft.info(n).dtype, n);
        }
        assert.deepEqual(ours.metadata, peft.metadata);
        await ours.close();
        await peft.close();
        const cfg = JSON.parse(readFileSync(path.join(dir, "adapter_config.json"), "utf8"));
        const peftCfg = JSON.parse(readFileSync(path.join(FIXTURES, "adapter", "adapter_config.json"), "utf8"));
        for (const key of [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "bias",
            "use_rslora",
            "use_dora",
            "fan_in_fan_out",
            "init_lora_weights",
            "base_model_name_or_path",
            "modules_to_save",
            "inference_mode"
        ])
            assert.deepEqual(cfg[key], peftCfg[key], key);
        assert.deepEqual([...cfg.target_modules].sort(), [...peftCfg.target_modules].sort());
        assert.deepEqual(Object.keys(cfg), Object.keys(cfg).sort(), "keys sorted as PEFT writes them");
        // round trip: the loaded model gives the same logits
        const reloaded = await loadAdapter(dir, await DecoderModel.load(MODEL_DIR));
        const ids = Int32Array.from([3915, 559, 1954, 621, 259]);
        const a = lora.model.forward(ids, 1, 5),
            b = reloaded.model.forward(ids, 1, 5);
        assert.deepEqual(Array.from(a.subarray(0, 50)), Array.from(b.subarray(0, 50)));
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});

test("QLoRA gradients match peft + bitsandbytes (pre-quantized bnb-4bit checkpoint)", async () => {
    await checkGrads(() => DecoderModel.load(path.join(FIXTURES, "bnb-4bit")), "qlora_grads.safetensors", 3.84951, true);
});

test("QLoRA gradients match when qlora quantizes the bf16 model itself (load_in_4bit, compute float32)", async () => {
    const quantization = bitsAndBytesConfig({
        load_in_4bit: true,
        bnb_4bit_quant_type: "nf4",
        bnb_4bit_use_double_quant: true,
        bnb_4bit_compute_dtype: "float32"
    });
    await checkGrads(
        async () => {
            const m = await DecoderModel.load(MODEL_DIR, {quantization});
            assert.ok(m.quantized);
            return m;
        },
        "qlora_grads.safetensors",
        3.84951,
        false
    );
});
