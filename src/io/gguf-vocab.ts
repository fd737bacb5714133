// gguf-vocab.ts: the tokenizer metadata of a GGUF model (SPEC-gguf §7) from a Hugging Face tokenizer folder
// (tokenizer.json, tokenizer_config.json, chat_template.jinja, config.json; tokenizer.model and added_tokens.json for
// SentencePiece), as convert_hf_to_gguf + gguf-py's SpecialVocab write it: GPT-2-style byte-level BPE tokenizers
// (Qwen2/2.5/3, Llama 3, Phi-4-mini) as llama.cpp's "gpt2" vocabulary (_set_vocab_gpt2), SentencePiece BPE
// tokenizers with byte fallback (Llama 2, TinyLlama, Mistral 7B, Phi-3, Gemma 3) as its "llama" (SPM) vocabulary
// read from tokenizer.model (_set_vocab_sentencepiece, Phi3MiniModel.set_vocab, Gemma3Model.set_vocab).
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {pathExists, readOptionalTextFile, readTextFile} from "./files.js";
import type {GgufMetadata} from "./gguf.js";
import {PieceType, readSentencePieceModel, SpmModelType, type SentencePieceModel} from "./sentencepiece.js";

/** llama.cpp token types (llama_token_type) */
export const TokenType = {NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6} as const;

export interface GgufVocab {
    /** tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece) */
    model: "gpt2" | "llama";
    /** tokenizer.ggml.pre */
    pre: string;
    /** one string per id 0..vocabSize-1 */
    tokens: string[];
    tokenTypes: number[];
    /** llama: tokenizer.ggml.scores, one float32 per token (llama.cpp's SPM tokenizer merges the best-scored pair) */
    scores: number[] | null;
    /** gpt2: "left right" in rank order (none for llama) */
    merges: string[];
    /** special token ids by gguf-py's type name (bos, eos, unk, sep, pad, mask) */
    specialIds: Map<string, number>;
    /** null: not written (llama.cpp's default for the vocabulary type applies: true for llama) */
    addBos: boolean | null;
    addEos: boolean | null;
    /** tokenizer.ggml.add_space_prefix, null: not written (llama.cpp's SPM default is true) */
    addSpacePrefix: boolean | null;
    /** the default chat template, and the named ones of a tokenizer_config list */
    chatTemplate: string | null;
    namedChatTemplates: Map<string, string>;
}

