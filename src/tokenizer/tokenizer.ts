// A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json + chat template) behind one small class.
//
// Tokenization itself is @huggingface/tokenizers (pure JS, the tokenizer transformers.js uses); chat templates are
// rendered with @huggingface/jinja, given the same variables transformers' apply_chat_template passes.

import path from "node:path";
import {Tokenizer} from "@huggingface/tokenizers";
import type {Template} from "@huggingface/jinja";
import {QloraError, quoteValue} from "../errors.js";
import {readOptionalTextFile} from "../io/files.js";
import {DEFAULT_TEMPLATE_LIMITS, isStackOverflow, parseTemplate, renderTemplate, TemplateLimitError} from "./bounded-template.js";

/** the files of a model folder that define its tokenizer and generation settings: copied along with a model or
 * an adapter (merged models, checkpoints) so the output is usable on its own */
export const TOKENIZER_FOLDER_FILES: readonly string[] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json"
];

export const TOKENIZER_FILE_NAME = "tokenizer.json";
export const TOKENIZER_CONFIG_FILE_NAME = "tokenizer_config.json";
export const CHAT_TEMPLATE_FILE_NAME = "chat_template.jinja";

export interface ChatMessage {
    role: string;
    content: string;
    /** templates may read more fields (name, tool_calls…); they are passed through */
    [key: string]: unknown;
}

export interface SpecialToken {
    /**
     * the tokenizer_config.json role of the token ("bos_token", "eos_token", "pad_token", "unk_token", …) when it
     * has one, "additional_special_token" when it is listed there, else "special"
     */
    name: string;
    content: string;
    id: number;
}

export interface EncodeOptions {
    /** add the tokenizer's own special tokens (e.g. a Llama BOS); off by default because chat templates add them */
    addSpecialTokens?: boolean;
}

export interface DecodeOptions {
    skipSpecialTokens?: boolean;
}

export interface ChatTemplateOptions {
    /** end with the assistant header so the model writes the reply */
    addGenerationPrompt?: boolean;
    /** for tokenizer configs with several named templates; "default" when not given */
    templateName?: string;
    /** extra template variables (tools, documents, enable_thinking…); they override the defaults */
    extra?: Record<string, unknown>;
}

export interface StreamDecoder {
    /** adds one token and returns the text it completed (often "", while a multi-byte character is still partial) */
    push(id: number): string;
    /** returns whatever is still held back (a trailing incomplete character comes out as U+FFFD) */
    flush(): string;
}

// the special-token roles transformers passes to chat templates (SPECIAL_TOKENS_ATTRIBUTES)
const SPECIAL_TOKEN_ROLES = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] as const;

interface TemplateSource {
    /** "default", or its name in a tokenizer_config.json list of templates */
    name: string;
    text: string;
    /** where it came from, for messages */
    origin: string;
}

// what to do about a template that is too big, too slow or too deep for any real chat template
const BROKEN_TEMPLATE_ADVICE =
    "the template is broken or hostile: fix or replace it (e.g. with the one from the model's original repository)";

/** a template's own error message as part of a one-line QloraError: newlines folded, length capped */
function templateMessage(err: unknown): string {
    const text = (err instanceof Error ? err.message : String(err)).replace(/\s*\n\s*/g, " ").trim();
    return text.length > 300 ? text.slice(0, 300) + "…" : text;
}

/**
 * Token ids in tokenizer.json must be ids: the tokenizers library takes any JSON value there, and a string or
 * fraction then surfaces later as a token id that decoding rejects. Checked once, naming the entry.
 */
function checkTokenIds(json: Record<string, unknown>, file: string): void {
    const isId = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 0;
    const model = json.model as Record<string, unknown> | null | undefined;
    const vocab = model && typeof model === "object" ? model.vocab : undefined;
    if (vocab && typeof vocab === "object" && !Array.isArray(vocab))
        for (const [token, id] of Object.entries(vocab))
            if (!isId(id))
                throw new QloraError(
                    `model.vocab[${quoteValue(token)}] is ${quoteValue(id)}, expected a token id (an integer >= 0)`,
                    {file}
                );
    const added = json.added_tokens;
    if (Array.isArray(added))
        added.forEach((entry, i) => {
            const id = (entry as {id?: unknown} | null)?.id;
            if (!isId(id))
                throw new QloraError(`added_tokens[${i}].id is ${quoteValue(id)}, expected a token id (an integer >= 0)`, {file});
        });
}

