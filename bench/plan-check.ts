// bench/plan-check.ts: `qlora plan` against the GPU: real training steps (bench/train-steps.ts, the step bench/gpu.ts
// times) of Qwen2 0.5B, 1.5B and 7B architectures with random weights, QLoRA and bf16 LoRA, batch x length
// {1x512, 4x512, 1x4096, 1x16384}, gradient checkpointing on, off and offloaded; a table of the plan's predicted
// peak (the allocator's peakAllocated) and tokens/s beside the measured ones, with the error in %.
//
//   npm run bench:plan -- [--models qwen2-0.5b,qwen2-1.5b,qwen2-7b] [--modes qlora,lora]
//                         [--shapes 1x512,4x512,1x4096,1x16384] [--ckpt on,off,offload] [--steps 5] [--warmup 2]
//                         [--dir /tmp/models] [--device cpu]
//
// Each (model, method, offload) runs in a child process, so a peak counts that model alone and a case that runs out
// of memory cannot spoil the next. Cases the plan says cannot fit the GPU are skipped, and the table says so.
// --device cpu: a smoke run on the host (the embedded tiny-qwen2 unless --models names one, tiny shapes): the
// machinery end to end, with no peak to compare.
import {spawnSync} from "node:child_process";
import {fileURLToPath} from "node:url";
import {DEFAULT_MODEL_DIR} from "../src/api/models.js";
import {estimateSpeed, gpuByDeviceName, gpuByName} from "../src/api/plan-gpus.js";
import {cudaAvailability} from "../src/backend/cuda.js";
import {loadModelConfig} from "../src/io/hf-config.js";
import {GiB, planDeviceMemory} from "../src/train/plan-memory.js";
import {syntheticModel} from "./models.js";
import {benchSettings, type Checkpointing, setupTraining, timeSteps, type TrainMode} from "./train-steps.js";

interface Case {
    batch: number;
    seq: number;
    ckpt: Checkpointing;
}

interface Group {
    model: string;
    modelDir: string;
    mode: TrainMode;
    offload: boolean;
    cases: Case[];
}

interface Measured {
    index: number;
    peakBytes: number | null;
    tokensPerSecond: number;
    error?: string;
}

const arg = (name: string, def: string) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : def;
};
const device = arg("device", "cuda") === "cpu" ? "cpu" : "cuda";
const steps = Number(arg("steps", device === "cpu" ? "1" : "5"));
const warmup = Number(arg("warmup", device === "cpu" ? "1" : "2"));

/** the child: one model and method, its cases in order; a JSON line per case */
async function child(group: Group): Promise<void> {
    const setup = await setupTraining(group.modelDir, group.mode, {device, offload: group.offload});
    group.cases.forEach((c, index) => {
        const t = timeSteps(setup, {batch: c.batch, seq: c.seq, steps, warmup, gradientCheckpointing: c.ckpt !== "off"});
        const m: Measured = {index, peakBytes: t.peakBytes, tokensPerSecond: t.tokensPerSecond};
        console.log(JSON.stringify(m));
    });
}

/** runs a group in child processes: after a failed case, a fresh process goes on with the next */
function runGroup(group: Group): Measured[] {
    const out: Measured[] = [];
    let from = 0;
    while (from < group.cases.length) {
        const rest = {...group, cases: group.cases.slice(from)};
        const r = spawnSync(
            process.execPath,
            [...process.execArgv, fileURLToPath(import.meta.url), "--child", JSON.stringify(rest), ...process.argv.slice(2)],
            {
                encoding: "utf8",
                maxBuffer: 64 << 20
            }
        );
        const lines = r.stdout.split("\n").filter((l) => l.startsWith("{"));
        for (const l of lines) {
            const m = JSON.parse(l) as Measured;
            out.push({...m, index: m.index + from});
        }
        const done = lines.length;
        if (r.status === 0 && done === rest.cases.length) break;
        const why = (
            r.stderr
                .trim()
                .split("\n")
                .find((l) => /error|out of/i.test(l)) ??
            r.stderr.trim().split("\n").pop() ??
            ""
        ).slice(0, 200);
        out.push({index: from + done, peakBytes: null, tokensPerSecond: 0, error: why || `exit code ${r.status}`});
        from += done + 1;
    }
    return out;
}

const settingsOf = (mode: TrainMode, c: Case) => benchSettings(mode, c.batch, c.seq, c.ckpt);

