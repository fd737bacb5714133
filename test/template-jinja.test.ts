// The `template` key as a Jinja template with an optional-input branch (issue 11): records render with their
// fields as variables (absent ones undefined), the prompt ends where {{ output }} is printed (or the response follows
// the prompt), bad templates are one-line errors naming the key, and the training format saved with the adapter,
// the GGUF and the Ollama Modelfile prompts the model with the training text.
import {test} from "node:test";
import assert from "node:assert/strict";
import {readFileSync, writeFileSync} from "node:fs";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {previewDataset} from "../src/api/data-preview.js";
import {exportOllama} from "../src/api/export-ollama.js";
import {fineTune} from "../src/api/train.js";
import {detectFormat, formatRecord, isJinjaTemplate} from "../src/data/formats.js";
import {loadDataset, prepareRecords} from "../src/data/prepare.js";
import {promptFormatTemplate} from "../src/data/prompt-format.js";
import {QloraError} from "../src/errors.js";
import {ollamaTemplate, probeTurns} from "../src/export/ollama.js";
import {HfTokenizer, type ChatMessage} from "../src/tokenizer/index.js";
import {renderGoTemplate} from "./helpers/go-template.js";
import {expectError, qlora, scratch} from "./helpers/harden-train.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const tok = await HfTokenizer.load(MODEL_DIR);
const EOS = "<|endoftext|>"; // tiny-qwen2's EOS, appended to every completion
const tmp = scratch("template-jinja");

/** the issue's template: the prompt only, with an optional input block; the response follows it */
const OPTIONAL_INPUT = "### 指令:\n{{ instruction }}\n{% if input %}### 输入:\n{{ input }}\n{% endif %}### 回答:\n";

/** the one line of a QloraError that `fn` throws */
function errorOf(fn: () => unknown): string {
    try {
        fn();
    } catch (err) {
        assert.ok(err instanceof QloraError, `a QloraError, got ${String(err)}`);
        assert.ok(!err.message.includes("\n"), "one line");
        return err.message;
    }
    assert.fail("no error");
}

test("a template is Jinja when it has {% %} or {# #}, or {{ }} and no {field}; {{ }} in a {field} template stay literal braces", () => {
    assert.equal(isJinjaTemplate(OPTIONAL_INPUT), true);
    assert.equal(isJinjaTemplate("Q: {{ instruction }}\nA: "), true);
    assert.equal(isJinjaTemplate("{# a comment #}Q: {q}"), true);
    assert.equal(isJinjaTemplate("Q: {instruction}\nA: "), false);
    assert.equal(isJinjaTemplate("Q: {instruction} {{literal}}\nA: {output}"), false);
    // the {field} template keeps its meaning: {{Q}} is the text {Q}
    assert.deepEqual(formatRecord({q: "x", output: "y"}, "template", {template: "{{Q}} {q} => "}), {
        kind: "prompt_completion",
        prompt: "{Q} x => ",
        completion: "y"
    });
    assert.equal(detectFormat({instruction: "i", output: "o"}, {template: OPTIONAL_INPUT}), "template");
});

test("the optional branch: an input that is empty, null or missing takes the other branch; the response follows the prompt", () => {
    const format = (record: Record<string, unknown>) => formatRecord(record, "template", {template: OPTIONAL_INPUT});
    assert.deepEqual(format({instruction: "把 3 和 5 相加。", input: "3 5", output: "8"}), {
        kind: "prompt_completion",
        prompt: "### 指令:\n把 3 和 5 相加。\n### 输入:\n3 5\n### 回答:\n",
        completion: "8"
    });
    const without = {kind: "prompt_completion", prompt: "### 指令:\n说你好。\n### 回答:\n", completion: "你好"};
    assert.deepEqual(format({instruction: "说你好。", input: "", output: "你好"}), without);
    assert.deepEqual(format({instruction: "说你好。", input: null, output: "你好"}), without);
    assert.deepEqual(format({instruction: "说你好。", output: "你好"}), without);
    // README's example, over lines as a YAML block scalar gives it: the newline after each tag is dropped
    // (trim_blocks), the final newline kept, so it renders as the one-line template
    const block = "### 指令:\n{{ instruction }}\n{% if input %}\n### 输入:\n{{ input }}\n{% endif %}\n### 回答:\n";
    for (const record of [
        {instruction: "把 3 和 5 相加。", input: "3 5", output: "8"},
        {instruction: "说你好。", output: "你好"}
    ])
        assert.deepEqual(formatRecord(record, "template", {template: block}), format(record));
});

