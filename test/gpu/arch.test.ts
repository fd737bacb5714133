// arch.test.ts (GPU), issue 15: Qwen3 (q/k norms per head, head_dim != hidden / heads), Phi-3 / Phi-4-mini
// (fused qkv_proj / gate_up_proj, partial rotary, longrope's short and long tables; Phi-3-mini's head_dim 96) and Gemma 3 (sandwich norms,
// GELU-tanh gate, scaled embeddings, sliding/global layers with two RoPEs, soft-capped logits) on the CUDA backend: logits,
// LoRA and QLoRA gradients and cached decoding against the host model (bf16 tolerances, as test/gpu/trainer.test.ts
// and inference.test.ts), CUDA-graph decoding equal to eager decoding across the longrope switch, a short QLoRA run
// with `qlora train`, and, where test/fixtures/arch/<name> exists, the logits and LoRA gradients of transformers/peft.
// The ops under it (per-head RMSNorm rows, partial-rotary RoPE and RoPE + cache write, copyColumns, gatedAct,
// scale, soft-capped causalLmLoss / logits / pickTokens) are rows of
// test/gpu/backend-ops.test.ts.
import {test} from "node:test";
import assert from "node:assert/strict";
import {existsSync} from "node:fs";
import path from "node:path";
import {cudaAvailability} from "../../src/backend/cuda.js";
import {collate} from "../../src/data/index.js";
import {SafetensorsFile} from "../../src/io/safetensors.js";
import {CudaModel} from "../../src/model/cuda-model.js";
import {DecoderModel} from "../../src/model/decoder.js";
import {generate} from "../../src/model/generate.js";
import {DecoderTrainer, type TrainBatch} from "../../src/model/training.js";
import {loadAdapter} from "../../src/peft/adapter-files.js";
import {bitsAndBytesConfig, QLORA_BNB_DEFAULTS} from "../../src/quant/config.js";
import {ARCH_FIXTURES, checkFineTune, GEMMA3, QWEN3, randomLora, syntheticModel, tempDir} from "../helpers/arch-checks.js";
import {relL2} from "../helpers/fixtures.js";

const gpu = cudaAvailability();
const skip = gpu.usable ? false : `no usable GPU: ${gpu.reason}`;
const tmp = skip ? "" : tempDir("qlora-gpu-arch-");

/** Phi-4-mini's shape in small; original context 16, so that decoding crosses into long_factor */
const PHI3 = {
    architectures: ["Phi3ForCausalLM"],
    model_type: "phi3",
    vocab_size: 16384,
    hidden_size: 256,
    intermediate_size: 320,
    num_hidden_layers: 2,
    num_attention_heads: 2,
    num_key_value_heads: 1,
    max_position_embeddings: 4096,
    original_max_position_embeddings: 16,
    partial_rotary_factor: 0.75,
    rope_theta: 10000,
    rope_scaling: {
        type: "longrope",
        short_factor: Array.from({length: 48}, (_, i) => 1 + 0.02 * i),
        long_factor: Array.from({length: 48}, (_, i) => 1 + 0.5 * i)
    },
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    hidden_act: "silu"
};

/** Phi-3-mini's / Phi-3.5-mini's shape in small: head_dim 96 (3072 / 32 there), full rotary, plain heads */
const PHI3_MINI = {
    ...PHI3,
    hidden_size: 192,
    num_attention_heads: 2,
    num_key_value_heads: 2,
    partial_rotary_factor: 1,
    rope_scaling: {
        type: "longrope",
        short_factor: Array.from({length: 48}, (_, i) => 1 + 0.02 * i),
        long_factor: Array.from({length: 48}, (_, i) => 1 + 0.5 * i)
    }
};

const ARCHS = {qwen3: QWEN3, phi3: PHI3, "phi3-mini": PHI3_MINI, gemma3: GEMMA3} as const;
const ids = (n: number) => Array.from({length: n}, (_, i) => (i * 7919 + 13) % 16000);

function batchOf(tokens: number[]): TrainBatch {
    const labels = tokens.map((id, i) => (i < 3 ? -100 : id));
    return collate([{inputIds: Int32Array.from(tokens), labels: Int32Array.from(labels)}], {padTokenId: 16381});
}

/** the random LoRA's gradients on the host and on the device (the same init: randomLora seeds it) */
async function gradients(dir: string, quantized: boolean, checkpointing: boolean, tokens: number[]) {
    const load = () => DecoderModel.load(dir, {quantization: quantized ? bitsAndBytesConfig({...QLORA_BNB_DEFAULTS}) : null});
    const hostModel = await load();
    const hostLora = randomLora(hostModel);
    const deviceModel = await load();
    const deviceLora = randomLora(deviceModel);
    const b = batchOf(tokens);
    hostLora.zeroGrad();
    const h = new DecoderTrainer(hostModel).forwardBackward(b, {lossScale: 1 / 20, gradientCheckpointing: false});
    const device = new CudaModel(deviceModel);
    device.zeroGrad();
    const d = device.forwardBackward(b, {lossScale: 1 / 20, gradientCheckpointing: checkpointing});
    device.syncToHost(true);
    const errs = hostLora.trainableTensors().map((t, i) => relL2(deviceLora.trainableTensors()[i].grad, t.grad));
    return {errs: errs.sort((a, b) => a - b), hostLoss: h.lossSum, deviceLoss: d.lossSum};
}

