// inference.test.ts (GPU): the model on the GPU (CudaModel) generates and evaluates as the host model does: the
// same graph on the CUDA backend, with the KV cache in device memory and the fused 4-bit GEMV when decoding.
import {test} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {cudaAvailability} from "../../src/backend/cuda.js";
import {CudaModel} from "../../src/model/cuda-model.js";
import {DecoderModel} from "../../src/model/decoder.js";
import {generate, generateBatch, SlotDecoder} from "../../src/model/generate.js";
import {loadAdapter} from "../../src/peft/adapter-files.js";
import {bitsAndBytesConfig} from "../../src/quant/config.js";
import {fixtureBatch, relL2} from "../helpers/fixtures.js";
import {FIXTURES, MODEL_DIR} from "../helpers/paths.js";

const gpu = cudaAvailability();
const skip = gpu.usable ? false : `no usable GPU: ${gpu.reason}`;
const PROMPT = [3915, 559, 1954, 621, 259]; // greedy.json's prompt

/** the fixtures' model as QLoRA runs it on the GPU: the NF4 + double-quant base with the adapter */
async function nf4WithAdapter(): Promise<CudaModel> {
    const model = await DecoderModel.load(MODEL_DIR, {
        quantization: bitsAndBytesConfig({
            load_in_4bit: true,
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: "bfloat16"
        })
    });
    await loadAdapter(path.join(FIXTURES, "adapter"), model);
    return new CudaModel(model);
}

for (const quantized of [false, true]) {
    const what = quantized ? "NF4 base (fused GEMV while decoding)" : "bf16 base";
    test(`${what} + adapter: prefill and cached decoding logits match the host model; greedy tokens agree`, {skip}, async () => {
        const load = async () => {
            const model = await DecoderModel.load(MODEL_DIR, {
                quantization: quantized
                    ? bitsAndBytesConfig({
                          load_in_4bit: true,
                          bnb_4bit_quant_type: "nf4",
                          bnb_4bit_use_double_quant: true,
                          bnb_4bit_compute_dtype: "bfloat16"
                      })
                    : null
            });
            await loadAdapter(path.join(FIXTURES, "adapter"), model);
            return model;
        };
        const host = await load();
        const device = new CudaModel(await load());
        // prefill, then one cached step, on both
        const hc = host.newCache(1, 16),
            dc = device.newCache(1, 16);
        const h1 = host.forward(Int32Array.from(PROMPT), 1, PROMPT.length, {cache: hc});
        const d1 = device.forward(Int32Array.from(PROMPT), 1, PROMPT.length, {cache: dc});
        assert.ok(relL2(d1, h1) < 2e-2, `prefill logits rel L2 ${relL2(d1, h1)}`);
        const h2 = host.forward(Int32Array.from([2245]), 1, 1, {cache: hc});
        const d2 = device.forward(Int32Array.from([2245]), 1, 1, {cache: dc});
        assert.ok(relL2(d2, h2) < 2e-2, `decode-step logits rel L2 ${relL2(d2, h2)}`);
        assert.equal(dc.length, PROMPT.length + 1);
        dc.release();
        const hostIds = generate(host, PROMPT, {maxNewTokens: 8, greedy: true}).newIds;
        const deviceIds = generate(device, PROMPT, {maxNewTokens: 8, greedy: true}).newIds;
        // bf16 may flip a near-tie late in the sequence; the first tokens must agree
        assert.deepEqual(deviceIds.slice(0, 4), hostIds.slice(0, 4), `device ${deviceIds} host ${hostIds}`);
    });
}

test("evaluation loss on the GPU matches the host's", {skip}, async () => {
    const batch = await fixtureBatch();
    const host = await DecoderModel.load(MODEL_DIR);
    await loadAdapter(path.join(FIXTURES, "adapter"), host);
    const device = new CudaModel(host);
    const a = host.score(batch),
        b = device.score(batch);
    assert.equal(b.targets, a.targets);
    assert.ok(
        Math.abs(b.lossSum / b.targets - a.lossSum / a.targets) < 2e-2 * (a.lossSum / a.targets),
        `loss ${b.lossSum / b.targets} vs ${a.lossSum / a.targets}`
    );
});