export class HfTokenizer {
    /** the folder the tokenizer was loaded from */
    readonly dir: string;
    readonly bosTokenId: number | null;
    readonly eosTokenId: number | null;
    readonly padTokenId: number | null;
    readonly specialTokens: readonly SpecialToken[];
    /** number of distinct tokens, added tokens included (transformers' len(tokenizer)) */
    readonly vocabSize: number;
    /**
     * the characters of the longest vocabulary entry (added tokens included): no token covers more characters of
     * a text (a byte-level entry has one character per byte, and a text character is at least one byte)
     */
    readonly longestTokenChars: number;
    private readonly tokenizer: Tokenizer;
    private readonly config: Record<string, unknown>;
    private readonly templates: Map<string, TemplateSource>;
    private readonly compiledTemplates = new Map<string, Template>();

    private constructor(
        dir: string,
        tokenizer: Tokenizer,
        config: Record<string, unknown>,
        templates: Map<string, TemplateSource>
    ) {
        this.dir = dir;
        this.tokenizer = tokenizer;
        this.config = config;
        this.templates = templates;
        const vocab = tokenizer.get_vocab(true);
        this.vocabSize = vocab.size;
        let longest = 1;
        // a damaged added_tokens entry can leave a key that is not a string: it spans no text
        for (const token of vocab.keys()) if (typeof token === "string" && token.length > longest) longest = token.length;
        this.longestTokenChars = longest;
        this.bosTokenId = this.roleTokenId("bos_token");
        this.eosTokenId = this.roleTokenId("eos_token");
        this.padTokenId = this.roleTokenId("pad_token");
        this.specialTokens = this.collectSpecialTokens();
    }

    /** Loads `<dir>/tokenizer.json` (required), `tokenizer_config.json` and `chat_template.jinja` (optional). */
    static async load(dir: string): Promise<HfTokenizer> {
        const tokenizerPath = path.join(dir, TOKENIZER_FILE_NAME);
        const tokenizerText = await readOptionalText(tokenizerPath);
        if (tokenizerText === null) {
            throw new QloraError(
                `has no ${TOKENIZER_FILE_NAME}; qlora needs the fast-tokenizer file that Hugging Face model repositories ` +
                    "ship (for a model with only tokenizer.model or vocab.json, load and save it with transformers' " +
                    "AutoTokenizer once to create tokenizer.json)",
                {file: dir}
            );
        }
        const tokenizerJson = parseJsonObject(tokenizerText, tokenizerPath);
        checkTokenIds(tokenizerJson, tokenizerPath);

        const configPath = path.join(dir, TOKENIZER_CONFIG_FILE_NAME);
        const configText = await readOptionalText(configPath);
        const config =
            configText === null
                ? {}
                : normalizeTokenizerConfig(parseJsonObject(configText, configPath), configPath, tokenizerJson);

        const templates = readTemplatesFromConfig(config, configPath);
        const templatePath = path.join(dir, CHAT_TEMPLATE_FILE_NAME);
        // UTF-8 takes at most 4 bytes a character; parseTemplate reports a template longer than the limit
        const templateFileText = await readOptionalText(templatePath, 4 * DEFAULT_TEMPLATE_LIMITS.templateChars);
        // a separate chat_template.jinja is what newer transformers saves, and it wins over the config's copy
        if (templateFileText !== null) templates.set("default", {name: "default", text: templateFileText, origin: templatePath});

        let tokenizer: Tokenizer;
        try {
            tokenizer = new Tokenizer(tokenizerJson, config);
        } catch (err) {
            throw new QloraError(
                `cannot build a tokenizer from it (${(err as Error).message}); the file may be from an unsupported ` +
                    "tokenizer type or corrupt (re-download it)",
                {file: tokenizerPath, cause: err}
            );
        }
        return new HfTokenizer(dir, tokenizer, config, templates);
    }

