// Issue 8, training's output folder (findings 1 and 5): one run at a time (a lock, refused while held, taken over
// when stale), never over an earlier run without resume_from_checkpoint or overwrite_output_dir, and
// overwrite_output_dir removes only what a run wrote.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdirSync, readdirSync, readFileSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {
    adapterBytes,
    exists,
    expectError,
    metrics,
    qlora,
    qloraAsync,
    scratch,
    TINY,
    treeHash,
    waitFor
} from "./helpers/harden-train.js";
import {MODEL_DIR} from "./helpers/paths.js";

const tmp = scratch("harden-train-outputs");

test("a second run into a folder in use is refused naming the first; the first finishes with an intact final/", async () => {
    const out = path.join(tmp, "busy");
    const first = qloraAsync(tmp, "train", ...TINY, "--max_steps", "3", "--output_dir", out);
    // hold the first run still once it has the folder, so the second surely meets it at work
    await waitFor(() => exists(path.join(out, ".qlora.lock")));
    first.child.kill("SIGSTOP");
    try {
        const second = qlora(tmp, "train", ...TINY, "--max_steps", "2", "--output_dir", out);
        expectError(
            second,
            `output_dir is in use by qlora train (pid ${first.child.pid}`,
            "wait for it or choose another output_dir"
        );
        const forced = qlora(tmp, "train", ...TINY, "--max_steps", "2", "--output_dir", out, "--overwrite_output_dir", "true");
        expectError(forced, "in use by qlora train");
    } finally {
        first.child.kill("SIGCONT");
    }
    const r = await first.done;
    assert.equal(r.code, 0, r.stderr);
    assert.ok(adapterBytes(path.join(out, "final")).length > 0);
    const recs = metrics(out);
    assert.equal(recs.filter((x) => x.type === "start").length, 1, "metrics.jsonl holds one run");
    assert.deepEqual(
        recs.filter((x) => x.type === "train").map((x) => x.step),
        [1, 2, 3]
    );
    assert.ok(!exists(path.join(out, ".qlora.lock")), "the lock is released");
});

test("a lock left by a dead process is taken over", () => {
    const out = path.join(tmp, "stale");
    mkdirSync(out);
    const dead = spawnSync(process.execPath, ["-e", ""]).pid!;
    writeFileSync(
        path.join(out, ".qlora.lock"),
        JSON.stringify({
            pid: dead,
            hostname: os.hostname(),
            started: "2020-01-01T00:00:00.000Z",
            command: "qlora train",
            argv: "",
            token: "ef".repeat(16),
            boot_id: null,
            start_ticks: null
        })
    );
    const r = qlora(tmp, "train", ...TINY, "--max_steps", "1", "--output_dir", out);
    assert.equal(r.code, 0, r.stderr);
    assert.ok(exists(path.join(out, "final", "adapter_model.safetensors")));
    assert.ok(!exists(path.join(out, ".qlora.lock")));
});

test("an earlier run is neither continued nor replaced unless asked; overwrite_output_dir removes only the run's files", () => {
    const out = path.join(tmp, "finished");
    assert.equal(qlora(tmp, "train", ...TINY, "--max_steps", "3", "--save_steps", "1", "--output_dir", out).code, 0);
    writeFileSync(path.join(out, "notes.txt"), "the user's own file");
    mkdirSync(path.join(out, "plots"));
    writeFileSync(path.join(out, "plots", "loss.png"), "png");
    const before = treeHash(out);
    const again = qlora(tmp, "train", ...TINY, "--max_steps", "2", "--output_dir", out);
    expectError(
        again,
        "holds an earlier run (checkpoint-1, checkpoint-2, checkpoint-3, final",
        "--resume_from_checkpoint true to continue it, --overwrite_output_dir true to replace it"
    );
    assert.deepEqual(treeHash(out), before, "every file is unchanged");

    const replaced = qlora(
        tmp,
        "train",
        ...TINY,
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--output_dir",
        out,
        "--overwrite_output_dir",
        "true"
    );
    assert.equal(replaced.code, 0, replaced.stderr);
    const names = readdirSync(out).sort();
    assert.deepEqual(names, [
        ".qlora.json",
        "checkpoint-1",
        "checkpoint-2",
        "final",
        "metrics.jsonl",
        "notes.txt",
        "plots",
        "report.html"
    ]);
    assert.equal(readFileSync(path.join(out, "notes.txt"), "utf8"), "the user's own file");
    assert.equal(readFileSync(path.join(out, "plots", "loss.png"), "utf8"), "png");
    const recs = metrics(out);
    assert.equal(recs.filter((x) => x.type === "start").length, 1);
    assert.deepEqual(
        recs.filter((x) => x.type === "train").map((x) => x.step),
        [1, 2],
        "only the new run's records"
    );
});

test("output_dir: a folder of other files, the model folder or a dataset is refused before anything is written", () => {
    const foreign = path.join(tmp, "foreign");
    mkdirSync(foreign);
    writeFileSync(path.join(foreign, "thesis.tex"), "x");
    const before = treeHash(foreign);
    expectError(
        qlora(tmp, "train", ...TINY, "--max_steps", "1", "--output_dir", foreign, "--overwrite_output_dir", "true"),
        "output_dir is not empty and was not written by qlora (thesis.tex)"
    );
    assert.deepEqual(treeHash(foreign), before);
    expectError(qlora(tmp, "train", ...TINY, "--max_steps", "1", "--output_dir", MODEL_DIR), "output_dir is the model folder");
    const data = path.join(tmp, "data.jsonl");
    writeFileSync(data, '{"text": "hello world"}\n');
    expectError(
        qlora(tmp, "train", ...TINY, "--max_steps", "1", "--dataset", data, "--output_dir", tmp),
        "output_dir contains the training dataset"
    );
});
