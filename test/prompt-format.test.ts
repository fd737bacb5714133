// The training format as a chat template (data/prompt-format.ts): for every sample of each example dataset and
// format, the inference prompt rendered from the saved template equals the training text up to the start of the
// response, token for token, and the conversation with the answer equals the whole training example, EOS included;
// for the seed alpaca format, {field} templates and Jinja templates with an optional-input branch.
import {test} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {detectFormat, formatRecord, isJinjaTemplate, type FormatOptions} from "../src/data/formats.js";
import {promptFormatTemplate} from "../src/data/prompt-format.js";
import {readRecords} from "../src/data/readers.js";
import {resolveEosToken, tokenizeExample} from "../src/data/tokenize.js";
import {HfTokenizer, type ChatMessage} from "../src/tokenizer/index.js";
import {DATASETS, MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const tok = await HfTokenizer.load(MODEL_DIR);
const eosToken = resolveEosToken(tok, null);

interface Case {
    file: string;
    options: FormatOptions;
    /** the chat turns a user would send for this record, and the answer it was trained on */
    turns(record: Record<string, unknown>): {prompt: ChatMessage[]; answer: string};
}

const alpacaTurns = (r: Record<string, unknown>) => ({
    prompt: [{role: "user", content: r.instruction as string, input: (r.input as string) ?? ""}],
    answer: r.output as string
});

const ALPACA_FILES = [
    path.join(REPO_ROOT, "examples/data/alpaca_train.json"),
    path.join(DATASETS, "alpaca_zh_demo.json"),
    path.join(DATASETS, "alpaca_en_demo.json")
];

// Jinja user templates with an optional-input branch (LLaMA-Factory/axolotl style): one for the prompt only (the
// response follows it), one that prints {{ output }} with text after it, written over several lines as a YAML block
// would give it (trim_blocks drops the newline after each tag)
const JINJA_TEMPLATES = [
    "### 指令:\n{{ instruction }}\n{% if input %}### 输入:\n{{ input }}\n{% endif %}### 回答:\n",
    "{% if input %}Below is a task with context.\n{% endif %}### Instruction:\n{{ instruction | trim }}\n{% if input %}\n" +
        "### Input:\n{{ input }}\n{% endif %}\n### Response:\n{{ output }}\n-- end\n"
];

const CASES: Case[] = [
    ...ALPACA_FILES.map((file) => ({file, options: {}, turns: alpacaTurns})),
    ...JINJA_TEMPLATES.flatMap((template) => ALPACA_FILES.map((file) => ({file, options: {template}, turns: alpacaTurns}))),
    {
        // a user template with a second field and text after the response
        file: path.join(DATASETS, "alpaca_en_demo.json"),
        options: {template: "Task: {instruction}\nContext: {input}\nAnswer: {output}\n--", response_field: "output"},
        turns: (r) => ({
            prompt: [{role: "user", content: r.instruction as string, input: r.input as string}],
            answer: r.output as string
        })
    },
    {
        file: path.join(DATASETS, "alpaca_en_demo.json"),
        options: {dataset_format: "template", template: "Q: {instruction} A: ", response_field: "output"},
        turns: (r) => ({prompt: [{role: "user", content: r.instruction as string}], answer: r.output as string})
    }
];

for (const c of CASES) {
    const label = `${path.basename(c.file)}${c.options.template ? ` with template ${JSON.stringify(c.options.template)}` : ""}`;
    test(`${label}: the saved template renders the training prompt and example token for token`, async () => {
        const {records} = await readRecords(c.file);
        const format = detectFormat(records[0], c.options);
        const pf = promptFormatTemplate({
            format,
            eosToken,
            template: c.options.template,
            responseField: c.options.response_field,
            tokenizerTemplate: tok.chatTemplateText()
        });
        assert.ok(pf, "a template");
        const chat = tok.withChatTemplate(pf.template, "test");
        let withInput = 0;
        records.forEach((record, i) => {
            const example = formatRecord(record, format, c.options);
            const trained = tokenizeExample(example, tok, {completionOnlyLoss: true, assistantOnlyLoss: true, eosToken});
            assert.equal(example.kind, "prompt_completion");
            if (example.kind !== "prompt_completion") return;
            // the training prompt as training encoded it (a template ending in a space tokenizes it apart from the answer)
            const trainedPrompt = tok.encode(example.prompt, {addSpecialTokens: true});
            const {prompt, answer} = c.turns(record);
            if ((prompt[0] as {input?: string}).input?.trim()) withInput++;
            const rendered = tok.encode(chat.applyChatTemplate(prompt, {addGenerationPrompt: true}), {addSpecialTokens: true});
            assert.deepEqual(rendered, trainedPrompt, `record ${i}: the prompt`);
            const full = chat.applyChatTemplate([...prompt, {role: "assistant", content: answer}]);
            assert.deepEqual(tok.encode(full, {addSpecialTokens: true}), trained.inputIds, `record ${i}: the whole example`);
            assert.ok(full.endsWith(eosToken!), "the answer ends with the EOS the model learned");
        });
        console.log(`${label}: ${records.length} records (${withInput} with an input) render as trained`);
        if (format === "alpaca" || isJinjaTemplate(c.options.template ?? ""))
            assert.ok(withInput > 0 && withInput < records.length, "both branches (with and without input) are exercised");
    });
}

for (const file of [
    path.join(REPO_ROOT, "examples/data/chat_train.jsonl"),
    path.join(DATASETS, "messages_demo.jsonl"),
    path.join(DATASETS, "sharegpt_demo.json")
]) {
    test(`${path.basename(file)}: chat data keeps the tokenizer's template, whose prompt is the training text before each answer`, async () => {
        const {records} = await readRecords(file);
        const format = detectFormat(records[0]);
        const pf = promptFormatTemplate({format, eosToken, tokenizerTemplate: tok.chatTemplateText()});
        assert.equal(pf?.template, tok.chatTemplateText());
        let answers = 0;
        records.forEach((record, i) => {
            const example = formatRecord(record, format);
            assert.equal(example.kind, "messages");
            if (example.kind !== "messages") return;
            const trained = tokenizeExample(example, tok, {completionOnlyLoss: true, assistantOnlyLoss: true, eosToken});
            const last = example.messages.map((m) => m.role).lastIndexOf("assistant");
            if (last < 0) return;
            const prompt = tok.encode(tok.applyChatTemplate(example.messages.slice(0, last), {addGenerationPrompt: true}), {
                addSpecialTokens: true
            });
            assert.deepEqual(trained.inputIds.slice(0, prompt.length), prompt, `record ${i}`);
            assert.notEqual(trained.labels[prompt.length], -100, `record ${i}: the answer is trained from its first token`);
            answers++;
        });
        assert.ok(answers > 0);
    });
}

test("prompt_completion text data: the prompt is sent as it is; text and tokenized data have no chat format", () => {
    const pf = promptFormatTemplate({format: "prompt_completion", eosToken, tokenizerTemplate: null})!;
    const chat = tok.withChatTemplate(pf.template, "test");
    const example = formatRecord({prompt: "2 + 2 =", completion: " 4"}, "prompt_completion");
    const trained = tokenizeExample(example, tok, {completionOnlyLoss: true, assistantOnlyLoss: true, eosToken});
    const full = chat.applyChatTemplate([
        {role: "user", content: "2 + 2 ="},
        {role: "assistant", content: " 4"}
    ]);
    assert.deepEqual(tok.encode(full, {addSpecialTokens: true}), trained.inputIds);
    assert.equal(promptFormatTemplate({format: "text", eosToken, tokenizerTemplate: "x"}), null);
    assert.equal(promptFormatTemplate({format: "tokenized", eosToken, tokenizerTemplate: "x"}), null);
});

test("alpaca records with system and history (LLaMA-Factory's fields) render as trained, turn by turn", () => {
    const pf = promptFormatTemplate({format: "alpaca", eosToken, tokenizerTemplate: null})!;
    const chat = tok.withChatTemplate(pf.template, "test");
    const records = [
        {system: "Be brief.", instruction: "Add 2 and 3.", output: "5"},
        {instruction: "Now double it.", input: "", output: "10", history: [["Add 2 and 3.", "5"]]},
        {
            system: "You are a calculator.",
            instruction: "Multiply.",
            input: "4 5",
            output: "20",
            history: [
                ["Add 1 and 1.", "2"],
                ["Subtract 1 from 3.", "2"]
            ]
        }
    ];
    for (const [i, record] of records.entries()) {
        const example = formatRecord(record, "alpaca");
        const trained = tokenizeExample(example, tok, {completionOnlyLoss: true, assistantOnlyLoss: true, eosToken});
        const messages: ChatMessage[] = [
            ...(record.system ? [{role: "system", content: record.system}] : []),
            ...(record.history ?? []).flatMap(([q, a]) => [
                {role: "user", content: q},
                {role: "assistant", content: a}
            ]),
            {role: "user", content: record.instruction, input: record.input ?? ""}
        ];
        const prompt = tok.encode(chat.applyChatTemplate(messages, {addGenerationPrompt: true}), {addSpecialTokens: true});
        const firstTrained = trained.labels.findIndex((l) => l !== -100);
        assert.deepEqual(prompt, trained.inputIds.slice(0, firstTrained), `record ${i}: the prompt`);
        const full = chat.applyChatTemplate([...messages, {role: "assistant", content: record.output}]);
        assert.deepEqual(tok.encode(full, {addSpecialTokens: true}), trained.inputIds, `record ${i}`);
        // the history's answers are context: only the last answer (and its EOS) is trained
        assert.equal(trained.labels.filter((l) => l !== -100).length, tok.encode(record.output + eosToken).length);
    }
    assert.equal(
        chat.applyChatTemplate(
            [
                {role: "system", content: "Be brief."},
                {role: "user", content: "Add 2 and 3."},
                {role: "assistant", content: "5"},
                {role: "user", content: "Now double it.", input: "   "}
            ],
            {addGenerationPrompt: true}
        ),
        `Be brief.\n\n### 指令:\nAdd 2 and 3.\n\n### 回答:\n5${eosToken}### 指令:\nNow double it.\n\n### 回答:\n`
    );
});

test("other column names (LLaMA-Factory's columns and tags) read as the standard ones, and errors name the mapping", () => {
    const alpaca = formatRecord({question: "Add 2 and 3.", context: "", answer: "5", sys: "Be brief."}, "alpaca", {
        columns: {prompt: "question", query: "context", response: "answer", system: "sys"}
    });
    const direct = formatRecord({instruction: "Add 2 and 3.", input: "", output: "5", system: "Be brief."}, "alpaca");
    assert.deepEqual(alpaca, direct);
    assert.equal(detectFormat({question: "q", answer: "a"}, {columns: {prompt: "question", response: "answer"}}), "alpaca");
    const chat = formatRecord(
        {
            dialog: [
                {speaker: "me", text: "hi"},
                {speaker: "bot", text: "hello"}
            ]
        },
        detectFormat({dialog: []}, {columns: {messages: "dialog"}}),
        {columns: {messages: "dialog"}, tags: {role_tag: "speaker", content_tag: "text", user_tag: "me", assistant_tag: "bot"}}
    );
    assert.deepEqual(chat, {
        kind: "messages",
        messages: [
            {role: "user", content: "hi"},
            {role: "assistant", content: "hello"}
        ],
        templateExtra: undefined
    });
    assert.throws(
        () => formatRecord({question: "q"}, "alpaca", {columns: {prompt: "question", response: "answer"}}),
        /missing "output".*\(columns: "question" as "instruction", "answer" as "output"\)/
    );
});
