// dora-adapter.ts: a DoRA adapter on the embedded model for the merge tests (the fixture adapter is plain LoRA)
import {existsSync} from "node:fs";
import path from "node:path";
import {Rng} from "../../src/backend/rng.js";
import {DecoderModel} from "../../src/model/decoder.js";
import {saveAdapter} from "../../src/peft/adapter-files.js";
import {applyLora} from "../../src/peft/inject.js";
import {MODEL_DIR} from "./paths.js";

/** `tmp`/dora-adapter: DoRA on q, v and down with random B and magnitudes, written once */
export async function doraAdapter(tmp: string): Promise<string> {
    const dir = path.join(tmp, "dora-adapter");
    if (existsSync(dir)) return dir;
    const model = await DecoderModel.load(MODEL_DIR);
    const lora = applyLora(
        model,
        {r: 4, lora_alpha: 8, target_modules: ["q_proj", "v_proj", "down_proj"], use_dora: true, init_lora_weights: "gaussian"},
        {initRng: new Rng(5)}
    );
    const rng = new Rng(9);
    for (const t of lora.trainableTensors())
        for (let i = 0; i < t.param.length; i++) t.param[i] += (t.name.endsWith("magnitude_vector") ? 0.5 : 0.05) * rng.normal();
    await saveAdapter(dir, lora);
    return dir;
}
