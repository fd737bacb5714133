import {test, describe, before} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {QloraError} from "../src/errors.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {
    IGNORE_INDEX,
    assistantSpans,
    describeDataset,
    detectFormat,
    formatRecord,
    prepareRecords,
    readRecords,
    tokenizeExample,
    truncateExample
} from "../src/data/index.js";
import type {Example, TokenizeOptions} from "../src/data/index.js";
import {DATASETS, MODEL_DIR} from "./helpers/paths.js";

const EOS = "<|endoftext|>";
const EOS_ID = 16381;
const IM_END_ID = 16383;

let tokenizer: HfTokenizer;
before(async () => {
    tokenizer = await HfTokenizer.load(MODEL_DIR);
});

const defaults: TokenizeOptions = {completionOnlyLoss: true, assistantOnlyLoss: true, eosToken: EOS};

/** the positions whose label is trained, and the runs of consecutive trained positions */
function trainedPositions(labels: ArrayLike<number>): number[] {
    const positions: number[] = [];
    for (let i = 0; i < labels.length; i++) if (labels[i] !== IGNORE_INDEX) positions.push(i);
    return positions;
}

function trainedRuns(ids: ArrayLike<number>, labels: ArrayLike<number>): number[][] {
    const runs: number[][] = [];
    let run: number[] | null = null;
    for (let i = 0; i < labels.length; i++) {
        if (labels[i] === IGNORE_INDEX) {
            run = null;
            continue;
        }
        assert.equal(labels[i], ids[i], "labels are the input ids where trained (not shifted)");
        if (!run) runs.push((run = []));
        run.push(ids[i]);
    }
    return runs;
}

describe("prompt/completion and alpaca", () => {
    test("completion-only masking masks exactly the prompt tokens; the response and EOS are trained", () => {
        const example = formatRecord({instruction: "把下面的数字相加。", input: "3 5", output: "8"}, "alpaca") as Extract<
            Example,
            {kind: "prompt_completion"}
        >;
        const promptIds = tokenizer.encode(example.prompt);
        const out = tokenizeExample(example, tokenizer, defaults);
        assert.deepEqual(out.inputIds, tokenizer.encode(example.prompt + "8" + EOS));
        assert.deepEqual(out.inputIds.slice(0, promptIds.length), promptIds);
        const responseIds = tokenizer.encode("8");
        const expectedPositions = Array.from({length: responseIds.length + 1}, (_, i) => promptIds.length + i);
        assert.deepEqual(trainedPositions(out.labels), expectedPositions);
        assert.deepEqual(
            expectedPositions.map((p) => out.labels[p]),
            [...responseIds, EOS_ID]
        );
        assert.equal(out.prefixMismatch, undefined);
    });

    test("on real alpaca records the trained tokens decode to output + EOS", async () => {
        for (const file of ["alpaca_zh_demo.json", "alpaca_en_demo.json"]) {
            const records = (await readRecords(path.join(DATASETS, file))).records.slice(0, 20);
            const prepared = prepareRecords(records, tokenizer, {max_seq_length: null});
            for (let i = 0; i < 20; i++) {
                const row = prepared.rows[i];
                const runs = trainedRuns(row.inputIds, row.labels);
                assert.equal(runs.length, 1, `${file} record ${i}: one trained span`);
                const text = tokenizer.decode(runs[0]);
                const output = String(records[i].output);
                // a mismatch at the boundary may move a token; on these records it does not
                assert.equal(text, output + EOS, `${file} record ${i}`);
                assert.equal(row.labels[row.labels.length - 1], EOS_ID);
            }
        }
    });

    test("completion_only_loss false trains the prompt too; EOS is not doubled", () => {
        const example: Example = {kind: "prompt_completion", prompt: "Q: hi\nA: ", completion: "hello" + EOS};
        const out = tokenizeExample(example, tokenizer, {...defaults, completionOnlyLoss: false});
        assert.deepEqual(out.labels, out.inputIds);
        assert.equal(out.inputIds.filter((id) => id === EOS_ID).length, 1);
        const prepared = prepareRecords([{instruction: "x", output: "y"}], tokenizer, {completion_only_loss: false});
        assert.deepEqual(Array.from(prepared.rows[0].labels), Array.from(prepared.rows[0].inputIds));
    });

    test("text trains everything and gets an EOS", () => {
        const out = tokenizeExample({kind: "text", text: "hello world"}, tokenizer, defaults);
        assert.deepEqual(out.inputIds, tokenizer.encode("hello world" + EOS));
        assert.deepEqual(out.labels, out.inputIds);
        const prepared = prepareRecords([{text: "hello world"}], tokenizer, {completion_only_loss: true});
        assert.equal(prepared.options.completionOnlyLoss, false);
        assert.equal(prepared.options.format, "text");
    });

    test("eos_token must be in the vocabulary; assistant_only_loss applies to chat data only", () => {
        assert.throws(() => prepareRecords([{text: "x"}], tokenizer, {eos_token: "<nope>"}), QloraError);
        const prepared = prepareRecords([{text: "x"}], tokenizer, {eos_token: "<|im_end|>"});
        assert.equal(prepared.rows[0].inputIds[prepared.rows[0].inputIds.length - 1], IM_END_ID);
        // the config's default assistant_only_loss: true is ignored for non-chat data
        const alpaca = prepareRecords([{instruction: "x", output: "y"}], tokenizer, {
            assistant_only_loss: true,
            completion_only_loss: true
        });
        assert.deepEqual([alpaca.options.assistantOnlyLoss, alpaca.options.completionOnlyLoss], [false, true]);
    });
});