    get hasChatTemplate(): boolean {
        return this.templates.size > 0;
    }

    /** the text of a chat template (the default one unless named), or null when there is none */
    chatTemplateText(name?: string): string | null {
        return this.templates.size === 0 ? null : this.templateSource(name).text;
    }

    /**
     * This tokenizer with `text` as its only chat template: a fine-tune's training format (chat_template.jinja
     * beside an adapter) or a --template file. The template is checked now, so a broken one fails at load.
     */
    withChatTemplate(text: string, origin: string): HfTokenizer {
        const t = new HfTokenizer(this.dir, this.tokenizer, this.config, new Map([["default", {name: "default", text, origin}]]));
        t.compileTemplate(t.templateSource(undefined));
        return t;
    }

    /** names of the chat templates available ("default" for a single one) */
    get chatTemplateNames(): string[] {
        return [...this.templates.keys()];
    }

    encode(text: string, options: EncodeOptions = {}): number[] {
        return this.tokenizer.encode(text, {add_special_tokens: options.addSpecialTokens ?? false}).ids;
    }

    decode(ids: readonly number[], options: DecodeOptions = {}): string {
        if (ids.length === 0) return ""; // the library rejects an empty list
        return this.tokenizer.decode(ids as number[], {skip_special_tokens: options.skipSpecialTokens ?? false});
    }

    tokenToId(token: string): number | null {
        return this.tokenizer.token_to_id(token) ?? null;
    }

    idToToken(id: number): string | null {
        return this.tokenizer.id_to_token(id) ?? null;
    }

