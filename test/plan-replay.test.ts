// plan-replay.test.ts: the planner's replay of a training step (train/plan-memory.ts StepReplay, a hand-written
// mirror of model/graph.ts) requests and frees, in the same order and of the same sizes, exactly what the graph
// asks the backend for. The CPU backend is traced here (every activation/stats/zeros/indices/mask and free) for
// each architecture's graph (Qwen2 biases, Qwen3 per-head norms, Phi-3 fused projections, Gemma 3 sandwich norms),
// with and without gradient checkpointing, dropout, DoRA, packing and the MLP in row chunks; the CUDA planner runs
// the same replay with bf16 sizes and the CUDA ops' own workspaces (checked on a GPU by bench/plan-check.ts). A
// graph change that the replay misses fails here with the first event that differs.
import {test} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {cpuBackend} from "../src/backend/cpu-backend.js";
import {DropoutClock} from "../src/backend/dropout.js";
import {Rng} from "../src/backend/rng.js";
import {DecoderModel} from "../src/model/decoder.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";
import {DecoderTrainer, type TrainBatch} from "../src/model/training.js";
import {applyLora} from "../src/peft/inject.js";
import {resolveTrainConfig} from "../src/train/config.js";
import {planHostStepBytes} from "../src/train/plan-memory.js";
import {SMALL_VOCAB_ARCHS as ARCHS, tempDir} from "./helpers/arch-checks.js";

const tmp = tempDir("qlora-plan-replay-");

/** +bytes per request and -bytes per free of the CPU backend while fn runs */
function traced(fn: () => void): number[] {
    const be = cpuBackend() as unknown as Record<string, (...a: unknown[]) => unknown>;
    const trace: number[] = [];
    const sizes = new WeakMap<object, number>();
    const originals = new Map<string, (...a: unknown[]) => unknown>();
    const wrap = (name: string, f: (orig: (...a: unknown[]) => unknown) => (...a: unknown[]) => unknown) => {
        const orig = be[name].bind(be);
        originals.set(name, be[name]);
        be[name] = f(orig);
    };
    for (const name of ["activation", "stats", "zeros", "indices", "mask"])
        wrap(name, (orig) => (arg) => {
            const t = orig(arg) as ArrayBufferView;
            trace.push(t.byteLength);
            sizes.set(t, t.byteLength);
            return t;
        });
    wrap("free", (orig) => (t) => {
        const bytes = t ? sizes.get(t as object) : undefined;
        if (bytes !== undefined) {
            trace.push(-bytes);
            sizes.delete(t as object);
        }
        return orig(t);
    });
    // the CPU loss makes its chunk inside the op: its targets, losses, sum, a chunk of logits and the chunk's rows
    // and their gradient, as the replay counts them
    wrap("causalLmLoss", (orig) => (...a) => {
        const [N, C, V, chunk] = [a[3], a[4], a[5], a[8]] as number[];
        const rows = Math.min(chunk, N);
        const inside = [4 * N, 4 * N, 4, 4 * rows * V, 8 * rows * C];
        trace.push(...inside, ...inside.map((b) => -b));
        return orig(...a);
    });
    try {
        fn();
    } finally {
        for (const [name, f] of originals) be[name] = f;
    }
    return trace;
}

interface Case {
    gradient_checkpointing: boolean;
    lora_dropout: number;
    use_dora?: boolean;
    packing?: boolean;
    /** sequence length (640 x 2 rows: the MLP runs in two row chunks where its activations are not kept) */
    T?: number;
}

async function check(arch: string, c: Case): Promise<void> {
    const dir = path.join(tmp, arch);
    const model = await DecoderModel.load(dir);
    const cfg = model.config;
    const lora = {
        r: 8,
        lora_alpha: 16,
        target_modules: "all-linear",
        lora_dropout: c.lora_dropout,
        use_dora: c.use_dora ?? false
    };
    const peft = applyLora(model, lora, {initRng: new Rng(1), dropoutClock: new DropoutClock(0)});
    // DoRA's k and row norms (fp32 [out] each) stay until the optimizer step
    const doraBytes = peft
        .trainableTensors()
        .filter((t) => t.name.includes("magnitude"))
        .reduce((sum, t) => sum + 8 * t.param.length, 0);
    const B = 2,
        T = c.T ?? 48,
        N = B * T;
    const rng = new Rng(3);
    const inputIds = Int32Array.from({length: N}, () => rng.int(cfg.vocabSize));
    // packed rows: two sequences a row, positions restarting at the second
    const half = T >> 1;
    const batch: TrainBatch = {
        B,
        T,
        inputIds,
        labels: inputIds,
        attentionMask: null,
        positionIds: Int32Array.from({length: N}, (_, i) => (c.packing ? (i % T) % half : i % T)),
        segIds: c.packing ? Int32Array.from({length: N}, (_, i) => (i % T < half ? 0 : 1)) : null
    };
    const trainer = new DecoderTrainer(model);
    const measured = traced(() =>
        trainer.forwardBackward(batch, {lossScale: 1 / N, gradientCheckpointing: c.gradient_checkpointing})
    );
    const settings = resolveTrainConfig({
        ...lora,
        per_device_train_batch_size: B,
        max_seq_length: T,
        gradient_checkpointing: c.gradient_checkpointing,
        packing: c.packing ?? false,
        load_in_4bit: false
    });
    const planned: number[] = [];
    const peak = planHostStepBytes(cfg, settings, planned);
    let i = 0;
    while (i < measured.length && measured[i] === planned[i]) i++;
    const around = (t: number[]) => `[${t.slice(Math.max(0, i - 3), i + 5).join(", ")}]`;
    assert.ok(
        i === measured.length && i === planned.length,
        `${arch} ${JSON.stringify(c)}: event ${i} of ${measured.length} differs: the graph ${around(measured)}, the replay ${around(planned)}`
    );
    let live = 0,
        measuredPeak = 0;
    for (const b of measured) measuredPeak = Math.max(measuredPeak, (live += b));
    assert.equal(live, doraBytes, "every request but DoRA's cached scales is freed by the end of the step");
    if (c.use_dora) assert.ok(doraBytes > 0);
    assert.equal(peak, measuredPeak);
}

test("the planner's step replay is the graph's allocation sequence, event for event, for every architecture", async () => {
    for (const [name, config] of Object.entries(ARCHS))
        await writeSyntheticCheckpoint(path.join(tmp, name), {config, seed: 1, dtype: "F32"});
    for (const arch of Object.keys(ARCHS))
        for (const gradient_checkpointing of [false, true])
            for (const lora_dropout of [0, 0.1]) await check(arch, {gradient_checkpointing, lora_dropout});
});

test("the replay follows DoRA, packed rows and the MLP's row chunks", async () => {
    for (const arch of ["qwen2", "gemma3"])
        for (const gradient_checkpointing of [false, true]) {
            await check(arch, {gradient_checkpointing, lora_dropout: 0.1, use_dora: true});
            await check(arch, {gradient_checkpointing, lora_dropout: 0, packing: true});
            await check(arch, {gradient_checkpointing, lora_dropout: 0.1, T: 640});
        }
});
