// bench/gpu.ts: QLoRA and bf16 LoRA training throughput on the GPU for Qwen2-7B / Qwen2-0.5B architectures with
// random weights (written by qlora's own code), beside transformers + peft measured by
// ../shared/bench/peer_lora.py in the same command, and the bitsandbytes QLoRA figures of RESULTS.md.
// The step: r=16, alpha 32, dropout 0.05, all 7 projections, batch 4 x 512 random tokens, gradient checkpointing,
// paged_adamw_8bit (QLoRA) or adamw_torch (LoRA); 3 warm-up and 10 timed steps.
//
//   node bench/gpu.js [--models qwen2-0.5b,qwen2-7b] [--modes qlora,lora] [--shape 4x512] [--steps 10]
//                     [--dir /tmp/models] [--peer path/to/peer_lora.py] [--offload] [--profile] [--longest GiB]
//                     [--warmup 3]
// A shape past the architecture's max_position_embeddings runs on a copy of its config with the context raised
// (the weights are links; RoPE extends as it does with a larger max_position_embeddings).
// --longest GiB: instead of --shape, batch 1 at the longest sequence (a multiple of 1024, at most 131,072) whose
// peak the plan (src/train/plan-memory.ts) puts within GiB, measured there (one step without warm-up: a 128k
// step takes minutes): the longest context that trains in that memory.
// --profile: after each row, one more step timed op by op on the GPU (src/backend/cuda-profile.ts), and the
// memory at the step's peak term by term as `qlora plan` predicts it (src/train/plan-memory.ts), beside the
// allocator's measured peak.
import {spawnSync} from "node:child_process";
import {formatProfile} from "../src/backend/cuda-profile.js";
import {loadModelConfig} from "../src/io/hf-config.js";
import {GiB, planDeviceMemory} from "../src/train/plan-memory.js";
import {longContextModel, syntheticModel} from "./models.js";
import {benchSettings, profileStep, setupTraining, timeSteps, type TrainMode} from "./train-steps.js";

const arg = (name: string, def: string) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : def;
};
const models = arg("models", "qwen2-0.5b,qwen2-7b").split(",");
const modes = arg("modes", "qlora,lora").split(",");
const [bs, seq] = arg("shape", "4x512").split("x").map(Number);
const steps = Number(arg("steps", "10")),
    warmup = Number(arg("warmup", "3"));
const dir = arg("dir", "/tmp/models");
const peer = arg("peer", "");
const offload = process.argv.includes("--offload");
const longestGiB = process.argv.includes("--longest") ? Number(arg("longest", "")) : null;
if (longestGiB !== null && !(longestGiB > 0)) throw new Error("--longest takes the memory in GiB, e.g. --longest 24");
const profile = process.argv.includes("--profile");

// transformers + peft + bitsandbytes QLoRA on the H200 (../shared/bench/RESULTS.md; bitsandbytes is not installed there)
const BNB_QLORA_BY_SHAPE: Record<string, Record<string, {tokS: number; peak: number}>> = {
    "4x512": {"qwen2-7b": {tokS: 3264, peak: 12.89}, "qwen2-0.5b": {tokS: 6477, peak: 5.61}},
    "2x2048": {"qwen2-7b": {tokS: 3041, peak: 18.32}},
    "1x4096": {"qwen2-7b": {tokS: 2199, peak: 18.85}}
};
const BNB_QLORA = BNB_QLORA_BY_SHAPE[`${bs}x${seq}`] ?? {};

interface Row {
    model: string;
    impl: string;
    mode: string;
    /** batch x length */
    shape: string;
    tokS: number;
    samplesS: number;
    stepMs: number;
    peakGiB: number;
    note?: string;
}
const rows: Row[] = [];

const LONGEST_CAP = 131072;

/** the longest sequence (a multiple of 1024, at most LONGEST_CAP) at batch 1 whose planned peak fits `GiB` */
function longestFitting(cfg: Awaited<ReturnType<typeof loadModelConfig>>, mode: TrainMode, gib: number): number {
    const fits = (len: number) =>
        planDeviceMemory(cfg, benchSettings(mode, 1, len, offload ? "offload" : "on")).peakBytes <= gib * GiB;
    let len = 0;
    for (let step = 65536; step >= 1024; step /= 2) while (len + step <= LONGEST_CAP && fits(len + step)) len += step;
    return len;
}