    /**
     * Renders messages with the model's chat template, as transformers' apply_chat_template(tokenize=False) does,
     * within DEFAULT_TEMPLATE_LIMITS (time, size, depth): the template comes from the model folder and is not trusted.
     */
    applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
        const source = this.templateSource(options.templateName);
        const template = this.compileTemplate(source);
        const variables: Record<string, unknown> = {
            messages,
            add_generation_prompt: options.addGenerationPrompt ?? false,
            ...this.specialTokenVariables(),
            ...options.extra
        };
        try {
            return renderTemplate(template, variables);
        } catch (err) {
            if (err instanceof TemplateLimitError) {
                throw new QloraError(`the chat template "${source.name}" ${err.message}; ${BROKEN_TEMPLATE_ADVICE}`, {
                    file: source.origin,
                    cause: err
                });
            }
            throw new QloraError(
                `the chat template failed on these messages: ${templateMessage(err)} ` +
                    "(templates often require alternating user/assistant roles or a particular first role)",
                {file: source.origin, cause: err}
            );
        }
    }

    /**
     * A decoder for streamed generation. It re-decodes a small window of recent ids and emits only text that can
     * no longer change, so a multi-byte character split across tokens is held back instead of coming out as
     * U+FFFD, and decoders that treat the start of a text specially (SentencePiece's leading space) stay right.
     */
    createStreamDecoder(options: DecodeOptions = {}): StreamDecoder {
        const ids: number[] = [];
        let prefixOffset = 0; // start of the window that is decoded again for context
        let readOffset = 0; // end of the text already emitted
        const decodeRange = (from: number, to?: number): string => this.decode(ids.slice(from, to), options);
        return {
            push: (id: number): string => {
                ids.push(id);
                const emittedText = decodeRange(prefixOffset, readOffset);
                const windowText = decodeRange(prefixOffset);
                if (windowText.length > emittedText.length && !windowText.endsWith("\uFFFD")) {
                    prefixOffset = readOffset;
                    readOffset = ids.length;
                    return windowText.slice(emittedText.length);
                }
                return "";
            },
            flush: (): string => {
                const emittedText = decodeRange(prefixOffset, readOffset);
                const windowText = decodeRange(prefixOffset);
                prefixOffset = readOffset = ids.length;
                return windowText.length > emittedText.length ? windowText.slice(emittedText.length) : "";
            }
        };
    }

    private roleTokenId(role: string): number | null {
        const content = this.config[role];
        return typeof content === "string" ? this.tokenToId(content) : null;
    }

    private collectSpecialTokens(): SpecialToken[] {
        const roleOf = new Map<string, string>();
        for (const role of SPECIAL_TOKEN_ROLES) {
            const content = this.config[role];
            if (typeof content === "string" && !roleOf.has(content)) roleOf.set(content, role);
        }
        const additional = this.config.additional_special_tokens;
        if (Array.isArray(additional)) {
            for (const content of additional) {
                if (typeof content === "string" && !roleOf.has(content)) roleOf.set(content, "additional_special_token");
            }
        }
        const tokens: SpecialToken[] = [];
        for (const [id, added] of this.tokenizer.get_added_tokens_decoder()) {
            if (added.special) tokens.push({name: roleOf.get(added.content) ?? "special", content: added.content, id});
        }
        return tokens.sort((a, b) => a.id - b.id);
    }

    // transformers passes special_tokens_map (the token strings) to every template render
    private specialTokenVariables(): Record<string, unknown> {
        const variables: Record<string, unknown> = {};
        for (const role of SPECIAL_TOKEN_ROLES) {
            const content = this.config[role];
            if (typeof content === "string") variables[role] = content;
        }
        if (Array.isArray(this.config.additional_special_tokens)) {
            variables.additional_special_tokens = this.config.additional_special_tokens;
        }
        return variables;
    }

    private templateSource(name: string | undefined): TemplateSource {
        const wanted = name ?? "default";
        const source =
            this.templates.get(wanted) ??
            (name === undefined && this.templates.size === 1 ? [...this.templates.values()][0] : undefined);
        if (source) return source;
        if (this.templates.size === 0) {
            throw new QloraError(
                `the tokenizer has no chat template (no "chat_template" in ${TOKENIZER_CONFIG_FILE_NAME} and no ` +
                    `${CHAT_TEMPLATE_FILE_NAME}); use a model that has one (usually its "-Instruct" or "-Chat" variant), ` +
                    "or train on plain text / prompt-completion data instead of chat messages",
                {file: this.dir}
            );
        }
        throw new QloraError(
            `has no chat template named "${wanted}" (available: ${this.chatTemplateNames.join(", ")}); pick one of those`,
            {file: path.join(this.dir, TOKENIZER_CONFIG_FILE_NAME)}
        );
    }

    private compileTemplate(source: TemplateSource): Template {
        const key = source.origin + "\0" + source.text;
        let template = this.compiledTemplates.get(key);
        if (!template) {
            try {
                template = parseTemplate(source.text);
            } catch (err) {
                if (err instanceof TemplateLimitError) {
                    throw new QloraError(`the chat template "${source.name}" ${err.message}; ${BROKEN_TEMPLATE_ADVICE}`, {
                        file: source.origin,
                        cause: err
                    });
                }
                if (isStackOverflow(err)) {
                    throw new QloraError(
                        `the chat template "${source.name}" cannot be parsed: it nests brackets or blocks deeper than the ` +
                            `parser can follow; ${BROKEN_TEMPLATE_ADVICE}`,
                        {file: source.origin, cause: err}
                    );
                }
                throw new QloraError(
                    `the chat template cannot be parsed (${templateMessage(err)}); it may use Jinja features ` +
                        "@huggingface/jinja does not support — fix the template or pass one that parses",
                    {file: source.origin, cause: err}
                );
            }
            this.compiledTemplates.set(key, template);
        }
        return template;
    }
}

// A missing optional file is null; anything else that stops reading it (a FIFO, a folder, no permission) is an error.
async function readOptionalText(filePath: string, maxBytes?: number): Promise<string | null> {
    try {
        return await readOptionalTextFile(filePath, {maxBytes});
    } catch (err) {
        if (((err as Error).cause as NodeJS.ErrnoException | undefined)?.code === "ENOTDIR") {
            throw new QloraError("is not a folder; give the model folder that holds tokenizer.json", {
                file: path.dirname(filePath),
                cause: err
            });
        }
        throw err;
    }
}

