// harden-data-clip.test.ts: texts are clipped to what max_seq_length can keep before they are tokenized
// (prepare.ts clipBudget): a multi-megabyte record costs what its kept tokens cost, and the rows are the same
// tokens and labels as without the clip.
import {before, test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {clipBudget, loadDataset, type DataTokenizer, type TokenizedRow} from "../src/data/index.js";
import {DATASETS, MODEL_DIR} from "./helpers/paths.js";

let tokenizer: HfTokenizer;
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-clip-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

before(async () => {
    tokenizer = await HfTokenizer.load(MODEL_DIR);
});

/** the real tokenizer, recording the longest text it was asked to encode; `clip: false` hides the bound */
function spy(clip: boolean): DataTokenizer & {longest: number; total: number} {
    const s = {
        longest: 0,
        total: 0,
        encode: (text: string, options?: Parameters<HfTokenizer["encode"]>[1]) => {
            s.longest = Math.max(s.longest, text.length);
            s.total += text.length;
            return tokenizer.encode(text, options);
        },
        applyChatTemplate: tokenizer.applyChatTemplate.bind(tokenizer),
        idToToken: tokenizer.idToToken.bind(tokenizer),
        tokenToId: tokenizer.tokenToId.bind(tokenizer),
        eosTokenId: tokenizer.eosTokenId,
        padTokenId: tokenizer.padTokenId,
        specialTokens: tokenizer.specialTokens,
        vocabSize: tokenizer.vocabSize,
        longestTokenChars: clip ? tokenizer.longestTokenChars : undefined
    };
    return s;
}

const rowsOf = (rows: TokenizedRow[]) => rows.map((r) => [Array.from(r.inputIds), Array.from(r.labels)]);

test("the demo datasets give the same rows with and without the clip, and the clip is used", async () => {
    const maxSeq = 24;
    assert.equal(clipBudget(maxSeq, tokenizer), 2 * maxSeq * tokenizer.longestTokenChars + 64);
    // whole-text losses, so that rows whose prompt fills max_seq_length stay; and the assistant-only path of chat
    const cases = [
        ["alpaca_zh_demo.json", {completion_only_loss: false}],
        ["alpaca_en_demo.json", {completion_only_loss: false}],
        ["messages_demo.jsonl", {assistant_only_loss: false}],
        ["sharegpt_demo.json", {assistant_only_loss: false, max_seq_length: 8}]
    ] as const;
    for (const [file, options] of cases) {
        const clipped = spy(true),
            full = spy(false);
        const opts = {max_seq_length: maxSeq, ...options};
        const budget = clipBudget(opts.max_seq_length, tokenizer)!;
        const a = await loadDataset(path.join(DATASETS, file), clipped, opts);
        const b = await loadDataset(path.join(DATASETS, file), full, opts);
        assert.deepEqual(rowsOf(a.rows), rowsOf(b.rows), file);
        assert.equal(a.stats.truncated, b.stats.truncated, file);
        assert.ok(a.options.maxChars === budget && b.options.maxChars === null, file);
        assert.ok(clipped.longest <= budget, `${file}: encoded ${clipped.longest} characters, budget ${budget}`);
        // the clip was exercised: a text longer than the budget (assistant-only: pieces past it were skipped)
        assert.ok(full.longest > budget, `${file}: no record is longer than the budget, so the clip was not exercised`);
    }
});

test("assistant-only chat rows: pieces past the budget are not encoded, and the rows are the same", async () => {
    const file = path.join(tmp, "chat.jsonl");
    const words = (n: number, w: string) => Array.from({length: n}, (_, i) => `${w}${i}`).join(" ");
    const lines = [
        {
            messages: [
                {role: "user", content: "hi"},
                {role: "assistant", content: words(3000, "long")}
            ]
        },
        {
            messages: [
                {role: "user", content: "q"},
                {role: "assistant", content: "a"},
                {role: "user", content: words(2000, "ask")},
                {role: "assistant", content: "late answer"}
            ]
        }
    ];
    writeFileSync(file, lines.map((l) => JSON.stringify(l)).join("\n") + "\n");
    const clipped = spy(true),
        full = spy(false);
    const a = await loadDataset(file, clipped, {max_seq_length: 32});
    const b = await loadDataset(file, full, {max_seq_length: 32});
    assert.equal(a.options.assistantOnlyLoss, true);
    assert.deepEqual(rowsOf(a.rows), rowsOf(b.rows));
    assert.ok(clipped.total <= 2 * clipBudget(32, tokenizer)!, `encoded ${clipped.total} characters`);
    assert.ok(full.total > 20_000);
});

test("a 4M-character word is encoded only up to the budget; keep_end and bfd_split see the whole text", async () => {
    const file = path.join(tmp, "long.jsonl");
    const word = "字😀\u0000".repeat(1_333_333) + "A";
    writeFileSync(file, JSON.stringify({text: word}) + "\n" + JSON.stringify({text: "a short row"}) + "\n");
    const s = spy(true);
    const data = await loadDataset(file, s, {max_seq_length: 64});
    assert.equal(data.rows.length, 2);
    assert.equal(data.stats.truncated, 1);
    assert.equal(data.rows.find((r) => r.inputIds.length === 64)?.inputIds.length, 64);
    assert.ok(s.longest <= clipBudget(64, tokenizer)!, `encoded ${s.longest} characters`);
    // the kept tokens are the first 64 of the whole word's encoding (a 20000-character prefix stands in for it)
    assert.deepEqual(
        Array.from(data.rows.find((r) => r.inputIds.length === 64)!.inputIds),
        tokenizer.encode(word.slice(0, 20_000)).slice(0, 64)
    );
    // where the tail is kept or every piece is used, nothing may be clipped (a shorter word: all of it is encoded)
    const shorter = path.join(tmp, "shorter.jsonl");
    writeFileSync(shorter, JSON.stringify({text: word.slice(0, 20_000)}) + "\n");
    for (const options of [{truncation_mode: "keep_end" as const}, {packing: true, packing_strategy: "bfd_split" as const}]) {
        const whole = spy(true);
        const d = await loadDataset(shorter, whole, {max_seq_length: 64, ...options});
        assert.equal(d.options.maxChars, null);
        assert.ok(whole.longest >= 20_000, JSON.stringify(options));
    }
});

test("a tokenizer.json without its first added token still loads (the clip bound skips what is not a string)", async () => {
    const {copyModel} = await import("./helpers/model-copy.js");
    const {readFileSync} = await import("node:fs");
    const dir = copyModel(path.join(tmp, "no-content"), (d) => {
        const file = path.join(d, "tokenizer.json");
        const j = JSON.parse(readFileSync(file, "utf8"));
        j.added_tokens.splice(0, 1); // what the fuzz case did: the first added token (<|endoftext|>) removed
        writeFileSync(file, JSON.stringify(j));
    });
    const t = await HfTokenizer.load(dir);
    assert.equal(t.longestTokenChars, tokenizer.longestTokenChars);
});