async function main(): Promise<void> {
    const childArg = process.argv.indexOf("--child");
    if (childArg > 0) return child(JSON.parse(process.argv[childArg + 1]) as Group);

    const models = arg("models", device === "cpu" ? "tiny-qwen2" : "qwen2-0.5b,qwen2-1.5b,qwen2-7b").split(",");
    const modes = arg("modes", device === "cpu" ? "qlora" : "qlora,lora").split(",") as TrainMode[];
    const shapes = arg("shapes", device === "cpu" ? "1x32,2x16" : "1x512,4x512,1x4096,1x16384")
        .split(",")
        .map((s) => s.split("x").map(Number) as [number, number]);
    const ckpts = arg("ckpt", "on,off,offload").split(",") as Case["ckpt"][];
    const dir = arg("dir", "/tmp/models");
    const gpuInfo = device === "cuda" ? cudaAvailability().info?.devices[0] : undefined;
    const capacity = gpuInfo?.totalBytes ?? 80 * GiB;
    const spec = (gpuInfo && gpuByDeviceName(gpuInfo.name, gpuInfo.totalBytes)) ?? gpuByName("h100-80gb");
    console.log(
        `plan check on ${gpuInfo?.name ?? (device === "cpu" ? "the CPU (smoke run: no allocator peak)" : "?")}; ` +
            `speed predicted for ${spec.label}; ${warmup} warm-up and ${steps} timed steps a case`
    );

    const rows: string[] = [];
    const memErr: number[] = [],
        speedErr: number[] = [];
    for (const name of models) {
        const modelDir = name === "tiny-qwen2" ? DEFAULT_MODEL_DIR : await syntheticModel(dir, name);
        const cfg = await loadModelConfig(modelDir);
        for (const mode of modes) {
            for (const offload of [false, true]) {
                const cases: Case[] = [];
                for (const ckpt of ckpts.filter((c) => (c === "offload") === offload))
                    for (const [batch, seq] of shapes) cases.push({batch, seq, ckpt});
                const runnable: Case[] = [];
                const predicted = new Map<Case, ReturnType<typeof planDeviceMemory>>();
                for (const c of cases) {
                    const plan = planDeviceMemory(cfg, settingsOf(mode, c));
                    predicted.set(c, plan);
                    if (plan.totalBytes > capacity)
                        rows.push(
                            `| ${name} | ${mode} | ${c.batch}x${c.seq} | ${c.ckpt} | ${(plan.peakBytes / GiB).toFixed(2)} | skipped: ` +
                                `the plan's ${(plan.totalBytes / GiB).toFixed(1)} GiB exceed the GPU's ${(capacity / GiB).toFixed(1)} | | | | |`
                        );
                    else runnable.push(c);
                }
                if (runnable.length === 0) continue;
                const measured = runGroup({model: name, modelDir, mode, offload, cases: runnable});
                runnable.forEach((c, i) => {
                    const m = measured.find((x) => x.index === i);
                    const plan = predicted.get(c)!;
                    const speed = estimateSpeed(cfg, settingsOf(mode, c), mode === "qlora", spec).tokensPerSecond;
                    const pct = (p: number, x: number) => (100 * (p - x)) / x;
                    let cells: string;
                    if (!m || m.error) cells = `failed: ${m?.error ?? "no result"} | | | |`;
                    else {
                        const memPct = m.peakBytes === null ? null : pct(plan.peakBytes, m.peakBytes);
                        const speedPct = device === "cuda" ? pct(speed, m.tokensPerSecond) : null;
                        if (memPct !== null) memErr.push(memPct);
                        if (speedPct !== null) speedErr.push(speedPct);
                        cells =
                            `${m.peakBytes === null ? "-" : (m.peakBytes / GiB).toFixed(2)} | ${memPct === null ? "-" : memPct.toFixed(1)} | ` +
                            `${Math.round(speed)} | ${Math.round(m.tokensPerSecond)} | ${speedPct === null ? "-" : speedPct.toFixed(1)}`;
                    }
                    rows.push(
                        `| ${name} | ${mode} | ${c.batch}x${c.seq} | ${c.ckpt} | ${(plan.peakBytes / GiB).toFixed(2)} | ${cells} |`
                    );
                    console.log(rows[rows.length - 1]);
                });
            }
        }
    }
    console.log(
        "\n| model | method | batch x length | checkpointing | predicted peak GiB | measured peak GiB | error % | " +
            "predicted tokens/s | measured tokens/s | error % |"
    );
    console.log("|---|---|---|---|---|---|---|---|---|---|");
    for (const r of rows) console.log(r);
    const worst = (xs: number[]) => (xs.length ? Math.max(...xs.map(Math.abs)).toFixed(1) : "-");
    console.log(
        `\npeak memory: ${memErr.filter((e) => Math.abs(e) <= 10).length} of ${memErr.length} within 10% (worst ${worst(memErr)}%); ` +
            `tokens/s: ${speedErr.filter((e) => Math.abs(e) <= 25).length} of ${speedErr.length} within 25% (worst ${worst(speedErr)}%)`
    );
}

await main();
