// The prompt format travels with the model: a run on alpaca data saves its training format as the adapter's chat
// template; generate --chat prompts with it (--template base and --template FILE override it); merge and the GGUF
// export carry it.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const CLI = path.join(REPO_ROOT, "src", "cli", "main.ts");
const TSX = import.meta.resolve("tsx");
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-format-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

function qlora(...args: string[]) {
    const r = spawnSync(process.execPath, ["--import", TSX, CLI, ...args], {encoding: "utf8", cwd: tmp});
    assert.equal(r.status, 0, `qlora ${args.join(" ")}\n${r.stdout}\n${r.stderr}`);
    return r.stdout;
}

test("an alpaca run saves its format with the adapter; chat, merge and GGUF use it", async () => {
    const out = path.join(tmp, "run");
    const stdout = qlora(
        "train",
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "1",
        "--r",
        "2",
        "--output_dir",
        out
    );
    assert.match(stdout, /prompt format\s+alpaca \(saved with the adapter as chat_template\.jinja/);
    const final = path.join(out, "final");
    const saved = readFileSync(path.join(final, "chat_template.jinja"), "utf8");
    assert.equal(readFileSync(path.join(out, "checkpoint-2", "chat_template.jinja"), "utf8"), saved);
    assert.match(saved, /### 指令:/);

    const tok = await HfTokenizer.load(MODEL_DIR);
    const promptIds = (flags: string[]) =>
        JSON.parse(
            qlora(
                "generate",
                "--adapter",
                final,
                "--chat",
                "--greedy",
                "--json",
                "-n",
                "1",
                "-p",
                "把下面的数字相加。 3 5",
                ...flags
            )
        ).prompt_ids as number[];
    // the training text up to the response, as data/formats.ts wrote it for this instruction
    assert.deepEqual(promptIds([]), tok.encode("### 指令:\n把下面的数字相加。 3 5\n\n### 回答:\n"));
    assert.deepEqual(
        promptIds(["--template", "base"]),
        tok.encode(tok.applyChatTemplate([{role: "user", content: "把下面的数字相加。 3 5"}], {addGenerationPrompt: true}))
    );
    const custom = path.join(tmp, "custom.jinja");
    writeFileSync(custom, "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}");
    assert.deepEqual(promptIds(["--template", custom]), tok.encode("<<把下面的数字相加。 3 5>>"));

    // the merged model's chat template is the training format
    const merged = path.join(tmp, "merged");
    qlora("merge", "--adapter", final, "--out", merged);
    assert.equal(readFileSync(path.join(merged, "chat_template.jinja"), "utf8"), saved);
    const mergedTok = await HfTokenizer.load(merged);
    assert.equal(
        mergedTok.applyChatTemplate([{role: "user", content: "hi"}], {addGenerationPrompt: true}),
        "### 指令:\nhi\n\n### 回答:\n"
    );

    // and so is the GGUF's: llama.cpp and Ollama prompt the fine-tune as it was trained
    const file = path.join(tmp, "tiny.gguf");
    qlora("export", "gguf", "--adapter", final, "--out", file, "--outtype", "f32");
    const md = (await gguf(file, {allowLocalFile: true})).metadata as unknown as Record<string, unknown>;
    assert.equal(md["tokenizer.chat_template"], saved);

    // and Ollama's Modelfile prompts it the same way (test/ollama.test.ts checks the Go template renders as the Jinja)
    qlora("export", "ollama", "--adapter", final, "--out", path.join(tmp, "ollama"), "--outtype", "f16");
    const modelfile = readFileSync(path.join(tmp, "ollama", "Modelfile"), "utf8");
    assert.ok(modelfile.includes("### 指令:\n{{ $m.Content }}\n\n### 回答:\n"), modelfile);
});
