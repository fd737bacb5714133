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