describe("chat: assistant-only loss", () => {
    const messages = [
        {role: "system", content: "Be brief."},
        {role: "user", content: "hi"},
        {role: "assistant", content: "Hello!"},
        {role: "user", content: "2+2?"},
        {role: "assistant", content: "4"}
    ];

    test("assistant spans cover the content and <|im_end|>, not the newline after it", () => {
        const {text, spans} = assistantSpans(messages, tokenizer);
        assert.equal(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        );
        assert.deepEqual(
            spans.map(([s, e]) => text.slice(s, e)),
            ["Hello!<|im_end|>", "4<|im_end|>"]
        );
    });

    test("only assistant tokens (and their end-of-turn token) are trained", () => {
        const out = tokenizeExample({kind: "messages", messages}, tokenizer, defaults);
        assert.deepEqual(
            out.inputIds,
            tokenizer.encode(tokenizer.applyChatTemplate(messages)),
            "piecewise encoding equals encoding the whole"
        );
        const runs = trainedRuns(out.inputIds, out.labels);
        assert.deepEqual(runs, [tokenizer.encode("Hello!<|im_end|>"), tokenizer.encode("4<|im_end|>")]);
        assert.equal(runs[0][runs[0].length - 1], IM_END_ID);
        const all = tokenizeExample({kind: "messages", messages}, tokenizer, {...defaults, assistantOnlyLoss: false});
        assert.deepEqual(all.labels, all.inputIds);
    });

    test("without a system message the template's default one is masked; a first assistant turn is found by search", () => {
        const out = tokenizeExample(
            {
                kind: "messages",
                messages: [
                    {role: "assistant", content: "I start."},
                    {role: "user", content: "ok"},
                    {role: "assistant", content: "fine"}
                ]
            },
            tokenizer,
            defaults
        );
        const runs = trainedRuns(out.inputIds, out.labels).map((r) => tokenizer.decode(r));
        assert.deepEqual(runs, ["I start.<|im_end|>", "fine<|im_end|>"]);
    });

    test("shared messages and ShareGPT data: trained runs are exactly the assistant turns", async () => {
        for (const file of ["messages_demo.jsonl", "sharegpt_demo.json"]) {
            const read = await readRecords(path.join(DATASETS, file));
            const format = detectFormat(read.records[0]);
            const prepared = prepareRecords(read.records.slice(0, 25), tokenizer, {max_seq_length: null});
            assert.equal(prepared.options.assistantOnlyLoss, true);
            for (let i = 0; i < 25; i++) {
                const example = formatRecord(read.records[i], format);
                if (example.kind !== "messages") assert.fail("messages expected");
                const expected = example.messages
                    .filter((m) => m.role === "assistant")
                    .map((m) => m.content.trimEnd() + "<|im_end|>");
                const row = prepared.rows[i];
                const runs = trainedRuns(row.inputIds, row.labels).map((r) => tokenizer.decode(r));
                assert.deepEqual(runs, expected, `${file} record ${i}`);
            }
        }
    });

    test("conversational prompt/completion masks the rendered prompt", () => {
        const example: Example = {
            kind: "chat_prompt_completion",
            prompt: [{role: "user", content: "hi"}],
            completion: [{role: "assistant", content: "yo"}]
        };
        const out = tokenizeExample(example, tokenizer, defaults);
        const runs = trainedRuns(out.inputIds, out.labels).map((r) => tokenizer.decode(r));
        assert.deepEqual(runs, ["yo<|im_end|>\n"]);
    });
});