// the Split regexes of the byte-level BPE pre-tokenizers llama.cpp implements, as tokenizer.json writes them
const PRE_TOKENIZER_PATTERNS: ReadonlyArray<[string, string]> = [
    [
        "qwen2",
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ],
    [
        "llama-bpe",
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ],
    [
        // o200k (Phi-4-mini): llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT4O quotes this tokenizer.json regex
        "gpt-4o",
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|" +
            "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|" +
            "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ]
];

const SPECIAL_TOKEN_TYPES = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"] as const;

const SPECIAL_ID_KEYS: Record<string, string> = {
    bos: "tokenizer.ggml.bos_token_id",
    eos: "tokenizer.ggml.eos_token_id",
    unk: "tokenizer.ggml.unknown_token_id",
    sep: "tokenizer.ggml.seperator_token_id", // sic: gguf-py's spelling
    pad: "tokenizer.ggml.padding_token_id",
    mask: "tokenizer.ggml.mask_token_id"
};

/** SentencePiece's word-boundary mark, which its pieces carry for a space */
const SPM_SPACE = "\u2581";

type Json = Record<string, unknown>;

/** what the gpt2 and llama readers differ in: the token list and the keys written beside it */
type VocabTokens = Omit<GgufVocab, "specialIds" | "addBos" | "addEos" | "chatTemplate" | "namedChatTemplates">;

async function readJson(file: string, required: boolean): Promise<Json | null> {
    if (!(await pathExists(file))) {
        if (!required) return null;
        throw new QloraError("is missing; a GGUF export needs the model's tokenizer.json", {file});
    }
    const text = await readTextFile(file);
    try {
        const json = JSON.parse(text);
        if (json === null || typeof json !== "object" || Array.isArray(json)) throw new Error("not a JSON object");
        return json as Json;
    } catch (err) {
        throw new QloraError(`is not valid JSON (${(err as Error).message})`, {file});
    }
}

/** which llama.cpp pre-tokenizer (tokenizer.ggml.pre) matches the tokenizer.json pre_tokenizer, or null */
export function detectPreTokenizer(tokenizerJson: Json): string | null {
    const pre = tokenizerJson.pre_tokenizer as Json | null | undefined;
    if (!pre) return null;
    const steps = (pre.type === "Sequence" ? pre.pretokenizers : [pre]) as Json[] | undefined;
    if (!Array.isArray(steps)) return null;
    const patterns = steps.filter((s) => s?.type === "Split").map((s) => (s.pattern as Json | undefined)?.Regex);
    if (patterns.length === 0) {
        // plain GPT-2: a ByteLevel pre-tokenizer that applies its own regex
        const byteLevel = steps.find((s) => s?.type === "ByteLevel");
        return byteLevel && byteLevel.use_regex !== false ? "gpt-2" : null;
    }
    if (patterns.length !== 1) return null;
    return PRE_TOKENIZER_PATTERNS.find(([, p]) => p === patterns[0])?.[0] ?? null;
}

/** the steps of a normalizer or pre-tokenizer, a Sequence's flattened */
function steps(component: unknown, listKey: string): Json[] {
    if (component === null || typeof component !== "object") return [];
    const c = component as Json;
    if (c.type === "Sequence" && Array.isArray(c[listKey])) return (c[listKey] as unknown[]).flatMap((s) => steps(s, listKey));
    return [c];
}

/**
 * whether tokenizer.json marks word boundaries with "▁" as SentencePiece does (a Metaspace pre-tokenizer, or a
 * normalizer that writes spaces as "▁"): a SentencePiece tokenizer, whatever its BPE model says
 */
function usesSpmSpaces(tokenizerJson: Json): boolean {
    const pre = steps(tokenizerJson.pre_tokenizer, "pretokenizers");
    const norm = steps(tokenizerJson.normalizer, "normalizers");
    return (
        pre.some((s) => s.type === "Metaspace") ||
        norm.some((s) => (s.type === "Replace" && s.content === SPM_SPACE) || (s.type === "Prepend" && s.prepend === SPM_SPACE))
    );
}

/**
 * whether tokenizer.json puts "▁" before a text, as SentencePiece's add_dummy_prefix and llama.cpp's
 * add_space_prefix do: a Prepend("▁") normalizer (Llama 2's files) or a Metaspace pre-tokenizer that prepends
 * (Mistral v0.3's prepend_scheme "first"; "always", or add_prefix_space in older files). Gemma's Replace alone does not.
 */
function prependsSpace(tokenizerJson: Json): boolean {
    if (steps(tokenizerJson.normalizer, "normalizers").some((s) => s.type === "Prepend" && s.prepend === SPM_SPACE)) return true;
    const metaspace = steps(tokenizerJson.pre_tokenizer, "pretokenizers").find((s) => s.type === "Metaspace");
    if (!metaspace) return false;
    if (typeof metaspace.prepend_scheme === "string") return metaspace.prepend_scheme !== "never";
    return metaspace.add_prefix_space !== false;
}

/** convert_hf_to_gguf's does_token_look_special */
function looksSpecial(token: string): boolean {
    return (
        ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].includes(token) ||
        (token.startsWith("<|") && token.endsWith("|>")) ||
        (token.startsWith("<\uff5c") && token.endsWith("\uff5c>")) || // deepseek-coder's <｜...｜>
        (token.startsWith("<unused") && token.endsWith(">")) // gemma
    );
}

function tokenContent(entry: unknown): string | null {
    if (typeof entry === "string") return entry;
    if (entry && typeof entry === "object" && typeof (entry as Json).content === "string")
        return (entry as Json).content as string;
    return null;
}

export interface ReadVocabOptions {
    /** rows of the embedding (config.json vocab_size): the token list has exactly this many entries */
    vocabSize: number;
    /** override the detected tokenizer.ggml.pre (byte-level BPE tokenizers only) */
    preTokenizer?: string;
}

/**
 * The convert_hf_to_gguf model class whose set_vocab applies, by config.json's model_type: they read a SentencePiece
 * vocabulary differently (Phi3MiniModel has its own reading, Gemma3Model writes add_space_prefix false, LlamaModel
 * writes tokenizer_config's add_prefix_space); "other" for the rest (Qwen2Model/Qwen3Model: _set_vocab_sentencepiece)
 */
function vocabClass(modelConfig: Json | null): "llama" | "phi3" | "gemma3" | "other" {
    switch (modelConfig?.model_type) {
        case "llama":
        case "mistral":
            return "llama";
        case "phi3":
            return "phi3";
        case "gemma3":
        case "gemma3_text":
            return "gemma3";
        default:
            return "other";
    }
}

