// Issue 8, resuming a run (findings 7, 10, 12): every field read from a checkpoint is validated, a resume with
// changed settings is refused with the differences unless they are named in resume_override (and then the new
// value is really used), and a partial last line in metrics.jsonl loses only that line.
import {test} from "node:test";
import assert from "node:assert/strict";
import {cpSync, readFileSync, writeFileSync} from "node:fs";
import path from "node:path";
import {QloraError} from "../src/errors.js";
import {loadCheckpointState} from "../src/train/checkpoint.js";
import {expectError, metrics, qlora, scratch, TINY, treeHash} from "./helpers/harden-train.js";

const tmp = scratch("harden-train-resume");
// one finished run with a checkpoint at every step, shared by the tests (they work on copies)
const RUN = ["--max_steps", "2", "--save_steps", "1", "--lr_scheduler_type", "constant", "--learning_rate", "1e-3"];
const base = path.join(tmp, "base");
const baseRun = qlora(tmp, "train", ...TINY, ...RUN, "--output_dir", base);

function copyOfBase(name: string): string {
    const dir = path.join(tmp, name);
    cpSync(base, dir, {recursive: true});
    return dir;
}

function editJson(file: string, edit: (j: Record<string, unknown>) => void) {
    const j = JSON.parse(readFileSync(file, "utf8"));
    edit(j);
    writeFileSync(file, JSON.stringify(j, null, 2));
}

test("the base run trained", () => {
    assert.equal(baseRun.code, 0, baseRun.stderr);
});

test("each damaged trainer_state.json field is refused with one line naming the file and the field", async () => {
    const cases: [string, (s: Record<string, unknown>) => void, RegExp][] = [
        [
            "negative",
            (s) => {
                s.global_step = -50;
            },
            /global_step: expected an integer >= 0 \(got -50\)/
        ],
        [
            "string",
            (s) => {
                s.global_step = "two";
            },
            /global_step: expected number, received string \(got "two"\)/
        ],
        [
            "huge",
            (s) => {
                s.global_step = 1e12;
            },
            /global_step: 1000000000000 is not the step of the folder \(checkpoint-2\)/
        ],
        [
            "missing",
            (s) => {
                delete s.global_step;
            },
            /global_step: missing/
        ],
        [
            "fraction",
            (s) => {
                s.global_step = 1.5;
            },
            /global_step: expected an integer >= 0 \(got 1.5\)/
        ],
        [
            "accumulator",
            (s) => {
                (s.qlora_log_accumulator as Record<string, unknown>).lossSum = null;
            },
            /qlora_log_accumulator\.lossSum/
        ],
        [
            "history",
            (s) => {
                s.log_history = 7;
            },
            /log_history/
        ]
    ];
    for (const [name, edit, message] of cases) {
        const dir = copyOfBase(`state-${name}`);
        editJson(path.join(dir, "checkpoint-2", "trainer_state.json"), edit);
        const err = await loadCheckpointState(path.join(dir, "checkpoint-2")).then(
            () => null,
            (e: unknown) => e
        );
        assert.ok(err instanceof QloraError, `${name}: ${String(err)}`);
        assert.match(err.message, /checkpoint-2\/trainer_state\.json: /, name);
        assert.match(err.message, message, name);
        assert.match(err.message, /resume from an earlier one \(--resume_from_checkpoint .*checkpoint-1\)/, name);
        assert.equal(err.message.split("\n").length, 1);
    }
    // and through the CLI: exit 1, one line, and nothing in the folder changed
    const dir = copyOfBase("state-cli");
    editJson(path.join(dir, "checkpoint-2", "trainer_state.json"), (s) => {
        s.global_step = -50;
    });
    const before = treeHash(dir);
    expectError(
        qlora(tmp, "train", ...TINY, ...RUN, "--output_dir", dir, "--resume_from_checkpoint", "true"),
        "trainer_state.json: global_step",
        "earlier one"
    );
    assert.deepEqual(treeHash(dir), before);
});