for (const [name, config] of Object.entries(ARCHS)) {
    const dir = tmp && path.join(tmp, `tiny-${name}`);

    test(`${name} on CUDA: logits, LoRA and QLoRA gradients follow the host model (bf16 tolerances)`, {skip}, async () => {
        const host = await syntheticModel(dir, config, {std: 0.08, dtype: "BF16"});
        const device = new CudaModel(await DecoderModel.load(dir));
        // past phi3's original context too: the long table on both
        for (const n of [12, 40]) {
            const t = ids(n);
            const e = relL2(device.forward(Int32Array.from(t), 1, n), host.forward(Int32Array.from(t), 1, n));
            console.log(`${name}: ${n} tokens, logits rel L2 ${e.toExponential(2)}`);
            assert.ok(e < 2e-2, `logits rel L2 ${e}`);
        }
        for (const [quantized, checkpointing] of [
            [false, false],
            [false, true],
            [true, true]
        ] as const) {
            const {errs, hostLoss, deviceLoss} = await gradients(dir, quantized, checkpointing, ids(30));
            console.log(
                `${name} ${quantized ? "QLoRA" : "LoRA"} (checkpointing ${checkpointing}): loss ${deviceLoss.toFixed(4)} vs ` +
                    `${hostLoss.toFixed(4)}; ${errs.length} gradients, median rel L2 ${errs[errs.length >> 1].toExponential(2)}, ` +
                    `worst ${errs[errs.length - 1].toExponential(2)}`
            );
            assert.ok(Math.abs(deviceLoss - hostLoss) < 2e-2 * Math.abs(hostLoss));
            assert.ok(errs[errs.length >> 1] < 3e-2 && errs[errs.length - 1] < 1e-1, "bf16 gradient tolerance");
        }
    });

    test(`${name} on CUDA: cached decoding follows the host; CUDA graphs replay it exactly (phi3: across the longrope switch)`, {
        skip
    }, async () => {
        const host = await DecoderModel.load(dir);
        const device = new CudaModel(await DecoderModel.load(dir));
        const prompt = ids(10);
        const hc = host.newCache(1, 64),
            dc = device.newCache(1, 64);
        const h1 = host.forward(Int32Array.from(prompt), 1, prompt.length, {cache: hc});
        const d1 = device.forward(Int32Array.from(prompt), 1, prompt.length, {cache: dc});
        assert.ok(relL2(d1, h1) < 2e-2, `prefill logits rel L2 ${relL2(d1, h1)}`);
        // phi3: positions 10..19 cross the original context of 16, where both switch to long_factor
        for (const id of ids(10)) {
            const h = host.forward(Int32Array.of(id), 1, 1, {cache: hc});
            const d = device.forward(Int32Array.of(id), 1, 1, {cache: dc});
            assert.ok(relL2(d, h) < 2e-2, `decode-step logits rel L2 ${relL2(d, h)}`);
        }
        dc.release();
        const run = (graphs: boolean) => {
            device.cudaGraphs = graphs;
            return generate(device, prompt, {maxNewTokens: 24, greedy: true, eosTokenIds: []}).newIds;
        };
        const eager = run(false),
            graphed = run(true);
        const stats = device.decodeGraphStats();
        assert.equal(stats.failure, null);
        assert.deepEqual(graphed, eager, "graph replays differ from eager decoding");
        const hostIds = generate(host, prompt, {maxNewTokens: 24, greedy: true, eosTokenIds: []}).newIds;
        assert.deepEqual(eager.slice(0, 4), hostIds.slice(0, 4), `device ${eager} host ${hostIds}`);
    });

    test(`${name} on CUDA: qlora train (QLoRA, default targets) saves an adapter that chats`, {skip}, async () => {
        await checkFineTune(dir, tmp, "cuda");
    });

    const fixture = path.join(ARCH_FIXTURES, name);
    const noFixture =
        skip ||
        (name === "phi3-mini"
            ? "no transformers fixture of this shape (test/fixtures/arch/phi3 is checked above)"
            : existsSync(fixture)
              ? false
              : `${fixture} is missing (scripts/references/make_arch_refs.py)`);
    test(`${name} on CUDA: logits and LoRA gradients of the transformers/peft fixture (bf16 tolerances)`, {
        skip: noFixture
    }, async () => {
        const ref = await SafetensorsFile.open(path.join(fixture, "reference.safetensors"));
        const inputIds = Array.from(await ref.readI32("input_ids"));
        const labels = Array.from(await ref.readI32("labels"));
        const positions = Array.from(await ref.readI32("logit_positions"));
        const want = await ref.readF32("logits");
        await ref.close();
        const model = await DecoderModel.load(fixture);
        const lora = await loadAdapter(path.join(fixture, "adapter"), model);
        const device = new CudaModel(model);
        // the fixture's logits are of the base model: compare them before the adapter changes anything
        const base = new CudaModel(await DecoderModel.load(fixture));
        const got = base.forward(Int32Array.from(inputIds), 1, inputIds.length, {logitRows: positions});
        assert.ok(relL2(got, want) <= 2e-2, `logits rel L2 ${relL2(got, want)}`);
        const b = collate([{inputIds: Int32Array.from(inputIds), labels: Int32Array.from(labels)}], {padTokenId: 16381});
        const targets = labels.slice(1).filter((l) => l >= 0).length;
        device.zeroGrad();
        device.forwardBackward(b, {lossScale: 1 / targets, gradientCheckpointing: true});
        device.syncToHost(true);
        const grads = await SafetensorsFile.open(path.join(fixture, "lora_grads.safetensors"));
        const errs: number[] = [];
        for (const t of lora.trainableTensors()) errs.push(relL2(t.grad, await grads.readF32(t.name)));
        await grads.close();
        errs.sort((x, y) => x - y);
        console.log(
            `${name} fixture on CUDA: median rel L2 ${errs[errs.length >> 1].toExponential(2)}, worst ${errs[errs.length - 1].toExponential(2)}`
        );
        assert.ok(errs[errs.length >> 1] < 3e-2 && errs[errs.length - 1] < 1e-1, "bf16 gradient tolerance");
    });
}
