// Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text), issue 15: (1 + w) RMSNorms, embeddings scaled by
// sqrt(hidden_size), a GELU-tanh gated MLP, norms on the attention's and the MLP's outputs (sandwich norms), q/k norms,
// sliding layers interleaved with global ones (sliding_window_pattern) with a RoPE base of their own, query_pre_attn_scalar,
// final logit soft-capping, tied embeddings. Synthetic checkpoints are checked against the float64 reference decoder,
// finite differences and llama.cpp (GGUF arch "gemma3"); test/fixtures/arch/gemma3 (made by
// scripts/references/make_arch_refs.py with transformers and peft) against transformers and peft.
import {before, test} from "node:test";
import assert from "node:assert/strict";
import {cpSync, readFileSync, writeFileSync} from "node:fs";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {exportGguf} from "../src/api/export-gguf.js";
import {exportOllama} from "../src/api/export-ollama.js";
import {gemma3EmbedScaleNote, gemma3QueryNormScale, gemma3SwaPattern, ggufArchFor} from "../src/export/gguf-metadata.js";
import {parseModelConfig} from "../src/io/hf-config.js";
import {SafetensorsFile} from "../src/io/safetensors.js";
import {DecoderModel} from "../src/model/decoder.js";
import {loadAdapter} from "../src/peft/adapter-files.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {
    GEMMA3,
    checkAgainstReference,
    checkCacheDecoding,
    checkGgufInLlamaCpp,
    checkLoraGradients,
    checkQuantizedGguf,
    fixtureTests,
    saveRandomAdapter,
    syntheticModel,
    tempDir
} from "./helpers/arch-checks.js";

const tmp = tempDir("qlora-gemma3-");
const DIR = path.join(tmp, "tiny-gemma3");
// the GGUF tests' model: a local RoPE base other than llama.cpp's default (1e4), so that rope.freq_base_swa is read
const GGUF_DIR = path.join(tmp, "tiny-gemma3-gguf");

let model: DecoderModel;
let tokenizer: HfTokenizer;
before(async () => {
    model = await syntheticModel(DIR, GEMMA3, {std: 0.15});
    await syntheticModel(GGUF_DIR, {...GEMMA3, rope_local_base_freq: 100}, {std: 0.15});
    tokenizer = await HfTokenizer.load(DIR);
});

test("gemma3: the config reader resolves the layer pattern, both RoPEs, the scales and the soft cap", () => {
    const c = model.config;
    assert.deepEqual(c.layerTypes, ["sliding_attention", "sliding_attention", "full_attention"]);
    assert.equal(c.slidingWindow, 5);
    assert.equal(c.hiddenAct, "gelu_pytorch_tanh");
    assert.equal(c.attentionScale, 48 ** -0.5);
    assert.equal(c.embedScale, 8);
    assert.equal(c.finalLogitSoftcap, 4);
    assert.deepEqual(c.localRope, {theta: 10000, scaling: null});
    assert.equal(c.ropeTheta, 1000000);
    assert.equal(c.ropeScaling?.type, "linear");
    // the local table is the plain base-1e4 one, the global one base 1e6 divided by the factor
    assert.ok(Math.abs(model.localRope!.invFreq[1] - 10000 ** (-2 / 64)) < 1e-7);
    assert.ok(Math.abs(model.invFreq[1] - 1000000 ** (-2 / 64) / 4) < 1e-8);
    // Gemma3TextConfig's defaults: every 6th layer full, window 4096, tied embeddings, head_dim 256, scalar 256
    const d = parseModelConfig(
        {
            model_type: "gemma3_text",
            vocab_size: 32,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 7,
            num_attention_heads: 2
        },
        "config.json"
    );
    assert.deepEqual(
        d.layerTypes.map((t) => t[0]),
        ["s", "s", "s", "s", "s", "f", "s"]
    );
    assert.equal(d.slidingWindow, 4096);
    assert.equal(d.headDim, 256);
    assert.equal(d.attentionScale, 1 / 16);
    assert.ok(d.tieWordEmbeddings && d.finalLogitSoftcap === null);
    // transformers 5's rope_parameters per layer type
    const five = parseModelConfig(
        {
            ...GEMMA3,
            rope_theta: undefined,
            rope_local_base_freq: undefined,
            rope_scaling: undefined,
            rope_parameters: {
                full_attention: {rope_type: "linear", factor: 8, rope_theta: 500000},
                sliding_attention: {rope_type: "default", rope_theta: 20000}
            }
        },
        "config.json"
    );
    assert.equal(five.ropeTheta, 500000);
    assert.equal(five.ropeScaling?.factor, 8);
    assert.deepEqual(five.localRope, {theta: 20000, scaling: null});
});