/** reads the tokenizer files of a model folder into the GGUF vocabulary */
export async function readGgufVocab(dir: string, opts: ReadVocabOptions): Promise<GgufVocab> {
    const tokenizerFile = path.join(dir, "tokenizer.json");
    const tokenizer = (await readJson(tokenizerFile, true))!;
    const config = await readJson(path.join(dir, "tokenizer_config.json"), false);
    const modelConfig = await readJson(path.join(dir, "config.json"), false);
    const model = tokenizer.model as Json | undefined;
    if (model?.type !== "BPE")
        throw new QloraError(
            `the tokenizer model is ${quoteValue(model?.type ?? null)}; the GGUF export supports BPE tokenizers: ` +
                "byte-level (Qwen2/2.5/3, Llama 3) and SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma 3)",
            {file: tokenizerFile}
        );
    const vocab = model.vocab as Record<string, number> | undefined;
    if (!vocab || typeof vocab !== "object") throw new QloraError("model.vocab is missing", {file: tokenizerFile});
    const kind = vocabClass(modelConfig);
    const n = opts.vocabSize;
    const addedTokens = readAddedTokens(tokenizer, tokenizerFile, n);

    let tokens: VocabTokens;
    if (model.byte_fallback === true) {
        if (opts.preTokenizer !== undefined)
            throw new QloraError(
                `a pre-tokenizer ("${opts.preTokenizer}") applies to byte-level BPE tokenizers; this SentencePiece-style ` +
                    'tokenizer is written as llama.cpp\'s "llama" vocabulary, whose pre-tokenizer is "default": leave it out',
                {file: tokenizerFile}
            );
        tokens = await readSpmTokens(dir, {tokenizer, tokenizerFile, vocab, config, addedTokens, kind, n});
    } else {
        if (usesSpmSpaces(tokenizer))
            throw new QloraError(
                "this is a SentencePiece-style BPE tokenizer without byte_fallback: llama.cpp's SentencePiece " +
                    "tokenizer writes a character outside the vocabulary as byte tokens, which this vocabulary lacks, so " +
                    "the GGUF export does not support it",
                {file: tokenizerFile}
            );
        tokens = readGpt2Tokens({tokenizer, tokenizerFile, vocab, addedTokens, n, preTokenizer: opts.preTokenizer});
        // LlamaModel.set_vocab writes tokenizer_config's add_prefix_space whichever vocabulary follows
        if (kind === "llama" && typeof config?.add_prefix_space === "boolean") tokens.addSpacePrefix = config.add_prefix_space;
    }

    const seen = new Map<string, number>();
    for (let id = 0; id < n; id++) {
        const other = seen.get(tokens.tokens[id]);
        if (other !== undefined)
            throw new QloraError(
                `token ${quoteValue(tokens.tokens[id])} appears at ids ${other} and ${id}; llama.cpp rejects a ` +
                    "vocabulary with duplicate tokens",
                {file: tokenizerFile}
            );
        seen.set(tokens.tokens[id], id);
    }

    const {specialIds, addBos, addEos} = readSpecialTokens(tokenizer, config, modelConfig, addedTokens, n);
    // chat templates: tokenizer_config (string or [{name, template}]); a chat_template.jinja beside it is the default
    // (newer transformers saves it there, and a fine-tune's training format is written there: it wins, as in
    // HfTokenizer)
    let chatTemplate: string | null = null;
    const namedChatTemplates = new Map<string, string>();
    const fromConfig = config?.chat_template;
    if (typeof fromConfig === "string") chatTemplate = fromConfig;
    else if (Array.isArray(fromConfig)) {
        for (const entry of fromConfig as Json[]) {
            const name = String(entry?.name ?? "").replace(/[^A-Za-z0-9]/g, "_");
            if (!name || typeof entry.template !== "string") continue;
            if (name === "default") chatTemplate = entry.template;
            else namedChatTemplates.set(name, entry.template);
        }
    }
    chatTemplate = (await readChatTemplateFile(dir)) ?? chatTemplate;

    return {
        ...tokens,
        specialIds,
        // _set_vocab_gpt2's files always say whether to add BOS (qlora writes false where the tokenizer does not);
        // a SentencePiece vocabulary says so only where the tokenizer files do, as SpecialVocab writes it
        addBos: tokens.model === "gpt2" ? (addBos ?? false) : addBos,
        addEos,
        chatTemplate,
        namedChatTemplates
    };
}

