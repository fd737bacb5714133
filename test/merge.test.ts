// qlora merge against peft's merge_and_unload (merged_layers01.safetensors) and the NF4-base option.
import {test} from "node:test";
import assert from "node:assert/strict";
import {existsSync, mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {loadModel} from "../src/api/models.js";
import {SafetensorsCheckpoint, SafetensorsFile} from "../src/io/safetensors.js";
import {mergeAdapter} from "../src/peft/merge.js";
import {DecoderModel} from "../src/model/decoder.js";
import {FIXTURES, MODEL_DIR} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-merge-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));
const ADAPTER = path.join(FIXTURES, "adapter");

/** distance in bf16 units in the last place between two bf16 bit patterns */
function ulpDistance(a: number, b: number): number {
    const ord = (x: number) => (x & 0x8000 ? -(x & 0x7fff) : x & 0x7fff);
    return Math.abs(ord(a) - ord(b));
}

test("merged weights equal peft's merge_and_unload within one bf16 ulp", async () => {
    const out = path.join(tmp, "merged");
    const r = await mergeAdapter({model: MODEL_DIR, adapter: ADAPTER, out});
    assert.equal(r.merged, 56);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
        assert.ok(existsSync(path.join(out, f)), f);
    const ref = await SafetensorsFile.open(path.join(FIXTURES, "merged_layers01.safetensors"));
    const ours = await SafetensorsCheckpoint.open(out);
    let worst = 0,
        differing = 0,
        total = 0;
    for (const name of ref.names()) {
        const a = (await ours.readTyped(name)) as Uint16Array,
            b = (await ref.readTyped(name)) as Uint16Array;
        assert.equal(ours.info(name).dtype, "BF16");
        assert.equal(a.length, b.length);
        for (let i = 0; i < a.length; i++) {
            const d = ulpDistance(a[i], b[i]);
            worst = Math.max(worst, d);
            differing += d > 0 ? 1 : 0;
        }
        total += a.length;
    }
    await ref.close();
    await ours.close();
    console.log(`${ref.names().length} tensors, ${total} values: ${differing} differ, by at most ${worst} bf16 ulp`);
    assert.ok(worst <= 1);
    const cfg = JSON.parse(readFileSync(path.join(out, "config.json"), "utf8"));
    assert.equal(cfg.model_type, "qwen2");
    // the merged folder is a model qlora loads, equal to base + adapter up to bf16 rounding
    const merged = await DecoderModel.load(out);
    const withAdapter = await loadModel(MODEL_DIR, {adapter: ADAPTER});
    const ids = Int32Array.from([3915, 559, 1954, 621, 259, 2245, 884]);
    const a = merged.forward(ids, 1, ids.length),
        b = withAdapter.model.forward(ids, 1, ids.length);
    let d = 0;
    for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
    assert.ok(d < 0.1, `logits differ by ${d}`);
});

test("--against-nf4 merges into the dequantized NF4 base and reproduces the QLoRA model more closely", async () => {
    const orig = path.join(tmp, "orig"),
        nf4 = path.join(tmp, "nf4");
    await mergeAdapter({model: MODEL_DIR, adapter: ADAPTER, out: orig});
    await mergeAdapter({model: MODEL_DIR, adapter: ADAPTER, out: nf4, againstNf4: true});
    const qlora = await loadModel(MODEL_DIR, {adapter: ADAPTER, loadIn4bit: true});
    const ids = Int32Array.from([3915, 559, 1954, 621, 259, 2245, 884, 2176, 9073, 9064]);
    const ref = qlora.model.forward(ids, 1, ids.length);
    const dist = async (dir: string) => {
        const m = await DecoderModel.load(dir);
        const x = m.forward(ids, 1, ids.length);
        let s = 0;
        for (let i = 0; i < x.length; i++) s += (x[i] - ref[i]) ** 2;
        return Math.sqrt(s / x.length);
    };
    const dOrig = await dist(orig),
        dNf4 = await dist(nf4);
    console.log(
        `RMS logit distance to base(NF4) + adapter: original-weight merge ${dOrig.toFixed(4)}, NF4 merge ${dNf4.toFixed(4)}`
    );
    assert.ok(dNf4 < dOrig / 2);
});

test("an adapter of another base is refused, naming the first tensor whose shape differs, and nothing is written", async () => {
    const out = path.join(tmp, "wrong");
    const cfgDir = path.join(tmp, "other-base");
    const {writeSyntheticCheckpoint} = await import("../src/model/synthetic.js");
    await writeSyntheticCheckpoint(cfgDir, {
        config: {
            architectures: ["Qwen2ForCausalLM"],
            model_type: "qwen2",
            vocab_size: 16384,
            hidden_size: 128,
            intermediate_size: 256,
            num_hidden_layers: 8,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            max_position_embeddings: 512,
            tie_word_embeddings: true
        }
    });
    await assert.rejects(
        mergeAdapter({model: cfgDir, adapter: ADAPTER, out}),
        /base_model\.model\.model\.layers\.\d+\.\w+\.\w+\.lora_[AB]\.weight.*another base model/
    );
    assert.ok(!existsSync(out));
});
