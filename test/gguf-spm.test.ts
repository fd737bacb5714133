// GGUF export of SentencePiece-style tokenizers (BPE with byte fallback: Llama 2, TinyLlama, Mistral, Phi-3, Gemma 3),
// issue 15: llama.cpp's "llama" vocabulary written from tokenizer.model as convert_hf_to_gguf writes it (pieces,
// scores, types, added tokens, [PAD] rows, special ids, add_space_prefix). test/fixtures/spm (made by
// scripts/references/make_spm_refs.py) holds two tiny SentencePiece models trained as Llama 2's and Gemma 3's were,
// with their tokenizer.json and the ids SentencePiece and the tokenizers library give for texts that need byte
// fallback, leading, repeated and trailing spaces and newlines. llama.cpp, loading the exported GGUF, tokenizes them
// as SentencePiece does and as qlora does, and generates qlora's greedy tokens.
import {after, before, test} from "node:test";
import assert from "node:assert/strict";
import {cpSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import type {LlamaModel, Token} from "node-llama-cpp";
import {exportGguf} from "../src/api/export-gguf.js";
import {QloraError} from "../src/errors.js";
import {readGgufVocab, TokenType} from "../src/io/gguf-vocab.js";
import {PieceType, parseSentencePieceModel, SpmModelType} from "../src/io/sentencepiece.js";
import {DecoderModel} from "../src/model/decoder.js";
import {generate} from "../src/model/generate.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {checkGgufInLlamaCpp, GEMMA3} from "./helpers/arch-checks.js";
import {llamaGreedy, llamaMeanKl, loadGguf} from "./helpers/llama-cpp.js";
import {REPO_ROOT} from "./helpers/paths.js";
import {Rng} from "../src/backend/rng.js";

const SPM = path.join(REPO_ROOT, "test", "fixtures", "spm");
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-gguf-spm-"));
after(() => rmSync(tmp, {recursive: true, force: true}));

interface Expected {
    texts: string[];
    sentencepiece: number[][];
    tokenizers: number[][];
    special_texts: string[];
    special_tokenizers: number[][];
    metaspace?: {normalizer: unknown; pre_tokenizer: unknown; tokenizers: number[][]; special_tokenizers: number[][]};
}
const expected = (name: string): Expected => JSON.parse(readFileSync(path.join(SPM, name, "expected.json"), "utf8"));

// 1000 pieces (gemma3: and <image_soft_token> at 1000), padded to 1024 embedding rows: [PAD1001].. as the converter writes
const VOCAB = 1024;
const LLAMA_CONFIG = {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    vocab_size: VOCAB,
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 512,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
    hidden_act: "silu"
};

/** a synthetic llama checkpoint with the fixture's tokenizer files (config overrides merged in) */
async function modelWithTokenizer(name: string, fixture: string, config: Record<string, unknown> = {}): Promise<string> {
    const dir = path.join(tmp, name);
    await writeSyntheticCheckpoint(dir, {config: {...LLAMA_CONFIG, ...config}, dtype: "F32", seed: 11, std: 0.3});
    for (const f of ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"])
        cpSync(path.join(SPM, fixture, f), path.join(dir, f));
    return dir;
}

function editJson(file: string, change: (j: Record<string, unknown>) => void): void {
    const j = JSON.parse(readFileSync(file, "utf8"));
    change(j);
    writeFileSync(file, JSON.stringify(j));
}

async function metadataOf(file: string): Promise<Record<string, unknown>> {
    return (await gguf(file, {allowLocalFile: true})).metadata as unknown as Record<string, unknown>;
}

const same = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((v, i) => v === b[i]);

/**
 * llama.cpp's ids of every text (parse_special off for the plain texts, on for the special ones, no BOS added as
 * common_tokenize is called) against the lists given; returns how many matched
 */
function llamaTokenizes(
    model: LlamaModel,
    texts: string[],
    want: number[][],
    specialTokens: boolean
): {matched: number; differing: string[]} {
    const differing: string[] = [];
    texts.forEach((text, i) => {
        if (!same(Array.from(model.tokenize(text, specialTokens)), want[i])) differing.push(text);
    });
    return {matched: texts.length - differing.length, differing};
}

test("tokenizer.model: the fixtures' pieces, scores, types and trainer spec are read as SentencePiece wrote them", () => {
    for (const name of ["llama", "gemma3"]) {
        const spm = parseSentencePieceModel(readFileSync(path.join(SPM, name, "tokenizer.model")), name);
        const tj = JSON.parse(readFileSync(path.join(SPM, name, "tokenizer.json"), "utf8"));
        assert.equal(spm.pieces.length, 1000);
        assert.equal(spm.trainerSpec.modelType, SpmModelType.BPE);
        assert.equal(spm.trainerSpec.byteFallback, true);
        // tokenizer.json was converted from it: the same piece at every id
        for (const [token, id] of Object.entries(tj.model.vocab as Record<string, number>))
            assert.equal(spm.pieces[id].piece, token);
        const bytes = spm.pieces.filter((p) => p.type === PieceType.BYTE);
        assert.equal(bytes.length, 256);
        assert.deepEqual(bytes.map((p) => p.piece).slice(0, 2), ["<0x00>", "<0x01>"]);
        // BPE scores: the merged pieces in training order, each scored below the one before
        const normal = spm.pieces.filter((p) => p.type === PieceType.NORMAL);
        assert.ok(normal.length > 600);
        assert.ok(normal.every((p, i) => i === 0 || p.score <= normal[i - 1].score));
    }
    const llama = parseSentencePieceModel(readFileSync(path.join(SPM, "llama", "tokenizer.model")), "llama");
    assert.deepEqual(
        llama.pieces.slice(0, 4).map((p) => [p.piece, p.type]),
        [
            ["<unk>", PieceType.UNKNOWN],
            ["<s>", PieceType.CONTROL],
            ["</s>", PieceType.CONTROL],
            ["<0x00>", PieceType.BYTE]
        ]
    );
    const gemma = parseSentencePieceModel(readFileSync(path.join(SPM, "gemma3", "tokenizer.model")), "gemma3");
    assert.deepEqual(
        gemma.pieces.slice(0, 7).map((p) => [p.piece, p.type]),
        [
            ["<pad>", PieceType.CONTROL],
            ["<eos>", PieceType.CONTROL],
            ["<bos>", PieceType.CONTROL],
            ["<unk>", PieceType.UNKNOWN],
            ["<mask>", PieceType.CONTROL],
            ["[@BOS@]", PieceType.CONTROL],
            ["<start_of_turn>", PieceType.USER_DEFINED]
        ]
    );
});

/** protobuf encoding, for hand-made models */
function varint(v: number): number[] {
    const out: number[] = [];
    do {
        out.push((v % 128) | (v >= 128 ? 0x80 : 0));
        v = Math.floor(v / 128);
    } while (v > 0);
    return out;
}
const field = (n: number, wire: number, body: number[]) =>
    wire === 2 ? [...varint(n * 8 + 2), ...varint(body.length), ...body] : [...varint(n * 8 + wire), ...body];
function pieceMessage(piece: string, score: number, type: number): number[] {
    const f = new Uint8Array(new Float32Array([score]).buffer);
    return field(1, 2, [...field(1, 2, [...Buffer.from(piece)]), ...field(2, 5, [...f]), ...field(3, 0, varint(type))]);
}

test("tokenizer.model: a hand-made ModelProto (unknown fields, defaults) parses; anything malformed is one line naming the file", () => {
    // a piece without a type is NORMAL; trainer_spec without model_type is UNIGRAM; unknown fields (top-level 99,
    // trainer_spec.vocab_size, a 64-bit field) are skipped
    const bytes = Uint8Array.from([
        ...pieceMessage("<unk>", 0, 2),
        ...field(1, 2, field(1, 2, [...Buffer.from("▁a")])),
        ...field(2, 2, [...field(4, 0, varint(2)), ...field(35, 0, [1])]),
        ...field(99, 1, [1, 2, 3, 4, 5, 6, 7, 8]),
        ...field(3, 2, field(3, 0, [0]))
    ]);
    const m = parseSentencePieceModel(bytes, "hand.model");
    assert.deepEqual(m.pieces, [
        {piece: "<unk>", score: 0, type: PieceType.UNKNOWN},
        {piece: "▁a", score: 0, type: PieceType.NORMAL}
    ]);
    assert.deepEqual(m.trainerSpec, {modelType: SpmModelType.UNIGRAM, byteFallback: true});

    const file = "/models/x/tokenizer.model";
    const rejects = (buf: Uint8Array, pattern: RegExp) =>
        assert.throws(
            () => parseSentencePieceModel(buf, file),
            (e: unknown) =>
                e instanceof QloraError &&
                e.message.startsWith(`${file}: `) &&
                !e.message.includes("\n") &&
                pattern.test(e.message)
        );
    rejects(new Uint8Array(0), /has no pieces/);
    rejects(Buffer.from('{"version": "1.0", "model": {"type": "BPE"}}'), /not a readable SentencePiece model/);
    // tiktoken's file (Llama 3's original/tokenizer.model): base64 tokens and ranks, one per line
    rejects(Buffer.from("IQ== 0\nIg== 1\nIw== 2\n"), /not a readable SentencePiece model|has no pieces/);
    rejects(Uint8Array.from(field(1, 2, field(1, 2, [0xff, 0xfe]))), /pieces\[0\]\.piece at byte \d+ is not UTF-8/);
    rejects(Uint8Array.from(field(1, 2, [...field(1, 2, [0x61]), ...field(3, 0, [9])])), /has type 9/);
    rejects(Uint8Array.from(field(1, 0, [1])), /ModelProto field 1 at byte 0 has wire type 0, expected 2/);

    // every truncation and many byte flips of the fixture: a model or a QloraError naming the file, never another error
    const real = readFileSync(path.join(SPM, "llama", "tokenizer.model"));
    const rng = new Rng(5);
    const tries: Uint8Array[] = [];
    for (let i = 0; i < 300; i++) tries.push(real.subarray(0, rng.int(real.length)));
    for (let i = 0; i < 300; i++) {
        const b = Uint8Array.from(real);
        for (let k = 0; k < 4; k++) b[rng.int(b.length)] = rng.int(256);
        tries.push(b);
    }
    let refused = 0;
    for (const buf of tries) {
        try {
            parseSentencePieceModel(buf, file);
        } catch (e) {
            assert.ok(e instanceof QloraError && e.message.startsWith(`${file}: `), String(e));
            refused++;
        }
    }
    assert.ok(refused > 250, `${refused} of ${tries.length} damaged models refused`);
});

test("qlora's tokenizer on SentencePiece-style tokenizer.json (Llama 2's Prepend + Replace normalizer, Gemma's Replace; byte fallback; Metaspace in the Mistral v0.3 test): the tokenizers library's ids, and decode and stream decode give every text back", async () => {
    for (const name of ["llama", "gemma3"]) {
        const exp = expected(name);
        const tokenizer = await HfTokenizer.load(path.join(SPM, name));
        for (const [i, text] of exp.texts.entries()) {
            const ids = tokenizer.encode(text);
            assert.deepEqual(ids, exp.tokenizers[i], JSON.stringify(text));
            const stream = tokenizer.createStreamDecoder();
            const streamed = ids.map((id) => stream.push(id)).join("") + stream.flush();
            assert.deepEqual([tokenizer.decode(ids), streamed], [text, text], `${name}: ${JSON.stringify(text)}`);
        }
        assert.deepEqual(
            exp.special_texts.map((t) => tokenizer.encode(t)),
            exp.special_tokenizers
        );
    }
});

let llamaDir: string;
let llamaGguf: string;
before(async () => {
    llamaDir = await modelWithTokenizer("spm-llama", "llama");
    llamaGguf = path.join(tmp, "spm-llama-f16.gguf");
    await exportGguf({modelDir: llamaDir, outtype: "f16", out: llamaGguf});
});

test("Llama 2's tokenizer kind: the GGUF holds llama.cpp's SPM vocabulary as convert_hf_to_gguf writes it", async () => {
    const md = await metadataOf(llamaGguf);
    const spm = parseSentencePieceModel(readFileSync(path.join(SPM, "llama", "tokenizer.model")), "llama");
    assert.equal(md["tokenizer.ggml.model"], "llama");
    assert.equal(md["tokenizer.ggml.pre"], "default");
    const tokens = md["tokenizer.ggml.tokens"] as string[];
    const scores = md["tokenizer.ggml.scores"] as number[];
    const types = md["tokenizer.ggml.token_type"] as number[];
    assert.equal(tokens.length, VOCAB);
    assert.deepEqual(
        tokens.slice(0, 1000),
        spm.pieces.map((p) => p.piece)
    );
    assert.deepEqual(tokens.slice(1000, 1002), ["[PAD1000]", "[PAD1001]"]);
    // tokenizer_config's added_tokens_decoder makes <unk>, <s>, </s> CONTROL with score -1000, as the converter does
    assert.deepEqual(scores.slice(0, 3), [-1000, -1000, -1000]);
    assert.deepEqual(
        scores.slice(3, 1000),
        spm.pieces.slice(3).map((p) => p.score)
    );
    assert.deepEqual([scores[1000], scores[VOCAB - 1]], [-10000, -10000]);
    assert.deepEqual(types.slice(0, 3), [TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL]);
    assert.ok(types.slice(3, 259).every((t) => t === TokenType.BYTE));
    assert.ok(types.slice(259, 1000).every((t) => t === TokenType.NORMAL));
    assert.ok(types.slice(1000).every((t) => t === TokenType.UNUSED));
    assert.equal(md["tokenizer.ggml.bos_token_id"], 1);
    assert.equal(md["tokenizer.ggml.eos_token_id"], 2);
    assert.equal(md["tokenizer.ggml.unknown_token_id"], 0);
    assert.equal(md["tokenizer.ggml.add_bos_token"], true);
    assert.equal(md["tokenizer.ggml.add_eos_token"], false);
    assert.ok(!("tokenizer.ggml.merges" in md), "an SPM vocabulary has no merges");
    assert.ok(!("tokenizer.ggml.add_space_prefix" in md), "LlamaModel writes none here: llama.cpp's default (true) holds");
});

test("Llama 2's tokenizer kind: llama.cpp tokenizes as SentencePiece and qlora do, and generates qlora's greedy tokens", async () => {
    const exp = expected("llama");
    const tokenizer = await HfTokenizer.load(llamaDir);
    const ours = exp.texts.map((t) => tokenizer.encode(t));
    assert.deepEqual(ours, exp.tokenizers, "qlora's tokenizer is the tokenizers library's");
    assert.deepEqual(ours, exp.sentencepiece, "Llama 2's tokenizer.json tokenizes as SentencePiece");
    const model = await DecoderModel.load(llamaDir);
    const llama = await loadGguf(llamaGguf);
    try {
        const plain = llamaTokenizes(llama, exp.texts, exp.sentencepiece, false);
        const special = llamaTokenizes(llama, exp.special_texts, exp.special_tokenizers, true);
        console.log(
            `llama SPM: llama.cpp = SentencePiece = qlora on ${plain.matched}/${exp.texts.length} texts, ` +
                `${special.matched}/${exp.special_texts.length} with special tokens`
        );
        assert.deepEqual(plain.differing, []);
        assert.deepEqual(special.differing, []);
        // llama.cpp's text of the ids (the leading space it added removed) is the text
        for (const [i, text] of exp.texts.entries())
            assert.equal(
                llama.detokenize(exp.sentencepiece[i] as Token[]),
                tokenizer.decode(exp.sentencepiece[i]),
                JSON.stringify(text)
            );

        const ids = tokenizer.encode("床前明月光，疑是地上霜。 The quick brown fox 🦙", {addSpecialTokens: true});
        assert.equal(ids[0], 1, "<s> first, as the post-processor adds it");
        const {meanKl, top1Agreement} = await llamaMeanKl(llama, ids, model.forward(Int32Array.from(ids), 1, ids.length));
        const prompt = tokenizer.encode("Once upon a time", {addSpecialTokens: true});
        const oursGreedy = generate(model, prompt, {maxNewTokens: 16, greedy: true, eosTokenIds: []}).newIds;
        const theirs = await llamaGreedy(llama, prompt, {maxNewTokens: 16});
        console.log(`llama SPM f16: mean KL ${meanKl.toExponential(2)} over ${ids.length} positions, top-1 ${top1Agreement}`);
        assert.ok(meanKl < 1e-3, `mean KL ${meanKl}`);
        assert.equal(top1Agreement, 1);
        assert.deepEqual(theirs, oursGreedy);
        assert.ok(new Set(oursGreedy).size > 4, `greedy text of several tokens: ${oursGreedy}`);
        console.log(`llama SPM greedy: ${JSON.stringify(tokenizer.decode(oursGreedy))}`);
    } finally {
        await llama.dispose();
    }
});

test("Mistral v0.3's tokenizer.json shape (Metaspace, prepend_scheme first): the same GGUF; llama.cpp follows SentencePiece, which differs from tokenizers only before a leading space", async () => {
    const exp = expected("llama");
    const dir = await modelWithTokenizer("spm-metaspace", "llama");
    editJson(path.join(dir, "tokenizer.json"), (j) => {
        j.normalizer = exp.metaspace!.normalizer;
        j.pre_tokenizer = exp.metaspace!.pre_tokenizer;
    });
    const out = path.join(tmp, "spm-metaspace.gguf");
    await exportGguf({modelDir: dir, outtype: "f16", out});
    const md = await metadataOf(out);
    const base = await metadataOf(llamaGguf);
    for (const key of ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"])
        assert.deepEqual(md[key], base[key], key);
    assert.ok(!("tokenizer.ggml.add_space_prefix" in md), "Metaspace prepends ▁ as llama.cpp's default does");

    const tokenizer = await HfTokenizer.load(dir);
    const ours = exp.texts.map((t) => tokenizer.encode(t));
    assert.deepEqual(ours, exp.metaspace!.tokenizers, "qlora's tokenizer is the tokenizers library's");
    assert.deepEqual(
        exp.special_texts.map((t) => tokenizer.encode(t)),
        exp.metaspace!.special_tokenizers
    );
    const llama = await loadGguf(out);
    try {
        const plain = llamaTokenizes(llama, exp.texts, exp.sentencepiece, false);
        const withQlora = llamaTokenizes(llama, exp.texts, ours, false);
        console.log(
            `metaspace SPM: llama.cpp = SentencePiece on ${plain.matched}/${exp.texts.length} texts, = qlora on ${withQlora.matched}`
        );
        assert.deepEqual(plain.differing, []);
        // tokenizers' Metaspace adds no ▁ before a text that starts with one (HF's non-legacy behaviour); SentencePiece
        // and llama.cpp always add it
        assert.deepEqual(
            withQlora.differing,
            exp.texts.filter((t) => t.startsWith(" "))
        );
        // and none after a special token, where llama.cpp (as with Llama 2's files) puts one
        const special = llamaTokenizes(llama, exp.special_texts, exp.special_tokenizers, true);
        const specialVsQlora = llamaTokenizes(llama, exp.special_texts, exp.metaspace!.special_tokenizers, true);
        assert.deepEqual([special.differing, specialVsQlora.matched], [[], 0]);
    } finally {
        await llama.dispose();
    }
});

test("Gemma 3's tokenizer kind: no space prefix, its special ids and turn tokens; llama.cpp tokenizes as SentencePiece and qlora do", async () => {
    const exp = expected("gemma3");
    // llama architecture (the tokenizer is what is tested): tokenizer.json prepends no ▁, so add_space_prefix false
    // is written against llama.cpp's SPM default
    const dir = await modelWithTokenizer("spm-gemma-tok", "gemma3", {bos_token_id: 2, eos_token_id: 1, pad_token_id: 0});
    const out = path.join(tmp, "spm-gemma-tok.gguf");
    await exportGguf({modelDir: dir, outtype: "f16", out});
    const md = await metadataOf(out);
    assert.equal(md["tokenizer.ggml.add_space_prefix"], false);
    assert.deepEqual(
        [
            md["tokenizer.ggml.bos_token_id"],
            md["tokenizer.ggml.eos_token_id"],
            md["tokenizer.ggml.unknown_token_id"],
            md["tokenizer.ggml.padding_token_id"]
        ],
        [2, 1, 3, 0]
    );
    const tokens = md["tokenizer.ggml.tokens"] as string[];
    const types = md["tokenizer.ggml.token_type"] as number[];
    const scores = md["tokenizer.ggml.scores"] as number[];
    // user-defined pieces (NORMAL for the converter) made CONTROL by added_tokens_decoder; <image_soft_token> past the pieces
    assert.deepEqual(tokens.slice(6, 10), ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]);
    assert.ok(types.slice(0, 10).every((t) => t === TokenType.CONTROL));
    assert.deepEqual([tokens[1000], types[1000], scores[1000]], ["<image_soft_token>", TokenType.CONTROL, -1000]);
    assert.deepEqual([tokens[1001], types[1001]], ["[PAD1001]", TokenType.UNUSED]);
    assert.match(md["tokenizer.chat_template"] as string, /<start_of_turn>/);

    const tokenizer = await HfTokenizer.load(dir);
    const ours = exp.texts.map((t) => tokenizer.encode(t));
    assert.deepEqual(ours, exp.tokenizers);
    assert.deepEqual(ours, exp.sentencepiece);
    const llama = await loadGguf(out);
    try {
        const plain = llamaTokenizes(llama, exp.texts, exp.sentencepiece, false);
        const special = llamaTokenizes(llama, exp.special_texts, exp.special_tokenizers, true);
        console.log(
            `gemma3 SPM: llama.cpp = SentencePiece = qlora on ${plain.matched}/${exp.texts.length} texts, ` +
                `${special.matched}/${exp.special_texts.length} with special tokens`
        );
        assert.deepEqual(plain.differing, []);
        assert.deepEqual(special.differing, []);
        const chat = tokenizer.encode(
            tokenizer.applyChatTemplate([{role: "user", content: "Write a poem."}], {addGenerationPrompt: true})
        );
        assert.equal(chat[0], 2);
        const model = await DecoderModel.load(dir);
        const ours16 = generate(model, chat, {maxNewTokens: 16, greedy: true, eosTokenIds: []}).newIds;
        assert.deepEqual(await llamaGreedy(llama, chat, {maxNewTokens: 16}), ours16);
    } finally {
        await llama.dispose();
    }
});

test("a Gemma 3 model with Gemma 3's tokenizer kind: llama.cpp's gemma3 tokenizes and generates as qlora does", async () => {
    const exp = expected("gemma3");
    const dir = path.join(tmp, "spm-gemma3");
    await writeSyntheticCheckpoint(dir, {
        config: {...GEMMA3, vocab_size: VOCAB, bos_token_id: 2, eos_token_id: 1, pad_token_id: 0},
        dtype: "F32",
        seed: 7,
        std: 0.15
    });
    for (const f of ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"])
        cpSync(path.join(SPM, "gemma3", f), path.join(dir, f));
    const tokenizer = await HfTokenizer.load(dir);
    const chat = tokenizer.encode(
        tokenizer.applyChatTemplate([{role: "user", content: "写一首关于海的诗 🌊"}], {addGenerationPrompt: true})
    );
    assert.deepEqual(chat.slice(0, 2), [2, 6], "<bos><start_of_turn>");
    // exports as f16 with Gemma3Model's add_space_prefix false; mean KL and greedy tokens against qlora
    await checkGgufInLlamaCpp(dir, tmp, chat, chat, {
        expectMetadata: {
            "general.architecture": "gemma3",
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.add_space_prefix": false,
            "tokenizer.ggml.bos_token_id": 2
        }
    });
    const llama = await loadGguf(path.join(tmp, "spm-gemma3-f16.gguf"));
    try {
        const plain = llamaTokenizes(llama, exp.texts, exp.sentencepiece, false);
        const special = llamaTokenizes(llama, exp.special_texts, exp.special_tokenizers, true);
        assert.deepEqual([plain.differing, special.differing], [[], []]);
    } finally {
        await llama.dispose();
    }
});

test("Phi-3's tokenizer (Llama 2's with <|endoftext|> and the chat tokens added): a phi3 GGUF named Phi-3 loads in llama.cpp, which tokenizes and generates as qlora does", async () => {
    const exp = expected("llama");
    const dir = path.join(tmp, "spm-phi3");
    await writeSyntheticCheckpoint(dir, {
        config: {
            architectures: ["Phi3ForCausalLM"],
            model_type: "phi3",
            vocab_size: VOCAB,
            hidden_size: 128,
            intermediate_size: 192,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            max_position_embeddings: 4096,
            partial_rotary_factor: 0.5,
            rope_theta: 10000,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            sliding_window: null,
            bos_token_id: 1,
            eos_token_id: 1000,
            hidden_act: "silu"
        },
        dtype: "F32",
        // a seed whose 16 greedy steps all have a top-1/top-2 logit gap over 0.28 (seed 5's 0.004 flips in f16)
        seed: 11,
        std: 0.3
    });
    for (const f of ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"])
        cpSync(path.join(SPM, "llama", f), path.join(dir, f));
    // Phi-3-mini's added tokens (32000.. there): in tokenizer.json and tokenizer_config.json's added_tokens_decoder
    const added = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"];
    editJson(path.join(dir, "tokenizer.json"), (j) => {
        for (const [i, content] of added.entries())
            (j.added_tokens as unknown[]).push({
                id: 1000 + i,
                content,
                single_word: false,
                lstrip: false,
                rstrip: i > 0,
                normalized: false,
                special: true
            });
    });
    editJson(path.join(dir, "tokenizer_config.json"), (j) => {
        for (const [i, content] of added.entries())
            (j.added_tokens_decoder as Record<string, unknown>)[String(1000 + i)] = {content, special: true};
        j.eos_token = "<|endoftext|>";
        j.chat_template =
            "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}" +
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";
    });
    // llama.cpp gives a model named Phi-3 that vocabulary's token attributes, looking up </s>, <unk>, <s> and
    // <|endoftext|> by text: the SentencePiece vocabulary has them
    const out = path.join(tmp, "spm-phi3.gguf");
    await exportGguf({modelDir: dir, outtype: "f16", out, name: "Phi-3 spm test"});
    const md = await metadataOf(out);
    assert.equal(md["tokenizer.ggml.model"], "llama");
    assert.equal(md["tokenizer.ggml.eos_token_id"], 1000);
    assert.deepEqual((md["tokenizer.ggml.token_type"] as number[]).slice(1000, 1005), [3, 3, 3, 3, TokenType.UNUSED]);
    const tokenizer = await HfTokenizer.load(dir);
    const model = await DecoderModel.load(dir);
    const llama = await loadGguf(out);
    try {
        const plain = llamaTokenizes(llama, exp.texts, exp.sentencepiece, false);
        assert.deepEqual(plain.differing, []);
        const chat = tokenizer.encode(
            tokenizer.applyChatTemplate([{role: "user", content: "写一首诗 about the sea"}], {addGenerationPrompt: true}),
            {addSpecialTokens: true}
        );
        assert.ok(chat.includes(1003) && chat.includes(1001), "<|user|> and <|assistant|> are single tokens");
        const text = tokenizer.applyChatTemplate([{role: "user", content: "写一首诗 about the sea"}], {
            addGenerationPrompt: true
        });
        assert.deepEqual(Array.from(llama.tokenize(text, true)), tokenizer.encode(text));
        const {meanKl} = await llamaMeanKl(llama, chat, model.forward(Int32Array.from(chat), 1, chat.length));
        console.log(`phi3 SPM f16: mean KL ${meanKl.toExponential(2)} over ${chat.length} positions`);
        assert.ok(meanKl < 1e-3, `mean KL ${meanKl}`);
        const ours = generate(model, chat, {maxNewTokens: 16, greedy: true, eosTokenIds: []}).newIds;
        assert.deepEqual(await llamaGreedy(llama, chat, {maxNewTokens: 16}), ours);
    } finally {
        await llama.dispose();
    }
});

test("without tokenizer.model (transformers 5 saves none) the scores come from tokenizer.json's merges, and llama.cpp still tokenizes as SentencePiece and qlora do", async () => {
    for (const [fixture, config] of [
        ["llama", {}],
        ["gemma3", {bos_token_id: 2, eos_token_id: 1, pad_token_id: 0}]
    ] as const) {
        const exp = expected(fixture);
        const withModel = path.join(tmp, `with-model-${fixture}.gguf`);
        const dir = await modelWithTokenizer(`no-model-${fixture}`, fixture, config);
        await exportGguf({modelDir: dir, outtype: "f16", out: withModel});
        rmSync(path.join(dir, "tokenizer.model"));
        const out = path.join(tmp, `no-model-${fixture}.gguf`);
        await exportGguf({modelDir: dir, outtype: "f16", out});
        const md = await metadataOf(out);
        const base = await metadataOf(withModel);
        // the same tokens and types (the pieces' types from tokenizer.json: bytes, specials, unk), other scores
        for (const key of ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix"])
            assert.deepEqual(md[key], base[key], key);
        assert.notDeepEqual(md["tokenizer.ggml.scores"], base["tokenizer.ggml.scores"]);
        const llama = await loadGguf(out);
        try {
            const plain = llamaTokenizes(llama, exp.texts, exp.sentencepiece, false);
            const special = llamaTokenizes(llama, exp.special_texts, exp.special_tokenizers, true);
            console.log(
                `${fixture} SPM without tokenizer.model: llama.cpp = SentencePiece = qlora on ${plain.matched}/${exp.texts.length} ` +
                    `texts, ${special.matched}/${exp.special_texts.length} with special tokens`
            );
            assert.deepEqual(plain.differing, []);
            assert.deepEqual(special.differing, []);
        } finally {
            await llama.dispose();
        }
    }
});

test("the vocabulary follows the converter's model class: Gemma 3 writes add_space_prefix false, Phi-3 reads tokenizer.json's added tokens", async () => {
    const dir = path.join(tmp, "vocab-only");
    cpSync(path.join(SPM, "gemma3"), dir, {recursive: true});
    writeFileSync(path.join(dir, "config.json"), JSON.stringify({model_type: "gemma3_text", bos_token_id: 2}));
    const gemma = await readGgufVocab(dir, {vocabSize: 1001});
    assert.equal(gemma.model, "llama");
    assert.equal(gemma.addSpacePrefix, false);
    assert.equal(gemma.addBos, true);

    const llamaDirOnly = path.join(tmp, "vocab-llama");
    cpSync(path.join(SPM, "llama"), llamaDirOnly, {recursive: true});
    // an added token of tokenizer.json only (no added_tokens_decoder entry): Phi3MiniModel reads it, the others do not
    editJson(path.join(llamaDirOnly, "tokenizer.json"), (j) => {
        (j.added_tokens as unknown[]).push(
            {id: 1000, content: "<|endoftext|>", special: true},
            {id: 1001, content: "<|user|>", special: false}
        );
    });
    // added_tokens.json (slow tokenizers' saves) and a non-special added_tokens_decoder entry whose ▁ are spaces
    writeFileSync(path.join(llamaDirOnly, "added_tokens.json"), JSON.stringify({"<extra>": 1002}));
    editJson(path.join(llamaDirOnly, "tokenizer_config.json"), (j) => {
        (j.added_tokens_decoder as Record<string, unknown>)["1003"] = {content: "▁▁indent", special: false};
    });
    const config = (modelType: string) =>
        writeFileSync(path.join(llamaDirOnly, "config.json"), JSON.stringify({model_type: modelType}));
    config("llama");
    const llama = await readGgufVocab(llamaDirOnly, {vocabSize: 1008});
    assert.deepEqual(llama.tokens.slice(1000, 1005), ["[PAD1000]", "[PAD1001]", "<extra>", "  indent", "[PAD1004]"]);
    assert.deepEqual(llama.tokenTypes.slice(1000, 1005), [5, 5, 4, 4, 5]);
    assert.deepEqual(llama.scores!.slice(1000, 1005), [-10000, -10000, -1000, -1000, -10000]);
    config("phi3");
    const phi3 = await readGgufVocab(llamaDirOnly, {vocabSize: 1008});
    assert.deepEqual(phi3.tokens.slice(1000, 1004), ["<|endoftext|>", "<|user|>", "<extra>", "▁▁indent"]);
    assert.deepEqual(phi3.tokenTypes.slice(1000, 1004), [TokenType.CONTROL, TokenType.USER_DEFINED, 4, 4]);
    // tokenizer_config's add_prefix_space (LlamaModel) is written; a value against tokenizer.json's Prepend is not
    config("llama");
    editJson(path.join(llamaDirOnly, "tokenizer_config.json"), (j) => {
        j.add_prefix_space = true;
    });
    assert.equal((await readGgufVocab(llamaDirOnly, {vocabSize: 1008})).addSpacePrefix, true);
    editJson(path.join(llamaDirOnly, "tokenizer_config.json"), (j) => {
        j.add_prefix_space = false;
    });
    assert.equal((await readGgufVocab(llamaDirOnly, {vocabSize: 1008})).addSpacePrefix, true);
});

test("what the SentencePiece export refuses, in one line naming the file", async () => {
    const refuse = async (name: string, change: (dir: string) => void, pattern: RegExp) => {
        const dir = path.join(tmp, `refuse-${name}`);
        cpSync(llamaDir, dir, {recursive: true});
        change(dir);
        const out = path.join(tmp, `refuse-${name}.gguf`);
        await assert.rejects(
            exportGguf({modelDir: dir, outtype: "f16", out}),
            (e: unknown) => e instanceof QloraError && !e.message.includes("\n") && pattern.test(e.message)
        );
        assert.equal(existsSync(out), false);
    };
    // without tokenizer.model, scores come from merges that list every split of a token (transformers' SentencePiece
    // converter); other merges cannot give them (llama.cpp's own fallback scores every token -1000, and its SPM
    // tokenizer then merges in another order)
    await refuse(
        "no-model-split",
        (d) => {
            rmSync(path.join(d, "tokenizer.model"));
            editJson(path.join(d, "tokenizer.json"), (j) => {
                const model = j.model as {merges: string[][]};
                model.merges = model.merges.filter(([a, b]) => !(a === "▁t" && b === "he"));
            });
        },
        /tokenizer\.json: this is a SentencePiece-style BPE tokenizer \(byte_fallback.*has no tokenizer\.model; its merges are not a SentencePiece model's \("▁t" \+ "he" makes "▁the" but is not listed\).*copy the base model's tokenizer\.model/
    );
    await refuse(
        "no-model-bytes",
        (d) => {
            rmSync(path.join(d, "tokenizer.model"));
            editJson(path.join(d, "tokenizer.json"), (j) => {
                const model = j.model as {vocab: Record<string, number>};
                model.vocab.notabyte = model.vocab["<0x41>"];
                delete model.vocab["<0x41>"];
            });
        },
        /has no tokenizer\.model; model\.vocab has 255 of the 256 byte tokens/
    );
    await refuse(
        "other-model",
        (d) => cpSync(path.join(SPM, "gemma3", "tokenizer.model"), path.join(d, "tokenizer.model")),
        /tokenizer\.model: tokenizer\.model and tokenizer\.json are not the same tokenizer: id 0 is "<pad>" in tokenizer\.model and "<unk>"/
    );
    await refuse(
        "truncated",
        (d) => writeFileSync(path.join(d, "tokenizer.model"), readFileSync(path.join(d, "tokenizer.model")).subarray(0, 5000)),
        /tokenizer\.model: is not a readable SentencePiece model \(.*runs past the end/
    );
    await refuse(
        "unigram",
        (d) => {
            // the fixture with trainer_spec.model_type UNIGRAM appended (a later field wins in protobuf)
            const buf = readFileSync(path.join(d, "tokenizer.model"));
            writeFileSync(path.join(d, "tokenizer.model"), Buffer.concat([buf, Uint8Array.from(field(2, 2, field(3, 0, [1])))]));
        },
        /trainer_spec\.model_type is UNIGRAM, where tokenizer\.json is BPE/
    );
    await refuse(
        "no-byte-fallback",
        (d) =>
            editJson(path.join(d, "tokenizer.json"), (j) => {
                (j.model as Record<string, unknown>).byte_fallback = false;
            }),
        /SentencePiece-style BPE tokenizer without byte_fallback/
    );
    const dir = path.join(tmp, "refuse-pre");
    cpSync(llamaDir, dir, {recursive: true});
    await assert.rejects(
        exportGguf({modelDir: dir, outtype: "f16", out: path.join(tmp, "pre.gguf"), preTokenizer: "llama-bpe"}),
        /a pre-tokenizer \("llama-bpe"\) applies to byte-level BPE tokenizers/
    );
});