/** tokenizer.json's added_tokens, checked: {id, content, special} with ids inside the embedding */
function readAddedTokens(tokenizer: Json, tokenizerFile: string, n: number): {id: number; content: string; special: boolean}[] {
    const list = (Array.isArray(tokenizer.added_tokens) ? tokenizer.added_tokens : []) as Json[];
    return list.map((added, i) => {
        const id = added?.id as number,
            content = added?.content as string;
        if (added === null || typeof added !== "object" || !Number.isInteger(id) || typeof content !== "string")
            throw new QloraError(
                `added_tokens[${i}] is ${quoteValue(added)}, expected {"id": <token id>, "content": <text>, ...}`,
                {file: tokenizerFile}
            );
        if (id < 0 || id >= n)
            throw new QloraError(
                `added token ${quoteValue(content)} has id ${id}, outside the model's ${n} ` +
                    "embedding rows (config.json vocab_size)",
                {file: tokenizerFile}
            );
        return {id, content, special: added.special === true};
    });
}

interface TokenSources {
    tokenizer: Json;
    tokenizerFile: string;
    vocab: Record<string, number>;
    addedTokens: {id: number; content: string; special: boolean}[];
    n: number;
}

/** _set_vocab_gpt2: the BPE vocabulary and its added tokens, [PAD{id}] where an id has neither, and the merges */
function readGpt2Tokens(src: TokenSources & {preTokenizer?: string}): VocabTokens {
    const {tokenizer, tokenizerFile, vocab, n} = src;
    const model = tokenizer.model as Json;
    const pre = src.preTokenizer ?? detectPreTokenizer(tokenizer);
    if (!pre)
        throw new QloraError(
            "its pre_tokenizer matches none that qlora maps to llama.cpp (qwen2, llama-bpe, gpt-2); " +
                "pass the llama.cpp name with --pre-tokenizer (see llama-vocab.cpp)",
            {file: tokenizerFile}
        );

    // ids -> strings: the BPE vocabulary, then added tokens
    const tokens: (string | undefined)[] = new Array(n);
    const tokenTypes = new Array<number>(n).fill(TokenType.NORMAL);
    for (const [token, id] of Object.entries(vocab)) {
        if (!Number.isInteger(id) || id < 0 || id >= n)
            throw new QloraError(
                `token ${quoteValue(token)} has id ${id}, outside the model's ${n} embedding rows ` + "(config.json vocab_size)",
                {file: tokenizerFile}
            );
        tokens[id] = token;
    }
    for (const added of src.addedTokens) {
        tokens[added.id] = added.content;
        tokenTypes[added.id] = added.special || looksSpecial(added.content) ? TokenType.CONTROL : TokenType.USER_DEFINED;
    }
    const list: string[] = new Array(n);
    for (let id = 0; id < n; id++) {
        let token = tokens[id];
        if (token === undefined) {
            token = `[PAD${id}]`;
            tokenTypes[id] = TokenType.UNUSED;
        }
        list[id] = token;
    }

    // merges: "a b" strings, or [a, b] pairs (spaces inside a part re-encoded as U+0120 as gguf-py does)
    const rawMerges = model.merges as unknown[] | undefined;
    if (!Array.isArray(rawMerges) || rawMerges.length === 0)
        throw new QloraError("model.merges is missing or empty; llama.cpp needs the BPE merges", {file: tokenizerFile});
    const merges = rawMerges.map((m, i) => {
        if (typeof m === "string") return m;
        if (Array.isArray(m) && m.length === 2 && m.every((p) => typeof p === "string"))
            return (m as string[]).map((part) => part.replaceAll(" ", "\u0120")).join(" ");
        throw new QloraError(`model.merges[${i}] is ${quoteValue(m)}, expected "a b" or ["a", "b"]`, {file: tokenizerFile});
    });
    return {model: "gpt2", pre, tokens: list, tokenTypes, scores: null, merges, addSpacePrefix: null};
}

/** a SentencePiece piece type as the converters map it: SentencePieceProcessor's IsUnknown/IsControl/IsUnused/IsByte, else NORMAL (user-defined pieces too) */
function spmTokenType(type: number): number {
    switch (type) {
        case PieceType.UNKNOWN:
            return TokenType.UNKNOWN;
        case PieceType.CONTROL:
            return TokenType.CONTROL;
        case PieceType.UNUSED:
            return TokenType.UNUSED;
        case PieceType.BYTE:
            return TokenType.BYTE;
        default:
            return TokenType.NORMAL;
    }
}