function parseJsonObject(text: string, file: string): Record<string, unknown> {
    let value: unknown;
    try {
        value = JSON.parse(text);
    } catch (err) {
        throw new QloraError(`is not valid JSON (${(err as Error).message}); re-download the file`, {file, cause: err});
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
        throw new QloraError("should hold a JSON object; re-download the file", {file});
    }
    return value as Record<string, unknown>;
}

// Older tokenizer_config.json files store special tokens as serialized AddedToken objects
// ({"__type": "AddedToken", "content": "<s>", …}); everything downstream wants the plain strings.
function normalizeTokenizerConfig(
    config: Record<string, unknown>,
    configPath: string,
    tokenizerJson: Record<string, unknown>
): Record<string, unknown> {
    const contentOf = (value: unknown): unknown =>
        value !== null && typeof value === "object" && typeof (value as {content?: unknown}).content === "string"
            ? (value as {content: string}).content
            : value;
    const normalized: Record<string, unknown> = {...config};
    for (const role of SPECIAL_TOKEN_ROLES) {
        if (role in normalized) normalized[role] = contentOf(normalized[role]);
    }
    const additional = normalized.additional_special_tokens;
    if (additional !== undefined && additional !== null) {
        if (!Array.isArray(additional))
            throw new QloraError(
                `"additional_special_tokens" should be a list of token strings, found ${quoteValue(additional)}`,
                {file: configPath}
            );
        // the tokenizer library checks each entry against the ones before it (quadratic): hand it each known token
        // once; a string that is no token of tokenizer.json can never be produced, so it changes nothing
        const vocab = (tokenizerJson.model as {vocab?: unknown} | undefined)?.vocab;
        const added = new Set(
            Array.isArray(tokenizerJson.added_tokens)
                ? tokenizerJson.added_tokens.map((t) => (t as {content?: unknown})?.content)
                : []
        );
        const known = (token: string) =>
            added.has(token) ||
            (vocab !== null && typeof vocab === "object" && !Array.isArray(vocab) && Object.hasOwn(vocab, token));
        const tokens = new Set<string>();
        additional.forEach((entry, i) => {
            const content = contentOf(entry);
            if (typeof content !== "string")
                throw new QloraError(
                    `"additional_special_tokens"[${i}] is ${quoteValue(entry)}, not a token string (or {"content": ...}); fix or remove it`,
                    {file: configPath}
                );
            if (known(content)) tokens.add(content);
        });
        normalized.additional_special_tokens = [...tokens];
    }
    return normalized;
}

// chat_template is a string, a list of {name, template}, or (as some exporters write it) an object name -> template
function readTemplatesFromConfig(config: Record<string, unknown>, configPath: string): Map<string, TemplateSource> {
    const templates = new Map<string, TemplateSource>();
    const value = config.chat_template;
    if (value === undefined || value === null) return templates;
    const invalid = (): never => {
        throw new QloraError(
            `"chat_template" should be a template string or a list of {"name", "template"} objects, found ${quoteValue(value)}`,
            {file: configPath}
        );
    };
    if (typeof value === "string") {
        templates.set("default", {name: "default", text: value, origin: configPath});
    } else if (Array.isArray(value)) {
        for (const entry of value) {
            const {name, template} = (entry ?? {}) as {name?: unknown; template?: unknown};
            if (typeof name !== "string" || typeof template !== "string") invalid();
            templates.set(name as string, {name: name as string, text: template as string, origin: configPath});
        }
    } else if (typeof value === "object") {
        for (const [name, template] of Object.entries(value as Record<string, unknown>)) {
            if (typeof template !== "string") invalid();
            templates.set(name, {name, text: template as string, origin: configPath});
        }
    } else {
        invalid();
    }
    return templates;
}
