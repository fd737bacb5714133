// merge refuses adapters that would give silently wrong weights: non-finite values, a rank that disagrees with
// adapter_config.json, and merged values beyond the range of the output dtype.
import {test} from "node:test";
import assert from "node:assert/strict";
import {cpSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {SafetensorsFile, writeSafetensors, type TensorToWrite} from "../src/io/safetensors.js";
import {mergeAdapter} from "../src/peft/merge.js";
import {FIXTURES, MODEL_DIR} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-hmerge-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));
const ADAPTER = path.join(FIXTURES, "adapter");
const B_NAME = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";

/** a copy of the fixture adapter with its weights and/or config edited */
async function adapterCopy(
    name: string,
    edit: {tensor?: (name: string, data: Float32Array) => void; config?: (c: Record<string, unknown>) => void}
): Promise<string> {
    const dir = path.join(tmp, name);
    cpSync(ADAPTER, dir, {recursive: true});
    if (edit.tensor) {
        const st = await SafetensorsFile.open(path.join(ADAPTER, "adapter_model.safetensors"));
        const tensors: TensorToWrite[] = [];
        for (const n of st.names()) {
            const data = await st.readF32(n);
            edit.tensor(n, data);
            tensors.push({name: n, dtype: "F32", shape: st.info(n).shape, data});
        }
        await st.close();
        rmSync(path.join(dir, "adapter_model.safetensors"));
        await writeSafetensors(path.join(dir, "adapter_model.safetensors"), tensors);
    }
    if (edit.config) {
        const file = path.join(dir, "adapter_config.json");
        const c = JSON.parse(readFileSync(file, "utf8"));
        edit.config(c);
        writeFileSync(file, JSON.stringify(c));
    }
    return dir;
}

test("a NaN in lora_B is refused, naming the tensor; nothing is written", async () => {
    const adapter = await adapterCopy("nan", {
        tensor: (n, d) => {
            if (n === B_NAME) d[5] = NaN;
        }
    });
    const out = path.join(tmp, "out-nan");
    await assert.rejects(
        mergeAdapter({model: MODEL_DIR, adapter, out}),
        (e: Error) => e.message.includes(B_NAME) && /holds 1 NaN value/.test(e.message)
    );
    assert.equal(existsSync(out), false);
});

test("lora_A's rank must equal adapter_config.json's r (the scaling alpha/r depends on it)", async () => {
    const adapter = await adapterCopy("rank", {
        config: (c) => {
            c.r = 4;
        }
    });
    await assert.rejects(
        mergeAdapter({model: MODEL_DIR, adapter, out: path.join(tmp, "out-rank")}),
        /has rank 8 but adapter_config.json says r 4/
    );
});

test("merged weights beyond f16's range are refused with --dtype f16 and fine in bf16", async () => {
    // large lora_B values (a scaling that large is refused: test/harden-train-units.test.ts)
    const adapter = await adapterCopy("huge", {
        tensor: (n, d) => {
            if (n.includes("lora_B"))
                d.forEach((v, i) => {
                    d[i] = v * 4e8;
                });
        }
    });
    await assert.rejects(
        mergeAdapter({model: MODEL_DIR, adapter, out: path.join(tmp, "out-f16"), dtype: "f16"}),
        /infinite value.*exceed the f16 range: merge with --dtype bf16/
    );
    assert.equal(existsSync(path.join(tmp, "out-f16")), false);
    const r = await mergeAdapter({model: MODEL_DIR, adapter, out: path.join(tmp, "out-bf16"), dtype: "bf16"});
    assert.equal(r.merged, 56);
});