test("batched generation on the GPU equals one-by-one generation (prompts of different lengths, NF4 + adapter)", {
    skip
}, async () => {
    const device = await nf4WithAdapter();
    const prompts = [PROMPT, PROMPT.slice(0, 2), [...PROMPT, ...PROMPT], [17]];
    const opts = {maxNewTokens: 10, greedy: true, eosTokenIds: [-1]};
    const batch = generateBatch(device, prompts, opts);
    let same = 0;
    prompts.forEach((p, b) => {
        const one = generate(device, p, opts);
        // bf16 rounding differs between a batch's GEMMs and one row's (and the GEMV decodes one row): the first
        // tokens must agree, later ones may drift only after a near-tie
        assert.deepEqual(batch[b].newIds.slice(0, 3), one.newIds.slice(0, 3), `prompt ${b}`);
        if (batch[b].newIds.join() === one.newIds.join()) same++;
    });
    console.log(`batched vs one-by-one on the GPU: ${same} of ${prompts.length} rows identical over 10 tokens`);
    assert.ok(same >= prompts.length - 1);
});

test("continuous batching on the GPU: rows joining and leaving a running batch get their one-by-one tokens", {skip}, async () => {
    const model = await DecoderModel.load(MODEL_DIR);
    await loadAdapter(path.join(FIXTURES, "adapter"), model);
    const device = new CudaModel(model);
    const prompts = [PROMPT, [...PROMPT, ...PROMPT], PROMPT.slice(0, 2)];
    const greedy = {greedy: true};
    const alone = (p: number[], n: number) => generate(device, p, {maxNewTokens: n, greedy: true, eosTokenIds: [-1]}).newIds;
    const dec = new SlotDecoder(device, 2, 64, [-1]);
    const a = dec.join(prompts[0], {...greedy, maxNewTokens: 6});
    dec.step();
    dec.step();
    const b = dec.join(prompts[1], {...greedy, maxNewTokens: 10});
    while (!a.done) dec.step();
    // a's cache row was freed: b moved into it (a device copy of its keys and values), c joins the free row
    const c = dec.join(prompts[2], {...greedy, maxNewTokens: 8});
    while (dec.active > 0) dec.step();
    dec.release();
    const rows = [
        [a, 6],
        [b, 10],
        [c, 8]
    ] as const;
    let same = 0;
    rows.forEach(([row, n], i) => {
        const one = alone(prompts[i], n);
        // bf16: the first tokens must agree; later ones may drift only after a near-tie
        assert.deepEqual(row.result.newIds.slice(0, 3), one.slice(0, 3), `row ${i}`);
        if (row.result.newIds.join() === one.join()) same++;
    });
    console.log(`continuous batching on the GPU: ${same} of 3 rows identical to one-by-one`);
    assert.ok(same >= 2);
});

