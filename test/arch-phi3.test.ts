// Phi-3 / Phi-4-mini, issue 15: fused qkv_proj and gate_up_proj (LoRA on the fused modules, as PEFT does),
// partial rotary embedding (partial_rotary_factor), LongRoPE (short_factor below the original context, long_factor
// from it, attention factor). Synthetic checkpoints are checked against the float64 reference decoder, finite
// differences and llama.cpp (GGUF arch "phi3": attn_qkv, ffn_up of 2 x ff rows, rope_factors_long/short);
// test/fixtures/arch/phi3 (made by scripts/references/make_arch_refs.py) against transformers and peft.
import {before, test} from "node:test";
import assert from "node:assert/strict";
import {cp, readFile, writeFile} from "node:fs/promises";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {exportGguf} from "../src/api/export-gguf.js";
import type {DecoderModel} from "../src/model/decoder.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {
    checkAgainstReference,
    checkCacheDecoding,
    checkFineTune,
    checkGgufInLlamaCpp,
    checkLoraGradients,
    checkQuantizedGguf,
    fixtureTests,
    saveRandomAdapter,
    syntheticModel,
    tempDir
} from "./helpers/arch-checks.js";
import {loadGguf} from "./helpers/llama-cpp.js";

/** Phi-4-mini's tokenizer.json Split regex (tiktoken's o200k_base pattern) */
const O200K_SPLIT = String.raw`[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`;

const tmp = tempDir("qlora-phi3-");

/** Phi-4-mini's shape in small: tied embeddings, GQA, partial rotary 0.5 of head_dim 64, longrope */
function phi3(original: number): Record<string, unknown> {
    return {
        architectures: ["Phi3ForCausalLM"],
        model_type: "phi3",
        vocab_size: 16384,
        hidden_size: 128,
        intermediate_size: 192,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        max_position_embeddings: 4096,
        original_max_position_embeddings: original,
        partial_rotary_factor: 0.5,
        rope_theta: 10000,
        rope_scaling: {
            type: "longrope",
            short_factor: Array.from({length: 16}, (_, i) => 1 + 0.05 * i),
            long_factor: Array.from({length: 16}, (_, i) => 1 + 0.75 * i)
        },
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        resid_pdrop: 0,
        embd_pdrop: 0,
        attention_dropout: 0,
        sliding_window: null,
        bos_token_id: 16381,
        eos_token_id: 16381,
        hidden_act: "silu"
    };
}

/** original context 512: a context of 256 stays on short_factor (qlora, transformers and llama.cpp alike) */
const SHORT_DIR = path.join(tmp, "tiny-short");
/** original context 16: prompts longer than it run on long_factor everywhere (llama.cpp: a context above 16) */
const LONG_DIR = path.join(tmp, "tiny-long");
let shortModel: DecoderModel;
let longModel: DecoderModel;
let tokenizer: HfTokenizer;
const LONG_TEXT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。To be, or not to be: that is the question.";

before(async () => {
    shortModel = await syntheticModel(SHORT_DIR, phi3(512), {std: 0.1});
    longModel = await syntheticModel(LONG_DIR, phi3(16), {std: 0.1, seed: 11});
    tokenizer = await HfTokenizer.load(SHORT_DIR);
});

test("phi3: fused projections, partial rotary and longrope match the float64 reference", async () => {
    const cfg = shortModel.config;
    assert.equal(cfg.fusedProjections, true);
    assert.equal(cfg.rotaryDim, 32);
    assert.equal(shortModel.invFreq.length, 16);
    assert.ok(shortModel.attentionScaling > 1, "longrope's attention factor (max / original > 1)");
    assert.deepEqual(Object.keys(shortModel.params.layers[0].proj).sort(), ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]);
    await checkAgainstReference(SHORT_DIR, shortModel, tokenizer.encode("床前明月光，疑是地上霜。The quick brown fox"));
    // past the original context the whole forward runs on long_factor's table
    const ids = tokenizer.encode(LONG_TEXT);
    assert.ok(ids.length > 16);
    await checkAgainstReference(LONG_DIR, longModel, ids, true);
});

test("phi3: LoRA gradients of qkv_proj / gate_up_proj match finite differences; checkpointing recomputes them exactly", () => {
    checkLoraGradients(shortModel, tokenizer.encode("To be, or not to be: that is the question."));
});

test("phi3: incremental decoding with the KV cache gives the logits of a full forward (short and long tables)", () => {
    checkCacheDecoding(shortModel, tokenizer.encode("春眠不觉晓，处处闻啼鸟。夜来风雨声"), 5);
    // prefilled past the original context: every step runs on long_factor, as the full forward does
    const ids = tokenizer.encode(LONG_TEXT);
    checkCacheDecoding(longModel, ids, 20);
});

