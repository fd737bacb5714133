// qlora export ollama: the Modelfile's TEMPLATE (a Go template) renders what the Jinja chat template renders, for
// the model's own template (ChatML) and for a fine-tune's training format; a template that is not turn by turn is
// refused; the folder holds the GGUF (merged, or base + LoRA GGUF) and a Modelfile Ollama reads.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {existsSync, mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {promptFormatTemplate} from "../src/data/prompt-format.js";
import {ollamaTemplate, probeTurns} from "../src/export/ollama.js";
import {HfTokenizer, type ChatMessage} from "../src/tokenizer/index.js";
import {renderGoTemplate} from "./helpers/go-template.js";
import {FIXTURES, MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const tok = await HfTokenizer.load(MODEL_DIR);
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-ollama-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

// conversations unlike the probes: unicode, newlines, braces, a long history, a system prompt or none
const CONVERSATIONS: {messages: ChatMessage[]; gen: boolean}[] = [
    {messages: [{role: "user", content: "把下面的数字相加。 3 5"}], gen: true},
    {messages: [{role: "user", content: "line one\nline two {{ not an action }}"}], gen: true},
    {
        messages: [
            {role: "system", content: "You answer in French."},
            {role: "user", content: "Hello"},
            {role: "assistant", content: "Bonjour !"},
            {role: "user", content: "How are you?"}
        ],
        gen: true
    },
    {
        messages: [
            {role: "user", content: "1"},
            {role: "assistant", content: "2"},
            {role: "user", content: "3"},
            {role: "assistant", content: "4"}
        ],
        gen: false
    },
    {messages: [{role: "user", content: ""}], gen: true}
];

function checkEquivalent(chat: HfTokenizer, what: string): string {
    const render = (m: ChatMessage[], gen: boolean) => chat.applyChatTemplate(m, {addGenerationPrompt: gen});
    const template = ollamaTemplate(probeTurns(render));
    for (const c of CONVERSATIONS) {
        // Ollama renders the whole conversation; the generation prompt follows a last message that is not the answer
        const go = renderGoTemplate(template, {Messages: c.messages.map((m) => ({Role: m.role, Content: m.content}))});
        assert.equal(
            go,
            render(c.messages, c.gen || c.messages[c.messages.length - 1].role !== "assistant"),
            `${what}: ${JSON.stringify(c.messages)}`
        );
    }
    return template;
}

test("the model's ChatML template and a fine-tune's alpaca format translate to Go templates that render the same text", () => {
    const chatml = checkEquivalent(tok, "ChatML");
    assert.match(chatml, /<\|im_start\|>system\nYou are a helpful assistant\.<\|im_end\|>\n/);
    const alpaca = promptFormatTemplate({format: "alpaca", eosToken: "<|im_end|>", tokenizerTemplate: null})!;
    const t = checkEquivalent(tok.withChatTemplate(alpaca.template, "alpaca"), "alpaca");
    assert.ok(t.includes("### 指令:\n{{ $m.Content }}\n\n### 回答:\n"), t);
    const custom = promptFormatTemplate({
        format: "template",
        eosToken: "</s>",
        template: "Q: {instruction} {{literal}}\nA: {output}",
        tokenizerTemplate: null
    })!;
    checkEquivalent(tok.withChatTemplate(custom.template, "custom"), "a {field} template with literal braces");
});

test("a template that is not turn by turn is refused with a message, not translated wrongly", () => {
    // numbers its questions: the same role renders differently by position
    const numbered = tok.withChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'user' %}Q{{ loop.index }}: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}",
        "numbered"
    );
    assert.throws(
        () => probeTurns((m, gen) => numbered.applyChatTemplate(m, {addGenerationPrompt: gen})),
        /cannot be written as an Ollama TEMPLATE \(.+\); write the Modelfile's TEMPLATE by hand/
    );
});

test("qlora export ollama writes the GGUF and a Modelfile, merged or with the adapter as a LoRA GGUF", async () => {
    const cli = (...args: string[]) =>
        spawnSync(process.execPath, ["--import", "tsx", path.join(REPO_ROOT, "src/cli/main.ts"), ...args], {
            encoding: "utf8",
            cwd: REPO_ROOT
        });
    const merged = path.join(tmp, "merged");
    let r = cli("export", "ollama", "--adapter", path.join(FIXTURES, "adapter"), "--out", merged, "--outtype", "f16");
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /ollama create NAME -f .*Modelfile/);
    const modelfile = readFileSync(path.join(merged, "Modelfile"), "utf8");
    assert.match(modelfile, /^FROM \.\/model\.gguf$/m);
    assert.doesNotMatch(modelfile, /^ADAPTER/m);
    assert.match(modelfile, /^PARAMETER stop "<\|im_end\|>"$/m);
    const template = /TEMPLATE """([\s\S]*?)"""/.exec(modelfile)![1];
    assert.equal(template, checkEquivalent(tok, "the fixture adapter (the base's template)"));
    const md = (await gguf(path.join(merged, "model.gguf"), {allowLocalFile: true})).metadata as unknown as Record<
        string,
        unknown
    >;
    assert.equal(md["general.file_type"], 1); // f16

    const lora = path.join(tmp, "lora");
    r = cli("export", "ollama", "--adapter", path.join(FIXTURES, "adapter"), "--lora", "--out", lora, "--outtype", "f16");
    assert.equal(r.status, 0, r.stderr);
    assert.match(readFileSync(path.join(lora, "Modelfile"), "utf8"), /^ADAPTER \.\/adapter\.gguf$/m);
    assert.ok(existsSync(path.join(lora, "adapter.gguf")));

    // an existing folder is not replaced without --overwrite; --overwrite replaces only what this export wrote
    r = cli("export", "ollama", "--out", merged, "--outtype", "f16");
    assert.equal(r.status, 1);
    assert.match(r.stderr, /--overwrite/);
    r = cli("export", "ollama", "--out", merged, "--outtype", "f16", "--overwrite");
    assert.equal(r.status, 0, r.stderr);
    r = cli("export", "ollama", "--out", path.join(REPO_ROOT, "models"), "--outtype", "f16", "--overwrite");
    assert.equal(r.status, 1);
});