test("CUDA graphs: replayed decoding steps give eager decoding's tokens bit for bit (rows joining, leaving, sampled)", {
    skip
}, async () => {
    const device = await nf4WithAdapter();
    const prompts = [PROMPT, [...PROMPT, ...PROMPT], PROMPT.slice(0, 2), [17, 4, 900]];
    // the same schedule twice: a greedy row, a sampled row with a repetition penalty, rows joining a running
    // batch at other lengths and leaving it (the batch size changes: each size is its own recording)
    const run = (graphs: boolean) => {
        device.cudaGraphs = graphs;
        const dec = new SlotDecoder(device, 3, 64, [-1]);
        const a = dec.join(prompts[0], {greedy: true, maxNewTokens: 12});
        const b = dec.join(prompts[1], {
            greedy: false,
            temperature: 0.9,
            topK: 40,
            topP: 0.9,
            seed: 7,
            repetitionPenalty: 1.3,
            maxNewTokens: 5
        });
        for (let i = 0; i < 3; i++) dec.step();
        const c = dec.join(prompts[2], {greedy: true, maxNewTokens: 9});
        while (!b.done) dec.step();
        const d = dec.join(prompts[3], {greedy: false, temperature: 1.2, seed: 3, maxNewTokens: 7});
        while (dec.active > 0) dec.step();
        dec.release();
        return [a, b, c, d].map((r) => r.result.newIds);
    };
    const eager = run(false);
    const before = device.decodeGraphStats();
    const graphed = run(true);
    const stats = device.decodeGraphStats();
    console.log(
        `CUDA graphs: ${stats.recorded} recordings, ${stats.replays - before.replays} replays; failure: ${stats.failure}`
    );
    assert.equal(stats.failure, null);
    assert.equal(before.replays, 0, "graphs off: nothing replayed");
    assert.ok(
        // each batch size records on its second step and replays after (2 recordings, 9 replays on an H100)
        stats.recorded >= 2 && stats.replays - before.replays >= 5,
        `recorded ${stats.recorded}, replays ${stats.replays}`
    );
    assert.deepEqual(graphed, eager);
    assert.deepEqual(
        eager.map((ids) => ids.length),
        [12, 5, 9, 7]
    );
});

test("sliding window on the GPU: a tiny Mistral (window 70) decodes 200 positions as the host does, CUDA graphs bit for bit", {
    skip
}, async () => {
    const {mkdtempSync, rmSync} = await import("node:fs");
    const os = await import("node:os");
    const {writeSyntheticCheckpoint} = await import("../../src/model/synthetic.js");
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-gpu-sw-"));
    try {
        // head_dim 64 (the CUDA kernels' size); 200 positions: blocks 0 and 1 fall behind the window and are freed
        await writeSyntheticCheckpoint(dir, {
            config: {
                architectures: ["MistralForCausalLM"],
                model_type: "mistral",
                vocab_size: 300,
                hidden_size: 128,
                intermediate_size: 256,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                num_key_value_heads: 1,
                max_position_embeddings: 512,
                rms_norm_eps: 1e-5,
                sliding_window: 70,
                tie_word_embeddings: false,
                torch_dtype: "bfloat16"
            },
            dtype: "BF16",
            seed: 11,
            std: 0.08
        });
        const host = await DecoderModel.load(dir);
        const device = new CudaModel(await DecoderModel.load(dir));
        const prompt = Array.from({length: 90}, (_, i) => (i * 37 + 5) % 300);
        // prefill past the window, then cached steps: the logits of the host's
        const hc = host.newCache(1, 200),
            dc = device.newCache(1, 200);
        const h1 = host.forward(Int32Array.from(prompt), 1, prompt.length, {cache: hc});
        const d1 = device.forward(Int32Array.from(prompt), 1, prompt.length, {cache: dc});
        assert.ok(relL2(d1, h1) < 2e-2, `prefill logits rel L2 ${relL2(d1, h1)}`);
        for (const id of [17, 250, 3]) {
            const h = host.forward(Int32Array.of(id), 1, 1, {cache: hc});
            const d = device.forward(Int32Array.of(id), 1, 1, {cache: dc});
            assert.ok(relL2(d, h) < 2e-2, `decode-step logits rel L2 ${relL2(d, h)}`);
        }
        assert.equal(dc.heldBlocks(0), hc.heldBlocks(0));
        dc.release();
        const run = (graphs: boolean) => {
            device.cudaGraphs = graphs;
            return generate(device, prompt, {maxNewTokens: 110, greedy: true, eosTokenIds: []}).newIds;
        };
        const eager = run(false),
            graphed = run(true);
        assert.deepEqual(graphed, eager, "graph replays differ from eager decoding");
        const hostIds = generate(host, prompt, {maxNewTokens: 110, greedy: true, eosTokenIds: []}).newIds;
        // bf16 may flip a near-tie late in the sequence; the first tokens must agree
        assert.deepEqual(eager.slice(0, 8), hostIds.slice(0, 8), `device ${eager} host ${hostIds}`);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});
