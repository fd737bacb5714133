// DoRA (use_dora): the init is a no-op, the hand-written gradients of A, B and the magnitude agree with finite
// differences (with and without dropout), the adapter round-trips PEFT's file layout, and merging folds it in.
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {cpu} from "../src/backend/cpu.js";
import {DropoutClock} from "../src/backend/dropout.js";
import {Rng} from "../src/backend/rng.js";
import {SafetensorsFile} from "../src/io/safetensors.js";
import {loadAdapter, saveAdapter} from "../src/peft/adapter-files.js";
import {applyLora} from "../src/peft/inject.js";
import {LoraLinear} from "../src/lora/layer.js";
import {Projection} from "../src/lora/projection.js";
import {cpuBackend, type CpuTensors} from "../src/backend/cpu-backend.js";
import {DenseLinear} from "../src/backend/linear.js";
import {mergeAdapter} from "../src/peft/merge.js";
import {DecoderModel} from "../src/model/decoder.js";
import {DecoderTrainer, type TrainBatch} from "../src/model/training.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";
import {centralDifference} from "./helpers/fixtures.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-dora-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));
const modelDir = path.join(tmp, "model");
await writeSyntheticCheckpoint(modelDir, {
    dtype: "F32",
    seed: 3,
    std: 0.1,
    config: {
        architectures: ["LlamaForCausalLM"],
        model_type: "llama",
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        rms_norm_eps: 1e-5,
        rope_theta: 10000,
        max_position_embeddings: 64,
        tie_word_embeddings: false
    }
});

const ids = Int32Array.from([5, 17, 42, 3, 88, 61, 7, 29, 14, 50]);
const batch: TrainBatch = {
    B: 1,
    T: ids.length,
    inputIds: ids,
    labels: ids,
    attentionMask: null,
    positionIds: Int32Array.from(ids, (_, i) => i),
    segIds: null
};

test("DoRA at initialization leaves the model unchanged", async () => {
    const base = await DecoderModel.load(modelDir);
    const ref = base.forward(ids, 1, ids.length);
    const dora = applyLora(await DecoderModel.load(modelDir), {
        r: 4,
        lora_alpha: 8,
        target_modules: "all-linear",
        use_dora: true
    });
    const got = dora.model.forward(ids, 1, ids.length);
    let d = 0;
    for (let i = 0; i < ref.length; i++) d = Math.max(d, Math.abs(ref[i] - got[i]));
    assert.ok(d < 1e-5, `max diff ${d}`);
    assert.equal(dora.trainableTensors().filter((t) => t.name.endsWith("lora_magnitude_vector")).length, 14);
});

test("DoRA magnitude gradients agree with finite differences through the whole model", async () => {
    const model = await DecoderModel.load(modelDir);
    const lora = applyLora(
        model,
        {r: 4, lora_alpha: 8, target_modules: "all-linear", use_dora: true, init_lora_weights: false},
        {initRng: new Rng(2)}
    );
    for (const t of lora.trainableTensors())
        if (t.name.endsWith("magnitude_vector"))
            t.param.forEach((v, i, a) => {
                a[i] = v * (1 + 0.3 * Math.sin(i));
            });
    const trainer = new DecoderTrainer(model);
    const loss = () => {
        // the magnitudes changed in place, as an optimizer step changes them: the cached k = m / norm is stale
        trainer.afterOptimizerStep();
        return trainer.forwardBackward(batch, {lossScale: 1, gradientCheckpointing: false, noBackward: true}).lossSum;
    };
    lora.zeroGrad();
    trainer.forwardBackward(batch, {lossScale: 1, gradientCheckpointing: true});
    let checked = 0;
    for (const t of lora.trainableTensors()) {
        // the norm does not depend on m, so the detached-norm gradient of m is the true derivative
        if (!t.name.endsWith("magnitude_vector") || !/layers\.[01]\.(self_attn\.q_proj|mlp\.down_proj)/.test(t.name)) continue;
        for (const i of [0, 5, t.param.length - 1]) {
            const fd = centralDifference(t.param, i, 1e-2 * Math.abs(t.param[i]), loss);
            assert.ok(Math.abs(fd - t.grad[i]) <= 2e-2 * Math.max(1e-3, Math.abs(fd)), `${t.name}[${i}]: ${t.grad[i]} vs ${fd}`);
            checked++;
        }
    }
    assert.equal(checked, 12);
});

