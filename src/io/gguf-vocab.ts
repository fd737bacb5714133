// gguf-vocab.ts: the tokenizer metadata of a GGUF model (SPEC-gguf §7) from a Hugging Face tokenizer folder
// (tokenizer.json, tokenizer_config.json, chat_template.jinja, config.json), as convert_hf_to_gguf's
// _set_vocab_gpt2 + gguf-py's SpecialVocab write it, for GPT-2-style byte-level BPE tokenizers (Qwen2/2.5/3,
// Llama 3).
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {pathExists, readOptionalTextFile, readTextFile} from "./files.js";
import type {GgufMetadata} from "./gguf.js";

/** llama.cpp token types (llama_token_type) */
export const TokenType = {NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6} as const;

export interface GgufVocab {
    /** tokenizer.ggml.model */
    model: "gpt2";
    /** tokenizer.ggml.pre */
    pre: string;
    /** one string per id 0..vocabSize-1 */
    tokens: string[];
    tokenTypes: number[];
    /** "left right" in rank order */
    merges: string[];
    /** special token ids by gguf-py's type name (bos, eos, unk, sep, pad, mask) */
    specialIds: Map<string, number>;
    addBos: boolean;
    addEos: boolean | null;
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

type Json = Record<string, unknown>;

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

/** convert_hf_to_gguf's does_token_look_special */
function looksSpecial(token: string): boolean {
    return ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].includes(token) || (token.startsWith("<|") && token.endsWith("|>"));
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
    /** override the detected tokenizer.ggml.pre */
    preTokenizer?: string;
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
            `the tokenizer model is ${quoteValue(model?.type ?? null)}; the GGUF export supports ` +
                "byte-level BPE tokenizers (Qwen2/2.5/3, Llama 3)",
            {file: tokenizerFile}
        );
    if (model.byte_fallback === true)
        throw new QloraError(
            "this is a SentencePiece-style BPE tokenizer (byte_fallback, as in Llama 2, Gemma 3, TinyLlama or " +
                "Mistral v0.1); the GGUF export supports byte-level BPE tokenizers (Qwen2/2.5/3, Llama 3) only so far",
            {file: tokenizerFile}
        );
    const vocab = model.vocab as Record<string, number> | undefined;
    if (!vocab || typeof vocab !== "object") throw new QloraError("model.vocab is missing", {file: tokenizerFile});

    const pre = opts.preTokenizer ?? detectPreTokenizer(tokenizer);
    if (!pre)
        throw new QloraError(
            "its pre_tokenizer matches none that qlora maps to llama.cpp (qwen2, llama-bpe, gpt-2); " +
                "pass the llama.cpp name with --pre-tokenizer (see llama-vocab.cpp)",
            {file: tokenizerFile}
        );

    // ids -> strings: the BPE vocabulary, then added tokens
    const n = opts.vocabSize;
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
    const addedTokens = (Array.isArray(tokenizer.added_tokens) ? tokenizer.added_tokens : []) as Json[];
    for (const [i, added] of addedTokens.entries()) {
        const id = added?.id as number,
            content = added?.content as string;
        if (added === null || typeof added !== "object" || !Number.isInteger(id) || typeof content !== "string")
            throw new QloraError(
                `added_tokens[${i}] is ${quoteValue(added)}, expected {"id": <token id>, "content": <text>, ...}`,
                {
                    file: tokenizerFile
                }
            );
        if (id < 0 || id >= n)
            throw new QloraError(
                `added token ${quoteValue(content)} has id ${id}, outside the model's ${n} ` +
                    "embedding rows (config.json vocab_size)",
                {file: tokenizerFile}
            );
        tokens[id] = content;
        tokenTypes[id] = added.special === true || looksSpecial(content) ? TokenType.CONTROL : TokenType.USER_DEFINED;
    }
    const seen = new Map<string, number>();
    const list: string[] = new Array(n);
    for (let id = 0; id < n; id++) {
        let token = tokens[id];
        if (token === undefined) {
            token = `[PAD${id}]`;
            tokenTypes[id] = TokenType.UNUSED;
        }
        const other = seen.get(token);
        if (other !== undefined)
            throw new QloraError(
                `token ${quoteValue(token)} appears at ids ${other} and ${id}; llama.cpp rejects a ` +
                    "vocabulary with duplicate tokens",
                {file: tokenizerFile}
            );
        seen.set(token, id);
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

    // special ids: tokenizer_config's *_token matched against added tokens, then config.json's *_token_id
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

    // add_bos/add_eos: tokenizer_config wins; else a TemplateProcessing post-processor that wraps with BOS/EOS
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
        model: "gpt2",
        pre,
        tokens: list,
        tokenTypes,
        merges,
        specialIds,
        addBos: addBos ?? false,
        addEos,
        chatTemplate,
        namedChatTemplates
    };
}

/** writes tokenizer.* keys */
export function addVocabMetadata(md: GgufMetadata, vocab: GgufVocab): void {
    md.string("tokenizer.ggml.model", vocab.model);
    md.string("tokenizer.ggml.pre", vocab.pre);
    md.array("tokenizer.ggml.tokens", "string", vocab.tokens);
    md.array("tokenizer.ggml.token_type", "i32", vocab.tokenTypes);
    md.array("tokenizer.ggml.merges", "string", vocab.merges);
    for (const [type, key] of Object.entries(SPECIAL_ID_KEYS)) {
        const id = vocab.specialIds.get(type);
        if (id !== undefined) md.u32(key, id);
    }
    md.bool("tokenizer.ggml.add_bos_token", vocab.addBos);
    if (vocab.addEos !== null) md.bool("tokenizer.ggml.add_eos_token", vocab.addEos);
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
