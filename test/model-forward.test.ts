// The decoder forward against transformers' golden outputs (../shared/fixtures/ref-qwen2) and against an
// independent float64 reference on configurations the fixture does not cover.
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {DecoderModel, KVCache} from "../src/model/decoder.js";
import {generate} from "../src/model/generate.js";
import {SafetensorsCheckpoint, SafetensorsFile} from "../src/io/safetensors.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";
import {readTensorF32} from "../src/model/weights.js";
import {referenceForward, type Tensors} from "./helpers/reference-decoder.js";
import {FIXTURES, MODEL_DIR} from "./helpers/paths.js";
import {centralDifference} from "./helpers/fixtures.js";

const model = await DecoderModel.load(MODEL_DIR);

async function readBatch() {
    const f = await SafetensorsFile.open(path.join(FIXTURES, "batch.safetensors"));
    const ids = await f.readI32("input_ids");
    const mask = await f.readI32("attention_mask");
    const labels = await f.readI32("labels");
    const [B, T] = f.info("input_ids").shape;
    await f.close();
    return {ids, mask: Uint8Array.from(mask), labels, B, T};
}

test("logits and loss match transformers on the fixture batch (fp32, CPU)", async () => {
    const {ids, mask, labels, B, T} = await readBatch();
    const logits = model.forward(ids, B, T, {attentionMask: mask});
    const ref = await SafetensorsFile.open(path.join(FIXTURES, "forward.safetensors"));
    const refLogits = await ref.readF32("logits");
    const refLoss = (await ref.readF32("loss"))[0];
    await ref.close();
    const V = model.config.vocabSize;
    let maxDiff = 0,
        checked = 0;
    for (let b = 0; b < B; b++)
        for (let t = 0; t < T; t++) {
            if (!mask[b * T + t]) continue;
            checked++;
            const o = (b * T + t) * V;
            for (let v = 0; v < V; v++) maxDiff = Math.max(maxDiff, Math.abs(logits[o + v] - refLogits[o + v]));
        }
    const {loss} = model.causalLmLoss(logits, labels, B, T);
    console.log(
        `logits: ${checked} positions, max abs diff ${maxDiff.toExponential(3)}; loss ${loss.toFixed(6)} vs ${refLoss.toFixed(6)}`
    );
    assert.ok(checked > 64, "the batch has unpadded positions in both rows");
    assert.ok(maxDiff <= 2e-3, `logits max abs diff ${maxDiff} > 2e-3`);
    assert.ok(Math.abs(loss - refLoss) <= 1e-4, `loss ${loss} vs ${refLoss}`);
});

test("greedy generation reproduces greedy.json token for token", () => {
    const ref = JSON.parse(readFileSync(path.join(FIXTURES, "greedy.json"), "utf8")) as {
        prompt_ids: number[];
        output_ids: number[];
    };
    const maxNew = ref.output_ids.length - ref.prompt_ids.length;
    const out = generate(model, ref.prompt_ids, {maxNewTokens: maxNew, greedy: true, eosTokenIds: []});
    assert.deepEqual(out.outputIds, ref.output_ids);
});

test("incremental decoding with the KV cache gives the logits of a full forward", () => {
    const ids = Int32Array.from([3915, 559, 1954, 621, 259, 2245, 884, 2176, 9073]);
    const full = model.forward(ids, 1, ids.length);
    const V = model.config.vocabSize;
    const cache = new KVCache(model.config, 1, 16);
    model.forward(ids.subarray(0, 5), 1, 5, {cache});
    let maxDiff = 0;
    for (let t = 5; t < ids.length; t++) {
        const step = model.forward(ids.subarray(t, t + 1), 1, 1, {cache});
        for (let v = 0; v < V; v++) maxDiff = Math.max(maxDiff, Math.abs(step[v] - full[t * V + v]));
    }
    assert.equal(cache.length, ids.length);
    assert.ok(maxDiff < 1e-4, `cache vs full max diff ${maxDiff}`);
});