test("{{ output }} in the template: the prompt is what comes before it, the completion the response and what follows", () => {
    // written over lines as a YAML block gives it: the newline after each tag is dropped (trim_blocks), the final
    // newline kept, as in a {field} template
    const template = "Q: {{ instruction }}\n{% if input %}\nContext: {{ input }}\n{% endif %}\nA: {{ output }}\n-- end\n";
    assert.deepEqual(formatRecord({instruction: "2+2?", input: "math", output: "4"}, "template", {template}), {
        kind: "prompt_completion",
        prompt: "Q: 2+2?\nContext: math\nA: ",
        completion: "4\n-- end\n"
    });
    // fields keep their JSON values (a list to loop over, an object's member) and the response_field names the response
    const rich = "[{{ meta.topic }}] {% for t in tags %}#{{ t }} {% endfor %}{{ q }} => {{ a }}.";
    assert.deepEqual(
        formatRecord({q: "x", a: "y", meta: {topic: "t"}, tags: ["one", "two"]}, "template", {
            template: rich,
            response_field: "a"
        }),
        {kind: "prompt_completion", prompt: "[t] #one #two x => ", completion: "y."}
    );
    // after the column mapping the standard names are the variables; as in Hugging Face's chat templates the
    // newline right after a tag is dropped (trim_blocks), so a line break after {% endif %} is written twice
    const mapped = (template: string) =>
        formatRecord({question: "2+2?", answer: "4"}, "template", {template, columns: {prompt: "question", response: "answer"}});
    assert.deepEqual(mapped("Q: {{ instruction }}{% if input %} ({{ input }}){% endif %}\n\nA: "), {
        kind: "prompt_completion",
        prompt: "Q: 2+2?\nA: ",
        completion: "4"
    });
    assert.deepEqual(mapped("Q: {{ instruction }}{% if input %} ({{ input }}){% endif %}\nA: "), {
        kind: "prompt_completion",
        prompt: "Q: 2+2?A: ",
        completion: "4"
    });
});

test("bad templates: a syntax error, the response printed twice, filtered or tested, a missing response; one line each", () => {
    const format =
        (template: string, record: Record<string, unknown> = {instruction: "i", output: "o"}) =>
        () =>
            formatRecord(record, "template", {template}, {index: 3, file: "data.jsonl:4"});
    assert.match(
        errorOf(format("{{ instruction }}{% if input %}x")),
        /^template: the Jinja template cannot be parsed \(.+\); fix it, or write a \{field\} template/
    );
    assert.match(
        errorOf(format("{{ instruction }} {{ output }} / {{ output }}")),
        /^data\.jsonl:4: record 3: the template prints "output" \(the response\) more than once, so the prompt would hold the answer/
    );
    assert.match(
        errorOf(format("{{ instruction }} {{ output | upper }}")),
        /record 3: the template does not print "output" \(the response\) as \{\{ output \}\} for this record/
    );
    // printed only in one branch: the records without an input have no end to their prompt
    assert.match(
        errorOf(format("{{ instruction }}{% if input %} {{ output }}{% endif %}")),
        /record 3: the template does not print "output"/
    );
    assert.match(
        errorOf(format("{% if output | length > 3 %}Long answer{% endif %}{{ instruction }}: {{ output }}")),
        /record 3: the template's text around \{\{ output \}\} depends on "output" \(the response\); print it as \{\{ output \}\}/
    );
    assert.match(errorOf(format(OPTIONAL_INPUT, {instruction: "i"})), /^data\.jsonl:4: record 3: missing "output"/);
    assert.match(errorOf(format(OPTIONAL_INPUT, {instruction: "i", output: 8})), /"output" is a number, not a string/);
});

