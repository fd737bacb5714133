import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {QloraError} from "../src/errors.js";
import {HfTokenizer} from "../src/tokenizer/index.js";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const sharedDir = path.resolve(repoRoot, "..", "shared");
const tinyQwenDir = path.join(sharedDir, "models", "tiny-qwen2");
const greedyPath = path.join(sharedDir, "fixtures", "ref-qwen2", "greedy.json");

let tokenizer: HfTokenizer;
let tempDir: string;

before(async () => {
    tokenizer = await HfTokenizer.load(tinyQwenDir);
    tempDir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-tokenizer-"));
});
after(async () => {
    await fs.rm(tempDir, {recursive: true, force: true});
});

/** a copy of the tiny-qwen2 tokenizer in a temp folder, with tokenizer_config.json edited */
async function tokenizerFolder(
    name: string,
    editConfig: ((config: Record<string, unknown>) => void) | null,
    extraFiles: Record<string, string> = {}
): Promise<string> {
    const dir = path.join(tempDir, name);
    await fs.mkdir(dir);
    await fs.copyFile(path.join(tinyQwenDir, "tokenizer.json"), path.join(dir, "tokenizer.json"));
    if (editConfig) {
        const config = JSON.parse(await fs.readFile(path.join(tinyQwenDir, "tokenizer_config.json"), "utf8"));
        editConfig(config);
        await fs.writeFile(path.join(dir, "tokenizer_config.json"), JSON.stringify(config));
    }
    for (const [file, text] of Object.entries(extraFiles)) await fs.writeFile(path.join(dir, file), text);
    return dir;
}

describe("encode and decode", () => {
    test("Hello world! on tiny-qwen2", () => {
        const ids = tokenizer.encode("Hello world!");
        assert.deepEqual(ids, [39, 1563, 78, 4513, 0]);
        assert.equal(tokenizer.decode(ids), "Hello world!");
        // Qwen adds no BOS, so addSpecialTokens changes nothing here
        assert.deepEqual(tokenizer.encode("Hello world!", {addSpecialTokens: true}), ids);
    });

    test("greedy.json: the prompt encodes to prompt_ids and output_ids decode to text", async () => {
        const greedy = JSON.parse(await fs.readFile(greedyPath, "utf8")) as {
            prompt_ids: number[];
            output_ids: number[];
            text: string;
        };
        const prompt = tokenizer.decode(greedy.prompt_ids);
        assert.equal(prompt, "床前明月光，");
        assert.deepEqual(tokenizer.encode(prompt), greedy.prompt_ids);
        // text is the decoded prompt plus the 24 new tokens
        assert.equal(tokenizer.decode(greedy.output_ids), greedy.text);
        assert.ok(greedy.text.startsWith(prompt));
    });

    test("special tokens are single ids and can be skipped when decoding", () => {
        const ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>");
        assert.equal(ids[0], 16382);
        assert.equal(ids[ids.length - 1], 16383);
        assert.equal(tokenizer.decode(ids), "<|im_start|>user\nhi<|im_end|>");
        assert.equal(tokenizer.decode(ids, {skipSpecialTokens: true}), "user\nhi");
    });

    test("round trip on mixed text", () => {
        const text = "Once upon a time, 1234 ＡＢＣ 😀 — 春眠不觉晓，处处闻啼鸟。\n\n  tabs\tand spaces ";
        assert.equal(tokenizer.decode(tokenizer.encode(text)), text);
    });
});

describe("vocabulary and special tokens", () => {
    test("special ids 16381-16383", () => {
        assert.deepEqual(tokenizer.specialTokens, [
            {name: "eos_token", content: "<|endoftext|>", id: 16381},
            {name: "additional_special_token", content: "<|im_start|>", id: 16382},
            {name: "additional_special_token", content: "<|im_end|>", id: 16383}
        ]);
        assert.equal(tokenizer.eosTokenId, 16381);
        assert.equal(tokenizer.padTokenId, 16381);
        assert.equal(tokenizer.bosTokenId, null);
        assert.equal(tokenizer.vocabSize, 16384);
    });

    test("tokenToId and idToToken", () => {
        assert.equal(tokenizer.tokenToId("<|im_end|>"), 16383);
        assert.equal(tokenizer.idToToken(16382), "<|im_start|>");
        assert.equal(tokenizer.idToToken(0), "!");
        assert.equal(tokenizer.tokenToId("definitely-not-a-token"), null);
        assert.equal(tokenizer.idToToken(999999), null);
    });
});