/**
 * The SentencePiece vocabulary of a byte-fallback BPE tokenizer, from tokenizer.model as convert_hf_to_gguf reads
 * it (_create_vocab_sentencepiece; Phi3MiniModel.set_vocab for phi3): every id starts as [PAD{id}] (score -10000,
 * UNUSED), the pieces fill theirs with their score and type, then added_tokens.json and tokenizer_config.json's
 * added_tokens_decoder (phi3: and tokenizer.json's added_tokens) set their ids with score -1000. Checked against
 * tokenizer.json, which qlora tokenizes with: the same pieces at the same ids, and the same leading space. Without
 * tokenizer.model the pieces come from tokenizer.json, scored by its merges (piecesFromTokenizerJson).
 */
async function readSpmTokens(
    dir: string,
    src: TokenSources & {config: Json | null; kind: ReturnType<typeof vocabClass>}
): Promise<VocabTokens> {
    const {tokenizer, tokenizerFile, vocab, config, kind, n} = src;
    const modelFile = path.join(dir, "tokenizer.model");
    const byId = vocabById(vocab, tokenizerFile);
    let pieces: {piece: string; score: number; type: number}[];
    if (await pathExists(modelFile)) {
        const spm = await readSentencePieceModel(modelFile);
        checkSpmAgainstTokenizerJson(spm, byId, modelFile);
        pieces = spm.pieces.map((p) => ({piece: p.piece, score: p.score, type: spmTokenType(p.type)}));
    } else pieces = piecesFromTokenizerJson(tokenizer, byId, src.addedTokens, tokenizerFile);

    const tokens = Array.from({length: n}, (_, id) => `[PAD${id}]`);
    const scores = new Array<number>(n).fill(-10000);
    const tokenTypes = new Array<number>(n).fill(TokenType.UNUSED);
    // pieces past the embedding rows are left out, as the converter does
    for (let id = 0; id < Math.min(n, pieces.length); id++) {
        tokens[id] = pieces[id].piece;
        scores[id] = pieces[id].score;
        tokenTypes[id] = pieces[id].type;
    }
    const setAdded = (id: number, token: string, type: number) => {
        tokens[id] = token;
        scores[id] = -1000;
        tokenTypes[id] = type;
    };

    // added_tokens.json (slow tokenizers' saves): {"token": id}
    const addedFile = path.join(dir, "added_tokens.json");
    const addedJson = await readJson(addedFile, false);
    for (const [token, id] of Object.entries(addedJson ?? {})) {
        if (typeof id !== "number" || !Number.isInteger(id) || id < 0)
            throw new QloraError(`${quoteValue(token)} has id ${quoteValue(id)}, expected a token id`, {file: addedFile});
        if (id < n) setAdded(id, token, TokenType.USER_DEFINED);
    }

    // tokenizer_config.json's added_tokens_decoder: {"id": {"content", "special", ...}}
    const configFile = path.join(dir, "tokenizer_config.json");
    const decoder = config?.added_tokens_decoder;
    if (decoder !== undefined && (decoder === null || typeof decoder !== "object" || Array.isArray(decoder)))
        throw new QloraError(`added_tokens_decoder is ${quoteValue(decoder)}, expected {"<id>": {"content": ...}}`, {
            file: configFile
        });
    for (const [key, entry] of Object.entries((decoder ?? {}) as Json)) {
        const id = Number(key);
        const content = (entry as Json | null)?.content;
        if (!/^\d+$/.test(key) || !Number.isSafeInteger(id) || typeof content !== "string")
            throw new QloraError(
                `added_tokens_decoder["${key}"] is ${quoteValue(entry)}, expected a token id mapped to {"content": <text>, ...}`,
                {file: configFile}
            );
        const special = (entry as Json).special === true;
        if (kind === "phi3") {
            // Phi3MiniModel: no look-alike specials, no space rewriting; every id must exist (it indexes the list)
            if (id >= n)
                throw new QloraError(
                    `added token ${quoteValue(content)} has id ${id}, outside the model's ${n} embedding rows (config.json vocab_size)`,
                    {file: configFile}
                );
            setAdded(id, content, special ? TokenType.CONTROL : TokenType.USER_DEFINED);
        } else if (id < n) {
            if (special || looksSpecial(content)) setAdded(id, content, TokenType.CONTROL);
            // a user-defined token is matched in the text before SentencePiece's ▁ rewriting: its ▁ are spaces
            else setAdded(id, content.replaceAll(SPM_SPACE, " "), TokenType.USER_DEFINED);
        }
    }
    if (kind === "phi3")
        for (const added of src.addedTokens)
            setAdded(added.id, added.content, added.special ? TokenType.CONTROL : TokenType.USER_DEFINED);

    // add_space_prefix: LlamaModel writes tokenizer_config's add_prefix_space, Gemma3Model false; llama.cpp's SPM
    // default is true. Where that disagrees with tokenizer.json (qlora's tokenization, which the model was trained
    // with), tokenizer.json's is written, so that llama.cpp prepends the space exactly when qlora does
    let addSpacePrefix: boolean | null = null;
    if (kind === "llama" && typeof config?.add_prefix_space === "boolean") addSpacePrefix = config.add_prefix_space;
    if (kind === "gemma3") addSpacePrefix = false;
    const prepends = prependsSpace(tokenizer);
    if ((addSpacePrefix ?? true) !== prepends) addSpacePrefix = prepends;

    return {model: "llama", pre: "default", tokens, tokenTypes, scores, merges: [], addSpacePrefix};
}