test("a variable no record has is named with the columns; one that some records have is optional", async () => {
    const records = [
        {instruction: "a", output: "1"},
        {instruction: "b", input: "x", output: "2"}
    ];
    const prepared = prepareRecords(records, tok, {template: OPTIONAL_INPUT});
    assert.equal(prepared.rows.length, 2);
    assert.equal(
        errorOf(() => prepareRecords(records, tok, {template: "{{ instruction }}{% if inptu %} ({{ inptu }}){% endif %}: "})),
        'template: "inptu" is not a field of any record; the columns are instruction, output, input; use one of ' +
            "those names, or map a column to it with columns"
    );
    // from a file, with a column mapping: the mapped names are listed, and the mapping is shown
    const file = path.join(tmp, "mapped.jsonl");
    writeFileSync(file, records.map((r) => JSON.stringify({question: r.instruction, answer: r.output})).join("\n") + "\n");
    await assert.rejects(
        loadDataset(file, tok, {template: "{{ question }} {{ context }}: ", columns: {prompt: "question", response: "answer"}}),
        (err: Error) =>
            err instanceof QloraError &&
            err.message ===
                'template: "context" is not a field of any record; the columns are question, answer, instruction, ' +
                    'output (columns: "question" as "instruction", "answer" as "output"); use one of those names, or map ' +
                    "a column to it with columns"
    );
});

test("a Jinja template's chat template renders the training text, with and without input, and converts to Ollama", () => {
    const template =
        "{% if input %}With context.\n{% endif %}Q: {{ instruction }}\n{% if input %}C: {{ input }}\n{% endif %}A: {{ output }}\n";
    const pf = promptFormatTemplate({format: "template", eosToken: EOS, template, tokenizerTemplate: null})!;
    assert.equal(pf.source, "template");
    const chat = tok.withChatTemplate(pf.template, "test");
    const render = (m: ChatMessage[], gen: boolean) => chat.applyChatTemplate(m, {addGenerationPrompt: gen});
    const records = [
        {instruction: "Add 2 and 3.", input: "", output: "5"},
        {instruction: "Add them.", input: "4 5", output: "9"}
    ];
    let conversation: ChatMessage[] = [];
    let trainedText = "";
    for (const record of records) {
        const example = formatRecord(record, "template", {template});
        assert.equal(example.kind, "prompt_completion");
        if (example.kind !== "prompt_completion") return;
        const user: ChatMessage = {role: "user", content: record.instruction, input: record.input};
        assert.equal(render([user], true), example.prompt);
        // as the history of a later turn: each answer ends with what follows {{ output }} and the EOS
        conversation = [...conversation, user, {role: "assistant", content: record.output}];
        trainedText += example.prompt + example.completion + EOS;
        assert.equal(render(conversation, false), trainedText);
    }
    assert.equal(trainedText, `Q: Add 2 and 3.\nA: 5\n${EOS}With context.\nQ: Add them.\nC: 4 5\nA: 9\n${EOS}`);
    // Ollama's messages carry no input field: its template is the branch without input, and renders as the Jinja one
    const goTemplate = ollamaTemplate(probeTurns(render));
    const messages: ChatMessage[] = [
        {role: "system", content: "left out, as in training"},
        {role: "user", content: "x {{ y }}"},
        {role: "assistant", content: "z"},
        {role: "user", content: "w"}
    ];
    assert.equal(
        renderGoTemplate(goTemplate, {Messages: messages.map((m) => ({Role: m.role, Content: m.content}))}),
        render(messages, true)
    );
    assert.equal(render(messages, true), `Q: x {{ y }}\nA: z\n${EOS}Q: w\nA: `);
});

