// tokenize.ts: Examples to token ids and labels (SPEC-training §2–§4). Labels are built from masks, never from
// pad ids (§7), and are not shifted: the model's loss uses labels[t+1] as the target at position t.

import {QloraError} from "../errors.js";
import type {ChatMessage, ChatTemplateOptions, EncodeOptions} from "../tokenizer/index.js";
import type {Example} from "./formats.js";

/** label value of a position that is not trained */
export const IGNORE_INDEX = -100;

/** what the data layer needs of a tokenizer (HfTokenizer has it; tests may pass fakes) */
export interface DataTokenizer {
    encode(text: string, options?: EncodeOptions): number[];
    applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): string;
    readonly eosTokenId: number | null;
    readonly padTokenId: number | null;
    idToToken(id: number): string | null;
    tokenToId(token: string): number | null;
    readonly specialTokens?: readonly {content: string; id: number}[];
    /** the number of token ids (added tokens included); pre-tokenized records are checked against it when given */
    readonly vocabSize?: number;
    /** the characters of the longest vocabulary entry: no token spans more of a text (bounds the clip budget) */
    readonly longestTokenChars?: number;
}

export interface TokenizeOptions {
    /** mask the prompt of prompt/completion examples (alpaca and templates included) */
    completionOnlyLoss: boolean;
    /** train only on assistant turns (end-of-turn token included) of chat examples */
    assistantOnlyLoss: boolean;
    /** appended to text and completions unless they already end with it; null: append nothing */
    eosToken: string | null;
    /** texts are cut to this many characters before encoding (prepare.ts clipBudget: past it nothing is kept) */
    maxChars?: number | null;
}

/** the first `max` characters of `text` (never half a surrogate pair) */
function clipText(text: string, max: number | null | undefined): string {
    if (max === null || max === undefined || text.length <= max) return text;
    const end = /[\uD800-\uDBFF]/.test(text[max - 1]) ? max - 1 : max;
    return text.slice(0, end);
}

export interface TokenizedExample {
    inputIds: number[];
    labels: number[];
    /** prompt/completion: the ids of prompt + completion did not start with the ids of the prompt alone (a merge across the boundary) */
    prefixMismatch?: boolean;
}

/** The EOS string to append: `eos_token` if given (it must be one token of the vocabulary), else the tokenizer's. */
export function resolveEosToken(tokenizer: DataTokenizer, eosToken?: string | null): string | null {
    if (eosToken) {
        if (tokenizer.tokenToId(eosToken) === null) {
            throw new QloraError(
                `eos_token "${eosToken}" is not a token of the tokenizer's vocabulary; use the token the model stops on`
            );
        }
        return eosToken;
    }
    return tokenizer.eosTokenId === null ? null : tokenizer.idToToken(tokenizer.eosTokenId);
}

/** Token ids and labels of one example (before truncation). */
export function tokenizeExample(example: Example, tokenizer: DataTokenizer, options: TokenizeOptions): TokenizedExample {
    const withEos = (text: string): string =>
        options.eosToken && !text.endsWith(options.eosToken) ? text + options.eosToken : text;
    // a clipped text has more tokens than are kept, so its EOS (cut by truncation anyway) is left off
    const clip = (text: string): string => clipText(text, options.maxChars);
    switch (example.kind) {
        case "text": {
            // tokenizer defaults for special tokens, as TRL does (a BOS for Llama, nothing for Qwen)
            const ids = tokenizer.encode(clip(withEos(example.text)), {addSpecialTokens: true});
            return {inputIds: ids, labels: ids.slice()};
        }
        case "prompt_completion": {
            // a system text and earlier turns (each answer with its EOS) come before the prompt, untrained
            const prompt =
                (example.system ?? "") +
                (example.turns ?? []).map((t) => t.prompt + withEos(t.completion)).join("") +
                example.prompt;
            const promptIds = tokenizer.encode(clip(prompt), {addSpecialTokens: true});
            const ids = tokenizer.encode(clip(prompt + withEos(example.completion)), {addSpecialTokens: true});
            return maskPrefix(ids, promptIds, options.completionOnlyLoss);
        }
        case "chat_prompt_completion": {
            const extra = example.templateExtra;
            const promptIds = tokenizer.encode(
                clip(tokenizer.applyChatTemplate(example.prompt, {addGenerationPrompt: true, extra}))
            );
            const ids = tokenizer.encode(clip(tokenizer.applyChatTemplate([...example.prompt, ...example.completion], {extra})));
            return maskPrefix(ids, promptIds, options.completionOnlyLoss);
        }
        case "messages": {
            if (!options.assistantOnlyLoss) {
                const ids = tokenizer.encode(clip(tokenizer.applyChatTemplate(example.messages, {extra: example.templateExtra})));
                return {inputIds: ids, labels: ids.slice()};
            }
            const {text, spans} = assistantSpans(example.messages, tokenizer, example.templateExtra);
            // encode the pieces between span boundaries separately so the mask lines up with token boundaries
            // exactly; chat templates put special tokens at these boundaries, where tokenizers split anyway
            const inputIds: number[] = [];
            const labels: number[] = [];
            let cursor = 0;
            const limit = clip(text).length;
            const push = (from: number, to: number, train: boolean): void => {
                to = Math.min(to, limit);
                if (to <= from) return;
                for (const id of tokenizer.encode(text.slice(from, to))) {
                    inputIds.push(id);
                    labels.push(train ? id : IGNORE_INDEX);
                }
            };
            for (const [start, end] of spans) {
                push(cursor, start, false);
                push(start, end, true);
                cursor = end;
            }
            push(cursor, text.length, false);
            return {inputIds, labels};
        }
        case "tokenized":
            // an id outside the vocabulary would index past the embedding table
            checkTokenIds(example.inputIds, "input_ids", tokenizer.vocabSize, false);
            if (example.labels) checkTokenIds(example.labels, "labels", tokenizer.vocabSize, true);
            return {
                inputIds: example.inputIds.slice(),
                labels: example.labels ? example.labels.slice() : example.inputIds.slice()
            };
    }
}