test("gemma3: configs qlora cannot run are refused naming the key", () => {
    const refuse = (extra: Record<string, unknown>, key: RegExp) =>
        assert.throws(() => parseModelConfig({...GEMMA3, ...extra}, "config.json"), key);
    refuse({attn_logit_softcapping: 50}, /"attn_logit_softcapping" is 50.*set it to null/);
    refuse({use_bidirectional_attention: true}, /"use_bidirectional_attention" is true/);
    refuse({hidden_activation: "gelu"}, /"hidden_activation" is "gelu".*gelu_pytorch_tanh/);
    refuse({final_logit_softcapping: -1}, /"final_logit_softcapping" is -1/);
    refuse({sliding_window: null}, /"sliding_window" is null, but the model has "sliding_attention" layers/);
    refuse({layer_types: ["sliding_attention", "global"]}, /"layer_types"/);
    refuse({rope_parameters: {rope_type: "default", rope_theta: 1}}, /"rope_parameters" .*keys it by layer type/);
    refuse({hidden_size: 66}, /"hidden_size" is 66, not a multiple of num_attention_heads/);
});

test("gemma3: the forward matches the float64 reference (sliding/global layers, two RoPEs, sandwich norms, soft cap)", async () => {
    const ids = tokenizer.encode("床前明月光，疑是地上霜。The quick brown fox jumps over the lazy dog");
    assert.ok(ids.length > 3 * GEMMA3.sliding_window);
    assert.ok(model.params.layers.every((l) => l.attnOutNorm?.length === 64 && l.mlpOutNorm?.length === 64));
    await checkAgainstReference(DIR, model, ids);
    // the cap holds every logit inside (-4, 4), and some come near it
    const logits = model.forward(Int32Array.from(ids), 1, ids.length);
    const top = logits.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    assert.ok(top < 4 && top > 2, `largest |logit| ${top}`);
});

test("gemma3: LoRA gradients through GELU-tanh, the sandwich norms and the soft cap match finite differences; checkpointing recomputes them exactly", () => {
    checkLoraGradients(model, tokenizer.encode("To be, or not to be: that is the question."));
});

test("gemma3: incremental decoding with the KV cache gives the logits of a full forward", () => {
    checkCacheDecoding(model, tokenizer.encode("春眠不觉晓，处处闻啼鸟。夜来风雨声"), 5);
});

test("gemma3: GGUF f16 (arch gemma3: sandwich norms, the window and layer period, both RoPE bases, the cap) and a LoRA GGUF generate qlora's greedy text in llama.cpp", async () => {
    const adapter = path.join(tmp, "adapter");
    await saveRandomAdapter(GGUF_DIR, adapter);
    // longer than three windows: the sliding layers' window decides the later positions
    const ids = tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。");
    assert.ok(ids.length > 3 * GEMMA3.sliding_window);
    await checkGgufInLlamaCpp(GGUF_DIR, tmp, ids, tokenizer.encode("The quick brown fox jumps"), {
        adapterDir: adapter,
        expectTensors: [
            "blk.0.attn_q_norm.weight",
            "blk.0.attn_k_norm.weight",
            "blk.0.post_attention_norm.weight",
            "blk.0.ffn_norm.weight",
            "blk.2.post_ffw_norm.weight",
            "output_norm.weight"
        ],
        expectMetadata: {
            "general.architecture": "gemma3",
            "gemma3.attention.key_length": 64,
            "gemma3.attention.value_length": 64,
            "gemma3.attention.sliding_window": 5,
            "gemma3.attention.sliding_window_pattern": 3,
            "gemma3.rope.freq_base": 1000000,
            "gemma3.rope.freq_base_swa": 100,
            "gemma3.rope.scaling.type": "linear",
            "gemma3.rope.scaling.factor": 4,
            "gemma3.final_logit_softcapping": 4
        }
    });
});

