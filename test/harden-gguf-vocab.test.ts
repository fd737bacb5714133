// harden-gguf-vocab.test.ts: fuzz findings in the GGUF export's reading of tokenizer files: a malformed
// added_tokens entry was a TypeError, and a chat template of megabytes was written into a GGUF that readers
// cannot parse; both are now one-line errors, with nothing written.
import {test} from "node:test";
import assert from "node:assert/strict";
import {existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {QloraError} from "../src/errors.js";
import {exportGguf} from "../src/api/export-gguf.js";
import {copyModel} from "./helpers/model-copy.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-gguf-vocab-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

function editJson(file: string, change: (j: Record<string, unknown>) => void): void {
    const j = JSON.parse(readFileSync(file, "utf8"));
    change(j);
    writeFileSync(file, JSON.stringify(j));
}

test("an added_tokens entry that is not an object is named, not a TypeError", async () => {
    const dir = copyModel(path.join(tmp, "null-added"), (d) =>
        editJson(path.join(d, "tokenizer.json"), (j) => {
            (j.added_tokens as unknown[])[0] = null;
        })
    );
    const out = path.join(tmp, "null-added.gguf");
    await assert.rejects(
        exportGguf({modelDir: dir, out, outtype: "f16"}),
        (e: unknown) =>
            e instanceof QloraError &&
            /tokenizer\.json: added_tokens\[0\] is null, expected \{"id": <token id>, "content": <text>/.test(e.message)
    );
    assert.equal(existsSync(out), false);
});

test("a chat template past the template size limit is refused before anything is written", async () => {
    const dir = copyModel(path.join(tmp, "huge-template"), (d) =>
        editJson(path.join(d, "tokenizer_config.json"), (j) => {
            j.chat_template = "A".repeat(2_000_000);
        })
    );
    const out = path.join(tmp, "huge-template.gguf");
    await assert.rejects(
        exportGguf({modelDir: dir, out, outtype: "f16"}),
        (e: unknown) =>
            e instanceof QloraError &&
            /tokenizer_config\.json: chat_template ran past its size limit: it is 2,000,000 characters long, more than the 1,048,576/.test(
                e.message
            )
    );
    assert.equal(existsSync(out), false);
});

test("HfTokenizer refuses token ids that are not integers (they surfaced later as a decode error of the library)", async () => {
    const {HfTokenizer} = await import("../src/tokenizer/index.js");
    const vocabDir = copyModel(path.join(tmp, "string-id"), (d) =>
        editJson(path.join(d, "tokenizer.json"), (j) => {
            (j.model as {vocab: Record<string, unknown>}).vocab.hello = "Split";
        })
    );
    await assert.rejects(
        HfTokenizer.load(vocabDir),
        (e: unknown) =>
            e instanceof QloraError && /tokenizer\.json: model\.vocab\["hello"\] is "Split", expected a token id/.test(e.message)
    );
    const addedDir = copyModel(path.join(tmp, "object-id"), (d) =>
        editJson(path.join(d, "tokenizer.json"), (j) => {
            (j.added_tokens as {id: unknown}[])[1].id = {value: 16383};
        })
    );
    await assert.rejects(HfTokenizer.load(addedDir), /added_tokens\[1\]\.id is \{"value":16383\}, expected a token id/);
});

test("additional_special_tokens: a non-string entry is named, and a huge list loads fast (fuzz case 9735 hung 60 s)", async () => {
    const {HfTokenizer} = await import("../src/tokenizer/index.js");
    const bad = copyModel(path.join(tmp, "list-entries"), (d) =>
        editJson(path.join(d, "tokenizer_config.json"), (j) => {
            j.additional_special_tokens = [[], []];
        })
    );
    await assert.rejects(HfTokenizer.load(bad), /"additional_special_tokens"\[0\] is \[\], not a token string/);
    // 300,000 strings (the library compared each with every one before it: 16 s here before the fix)
    const many = copyModel(path.join(tmp, "many-specials"), (d) =>
        editJson(path.join(d, "tokenizer_config.json"), (j) => {
            j.additional_special_tokens = [...Array.from({length: 300000}, (_, i) => `<extra_${i}>`), "<|im_end|>"];
        })
    );
    const t0 = Date.now();
    const tok = await HfTokenizer.load(many);
    const ms = Date.now() - t0;
    assert.ok(ms < 8000, `${ms} ms`);
    // a known token in the list still counts as special: it is skipped when decoding with skipSpecialTokens
    const id = tok.tokenToId("<|im_end|>")!;
    assert.equal(tok.decode([id], {skipSpecialTokens: true}), "");
});
