// fp16 / bf16 / bnb_4bit_compute_dtype are honoured or refused, never silently ignored.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import path from "node:path";
import {checkComputeDtype} from "../src/train/engine.js";
import {REPO_ROOT} from "./helpers/paths.js";

const base = {fp16: false, bf16: true, bnb_4bit_compute_dtype: "bfloat16", load_in_4bit: true};

test("the settings each engine computes with are accepted", () => {
    for (const device of ["cpu", "cuda"] as const) checkComputeDtype(device, base);
    checkComputeDtype("cpu", {...base, bf16: false});
    checkComputeDtype("cpu", {...base, bnb_4bit_compute_dtype: "float32"});
    // without 4-bit loading the quantization keys do not apply
    checkComputeDtype("cuda", {...base, load_in_4bit: false, bnb_4bit_compute_dtype: "float32"});
});

test("fp16 compute, and fp32 compute on the GPU, are refused with what to set instead", () => {
    for (const device of ["cpu", "cuda"] as const) {
        assert.throws(
            () => checkComputeDtype(device, {...base, fp16: true, bf16: false}),
            /fp16: true asks for fp16 compute.*set fp16: false, bf16: true/
        );
        assert.throws(
            () => checkComputeDtype(device, {...base, bnb_4bit_compute_dtype: "float16"}),
            /set bnb_4bit_compute_dtype: bfloat16/
        );
        assert.throws(() => checkComputeDtype(device, {...base, fp16: true}), /both true/);
    }
    assert.throws(() => checkComputeDtype("cuda", {...base, bf16: false}), /fp32 compute on the GPU/);
    assert.throws(
        () => checkComputeDtype("cuda", {...base, bnb_4bit_compute_dtype: "float32"}),
        /float32 is not implemented on the GPU/
    );
});

test("qlora train --fp16 true --bf16 false exits 1 with one line", () => {
    const r = spawnSync(
        process.execPath,
        [
            "--import",
            "tsx",
            path.join(REPO_ROOT, "src", "cli", "main.ts"),
            "train",
            "--fp16",
            "true",
            "--bf16",
            "false",
            "--device",
            "cpu",
            "--max_steps",
            "1",
            "--output_dir",
            path.join(REPO_ROOT, ".never-written")
        ],
        {encoding: "utf8", cwd: REPO_ROOT}
    );
    assert.equal(r.status, 1, r.stderr);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.match(r.stderr, /fp16 compute/);
});
