import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {QloraError} from "../src/errors.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    detectFormat,
    formatRecord,
    mapShareGptRole,
    prepareRecords,
    readRecords,
    templateFields
} from "../src/data/index.js";
import {DATASETS, MODEL_DIR} from "./helpers/paths.js";

let dir: string;
let tokenizer: HfTokenizer;

before(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-data-formats-"));
    tokenizer = await HfTokenizer.load(MODEL_DIR);
});
after(async () => {
    await fs.rm(dir, {recursive: true, force: true});
});

function throwsQlora(fn: () => unknown, pattern: RegExp): QloraError {
    try {
        fn();
    } catch (err) {
        assert.ok(err instanceof QloraError, `expected a QloraError, got ${String(err)}`);
        assert.match(err.message, pattern);
        return err;
    }
    assert.fail(`expected an error matching ${pattern}`);
}

describe("format detection", () => {
    test("each shared data set is detected from its first record", async () => {
        const expected: Record<string, string> = {
            "alpaca_zh_demo.json": "alpaca",
            "alpaca_en_demo.json": "alpaca",
            "messages_demo.jsonl": "messages",
            "sharegpt_demo.json": "sharegpt"
        };
        for (const [file, format] of Object.entries(expected)) {
            const read = await readRecords(path.join(DATASETS, file));
            assert.equal(detectFormat(read.records[0]), format, file);
        }
    });

    test("keys decide; dataset_format and template override", () => {
        assert.equal(detectFormat({text: "x"}), "text");
        assert.equal(detectFormat({body: "x"}, {dataset_text_field: "body"}), "text");
        assert.equal(detectFormat({prompt: "p", completion: "c"}), "prompt_completion");
        assert.equal(detectFormat({instruction: "i", output: "o"}), "alpaca");
        assert.equal(detectFormat({messages: []}), "messages");
        assert.equal(detectFormat({conversations: []}), "sharegpt");
        assert.equal(detectFormat({input_ids: [1, 2]}), "tokenized");
        assert.equal(detectFormat({instruction: "i", output: "o"}, {template: "Q: {instruction}\nA: "}), "template");
        assert.equal(detectFormat({instruction: "i", output: "o", text: "t"}, {dataset_format: "text"}), "text");
        throwsQlora(
            () => detectFormat({question: "q", answer: "a"}, {}, {file: "d.jsonl:1", index: 0}),
            /d\.jsonl:1: record 0: cannot tell the dataset format from its keys \(question, answer\)/
        );
        throwsQlora(() => detectFormat({text: "x"}, {dataset_format: "csv" as never}), /dataset_format "csv"/);
    });
});

describe("alpaca", () => {
    test("the default templates, exactly", () => {
        assert.equal(ALPACA_TEMPLATE, "### 指令:\n{instruction}\n\n### 输入:\n{input}\n\n### 回答:\n{output}");
        assert.equal(ALPACA_TEMPLATE_NO_INPUT, "### 指令:\n{instruction}\n\n### 回答:\n{output}");
        assert.deepEqual(formatRecord({instruction: "把下面的数字相加。", input: "3 5", output: "8"}, "alpaca"), {
            kind: "prompt_completion",
            prompt: "### 指令:\n把下面的数字相加。\n\n### 输入:\n3 5\n\n### 回答:\n",
            completion: "8"
        });
        const noInput = {kind: "prompt_completion", prompt: "### 指令:\nSay hi.\n\n### 回答:\n", completion: "hi"};
        assert.deepEqual(formatRecord({instruction: "Say hi.", input: "", output: "hi"}, "alpaca"), noInput);
        assert.deepEqual(formatRecord({instruction: "Say hi.", output: "hi"}, "alpaca"), noInput);
        assert.deepEqual(formatRecord({instruction: "Say hi.", input: null, output: "hi"}, "alpaca"), noInput);
    });

    test("the first record of alpaca_zh_demo", async () => {
        const read = await readRecords(path.join(DATASETS, "alpaca_zh_demo.json"));
        const record = read.records[0] as {instruction: string; input: string; output: string};
        const example = formatRecord(record, "alpaca");
        assert.equal(record.input, "");
        assert.deepEqual(example, {
            kind: "prompt_completion",
            prompt: `### 指令:\n${record.instruction}\n\n### 回答:\n`,
            completion: record.output
        });
        const withInput = read.records.find((r) => r.input !== "") as {instruction: string; input: string; output: string};
        assert.deepEqual(formatRecord(withInput, "alpaca"), {
            kind: "prompt_completion",
            prompt: `### 指令:\n${withInput.instruction}\n\n### 输入:\n${withInput.input}\n\n### 回答:\n`,
            completion: withInput.output
        });
    });

    test("missing fields name the record and the expected keys", () => {
        throwsQlora(
            () => formatRecord({instruction: "x", input: "y"}, "alpaca", {}, {file: "data.json", index: 3}),
            /^data\.json: record 3: missing "output"; alpaca records need "instruction", "output" and optionally "input" \(found keys: instruction, input\)$/
        );
        throwsQlora(() => formatRecord({instruction: {a: 1}, output: "o"}, "alpaca"), /"instruction" is an object, not a string/);
    });

    test("missing fields in JSONL name the line", async () => {
        const file = path.join(dir, "missing.jsonl");
        await fs.writeFile(file, '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d"}\n');
        const read = await readRecords(file);
        throwsQlora(
            () => prepareRecords(read, tokenizer),
            new RegExp(`^${escapeRegex(file)}:3: record 1: missing "output"; alpaca records need`)
        );
        const arrayFile = path.join(dir, "missing.json");
        await fs.writeFile(arrayFile, JSON.stringify([{messages: [{role: "user", content: "hi"}]}, {messages: "hello"}]));
        const arrayRead = await readRecords(arrayFile);
        throwsQlora(
            () => prepareRecords(arrayRead, tokenizer),
            /missing\.json: record 1: "messages" is a string \("hello"\), not a list; messages records need "messages"/
        );
    });
});

