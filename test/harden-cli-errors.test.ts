// How the CLI prints a failure: one line, no raw control characters from files, operating-system errors named
// by path and meaning instead of "internal error".
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {errorLine, escapeForTerminal} from "../src/cli/run.js";
import {QloraError} from "../src/errors.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const CLI = path.join(REPO_ROOT, "src", "cli", "main.ts");
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-errline-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

test("control characters, line breaks and bidi overrides are escaped", () => {
    assert.equal(escapeForTerminal("a\x1b[31mb\rc\bd\ne\u202ef\x9bg"), "a\\x1b[31mb\\rc\\x08d\\ne\\u{202e}f\\x9bg");
    assert.equal(escapeForTerminal("plain 中文 text"), "plain 中文 text");
});

test("errors: QloraErrors as written, OS errors by path and meaning, other errors marked internal", () => {
    assert.equal(errorLine(new QloraError("bad\x1b]0;title\x07", {file: "x.json"})), "x.json: bad\\x1b]0;title\\x07");
    const enospc = Object.assign(new Error("ENOSPC: no space left on device, write"), {
        code: "ENOSPC",
        syscall: "write",
        path: "/out/f"
    });
    assert.equal(errorLine(enospc), "/out/f: the disk is full; free some space or write to another disk (ENOSPC in write)");
    assert.match(errorLine(new RangeError("Array buffer allocation failed")), /^out of memory: /);
    assert.match(errorLine(new TypeError("x is undefined")), /^x is undefined.*internal error/);
});

test("a hostile model_type is printed escaped, on one line", () => {
    const dir = path.join(tmp, "hostile");
    mkdirSync(dir);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
        copyFileSync(path.join(MODEL_DIR, f), path.join(dir, f));
    const cfg = JSON.parse(readFileSync(path.join(dir, "config.json"), "utf8"));
    cfg.model_type = "evil\x1b[2J\x1b[31m\nsecond line";
    writeFileSync(path.join(dir, "config.json"), JSON.stringify(cfg));
    const r = spawnSync(process.execPath, ["--import", "tsx", CLI, "inspect", "--model", dir], {
        encoding: "utf8",
        cwd: REPO_ROOT
    });
    assert.equal(r.status, 1, r.stderr);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.doesNotMatch(r.stderr, /\x1b\[2J/);
    assert.match(r.stderr, /evil\\x1b\[2J/);
});

test("export gguf with a FIFO named tokenizer.json fails at once instead of hanging", () => {
    const dir = path.join(tmp, "fifo");
    mkdirSync(dir);
    for (const f of ["config.json", "model.safetensors", "tokenizer_config.json"])
        copyFileSync(path.join(MODEL_DIR, f), path.join(dir, f));
    assert.equal(spawnSync("mkfifo", [path.join(dir, "tokenizer.json")]).status, 0);
    const started = Date.now();
    const r = spawnSync(
        process.execPath,
        ["--import", "tsx", CLI, "export", "gguf", "--model", dir, "--out", path.join(tmp, "fifo.gguf")],
        {encoding: "utf8", cwd: REPO_ROOT, timeout: 60_000}
    );
    assert.equal(r.status, 1, `exit ${r.status} signal ${r.signal}: ${r.stderr}`);
    assert.match(r.stderr, /tokenizer\.json: expected a regular file, found a FIFO/);
    assert.ok(Date.now() - started < 60_000);
});

test("a QloraError is one line whatever its parts hold (V8's JSON messages, keys with line breaks)", () => {
    const e = new QloraError('unknown key "block\nkey "\r\n  (see --help)\u2028end', {file: "c.yaml"});
    assert.equal(e.message, 'c.yaml: unknown key "block key " (see --help) end');
});

test("values quoted from files are cut, never throw, and a message never carries a megabyte of them", async () => {
    const {quoteValue} = await import("../src/errors.js");
    assert.equal(quoteValue("short"), '"short"');
    assert.equal(quoteValue("A".repeat(1000)), `"${"A".repeat(79)}… (1002 chars)`);
    let deep: unknown = 1;
    for (let i = 0; i < 200_000; i++) deep = [deep];
    assert.equal(quoteValue(deep), "[…] (nested too deeply to show)");
    const e = new QloraError(`bias: must be "none" (got "${"lora_only".repeat(10_000)}")`, {file: "adapter_config.json"});
    assert.ok(e.message.length < 300, `${e.message.length} chars`);
    assert.match(e.message, /^adapter_config\.json: bias: must be "none" \(got "lora_only.*…\(90003 chars\)….*only"\)$/);
});

test("a QloraError around a multi-megabyte unbroken value is built without overflowing the stack", () => {
    const e = new QloraError(JSON.stringify(new Array(1e6).fill({a: 1})));
    assert.ok(e.message.length < 200, `${e.message.length} chars`);
});

test("a value nested 100000 deep in adapter_config.json or a dataset row is refused in one line, not a stack overflow", async () => {
    const {readAdapterConfig} = await import("../src/peft/adapter-files.js");
    const {formatRecord} = await import("../src/data/formats.js");
    const deep = "[".repeat(100_000) + "]".repeat(100_000);
    const dir = path.join(tmp, "deep-adapter");
    mkdirSync(dir);
    writeFileSync(
        path.join(dir, "adapter_config.json"),
        `{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "init_lora_weights": ${deep}}`
    );
    await assert.rejects(
        readAdapterConfig(dir),
        (e: Error) =>
            e instanceof QloraError &&
            /adapter_config\.json: init_lora_weights: must be true, false or "gaussian" \(got \[…\] \(nested too deeply to show\)\)/.test(
                e.message
            )
    );
    const row = JSON.parse(`{"q": ${deep}, "a": "x"}`);
    assert.throws(
        () => formatRecord(row, "template", {template: "Q: {q}\nA: {a}", response_field: "a"}),
        (e: Error) => e instanceof QloraError && /"q" is nested too deeply to place in the template as JSON/.test(e.message)
    );
});
