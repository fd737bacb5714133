// GGUF export of a Llama-architecture checkpoint (synthetic weights, the tiny-qwen2 tokenizer): llama.cpp loads
// it and agrees with qlora token for token and distribution by distribution, which needs the q/k row permutation
// of convert_hf_to_gguf (without it the mean KL is of order 1); the same holds for a LoRA GGUF on that base,
// whose lora_B rows of q/k are permuted too. Untied embeddings exercise output.weight.
import {after, before, test} from "node:test";
import assert from "node:assert/strict";
import {copyFileSync, mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {exportGguf, exportGgufLora} from "../src/api/export-gguf.js";
import {Rng} from "../src/backend/rng.js";
import {loadAdapter, saveAdapter} from "../src/peft/adapter-files.js";
import {applyLora} from "../src/peft/inject.js";
import {DecoderModel} from "../src/model/decoder.js";
import {generate} from "../src/model/generate.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {MODEL_DIR} from "./helpers/paths.js";
import {roundTripModel} from "./helpers/gguf-reference.js";
import {llamaGreedy, llamaMeanKl, loadGguf} from "./helpers/llama-cpp.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-gguf-llama-"));
after(() => rmSync(tmp, {recursive: true, force: true}));
const LLAMA_DIR = path.join(tmp, "tiny-llama");
const ADAPTER_DIR = path.join(tmp, "llama-adapter");
const EOS = [16381];

let tokenizer: HfTokenizer;
let model: DecoderModel;

before(async () => {
    await writeSyntheticCheckpoint(LLAMA_DIR, {
        config: {
            architectures: ["LlamaForCausalLM"],
            model_type: "llama",
            vocab_size: 16384,
            hidden_size: 256,
            intermediate_size: 512,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 1024,
            rms_norm_eps: 1e-5,
            rope_theta: 10000,
            tie_word_embeddings: false,
            bos_token_id: 16381,
            eos_token_id: 16381,
            hidden_act: "silu"
        },
        seed: 7,
        std: 0.08
    });
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(path.join(MODEL_DIR, f), path.join(LLAMA_DIR, f));
    tokenizer = await HfTokenizer.load(LLAMA_DIR);
    model = await DecoderModel.load(LLAMA_DIR);
    // an adapter with random A and B on every projection (init_lora_weights false), saved as PEFT does
    const trained = await DecoderModel.load(LLAMA_DIR);
    const lora = applyLora(
        trained,
        {r: 4, lora_alpha: 8, target_modules: "all-linear", init_lora_weights: false},
        {initRng: new Rng(3)}
    );
    for (const layer of lora.layers.values())
        if (layer.lora)
            layer.lora.B.forEach((v, i, b) => {
                b[i] = v * 0.3;
            });
    await saveAdapter(ADAPTER_DIR, lora);
});

test("a llama checkpoint exports (permuted q/k, output.weight) and llama.cpp matches qlora", async () => {
    const out = path.join(tmp, "llama-f16.gguf");
    const result = await exportGguf({modelDir: LLAMA_DIR, outtype: "f16", out});
    assert.equal(result.arch, "llama");
    const parsed = await gguf(out, {allowLocalFile: true});
    const md = parsed.metadata as unknown as Record<string, unknown>;
    assert.equal(md["general.architecture"], "llama");
    assert.equal(md["llama.rope.dimension_count"], 64);
    assert.equal(md["llama.vocab_size"], 16384);
    assert.equal(md["llama.rope.freq_base"], 10000);
    assert.ok(
        parsed.tensorInfos.some((t) => t.name === "output.weight"),
        "untied: output.weight is written"
    );
    assert.ok(!parsed.tensorInfos.some((t) => t.name.endsWith(".bias")), "llama has no q/k/v biases here");

    const ids = tokenizer.encode("床前明月光，疑是地上霜。The quick brown fox");
    const logits = model.forward(Int32Array.from(ids), 1, ids.length);
    const llamaModel = await loadGguf(out);
    try {
        const {meanKl, top1Agreement} = await llamaMeanKl(llamaModel, ids, logits);
        console.log(
            `llama f16: mean KL ${meanKl.toExponential(2)} over ${ids.length} positions, top-1 agreement ${top1Agreement}`
        );
        assert.ok(meanKl < 1e-3, `mean KL ${meanKl}`);
        assert.equal(top1Agreement, 1);
        const promptIds = tokenizer.encode("春眠不觉晓，");
        const ours = generate(model, promptIds, {maxNewTokens: 16, greedy: true, eosTokenIds: EOS}).newIds;
        const theirs = await llamaGreedy(llamaModel, promptIds, {maxNewTokens: 16, eosTokenIds: EOS});
        assert.deepEqual(theirs, ours);
    } finally {
        await llamaModel.dispose();
    }
});

