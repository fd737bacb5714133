// Data-parallel training end to end on the CPU: `qlora train --nproc_per_node N` with the embedded tiny model.
// 2 and 3 ranks give the 1-process run with the same global batch (losses, gradient norms, the final adapter,
// dropout on); a 2-rank checkpoint resumes on 1 process; a rank killed mid-run ends the command naming it, with
// only complete checkpoints left; Ctrl+C reaches every rank and rank 0 saves one checkpoint.
import {test} from "node:test";
import assert from "node:assert/strict";
import {cpSync, readdirSync, readFileSync, rmSync} from "node:fs";
import path from "node:path";
import {exists, metrics, qlora, qloraAsync, scratch, TINY, waitFor} from "./helpers/harden-train.js";

const tmp = scratch("parallel-train");
// one global micro-batch of 6 rows a step; fp32 AdamW so that the comparison is of the gradients, not of 8-bit states
const RUN = [...TINY, "--max_steps", "3", "--save_steps", "2", "--lora_dropout", "0.1", "--optim", "adamw_torch"];
const withBatch = (b: number) => RUN.map((a, i) => (RUN[i - 1] === "--per_device_train_batch_size" ? String(b) : a));

function tensors(dir: string): Map<string, Float32Array> {
    const buf = readFileSync(path.join(dir, "adapter_model.safetensors"));
    const n = Number(buf.readBigUInt64LE(0));
    const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8")) as Record<
        string,
        {dtype: string; data_offsets: [number, number]}
    >;
    const out = new Map<string, Float32Array>();
    for (const [name, t] of Object.entries(header)) {
        if (name === "__metadata__") continue;
        assert.equal(t.dtype, "F32");
        const bytes = buf.subarray(8 + n + t.data_offsets[0], 8 + n + t.data_offsets[1]);
        out.set(name, new Float32Array(Uint8Array.from(bytes).buffer));
    }
    return out;
}

/** the largest |a - b| over every adapter tensor, relative to the largest |a| */
function adapterDiff(a: string, b: string): number {
    const x = tensors(a),
        y = tensors(b);
    assert.deepEqual([...x.keys()].sort(), [...y.keys()].sort());
    let diff = 0,
        scale = 0;
    for (const [name, t] of x) {
        const u = y.get(name)!;
        for (let i = 0; i < t.length; i++) {
            diff = Math.max(diff, Math.abs(t[i] - u[i]));
            scale = Math.max(scale, Math.abs(t[i]));
        }
    }
    return diff / scale;
}

const trainRecords = (dir: string) => metrics(dir).filter((r) => r.type === "train");
/** train records so far in a running run's metrics.jsonl (its last line may be half-written) */
function stepsLogged(dir: string): number {
    try {
        return readFileSync(path.join(dir, "metrics.jsonl"), "utf8")
            .split("\n")
            .filter((l) => l.includes('"type":"train"')).length;
    } catch {
        return 0;
    }
}

function sameRun(dir: string, reference: string): void {
    const a = trainRecords(dir),
        b = trainRecords(reference);
    assert.equal(a.length, b.length);
    a.forEach((r, i) => {
        assert.equal(r.loss, b[i].loss, `step ${r.step}: loss`);
        assert.equal(r.num_tokens, b[i].num_tokens, `step ${r.step}: tokens`);
        const g = Number(r.grad_norm),
            h = Number(b[i].grad_norm);
        assert.ok(Math.abs(g - h) <= 1e-5 * h, `step ${r.step}: grad_norm ${g} vs ${h}`);
    });
    // the final evaluation, its batches shared by the ranks: every token counted once, the loss of (nearly) the same
    // adapter
    const evals = (d: string) => metrics(d).filter((r) => r.type === "eval");
    const e = evals(dir),
        f = evals(reference);
    assert.ok(f.length > 0, "the run evaluates");
    assert.equal(e.length, f.length);
    e.forEach((r, i) => {
        assert.equal(r.eval_tokens, f[i].eval_tokens, `step ${r.step}: eval tokens`);
        const x = Number(r.eval_loss),
            y = Number(f[i].eval_loss);
        assert.ok(Math.abs(x - y) <= 1e-4 * y, `step ${r.step}: eval_loss ${x} vs ${y}`);
    });
    // fp32 sums in another order, through 3 AdamW updates (which divide by sqrt(v): small gradients move as much as large ones)
    const d = adapterDiff(path.join(dir, "final"), path.join(reference, "final"));
    assert.ok(d < 2e-4, `final adapters differ by ${d} (relative)`);
}

const one = path.join(tmp, "one");

