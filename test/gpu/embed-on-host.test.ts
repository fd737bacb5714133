// embed-on-host.test.ts (GPU): a frozen, untied input embedding lives in pinned host memory that the kernels
// read over PCIe (CudaModel.embedPlacement "host"). The gathered rows are the same bits as from device memory, so
// losses, gradients and generated tokens must be identical, and the device must hold the table's bytes less.
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {cudaAvailability, cudaMemoryStats} from "../../src/backend/cuda.js";
import {Rng} from "../../src/backend/rng.js";
import {CudaModel} from "../../src/model/cuda-model.js";
import {DecoderModel} from "../../src/model/decoder.js";
import {generate} from "../../src/model/generate.js";
import {writeSyntheticCheckpoint} from "../../src/model/synthetic.js";
import {applyLora} from "../../src/peft/inject.js";
import type {TrainBatch} from "../../src/model/graph.js";

const gpu = cudaAvailability();
const skip = gpu.usable ? false : `no usable GPU: ${gpu.reason}`;
const V = 4096,
    C = 128;

/** CudaModel built with QLORA_CUDA_EMBED_ON_HOST as given; the allocator's bytes the model took */
function build(model: DecoderModel, onHost: boolean): {device: CudaModel; bytes: number} {
    const before = cudaMemoryStats().allocated;
    const saved = process.env.QLORA_CUDA_EMBED_ON_HOST;
    process.env.QLORA_CUDA_EMBED_ON_HOST = onHost ? "1" : "0";
    try {
        const device = new CudaModel(model);
        return {device, bytes: cudaMemoryStats().allocated - before};
    } finally {
        if (saved === undefined) delete process.env.QLORA_CUDA_EMBED_ON_HOST;
        else process.env.QLORA_CUDA_EMBED_ON_HOST = saved;
    }
}

test("the input embedding in pinned host memory: losses, LoRA gradients and greedy tokens identical to device memory", {
    skip
}, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-gpu-embed-"));
    try {
        await writeSyntheticCheckpoint(dir, {
            config: {
                architectures: ["Qwen2ForCausalLM"],
                model_type: "qwen2",
                vocab_size: V,
                hidden_size: C,
                intermediate_size: 256,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                num_key_value_heads: 1,
                max_position_embeddings: 512,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: false,
                torch_dtype: "bfloat16"
            },
            seed: 5,
            std: 0.08
        });
        const load = async () => {
            const model = await DecoderModel.load(dir);
            const lora = applyLora(
                model,
                {r: 8, lora_alpha: 16, target_modules: "all-linear", init_lora_weights: false},
                {
                    initRng: new Rng(3)
                }
            );
            return {model, lora};
        };
        const a = await load(),
            b = await load();
        const host = build(a.model, true),
            device = build(b.model, false);
        assert.equal(host.device.embedPlacement, "host");
        assert.equal(device.device.embedPlacement, "device");
        // the device holds the bf16 table less (the allocator rounds each buffer to its size class)
        const saved = device.bytes - host.bytes;
        console.log(
            `device memory of the model: ${device.bytes} bytes with the embedding on the device, ${host.bytes} on the host`
        );
        assert.ok(
            saved >= 2 * V * C && saved < 2 * V * C + (2 << 20),
            `the device saved ${saved} bytes, not the table's ${2 * V * C}`
        );

        const rng = new Rng(9);
        // one 64-key tile: the attention backward's f32 atomics then have at most two addends a row, whose sum
        // does not depend on their order, so two runs give the same bits
        const B = 2,
            T = 64;
        const inputIds = Int32Array.from({length: B * T}, () => rng.int(V));
        const labels = Int32Array.from({length: B * T}, (_, i) => (i % T === T - 1 ? -100 : inputIds[i + 1]));
        const batch: TrainBatch = {
            B,
            T,
            inputIds,
            labels,
            attentionMask: null,
            positionIds: Int32Array.from({length: B * T}, (_, i) => i % T),
            segIds: null
        };
        for (const checkpointing of [false, true]) {
            const results = [host.device, device.device].map((m, k) => {
                m.zeroGrad();
                const r = m.forwardBackward(batch, {lossScale: 1 / (B * (T - 1)), gradientCheckpointing: checkpointing});
                m.syncToHost(true);
                return {loss: r.lossSum, grads: (k === 0 ? a : b).lora.trainableTensors().map((t) => Float32Array.from(t.grad))};
            });
            assert.equal(results[0].loss, results[1].loss, `loss (checkpointing ${checkpointing})`);
            results[0].grads.forEach((g, i) => assert.deepEqual(g, results[1].grads[i], `gradient ${i}`));
            assert.ok(
                results[0].grads.some((g) => g.some((x) => x !== 0)),
                "gradients are not all zero"
            );
        }
        // decoding reads one row a step through the CUDA graphs' replays
        const prompt = [5, 900, 17, 4000, 33];
        const opts = {maxNewTokens: 24, greedy: true, eosTokenIds: []};
        const ids = generate(host.device, prompt, opts).newIds;
        assert.deepEqual(ids, generate(device.device, prompt, opts).newIds);
        assert.ok(host.device.decodeGraphStats().replays > 0, "decoding replayed CUDA graphs");
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});