test("data preview shows a Jinja template's samples with the response trained; the CLI refuses a broken one in one line", async () => {
    const file = path.join(REPO_ROOT, "examples/data/alpaca_train.json");
    const records = JSON.parse(readFileSync(file, "utf8")) as {instruction: string; input: string; output: string}[];
    const preview = await previewDataset(file, {template: OPTIONAL_INPUT, samples: 2, max_seq_length: 256});
    assert.equal(preview.description.format, "template");
    assert.equal(preview.promptFormat, "template");
    preview.samples.forEach((sample, i) => {
        const r = records[i];
        const prompt = `### 指令:\n${r.instruction}\n${r.input ? `### 输入:\n${r.input}\n` : ""}### 回答:\n`;
        assert.deepEqual(
            sample.segments.map((s) => [s.text, s.trained]),
            [
                [prompt, false],
                [r.output + EOS, true]
            ]
        );
    });
    const out = qlora(REPO_ROOT, "data", "preview", "--dataset", file, "--template", OPTIONAL_INPUT, "-n", "1");
    assert.equal(out.code, 0, out.stderr);
    assert.match(out.stdout, /^prompt format template$/m);
    assert.ok(out.stdout.includes(`### 回答:\n[[${records[0].output}${EOS}]]`), out.stdout);
    expectError(
        qlora(REPO_ROOT, "data", "preview", "--dataset", file, "--template", "{{ instruction }}{% if input %}"),
        /^error: template: the Jinja template cannot be parsed \(/
    );
});

test("a run with a Jinja template saves it with the adapter; the GGUF and the Ollama Modelfile carry it", async () => {
    const data = path.join(tmp, "train.json");
    const records = [
        {instruction: "Add 2 and 3.", input: "", output: "5"},
        {instruction: "Add them.", input: "4 5", output: "9"},
        {instruction: "Say hi.", output: "hi"}
    ];
    writeFileSync(data, JSON.stringify(records));
    const out = path.join(tmp, "run");
    const result = await fineTune({
        dataset: data,
        template: OPTIONAL_INPUT,
        output_dir: out,
        max_steps: 1,
        max_seq_length: 64,
        per_device_train_batch_size: 1,
        r: 2,
        save_strategy: "no",
        eval_strategy: "no"
    });
    const saved = readFileSync(path.join(result.finalDir, "chat_template.jinja"), "utf8");
    const chat = tok.withChatTemplate(saved, "saved");
    for (const record of records) {
        const example = formatRecord(record, "template", {template: OPTIONAL_INPUT});
        if (example.kind !== "prompt_completion") assert.fail(example.kind);
        const user: ChatMessage = {role: "user", content: record.instruction, input: record.input};
        // the inference prompt is the training prompt token for token, and the answer ends with the EOS
        assert.deepEqual(tok.encode(chat.applyChatTemplate([user], {addGenerationPrompt: true})), tok.encode(example.prompt));
        const full = chat.applyChatTemplate([user, {role: "assistant", content: record.output}]);
        assert.equal(full, example.prompt + example.completion + EOS);
    }
    const ollama = path.join(tmp, "ollama");
    await exportOllama({adapterDir: result.finalDir, out: ollama, outtype: "f16"});
    const modelfile = readFileSync(path.join(ollama, "Modelfile"), "utf8");
    assert.ok(modelfile.includes("### 指令:\n{{ $m.Content }}\n### 回答:\n{{ end }}"), modelfile);
    assert.match(modelfile, /^PARAMETER stop "<\|endoftext\|>"$/m);
    const md = (await gguf(path.join(ollama, "model.gguf"), {allowLocalFile: true})).metadata as unknown as Record<
        string,
        unknown
    >;
    assert.equal(md["tokenizer.chat_template"], saved);
});
