// GGUF export end to end: the embedded tiny-qwen2 exported as f16, q8_0 and q4_k_m loads in llama.cpp
// (node-llama-cpp's prebuilt CPU binary), decodes greedily to the same tokens as qlora, and keeps its perplexity;
// a PEFT adapter merged into the model and the same adapter as a LoRA GGUF on the base give the same tokens.
import {after, before, test} from "node:test";
import assert from "node:assert/strict";
import {copyFileSync, mkdirSync, mkdtempSync, readdirSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {readGgufFileInfo} from "node-llama-cpp";
import {exportGguf, exportGgufLora} from "../src/api/export-gguf.js";
import {loadModel} from "../src/api/models.js";
import {Rng} from "../src/backend/rng.js";
import {loadAdapter, saveAdapter} from "../src/peft/adapter-files.js";
import {applyLora} from "../src/peft/inject.js";
import {DecoderModel} from "../src/model/decoder.js";
import {generate} from "../src/model/generate.js";
import type {HfTokenizer} from "../src/tokenizer/index.js";
import {FIXTURES, MODEL_DIR} from "./helpers/paths.js";
import {roundTripModel} from "./helpers/gguf-reference.js";
import {llamaGreedy, llamaMeanKl, llamaPerplexity, loadGguf} from "./helpers/llama-cpp.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-gguf-"));
after(() => rmSync(tmp, {recursive: true, force: true}));
const ADAPTER = path.join(FIXTURES, "adapter");
const EOS = [16381];
const file = (name: string) => path.join(tmp, name);

// held-out text for perplexity: written for this test (poem-like Chinese and English, as the model was trained on)
const HELD_OUT = [
    "山风吹过小桥东，柳色青青映水中。旧客归来春已晚，一城花雨落帘栊。",
    "夜静江声远，灯昏客梦长。故园何处是，明月照他乡。",
    "孤舟横野渡，细雨湿青衫。回首烟波里，桃花落满岩。",
    "The evening bell is ringing in the hills, and all the birds have gone to rest; the river keeps its quiet song,",
    "and I, a traveller far from home, still count the stars above the western wall.",
    "What light is this that lingers on the water, and whose voice is calling softly from the shore?",
    "秋风起兮白云飞，雁南归兮水东流。",
    "Good friends, the night is long and the road is longer still, yet every lantern by the gate reminds me of the spring.",
    "寒梅开尽雪初消，野水平桥路不遥。莫道春来无消息，东风已到最高条。",
    "My lord, the messenger is come from France with letters for the king, and he would speak with you before the dawn.",
    "青山隐隐水迢迢，落叶纷纷过小桥。独倚高楼人不见，一声长笛入云霄。",
    "Question: A farmer has 12 baskets with 9 apples in each basket. He sells 30 apples. How many apples are left?",
    "Answer: He has 12 * 9 = 108 apples. After selling 30 he has 108 - 30 = 78 apples left. The answer is 78."
].join("\n");

let tokenizer: HfTokenizer;
let model: DecoderModel;

before(async () => {
    const loaded = await loadModel(MODEL_DIR);
    tokenizer = loaded.tokenizer;
    model = loaded.model;
    for (const outtype of ["f16", "q8_0", "q4_k_m"] as const)
        await exportGguf({modelDir: MODEL_DIR, outtype, out: file(`tiny-${outtype}.gguf`)});
});

function qloraGreedy(m: DecoderModel, promptIds: number[], maxNewTokens: number): number[] {
    return generate(m, promptIds, {maxNewTokens, greedy: true, eosTokenIds: EOS}).newIds;
}

