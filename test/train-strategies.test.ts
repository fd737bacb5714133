// save_strategy and eval_strategy "no" (TrainingArguments' names): no checkpoint folders, no evaluation; the final
// adapter is written either way.
import {test} from "node:test";
import assert from "node:assert/strict";
import {existsSync, mkdtempSync, readdirSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {fineTune} from "../src/api/train.js";

test('save_strategy "no" writes only the final adapter; eval_strategy "no" skips the example eval split', async () => {
    const out = mkdtempSync(path.join(os.tmpdir(), "qlora-strategies-"));
    try {
        const notices: string[] = [];
        await fineTune(
            {
                output_dir: out,
                max_steps: 3,
                save_steps: 1,
                logging_steps: 1,
                max_seq_length: 48,
                per_device_train_batch_size: 1,
                r: 2,
                save_strategy: "no",
                eval_strategy: "no"
            },
            {onWarning: (m) => notices.push(m)}
        );
        assert.deepEqual(
            readdirSync(out).filter((n) => n.startsWith("checkpoint-")),
            []
        );
        assert.ok(existsSync(path.join(out, "final", "adapter_model.safetensors")));
        const records = readFileSync(path.join(out, "metrics.jsonl"), "utf8")
            .trim()
            .split("\n")
            .map((l) => JSON.parse(l) as {type: string});
        assert.equal(records.filter((r) => r.type === "train").length, 3);
        assert.equal(records.filter((r) => r.type === "eval").length, 0);
    } finally {
        rmSync(out, {recursive: true, force: true});
    }
});

test("train_loss is the mean of the run's step losses (transformers' meaning); last_loss is the last step's", async () => {
    const out = mkdtempSync(path.join(os.tmpdir(), "qlora-trainloss-"));
    try {
        const result = await fineTune({
            output_dir: out,
            max_steps: 4,
            logging_steps: 1,
            max_seq_length: 48,
            per_device_train_batch_size: 1,
            learning_rate: 1e-3,
            r: 2,
            save_strategy: "no"
        });
        const records = readFileSync(path.join(out, "metrics.jsonl"), "utf8")
            .trim()
            .split("\n")
            .map((l) => JSON.parse(l) as {type: string; loss?: number; train_loss?: number; last_loss?: number});
        // logging_steps 1: each train record is one step's loss (rounded to 4 decimals in the log)
        const losses = records.filter((r) => r.type === "train").map((r) => r.loss!);
        assert.equal(losses.length, 4);
        const mean = losses.reduce((a, b) => a + b, 0) / 4;
        assert.ok(Math.abs(result.trainLoss - mean) < 1e-3, `${result.trainLoss} vs ${mean}`);
        assert.ok(Math.abs(result.lastLoss - losses[3]) < 1e-4);
        assert.notEqual(Number(result.trainLoss.toFixed(4)), Number(result.lastLoss.toFixed(4)));
        const end = records[records.length - 1];
        assert.equal(end.type, "end");
        assert.equal(end.train_loss, result.trainLoss);
        assert.equal(end.last_loss, result.lastLoss);
    } finally {
        rmSync(out, {recursive: true, force: true});
    }
});