test("the other state files are cross-checked: scheduler and optimizer steps, loader position, optimizer tensors", async () => {
    const cases: [string, string, (dir: string) => void, RegExp][] = [
        [
            "sched",
            "scheduler.json",
            (d) =>
                editJson(path.join(d, "scheduler.json"), (j) => {
                    j.step = 5;
                }),
            /scheduler\.json: step: 5 differs from trainer_state\.json's global_step 2/
        ],
        [
            "schedtype",
            "scheduler.json",
            (d) =>
                editJson(path.join(d, "scheduler.json"), (j) => {
                    j.type = "exotic";
                }),
            /scheduler\.json: type/
        ],
        [
            "rng",
            "rng_state.json",
            (d) =>
                editJson(path.join(d, "rng_state.json"), (j) => {
                    j.dropout = [0, 0, 0, 0];
                }),
            /rng_state\.json: dropout: the generator state cannot be all zeros/
        ],
        [
            "rngshape",
            "rng_state.json",
            (d) =>
                editJson(path.join(d, "rng_state.json"), (j) => {
                    (j.loader as Record<string, unknown>).rngState = [1, 2];
                }),
            /rng_state\.json: loader\.rngState/
        ],
        [
            "optstep",
            "optimizer.json",
            (d) =>
                editJson(path.join(d, "optimizer.json"), (j) => {
                    j.step = 9;
                }),
            /optimizer\.json: step: 9 differs/
        ],
        [
            "optnumel",
            "optimizer.safetensors",
            (d) =>
                editJson(path.join(d, "optimizer.json"), (j) => {
                    (j.params as Record<string, unknown>[])[0].numel = 3;
                }),
            /optimizer\.safetensors: tensor ".*" is .*, optimizer\.json needs/
        ]
    ];
    for (const [name, file, edit, message] of cases) {
        const dir = copyOfBase(`other-${name}`);
        edit(path.join(dir, "checkpoint-2"));
        const err = await loadCheckpointState(path.join(dir, "checkpoint-2")).then(
            () => null,
            (e: unknown) => e
        );
        assert.ok(err instanceof QloraError, `${name}: ${String(err)}`);
        assert.ok(err.message.includes(`checkpoint-2/${file}: `), `${name}: ${err.message}`);
        assert.match(err.message, message, name);
    }
    // the loader position must be where global_step ends with this data and batch size
    const err = await loadCheckpointState(path.join(base, "checkpoint-2"), {
        maxSteps: 2,
        batchesPerEpoch: 100,
        gradientAccumulationSteps: 2
    }).then(
        () => null,
        (e: unknown) => e
    );
    assert.match(String(err), /rng_state\.json: loader: the data position \(epoch 0, batch 2\) is not where step 2 ends/);
    const beyond = await loadCheckpointState(path.join(base, "checkpoint-2"), {
        maxSteps: 1,
        batchesPerEpoch: 100,
        gradientAccumulationSteps: 1
    }).then(
        () => null,
        (e: unknown) => e
    );
    assert.match(String(beyond), /beyond this run's 1 steps.*--resume_override max_steps/);
});

test("resume with changed settings is refused with the differences; an override named in resume_override is used", () => {
    const dir = copyOfBase("changed");
    const before = treeHash(dir);
    const ckpt1 = path.join(dir, "checkpoint-1");
    const refused = qlora(
        tmp,
        "train",
        ...TINY,
        ...RUN,
        "--output_dir",
        dir,
        "--resume_from_checkpoint",
        ckpt1,
        "--r",
        "8",
        "--learning_rate",
        "5e-4",
        "--per_device_train_batch_size",
        "2"
    );
    const err = expectError(
        refused,
        "checkpoint-1/training_args.json",
        "r: 16 → 8",
        "learning_rate: 0.001 → 0.0005",
        "per_device_train_batch_size: 1 → 2",
        "r, per_device_train_batch_size cannot change on resume",
        "start a new run",
        "--resume_override learning_rate"
    );
    assert.ok(!/max_steps|logging/.test(err), err);
    // learning_rate alone, not named: refused; named: accepted, and the logged lr of step 2 is the new one
    expectError(
        qlora(tmp, "train", ...TINY, ...RUN, "--output_dir", dir, "--resume_from_checkpoint", ckpt1, "--learning_rate", "5e-4"),
        "learning_rate: 0.001 → 0.0005",
        "name it in resume_override"
    );
    assert.deepEqual(treeHash(dir), before, "refused resumes change nothing");
    const ok = qlora(
        tmp,
        "train",
        ...TINY,
        ...RUN,
        "--output_dir",
        dir,
        "--resume_from_checkpoint",
        ckpt1,
        "--learning_rate",
        "5e-4",
        "--resume_override",
        "learning_rate",
        "--save_steps",
        "5"
    );
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /override\s+learning_rate: 0.001 -> 0.0005/);
    const lrs = metrics(dir)
        .filter((x) => x.type === "train")
        .map((x) => [x.step, x.learning_rate]);
    assert.deepEqual(
        lrs,
        [
            [1, 1e-3],
            [2, 5e-4]
        ],
        "step 1 from the first run, step 2 with the overridden rate"
    );
    const saved = JSON.parse(readFileSync(path.join(dir, "checkpoint-2", "training_args.json"), "utf8"));
    assert.equal(saved.config.learning_rate, 5e-4, "the new checkpoint records the setting it was made with");
});

test("a partial last line in metrics.jsonl (a kill mid-append) drops only that line on resume", () => {
    const dir = copyOfBase("partial");
    const file = path.join(dir, "metrics.jsonl");
    const lines = readFileSync(file, "utf8").trim().split("\n");
    const last = lines[lines.length - 1];
    writeFileSync(file, [...lines.slice(0, -1), last.slice(0, Math.floor(last.length / 2))].join("\n"));
    const r = qlora(tmp, "train", ...TINY, ...RUN, "--output_dir", dir, "--resume_from_checkpoint", "true");
    assert.equal(r.code, 0, r.stderr);
    assert.match(
        r.stdout,
        /metrics\.jsonl: dropped 1 line that is not a JSON record \(line \d+: cut short by a kill\?\); kept the other \d+/
    );
    const recs = metrics(dir);
    assert.equal(recs.filter((x) => x.type === "start").length, 1, "the start record is kept");
    assert.deepEqual(
        recs.filter((x) => x.type === "train").map((x) => x.step),
        [1, 2],
        "the earlier train records are kept"
    );
    assert.equal(recs[recs.length - 1].type, "end");
    assert.match(
        r.stdout,
        /done: 2 steps, train_loss \d+\.\d{4} \(mean\), last loss \d+\.\d{4}/,
        "a run resumed at its last step reports its last loss"
    );
});
