// Bad input to the CLI: one line naming the file and the problem, exit code 1, no stack trace.
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {REPO_ROOT} from "./helpers/paths.js";
import {expectOneLineError, runCli} from "./helpers/cli.js";
import {copyModel, editConfig} from "./helpers/model-copy.js";

/** a copy of the embedded model with some files changed */
const modelCopy = (name: string, edit: (dir: string) => void) => copyModel(path.join(tmp, name), edit);

const qlora = (...args: string[]) => runCli(args);

const expectError = expectOneLineError;

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-cli-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

test("generate --json prints the prompt and output ids and the text", () => {
    const r = qlora("generate", "--prompt", "床前明月光，", "--greedy", "--max-new-tokens", "4", "--json");
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout.trim());
    assert.deepEqual(out.prompt_ids, [3915, 559, 1954, 621, 259]);
    assert.deepEqual(out.output_ids, [3915, 559, 1954, 621, 259, 2245, 884, 2176, 9073]);
    assert.ok(out.text.startsWith("床前明月光，零露"), out.text);
});

test("a missing model folder", () => {
    expectError(qlora("generate", "--model", path.join(tmp, "nope"), "--prompt", "x"), "nope", "does not exist");
});

test("a folder without config.json", () => {
    const dir = modelCopy("noconfig", (d) => rmSync(path.join(d, "config.json")));
    expectError(qlora("inspect", "--model", dir), "config.json");
});

test("a folder without weights", () => {
    const dir = modelCopy("noweights", (d) => rmSync(path.join(d, "model.safetensors")));
    expectError(qlora("generate", "--model", dir, "--prompt", "x"), "safetensors");
});

test("an unknown architecture", () => {
    const dir = modelCopy("gpt2", (d) =>
        editConfig(d, (c) => {
            c.model_type = "gpt2";
        })
    );
    expectError(qlora("generate", "--model", dir, "--prompt", "x"), "config.json", "gpt2");
});

test("a truncated safetensors file", () => {
    const dir = modelCopy("truncated", (d) => {
        const f = path.join(d, "model.safetensors");
        writeFileSync(f, readFileSync(f).subarray(0, 1_000_000));
    });
    expectError(qlora("generate", "--model", dir, "--prompt", "x"), "model.safetensors");
});

test("a corrupt safetensors header", () => {
    const dir = modelCopy("corrupt", (d) => {
        const f = path.join(d, "model.safetensors");
        const bytes = readFileSync(f);
        bytes.write("#", 8); // the header no longer starts with {
        writeFileSync(f, bytes);
    });
    expectError(qlora("generate", "--model", dir, "--prompt", "x"), "model.safetensors", /header|JSON/i);
});

test("weights whose shapes do not match config.json", () => {
    const dir = modelCopy("shapes", (d) =>
        editConfig(d, (c) => {
            c.intermediate_size = 512;
        })
    );
    expectError(qlora("generate", "--model", dir, "--prompt", "x"), "gate_proj", "[768, 256]", "[512, 256]");
});

test("a prompt longer than the context", () => {
    const dir = modelCopy("short", (d) =>
        editConfig(d, (c) => {
            c.max_position_embeddings = 8;
        })
    );
    expectError(
        qlora("generate", "--model", dir, "--prompt", "one two three four five six seven eight nine ten"),
        "context length",
        "8"
    );
});

test("--debug shows the stack trace", () => {
    const r = qlora("generate", "--model", path.join(tmp, "nope"), "--prompt", "x", "--debug");
    assert.equal(r.code, 1);
    assert.match(r.stderr, /\n\s+at /);
});

test("--device: cpu runs on the host, auto falls back to it silently without a GPU, cuda names what is missing", async () => {
    const {cudaAvailability} = await import("../src/backend/cuda.js");
    const args = ["generate", "--prompt", "床前明月光，", "--greedy", "--max-new-tokens", "4", "--json"];
    const cpuRun = qlora(...args, "--device", "cpu");
    assert.equal(cpuRun.code, 0, cpuRun.stderr);
    assert.equal(cpuRun.stderr, "");
    assert.deepEqual(JSON.parse(cpuRun.stdout).output_ids, [3915, 559, 1954, 621, 259, 2245, 884, 2176, 9073]);
    expectError(qlora(...args, "--device", "gpu"), '--device expects auto, cpu or cuda, got "gpu"');
    const evalArgs = ["eval", "--data", path.join(REPO_ROOT, "examples", "data", "alpaca_eval.json"), "--json"];
    if (!cudaAvailability().usable) {
        const auto = qlora(...args, "--device", "auto");
        assert.equal(auto.code, 0, auto.stderr);
        assert.equal(auto.stdout, cpuRun.stdout);
        assert.equal(auto.stderr, "", "no GPU: auto says nothing");
        expectError(qlora(...args, "--device", "cuda"), /--device cuda: /);
        expectError(qlora(...evalArgs, "--device", "cuda"), /--device cuda: /);
    }
});