test("every exported file parses (@huggingface/gguf, readGgufFileInfo) with the expected metadata and types", async () => {
    const expected: Record<string, Record<string, number>> = {
        f16: {F16: 57, F32: 41},
        q8_0: {Q8_0: 57, F32: 41},
        // token_embd (tied: it is also the output) and attn_v/ffn_down of layers 0, 3, 6, 7 get Q6_K
        q4_k_m: {Q4_K: 48, Q6_K: 9, F32: 41}
    };
    const typeNames: Record<number, string> = {0: "F32", 1: "F16", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K"};
    for (const outtype of ["f16", "q8_0", "q4_k_m"]) {
        const parsed = await gguf(file(`tiny-${outtype}.gguf`), {allowLocalFile: true});
        const md = parsed.metadata as unknown as Record<string, unknown>;
        assert.equal(md["general.architecture"], "qwen2");
        assert.equal(md["general.file_type"], {f16: 1, q8_0: 7, q4_k_m: 15}[outtype]);
        assert.equal(md["qwen2.block_count"], 8);
        assert.equal(md["qwen2.embedding_length"], 256);
        assert.equal(md["qwen2.feed_forward_length"], 768);
        assert.equal(md["qwen2.attention.head_count"], 4);
        assert.equal(md["qwen2.attention.head_count_kv"], 2);
        assert.equal(md["qwen2.context_length"], 2048);
        assert.equal(md["qwen2.rope.freq_base"], 1000000);
        assert.ok(Math.abs((md["qwen2.attention.layer_norm_rms_epsilon"] as number) - 1e-6) < 1e-12);
        assert.equal(md["tokenizer.ggml.model"], "gpt2");
        assert.equal(md["tokenizer.ggml.pre"], "qwen2");
        const tokens = md["tokenizer.ggml.tokens"] as string[];
        assert.equal(tokens.length, 16384);
        assert.equal(tokens[16383], "<|im_end|>");
        const types = md["tokenizer.ggml.token_type"] as number[];
        assert.deepEqual([types[0], types[16381], types[16382], types[16383]], [1, 3, 3, 3]);
        assert.equal((md["tokenizer.ggml.merges"] as string[]).length, 16125);
        assert.equal(md["tokenizer.ggml.eos_token_id"], 16381);
        assert.equal(md["tokenizer.ggml.padding_token_id"], 16381);
        assert.equal(md["tokenizer.ggml.add_bos_token"], false);
        assert.match(md["tokenizer.chat_template"] as string, /<\|im_start\|>/);

        const counts: Record<string, number> = {};
        for (const t of parsed.tensorInfos) counts[typeNames[t.dtype]] = (counts[typeNames[t.dtype]] ?? 0) + 1;
        assert.deepEqual(counts, expected[outtype], outtype);
        const names = new Set(parsed.tensorInfos.map((t) => t.name));
        assert.ok(!names.has("output.weight"), "tied embeddings: no output.weight, llama.cpp uses token_embd");
        assert.ok(names.has("blk.7.attn_q.bias") && names.has("blk.0.ffn_down.weight"));
        const q = parsed.tensorInfos.find((t) => t.name === "blk.0.attn_q.weight")!;
        assert.deepEqual(q.shape.map(Number), [256, 256]);
        const k = parsed.tensorInfos.find((t) => t.name === "blk.0.attn_k.weight")!;
        assert.deepEqual(k.shape.map(Number), [256, 128]);

        const info = await readGgufFileInfo(file(`tiny-${outtype}.gguf`));
        assert.equal(info.version, 3);
        assert.equal(info.metadata.general.architecture, "qwen2");
    }
});

test("the f16 export decodes greedily to qlora's own tokens (same prompt ids)", async () => {
    const llamaModel = await loadGguf(file("tiny-f16.gguf"));
    try {
        for (const prompt of ["床前明月光，", "To be, or not to be"]) {
            const promptIds = tokenizer.encode(prompt);
            const ours = qloraGreedy(model, promptIds, 24);
            const theirs = await llamaGreedy(llamaModel, promptIds, {maxNewTokens: 24, eosTokenIds: EOS});
            assert.deepEqual(
                theirs,
                ours,
                `prompt ${JSON.stringify(prompt)}: ${tokenizer.decode(ours)} vs ${tokenizer.decode(theirs)}`
            );
        }
    } finally {
        await llamaModel.dispose();
    }
});

test("q8_0 and q4_k_m keep the perplexity of f16 within 2% and 10% on held-out text", async () => {
    const ids = tokenizer.encode(HELD_OUT);
    assert.ok(ids.length > 200, `${ids.length} tokens`);
    // qlora's own f32 perplexity of the same text, for reference
    const logits = model.forward(Int32Array.from(ids), 1, ids.length);
    const {loss} = model.causalLmLoss(logits, Int32Array.from(ids), 1, ids.length);
    const ppl: Record<string, number> = {qlora_f32: Math.exp(loss)};
    for (const outtype of ["f16", "q8_0", "q4_k_m"]) {
        const m = await loadGguf(file(`tiny-${outtype}.gguf`));
        try {
            ppl[outtype] = await llamaPerplexity(m, ids);
        } finally {
            await m.dispose();
        }
    }
    const rel = (x: number) => `${(100 * (x / ppl.f16 - 1)).toFixed(2)}%`;
    console.log(
        `perplexity on ${ids.length} held-out tokens: qlora f32 ${ppl.qlora_f32.toFixed(3)}, ` +
            `llama.cpp f16 ${ppl.f16.toFixed(3)}, q8_0 ${ppl.q8_0.toFixed(3)} (${rel(ppl.q8_0)}), ` +
            `q4_k_m ${ppl.q4_k_m.toFixed(3)} (${rel(ppl.q4_k_m)})`
    );
    assert.ok(Math.abs(ppl.f16 / ppl.qlora_f32 - 1) < 0.01, "llama.cpp f16 agrees with qlora's f32 forward");
    assert.ok(Math.abs(ppl.q8_0 / ppl.f16 - 1) <= 0.02, `q8_0 ${rel(ppl.q8_0)}`);
    assert.ok(Math.abs(ppl.q4_k_m / ppl.f16 - 1) <= 0.1, `q4_k_m ${rel(ppl.q4_k_m)}`);
});

test("q8_0 and q4_k_m in llama.cpp match qlora running on the same dequantized weights", async () => {
    const ids = tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。To be, or not to be: that is the question.");
    for (const [outtype, bound] of [
        ["f16", 1e-4],
        ["q8_0", 1e-3],
        ["q4_k_m", 1e-2]
    ] as const) {
        const reference = roundTripModel(model, outtype).forward(Int32Array.from(ids), 1, ids.length);
        const m = await loadGguf(file(`tiny-${outtype}.gguf`));
        try {
            const {meanKl, top1Agreement} = await llamaMeanKl(m, ids, reference);
            console.log(
                `${outtype}: mean KL ${meanKl.toExponential(2)} vs qlora on the dequantized weights, ` +
                    `top-1 agreement ${top1Agreement}`
            );
            assert.ok(meanKl < bound, `${outtype}: mean KL ${meanKl}`);
            assert.ok(top1Agreement >= 0.9, `${outtype}: top-1 agreement ${top1Agreement}`);
        } finally {
            await m.dispose();
        }
    }
});

test("base f16 + the LoRA GGUF gives the greedy tokens of the merged f16 export (and of qlora with the adapter)", async () => {
    await exportGguf({modelDir: MODEL_DIR, adapterDir: ADAPTER, outtype: "f16", out: file("merged-f16.gguf")});
    const lora = await exportGgufLora({adapterDir: ADAPTER, modelDir: MODEL_DIR, out: file("adapter.gguf")});
    assert.deepEqual([lora.r, lora.alpha, lora.tensorCount], [8, 16, 8 * 7 * 2]);
    const parsed = await gguf(file("adapter.gguf"), {allowLocalFile: true});
    const md = parsed.metadata as unknown as Record<string, unknown>;
    assert.equal(md["general.type"], "adapter");
    assert.equal(md["adapter.type"], "lora");
    assert.equal(md["adapter.lora.alpha"], 16);
    const a = parsed.tensorInfos.find((t) => t.name === "blk.0.ffn_down.weight.lora_a")!;
    const b = parsed.tensorInfos.find((t) => t.name === "blk.0.ffn_down.weight.lora_b")!;
    assert.deepEqual(
        [a.shape.map(Number), b.shape.map(Number)],
        [
            [768, 8],
            [8, 256]
        ]
    );

    const withAdapter = await DecoderModel.load(MODEL_DIR);
    await loadAdapter(ADAPTER, withAdapter);
    const base = await loadGguf(file("tiny-f16.gguf"));
    const merged = await loadGguf(file("merged-f16.gguf"));
    try {
        for (const prompt of ["床前明月光，", "The king"]) {
            const promptIds = tokenizer.encode(prompt);
            const ours = qloraGreedy(withAdapter, promptIds, 20);
            const plain = qloraGreedy(model, promptIds, 20);
            assert.notDeepEqual(ours, plain, "the adapter changes the output (its B is random)");
            const fromMerged = await llamaGreedy(merged, promptIds, {maxNewTokens: 20, eosTokenIds: EOS});
            const fromLora = await llamaGreedy(base, promptIds, {
                maxNewTokens: 20,
                eosTokenIds: EOS,
                lora: [{filePath: file("adapter.gguf")}]
            });
            assert.deepEqual(fromLora, fromMerged, `base + LoRA vs merged, prompt ${JSON.stringify(prompt)}`);
            assert.deepEqual(fromMerged, ours, `merged vs qlora with the adapter, prompt ${JSON.stringify(prompt)}`);
        }
    } finally {
        await base.dispose();
        await merged.dispose();
    }
});

test("an adapter with trained biases is merged with its biases (qwen2 q/k/v biases replaced)", async () => {
    const adapterDir = path.join(tmp, "bias-adapter");
    const trained = await DecoderModel.load(MODEL_DIR);
    const lora = applyLora(
        trained,
        {r: 4, lora_alpha: 8, target_modules: ["q_proj", "v_proj"], bias: "all", init_lora_weights: false},
        {initRng: new Rng(5)}
    );
    for (const t of lora.trainableTensors())
        if (t.name.endsWith(".bias"))
            t.param.forEach((v, i, b) => {
                b[i] = v + 0.05 * Math.sin(i);
            });
    await saveAdapter(adapterDir, lora);
    const out = file("bias-merged-f16.gguf");
    await exportGguf({modelDir: MODEL_DIR, adapterDir, outtype: "f16", out});
    const withAdapter = await DecoderModel.load(MODEL_DIR);
    await loadAdapter(adapterDir, withAdapter);
    const ids = tokenizer.encode("床前明月光，疑是地上霜。To be, or not to be");
    const m = await loadGguf(out);
    try {
        const {meanKl} = await llamaMeanKl(m, ids, withAdapter.forward(Int32Array.from(ids), 1, ids.length));
        const {meanKl: vsBase} = await llamaMeanKl(m, ids, model.forward(Int32Array.from(ids), 1, ids.length));
        assert.ok(meanKl < 1e-4 && vsBase > 100 * meanKl, `mean KL ${meanKl} (vs the base: ${vsBase})`);
    } finally {
        await m.dispose();
    }
});

test("a pre-quantized bitsandbytes 4-bit folder exports its dequantized weights", async () => {
    const dir = path.join(tmp, "bnb-4bit");
    mkdirSync(dir);
    for (const f of readdirSync(path.join(FIXTURES, "bnb-4bit")))
        copyFileSync(path.join(FIXTURES, "bnb-4bit", f), path.join(dir, f));
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(path.join(MODEL_DIR, f), path.join(dir, f));
    const out = file("bnb-f16.gguf");
    await exportGguf({modelDir: dir, outtype: "f16", out});
    const bnbModel = await DecoderModel.load(dir);
    assert.ok(bnbModel.quantized);
    const ids = tokenizer.encode("床前明月光，疑是地上霜。");
    const m = await loadGguf(out);
    try {
        const {meanKl} = await llamaMeanKl(m, ids, bnbModel.forward(Int32Array.from(ids), 1, ids.length));
        assert.ok(meanKl < 1e-4, `mean KL ${meanKl}`);
    } finally {
        await m.dispose();
    }
});