test("gemma3: q8_0 and q4_k_m GGUF exports load in llama.cpp and match qlora on the encoded weights", async () => {
    await checkQuantizedGguf(GGUF_DIR, tmp, tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。"));
});

test("gemma3: the GGUF layer period, the folded query scale, and what llama.cpp's gemma3 cannot express", () => {
    const cfg = (extra: Record<string, unknown>) => parseModelConfig({...GEMMA3, ...extra}, "config.json");
    // Gemma 3 1B's layout (26 layers, every 6th full) is llama.cpp's default period; ours is 3; all full: no window
    assert.equal(gemma3SwaPattern(cfg({num_hidden_layers: 26, sliding_window_pattern: 6})), 6);
    assert.equal(gemma3SwaPattern(model.config), 3);
    assert.equal(gemma3SwaPattern(cfg({layer_types: ["full_attention", "full_attention", "full_attention"]})), null);
    // llama.cpp scales q by head_dim^-0.5 (27B, 62 layers: (hidden / heads)^-0.5); the rest goes into attn_q_norm
    assert.equal(gemma3QueryNormScale(model.config), Math.sqrt(64 / 48));
    assert.equal(gemma3QueryNormScale(cfg({query_pre_attn_scalar: 64})), 1);
    const big = {num_hidden_layers: 62, hidden_size: 5376, num_attention_heads: 32, num_key_value_heads: 16, head_dim: 128};
    assert.equal(gemma3QueryNormScale(cfg({...big, query_pre_attn_scalar: 168, sliding_window_pattern: 6})), 1);
    // the embedding scale: exact in bf16 for hidden 64; Gemma 3 1B's sqrt(1152) = 33.94 is 34 in bf16
    assert.equal(gemma3EmbedScaleNote(model.config), null);
    assert.match(
        gemma3EmbedScaleNote(cfg({hidden_size: 1152, num_attention_heads: 4, num_key_value_heads: 1, head_dim: 256})) ?? "",
        /sqrt\(1152\) = 33\.941, where transformers and qlora running in bf16 use its bf16 rounding 34 /
    );
    const refuse = (extra: Record<string, unknown>, message: RegExp) => assert.throws(() => ggufArchFor(cfg(extra)), message);
    refuse(
        {layer_types: ["full_attention", "sliding_attention", "sliding_attention"]},
        /no periodic pattern.*sliding_window_pattern/
    );
    refuse(
        {
            rope_parameters: {
                full_attention: {rope_type: "default", rope_theta: 1e6},
                sliding_attention: {rope_type: "linear", factor: 2, rope_theta: 1e4}
            },
            rope_theta: undefined,
            rope_local_base_freq: undefined,
            rope_scaling: undefined
        },
        /sliding layers' RoPE has "linear" scaling/
    );
    refuse({rope_scaling: {rope_type: "yarn", factor: 4, original_max_position_embeddings: 256}}, /rope scaling is "yarn"/);
    refuse({attention_bias: true}, /attention biases.*cannot be exported to GGUF/);
});

// Gemma 3's own tokenizer kind (SentencePiece BPE with byte fallback) exports: test/gguf-spm.test.ts
test("gemma3: a tokenizer.json marked byte_fallback with neither tokenizer.model nor SentencePiece's byte tokens is refused by the GGUF export in one line", async () => {
    const dir = path.join(tmp, "byte-fallback");
    cpSync(DIR, dir, {recursive: true});
    const tok = JSON.parse(readFileSync(path.join(dir, "tokenizer.json"), "utf8"));
    tok.model.byte_fallback = true;
    writeFileSync(path.join(dir, "tokenizer.json"), JSON.stringify(tok));
    await assert.rejects(
        exportGguf({modelDir: dir, outtype: "f16", out: path.join(tmp, "byte-fallback.gguf")}),
        /tokenizer\.json.*SentencePiece-style BPE tokenizer \(byte_fallback, as in Llama 2, Gemma 3.*no tokenizer\.model; model\.vocab has 0 of the 256 byte tokens/
    );
});

const fixture = fixtureTests("gemma3", {llamaPrompt: "prompt"});

test("gemma3 fixture: its window, local RoPE base and soft cap each change the logits (the fixture tests them)", {
    skip: fixture.skip
}, async () => {
    const ref = await SafetensorsFile.open(path.join(fixture.dir, "reference.safetensors"));
    const ids = await ref.readI32("input_ids");
    await ref.close();
    const T = ids.length;
    const cfg = JSON.parse(readFileSync(path.join(fixture.dir, "config.json"), "utf8"));
    assert.ok(T > 2 * cfg.sliding_window, "the prompt is longer than the sliding window");
    const base = (await DecoderModel.load(fixture.dir)).forward(ids, 1, T);
    const rope = cfg.rope_parameters;
    const variants: [string, Record<string, unknown>][] = [
        ["the window lifted", {sliding_window: T}],
        ["the sliding layers on the full layers' RoPE", {rope_parameters: {...rope, sliding_attention: rope.full_attention}}],
        ["no soft cap", {final_logit_softcapping: null}]
    ];
    for (const [what, change] of variants) {
        const dir = path.join(tempDir("qlora-gemma3-variant-"), "model");
        cpSync(fixture.dir, dir, {recursive: true});
        writeFileSync(path.join(dir, "config.json"), JSON.stringify({...cfg, ...change}));
        const other = (await DecoderModel.load(dir)).forward(ids, 1, T);
        let d = 0;
        for (let i = 0; i < base.length; i++) d = Math.max(d, Math.abs(other[i] - base[i]));
        console.log(`gemma3 fixture, ${what}: logits change by up to ${d.toFixed(3)}`);
        // 50x the fixture tests' logits tolerance
        assert.ok(d > 0.1, `${what}: the logits change by ${d} only`);
    }
});

test("gemma3 fixture: qlora export ollama, the adapter merged (export gguf --adapter) or kept as a LoRA GGUF, gives the adapted model's distributions in llama.cpp", {
    skip: fixture.skip
}, async () => {
    const adapterDir = path.join(fixture.dir, "adapter");
    const ref = await SafetensorsFile.open(path.join(fixture.dir, "reference.safetensors"));
    const ids = Array.from(await ref.readI32("input_ids"));
    await ref.close();
    const adapted = await DecoderModel.load(fixture.dir);
    await loadAdapter(adapterDir, adapted);
    const want = adapted.forward(Int32Array.from(ids), 1, ids.length);
    const {llamaMeanKl, loadGguf} = await import("./helpers/llama-cpp.js");
    const out = tempDir("qlora-gemma3-ollama-");
    for (const lora of [false, true]) {
        const dir = path.join(out, lora ? "lora" : "merged");
        const result = await exportOllama({modelDir: fixture.dir, adapterDir, out: dir, outtype: "f16", lora});
        assert.deepEqual(result.notes, [], "llama.cpp's gemma3 expresses the whole model");
        assert.deepEqual(result.files, lora ? ["model.gguf", "adapter.gguf", "Modelfile"] : ["model.gguf", "Modelfile"]);
        for (const f of result.files.filter((f) => f.endsWith(".gguf"))) {
            const md = (await gguf(path.join(dir, f), {allowLocalFile: true})).metadata as unknown as Record<string, unknown>;
            assert.equal(md["general.architecture"], "gemma3", f);
        }
        assert.equal(readFileSync(path.join(dir, "Modelfile"), "utf8").includes("ADAPTER ./adapter.gguf"), lora);
        const llama = await loadGguf(path.join(dir, "model.gguf"));
        try {
            const {meanKl, top1Agreement} = await llamaMeanKl(llama, ids, want, {
                lora: lora ? [{filePath: path.join(dir, "adapter.gguf")}] : undefined
            });
            console.log(
                `gemma3 fixture, Ollama folder ${lora ? "with the LoRA GGUF" : "merged"}: mean KL ${meanKl.toExponential(2)}, top-1 agreement ${top1Agreement}`
            );
            assert.ok(meanKl < 1e-3, `mean KL ${meanKl}`);
        } finally {
            await llama.dispose();
        }
    }
});
