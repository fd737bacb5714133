// qlora train end to end: outputs, exact resume after SIGKILL, and bad input.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawn} from "node:child_process";
import {chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {DATASETS} from "./helpers/paths.js";
import {CLI, expectOneLineError, runCli, TSX} from "./helpers/cli.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-train-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

const FAST = [
    "--max_seq_length",
    "64",
    "--per_device_train_batch_size",
    "2",
    "--logging_steps",
    "1",
    "--lora_dropout",
    "0.1",
    "--r",
    "4",
    "--lora_alpha",
    "8"
];

const qlora = (...args: string[]) => runCli(args, {cwd: tmp});

const expectError = expectOneLineError;

test("a short QLoRA run writes checkpoints, metrics.jsonl, report.html and a PEFT adapter; the loss falls", () => {
    const out = path.join(tmp, "run");
    const r = qlora(
        "train",
        ...FAST,
        "--max_steps",
        "12",
        "--save_steps",
        "5",
        "--save_total_limit",
        "2",
        "--learning_rate",
        "1e-3",
        "--output_dir",
        out
    );
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+/);
    assert.match(r.stdout, /step 12\/12 \| loss [\d.]+ \| lr [\d.e+-]+ \| grad_norm [\d.]+ \| \d+ tok\/s/);
    // save_total_limit 2 keeps the two newest of checkpoint-5, -10, -12
    assert.deepEqual(
        readdirSync(out)
            .filter((n) => n.startsWith("checkpoint-"))
            .sort(),
        ["checkpoint-10", "checkpoint-12"]
    );
    for (const f of [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng_state.json",
        "trainer_state.json",
        "tokenizer.json",
        "tokenizer_config.json"
    ])
        assert.ok(existsSync(path.join(out, "checkpoint-12", f)), f);
    for (const f of ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"])
        assert.ok(existsSync(path.join(out, "final", f)), f);
    const records = readFileSync(path.join(out, "metrics.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
    const trainRecs = records.filter((x) => x.type === "train");
    assert.equal(trainRecs.length, 12);
    const evals = records.filter((x) => x.type === "eval");
    assert.ok(evals.length >= 2, "the example eval split is evaluated");
    console.log(`eval loss ${evals.map((e) => e.eval_loss.toFixed(3)).join(" -> ")}`);
    assert.ok(evals[evals.length - 1].eval_loss < evals[0].eval_loss - 0.5, "the held-out loss falls");
    const html = readFileSync(path.join(out, "report.html"), "utf8");
    assert.match(html, /uPlot/);
    assert.doesNotMatch(html, /<script[^>]+src=|<link[^>]+href="http/, "nothing is loaded from the network");
    assert.ok(html.includes(`"loss":[${trainRecs[0].loss}`), "the metrics are inlined");
});

test("a run killed with SIGKILL and resumed ends with an adapter bit-identical to an uninterrupted run", async () => {
    const args = [...FAST, "--max_steps", "30", "--save_steps", "3", "--optim", "paged_adamw_8bit", "--eval_steps", "7"];
    const full = path.join(tmp, "full"),
        killed = path.join(tmp, "killed");
    assert.equal(qlora("train", ...args, "--output_dir", full).code, 0);
    // start the same run and kill it once its second checkpoint exists
    const child = spawn(process.execPath, ["--import", TSX, CLI, "train", ...args, "--output_dir", killed], {
        cwd: tmp,
        stdio: "ignore"
    });
    const exited = new Promise<void>((resolve) => child.on("exit", () => resolve()));
    await new Promise<void>((resolve) => {
        const poll = setInterval(() => {
            if (existsSync(path.join(killed, "checkpoint-6"))) {
                clearInterval(poll);
                child.kill("SIGKILL");
                resolve();
            }
        }, 5);
    });
    await exited;
    assert.ok(!existsSync(path.join(killed, "final")), "the run was killed before it finished");
    for (const name of readdirSync(killed).filter((n) => n.startsWith("checkpoint-")))
        assert.ok(existsSync(path.join(killed, name, "trainer_state.json")), `${name} is complete`);
    const r = qlora("train", ...args, "--output_dir", killed, "--resume_from_checkpoint", "true");
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /resumed from/);
    const a = readFileSync(path.join(full, "final", "adapter_model.safetensors"));
    const b = readFileSync(path.join(killed, "final", "adapter_model.safetensors"));
    assert.ok(a.equals(b), "the adapters are bit-identical");
    const losses = (dir: string) =>
        readFileSync(path.join(dir, "metrics.jsonl"), "utf8")
            .trim()
            .split("\n")
            .map((l) => JSON.parse(l))
            .filter((x) => x.type === "train")
            .map((x) => `${x.step}:${x.loss}`);
    assert.deepEqual(losses(killed), losses(full), "the same loss curve");
});

test("bad input: a clear one-line error, exit 1, nothing left under a final name", () => {
    const bad = path.join(tmp, "bad.jsonl");
    writeFileSync(bad, '{"text": "fine"}\n{"text": broken}\n');
    expectError(qlora("train", "--dataset", bad, "--output_dir", path.join(tmp, "o1")), "bad.jsonl:2", /JSON/);
    const missing = path.join(tmp, "missing.json");
    writeFileSync(missing, JSON.stringify([{instruction: "x"}]));
    expectError(qlora("train", "--dataset", missing, "--output_dir", path.join(tmp, "o2")), "missing.json", "output");
    const empty = path.join(tmp, "empty.json");
    writeFileSync(empty, "[]");
    expectError(qlora("train", "--dataset", empty, "--output_dir", path.join(tmp, "o3")), "empty.json", /empty|no record/i);
    expectError(
        qlora("train", "--target_modules", "q_proj,qkv_proj", "--output_dir", path.join(tmp, "o4")),
        "qkv_proj",
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    );
    expectError(qlora("train", "--r", "0", "--output_dir", path.join(tmp, "o5")), /\br\b/, /positive/);
    expectError(qlora("train", "--learning_rat", "1e-4"), "learning_rat", "did you mean --learning_rate");
    const yaml = path.join(tmp, "cfg.yaml");
    writeFileSync(yaml, "max_steps: 2\nlora_alph: 16\n");
    expectError(qlora("train", yaml), "cfg.yaml", "lora_alph", 'did you mean "lora_alpha"');
    const locked = path.join(tmp, "locked");
    mkdirSync(locked);
    chmodSync(locked, 0o500);
    if (process.getuid?.() !== 0)
        // root writes anywhere; the message is checked with a path under a file instead
        expectError(qlora("train", "--max_steps", "1", "--output_dir", path.join(locked, "out")), "locked", "cannot be written");
    const file = path.join(tmp, "a-file");
    writeFileSync(file, "x");
    expectError(qlora("train", "--max_steps", "1", "--output_dir", path.join(file, "out")), "a-file", "cannot be written");
    const diverge = path.join(tmp, "diverge");
    const r = qlora(
        "train",
        "--max_steps",
        "30",
        "--learning_rate",
        "1e30",
        "--max_grad_norm",
        "0",
        "--optim",
        "adamw_torch",
        "--lr_scheduler_type",
        "constant",
        "--output_dir",
        diverge,
        ...FAST
    );
    expectError(r, /at step \d+/, "learning_rate");
    assert.ok(!existsSync(path.join(diverge, "final")), "no final adapter after a failed run");
});

test("alpaca_zh_demo trains with the seed template", () => {
    const out = path.join(tmp, "zh");
    const r = qlora(
        "train",
        "--dataset",
        path.join(DATASETS, "alpaca_zh_demo.json"),
        ...FAST,
        "--max_steps",
        "3",
        "--output_dir",
        out
    );
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /alpaca/);
});
