// The training format as a chat template (data/prompt-format.ts): for every sample of each example dataset and
// format, the inference prompt rendered from the saved template equals the training text up to the start of the
// response, token for token, and the conversation with the answer equals the whole training example, EOS included.
import {test} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {detectFormat, formatRecord, type FormatOptions} from "../src/data/formats.js";
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

const CASES: Case[] = [
    {file: path.join(REPO_ROOT, "examples/data/alpaca_train.json"), options: {}, turns: alpacaTurns},
    {file: path.join(DATASETS, "alpaca_zh_demo.json"), options: {}, turns: alpacaTurns},
    {file: path.join(DATASETS, "alpaca_en_demo.json"), options: {}, turns: alpacaTurns},
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
        if (format === "alpaca") assert.ok(withInput > 0 && withInput < records.length, "both alpaca branches are exercised");
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

test("a system message is left out of the alpaca prompt (training had none), and history turns follow each other", () => {
    const pf = promptFormatTemplate({format: "alpaca", eosToken: "<|im_end|>", tokenizerTemplate: null})!;
    const chat = tok.withChatTemplate(pf.template, "test");
    const text = chat.applyChatTemplate(
        [
            {role: "system", content: "Be brief."},
            {role: "user", content: "Add 2 and 3."},
            {role: "assistant", content: "5"},
            {role: "user", content: "Now double it.", input: "   "}
        ],
        {addGenerationPrompt: true}
    );
    assert.equal(text, "### 指令:\nAdd 2 and 3.\n\n### 回答:\n5<|im_end|>### 指令:\nNow double it.\n\n### 回答:\n");
});
