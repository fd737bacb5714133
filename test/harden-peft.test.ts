// One adapter reader (peft/adapter-files.ts readAdapter) for loadAdapter, merge and the GGUF exports: each reader
// gives the same verdict on the same adapter. Before, merge had its own reader: it refused trained biases, applied
// a DoRA magnitude that adapter_config.json disowned, took the last of two copies of a weight; and loadAdapter and
// the LoRA GGUF export called a rank that disagrees with adapter_config.json "another base model".
import {test} from "node:test";
import assert from "node:assert/strict";
import {cpSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {f32ToHalf, halfToF32} from "../src/backend/cpu.js";
import {Rng} from "../src/backend/rng.js";
import {exportGgufLora} from "../src/api/export-gguf.js";
import {SafetensorsCheckpoint, SafetensorsFile, writeSafetensors, type TensorToWrite} from "../src/io/safetensors.js";
import {DecoderModel} from "../src/model/decoder.js";
import {readTensorF32} from "../src/model/weights.js";
import {loadAdapter, saveAdapter} from "../src/peft/adapter-files.js";
import {applyLora} from "../src/peft/inject.js";
import {mergeAdapter} from "../src/peft/merge.js";
import {FIXTURES, MODEL_DIR} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-hpeft-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));
const FIXTURE_ADAPTER = path.join(FIXTURES, "adapter");
const Q0 = "base_model.model.model.layers.0.self_attn.q_proj";
const K0 = "base_model.model.model.layers.0.self_attn.k_proj";

interface AdapterEdit {
    tensors?: (t: TensorToWrite[]) => TensorToWrite[];
    config?: (c: Record<string, unknown>) => void;
}

/** a copy of the fixture adapter (r 8 on every projection of tiny-qwen2) with tensors and/or config edited */
async function adapterCopy(name: string, edit: AdapterEdit): Promise<string> {
    const dir = path.join(tmp, name);
    cpSync(FIXTURE_ADAPTER, dir, {recursive: true});
    if (edit.tensors) {
        const st = await SafetensorsFile.open(path.join(FIXTURE_ADAPTER, "adapter_model.safetensors"));
        const tensors: TensorToWrite[] = [];
        for (const n of st.names()) tensors.push({name: n, dtype: "F32", shape: st.info(n).shape, data: await st.readF32(n)});
        await st.close();
        rmSync(path.join(dir, "adapter_model.safetensors"));
        await writeSafetensors(path.join(dir, "adapter_model.safetensors"), edit.tensors(tensors));
    }
    if (edit.config) {
        const file = path.join(dir, "adapter_config.json");
        const c = JSON.parse(readFileSync(file, "utf8"));
        edit.config(c);
        writeFileSync(file, JSON.stringify(c));
    }
    return dir;
}

test("merge writes an adapter's trained biases over the base's (it refused them before)", async () => {
    const adapter = path.join(tmp, "bias-adapter");
    const lora = applyLora(
        await DecoderModel.load(MODEL_DIR),
        {r: 4, lora_alpha: 8, target_modules: ["q_proj", "v_proj"], bias: "all", init_lora_weights: false},
        {initRng: new Rng(5)}
    );
    for (const t of lora.trainableTensors())
        if (t.name.endsWith(".bias"))
            t.param.forEach((v, i, b) => {
                b[i] = v + 0.05 * Math.sin(i + 1);
            });
    await saveAdapter(adapter, lora);
    // k_proj has no LoRA branch: its bias is trained alone ("all")
    const trained = lora.layers.get("model.layers.0.self_attn.k_proj")!.bias!;
    const out = path.join(tmp, "bias-merged");
    const result = await mergeAdapter({model: MODEL_DIR, adapter, out});
    assert.equal(result.merged, [...lora.layers.values()].filter((l) => l.lora).length);
    const merged = await SafetensorsCheckpoint.open(out);
    const base = await SafetensorsCheckpoint.open(MODEL_DIR);
    try {
        const got = await readTensorF32(merged, "model.layers.0.self_attn.k_proj.bias");
        assert.deepEqual(got, halfToF32(f32ToHalf(trained, "BF16"), "BF16"));
        const original = await readTensorF32(base, "model.layers.0.self_attn.k_proj.bias");
        assert.notDeepEqual(got, halfToF32(f32ToHalf(original, "BF16"), "BF16"));
    } finally {
        await merged.close();
        await base.close();
    }
});

test("a rank that disagrees with adapter_config.json's r is named as such by loadAdapter, merge and the LoRA GGUF export", async () => {
    const adapter = await adapterCopy("rank", {
        config: (c) => {
            c.r = 4;
        }
    });
    const rank = new RegExp(
        String.raw`tensor "base_model\.model\.model\.layers\.\d+\.\w+\.\w+\.lora_A\.weight" ` +
            String.raw`has rank 8 but adapter_config\.json says r 4: .*do not belong together`
    );
    await assert.rejects(loadAdapter(adapter, await DecoderModel.load(MODEL_DIR)), rank);
    await assert.rejects(mergeAdapter({model: MODEL_DIR, adapter, out: path.join(tmp, "rank-merged")}), rank);
    const gguf = path.join(tmp, "rank.gguf");
    await assert.rejects(exportGgufLora({adapterDir: adapter, modelDir: MODEL_DIR, out: gguf}), rank);
    assert.equal(existsSync(gguf), false);
});

test("merge refuses what loadAdapter refuses: a disowned DoRA magnitude, a weight twice, a lora_only bias without a branch", async () => {
    const tensor = (t: TensorToWrite[], name: string) => t.find((x) => x.name === name)!;
    /** a [out] vector for `module` (out read from its lora_B) */
    const vector = (t: TensorToWrite[], module: string, name: string): TensorToWrite => {
        const out = tensor(t, `${module}.lora_B.weight`).shape[0];
        return {name, dtype: "F32", shape: [out], data: new Float32Array(out).fill(1)};
    };
    const cases: [string, AdapterEdit, RegExp][] = [
        [
            "magnitude",
            {tensors: (t) => [...t, vector(t, Q0, `${Q0}.lora_magnitude_vector`)]},
            new RegExp(`tensor "${Q0}.lora_magnitude_vector" is a DoRA magnitude but adapter_config.json says use_dora is false`)
        ],
        [
            "twice",
            {tensors: (t) => [...t, {...tensor(t, `${Q0}.lora_A.weight`), name: `${Q0}.lora_A.default.weight`}]},
            new RegExp(`tensors "${Q0}.lora_A(\\.default)?.weight" and "${Q0}.lora_A(\\.default)?.weight" are the same weight`)
        ],
        [
            "lora-only-bias",
            {
                // layer 0's k_proj loses its branch and gets a trained bias, which "lora_only" does not train
                tensors: (t) => [...t.filter((x) => !x.name.startsWith(`${K0}.`)), vector(t, K0, `${K0}.bias`)],
                config: (c) => {
                    c.bias = "lora_only";
                }
            },
            new RegExp(`tensor "${K0}.bias" does not match a bias of this model`)
        ]
    ];
    for (const [name, edit, message] of cases) {
        const adapter = await adapterCopy(name, edit);
        await assert.rejects(loadAdapter(adapter, await DecoderModel.load(MODEL_DIR)), message, name);
        const out = path.join(tmp, `${name}-merged`);
        await assert.rejects(mergeAdapter({model: MODEL_DIR, adapter, out}), message, name);
        assert.equal(existsSync(out), false, name);
    }
});
