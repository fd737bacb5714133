// qlora export gguf / gguf-lora from the command line: a working export, and the failures a user meets (an adapter
// from another base model, an architecture llama.cpp cannot take, a full disk): one line naming the problem,
// exit code 1, and nothing (not even a partial file) under the output name.
import {before, test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {readGgufFileInfo} from "node-llama-cpp";
import {Rng} from "../src/backend/rng.js";
import {saveAdapter} from "../src/peft/adapter-files.js";
import {applyLora} from "../src/peft/inject.js";
import {DecoderModel} from "../src/model/decoder.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";
import {FIXTURES, MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";
import {expectOneLineError, runCli} from "./helpers/cli.js";

const CLI = path.join(REPO_ROOT, "src", "cli", "main.ts");
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-gguf-cli-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

const qlora = (...args: string[]) => runCli(args);

const expectError = expectOneLineError;

/** nothing under `file`'s name, and no temporary file beside it */
function assertNothingWritten(file: string) {
    assert.equal(existsSync(file), false, `${file} must not exist`);
    const dir = path.dirname(file);
    if (existsSync(dir))
        assert.deepEqual(
            readdirSync(dir).filter((f) => f.startsWith(path.basename(file))),
            []
        );
}

/** a copy of the embedded model with its config.json changed */
function modelWithConfig(name: string, change: (c: Record<string, unknown>) => void): string {
    const dir = path.join(tmp, name);
    mkdirSync(dir);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
        copyFileSync(path.join(MODEL_DIR, f), path.join(dir, f));
    const c = JSON.parse(readFileSync(path.join(dir, "config.json"), "utf8"));
    change(c);
    writeFileSync(path.join(dir, "config.json"), JSON.stringify(c));
    return dir;
}

const OTHER_ADAPTER = path.join(tmp, "other-adapter");

before(async () => {
    // an adapter trained on a smaller qwen2 (hidden 128, MLP 256): its shapes do not fit tiny-qwen2
    const otherBase = path.join(tmp, "other-base");
    await writeSyntheticCheckpoint(otherBase, {
        config: {
            architectures: ["Qwen2ForCausalLM"],
            model_type: "qwen2",
            vocab_size: 16384,
            hidden_size: 128,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            max_position_embeddings: 512,
            tie_word_embeddings: true
        }
    });
    const lora = applyLora(
        await DecoderModel.load(otherBase),
        {r: 8, lora_alpha: 16, target_modules: "all-linear"},
        {initRng: new Rng(1)}
    );
    await saveAdapter(OTHER_ADAPTER, lora);
});

test("export gguf writes a file llama.cpp reads, and says what it wrote", async () => {
    const out = path.join(tmp, "out", "tiny-q8_0.gguf");
    const r = qlora("export", "gguf", "--outtype", "q8_0", "--out", out);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /wrote .*tiny-q8_0\.gguf \(qwen2, q8_0\): 98 tensors \[Q8_0 57, F32 41\]/);
    const info = await readGgufFileInfo(out);
    assert.equal(info.metadata.general.architecture, "qwen2");
    const lora = path.join(tmp, "out", "adapter.gguf");
    const r2 = qlora("export", "gguf-lora", "--adapter", path.join(FIXTURES, "adapter"), "--out", lora, "--outtype", "f16");
    assert.equal(r2.code, 0, r2.stderr);
    assert.match(r2.stdout, /qwen2 LoRA, r 8, alpha 16\): 112 tensors/);
});

test("an unknown --outtype", () => {
    const out = path.join(tmp, "x.gguf");
    expectError(qlora("export", "gguf", "--outtype", "q4_0", "--out", out), "--outtype", "f16, q8_0, q4_k_m");
    expectError(
        qlora("export", "gguf-lora", "--adapter", path.join(FIXTURES, "adapter"), "--outtype", "q8_0", "--out", out),
        "f32 or f16"
    );
    assertNothingWritten(out);
});