describe("chat template", () => {
    test("ChatML with the default system prompt", () => {
        assert.equal(tokenizer.hasChatTemplate, true);
        const text = tokenizer.applyChatTemplate([{role: "user", content: "hi"}], {addGenerationPrompt: true});
        assert.equal(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        const full = tokenizer.applyChatTemplate([
            {role: "system", content: "Be brief."},
            {role: "user", content: "hi"},
            {role: "assistant", content: "hello"}
        ]);
        assert.equal(
            full,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        );
        const ids = tokenizer.encode(full);
        assert.equal(ids.filter((id) => id === 16382).length, 3);
        assert.equal(ids.filter((id) => id === 16383).length, 3);
    });

    test("special-token strings and extra variables reach the template", async () => {
        const dir = await tokenizerFolder("template-vars", (config) => {
            config.chat_template =
                "{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ greeting }}|{{ additional_special_tokens | length }}";
        });
        const custom = await HfTokenizer.load(dir);
        assert.equal(custom.applyChatTemplate([], {extra: {greeting: "hey"}}), "<|endoftext|>|<|endoftext|>|false|hey|2");
    });

    test("chat_template.jinja wins over the config's template", async () => {
        const dir = await tokenizerFolder("template-file", () => undefined, {
            "chat_template.jinja": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        });
        const custom = await HfTokenizer.load(dir);
        assert.equal(custom.applyChatTemplate([{role: "user", content: "x"}]), "[user]x");
    });

    test("a list of named templates: default unless another is asked for", async () => {
        const dir = await tokenizerFolder("template-list", (config) => {
            config.chat_template = [
                {name: "default", template: "D{{ messages | length }}"},
                {name: "tool_use", template: "T{{ messages | length }}"}
            ];
        });
        const custom = await HfTokenizer.load(dir);
        assert.deepEqual(custom.chatTemplateNames, ["default", "tool_use"]);
        assert.equal(custom.applyChatTemplate([{role: "user", content: "x"}]), "D1");
        assert.equal(custom.applyChatTemplate([{role: "user", content: "x"}], {templateName: "tool_use"}), "T1");
        assert.throws(
            () => custom.applyChatTemplate([], {templateName: "rag"}),
            /no chat template named "rag" \(available: default, tool_use\)/
        );
    });

    test("raise_exception in a template becomes a QloraError", async () => {
        const dir = await tokenizerFolder("template-raise", (config) => {
            config.chat_template =
                "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        });
        const custom = await HfTokenizer.load(dir);
        assert.equal(custom.applyChatTemplate([{role: "user", content: "x"}]), "ok");
        assert.throws(
            () => custom.applyChatTemplate([{role: "assistant", content: "x"}]),
            (err: unknown) => {
                assert.ok(err instanceof QloraError);
                assert.match(
                    err.message,
                    /tokenizer_config\.json: the chat template failed on these messages: .*Conversation must start with user/
                );
                return true;
            }
        );
    });

    test("no chat template: a clear error that suggests a model with one", async () => {
        const dir = await tokenizerFolder("no-template", (config) => {
            delete config.chat_template;
        });
        const plain = await HfTokenizer.load(dir);
        assert.equal(plain.hasChatTemplate, false);
        assert.throws(
            () => plain.applyChatTemplate([{role: "user", content: "hi"}]),
            (err: unknown) => {
                assert.ok(err instanceof QloraError);
                assert.ok(err.message.startsWith(dir));
                assert.match(err.message, /has no chat template.*use a model that has one/);
                return true;
            }
        );
    });

    test("AddedToken objects in tokenizer_config.json are understood", async () => {
        const dir = await tokenizerFolder("added-token-objects", (config) => {
            config.eos_token = {
                __type: "AddedToken",
                content: "<|im_end|>",
                lstrip: false,
                normalized: false,
                rstrip: false,
                single_word: false
            };
        });
        const custom = await HfTokenizer.load(dir);
        assert.equal(custom.eosTokenId, 16383);
    });

    test("without tokenizer_config.json the tokenizer still works", async () => {
        const dir = await tokenizerFolder("no-config", null);
        const bare = await HfTokenizer.load(dir);
        assert.deepEqual(bare.encode("Hello world!"), [39, 1563, 78, 4513, 0]);
        assert.equal(bare.eosTokenId, null);
        assert.equal(bare.hasChatTemplate, false);
        assert.equal(bare.specialTokens.length, 3);
    });
});

describe("load errors", () => {
    test("missing tokenizer.json names the folder", async () => {
        const dir = path.join(tempDir, "empty");
        await fs.mkdir(dir);
        await assert.rejects(HfTokenizer.load(dir), (err: unknown) => {
            assert.ok(err instanceof QloraError);
            assert.ok(err.message.startsWith(dir));
            assert.match(err.message, /has no tokenizer\.json/);
            return true;
        });
    });

    test("invalid JSON names the file", async () => {
        const dir = path.join(tempDir, "bad-json");
        await fs.mkdir(dir);
        await fs.writeFile(path.join(dir, "tokenizer.json"), '{"model": ');
        await assert.rejects(HfTokenizer.load(dir), /tokenizer\.json: is not valid JSON/);
        const dir2 = await tokenizerFolder("bad-config", null, {"tokenizer_config.json": "nope"});
        await assert.rejects(HfTokenizer.load(dir2), /tokenizer_config\.json: is not valid JSON/);
    });

    test("a bad chat_template value is reported", async () => {
        const dir = await tokenizerFolder("bad-template-value", (config) => {
            config.chat_template = 42;
        });
        await assert.rejects(HfTokenizer.load(dir), /"chat_template" should be a template string/);
    });
});

describe("stream decoder", () => {
    test("Chinese text streamed token by token equals decode, with no U+FFFD on the way", async () => {
        const greedy = JSON.parse(await fs.readFile(greedyPath, "utf8")) as {output_ids: number[]; text: string};
        const texts = [
            greedy.text,
            "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
            "emoji 😀🎉 and accents: café naïve — 汉字混合 English."
        ];
        for (const text of texts) {
            const ids = text === greedy.text ? greedy.output_ids : tokenizer.encode(text);
            const decoder = tokenizer.createStreamDecoder();
            let streamed = "";
            for (const id of ids) {
                const piece = decoder.push(id);
                assert.ok(!piece.includes("\uFFFD"), `piece ${JSON.stringify(piece)} has a replacement character`);
                streamed += piece;
            }
            streamed += decoder.flush();
            assert.equal(streamed, tokenizer.decode(ids));
            assert.equal(streamed, text);
        }
    });

    test("a character split across byte tokens is held back until complete", () => {
        // "😀" is four bytes; with this small vocabulary it spans several tokens
        const ids = tokenizer.encode("😀");
        assert.ok(ids.length > 1, "expected the emoji to be split into byte tokens");
        const decoder = tokenizer.createStreamDecoder();
        const pieces = ids.map((id) => decoder.push(id));
        assert.deepEqual(
            pieces.slice(0, -1).filter((p) => p !== ""),
            []
        );
        assert.equal(pieces[pieces.length - 1], "😀");
        assert.equal(decoder.flush(), "");
    });

    test("flush returns an incomplete tail; skipSpecialTokens applies", () => {
        const ids = tokenizer.encode("😀");
        const decoder = tokenizer.createStreamDecoder();
        let streamed = "";
        for (const id of ids.slice(0, -1)) streamed += decoder.push(id);
        assert.equal(streamed, "");
        assert.ok(decoder.flush().includes("\uFFFD"));

        const skipping = tokenizer.createStreamDecoder({skipSpecialTokens: true});
        const out = [16382, ...tokenizer.encode("user\nhi"), 16383].map((id) => skipping.push(id)).join("") + skipping.flush();
        assert.equal(out, "user\nhi");
    });
});