async function checkAgainstReference(config: Record<string, unknown>, dtype: "F32" | "BF16", tol: number) {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-synth-"));
    try {
        const cfg = await writeSyntheticCheckpoint(dir, {config, dtype, seed: 7, std: 0.08});
        const m = await DecoderModel.load(dir);
        const ckpt = await SafetensorsCheckpoint.open(dir);
        const weights: Tensors = new Map();
        for (const name of ckpt.names()) weights.set(name, Float64Array.from(await readTensorF32(ckpt, name)));
        await ckpt.close();
        const ids = [1, 17, 250, 3, 99, 42, 7, 199, 5, 0, 128];
        const ref = referenceForward(cfg, weights, ids, m.invFreq, m.attentionScaling);
        const got = m.forward(Int32Array.from(ids), 1, ids.length);
        let maxDiff = 0,
            maxRef = 0;
        for (let i = 0; i < ref.length; i++) {
            maxDiff = Math.max(maxDiff, Math.abs(got[i] - ref[i]));
            maxRef = Math.max(maxRef, Math.abs(ref[i]));
        }
        console.log(`${cfg.modelType} ${dtype}: max |ref| ${maxRef.toFixed(3)}, max abs diff ${maxDiff.toExponential(3)}`);
        assert.ok(maxRef > 0.1, "the synthetic model produces non-trivial logits");
        assert.ok(maxDiff <= tol * maxRef, `max abs diff ${maxDiff} > ${tol} * ${maxRef}`);
        return m;
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
}

const llamaConfig = {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    vocab_size: 300,
    hidden_size: 128,
    intermediate_size: 200,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 48,
    rms_norm_eps: 1e-5,
    rope_theta: 500000.0,
    max_position_embeddings: 256,
    tie_word_embeddings: false,
    attention_bias: false,
    mlp_bias: false,
    hidden_act: "silu",
    torch_dtype: "float32"
};

test("a llama checkpoint: untied embeddings, no biases, head_dim != hidden/heads, rope theta 5e5", async () => {
    const m = await checkAgainstReference(llamaConfig, "F32", 1e-4);
    assert.equal(m.config.headDim, 48);
    assert.notEqual(m.params.lmHead, m.params.embed);
});

test("a llama checkpoint with llama3 rope scaling and bf16 weights", async () => {
    await checkAgainstReference(
        {
            ...llamaConfig,
            rope_scaling: {
                rope_type: "llama3",
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            }
        },
        "BF16",
        1e-4
    );
});

test("a mistral checkpoint (GQA 8:1, no biases)", async () => {
    await checkAgainstReference(
        {
            ...llamaConfig,
            architectures: ["MistralForCausalLM"],
            model_type: "mistral",
            num_attention_heads: 8,
            num_key_value_heads: 1,
            head_dim: 16,
            rope_theta: 10000.0,
            sliding_window: null
        },
        "F32",
        1e-4
    );
});

// a tiny Mistral whose sliding window (4) is shorter than the prompt (11 tokens)
const mistralWindowConfig = {
    ...llamaConfig,
    architectures: ["MistralForCausalLM"],
    model_type: "mistral",
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 32,
    rope_theta: 10000.0,
    sliding_window: 4
};

test("a mistral checkpoint with a sliding window shorter than the prompt: the reference's logits, not the windowless model's", async () => {
    const m = await checkAgainstReference(mistralWindowConfig, "F32", 1e-4);
    assert.deepEqual(m.config.layerTypes, ["sliding_attention", "sliding_attention"]);
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-synth-"));
    try {
        await writeSyntheticCheckpoint(dir, {config: mistralWindowConfig, dtype: "F32", seed: 7, std: 0.08});
        const windowed = await DecoderModel.load(dir);
        await writeSyntheticCheckpoint(dir, {
            config: {...mistralWindowConfig, sliding_window: null},
            dtype: "F32",
            seed: 7,
            std: 0.08
        });
        const full = await DecoderModel.load(dir);
        const ids = Int32Array.from([1, 17, 250, 3, 99, 42, 7, 199, 5, 0, 128]);
        const a = windowed.forward(ids, 1, ids.length),
            b = full.forward(ids, 1, ids.length);
        const V = windowed.config.vocabSize;
        const diffAt = (t: number) => {
            let d = 0;
            for (let v = 0; v < V; v++) d = Math.max(d, Math.abs(a[t * V + v] - b[t * V + v]));
            return d;
        };
        // positions 0..3 see their whole past either way; from 4 on the window hides the first keys
        for (let t = 0; t < 4; t++) assert.ok(diffAt(t) <= 1e-5, `position ${t}: ${diffAt(t)}`);
        for (let t = 4; t < ids.length; t++) assert.ok(diffAt(t) > 1e-3, `position ${t} should differ: ${diffAt(t)}`);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});

test("sliding window: the KV cache drops blocks behind the window and decodes the logits of a full forward", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-synth-"));
    try {
        // a window of 70 crosses a 64-position block; 200 positions make the cache drop two blocks
        await writeSyntheticCheckpoint(dir, {
            config: {...mistralWindowConfig, sliding_window: 70},
            dtype: "F32",
            seed: 3,
            std: 0.08
        });
        const m = await DecoderModel.load(dir);
        const V = m.config.vocabSize;
        const ids = Int32Array.from({length: 200}, (_, i) => (i * 37 + 11) % V);
        const full = m.forward(ids, 1, ids.length);
        const cache = new KVCache(m.config, 1, 200);
        assert.equal(cache.window, 70);
        m.forward(ids.subarray(0, 10), 1, 10, {cache});
        let maxDiff = 0,
            mostHeld = 0;
        for (let t = 10; t < ids.length; t++) {
            const step = m.forward(ids.subarray(t, t + 1), 1, 1, {cache});
            for (let v = 0; v < V; v++) maxDiff = Math.max(maxDiff, Math.abs(step[v] - full[t * V + v]));
            mostHeld = Math.max(mostHeld, cache.heldBlocks(0));
        }
        assert.ok(maxDiff < 1e-4, `cache vs full max diff ${maxDiff}`);
        // at length 200 the next query sees keys 131..199: blocks 0 and 1 (positions 0..127) went back
        assert.deepEqual(Array.from(cache.table.subarray(0, 4)), [-1, -1, cache.table[2], cache.table[3]]);
        assert.ok(cache.table[2] >= 0 && cache.table[3] >= 0);
        assert.equal(cache.freeBlockCount, 2);
        assert.ok(mostHeld <= cache.peakBlocks(10, 200), `held ${mostHeld} blocks at once`);
        // a row cut back past what was dropped starts over; one cut within what it holds keeps its keys
        assert.equal(cache.truncate(0, 150), 0);
        assert.equal(cache.length, 0);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});

test("sliding window: greedy generation runs in a pool of the blocks a row holds at once and equals recomputation", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-synth-"));
    try {
        await writeSyntheticCheckpoint(dir, {
            config: {...mistralWindowConfig, sliding_window: 20},
            dtype: "F32",
            seed: 5,
            std: 0.08
        });
        const m = await DecoderModel.load(dir);
        const prompt = [1, 17, 250, 3, 99, 42, 7, 199];
        const maxNew = 150;
        // 158 positions take 3 blocks; with the window a row holds at most 2 at once, and the pool has 2
        assert.equal(new KVCache(m.config, 1, 158).peakBlocks(prompt.length, 158), 2);
        const out = generate(m, prompt, {maxNewTokens: maxNew, greedy: true, eosTokenIds: []});
        const ids = [...prompt];
        const V = m.config.vocabSize;
        for (let i = 0; i < maxNew; i++) {
            const logits = m.forward(Int32Array.from(ids), 1, ids.length);
            let best = 0;
            for (let v = 1; v < V; v++) if (logits[(ids.length - 1) * V + v] > logits[(ids.length - 1) * V + best]) best = v;
            ids.push(best);
        }
        assert.deepEqual(out.outputIds, ids);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});

test("sliding window: LoRA gradients through the windowed backward match finite differences of the loss", async () => {
    const {applyLora} = await import("../src/peft/inject.js");
    const {DecoderTrainer} = await import("../src/model/training.js");
    const {Rng} = await import("../src/backend/rng.js");
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-synth-"));
    try {
        const grads = async (window: number | null, checkpointing: boolean) => {
            await writeSyntheticCheckpoint(dir, {
                config: {...mistralWindowConfig, sliding_window: window},
                dtype: "F32",
                seed: 9,
                std: 0.08
            });
            const m = await DecoderModel.load(dir);
            const lora = applyLora(
                m,
                {r: 2, lora_alpha: 4, target_modules: ["q_proj", "k_proj", "v_proj"], init_lora_weights: false},
                {initRng: new Rng(4)}
            );
            const trainer = new DecoderTrainer(m);
            const T = 12;
            const ids = Int32Array.from({length: T}, (_, i) => (i * 53 + 7) % 300);
            const batch = {
                B: 1,
                T,
                inputIds: ids,
                labels: ids,
                attentionMask: null,
                positionIds: Int32Array.from({length: T}, (_, t) => t),
                segIds: null
            };
            lora.zeroGrad();
            trainer.forwardBackward(batch, {lossScale: 1, gradientCheckpointing: checkpointing});
            const loss = () =>
                trainer.forwardBackward(batch, {lossScale: 0, gradientCheckpointing: false, noBackward: true}).lossSum;
            return {lora, loss};
        };
        const {lora, loss} = await grads(4, false);
        let checked = 0;
        for (const t of lora.trainableTensors()) {
            for (const i of [0, 5, t.param.length - 1]) {
                const fd = centralDifference(t.param, i, 1e-2, loss);
                assert.ok(
                    Math.abs(fd - t.grad[i]) <= 2e-2 * Math.max(2e-2, Math.abs(fd)),
                    `${t.name}[${i}]: ${t.grad[i]} vs ${fd}`
                );
                checked++;
            }
        }
        assert.equal(checked, 2 * 3 * 2 * 3);
        // gradient checkpointing recomputes the same windowed blocks; the windowless model trains otherwise
        const again = (await grads(4, true)).lora.trainableTensors();
        const full = (await grads(null, false)).lora.trainableTensors();
        lora.trainableTensors().forEach((t, i) => {
            assert.deepEqual(Array.from(again[i].grad), Array.from(t.grad), `${t.name}: checkpointing changes the gradient`);
        });
        assert.ok(
            lora.trainableTensors().some((t, i) => t.grad.some((g, j) => Math.abs(g - full[i].grad[j]) > 1e-4)),
            "the window changes no gradient"
        );
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});
