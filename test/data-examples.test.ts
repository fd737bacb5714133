import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {DataLoader, loadDataset, padTokenIdOf} from "../src/data/index.js";
import {makeExampleData} from "../scripts/make-example-data.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const EXAMPLES = path.join(REPO_ROOT, "examples", "data");
const FILES = ["alpaca_train.json", "alpaca_eval.json", "chat_train.jsonl"];

let dir: string;
let tokenizer: HfTokenizer;
before(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-data-examples-"));
    tokenizer = await HfTokenizer.load(MODEL_DIR);
});
after(async () => {
    await fs.rm(dir, {recursive: true, force: true});
});

describe("example data", () => {
    test("the committed files are what the generator writes from its default seed", async () => {
        const made = await makeExampleData(dir);
        assert.equal(made.train.length, 400);
        assert.equal(made.eval.length, 60);
        assert.equal(made.chat.length, 120);
        for (const file of FILES) {
            assert.equal(
                await fs.readFile(path.join(dir, file), "utf8"),
                await fs.readFile(path.join(EXAMPLES, file), "utf8"),
                `${file} is stale: run scripts/make-example-data.ts`
            );
        }
        const key = (r: {instruction: string; input: string}): string => r.instruction + "\u0000" + r.input;
        const trainKeys = new Set(made.train.map(key));
        assert.ok(
            made.eval.every((r) => !trainKeys.has(key(r))),
            "eval records are held out"
        );
        assert.ok(made.train.some((r) => r.input === "") && made.train.some((r) => r.input !== ""));
    });

    test("they prepare without drops and batch", async () => {
        const train = await loadDataset(path.join(EXAMPLES, "alpaca_train.json"), tokenizer);
        assert.equal(train.stats.format, "alpaca");
        assert.equal(train.stats.dropped, 0);
        assert.equal(train.rows.length, 400);
        const evalSplit = await loadDataset(path.join(EXAMPLES, "alpaca_eval.json"), tokenizer);
        assert.equal(evalSplit.rows.length, 60);
        const chat = await loadDataset(path.join(EXAMPLES, "chat_train.jsonl"), tokenizer, {packing: true, max_seq_length: 256});
        assert.equal(chat.stats.format, "messages");
        assert.equal(chat.stats.dropped, 0);
        const loader = new DataLoader(train.rows, {batchSize: 8, padTokenId: padTokenIdOf(tokenizer), seed: 42});
        const {batch} = loader.next();
        assert.equal(batch.B, 8);
        assert.ok(batch.numTargets > 8);
    });
});
