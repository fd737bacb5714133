// A tiny random Mistral whose sliding window (4) is shorter than its prompts, against transformers and peft
// (test/fixtures/arch/mistral-sw, made by scripts/references/make_sliding_window_refs.py on a machine with torch,
// transformers and peft): the fp32 logits and loss, greedy generation token for token (the KV cache dropping what
// falls behind the window), the same with peft's adapter, and peft's LoRA gradients.
import {test} from "node:test";
import assert from "node:assert/strict";
import {existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, cpSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {SafetensorsFile} from "../src/io/safetensors.js";
import {DecoderModel} from "../src/model/decoder.js";
import {generate} from "../src/model/generate.js";
import {DecoderTrainer} from "../src/model/training.js";
import {loadAdapter} from "../src/peft/adapter-files.js";
import {relL2} from "./helpers/fixtures.js";
import {REPO_ROOT} from "./helpers/paths.js";

const DIR = path.join(REPO_ROOT, "test", "fixtures", "arch", "mistral-sw");

if (!existsSync(DIR)) {
    test("mistral sliding window against transformers", {
        skip:
            `${DIR} is missing; make it on a machine with torch, transformers and peft: python3 ` +
            "scripts/references/make_sliding_window_refs.py --tokenizer ../shared/models/tiny-qwen2 --out test/fixtures/arch"
    }, () => {});
} else {
    const greedy = JSON.parse(readFileSync(path.join(DIR, "greedy.json"), "utf8")) as {
        prompt_ids: number[];
        output_ids: number[];
        adapter_output_ids: number[];
    };
    const reference = async () => {
        const f = await SafetensorsFile.open(path.join(DIR, "reference.safetensors"));
        const r = {
            ids: await f.readI32("input_ids"),
            labels: await f.readI32("labels"),
            positions: await f.readI32("logit_positions"),
            logits: await f.readF32("logits"),
            loss: (await f.readF32("loss"))[0]
        };
        await f.close();
        return r;
    };

    test("the config slides every layer with a window shorter than the prompt", async () => {
        const model = await DecoderModel.load(DIR);
        assert.equal(model.config.slidingWindow, 4);
        assert.ok(model.config.layerTypes.every((t) => t === "sliding_attention"));
        assert.ok((await reference()).ids.length > 2 * 4);
    });

    test("logits and loss match transformers (fp32, eager attention with the window)", async () => {
        const model = await DecoderModel.load(DIR);
        const ref = await reference();
        const T = ref.ids.length,
            V = model.config.vocabSize;
        const logits = model.forward(ref.ids, 1, T);
        let maxDiff = 0;
        ref.positions.forEach((t, i) => {
            for (let v = 0; v < V; v++) maxDiff = Math.max(maxDiff, Math.abs(logits[t * V + v] - ref.logits[i * V + v]));
        });
        const {loss} = model.causalLmLoss(logits, ref.labels, 1, T);
        console.log(
            `mistral-sw: logits max abs diff ${maxDiff.toExponential(3)}; loss ${loss.toFixed(6)} vs ${ref.loss.toFixed(6)}`
        );
        assert.ok(maxDiff <= 2e-3, `logits max abs diff ${maxDiff}`);
        assert.ok(Math.abs(loss - ref.loss) <= 1e-4, `loss ${loss} vs ${ref.loss}`);

        // the same weights without the window give other logits at the last position: the fixture tests the window
        const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-mistral-sw-"));
        try {
            cpSync(DIR, dir, {recursive: true});
            const cfg = JSON.parse(readFileSync(path.join(DIR, "config.json"), "utf8"));
            writeFileSync(path.join(dir, "config.json"), JSON.stringify({...cfg, sliding_window: null}));
            const full = (await DecoderModel.load(dir)).forward(ref.ids, 1, T);
            let d = 0;
            for (let v = 0; v < V; v++) d = Math.max(d, Math.abs(full[(T - 1) * V + v] - logits[(T - 1) * V + v]));
            assert.ok(d > 1e-2, `lifting the window changes the last logits by ${d} only`);
        } finally {
            rmSync(dir, {recursive: true, force: true});
        }
    });

    test("greedy generation equals transformers' token for token, without and with peft's adapter", async () => {
        const model = await DecoderModel.load(DIR);
        const maxNew = greedy.output_ids.length - greedy.prompt_ids.length;
        const out = generate(model, greedy.prompt_ids, {maxNewTokens: maxNew, greedy: true, eosTokenIds: []});
        assert.deepEqual(out.outputIds, greedy.output_ids);
        await loadAdapter(path.join(DIR, "adapter"), model);
        const adapted = generate(model, greedy.prompt_ids, {maxNewTokens: maxNew, greedy: true, eosTokenIds: []});
        assert.deepEqual(adapted.outputIds, greedy.adapter_output_ids);
    });

    for (const checkpointing of [false, true])
        test(`LoRA gradients match peft's${checkpointing ? " (gradient checkpointing)" : ""}`, async () => {
            const model = await DecoderModel.load(DIR);
            const lora = await loadAdapter(path.join(DIR, "adapter"), model);
            const ref = await reference();
            const T = ref.ids.length;
            const batch = {
                B: 1,
                T,
                inputIds: ref.ids,
                labels: ref.labels,
                attentionMask: null,
                positionIds: Int32Array.from({length: T}, (_, t) => t),
                segIds: null
            };
            const trainer = new DecoderTrainer(model);
            const {targets} = trainer.forwardBackward(batch, {lossScale: 0, gradientCheckpointing: false, noBackward: true});
            const res = trainer.forwardBackward(batch, {lossScale: 1 / targets, gradientCheckpointing: checkpointing});
            const f = await SafetensorsFile.open(path.join(DIR, "lora_grads.safetensors"));
            const refLoss = (await f.readF32("loss"))[0];
            let worst = 0,
                checked = 0;
            for (const t of lora.trainableTensors()) {
                const err = relL2(t.grad, await f.readF32(t.name));
                worst = Math.max(worst, err);
                checked++;
                assert.ok(err <= 1e-3, `${t.name}: relative L2 error ${err}`);
            }
            await f.close();
            console.log(`mistral-sw LoRA: ${checked} tensors, worst relative L2 ${worst.toExponential(3)}`);
            assert.equal(checked, 2 * 7 * 2, "lora_A and lora_B of 7 modules in 2 layers");
            assert.ok(Math.abs(res.lossSum / res.targets - refLoss) < 1e-4, `loss ${res.lossSum / res.targets} vs ${refLoss}`);
        });
}
