// bench/train-cpu.ts: QLoRA training throughput of tiny-qwen2 on the CPU backend (tokens/s), next to the bound
// that the machine's measured matmul rate sets: the time the step's GEMMs alone take at the GFLOP/s this
// machine reaches on those exact shapes.
//
//   npm run bench:train-cpu [-- --batch 4 --seq 128 --steps 10 --no-checkpointing --profile]
//
// --profile: after the timed steps, a few more steps with every native op timed: where the step's time goes.
import {performance} from "node:perf_hooks";
import {cpu} from "../src/backend/cpu.js";
import {Rng} from "../src/backend/rng.js";
import {applyLora} from "../src/peft/inject.js";
import {DecoderModel} from "../src/model/decoder.js";
import {DecoderTrainer} from "../src/model/training.js";
import {createOptimizer, weightDecayFor} from "../src/optim/adamw.js";
import {bitsAndBytesConfig} from "../src/quant/config.js";
import {MODEL_DIR} from "../test/helpers/paths.js";

const arg = (name: string, def: number) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? Number(process.argv[i + 1]) : def;
};
const B = arg("batch", 4),
    T = arg("seq", 128),
    steps = arg("steps", 10);
const checkpointing = !process.argv.includes("--no-checkpointing");
const profile = process.argv.includes("--profile");
const N = B * T;

const model = await DecoderModel.load(MODEL_DIR, {
    quantization: bitsAndBytesConfig({load_in_4bit: true, bnb_4bit_compute_dtype: "float32"})
});
const cfg = model.config;
const lora = applyLora(model, {r: 16, lora_alpha: 32, target_modules: "all-linear"}, {initRng: new Rng(1)});
const tensors = lora.trainableTensors();
const opt = createOptimizer(
    "paged_adamw_8bit",
    tensors.map((t) => ({name: t.name, param: t.param, grad: t.grad, weightDecay: weightDecayFor(t.name)}))
);
const trainer = new DecoderTrainer(model);
const rng = new Rng(7);
const inputIds = Int32Array.from({length: N}, () => rng.int(cfg.vocabSize - 3));
const batch = {
    B,
    T,
    inputIds,
    labels: inputIds,
    attentionMask: null,
    positionIds: Int32Array.from({length: N}, (_, i) => i % T),
    segIds: null
};

// the step, timed
const time = (fn: () => void, reps: number) => {
    fn();
    const t0 = performance.now();
    for (let i = 0; i < reps; i++) fn();
    return (performance.now() - t0) / reps / 1000;
};
const step = () => {
    lora.zeroGrad();
    trainer.forwardBackward(batch, {lossScale: 1 / N, gradientCheckpointing: checkpointing});
    opt.step(1e-4);
};
const stepTime = time(step, steps);

// the step op by op: every function of the addon wrapped with a timer (sgemm split into the LoRA GEMMs, N = r,
// and the others), and the rest of the step (JavaScript, allocation) as the remainder
const opTimes = new Map<string, {ms: number; calls: number}>();
let profiledStep = 0;
if (profile) {
    const addon = cpu() as unknown as Record<string, unknown>;
    const originals = new Map<string, (...a: unknown[]) => unknown>();
    for (const [name, fn] of Object.entries(addon)) {
        if (typeof fn !== "function") continue;
        originals.set(name, fn as (...a: unknown[]) => unknown);
        addon[name] = (...a: unknown[]) => {
            const t0 = performance.now();
            const result = (fn as (...a: unknown[]) => unknown)(...a);
            const label =
                name === "sgemm" ? (a[3] === 16 || a[2] === 16 || a[4] === 16 ? "sgemm (LoRA, r = 16)" : "sgemm") : name;
            const entry = opTimes.get(label) ?? {ms: 0, calls: 0};
            entry.ms += performance.now() - t0;
            entry.calls++;
            opTimes.set(label, entry);
            return result;
        };
    }
    const reps = Math.max(2, Math.ceil(steps / 2));
    step();
    opTimes.clear();
    const t0 = performance.now();
    for (let i = 0; i < reps; i++) step();
    profiledStep = (performance.now() - t0) / reps;
    for (const entry of opTimes.values()) {
        entry.ms /= reps;
        entry.calls /= reps;
    }
    for (const [name, fn] of originals) addon[name] = fn;
}