test("q4_k_m of the llama checkpoint matches qlora on the same dequantized weights", async () => {
    const out = path.join(tmp, "llama-q4_k_m.gguf");
    const result = await exportGguf({modelDir: LLAMA_DIR, outtype: "q4_k_m", out});
    // untied: token_embd Q4_K, output Q6_K; use_more_bits(i, 2) holds for layer 1 only (i >= 7·2/8 = 1), so its
    // attn_v and ffn_down get Q6_K
    assert.deepEqual(result.typeCounts, {Q4_K: 13, F32: 5, Q6_K: 3});
    const ids = tokenizer.encode("床前明月光，疑是地上霜。The quick brown fox");
    const reference = roundTripModel(model, "q4_k_m").forward(Int32Array.from(ids), 1, ids.length);
    const original = model.forward(Int32Array.from(ids), 1, ids.length);
    const llamaModel = await loadGguf(out);
    try {
        const {meanKl, top1Agreement} = await llamaMeanKl(llamaModel, ids, reference);
        const {meanKl: vsOriginal} = await llamaMeanKl(llamaModel, ids, original);
        console.log(
            `llama q4_k_m: mean KL ${meanKl.toExponential(2)} vs the dequantized weights, ` +
                `${vsOriginal.toExponential(2)} vs the original ones; top-1 agreement ${top1Agreement}`
        );
        assert.ok(meanKl < 1e-2 && meanKl < vsOriginal / 5, `mean KL ${meanKl}`);
    } finally {
        await llamaModel.dispose();
    }
});

test("a LoRA GGUF on the llama base matches qlora with the adapter (lora_B of q/k permuted)", async () => {
    const base = path.join(tmp, "llama-base-f16.gguf");
    const adapter = path.join(tmp, "llama-lora.gguf");
    await exportGguf({modelDir: LLAMA_DIR, outtype: "f16", out: base});
    await exportGgufLora({adapterDir: ADAPTER_DIR, modelDir: LLAMA_DIR, out: adapter, outtype: "f16"});
    const withAdapter = await DecoderModel.load(LLAMA_DIR);
    await loadAdapter(ADAPTER_DIR, withAdapter);
    const ids = tokenizer.encode("床前明月光，疑是地上霜。The quick brown fox");
    const logits = withAdapter.forward(Int32Array.from(ids), 1, ids.length);
    const plain = model.forward(Int32Array.from(ids), 1, ids.length);
    const llamaModel = await loadGguf(base);
    try {
        const {meanKl} = await llamaMeanKl(llamaModel, ids, logits, {lora: [{filePath: adapter}]});
        const {meanKl: withoutLora} = await llamaMeanKl(llamaModel, ids, logits);
        const {meanKl: baseKl} = await llamaMeanKl(llamaModel, ids, plain);
        console.log(
            `llama LoRA: mean KL ${meanKl.toExponential(2)} with the adapter, ${withoutLora.toExponential(2)} without it`
        );
        assert.ok(baseKl < 1e-3, "the base alone matches the model without the adapter");
        assert.ok(withoutLora > 100 * meanKl, "the adapter matters");
        assert.ok(meanKl < 1e-3, `mean KL ${meanKl}`);
        const promptIds = tokenizer.encode("春眠不觉晓，");
        const ours = generate(withAdapter, promptIds, {maxNewTokens: 16, greedy: true, eosTokenIds: EOS}).newIds;
        const theirs = await llamaGreedy(llamaModel, promptIds, {
            maxNewTokens: 16,
            eosTokenIds: EOS,
            lora: [{filePath: adapter}]
        });
        assert.deepEqual(theirs, ours);
    } finally {
        await llamaModel.dispose();
    }
});

test("rope scaling (llama3 via rope_freqs.weight, linear, yarn) carries over to llama.cpp", async () => {
    const base = {
        architectures: ["LlamaForCausalLM"],
        model_type: "llama",
        vocab_size: 16384,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 1024,
        rope_theta: 500000,
        tie_word_embeddings: true
    };
    const scalings = {
        none: null,
        llama3: {rope_type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64},
        linear: {rope_type: "linear", factor: 4},
        yarn: {rope_type: "yarn", factor: 4, original_max_position_embeddings: 256}
    };
    const ids = tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。To be, or not to be: that is the question.");
    let unscaled: Float32Array | null = null;
    for (const [name, rope_scaling] of Object.entries(scalings)) {
        const dir = path.join(tmp, `rope-${name}`);
        await writeSyntheticCheckpoint(dir, {config: {...base, rope_scaling}, seed: 3, std: 0.08});
        for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(path.join(MODEL_DIR, f), path.join(dir, f));
        const out = path.join(tmp, `rope-${name}.gguf`);
        await exportGguf({modelDir: dir, outtype: "f16", out});
        const md = (await gguf(out, {allowLocalFile: true})).metadata as unknown as Record<string, unknown>;
        const tensors = (await gguf(out, {allowLocalFile: true})).tensorInfos.map((t) => t.name);
        assert.equal(tensors.includes("rope_freqs.weight"), name === "llama3");
        assert.equal(md["llama.rope.scaling.type"], name === "linear" || name === "yarn" ? name : undefined);
        const logits = (await DecoderModel.load(dir)).forward(Int32Array.from(ids), 1, ids.length);
        unscaled ??= logits;
        const m = await loadGguf(out);
        try {
            const {meanKl} = await llamaMeanKl(m, ids, logits);
            assert.ok(meanKl < 1e-4, `${name}: mean KL ${meanKl}`);
            if (name !== "none") {
                const {meanKl: vsUnscaled} = await llamaMeanKl(m, ids, unscaled);
                assert.ok(vsUnscaled > 30 * meanKl, `${name}: the scaling matters (${vsUnscaled} vs ${meanKl})`);
            }
        } finally {
            await m.dispose();
        }
    }
});