function checkTokenIds(ids: readonly number[], key: string, vocabSize: number | undefined, isLabels: boolean): void {
    const limit = vocabSize ?? 2 ** 31;
    for (let i = 0; i < ids.length; i++) {
        const id = ids[i];
        if ((id >= 0 && id < limit) || (isLabels && id === IGNORE_INDEX)) continue;
        throw new QloraError(
            `${key}[${i}] is ${id}, not a token id (0 to ${limit - 1}` +
                (isLabels ? `, or ${IGNORE_INDEX} for an untrained position)` : ")") +
                (vocabSize !== undefined ? "; was the data tokenized with another tokenizer?" : "")
        );
    }
}

// TRL's rule: completion_mask = [0]·len(ids_p) + [1]·(len(ids) − len(ids_p)), even when ids does not start with ids_p
function maskPrefix(ids: number[], promptIds: number[], completionOnly: boolean): TokenizedExample {
    let prefixMismatch = promptIds.length > ids.length;
    for (let i = 0; i < promptIds.length && !prefixMismatch; i++) if (ids[i] !== promptIds[i]) prefixMismatch = true;
    const cut = completionOnly ? Math.min(promptIds.length, ids.length) : 0;
    const labels = ids.map((id, i) => (i < cut ? IGNORE_INDEX : id));
    return prefixMismatch ? {inputIds: ids, labels, prefixMismatch} : {inputIds: ids, labels};
}

/**
 * The rendered conversation and the character spans of its assistant turns (SPEC-training §3): turn k starts
 * where `messages[:k]` rendered with the generation prompt ends and ends where `messages[:k+1]` rendered ends,
 * minus trailing whitespace — so the end-of-turn token (`<|im_end|>`) is inside the span and the newline after it
 * is not. When a template does not render prefixes as prefixes of the whole (some drop earlier reasoning, some
 * need a first user turn), the turn's content is searched for instead and the special token right after it
 * joins the span.
 */
export function assistantSpans(
    messages: readonly ChatMessage[],
    tokenizer: DataTokenizer,
    extra?: Record<string, unknown>
): {text: string; spans: [number, number][]} {
    const render = (list: readonly ChatMessage[], addGenerationPrompt: boolean): string =>
        tokenizer.applyChatTemplate(list, {addGenerationPrompt, extra});
    const text = render(messages, false);
    const spans: [number, number][] = [];
    let cursor = 0;
    for (let k = 0; k < messages.length; k++) {
        if (messages[k].role !== "assistant") continue;
        let start = -1;
        let end = -1;
        let before: string | null = null;
        let after: string | null = null;
        try {
            before = k > 0 ? render(messages.slice(0, k), true) : null;
            after = render(messages.slice(0, k + 1), false);
        } catch {
            // templates that insist on a user turn first or alternating roles: fall back to searching
        }
        if (
            before !== null &&
            after !== null &&
            text.startsWith(before) &&
            text.startsWith(after) &&
            after.length > before.length &&
            before.length >= cursor
        ) {
            start = before.length;
            end = after.length;
        } else {
            const content = messages[k].content;
            const at = content === "" ? -1 : text.indexOf(content, cursor);
            if (at < 0) continue; // nothing to train in this turn
            start = at;
            end = at + content.length;
            const special = (tokenizer.specialTokens ?? [])
                .map((t) => t.content)
                .filter((c) => c !== "" && text.startsWith(c, end))
                .sort((a, b) => b.length - a.length)[0];
            if (special) end += special.length;
        }
        while (end > start && /\s/.test(text[end - 1])) end--;
        if (end > start) spans.push([start, end]);
        cursor = Math.max(cursor, end);
    }
    return {text, spans};
}

/** true when some label is a target after the model's shift (the label at position 0 never is) */
export function hasTrainableLabel(labels: ArrayLike<number>): boolean {
    for (let i = 1; i < labels.length; i++) if (labels[i] !== IGNORE_INDEX) return true;
    return false;
}

/** number of label positions that are targets after the shift */
export function countTargets(labels: ArrayLike<number>): number {
    let n = 0;
    for (let i = 1; i < labels.length; i++) if (labels[i] !== IGNORE_INDEX) n++;
    return n;
}

export type TruncationMode = "keep_start" | "keep_end";

/** Cuts an example to `maxLength` tokens: the first ones (keep_start, the default) or the last ones (keep_end). */
export function truncateExample<T extends {inputIds: number[]; labels: number[]}>(
    example: T,
    maxLength: number | null,
    mode: TruncationMode = "keep_start"
): {example: T; truncated: boolean} {
    if (maxLength === null || example.inputIds.length <= maxLength) return {example, truncated: false};
    const cut = (list: number[]): number[] =>
        mode === "keep_end" ? list.slice(list.length - maxLength) : list.slice(0, maxLength);
    return {example: {...example, inputIds: cut(example.inputIds), labels: cut(example.labels)}, truncated: true};
}
