// Qwen3 (dense), issue 15: q_norm / k_norm (RMSNorm over each head before RoPE), head_dim independent of
// hidden_size / num_attention_heads, no attention biases. Synthetic checkpoints are checked against the float64
// reference decoder, finite differences and llama.cpp (GGUF arch "qwen3"); test/fixtures/arch/qwen3 (made by
// scripts/references/make_arch_refs.py with transformers and peft) against transformers and peft.
import {before, test} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import type {DecoderModel} from "../src/model/decoder.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {
    QWEN3,
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

const tmp = tempDir("qlora-qwen3-");
const DIR = path.join(tmp, "tiny-qwen3");

let model: DecoderModel;
let tokenizer: HfTokenizer;
before(async () => {
    model = await syntheticModel(DIR, QWEN3, {std: 0.15});
    tokenizer = await HfTokenizer.load(DIR);
});

test("qwen3: the forward matches the float64 reference (q/k norms per head, head_dim != hidden / heads)", async () => {
    assert.equal(model.config.headDim, 64);
    assert.ok(model.params.layers.every((l) => l.qNorm?.length === 64 && l.kNorm?.length === 64));
    await checkAgainstReference(DIR, model, tokenizer.encode("床前明月光，疑是地上霜。The quick brown fox"));
});

test("qwen3: LoRA gradients through the q/k norms match finite differences; checkpointing recomputes them exactly", () => {
    checkLoraGradients(model, tokenizer.encode("To be, or not to be: that is the question."));
});

test("qwen3: incremental decoding with the KV cache gives the logits of a full forward", () => {
    checkCacheDecoding(model, tokenizer.encode("春眠不觉晓，处处闻啼鸟。夜来风雨声"), 5);
});

test("qwen3: GGUF f16 (arch qwen3, attn_q_norm / attn_k_norm) and a LoRA GGUF generate qlora's greedy text in llama.cpp", async () => {
    const adapter = path.join(tmp, "adapter");
    await saveRandomAdapter(DIR, adapter);
    await checkGgufInLlamaCpp(
        DIR,
        tmp,
        tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
        tokenizer.encode("The quick brown fox"),
        {
            adapterDir: adapter,
            expectTensors: ["blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "blk.0.attn_q.weight"],
            expectMetadata: {
                "general.architecture": "qwen3",
                "qwen3.attention.key_length": 64,
                "qwen3.attention.value_length": 64,
                "qwen3.rope.dimension_count": 64
            }
        }
    );
});

test("qwen3: q8_0 and q4_k_m GGUF exports load in llama.cpp and match qlora on the encoded weights", async () => {
    await checkQuantizedGguf(DIR, tmp, tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。"));
});

test("qwen3: qlora train (QLoRA on the CPU, default targets) saves an adapter that chats through the template", async () => {
    await checkFineTune(DIR, tmp, "cpu");
});

fixtureTests("qwen3", {llamaPrompt: "prompt"});
