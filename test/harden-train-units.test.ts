// Issue 8, training (unit level): the config schema's bounds, the resume rule's key classes, the divergence
// message, the trainer's loops over a million rows, and the output folder lock (in-process and across processes).
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawn, spawnSync} from "node:child_process";
import {existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {resolveTrainConfig, TRAIN_CONFIG_KEYS} from "../src/api/train-config.js";
import {acquireFolderLock, LOCK_FILE} from "../src/io/lock.js";
import {divergenceMessage, longestRow} from "../src/train/trainer.js";
import {compareTrainingArgs, dataFingerprint, RESUME_KEY_CLASSES, trainingArgsOf} from "../src/train/training-args.js";
import type {TokenizedRow} from "../src/data/index.js";
import {REPO_ROOT} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-harden-units-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

test("the schema refuses values that make training silently wrong, naming the key", () => {
    const bad: [Record<string, unknown>, RegExp][] = [
        [{adam_epsilon: 0}, /adam_epsilon/],
        [{adam_beta1: 1}, /adam_beta1/],
        [{adam_beta2: -0.1}, /adam_beta2/],
        [{lora_dropout: 1}, /lora_dropout/],
        [{lora_alpha: 0}, /lora_alpha/],
        [{lora_alpha: 1e308}, /lora_alpha: 1e\+308 with r 16 scales the LoRA update by 6\.25e\+306, past the 65536/],
        [{lora_alpha: 70000, r: 1}, /lora_alpha: 70000 with r 1 scales the LoRA update by 7\.00e\+4/],
        [{r: 0}, /\br\b/],
        [{warmup_steps: 2.5}, /warmup_steps: expected an integer step count, or a ratio/],
        [{logging_steps: 1.5}, /logging_steps/],
        [{save_steps: 0}, /save_steps/],
        [{eval_steps: -1}, /eval_steps/],
        [{max_steps: 0}, /max_steps: expected -1/],
        [{max_steps: -2}, /max_steps/],
        [{max_steps: 1.5}, /max_steps/],
        [{optim: "sgd"}, /optim/],
        [{lr_scheduler_type: "cosine_restarts"}, /lr_scheduler_type/],
        [{resume_override: ["r"]}, /resume_override: r defines the adapter or the data order/],
        [{resume_override: ["logging_steps"]}, /resume_override: logging_steps needs no override/],
        [{resume_override: ["learning_rat"]}, /resume_override: unknown key "learning_rat"/]
    ];
    for (const [input, message] of bad) assert.throws(() => resolveTrainConfig(input), message, JSON.stringify(input));
    // ratios in (0, 1) stay valid (transformers reads them as a fraction of the total steps)
    const ok = resolveTrainConfig({
        warmup_steps: 0.1,
        logging_steps: 0.25,
        save_steps: 20,
        max_steps: -1,
        resume_override: ["learning_rate", "max_steps"],
        overwrite_output_dir: true
    });
    assert.deepEqual(ok.resume_override, ["learning_rate", "max_steps"]);
    assert.equal(ok.overwrite_output_dir, true);
});

test("every config key has a resume class, and the classes are the issue's", () => {
    const classified = Object.keys(RESUME_KEY_CLASSES).sort();
    assert.deepEqual(classified, TRAIN_CONFIG_KEYS.filter((k) => k !== "task_type").sort());
    for (const k of [
        "model",
        "r",
        "lora_alpha",
        "target_modules",
        "use_dora",
        "load_in_4bit",
        "optim",
        "dataset",
        "max_seq_length",
        "packing",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "seed"
    ] as const)
        assert.equal(RESUME_KEY_CLASSES[k], "fixed", k);
    for (const k of ["max_steps", "learning_rate", "max_grad_norm", "weight_decay", "lr_scheduler_type", "warmup_ratio"] as const)
        assert.equal(RESUME_KEY_CLASSES[k], "override", k);
    for (const k of [
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "eval_dataset",
        "device",
        "threads",
        "output_dir",
        "resume_from_checkpoint"
    ] as const)
        assert.equal(RESUME_KEY_CLASSES[k], "free", k);
});

test("compareTrainingArgs sorts changes into fixed, not named, and overridden", () => {
    const base = {...resolveTrainConfig({}), model: "/m", dataset: "/d.json", eval_dataset: null};
    const saved = trainingArgsOf(base, {rows: 1, tokens: 2, hash: "x"});
    const changed = {
        ...base,
        r: 8,
        learning_rate: 1e-3,
        max_steps: 50,
        logging_steps: 1,
        target_modules: [...(base.target_modules as string[])].reverse(),
        resume_override: ["max_steps"]
    };
    const diff = compareTrainingArgs(saved, changed);
    assert.deepEqual(
        diff.fixed.map((c) => [c.key, c.saved, c.now]),
        [["r", 16, 8]]
    );
    assert.deepEqual(
        diff.notNamed.map((c) => c.key),
        ["learning_rate"]
    );
    assert.deepEqual(
        diff.overridden.map((c) => [c.key, c.saved, c.now]),
        [["max_steps", -1, 50]]
    );
});

test("the divergence message names what was checked: model or data before any update, the optimization after", () => {
    const facts = {
        what: "loss" as const,
        value: NaN,
        step: 1,
        firstStepHere: 1,
        resumedFrom: null,
        adapterFinite: true,
        learningRate: 2e-4,
        maxGradNorm: 1
    };
    const first = divergenceMessage(facts);
    assert.match(first, /before any update/);
    assert.match(first, /not the learning rate/);
    assert.match(first, /model files/);
    assert.doesNotMatch(first, /lower learning_rate/);
    const resumedBad = divergenceMessage({
        ...facts,
        step: 7,
        firstStepHere: 7,
        resumedFrom: "out/checkpoint-6",
        adapterFinite: false
    });
    assert.match(resumedBad, /out\/checkpoint-6 are not finite/);
    assert.match(resumedBad, /earlier checkpoint/);
    const later = divergenceMessage({...facts, what: "gradient norm", value: Infinity, step: 5, adapterFinite: false});
    assert.match(later, /the gradient norm is Infinity at step 5: the update of step 4 made the adapter weights non-finite/);
    assert.match(later, /lower learning_rate \(now 0.0002\)/);
    assert.match(divergenceMessage({...facts, step: 5}), /training diverged.*lower learning_rate/);
});

test("the trainer's loops take a million rows (no spread into a call)", () => {
    const ids = Int32Array.from([1, 2, 3]),
        labels = Int32Array.from([-100, 2, 3]);
    const rows: TokenizedRow[] = Array.from({length: 1_000_000}, () => ({inputIds: ids, labels}));
    rows[777_777] = {inputIds: new Int32Array(9), labels: new Int32Array(9)};
    assert.equal(longestRow(rows), 9);
    const fp = dataFingerprint(rows);
    assert.equal(fp.rows, 1_000_000);
    assert.equal(fp.tokens, 999_999 * 3 + 9);
    // the fingerprint sees a change of one token
    const other = rows.slice();
    other[5] = {inputIds: Int32Array.from([1, 2, 4]), labels};
    assert.notEqual(dataFingerprint(other).hash, fp.hash);
});

test("the folder lock: refused while held (naming the holder), free again after release", async () => {
    const dir = mkdtempSync(path.join(tmp, "lock-"));
    const first = await acquireFolderLock(dir, "qlora train", "output_dir");
    await assert.rejects(
        acquireFolderLock(dir, "qlora train", "output_dir"),
        new RegExp(
            `output_dir is in use by qlora train \\(pid ${process.pid}, started .*\\); wait for it or choose another output_dir`
        )
    );
    await first.release();
    assert.ok(!existsSync(path.join(dir, LOCK_FILE)));
    const again = await acquireFolderLock(dir, "qlora train", "output_dir");
    await again.release();
});

test("a stale lock (a dead pid, or this pid from an earlier process) is taken over; another host's is not", async () => {
    const dir = mkdtempSync(path.join(tmp, "stale-"));
    const dead = spawnSync(process.execPath, ["-e", ""]).pid!;
    const lock = (pid: number, hostname = os.hostname()) =>
        writeFileSync(
            path.join(dir, LOCK_FILE),
            JSON.stringify({
                pid,
                hostname,
                started: "2020-01-01T00:00:00.000Z",
                command: "qlora train",
                argv: "",
                token: "ab".repeat(16),
                boot_id: null,
                start_ticks: null
            })
        );
    for (const pid of [dead, process.pid]) {
        lock(pid);
        const taken = await acquireFolderLock(dir, "qlora train", "output_dir");
        assert.equal(JSON.parse(readFileSync(path.join(dir, LOCK_FILE), "utf8")).token, taken.owner.token);
        await taken.release();
    }
    lock(dead, "another-host");
    await assert.rejects(
        acquireFolderLock(dir, "qlora train", "output_dir"),
        /in use by qlora train \(pid \d+ on host another-host/
    );
});

test("a lock file that is not qlora's (garbage, a link) is refused with what to do, at once", async () => {
    const dir = mkdtempSync(path.join(tmp, "garbage-"));
    writeFileSync(path.join(dir, LOCK_FILE), "not json");
    const started = Date.now();
    await assert.rejects(
        acquireFolderLock(dir, "qlora train", "output_dir"),
        /output_dir has a lock file that cannot be read \(not a qlora lock file\); if no qlora process is using output_dir, remove .*\.qlora\.lock/
    );
    rmSync(path.join(dir, LOCK_FILE));
    symlinkSync(path.join(dir, "nowhere"), path.join(dir, LOCK_FILE));
    await assert.rejects(acquireFolderLock(dir, "qlora train", "output_dir"), /a symbolic link, not a qlora lock file/);
    assert.ok(Date.now() - started < 5000);
});

test("processes racing to take over one stale lock: exactly one wins", async () => {
    const dir = mkdtempSync(path.join(tmp, "race-"));
    const dead = spawnSync(process.execPath, ["-e", ""]).pid!;
    writeFileSync(
        path.join(dir, LOCK_FILE),
        JSON.stringify({
            pid: dead,
            hostname: os.hostname(),
            started: "2020-01-01T00:00:00.000Z",
            command: "qlora train",
            argv: "",
            token: "cd".repeat(16),
            boot_id: null,
            start_ticks: null
        })
    );
    const go = Date.now() + 4000; // every racer starts at this time (spawning them takes a while)
    const script = `import {acquireFolderLock} from ${JSON.stringify(path.join(REPO_ROOT, "src", "io", "lock.ts"))};
        while (Date.now() < ${go}) {}
        try { const l = await acquireFolderLock(${JSON.stringify(dir)}, "qlora train", "output_dir");
              console.log("won"); await new Promise((r) => setTimeout(r, 3000)); await l.release(); }
        catch (e) { console.log(/in use/.test(e.message) ? "refused" : "error " + e.message); }`;
    const file = path.join(tmp, "racer.mts");
    writeFileSync(file, script);
    const results = await Promise.all(
        Array.from(
            {length: 5},
            () =>
                new Promise<string>((resolve) => {
                    const child = spawn(process.execPath, ["--import", "tsx", file], {cwd: REPO_ROOT});
                    let out = "";
                    child.stdout.on("data", (d) => {
                        out += d;
                    });
                    child.on("exit", () => resolve(out.trim()));
                })
        )
    );
    assert.equal(results.filter((r) => r === "won").length, 1, results.join(", "));
    assert.equal(results.filter((r) => r === "refused").length, 4, results.join(", "));
    assert.ok(!existsSync(path.join(dir, LOCK_FILE)), "the winner released the lock");
});
