// The train config: defaults, file < flags precedence, typed flags, typo suggestions.
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {closestKey, loadTrainConfig, parseFlags, resolveTrainConfig} from "../src/api/train-config.js";
import {REPO_ROOT} from "./helpers/paths.js";

test("examples/qlora.yaml spells out exactly the defaults", async () => {
    const fromFile = await loadTrainConfig(path.join(REPO_ROOT, "examples", "qlora.yaml"), []);
    assert.deepEqual(fromFile, resolveTrainConfig({}));
});

test("flags override the file, the file overrides the defaults", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-cfg-"));
    try {
        const file = path.join(dir, "c.yaml");
        writeFileSync(file, "learning_rate: 1e-5\nr: 8\ntarget_modules: [q_proj, v_proj]\npacking: true\n");
        const c = await loadTrainConfig(file, ["--r", "32", "--max-steps", "7", "--bf16", "false", "--gradient_checkpointing"]);
        assert.equal(c.learning_rate, 1e-5);
        assert.equal(c.r, 32);
        assert.equal(c.max_steps, 7);
        assert.equal(c.bf16, false);
        assert.equal(c.gradient_checkpointing, true);
        assert.equal(c.packing, true);
        assert.deepEqual(c.target_modules, ["q_proj", "v_proj"]);
        assert.equal(c.lora_alpha, 32, "a default");
        const json = path.join(dir, "c.json");
        writeFileSync(json, JSON.stringify({optim: "adamw_torch", warmup_steps: 5}));
        const j = await loadTrainConfig(json, []);
        assert.equal(j.optim, "adamw_torch");
        assert.equal(j.warmup_steps, 5);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});

test("flag values are typed by the schema", () => {
    assert.deepEqual(
        parseFlags(["--target_modules", "q_proj,k_proj", "--lora_dropout=0.1", "--resume_from_checkpoint", "out/checkpoint-5"]),
        {target_modules: ["q_proj", "k_proj"], lora_dropout: 0.1, resume_from_checkpoint: "out/checkpoint-5"}
    );
    assert.deepEqual(parseFlags(["--target_modules", "all-linear"]), {target_modules: "all-linear"});
    assert.deepEqual(parseFlags(["--target_modules", ".*\\.(q|v)_proj"]), {target_modules: ".*\\.(q|v)_proj"});
    assert.deepEqual(parseFlags(["--save_total_limit", "null", "--bias", "none"]), {save_total_limit: null, bias: "none"});
});

test("bad keys and values name the key and the closest valid one", () => {
    assert.equal(closestKey("learning_rat"), "learning_rate");
    assert.equal(closestKey("lora_alph"), "lora_alpha");
    assert.equal(closestKey("batch_size"), "per_device_train_batch_size");
    assert.throws(
        () => resolveTrainConfig({gradient_accumulation: 4}),
        /unknown key "gradient_accumulation"; did you mean "gradient_accumulation_steps"/
    );
    assert.throws(() => resolveTrainConfig({max_steps: "ten"}), /max_steps: .*"ten"/);
    assert.throws(() => resolveTrainConfig({bnb_4bit_quant_type: "nf8"}), /bnb_4bit_quant_type/);
    assert.throws(() => parseFlags(["--lr", "1e-4"]), /unknown option --lr/);
});

test("keys from the Python tools: renamed, accepted with a notice, or refused with what to do; never ignored", async () => {
    const notices: string[] = [];
    const c = resolveTrainConfig(
        {
            max_length: 256,
            evaluation_strategy: "no",
            report_to: "wandb",
            torch_dtype: "bfloat16",
            trust_remote_code: false,
            push_to_hub: false,
            logging_dir: "./logs",
            dataloader_num_workers: 4
        },
        "cfg.yaml",
        notices
    );
    assert.equal(c.max_seq_length, 256);
    assert.equal(c.eval_strategy, "no");
    assert.deepEqual(
        notices.map((n) => n.split(" ")[0]),
        ["report_to", "torch_dtype", "logging_dir", "dataloader_num_workers"]
    );
    assert.match(notices[0], /has no effect: qlora logs to metrics\.jsonl/);
    // report_to none is what users write to turn logging off: nothing to say
    const quiet: string[] = [];
    resolveTrainConfig({report_to: "none"}, "x", quiet);
    assert.deepEqual(quiet, []);
    for (const [input, message] of [
        [{trust_remote_code: true}, /never runs code from a model folder/],
        [{formatting_func: "fmt"}, /Python function; describe the prompt with template/],
        [{push_to_hub: true}, /huggingface-cli upload/],
        [{neftune_noise_alpha: 5}, /NEFTune\) is not implemented/],
        [{load_best_model_at_end: true}, /pick a checkpoint-N by its eval_loss/],
        [{torch_dtype: "int8"}, /torch_dtype must be auto, bfloat16, float16 or float32/],
        [{max_length: 128, max_seq_length: 256}, /max_length and max_seq_length mean the same setting and disagree/]
    ] as const)
        assert.throws(() => resolveTrainConfig(input as Record<string, unknown>, "cfg.yaml"), message, JSON.stringify(input));
    // flags take them too
    const flagged: string[] = [];
    const f = await loadTrainConfig(null, ["--max_length", "64", "--report_to", "tensorboard"], flagged);
    assert.equal(f.max_seq_length, 64);
    assert.equal(flagged.length, 1);
});

test("typo suggestions only when the key is close: no 'did you mean r' for report_to", () => {
    assert.equal(closestKey("learning_rat"), "learning_rate");
    assert.equal(closestKey("repor_to"), "report_to");
    assert.equal(closestKey("lora_dropuot"), "lora_dropout");
    for (const far of ["xyz", "lora_r", "trust_code"]) assert.equal(closestKey(far), null, far);
    assert.throws(
        () => parseFlags(["--per_device_batch_size", "2"]),
        /unknown option --per_device_batch_size; did you mean --per_device_(train|eval)_batch_size\?/
    );
});