/** tokenizer.json's model.vocab by id, each id once */
function vocabById(vocab: Record<string, number>, tokenizerFile: string): Map<number, string> {
    const byId = new Map<number, string>();
    for (const [token, id] of Object.entries(vocab)) {
        const other = byId.get(id);
        if (other !== undefined || !Number.isInteger(id) || id < 0)
            throw new QloraError(
                `model.vocab gives ${quoteValue(token)} the id ${quoteValue(id)}` +
                    (other !== undefined ? `, which ${quoteValue(other)} has too` : ", which is no token id"),
                {file: tokenizerFile}
            );
        byId.set(id, token);
    }
    return byId;
}

const BYTE_PIECE = /^<0x[0-9A-F]{2}>$/;

/**
 * tokenizer.model must be the tokenizer that tokenizer.json was converted from: a BPE model with the 256 byte
 * pieces, and every piece at its tokenizer.json id. A mismatch is a one-line error naming the first id that differs
 * (a GGUF from another tokenizer.model would tokenize otherwise than qlora trained).
 */
function checkSpmAgainstTokenizerJson(spm: SentencePieceModel, byId: Map<number, string>, modelFile: string): void {
    if (spm.trainerSpec.modelType !== SpmModelType.BPE) {
        const name = Object.entries(SpmModelType).find(([, v]) => v === spm.trainerSpec.modelType)?.[0];
        throw new QloraError(
            `trainer_spec.model_type is ${name ?? spm.trainerSpec.modelType}, where tokenizer.json is BPE: llama.cpp's ` +
                "SentencePiece tokenizer merges pieces by score as SentencePiece's BPE does, so the GGUF export supports BPE models only",
            {file: modelFile}
        );
    }
    // llama.cpp writes a character outside the vocabulary as its UTF-8 bytes' <0xXX> tokens
    const bytes = new Set(spm.pieces.filter((p) => p.type === PieceType.BYTE && BYTE_PIECE.test(p.piece)).map((p) => p.piece));
    if (bytes.size !== 256)
        throw new QloraError(
            `has ${bytes.size} of the 256 byte pieces <0x00>..<0xFF> (trainer_spec.byte_fallback ` +
                `${spm.trainerSpec.byteFallback}); llama.cpp writes characters outside the vocabulary as byte tokens, ` +
                "so the GGUF export needs all of them",
            {file: modelFile}
        );
    const mismatch = (what: string) =>
        new QloraError(
            `tokenizer.model and tokenizer.json are not the same tokenizer: ${what}; use the tokenizer.model that ` +
                "tokenizer.json was converted from",
            {file: modelFile}
        );
    for (let id = 0; id < spm.pieces.length; id++) {
        const token = byId.get(id);
        if (token !== spm.pieces[id].piece)
            throw mismatch(
                `id ${id} is ${quoteValue(spm.pieces[id].piece)} in tokenizer.model and ` +
                    `${token === undefined ? "no token" : quoteValue(token)} in tokenizer.json`
            );
    }
    if (byId.size !== spm.pieces.length)
        throw mismatch(`it has ${spm.pieces.length} pieces and model.vocab of tokenizer.json ${byId.size} tokens`);
}