describe("truncation and dropping", () => {
    test("keep_start keeps the first tokens, keep_end the last", () => {
        const ex = {inputIds: [1, 2, 3, 4, 5], labels: [-100, -100, 3, 4, 5]};
        assert.deepEqual(truncateExample(ex, 3).example, {inputIds: [1, 2, 3], labels: [-100, -100, 3]});
        assert.deepEqual(truncateExample(ex, 3, "keep_end").example, {inputIds: [3, 4, 5], labels: [3, 4, 5]});
        assert.equal(truncateExample(ex, 5).truncated, false);
        assert.equal(truncateExample(ex, null).truncated, false);
    });

    test("examples whose prompt fills max_seq_length are dropped and counted", () => {
        const long = {instruction: "word ".repeat(50), input: "", output: "yes"};
        const short = {instruction: "Say yes.", input: "", output: "yes"};
        const prepared = prepareRecords([long, short, long], tokenizer, {max_seq_length: 24});
        assert.equal(prepared.stats.records, 3);
        assert.equal(prepared.stats.dropped, 2);
        assert.equal(prepared.stats.truncated, 2);
        assert.equal(prepared.rows.length, 1);
        assert.match(prepared.warnings.join("\n"), /2 of 3 examples have no label left to train/);
        for (const row of prepared.rows) assert.ok(row.inputIds.length <= 24);
        const description = describeDataset(prepared);
        assert.equal(description.truncated, 2);
        assert.equal(description.rows, 1);
        assert.equal(
            description.histogram.reduce((s, b) => s + b.count, 0),
            3
        );
        assert.throws(() => prepareRecords([long], tokenizer, {max_seq_length: 24}), /no example of the 1 has a label to train/);
    });

    test("chat template failures name the record", () => {
        const broken = {
            encode: (text: string) => tokenizer.encode(text),
            applyChatTemplate: (): string => {
                throw new QloraError("the chat template failed on these messages: roles must alternate", {
                    file: "tokenizer_config.json"
                });
            },
            eosTokenId: tokenizer.eosTokenId,
            padTokenId: tokenizer.padTokenId,
            idToToken: (id: number) => tokenizer.idToToken(id),
            tokenToId: (token: string) => tokenizer.tokenToId(token)
        };
        assert.throws(
            () =>
                prepareRecords(
                    [
                        {
                            messages: [
                                {role: "user", content: "a"},
                                {role: "assistant", content: "b"}
                            ]
                        }
                    ],
                    broken
                ),
            /^QloraError: record 0: tokenizer_config\.json: the chat template failed on these messages/
        );
    });

    test("empty datasets are errors", () => {
        assert.throws(() => prepareRecords([], tokenizer), /the dataset is empty/);
    });
});