test("phi3: GGUF f16 (arch phi3, attn_qkv, 2 x ff ffn_up, rope factors) and a LoRA GGUF generate qlora's greedy text in llama.cpp", async () => {
    const expectTensors = [
        "blk.0.attn_qkv.weight",
        "blk.1.ffn_up.weight",
        "rope_factors_long.weight",
        "rope_factors_short.weight"
    ];
    const adapter = path.join(tmp, "adapter");
    await saveRandomAdapter(SHORT_DIR, adapter);
    await checkGgufInLlamaCpp(
        SHORT_DIR,
        tmp,
        tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
        tokenizer.encode("The quick brown fox"),
        {
            adapterDir: adapter,
            expectTensors,
            expectMetadata: {
                "general.architecture": "phi3",
                "phi3.rope.dimension_count": 32,
                "phi3.rope.scaling.original_context_length": 512,
                "phi3.context_length": 4096
            }
        }
    );
    // a name llama.cpp would take for Phi-3's SentencePiece vocabulary is refused before anything is written
    await assert.rejects(
        exportGguf({modelDir: SHORT_DIR, outtype: "f16", out: path.join(tmp, "named.gguf"), name: "Phi-3 tiny"}),
        /general\.name "Phi-3 tiny" makes llama\.cpp treat the vocabulary as Phi-3's and look up <\/s>, <unk>, <s>, .*--name/
    );
    // long_factor: llama.cpp picks it for a context above the original one, qlora for positions past it
    const ids = tokenizer.encode(LONG_TEXT);
    await checkGgufInLlamaCpp(LONG_DIR, tmp, ids, ids, {expectTensors});
});

test("phi3: q8_0 and q4_k_m GGUF exports load in llama.cpp and match qlora on the encoded weights", async () => {
    await checkQuantizedGguf(SHORT_DIR, tmp, tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。"));
});

test("phi3: qlora train (QLoRA on the CPU, default targets) saves an adapter that chats through the template", async () => {
    await checkFineTune(SHORT_DIR, tmp, "cpu");
});

test("phi3: Phi-4-mini's o200k pre-tokenizer is written as llama.cpp's gpt-4o, which splits text as the tokenizer does", async () => {
    // tiny-qwen2's vocabulary behind Phi-4-mini's Split regex. Its merges never join digits (Qwen2 splits them one
    // by one), so one token becomes "12" with the first merge "1 2": o200k's groups of three digits then tokenize
    // differently from Qwen2's split, and a tokenizer that split like Qwen2 would be caught
    const dir = path.join(tmp, "tiny-o200k");
    await cp(SHORT_DIR, dir, {recursive: true});
    const json = JSON.parse(await readFile(path.join(dir, "tokenizer.json"), "utf8"));
    const vocab = json.model.vocab as Record<string, number>;
    const reused = Object.keys(vocab).find((k) => vocab[k] === 16380)!;
    delete vocab[reused];
    vocab["12"] = 16380;
    json.model.merges.unshift(["1", "2"]);
    await writeFile(path.join(dir, "tokenizer.json"), JSON.stringify(json));
    const qwenSplit = await HfTokenizer.load(dir);
    json.pre_tokenizer.pretokenizers[0].pattern.Regex = O200K_SPLIT;
    await writeFile(path.join(dir, "tokenizer.json"), JSON.stringify(json));
    const out = path.join(tmp, "o200k.gguf");
    await exportGguf({modelDir: dir, outtype: "f16", out, name: "qlora test model"});
    const md = (await gguf(out, {allowLocalFile: true})).metadata as unknown as Record<string, unknown>;
    assert.equal(md["tokenizer.ggml.pre"], "gpt-4o");
    const ours = await HfTokenizer.load(dir);
    const llama = await loadGguf(out);
    try {
        const texts = ["Don't SHOUT, I'm here!  12345 apples\n\nNew line's end", "CamelCaseWords and mixedUP text 3.14159, 412"];
        for (const text of texts) {
            const theirs = Array.from(llama.tokenize(text)).map(Number);
            assert.deepEqual(theirs, ours.encode(text), text);
        }
        assert.ok(ours.encode(texts[0]).includes(16380), "o200k's split lets the 1 2 merge happen");
        assert.notDeepEqual(ours.encode(texts[0]), qwenSplit.encode(texts[0]), "the control: Qwen2's split tokenizes otherwise");
    } finally {
        await llama.dispose();
    }
});

fixtureTests("phi3", {llamaPrompt: "long"});