/**
 * The pieces of a folder without tokenizer.model (transformers 5 saves none), from tokenizer.json. llama.cpp's SPM
 * tokenizer merges, among adjacent symbols whose concatenation is a token, the one whose token scores highest;
 * tokenizers' BPE merges the listed pair of lowest rank. transformers' SentencePiece converter lists every split of
 * every piece into two pieces, ordered by the piece's score, so scoring each token by minus the rank of its first
 * merge makes llama.cpp merge as tokenizer.json does (and as SentencePiece did). That holds only where every split of
 * a token into two tokens is listed: otherwise the export refuses (convert_hf_to_gguf's LlamaHfVocab scores
 * every token -1000, and llama.cpp then merges in an arbitrary order). Tokens no merge makes (characters, bytes,
 * special tokens) score 0, as SentencePiece's meta pieces do: no merge of two symbols makes them.
 * Types as LlamaHfVocab's: <0xXX> BYTE, special added tokens CONTROL; the unk token UNKNOWN; the rest NORMAL.
 */
function piecesFromTokenizerJson(
    tokenizer: Json,
    byId: Map<number, string>,
    addedTokens: readonly {id: number; content: string; special: boolean}[],
    tokenizerFile: string
): {piece: string; score: number; type: number}[] {
    const refuse = (why: string) =>
        new QloraError(
            "this is a SentencePiece-style BPE tokenizer (byte_fallback, as in Llama 2, Gemma 3, TinyLlama or Mistral " +
                `v0.1) and the folder has no tokenizer.model; ${why}: copy the base model's tokenizer.model into the folder`,
            {file: tokenizerFile}
        );
    const model = tokenizer.model as Json;
    const special = new Set(addedTokens.filter((a) => a.special).map((a) => a.id));
    const pieces: {piece: string; score: number; type: number}[] = [];
    for (let id = 0; id < byId.size; id++) {
        const piece = byId.get(id);
        if (piece === undefined)
            throw refuse(`model.vocab has no token with id ${id}, where SentencePiece numbers its pieces 0..n-1`);
        const type = BYTE_PIECE.test(piece)
            ? TokenType.BYTE
            : special.has(id)
              ? TokenType.CONTROL
              : piece === model.unk_token
                ? TokenType.UNKNOWN
                : TokenType.NORMAL;
        pieces.push({piece, score: 0, type});
    }
    const bytes = new Set(pieces.filter((p) => p.type === TokenType.BYTE).map((p) => p.piece));
    if (bytes.size !== 256) throw refuse(`model.vocab has ${bytes.size} of the 256 byte tokens <0x00>..<0xFF> it needs`);

    const rawMerges = Array.isArray(model.merges) ? (model.merges as unknown[]) : [];
    const firstRank = new Map<string, number>();
    const listed = new Set<string>();
    rawMerges.forEach((m, rank) => {
        const space = typeof m === "string" ? m.indexOf(" ") : -1;
        const pair =
            space > 0
                ? [(m as string).slice(0, space), (m as string).slice(space + 1)]
                : Array.isArray(m) && m.length === 2 && m.every((p) => typeof p === "string")
                  ? (m as string[])
                  : null;
        if (!pair)
            throw new QloraError(`model.merges[${rank}] is ${quoteValue(m)}, expected "a b" or ["a", "b"]`, {
                file: tokenizerFile
            });
        const merged = pair[0] + pair[1];
        if (!firstRank.has(merged)) firstRank.set(merged, rank);
        listed.add(`${pair[0]}\u0000${pair[1]}`);
    });
    const tokens = new Set(byId.values());
    for (const token of firstRank.keys())
        if (!tokens.has(token)) throw refuse(`model.merges makes ${quoteValue(token)}, which is not in model.vocab`);
    // every token, merged or not: llama.cpp merges any two adjacent symbols that make a token, tokenizers only a listed pair
    for (const token of tokens) {
        for (let i = 1; i < token.length; i++) {
            const left = token.slice(0, i),
                right = token.slice(i);
            if (tokens.has(left) && tokens.has(right) && !listed.has(`${left}\u0000${right}`))
                throw refuse(
                    `its merges are not a SentencePiece model's (${quoteValue(left)} + ${quoteValue(right)} makes ` +
                        `${quoteValue(token)} but is not listed), so the scores llama.cpp's SentencePiece tokenizer ` +
                        "merges by cannot be derived from them"
                );
        }
    }
    for (const p of pieces) {
        const rank = firstRank.get(p.piece);
        if (rank !== undefined) p.score = -rank;
    }
    return pieces;
}