// the GEMMs of one step: [label, M, N, K, transA, transB, count]
const C = cfg.hiddenSize,
    I = cfg.intermediateSize,
    V = cfg.vocabSize,
    L = cfg.numHiddenLayers,
    r = 16;
const q = cfg.numAttentionHeads * cfg.headDim,
    kv = cfg.numKeyValueHeads * cfg.headDim;
const passes = checkpointing ? 2 : 1; // forward, plus the recomputation under checkpointing
type Shape = [string, number, number, number, boolean, boolean, number];
const shapes: Shape[] = [];
for (const [name, out, inF] of [
    ["q_proj", q, C],
    ["k/v_proj", kv, C],
    ["o_proj", C, q],
    ["gate/up_proj", I, C],
    ["down_proj", C, I]
] as [string, number, number][]) {
    const count = (name === "k/v_proj" || name === "gate/up_proj" ? 2 : 1) * L;
    shapes.push([`${name} fwd`, N, out, inF, false, true, count * passes]);
    shapes.push([`${name} dX`, N, inF, out, false, false, count]);
    shapes.push([`${name} lora`, N, r, inF, false, true, count * (passes + 2)]);
}
// logits are computed only for target rows (all N here)
shapes.push(["lm_head fwd", N, V, C, false, true, 1], ["lm_head dX", N, C, V, false, false, 1]);

let gemmTime = 0,
    flops = 0;
const rows: string[] = [];
for (const [label, M, Nn, K, ta, tb, count] of shapes) {
    const A = new Float32Array(M * K).fill(0.01),
        Bm = new Float32Array(Nn * K).fill(0.01),
        Cm = new Float32Array(M * Nn);
    const t = time(() => cpu().sgemm(ta, tb, M, Nn, K, 1, A, ta ? M : K, Bm, tb ? K : Nn, 0, Cm, Nn), 3);
    const f = 2 * M * Nn * K;
    gemmTime += t * count;
    flops += f * count;
    rows.push(
        `| ${label.padEnd(17)} | ${String(M).padStart(5)} ${String(Nn).padStart(6)} ${String(K).padStart(5)} | ${String(count).padStart(3)} | ${(f / t / 1e9).toFixed(1).padStart(7)} |`
    );
}
console.log(
    `tiny-qwen2 QLoRA step on the CPU: batch ${B} x ${T} tokens, r=16 on all 7 projections, NF4 + double quant, ` +
        `paged_adamw_8bit, gradient checkpointing ${checkpointing ? "on" : "off"}, ${cpu().getNumThreads()} threads\n`
);
console.log("| GEMM              |     M      N     K | per step | GFLOP/s |");
console.log("|---|---|---|---|");
rows.forEach((r) => console.log(r));
console.log(`\n| measure | value |\n|---|---|`);
console.log(`| step time | ${(stepTime * 1000).toFixed(1)} ms |`);
console.log(`| training throughput | ${(N / stepTime).toFixed(0)} tokens/s |`);
console.log(
    `| GEMM time per step at the measured rates | ${(gemmTime * 1000).toFixed(1)} ms (${(flops / 1e9).toFixed(2)} GFLOP) |`
);
console.log(`| bound from the matmul rate | ${(N / gemmTime).toFixed(0)} tokens/s |`);
console.log(`| throughput / bound | ${((gemmTime / stepTime) * 100).toFixed(0)}% |`);
if (profile) {
    console.log(`\n| op (profiled step: ${profiledStep.toFixed(1)} ms) | calls | ms | % of step |\n|---|---|---|---|`);
    const sorted = [...opTimes].sort((a, b) => b[1].ms - a[1].ms);
    let total = 0;
    for (const [name, {ms, calls}] of sorted) {
        total += ms;
        console.log(`| ${name} | ${calls.toFixed(0)} | ${ms.toFixed(2)} | ${((ms / profiledStep) * 100).toFixed(1)}% |`);
    }
    const rest = profiledStep - total;
    console.log(`| outside the native ops | | ${rest.toFixed(2)} | ${((rest / profiledStep) * 100).toFixed(1)}% |`);
}
