// Issue 8, finding 14: SIGINT/SIGTERM during training finish the step, save a checkpoint and exit with 130/143;
// the resumed run ends with an adapter byte-equal to an uninterrupted one. A second signal exits at once.
import {test} from "node:test";
import assert from "node:assert/strict";
import {readdirSync, readFileSync} from "node:fs";
import path from "node:path";
import {adapterBytes, exists, qlora, qloraAsync, scratch, TINY, waitFor} from "./helpers/harden-train.js";

const tmp = scratch("harden-train-signal");
// save_steps beyond max_steps: the only checkpoint before the end is the one the signal makes
const RUN = [...TINY, "--max_steps", "12", "--save_steps", "1000", "--lora_dropout", "0.1", "--optim", "paged_adamw_8bit"];

function trainedSteps(dir: string): number {
    try {
        return readFileSync(path.join(dir, "metrics.jsonl"), "utf8")
            .split("\n")
            .filter((l) => l.includes('"type":"train"')).length;
    } catch {
        return 0;
    }
}

const checkpoints = (dir: string) => readdirSync(dir).filter((n) => n.startsWith("checkpoint-"));

test("SIGINT saves a checkpoint of the current step and exits 130; resuming gives a byte-equal adapter", async () => {
    const full = path.join(tmp, "full"),
        stopped = path.join(tmp, "stopped");
    const run = qloraAsync(tmp, "train", ...RUN, "--output_dir", stopped);
    await waitFor(() => trainedSteps(stopped) >= 2);
    run.child.kill("SIGINT");
    const r = await run.done;
    assert.equal(r.code, 130, r.stderr);
    assert.match(r.stdout, /SIGINT: finishing this step and saving a checkpoint/);
    const saved = checkpoints(stopped);
    assert.equal(saved.length, 1, saved.join(", "));
    const step = Number(saved[0].slice("checkpoint-".length));
    assert.ok(step >= 2 && step < 12, `stopped at step ${step}`);
    assert.match(
        r.stderr,
        new RegExp(
            `stopped by SIGINT after step ${step}; saved .*checkpoint-${step}\\. Resume with: ` +
                "qlora train .* --resume_from_checkpoint true"
        )
    );
    assert.ok(!exists(path.join(stopped, "final")), "the run did not finish");
    assert.ok(!exists(path.join(stopped, ".qlora.lock")), "the lock is released");

    const resumed = qlora(tmp, "train", ...RUN, "--output_dir", stopped, "--resume_from_checkpoint", "true");
    assert.equal(resumed.code, 0, resumed.stderr);
    const uninterrupted = qlora(tmp, "train", ...RUN, "--output_dir", full);
    assert.equal(uninterrupted.code, 0, uninterrupted.stderr);
    assert.ok(adapterBytes(path.join(stopped, "final")).equals(adapterBytes(path.join(full, "final"))), "byte-equal adapters");
});

test("SIGTERM exits 143 with a checkpoint; a second signal exits at once and releases the lock", async () => {
    const out = path.join(tmp, "term");
    const run = qloraAsync(tmp, "train", ...RUN, "--output_dir", out);
    await waitFor(() => trainedSteps(out) >= 1);
    run.child.kill("SIGTERM");
    const r = await run.done;
    assert.equal(r.code, 143, r.stderr);
    assert.equal(checkpoints(out).length, 1);

    const twice = path.join(tmp, "twice");
    const again = qloraAsync(tmp, "train", ...RUN, "--output_dir", twice);
    await waitFor(() => trainedSteps(twice) >= 1);
    again.child.kill("SIGINT");
    // the second signal once the first is being handled (two at once may reach the process as one)
    await waitFor(() => /finishing this step/.test(again.stdout()));
    again.child.kill("SIGINT");
    const r2 = await again.done;
    assert.equal(r2.code, 130, r2.stderr);
    assert.ok(!exists(path.join(twice, ".qlora.lock")), "the lock is released on the immediate exit too");
    // whatever the exit interrupted, the next run finds the folder usable
    const next = qlora(tmp, "train", ...RUN, "--max_steps", "1", "--output_dir", twice, "--overwrite_output_dir", "true");
    assert.equal(next.code, 0, next.stderr);
});