/**
 * gguf-py's SpecialVocab: special ids from tokenizer_config's *_token matched against tokenizer.json's added
 * tokens, then config.json's *_token_id; add_bos/add_eos from tokenizer_config, else a TemplateProcessing
 * post-processor that wraps with BOS/EOS (null: neither says)
 */
function readSpecialTokens(
    tokenizer: Json,
    config: Json | null,
    modelConfig: Json | null,
    addedTokens: {id: number; content: string}[],
    n: number
): {specialIds: Map<string, number>; addBos: boolean | null; addEos: boolean | null} {
    const specialIds = new Map<string, number>();
    const setSpecial = (type: string, id: unknown) => {
        if (typeof id !== "number" || !Number.isInteger(id) || id < 0 || id >= n || specialIds.has(type)) return;
        specialIds.set(type, id);
    };
    if (config) {
        for (const type of SPECIAL_TOKEN_TYPES) {
            const content = tokenContent(config[`${type}_token`]);
            if (content === null) continue;
            setSpecial(type, addedTokens.find((a) => a.content === content)?.id);
        }
    }
    if (modelConfig) for (const type of SPECIAL_TOKEN_TYPES) setSpecial(type, modelConfig[`${type}_token_id`]);

    let addBos: boolean | null = typeof config?.add_bos_token === "boolean" ? config.add_bos_token : null;
    let addEos: boolean | null = typeof config?.add_eos_token === "boolean" ? config.add_eos_token : null;
    const post = tokenizer.post_processor as Json | null | undefined;
    const processors = (post ? (post.type === "Sequence" ? post.processors : [post]) : []) as Json[];
    const template = processors.find((p) => p?.type === "TemplateProcessing");
    if (template && Array.isArray(template.single)) {
        const single = template.single as Json[];
        const idOf = (item: Json | undefined) => ((item?.SpecialToken as Json | undefined)?.id as string | undefined) ?? null;
        const first = single.length > 1 ? idOf(single[0]) : null;
        const last = single.length > 1 ? idOf(single[single.length - 1]) : null;
        const bosContent = config ? tokenContent(config.bos_token) : null;
        const eosContent = config ? tokenContent(config.eos_token) : null;
        if (addBos === null && first !== null) addBos = first === bosContent || bosContent === null;
        if (addEos === null && last !== null) addEos = last === eosContent;
    }
    return {specialIds, addBos, addEos};
}

/** writes tokenizer.* keys */
export function addVocabMetadata(md: GgufMetadata, vocab: GgufVocab): void {
    md.string("tokenizer.ggml.model", vocab.model);
    md.string("tokenizer.ggml.pre", vocab.pre);
    md.array("tokenizer.ggml.tokens", "string", vocab.tokens);
    if (vocab.scores) md.array("tokenizer.ggml.scores", "f32", vocab.scores);
    md.array("tokenizer.ggml.token_type", "i32", vocab.tokenTypes);
    if (vocab.merges.length > 0) md.array("tokenizer.ggml.merges", "string", vocab.merges);
    for (const [type, key] of Object.entries(SPECIAL_ID_KEYS)) {
        const id = vocab.specialIds.get(type);
        if (id !== undefined) md.u32(key, id);
    }
    if (vocab.addBos !== null) md.bool("tokenizer.ggml.add_bos_token", vocab.addBos);
    if (vocab.addEos !== null) md.bool("tokenizer.ggml.add_eos_token", vocab.addEos);
    if (vocab.addSpacePrefix !== null) md.bool("tokenizer.ggml.add_space_prefix", vocab.addSpacePrefix);
    for (const [name, template] of vocab.namedChatTemplates) md.string(`tokenizer.chat_template.${name}`, template);
    if (vocab.namedChatTemplates.size > 0) md.array("tokenizer.chat_templates", "string", [...vocab.namedChatTemplates.keys()]);
    if (vocab.chatTemplate !== null) md.string("tokenizer.chat_template", vocab.chatTemplate);
}

/** the largest chat_template.jinja read (templates are kilobytes; the renderer has its own, smaller limit) */
export const MAX_CHAT_TEMPLATE_BYTES = 4 << 20;

/** a folder's chat_template.jinja (a model's, or an adapter's training format), or null when it has none */
export async function readChatTemplateFile(dir: string): Promise<string | null> {
    return readOptionalTextFile(path.join(dir, "chat_template.jinja"), {
        what: "chat template",
        maxBytes: MAX_CHAT_TEMPLATE_BYTES
    });
}
