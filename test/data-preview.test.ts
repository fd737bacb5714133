// qlora data preview: the summary, the samples with their trained tokens marked ([[...]] in a pipe), and --json.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {expectError, qlora} from "./helpers/harden-train.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const cli = (...args: string[]) => {
    const r = spawnSync(
        process.execPath,
        ["--import", "tsx", path.join(REPO_ROOT, "src/cli/main.ts"), "data", "preview", ...args],
        {
            encoding: "utf8",
            cwd: REPO_ROOT
        }
    );
    assert.equal(r.status, 0, r.stderr);
    return r.stdout;
};

test("alpaca data: the response and its EOS are the trained text; the prompt is not", () => {
    const file = path.join(REPO_ROOT, "examples/data/alpaca_train.json");
    const first = JSON.parse(readFileSync(file, "utf8"))[0] as {output: string};
    const out = cli("--dataset", file, "-n", "3", "--max-seq-length", "64");
    assert.match(out, /^format\s+alpaca \(json\)$/m);
    assert.match(out, /^records\s+400$/m);
    assert.match(out, /^prompt format alpaca$/m);
    const samples = out.split("--- sample ").slice(1);
    assert.equal(samples.length, 3);
    assert.ok(samples[0].includes(`### 回答:\n[[${first.output}<|endoftext|>]]`), samples[0]);
    assert.ok(!/\[\[[^\]]*### 指令/.test(out), "no prompt text is marked trained");
});

test("--json gives each sample's input_ids and label_mask, and chat data trains the assistant turns only", async () => {
    const file = path.join(REPO_ROOT, "examples/data/chat_train.jsonl");
    const j = JSON.parse(cli("--dataset", file, "-n", "2", "--json")) as {
        format: string;
        targets: number;
        samples: {input_ids: number[]; label_mask: number[]}[];
    };
    assert.equal(j.format, "messages");
    assert.equal(j.samples.length, 2);
    const tok = await HfTokenizer.load(MODEL_DIR);
    for (const s of j.samples) {
        assert.equal(s.input_ids.length, s.label_mask.length);
        const trained = tok.decode(s.input_ids.filter((_, i) => s.label_mask[i] === 1));
        const untrained = tok.decode(s.input_ids.filter((_, i) => s.label_mask[i] === 0));
        assert.ok(!trained.includes("<|im_start|>user"), trained);
        assert.match(untrained, /<\|im_start\|>user/);
        assert.ok(s.label_mask.some((m) => m === 1));
    }
    const first = JSON.parse(readFileSync(file, "utf8").split("\n")[0]) as {messages: {role: string; content: string}[]};
    const answer = first.messages.find((m) => m.role === "assistant")!.content;
    assert.ok(tok.decode(j.samples[0].input_ids.filter((_, i) => j.samples[0].label_mask[i] === 1)).includes(answer));
});

test("--columns maps other column names (LLaMA-Factory's dataset_info) before the format is detected", () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-preview-"));
    try {
        const file = path.join(dir, "qa.json");
        writeFileSync(file, JSON.stringify([{question: "Add 2 and 3.", answer: "5"}]));
        const out = cli("--dataset", file, "--columns", '{"prompt": "question", "response": "answer"}', "-n", "1");
        assert.match(out, /^format\s+alpaca \(json\)$/m);
        assert.ok(out.includes("### 指令:\nAdd 2 and 3.\n\n### 回答:\n[[5<|endoftext|>]]"), out);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});

test("--columns and --tags are checked by the train keys' schema: the same message as train for the same mistake", () => {
    const data = path.join(REPO_ROOT, "examples/data/alpaca_train.json");
    const cases: [string, string][] = [
        ["--columns", '{"promt": "q"}'], // an unknown key, with the key meant
        ["--columns", '{"prompt": 3}'], // a value of the wrong type
        ["--tags", '{"role": "from"}'], // a key written in part
        ["--tags", "{role_tag: from}"] // not JSON
    ];
    const messages = cases.map(([flag, json]) => {
        const train = expectError(qlora(REPO_ROOT, "train", flag, json));
        const preview = expectError(qlora(REPO_ROOT, "data", "preview", "--dataset", data, flag, json));
        // train names the flags' source ("command line: "); the rest is the same words
        assert.equal(preview, train.replace("error: command line: ", "error: "));
        return preview;
    });
    assert.deepEqual(messages, [
        'error: columns: unknown key "promt"; did you mean "prompt"? (got {"promt":"q"})',
        "error: columns.prompt: Invalid input: expected string, received number",
        'error: tags: unknown key "role"; did you mean "role_tag"? (got {"role":"from"})',
        `error: --tags expects a JSON object, e.g. '{"role_tag": "from", "content_tag": "value"}' (got "{role_tag: from}")`
    ]);
});