test("2 and 3 ranks equal 1 process with the same global batch; a 2-rank checkpoint resumes on 1 process", () => {
    const r1 = qlora(tmp, "train", ...withBatch(6), "--output_dir", one);
    assert.equal(r1.code, 0, r1.stderr);
    const two = path.join(tmp, "two"),
        three = path.join(tmp, "three");
    const r2 = qlora(tmp, "train", ...withBatch(3), "--nproc_per_node", "2", "--output_dir", two);
    assert.equal(r2.code, 0, r2.stderr);
    assert.match(r2.stdout, /batch 3 x 2 ranks x 1 accumulation = 6/);
    assert.equal((r2.stdout.match(/^qlora train$/gm) ?? []).length, 1, "rank 0 alone reports");
    sameRun(two, one);
    const r3 = qlora(tmp, "train", ...withBatch(2), "--nproc_per_node=3", "--output_dir", three);
    assert.equal(r3.code, 0, r3.stderr);
    sameRun(three, one);

    // the 2-rank run's checkpoint-2 on 1 process of 6 rows: the same run
    const resumed = path.join(tmp, "resumed");
    cpSync(two, resumed, {recursive: true});
    rmSync(path.join(resumed, "checkpoint-3"), {recursive: true});
    rmSync(path.join(resumed, "final"), {recursive: true});
    const saved = JSON.parse(readFileSync(path.join(resumed, "checkpoint-2", "training_args.json"), "utf8"));
    assert.equal(saved.world_size, 2);
    // 3 rows on 1 process is another global batch: refused, saying so
    const refused = qlora(tmp, "train", ...withBatch(3), "--output_dir", resumed, "--resume_from_checkpoint", "true");
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /per_device_train_batch_size: 6 \(3 per device x 2 ranks\) → 3 \(3 per device x 1 rank\)/);
    const r = qlora(tmp, "train", ...withBatch(6), "--output_dir", resumed, "--resume_from_checkpoint", "true");
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /resumed from .*checkpoint-2 \(step 2\)/);
    sameRun(resumed, one);
});

/** the worker processes of a launcher, by rank (their RANK variable) */
function workers(launcherPid: number): Map<number, number> {
    const out = new Map<number, number>();
    for (const name of readdirSync("/proc")) {
        if (!/^\d+$/.test(name)) continue;
        try {
            const stat = readFileSync(`/proc/${name}/stat`, "utf8");
            const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
            if (ppid !== launcherPid) continue;
            const rank = /(?:^|\0)RANK=(\d+)\0/.exec(readFileSync(`/proc/${name}/environ`, "utf8"));
            if (rank) out.set(Number(rank[1]), Number(name));
        } catch {
            // a process that ended meanwhile
        }
    }
    return out;
}

const LONG = [...TINY, "--max_steps", "200", "--lora_dropout", "0.1"];

test("a rank killed mid-run ends the command with that rank named; the checkpoints left are complete", async () => {
    const out = path.join(tmp, "killed");
    const run = qloraAsync(tmp, "train", ...LONG, "--save_steps", "1", "--nproc_per_node", "2", "--output_dir", out);
    await waitFor(() => stepsLogged(out) >= 3);
    const ranks = workers(run.child.pid!);
    assert.equal(ranks.size, 2, `workers: ${[...ranks]}`);
    process.kill(ranks.get(1)!, "SIGKILL");
    const r = await run.done;
    assert.equal(r.code, 1, r.stderr);
    const last = r.stderr.trim().split("\n").pop()!;
    assert.match(
        last,
        new RegExp(`^error: rank 1 \\(pid ${ranks.get(1)}\\) was killed by SIGKILL; the other ranks were stopped`)
    );
    assert.ok(!exists(path.join(out, "final")));
    const checkpoints = readdirSync(out).filter((n) => n.startsWith("checkpoint-"));
    assert.ok(checkpoints.length >= 1);
    for (const c of checkpoints) {
        const files = readdirSync(path.join(out, c));
        for (const f of ["adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json", "rng_state.json"])
            assert.ok(files.includes(f), `${c} has ${f}`);
        assert.equal(JSON.parse(readFileSync(path.join(out, c, "trainer_state.json"), "utf8")).global_step, Number(c.slice(11)));
    }
    // what a kill may leave is the atomic writes' temporaries, which the next run in the folder recovers
    for (const n of readdirSync(out)) assert.ok(!n.startsWith("checkpoint-") || checkpoints.includes(n));
});

test("Ctrl+C reaches every rank: they stop after the same step, rank 0 saves one checkpoint, exit 130", async () => {
    const out = path.join(tmp, "stopped");
    const run = qloraAsync(tmp, "train", ...LONG, "--save_steps", "1000", "--nproc_per_node", "2", "--output_dir", out);
    await waitFor(() => stepsLogged(out) >= 2);
    const ranks = workers(run.child.pid!);
    run.child.kill("SIGINT");
    const r = await run.done;
    assert.equal(r.code, 130, r.stderr);
    assert.match(r.stdout, /SIGINT: finishing this step and saving a checkpoint/);
    const saved = readdirSync(out).filter((n) => n.startsWith("checkpoint-"));
    assert.equal(saved.length, 1, saved.join(", "));
    assert.match(r.stderr, new RegExp(`stopped by SIGINT after step ${saved[0].slice(11)}; saved .*${saved[0]}`));
    assert.ok(!exists(path.join(out, ".qlora.lock")), "the lock is released");
    for (const pid of ranks.values()) assert.throws(() => process.kill(pid, 0), "every rank has ended");
});