for (const dropout of [0, 0.3]) {
    test(`a DoRA layer's gradients equal a float64 reference with the norm detached (dropout ${dropout})`, () => {
        const M = 5,
            K = 12,
            N = 7,
            r = 3,
            s = 2.5,
            p = dropout;
        const g = new Rng(9);
        const rand = (n: number, sc = 1) => Float32Array.from({length: n}, () => (2 * g.next() - 1) * sc);
        const W = rand(N * K, 0.5),
            bias = rand(N, 0.2),
            A = rand(r * K, 0.4),
            B = rand(N * r, 0.4),
            x = rand(M * K),
            R = rand(M * N);
        const mag = Float32Array.from({length: N}, () => 0.5 + g.next());
        const clock = new DropoutClock(21);
        const layer = new LoraLinear(
            "m",
            new DenseLinear({outFeatures: N, inFeatures: K, weight: W, bias}),
            {r, scaling: s, dropout: p, A, B, magnitude: mag},
            false,
            {clock, projection: 3}
        );
        // the projection as the graph runs it, on the CPU backend (its gradients are the host layer's arrays)
        const proj = new Projection<CpuTensors>(cpuBackend(), layer.base, layer);
        const y = new Float32Array(M * N);
        const saved = proj.forward(y, x, M, true);
        const dx = new Float32Array(M * K);
        proj.backward(dx, R, x, saved, M, false);
        // the reference: the same mask (a function of the seed: test/dropout.test.ts checks it), k from the initial
        // weights and held fixed
        const drawn = new Float32Array(M * K);
        if (p > 0) cpu().dropoutMask(drawn, clock.seedFor(3), p, M * K, 0);
        const mask = Float64Array.from({length: M * K}, (_, i) => (p > 0 ? drawn[i] : 1));
        const norm = Array.from({length: N}, (_, n) => {
            let ss = 0;
            for (let i = 0; i < K; i++) {
                let w = W[n * K + i];
                for (let j = 0; j < r; j++) w += s * B[n * r + j] * A[j * K + i];
                ss += w * w;
            }
            return Math.sqrt(ss);
        });
        const L = (
            Wv: ArrayLike<number>,
            Av: ArrayLike<number>,
            Bv: ArrayLike<number>,
            mv: ArrayLike<number>,
            xv: ArrayLike<number>
        ) => {
            let total = 0;
            for (let m = 0; m < M; m++)
                for (let n = 0; n < N; n++) {
                    const k = mv[n] / norm[n];
                    let base = 0,
                        baseD = 0,
                        lor = 0;
                    for (let i = 0; i < K; i++) {
                        base += xv[m * K + i] * Wv[n * K + i];
                        baseD += xv[m * K + i] * mask[m * K + i] * Wv[n * K + i];
                    }
                    for (let j = 0; j < r; j++) {
                        let xa = 0;
                        for (let i = 0; i < K; i++) xa += xv[m * K + i] * mask[m * K + i] * Av[j * K + i];
                        lor += s * xa * Bv[n * r + j];
                    }
                    const yv = base + bias[n] + (k - 1) * baseD + k * lor;
                    total += yv * R[m * N + n];
                }
            return total;
        };
        const fd = (arr: Float64Array, i: number, f: () => number) => {
            const v = arr[i],
                eps = 1e-6;
            arr[i] = v + eps;
            const lp = f();
            arr[i] = v - eps;
            const lm = f();
            arr[i] = v;
            return (lp - lm) / (2 * eps);
        };
        const [Wd, Ad, Bd, md, xd] = [W, A, B, mag, x].map((a) => Float64Array.from(a));
        const f = () => L(Wd, Ad, Bd, md, xd);
        let worst = 0;
        const check = (name: string, ref64: Float64Array, grad: Float32Array) => {
            for (let i = 0; i < grad.length; i++) {
                const want = fd(ref64, i, f);
                const err = Math.abs(want - grad[i]) / Math.max(1e-3, Math.abs(want));
                worst = Math.max(worst, err);
                assert.ok(err < 1e-3, `${name}[${i}]: ${grad[i]} vs ${want}`);
            }
        };
        // the forward: L with R = one-hot picks y[m, n]
        const Rsave = Float32Array.from(R);
        for (let i = 0; i < M * N; i += 3) {
            R.fill(0);
            R[i] = 1;
            const want = f();
            assert.ok(Math.abs(y[i] - want) <= 1e-5 * (1 + Math.abs(want)), `y[${i}]: ${y[i]} vs ${want}`);
        }
        R.set(Rsave);
        check("A", Ad, layer.dA!);
        check("B", Bd, layer.dB!);
        check("magnitude", md, layer.dMagnitude!);
        check("x", xd, dx);
        console.log(
            `DoRA layer (dropout ${p}): A, B, magnitude and input gradients within ${worst.toExponential(2)} of the float64 reference`
        );
    });
}

test("a DoRA adapter saves lora_magnitude_vector as PEFT does, loads back, and merges", async () => {
    const model = await DecoderModel.load(modelDir);
    const lora = applyLora(
        model,
        {r: 4, lora_alpha: 8, target_modules: ["q_proj", "v_proj", "down_proj"], use_dora: true, init_lora_weights: false},
        {initRng: new Rng(5)}
    );
    for (const t of lora.trainableTensors())
        if (t.name.endsWith("magnitude_vector"))
            t.param.forEach((v, i, a) => {
                a[i] = v * 1.2;
            });
    const ref = model.forward(ids, 1, ids.length);
    const dir = path.join(tmp, "adapter");
    await saveAdapter(dir, lora);
    const cfg = JSON.parse(readFileSync(path.join(dir, "adapter_config.json"), "utf8"));
    assert.equal(cfg.use_dora, true);
    const st = await SafetensorsFile.open(path.join(dir, "adapter_model.safetensors"));
    assert.deepEqual(st.info("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector").shape, [32]);
    await st.close();
    const back = await loadAdapter(dir, await DecoderModel.load(modelDir));
    const got = back.model.forward(ids, 1, ids.length);
    assert.deepEqual(Array.from(got), Array.from(ref));
    const merged = path.join(tmp, "merged");
    await mergeAdapter({model: modelDir, adapter: dir, out: merged, dtype: "f16"});
    const m = await DecoderModel.load(merged);
    const x = m.forward(ids, 1, ids.length);
    let d = 0,
        scale = 0;
    for (let i = 0; i < x.length; i++) {
        d = Math.max(d, Math.abs(x[i] - ref[i]));
        scale = Math.max(scale, Math.abs(ref[i]));
    }
    console.log(
        `merged DoRA model vs DoRA adapter: max logit diff ${d.toExponential(2)} (logits up to ${scale.toFixed(2)}, f16 weights)`
    );
    assert.ok(d < 1e-2 * scale);
});