test("an adapter trained on another base model: the first tensor whose shape differs is named", () => {
    const out = path.join(tmp, "merged.gguf");
    const tensor = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight";
    expectError(
        qlora("export", "gguf", "--adapter", OTHER_ADAPTER, "--out", out),
        tensor,
        "[8, 256]",
        "[8, 768]",
        "another base model"
    );
    assertNothingWritten(out);
    const lora = path.join(tmp, "other.gguf");
    expectError(qlora("export", "gguf-lora", "--adapter", OTHER_ADAPTER, "--out", lora), tensor, "another base model");
    assertNothingWritten(lora);
});

test("an adapter that trains biases cannot become a LoRA GGUF (merge it instead)", async () => {
    const dir = path.join(tmp, "bias-adapter");
    const lora = applyLora(await DecoderModel.load(MODEL_DIR), {r: 4, lora_alpha: 8, target_modules: ["q_proj"], bias: "all"});
    await saveAdapter(dir, lora);
    const out = path.join(tmp, "bias.gguf");
    expectError(qlora("export", "gguf-lora", "--adapter", dir, "--out", out), "trains biases", "qlora export gguf --adapter");
    assertNothingWritten(out);
});

test("architectures llama.cpp cannot take from qlora are refused before any weight is read", () => {
    const out = path.join(tmp, "arch.gguf");
    const classifier = modelWithConfig("classifier", (c) => {
        c.architectures = ["Qwen2ForSequenceClassification"];
    });
    expectError(
        qlora("export", "gguf", "--model", classifier, "--out", out),
        "config.json",
        "Qwen2ForSequenceClassification",
        "cannot be exported to GGUF"
    );
    const gemma = modelWithConfig("gemma", (c) => {
        c.model_type = "gemma";
        c.architectures = ["GemmaForCausalLM"];
    });
    expectError(qlora("export", "gguf", "--model", gemma, "--out", out), "config.json", "gemma", "not supported");
    const longrope = modelWithConfig("longrope", (c) => {
        c.rope_parameters = {
            rope_type: "longrope",
            rope_theta: 1e6,
            short_factor: Array(32).fill(1),
            long_factor: Array(32).fill(2)
        };
    });
    expectError(qlora("export", "gguf", "--model", longrope, "--out", out), "longrope", "cannot be exported to GGUF");
    assertNothingWritten(out);
});

test("a full disk: a one-line error, exit code 1, no partial file", () => {
    const dir = path.join(tmp, "full");
    mkdirSync(dir);
    const out = path.join(dir, "tiny-f16.gguf");
    const run = `"${process.execPath}" --import tsx "${CLI}" export gguf --outtype f16 --out "${out}"`;
    // a real full disk: a 1 MiB tmpfs in a private mount namespace (the 21 MB f16 export fills it mid-way), listing
    // what is left in it afterwards; where user namespaces are not allowed, a file-size limit makes the writes fail
    // the same way (EFBIG)
    const mount = `mount -t tmpfs -o size=1m none "${dir}"`;
    const probe = spawnSync("unshare", ["-r", "-m", "sh", "-c", `${mount} && echo mounted`], {encoding: "utf8"});
    if (probe.stdout?.includes("mounted")) {
        const full = spawnSync(
            "unshare",
            ["-r", "-m", "sh", "-c", `${mount} || exit 99; ${run}; rc=$?; echo "left:[$(ls -A "${dir}")]"; exit $rc`],
            {encoding: "utf8", cwd: REPO_ROOT}
        );
        expectError({code: full.status, stdout: full.stdout, stderr: full.stderr}, out, "the disk is full", "ENOSPC");
        assert.match(full.stdout, /left:\[\]/);
    } else {
        const r = spawnSync("sh", ["-c", `ulimit -f 2048 && exec ${run}`], {encoding: "utf8", cwd: REPO_ROOT});
        expectError({code: r.status, stdout: r.stdout, stderr: r.stderr}, out, "file-size limit", "EFBIG");
    }
    assertNothingWritten(out);
    assert.deepEqual(readdirSync(dir), []);
});
