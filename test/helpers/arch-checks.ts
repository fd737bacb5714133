// arch-checks.ts: the checks test/arch-qwen3.test.ts and test/arch-phi3.test.ts share (issue 15), in two groups:
//   - on synthetic checkpoints (always run): the forward against the float64 reference decoder, LoRA gradients
//     against finite differences, gradient checkpointing, the KV cache, GGUF f16 (and LoRA GGUF) in llama.cpp;
//   - against transformers/peft references in test/fixtures/arch/<name>/ (scripts/references/make_arch_refs.py):
//     logits, loss, greedy and chat generation, LoRA gradients, adapter files, merge, the bnb-4bit checkpoint, and
//     the GGUF export of the fixture model in llama.cpp.
// Tolerances are those of ../shared/fixtures/README.md: fp32 logits max abs diff <= 2e-3, loss within 1e-4, greedy
// token for token, LoRA gradients relative L2 <= 1e-3 per tensor.
import {test} from "node:test";
import assert from "node:assert/strict";
import {copyFileSync, cpSync, existsSync, mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {exportGguf, exportGgufLora} from "../../src/api/export-gguf.js";
import {fineTune} from "../../src/api/train.js";
import {f32ToHalf, halfToF32} from "../../src/backend/cpu.js";
import {Rng} from "../../src/backend/rng.js";
import {collate} from "../../src/data/index.js";
import {SafetensorsCheckpoint, SafetensorsFile} from "../../src/io/safetensors.js";
import {DecoderModel, KVCache} from "../../src/model/decoder.js";
import {generate} from "../../src/model/generate.js";
import {writeSyntheticCheckpoint} from "../../src/model/synthetic.js";
import {DecoderTrainer} from "../../src/model/training.js";
import {projModule, projNames, readTensorF32} from "../../src/model/weights.js";
import {loadAdapter, saveAdapter} from "../../src/peft/adapter-files.js";
import {applyLora, type LoraModel} from "../../src/peft/inject.js";
import {mergeAdapter} from "../../src/peft/merge.js";
import {bitsAndBytesConfig, QLORA_BNB_DEFAULTS} from "../../src/quant/config.js";
import {HfTokenizer} from "../../src/tokenizer/index.js";
import {centralDifference, relL2} from "./fixtures.js";
import {roundTripModel} from "./gguf-reference.js";
import {MODEL_DIR, REPO_ROOT} from "./paths.js";
import {referenceForward, type Tensors} from "./reference-decoder.js";

/** test/fixtures/arch of the checkout (the GPU machine runs the compiled tests from .device/js, two levels below it) */
export const ARCH_FIXTURES =
    [REPO_ROOT, path.join(REPO_ROOT, "..", "..")]
        .map((root) => path.join(root, "test", "fixtures", "arch"))
        .find((d) => existsSync(d)) ?? path.join(REPO_ROOT, "test", "fixtures", "arch");
export const GENERATE_FIXTURES =
    "python3 scripts/references/make_arch_refs.py --tokenizer ../shared/models/tiny-qwen2 --out test/fixtures/arch " +
    "(on a machine with torch, transformers and peft; then commit the folder)";
const EOS = 16381;

/** a temporary folder removed when the process ends */
export function tempDir(prefix: string): string {
    const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
    process.on("exit", () => rmSync(dir, {recursive: true, force: true}));
    return dir;
}

/** a synthetic checkpoint (f32 unless said) with tiny-qwen2's tokenizer beside it */
export async function syntheticModel(
    dir: string,
    config: Record<string, unknown>,
    opts: {seed?: number; std?: number; dtype?: "F32" | "BF16"} = {}
): Promise<DecoderModel> {
    await writeSyntheticCheckpoint(dir, {config, dtype: opts.dtype ?? "F32", seed: opts.seed ?? 7, std: opts.std ?? 0.08});
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(path.join(MODEL_DIR, f), path.join(dir, f));
    return DecoderModel.load(dir);
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): {diff: number; scale: number} {
    let diff = 0,
        scale = 0;
    for (let i = 0; i < a.length; i++) {
        diff = Math.max(diff, Math.abs(a[i] - b[i]));
        scale = Math.max(scale, Math.abs(b[i]));
    }
    return {diff, scale};
}

/** the model's logits of `ids` against the float64 reference decoder on the checkpoint's tensors */
export async function checkAgainstReference(dir: string, model: DecoderModel, ids: number[], long = false): Promise<void> {
    const ckpt = await SafetensorsCheckpoint.open(dir);
    const weights: Tensors = new Map();
    for (const name of ckpt.names()) weights.set(name, Float64Array.from(await readTensorF32(ckpt, name)));
    await ckpt.close();
    const table = long ? model.longRope!.invFreq : model.invFreq;
    const ref = referenceForward(model.config, weights, ids, table, model.attentionScaling, model.localRope);
    const got = model.forward(Int32Array.from(ids), 1, ids.length);
    const {diff, scale} = maxAbsDiff(got, ref);
    console.log(
        `${model.config.modelType}: ${ids.length} tokens, max |ref| ${scale.toFixed(3)}, max abs diff ${diff.toExponential(3)}`
    );
    assert.ok(scale > 0.1, "the synthetic model produces non-trivial logits");
    assert.ok(diff <= 1e-4 * scale, `max abs diff ${diff} > 1e-4 * ${scale}`);
}

/** LoRA on every linear module, A and B drawn (B nonzero), as init_lora_weights=False */
export function randomLora(model: DecoderModel): LoraModel {
    return applyLora(
        model,
        {r: 4, lora_alpha: 8, target_modules: "all-linear", lora_dropout: 0, init_lora_weights: false},
        {initRng: new Rng(3)}
    );
}

function batchOf(ids: number[]) {
    const labels = ids.map((id, i) => (i < 3 ? -100 : id));
    return collate([{inputIds: Int32Array.from(ids), labels: Int32Array.from(labels)}], {padTokenId: EOS});
}

/**
 * every LoRA tensor's gradient against central finite differences of the loss at the largest-gradient element of
 * each half of the tensor, and the same gradients with gradient checkpointing (recomputed blocks: bit-identical)
 */
export function checkLoraGradients(model: DecoderModel, ids: number[]): void {
    const lora = randomLora(model);
    const trainer = new DecoderTrainer(model);
    const b = batchOf(ids);
    lora.zeroGrad();
    trainer.forwardBackward(b, {lossScale: 1, gradientCheckpointing: false});
    const grads = lora.trainableTensors().map((t) => Float32Array.from(t.grad));
    lora.zeroGrad();
    trainer.forwardBackward(b, {lossScale: 1, gradientCheckpointing: true});
    lora.trainableTensors().forEach((t, i) => assert.deepEqual(t.grad, grads[i], `${t.name}: checkpointed gradient differs`));
    const loss = () => trainer.forwardBackward(b, {lossScale: 0, gradientCheckpointing: false, noBackward: true}).lossSum;
    const eps = 1e-2;
    // the loss is an f32 sum: a difference of two of them resolves about 8 ulps of it
    const resolution = (8 * 2 ** -24 * Math.abs(loss())) / (2 * eps);
    const modules = new Set<string>();
    for (const t of lora.trainableTensors()) {
        modules.add(t.name.replace(/\.lora_[AB]\.weight$/, ""));
        const half = t.grad.length >> 1;
        for (const [from, to] of [
            [0, half],
            [half, t.grad.length]
        ]) {
            let i = from;
            for (let j = from; j < to; j++) if (Math.abs(t.grad[j]) > Math.abs(t.grad[i])) i = j;
            const fd = centralDifference(t.param, i, eps, loss);
            assert.ok(Math.abs(t.grad[i]) > 2 * resolution, `${t.name}: gradients too small to check (${t.grad[i]})`);
            assert.ok(
                Math.abs(fd - t.grad[i]) <= 3e-2 * Math.abs(fd) + resolution,
                `${t.name}[${i}]: ${t.grad[i]} vs finite differences ${fd}`
            );
        }
    }
    // every projection of every layer has its branch, under PEFT's module names
    const want = Array.from({length: model.config.numHiddenLayers}, (_, l) =>
        projNames(model.config).map((p) => `base_model.model.${projModule(l, p)}`)
    ).flat();
    assert.deepEqual([...modules].sort(), want.sort());
}

/** prefill `split` tokens, then one at a time: the logits of a full forward */
export function checkCacheDecoding(model: DecoderModel, ids: number[], split: number): void {
    const V = model.config.vocabSize;
    const full = model.forward(Int32Array.from(ids), 1, ids.length);
    const cache = new KVCache(model.config, 1, ids.length + 4);
    model.forward(Int32Array.from(ids.slice(0, split)), 1, split, {cache});
    let worst = 0;
    for (let t = split; t < ids.length; t++) {
        const step = model.forward(Int32Array.from([ids[t]]), 1, 1, {cache});
        worst = Math.max(worst, maxAbsDiff(step, full.subarray(t * V, (t + 1) * V)).diff);
    }
    assert.ok(worst < 1e-4, `cache vs full max diff ${worst}`);
}

/**
 * exports the model folder to GGUF f16 and checks llama.cpp against qlora: next-token distributions over `ids`
 * (mean KL) and greedy continuations of `prompt` token for token (null: not compared); with `adapterDir` also the
 * LoRA GGUF on that base. `expectNote`: a note the export must return (what llama.cpp does otherwise than the model)
 */
export async function checkGgufInLlamaCpp(
    dir: string,
    tmp: string,
    ids: number[],
    prompt: number[] | null,
    opts: {adapterDir?: string; expectTensors?: string[]; expectMetadata?: Record<string, unknown>; expectNote?: RegExp} = {}
): Promise<void> {
    const out = path.join(tmp, `${path.basename(dir)}-f16.gguf`);
    // a name without "phi3" in it: llama.cpp would take the vocabulary for Phi-3's (phi3NameProblem)
    const result = await exportGguf({modelDir: dir, outtype: "f16", out, overwrite: true, name: "qlora test model"});
    if (opts.expectNote)
        assert.ok(
            result.notes.some((n) => opts.expectNote!.test(n)),
            `the export's notes ${JSON.stringify(result.notes)} say ${opts.expectNote}`
        );
    const parsed = await gguf(out, {allowLocalFile: true});
    const names = new Set(parsed.tensorInfos.map((t) => t.name));
    for (const n of opts.expectTensors ?? []) assert.ok(names.has(n), `the GGUF has ${n}`);
    const md = parsed.metadata as unknown as Record<string, unknown>;
    for (const [k, v] of Object.entries(opts.expectMetadata ?? {})) assert.deepEqual(md[k], v, k);
    const model = await DecoderModel.load(dir);
    // loaded on use: the GPU machine runs the CUDA arch tests without node-llama-cpp
    const {llamaGreedy, llamaMeanKl, loadGguf} = await import("./llama-cpp.js");
    const llama = await loadGguf(out);
    try {
        const logits = model.forward(Int32Array.from(ids), 1, ids.length);
        const {meanKl, top1Agreement} = await llamaMeanKl(llama, ids, logits);
        console.log(`${model.config.modelType} f16 GGUF: mean KL ${meanKl.toExponential(2)}, top-1 agreement ${top1Agreement}`);
        assert.ok(meanKl < 1e-3, `mean KL ${meanKl}`);
        if (prompt) {
            const ours = generate(model, prompt, {maxNewTokens: 16, greedy: true, eosTokenIds: []}).newIds;
            const theirs = await llamaGreedy(llama, prompt, {maxNewTokens: 16});
            assert.deepEqual(theirs, ours, "llama.cpp's greedy text is qlora's");
        }
        if (opts.adapterDir) {
            const loraOut = path.join(tmp, `${path.basename(dir)}-lora.gguf`);
            await exportGgufLora({adapterDir: opts.adapterDir, modelDir: dir, out: loraOut, outtype: "f16", overwrite: true});
            const withAdapter = await DecoderModel.load(dir);
            await loadAdapter(opts.adapterDir, withAdapter);
            const adapted = withAdapter.forward(Int32Array.from(ids), 1, ids.length);
            const lora = [{filePath: loraOut}];
            const {meanKl: klLora} = await llamaMeanKl(llama, ids, adapted, {lora});
            const {meanKl: klWithout} = await llamaMeanKl(llama, ids, adapted);
            console.log(
                `${model.config.modelType} LoRA GGUF: mean KL ${klLora.toExponential(2)} (${klWithout.toExponential(2)} without it)`
            );
            assert.ok(klLora < 1e-3 && klWithout > 100 * klLora, `mean KL ${klLora} with the adapter, ${klWithout} without`);
            if (prompt) {
                const oursLora = generate(withAdapter, prompt, {maxNewTokens: 16, greedy: true, eosTokenIds: []}).newIds;
                assert.deepEqual(await llamaGreedy(llama, prompt, {maxNewTokens: 16, lora}), oursLora);
            }
        }
    } finally {
        await llama.dispose();
    }
}

/**
 * qlora train on the model folder (QLoRA: the 4-bit base, the default targets = every linear projection of this
 * architecture, the example data) for a few steps on `device`, then the saved adapter chats through the model's
 * own chat template
 */
export async function checkFineTune(dir: string, tmp: string, device: "cpu" | "cuda"): Promise<void> {
    const out = path.join(tmp, `train-${device}-${path.basename(dir)}`);
    const result = await fineTune({
        model: dir,
        output_dir: out,
        max_steps: 4,
        logging_steps: 1,
        max_seq_length: 64,
        per_device_train_batch_size: 2,
        learning_rate: 1e-3,
        r: 4,
        save_strategy: "no",
        device
    });
    assert.ok(Number.isFinite(result.trainLoss) && Number.isFinite(result.lastLoss));
    const cfg = (await DecoderModel.load(dir)).config;
    const saved = JSON.parse(readFileSync(path.join(result.finalDir, "adapter_config.json"), "utf8"));
    assert.deepEqual([...saved.target_modules].sort(), [...projNames(cfg)].sort(), "every linear projection, by PEFT's names");
    const model = await DecoderModel.load(dir);
    await loadAdapter(result.finalDir, model);
    const tokenizer = await HfTokenizer.load(dir);
    const prompt = tokenizer.encode(
        tokenizer.applyChatTemplate([{role: "user", content: "Name a color."}], {addGenerationPrompt: true})
    );
    const reply = generate(model, prompt, {maxNewTokens: 8, greedy: true, eosTokenIds: [EOS]});
    assert.ok(reply.newIds.length > 0);
}

/**
 * q8_0 and q4_k_m exports load in llama.cpp and give the distributions of qlora on the same encoded weights
 * (gguf-reference.ts roundTripModel: llama.cpp's per-tensor type choice, fused attn_qkv counted as attn_v)
 */
export async function checkQuantizedGguf(dir: string, tmp: string, ids: number[]): Promise<void> {
    const model = await DecoderModel.load(dir);
    const {llamaMeanKl, loadGguf} = await import("./llama-cpp.js");
    for (const outtype of ["q8_0", "q4_k_m"] as const) {
        const out = path.join(tmp, `${path.basename(dir)}-${outtype}.gguf`);
        const result = await exportGguf({modelDir: dir, outtype, out, overwrite: true, name: "qlora test model"});
        const reference = roundTripModel(model, outtype).forward(Int32Array.from(ids), 1, ids.length);
        const llama = await loadGguf(out);
        try {
            const {meanKl, top1Agreement} = await llamaMeanKl(llama, ids, reference);
            console.log(
                `${model.config.modelType} ${outtype} ${JSON.stringify(result.typeCounts)}: mean KL ${meanKl.toExponential(2)} ` +
                    `vs qlora on the encoded weights, top-1 agreement ${top1Agreement}`
            );
            assert.ok(meanKl < 1e-3, `${outtype}: mean KL ${meanKl}`);
        } finally {
            await llama.dispose();
        }
    }
}

/** a random adapter on every linear module, saved as PEFT saves it (B scaled so that it changes the outputs) */
export async function saveRandomAdapter(modelDir: string, adapterDir: string): Promise<void> {
    const model = await DecoderModel.load(modelDir);
    const lora = randomLora(model);
    for (const layer of lora.layers.values())
        if (layer.lora)
            layer.lora.B.forEach((v, i, b) => {
                b[i] = v * 0.3;
            });
    await saveAdapter(adapterDir, lora);
}

// ------------------------------------------------------------------
// against the transformers/peft references

interface Greedy {
    prompt_ids: number[];
    output_ids: number[];
    adapter_output_ids: number[];
    long_prompt_ids?: number[];
    long_output_ids?: number[];
}

async function readRef(dir: string) {
    const f = await SafetensorsFile.open(path.join(dir, "reference.safetensors"));
    const get = async (name: string) => (f.has(name) ? Array.from(await f.readI32(name)) : null);
    const r = {
        ids: (await get("input_ids"))!,
        labels: (await get("labels"))!,
        positions: (await get("logit_positions"))!,
        logits: await f.readF32("logits"),
        loss: (await f.readF32("loss"))[0],
        longIds: await get("long_input_ids"),
        longPositions: await get("long_logit_positions"),
        longLogits: f.has("long_logits") ? await f.readF32("long_logits") : null
    };
    await f.close();
    return r;
}

function checkLogitsAt(model: DecoderModel, ids: number[], positions: number[], want: Float32Array, what: string): void {
    const V = model.config.vocabSize;
    const got = model.forward(Int32Array.from(ids), 1, ids.length, {logitRows: positions});
    const {diff} = maxAbsDiff(got, want);
    console.log(`${what}: ${positions.length} positions, max abs diff ${diff.toExponential(3)}`);
    assert.equal(got.length, positions.length * V);
    assert.ok(diff <= 2e-3, `${what}: logits max abs diff ${diff} > 2e-3`);
}

/**
 * registers the tests against test/fixtures/arch/<name>; they skip, saying how to make the folder (`generate`, the
 * command: make_arch_refs.py's unless given), only when it is missing. `llamaPrompt`: which prompt llama.cpp's
 * greedy text is compared on ("long": phi3's, whose positions run past the original context as llama.cpp's
 * long-factor choice assumes for a context of 256; "window": none, for a sliding window that llama.cpp's graph of
 * the GGUF architecture does not apply, so that greedy text longer than the window differs there: the
 * distributions are compared on the prompt's first sliding_window tokens, and the export must say so in its notes).
 * Returns the model folder (the fixture with tiny-qwen2's tokenizer.json) and the skip reason, for a test file's
 * own tests on the fixture.
 */
export function fixtureTests(
    name: string,
    opts: {llamaPrompt: "prompt" | "long" | "window"; generate?: string}
): {dir: string; skip: string | false} {
    const fixture = path.join(ARCH_FIXTURES, name);
    const skip = existsSync(fixture)
        ? false
        : `${path.relative(REPO_ROOT, fixture)} is missing; make it with ${opts.generate ?? GENERATE_FIXTURES}`;
    const greedy = (): Greedy => JSON.parse(readFileSync(path.join(fixture, "greedy.json"), "utf8"));
    const tmp = skip ? "" : tempDir(`qlora-arch-${name}-`);
    // the model folder: the fixture's files and tiny-qwen2's tokenizer.json, which the fixture does not repeat
    const dir = skip ? "" : path.join(tmp, "model");
    if (dir) {
        cpSync(fixture, dir, {recursive: true});
        copyFileSync(path.join(MODEL_DIR, "tokenizer.json"), path.join(dir, "tokenizer.json"));
    }

    test(`${name}: logits and loss match transformers (fp32, bf16 weights)`, {skip}, async () => {
        const model = await DecoderModel.load(dir);
        const r = await readRef(dir);
        checkLogitsAt(model, r.ids, r.positions, r.logits, `${name} prompt`);
        if (r.longIds && r.longPositions && r.longLogits) {
            assert.ok(model.longRope && r.longIds.length > model.longRope.fromPosition, "the long prompt runs on long_factor");
            checkLogitsAt(model, r.longIds, r.longPositions, r.longLogits, `${name} long prompt`);
        }
        const logits = model.forward(Int32Array.from(r.ids), 1, r.ids.length);
        const {loss} = model.causalLmLoss(logits, Int32Array.from(r.labels), 1, r.ids.length);
        assert.ok(Math.abs(loss - r.loss) <= 1e-4, `loss ${loss} vs ${r.loss}`);
    });

    test(`${name}: greedy generation and chat reproduce transformers token for token`, {skip}, async () => {
        const model = await DecoderModel.load(dir);
        const g = greedy();
        const run = (p: number[], n: number) => generate(model, p, {maxNewTokens: n, greedy: true, eosTokenIds: []}).outputIds;
        assert.deepEqual(run(g.prompt_ids, g.output_ids.length - g.prompt_ids.length), g.output_ids);
        if (g.long_prompt_ids && g.long_output_ids)
            assert.deepEqual(run(g.long_prompt_ids, g.long_output_ids.length - g.long_prompt_ids.length), g.long_output_ids);
        // the model's own chat template, rendered and tokenized by qlora
        const chat = JSON.parse(readFileSync(path.join(dir, "chat.json"), "utf8"));
        const tokenizer = await HfTokenizer.load(dir);
        const promptIds = tokenizer.encode(tokenizer.applyChatTemplate(chat.messages, {addGenerationPrompt: true}));
        assert.deepEqual(promptIds, chat.prompt_ids);
        assert.deepEqual(run(promptIds, chat.output_ids.length - promptIds.length), chat.output_ids);
    });

    test(`${name}: the PEFT adapter loads; LoRA gradients and greedy text match peft; saved under the same names`, {
        skip
    }, async () => {
        const model = await DecoderModel.load(dir);
        const lora = await loadAdapter(path.join(dir, "adapter"), model);
        const r = await readRef(dir);
        const trainer = new DecoderTrainer(model);
        const b = collate([{inputIds: Int32Array.from(r.ids), labels: Int32Array.from(r.labels)}], {padTokenId: EOS});
        const targets = r.labels.slice(1).filter((l) => l >= 0).length;
        const ref = await SafetensorsFile.open(path.join(dir, "lora_grads.safetensors"));
        const refLoss = (await ref.readF32("loss"))[0];
        let worst = 0;
        for (const gradientCheckpointing of [false, true]) {
            lora.zeroGrad();
            const res = trainer.forwardBackward(b, {lossScale: 1 / targets, gradientCheckpointing});
            const what = gradientCheckpointing ? " (gradient checkpointing)" : "";
            assert.ok(
                Math.abs(res.lossSum / res.targets - refLoss) <= 1e-4,
                `LoRA loss ${res.lossSum / res.targets} vs ${refLoss}${what}`
            );
            for (const t of lora.trainableTensors()) {
                const e = relL2(t.grad, await ref.readF32(t.name));
                worst = Math.max(worst, e);
                assert.ok(e <= 1e-3, `${t.name}: relative L2 ${e}${what}`);
            }
        }
        assert.equal(lora.trainableTensors().length, ref.names().length - 1, "a gradient for every tensor peft has");
        await ref.close();
        console.log(`${name} LoRA: ${lora.trainableTensors().length} gradients, worst relative L2 ${worst.toExponential(2)}`);
        const g = greedy();
        const out = generate(model, g.prompt_ids, {
            maxNewTokens: g.adapter_output_ids.length - g.prompt_ids.length,
            greedy: true,
            eosTokenIds: []
        });
        assert.deepEqual(out.outputIds, g.adapter_output_ids);
        // saved again: PEFT's key names, shapes and target_modules
        const saved = path.join(tmp, "saved-adapter");
        await saveAdapter(saved, lora);
        const ours = await SafetensorsFile.open(path.join(saved, "adapter_model.safetensors"));
        const theirs = await SafetensorsFile.open(path.join(dir, "adapter", "adapter_model.safetensors"));
        assert.deepEqual(ours.names().sort(), theirs.names().sort());
        for (const n of theirs.names()) assert.deepEqual(ours.info(n).shape, theirs.info(n).shape, n);
        await ours.close();
        await theirs.close();
        const cfgOf = (d: string) => JSON.parse(readFileSync(path.join(d, "adapter_config.json"), "utf8"));
        assert.deepEqual([...cfgOf(saved).target_modules].sort(), [...cfgOf(path.join(dir, "adapter")).target_modules].sort());
    });

    test(`${name}: merge writes W + (alpha/r) B A in bf16 and copies the other tensors`, {skip}, async () => {
        const out = path.join(tmp, "merged");
        await mergeAdapter({model: dir, adapter: path.join(dir, "adapter"), out, overwrite: true});
        const base = await SafetensorsCheckpoint.open(dir);
        const merged = await SafetensorsCheckpoint.open(out);
        const adapter = await SafetensorsFile.open(path.join(dir, "adapter", "adapter_model.safetensors"));
        const acfg = JSON.parse(readFileSync(path.join(dir, "adapter", "adapter_config.json"), "utf8"));
        const s = acfg.lora_alpha / acfg.r;
        try {
            for (const n of base.names()) {
                const w = await readTensorF32(base, n);
                const m = await readTensorF32(merged, n);
                const module = n.replace(/\.weight$/, "");
                const key = `base_model.model.${module}.lora_A.weight`;
                if (!adapter.has(key)) {
                    assert.deepEqual(m, w, `${n} is copied`);
                    continue;
                }
                const A = await adapter.readF32(key),
                    B = await adapter.readF32(`base_model.model.${module}.lora_B.weight`);
                const [rows, cols] = base.info(n).shape;
                const r = A.length / cols;
                const want = new Float32Array(rows * cols);
                // the rounding error bound of an f32 W + s B A: (r + 2) f32 ulps of |W| + s |B| |A|
                const f32Err = new Float32Array(rows * cols);
                for (let i = 0; i < rows; i++)
                    for (let j = 0; j < cols; j++) {
                        let d = 0,
                            dAbs = 0;
                        for (let k = 0; k < r; k++) {
                            d += B[i * r + k] * A[k * cols + j];
                            dAbs += Math.abs(B[i * r + k] * A[k * cols + j]);
                        }
                        want[i * cols + j] = w[i * cols + j] + s * d;
                        f32Err[i * cols + j] = (r + 2) * 2 ** -24 * (Math.abs(w[i * cols + j]) + s * dAbs);
                    }
                // one bf16 rounding of the f32 sum: its nearest bf16, or (another summation order) the other
                // neighbour; where W and s B A nearly cancel, the f32 sum's own error may exceed the small result's ulp
                const rounded = halfToF32(f32ToHalf(want, "BF16"), "BF16");
                const ulp = (x: number) => 2 ** (Math.floor(Math.log2(Math.abs(x))) - 7);
                let off = 0;
                for (let i = 0; i < m.length; i++)
                    if (m[i] !== rounded[i] && !(Math.abs(m[i] - want[i]) < ulp(want[i]) + f32Err[i])) off++;
                assert.equal(
                    off,
                    0,
                    `${n}: ${off} merged values more than one bf16 ulp (and the f32 sum's error) from W + s B A`
                );
            }
        } finally {
            await base.close();
            await merged.close();
            await adapter.close();
        }
    });

    test(`${name}: the bitsandbytes 4-bit checkpoint loads as quantizing the bf16 model does`, {skip}, async (t) => {
        const bnb = path.join(dir, "bnb-4bit");
        if (!existsSync(bnb)) {
            t.skip(`${path.relative(REPO_ROOT, bnb)} is missing (the generator makes it where bitsandbytes and CUDA are)`);
            return;
        }
        const pre = await DecoderModel.load(bnb);
        // transformers quantized the fp32 upcast of the bf16 weights (compute dtype float32)
        const quantized = await DecoderModel.load(dir, {quantization: bitsAndBytesConfig(QLORA_BNB_DEFAULTS)});
        assert.ok(pre.quantized && quantized.quantized);
        const r = await readRef(dir);
        const a = pre.forward(Int32Array.from(r.ids), 1, r.ids.length);
        const b = quantized.forward(Int32Array.from(r.ids), 1, r.ids.length);
        assert.deepEqual(a, b, "the same 4-bit weights");
    });

    const ggufWhat =
        opts.llamaPrompt === "window"
            ? "gives qlora's distributions in llama.cpp within the sliding window (its graph has none)"
            : "generates qlora's greedy text in llama.cpp";
    test(`${name}: GGUF f16 export ${ggufWhat} (and the adapter as a LoRA GGUF)`, {skip}, async () => {
        const g = greedy();
        const r = await readRef(dir);
        const adapterDir = path.join(dir, "adapter");
        if (opts.llamaPrompt === "window") {
            const window = (await DecoderModel.load(dir)).config.slidingWindow;
            assert.ok(window !== null && g.prompt_ids.length > window, "the prompt is longer than the sliding window");
            await checkGgufInLlamaCpp(dir, tmp, r.ids.slice(0, window), null, {
                adapterDir,
                expectNote: new RegExp(`has no sliding window.*past ${window} tokens`)
            });
            return;
        }
        const prompt = opts.llamaPrompt === "long" ? g.long_prompt_ids! : g.prompt_ids;
        await checkGgufInLlamaCpp(dir, tmp, opts.llamaPrompt === "long" ? r.longIds! : r.ids, prompt, {adapterDir});
    });
    return {dir, skip};
}

// synthetic configs the CPU tests (test/arch-*.test.ts) and the GPU test (test/gpu/arch.test.ts) share

/** head_dim 64 while hidden_size / heads = 16; q/k norms; GQA */
export const QWEN3 = {
    architectures: ["Qwen3ForCausalLM"],
    model_type: "qwen3",
    vocab_size: 16384,
    hidden_size: 64,
    intermediate_size: 160,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 64,
    max_position_embeddings: 1024,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    tie_word_embeddings: true,
    attention_bias: false,
    bos_token_id: 16381,
    eos_token_id: 16381,
    hidden_act: "silu"
};

/**
 * head_dim 64 while hidden / heads = 16; GQA 4/2; layers sliding, sliding, full (pattern 3) with a window of 5 below
 * the prompts' length; local base 1e4 against a global 1e6 with linear scaling; scores scaled by 48^-0.5; logits
 * capped at 4
 */
export const GEMMA3 = {
    architectures: ["Gemma3ForCausalLM"],
    model_type: "gemma3_text",
    vocab_size: 16384,
    hidden_size: 64,
    intermediate_size: 160,
    num_hidden_layers: 3,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 64,
    max_position_embeddings: 1024,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    rope_local_base_freq: 10000,
    rope_scaling: {rope_type: "linear", factor: 4},
    sliding_window: 5,
    sliding_window_pattern: 3,
    query_pre_attn_scalar: 48,
    final_logit_softcapping: 4,
    attn_logit_softcapping: null,
    hidden_activation: "gelu_pytorch_tanh",
    tie_word_embeddings: true,
    attention_bias: false,
    bos_token_id: 16381,
    eos_token_id: 16381
};

/**
 * One small model of each graph shape the planner and the CPU step distinguish (Qwen2 biases, Qwen3 per-head
 * norms, Phi-3 fused projections, Gemma 3 sandwich norms), with a vocabulary of 256 so that the loss's logits do
 * not hide the blocks' activations (test/plan-replay.test.ts, test/cpu-buffer-pool.test.ts)
 */
export const SMALL_VOCAB_ARCHS: Record<string, Record<string, unknown>> = {
    qwen2: {
        architectures: ["Qwen2ForCausalLM"],
        model_type: "qwen2",
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 2048,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true
    },
    qwen3: {...QWEN3, vocab_size: 256, max_position_embeddings: 2048},
    phi3: {
        architectures: ["Phi3ForCausalLM"],
        model_type: "phi3",
        vocab_size: 256,
        hidden_size: 128,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        max_position_embeddings: 2048,
        partial_rotary_factor: 0.75,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        hidden_act: "silu"
    },
    gemma3: {...GEMMA3, vocab_size: 256, max_position_embeddings: 2048}
};