for (const name of models) {
    const baseDir = await syntheticModel(dir, name);
    for (const mode of modes) {
        const seqHere = longestGiB === null ? seq : longestFitting(await loadModelConfig(baseDir), mode as TrainMode, longestGiB);
        const bsHere = longestGiB === null ? bs : 1;
        if (seqHere === 0) {
            console.log(`${name} ${mode}: no sequence of 1024 tokens fits ${longestGiB} GiB by the plan`);
            continue;
        }
        const modelDir = longContextModel(baseDir, seqHere);
        // the peak counts this mode's model only (the earlier mode's device buffers stay allocated in this process)
        const setup = await setupTraining(modelDir, mode as TrainMode, {offload});
        const t = timeSteps(setup, {
            batch: bsHere,
            seq: seqHere,
            steps: longestGiB === null ? steps : 1,
            warmup: longestGiB === null ? warmup : 0,
            gradientCheckpointing: true
        });
        const planned =
            longestGiB === null
                ? ""
                : `, the longest within ${longestGiB} GiB by the plan (${(
                      planDeviceMemory(
                          await loadModelConfig(modelDir),
                          benchSettings(mode as TrainMode, 1, seqHere, offload ? "offload" : "on")
                      ).peakBytes / GiB
                  ).toFixed(2)} GiB planned)`;
        rows.push({
            model: name,
            impl: `qlora (this project)${offload ? ", offloaded checkpoints" : ""}`,
            mode,
            shape: `${bsHere}x${seqHere}`,
            tokS: t.tokensPerSecond,
            samplesS: t.samplesPerSecond,
            stepMs: t.stepMs,
            peakGiB: (t.peakBytes ?? 0) / 2 ** 30,
            note: `load ${setup.loadSeconds.toFixed(0)} s, loss ${t.lossFirst.toFixed(3)} -> ${t.lossLast.toFixed(3)}${planned}`
        });
        console.log(JSON.stringify(rows[rows.length - 1]));
        if (profile) {
            const what = `${name} ${mode} ${bsHere}x${seqHere}${offload ? ", offloaded checkpoints" : ""}`;
            const step = profileStep(setup, {batch: bsHere, seq: seqHere, gradientCheckpointing: true});
            console.log(`\n${formatProfile(step, `one training step of ${what}`)}\n`);
            const plan = planDeviceMemory(
                await loadModelConfig(modelDir),
                benchSettings(mode as TrainMode, bsHere, seqHere, offload ? "offload" : "on")
            );
            console.log(`memory of ${what} at the step's peak (${plan.peakPhase}), as the plan predicts it\n`);
            console.log("| term | GiB |\n|---|--:|");
            for (const t of plan.terms) console.log(`| ${t.label} | ${(t.bytes / GiB).toFixed(3)} |`);
            console.log(`| caching allocator rounding | ${(plan.roundingBytes / GiB).toFixed(3)} |`);
            console.log(
                `| **predicted peak** (measured: ${(t.peakBytes === null ? 0 : t.peakBytes / GiB).toFixed(3)}) | ${(plan.peakBytes / GiB).toFixed(3)} |\n`
            );
        }
    }
    if (peer && longestGiB === null) {
        const r = spawnSync(
            "python3",
            [peer, "--model", name, "--dir", dir, "--modes", "lora", "--shapes", `${bs}x${seq}`, "--steps", String(steps)],
            {encoding: "utf8"}
        );
        for (const line of r.stdout.split("\n").filter((l) => l.startsWith("{"))) {
            const j = JSON.parse(line);
            if (j.error) console.log(`peer error: ${j.error}`);
            else
                rows.push({
                    model: name,
                    impl: "transformers + peft",
                    mode: j.mode,
                    shape: `${bs}x${seq}`,
                    tokS: j.tokens_per_s,
                    samplesS: j.samples_per_s,
                    stepMs: j.step_ms,
                    peakGiB: j.peak_gib,
                    note: `measured in this run, loss ${j.loss_first} -> ${j.loss_last}`
                });
        }
        if (r.status !== 0) console.log(`peer exited with ${r.status}: ${r.stderr.slice(-500)}`);
    }
    const bnb = longestGiB === null ? BNB_QLORA[name] : undefined;
    if (bnb)
        rows.push({
            model: name,
            impl: "transformers + peft + bitsandbytes",
            mode: "qlora",
            shape: `${bs}x${seq}`,
            tokS: bnb.tokS,
            samplesS: bnb.tokS / seq,
            stepMs: (1000 * bs * seq) / bnb.tokS,
            peakGiB: bnb.peak,
            note: "RESULTS.md (bitsandbytes not installed here)"
        });
}

console.log(
    `\n${longestGiB === null ? `batch ${bs} x ${seq}` : `batch 1, the longest sequence within ${longestGiB} GiB`}, r=16 alpha 32 ` +
        `dropout 0.05 on all 7 projections, gradient checkpointing${offload ? " (offloaded)" : ""}, ` +
        `${longestGiB === null ? `${steps} timed steps` : "one step without warm-up"}\n`
);
console.log("| model | implementation | method | batch x length | tokens/s | samples/s | step ms | peak GiB | notes |");
console.log("|---|---|---|---|---|---|---|---|---|");
for (const r of rows)
    console.log(
        `| ${r.model} | ${r.impl} | ${r.mode} | ${r.shape} | ${r.tokS.toFixed(0)} | ${r.samplesS.toFixed(2)} | ` +
            `${r.stepMs.toFixed(0)} | ${r.peakGiB.toFixed(2)} | ${r.note ?? ""} |`
    );
for (const name of models) {
    const ours = rows.find((r) => r.model === name && r.mode === "qlora" && r.impl.startsWith("qlora"));
    if (ours && BNB_QLORA[name] && longestGiB === null)
        console.log(
            `${name}: QLoRA ${(ours.tokS / BNB_QLORA[name].tokS).toFixed(2)}x the tokens/s of bitsandbytes, ` +
                `${(ours.peakGiB / BNB_QLORA[name].peak).toFixed(2)}x its peak memory`
        );
}