function escapeRegex(s: string): string {
    return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

describe("user templates", () => {
    test("{field} placeholders and a separate response field", () => {
        const record = {question: "What is 2+2?", answer: "4", topic: "math"};
        assert.deepEqual(templateFields("[{topic}] Q: {question}\nA: "), ["topic", "question"]);
        assert.deepEqual(formatRecord(record, "template", {template: "[{topic}] Q: {question}\nA: ", response_field: "answer"}), {
            kind: "prompt_completion",
            prompt: "[math] Q: What is 2+2?\nA: ",
            completion: "4"
        });
    });

    test("the response placeholder inside the template splits prompt and completion; {{ }} are literal", () => {
        assert.deepEqual(formatRecord({q: "x", output: "y"}, "template", {template: "{{Q}} {q} => {output} <end>"}), {
            kind: "prompt_completion",
            prompt: "{Q} x => ",
            completion: "y <end>"
        });
    });

    test("missing template fields name the expected keys", () => {
        throwsQlora(
            () =>
                formatRecord(
                    {q: "x"},
                    "template",
                    {template: "Q: {q} {context}\nA: ", response_field: "a"},
                    {file: "f.jsonl:9", index: 8}
                ),
            /^f\.jsonl:9: record 8: missing "context"; the template needs "q", "context", "a" \(found keys: q\)$/
        );
    });
});

describe("ShareGPT and messages", () => {
    test("roles map human→user, gpt/bot→assistant, system, unknown→user", () => {
        assert.equal(mapShareGptRole("human"), "user");
        assert.equal(mapShareGptRole("gpt"), "assistant");
        assert.equal(mapShareGptRole("bot"), "assistant");
        assert.equal(mapShareGptRole("system"), "system");
        assert.equal(mapShareGptRole("user"), "user");
        assert.equal(mapShareGptRole("assistant"), "assistant");
        assert.equal(mapShareGptRole("narrator"), "user");
        const example = formatRecord(
            {
                system: "Be brief.",
                conversations: [
                    {from: "human", value: "hi"},
                    {from: "gpt", value: "hello"},
                    {from: "narrator", value: "later"},
                    {from: "bot", value: "bye"}
                ]
            },
            "sharegpt"
        );
        assert.deepEqual(example, {
            kind: "messages",
            messages: [
                {role: "system", content: "Be brief."},
                {role: "user", content: "hi"},
                {role: "assistant", content: "hello"},
                {role: "user", content: "later"},
                {role: "assistant", content: "bye"}
            ],
            templateExtra: undefined
        });
    });

    test("the first record of sharegpt_demo", async () => {
        const read = await readRecords(path.join(DATASETS, "sharegpt_demo.json"));
        const example = formatRecord(read.records[0], "sharegpt");
        assert.equal(example.kind, "messages");
        if (example.kind !== "messages") return;
        assert.deepEqual(
            example.messages.map((m) => m.role),
            ["user", "assistant", "user", "assistant"]
        );
        assert.equal(example.messages[0].content, "Who are you?");
    });

    test("messages: validation, content parts, tools", () => {
        throwsQlora(
            () => formatRecord({messages: [{from: "human", value: "x"}]}, "messages", {}, {index: 0}),
            /record 0: messages\[0\] has "from" instead of "role"/
        );
        throwsQlora(() => formatRecord({messages: []}, "messages"), /"messages" is empty/);
        throwsQlora(
            () => formatRecord({conversations: [{from: "human"}]}, "sharegpt"),
            /conversations\[0\] has no string "value"/
        );
        const example = formatRecord(
            {
                messages: [
                    {
                        role: "user",
                        content: [
                            {type: "text", text: "a"},
                            {type: "text", text: "b"}
                        ]
                    }
                ],
                tools: '[{"type": "function"}]'
            },
            "messages"
        );
        assert.deepEqual(example, {
            kind: "messages",
            messages: [{role: "user", content: "ab"}],
            templateExtra: {tools: [{type: "function"}]}
        });
    });

    test("prompt/completion, plain and conversational", () => {
        assert.deepEqual(formatRecord({prompt: "p", completion: "c"}, "prompt_completion"), {
            kind: "prompt_completion",
            prompt: "p",
            completion: "c"
        });
        const chat = formatRecord(
            {prompt: [{role: "user", content: "q"}], completion: [{role: "assistant", content: "a"}]},
            "prompt_completion"
        );
        assert.equal(chat.kind, "chat_prompt_completion");
        throwsQlora(
            () => formatRecord({prompt: "p"}, "prompt_completion"),
            /missing "completion"; prompt_completion records need "prompt" and "completion"/
        );
    });
});
