// formats.ts: dataset record layouts (SPEC-training §1) — detection from the first record's keys and the
// conversion of every record to one of three shapes the tokenizer step knows: plain text, prompt/completion
// (text or chat messages) and chat messages. Alpaca and user templates become prompt/completion, ShareGPT
// becomes messages.

import {QloraError} from "../errors.js";
import type {ChatMessage} from "../tokenizer/index.js";
import type {ColumnMap, TagMap} from "./column-map.js";
import {describeJsonValue} from "./readers.js";
import {compileJinjaTemplate, renderJinjaRecord} from "./user-template.js";
import type {DataRecord} from "./readers.js";

export type DatasetFormat = "alpaca" | "text" | "prompt_completion" | "messages" | "sharegpt" | "template" | "tokenized";

export const DATASET_FORMATS: readonly DatasetFormat[] = [
    "alpaca",
    "text",
    "prompt_completion",
    "messages",
    "sharegpt",
    "template",
    "tokenized"
];

/** The project's default Alpaca template (DESIGN.md), for records with a non-empty `input`. */
export const ALPACA_TEMPLATE = "### 指令:\n{instruction}\n\n### 输入:\n{input}\n\n### 回答:\n{output}";
/** The default Alpaca template for records whose `input` is empty or missing. */
export const ALPACA_TEMPLATE_NO_INPUT = "### 指令:\n{instruction}\n\n### 回答:\n{output}";
/** what follows an alpaca record's `system` text, before its first turn (LLaMA-Factory's alpaca convention) */
export const ALPACA_SYSTEM_SUFFIX = "\n\n";

/** one record, ready to tokenize */
export type Example =
    | {kind: "text"; text: string}
    | {
          kind: "prompt_completion";
          prompt: string;
          completion: string;
          /** text before the first turn (an alpaca record's system text and its suffix) */
          system?: string;
          /** earlier turns (an alpaca record's history), in the context but not trained; each ends with the EOS */
          turns?: {prompt: string; completion: string}[];
      }
    | {kind: "chat_prompt_completion"; prompt: ChatMessage[]; completion: ChatMessage[]; templateExtra?: Record<string, unknown>}
    | {kind: "messages"; messages: ChatMessage[]; templateExtra?: Record<string, unknown>}
    | {kind: "tokenized"; inputIds: number[]; labels: number[] | null};

export interface FormatOptions {
    /** "auto" (default): detected from the first record's keys; a `template` implies "template" */
    dataset_format?: DatasetFormat | "auto";
    /**
     * a prompt template with `{field}` placeholders filled from each record (`{{`/`}}` for literal braces), or a
     * Jinja template (isJinjaTemplate; user-template.ts) whose variables are the record's fields; the response is
     * the record's `response_field`; when the template contains `{<response_field>}` (`{{ <response_field> }}`)
     * too, the prompt is everything before it and the completion is the response plus what follows it
     */
    template?: string | null;
    /** the field holding the response for `template` (default "output") */
    response_field?: string;
    /** the field holding the text of "text" records (default "text") */
    dataset_text_field?: string;
    /**
     * other column names, as LLaMA-Factory's dataset_info.json gives them: prompt (the instruction), query (the
     * input), response (the output), system, history (alpaca); messages (ShareGPT's conversations)
     */
    columns?: ColumnMap;
    /** ShareGPT/messages keys and role names, as LLaMA-Factory's `tags` */
    tags?: TagMap;
}

export type {ColumnMap, TagMap} from "./column-map.js";

const COLUMN_TARGETS: Record<keyof ColumnMap, string> = {
    prompt: "instruction",
    query: "input",
    response: "output",
    system: "system",
    history: "history",
    messages: "conversations"
};

/** a record with its mapped columns under the standard names (the record itself when there is no mapping) */
export function applyColumns(record: DataRecord, options: FormatOptions): DataRecord {
    const columns = options.columns;
    if (!columns) return record;
    const out: DataRecord = {...record};
    for (const [key, target] of Object.entries(COLUMN_TARGETS)) {
        const from = columns[key as keyof ColumnMap];
        if (from === undefined || from === target) continue;
        delete out[target]; // the standard name now means the mapped column only
        if (Object.hasOwn(record, from)) out[target] = record[from];
    }
    return out;
}

/** Where a record came from, for error messages: "file:LINE" or "file", and its index in the file. */
export interface RecordWhere {
    file?: string;
    index: number;
}

const ROLE_MAP: Record<string, string> = {
    human: "user",
    user: "user",
    gpt: "assistant",
    bot: "assistant",
    chatgpt: "assistant",
    model: "assistant",
    assistant: "assistant",
    system: "system",
    tool: "tool",
    function: "tool",
    observation: "tool"
};

/** Maps a ShareGPT `from` value to a chat role: human→user, gpt/bot→assistant, system, unknown→user. */
/** an object or list value placed in a template as JSON; one nested too deeply for JSON.stringify is refused */
function jsonText(value: object, field: string, fail: (msg: string) => never): string {
    try {
        return JSON.stringify(value);
    } catch {
        return fail(`"${field}" is nested too deeply to place in the template as JSON`);
    }
}

export function mapShareGptRole(from: string): string {
    return ROLE_MAP[from.toLowerCase()] ?? "user";
}

const EXPECTED_KEYS: Record<DatasetFormat, string> = {
    alpaca: `"instruction", "output" and optionally "input"`,
    text: `"text" (or the field named by dataset_text_field)`,
    prompt_completion: `"prompt" and "completion"`,
    messages: `"messages": [{"role", "content"}, …]`,
    sharegpt: `"conversations": [{"from", "value"}, …]`,
    template: "the template's fields and the response field",
    tokenized: `"input_ids" (and optionally "labels")`
};

/**
 * Detects the format from a record's keys: `messages` → messages, `conversations` → sharegpt, `prompt` +
 * `completion` → prompt_completion, `instruction` → alpaca, the text field → text, `input_ids` → tokenized.
 * A given `template` wins; an explicit `dataset_format` is returned as is.
 */
export function detectFormat(raw: DataRecord, options: FormatOptions = {}, where?: RecordWhere): DatasetFormat {
    const record = applyColumns(raw, options);
    const given = options.dataset_format ?? "auto";
    if (given !== "auto") {
        if (!DATASET_FORMATS.includes(given)) {
            throw new QloraError(`dataset_format "${given}" is not one of auto, ${DATASET_FORMATS.join(", ")}`);
        }
        return given;
    }
    if (options.template) return "template";
    const has = (key: string): boolean => Object.hasOwn(record, key) && record[key] !== undefined;
    if (has("input_ids")) return "tokenized";
    if (has("messages")) return "messages";
    if (has("conversations")) return "sharegpt";
    if (has("prompt") && has("completion")) return "prompt_completion";
    if (has("instruction")) return "alpaca";
    if (has(options.dataset_text_field ?? "text")) return "text";
    throw new QloraError(
        `${recordName(where)}cannot tell the dataset format from its keys (${keyList(record)}); records need ` +
            `"instruction"/"input"/"output" (alpaca), "text", "prompt"/"completion", "messages" or "conversations" ` +
            "(ShareGPT); or set dataset_format, or give a template ({field} placeholders or Jinja)",
        {file: where?.file}
    );
}

/** Converts one record of `format` to an Example, or throws a QloraError naming the record and the expected keys. */
export function formatRecord(raw: DataRecord, format: DatasetFormat, options: FormatOptions = {}, where?: RecordWhere): Example {
    const record = applyColumns(raw, options);
    const mapped = mappedNames(options);
    const fail = (problem: string): never => {
        throw new QloraError(
            `${recordName(where)}${problem}; ${format} records need ${EXPECTED_KEYS[format]}${mapped} (found keys: ${keyList(raw)})`,
            {file: where?.file}
        );
    };
    // strings only: turning a number into text would pick one spelling of it silently (8, 8.0, 8e0 are one JSON number)
    const str = (key: string, optional = false): string => {
        const value = record[key];
        if (value === undefined) return optional ? "" : fail(`missing "${key}"`);
        if (value === null) return optional ? "" : fail(`"${key}" is null, not a string`);
        if (typeof value === "string") return value;
        const quote = typeof value === "number" || typeof value === "boolean" ? ` (write it in quotes: "${String(value)}")` : "";
        return fail(`"${key}" is ${describeJsonValue(value)}, not a string${quote}`);
    };
    switch (format) {
        case "text":
            return {kind: "text", text: str(options.dataset_text_field ?? "text")};
        case "alpaca": {
            const instruction = str("instruction");
            const input = str("input", true);
            const output = str("output");
            const template = input.trim() !== "" ? ALPACA_TEMPLATE : ALPACA_TEMPLATE_NO_INPUT;
            const example = splitTemplate(template, {instruction, input, output}, "output", fail);
            if (example.kind !== "prompt_completion") return example;
            // LLaMA-Factory's alpaca fields: a system text, and earlier [instruction, output] turns
            const system = str("system", true);
            if (system !== "") example.system = system + ALPACA_SYSTEM_SUFFIX;
            const history = record.history;
            if (history !== undefined && history !== null) {
                if (!Array.isArray(history))
                    return fail(`"history" is ${describeJsonValue(history)}, not a list of [instruction, output] pairs`);
                example.turns = history.map((pair, i) => {
                    if (!Array.isArray(pair) || pair.length !== 2 || typeof pair[0] !== "string" || typeof pair[1] !== "string")
                        fail(`history[${i}] is ${describeJsonValue(pair)}, not an [instruction, output] pair of strings`);
                    const turn = splitTemplate(ALPACA_TEMPLATE_NO_INPUT, {instruction: pair[0], output: pair[1]}, "output", fail);
                    return {prompt: (turn as {prompt: string}).prompt, completion: (turn as {completion: string}).completion};
                });
            }
            return example;
        }
        case "template": {
            const template = options.template;
            if (!template)
                throw new QloraError(
                    `dataset_format "template" needs a template: a string with {field} placeholders, or a Jinja template`
                );
            const responseField = options.response_field ?? "output";
            if (isJinjaTemplate(template)) {
                const jinja = compileJinjaTemplate(template, responseField);
                const templateFail = (problem: string): never => {
                    throw new QloraError(`${recordName(where)}${problem}`, {file: where?.file});
                };
                const parts = renderJinjaRecord(jinja, record, str(responseField), templateFail);
                return {kind: "prompt_completion", ...parts};
            }
            const values: Record<string, string> = {};
            for (const field of new Set([...templateFields(template), responseField])) {
                // a placeholder may name a nested value: {meta.topic}
                const value = field.includes(".")
                    ? field
                          .split(".")
                          .reduce<unknown>(
                              (v, k) => (v !== null && typeof v === "object" ? (v as DataRecord)[k] : undefined),
                              record
                          )
                    : record[field];
                if (value === undefined || value === null) {
                    throw new QloraError(
                        `${recordName(where)}${value === null ? `"${field}" is null` : `missing "${field}"`}; the template needs ${[...templateFields(template), responseField].map((f) => `"${f}"`).join(", ")} ` +
                            `(found keys: ${keyList(record)})`,
                        {file: where?.file}
                    );
                }
                values[field] =
                    typeof value === "string" ? value : typeof value === "object" ? jsonText(value, field, fail) : String(value);
            }
            return splitTemplate(template, values, responseField, fail);
        }
        case "prompt_completion": {
            const prompt = record.prompt;
            const completion = record.completion;
            // null (a Parquet or HF datasets row without the value) is named as such: the key is there
            for (const [key, value] of [
                ["prompt", prompt],
                ["completion", completion]
            ] as const) {
                if (value === undefined) fail(`missing "${key}"`);
                if (value === null) fail(`"${key}" is null, not a string or a list of messages`);
            }
            if (Array.isArray(prompt) || Array.isArray(completion)) {
                if (!Array.isArray(prompt) || !Array.isArray(completion))
                    fail(`"prompt" and "completion" should both be strings or both lists of messages`);
                return {
                    kind: "chat_prompt_completion",
                    prompt: readMessages(prompt as unknown[], "prompt", fail),
                    completion: readMessages(completion as unknown[], "completion", fail),
                    templateExtra: templateExtraOf(record)
                };
            }
            return {kind: "prompt_completion", prompt: str("prompt"), completion: str("completion")};
        }
        case "messages": {
            const messages = record.messages;
            if (!Array.isArray(messages))
                return fail(
                    messages === undefined ? `missing "messages"` : `"messages" is ${describeJsonValue(messages)}, not a list`
                );
            if (messages.length === 0) fail(`"messages" is empty`);
            return {kind: "messages", messages: readMessages(messages, "messages", fail), templateExtra: templateExtraOf(record)};
        }
        case "sharegpt": {
            const turns = record.conversations;
            if (!Array.isArray(turns))
                return fail(
                    turns === undefined ? `missing "conversations"` : `"conversations" is ${describeJsonValue(turns)}, not a list`
                );
            if (turns.length === 0) fail(`"conversations" is empty`);
            const messages: ChatMessage[] = [];
            // LLaMA-Factory's ShareGPT variant keeps the system prompt beside the turns
            if (typeof record.system === "string" && record.system !== "")
                messages.push({role: "system", content: record.system});
            const tags = options.tags ?? {};
            const roleNames = new Map<string, string>();
            for (const [tag, role] of [
                ["user_tag", "user"],
                ["assistant_tag", "assistant"],
                ["system_tag", "system"],
                ["observation_tag", "tool"]
            ] as const)
                if (tags[tag] !== undefined) roleNames.set(tags[tag], role);
            turns.forEach((turn, i) => {
                if (turn === null || typeof turn !== "object")
                    fail(`conversations[${i}] is ${describeJsonValue(turn)}, not an object`);
                const t = turn as DataRecord;
                const from = tags.role_tag !== undefined ? t[tags.role_tag] : (t.from ?? t.role);
                const value = tags.content_tag !== undefined ? t[tags.content_tag] : (t.value ?? t.content);
                if (typeof from !== "string") fail(`conversations[${i}] has no "${tags.role_tag ?? "from"}"`);
                if (typeof value !== "string") fail(`conversations[${i}] has no string "${tags.content_tag ?? "value"}"`);
                messages.push({role: roleNames.get(from as string) ?? mapShareGptRole(from as string), content: value as string});
            });
            return {kind: "messages", messages, templateExtra: templateExtraOf(record)};
        }
        case "tokenized": {
            const ids = record.input_ids;
            if (!isIntList(ids)) return fail(ids === undefined ? `missing "input_ids"` : `"input_ids" is not a list of integers`);
            const labels = record.labels;
            if (labels !== undefined && labels !== null && (!isIntList(labels) || labels.length !== ids.length)) {
                fail(`"labels" should be a list of integers as long as "input_ids"`);
            }
            return {kind: "tokenized", inputIds: ids, labels: (labels as number[] | undefined) ?? null};
        }
    }
}

/**
 * A `template` is Jinja when it has a `{% … %}` or `{# … #}` tag, or `{{ … }}` and no `{field}` placeholder: in a
 * {field} template `{{` and `}}` are literal braces, and one that has placeholders keeps meaning what it meant.
 */
export function isJinjaTemplate(template: string): boolean {
    return /\{[%#]/.test(template) || (template.includes("{{") && templateFields(template).length === 0);
}

/**
 * The check of a Jinja template's variables over a whole dataset: a variable no record has is a misspelt field
 * (a field only some records have is an optional one, undefined in the others). `see` each record, then `finish`.
 */
export class TemplateVariableCheck {
    private readonly missing: Set<string>;
    private readonly columns = new Set<string>();

    private constructor(
        private readonly options: FormatOptions,
        variables: string[]
    ) {
        this.missing = new Set(variables);
    }

    /** the check for data formatted with `options`, or null when its template is not a Jinja one */
    static of(format: DatasetFormat, options: FormatOptions): TemplateVariableCheck | null {
        const template = options.template;
        if (format !== "template" || !template || !isJinjaTemplate(template)) return null;
        const responseField = options.response_field ?? "output";
        // the response is required of every record, and a record without it is refused by name
        const variables = compileJinjaTemplate(template, responseField).variables.filter((v) => v !== responseField);
        return variables.length ? new TemplateVariableCheck(options, variables) : null;
    }

    see(raw: DataRecord): void {
        const record = applyColumns(raw, this.options);
        for (const key of Object.keys(record)) {
            this.columns.add(key);
            this.missing.delete(key);
        }
    }

    finish(): void {
        if (this.missing.size === 0) return;
        const names = [...this.missing].map((v) => `"${v}"`).join(", ");
        const columns = [...this.columns];
        const list = columns.slice(0, 20).join(", ") + (columns.length > 20 ? ", …" : "");
        throw new QloraError(
            `template: ${names} ${this.missing.size === 1 ? "is not a field" : "are not fields"} of any record; ` +
                `the columns are ${list || "none"}${mappedNames(this.options)}; use one of those names, or map a ` +
                "column to it with columns"
        );
    }
}

/** the `{field}` placeholders of a template, in order of appearance */
export function templateFields(template: string): string[] {
    const fields: string[] = [];
    for (const part of parseTemplate(template))
        if (part.field !== undefined && !fields.includes(part.field)) fields.push(part.field);
    return fields;
}

export interface TemplatePart {
    text?: string;
    field?: string;
}

export function parseTemplate(template: string): TemplatePart[] {
    const parts: TemplatePart[] = [];
    let text = "";
    for (let i = 0; i < template.length; i++) {
        const c = template[i];
        if ((c === "{" || c === "}") && template[i + 1] === c) {
            text += c; // {{ and }} are literal braces
            i++;
            continue;
        }
        if (c === "{") {
            const close = template.indexOf("}", i);
            const name = close > i ? template.slice(i + 1, close) : "";
            if (/^[A-Za-z_][\w.-]*$/.test(name)) {
                if (text) parts.push({text});
                text = "";
                parts.push({field: name});
                i = close;
                continue;
            }
        }
        text += c;
    }
    if (text) parts.push({text});
    return parts;
}

/** Fills a template; `{responseField}` splits it into prompt (before) and completion (the response and after). */
function splitTemplate(
    template: string,
    values: Record<string, string>,
    responseField: string,
    fail: (problem: string) => never
): Example {
    let prompt = "";
    let completion = "";
    let inCompletion = false;
    for (const part of parseTemplate(template)) {
        let piece: string;
        if (part.field === undefined) {
            piece = part.text ?? "";
        } else {
            if (part.field === responseField) inCompletion = true;
            const value = values[part.field];
            if (value === undefined) fail(`missing "${part.field}"`);
            piece = value;
        }
        if (inCompletion) completion += piece;
        else prompt += piece;
    }
    if (!inCompletion) completion = values[responseField] ?? fail(`missing "${responseField}"`);
    return {kind: "prompt_completion", prompt, completion};
}

function readMessages(list: unknown[], key: string, fail: (problem: string) => never): ChatMessage[] {
    return list.map((raw, i) => {
        if (raw === null || typeof raw !== "object" || Array.isArray(raw))
            fail(`${key}[${i}] is ${describeJsonValue(raw)}, not an object`);
        const message = raw as DataRecord;
        if (typeof message.role !== "string") {
            if (typeof message.from === "string")
                fail(
                    `${key}[${i}] has "from" instead of "role" (ShareGPT style); use "conversations" for ShareGPT data or rename the keys`
                );
            fail(`${key}[${i}] has no "role"`);
        }
        let content = message.content;
        // OpenAI-style content parts: keep the text parts
        if (Array.isArray(content)) {
            content = content
                .map((p) =>
                    typeof p === "string"
                        ? p
                        : p && typeof p === "object" && typeof (p as DataRecord).text === "string"
                          ? (p as DataRecord).text
                          : ""
                )
                .join("");
        }
        if (content === undefined || content === null) content = "";
        if (typeof content !== "string") fail(`${key}[${i}].content is ${describeJsonValue(content)}, not a string`);
        return {...message, role: message.role as string, content: content as string};
    });
}

// SPEC-training §1: `tools` (a list, or that list as a JSON string) and `chat_template_kwargs` go to the template
function templateExtraOf(record: DataRecord): Record<string, unknown> | undefined {
    let extra: Record<string, unknown> | undefined;
    let tools = record.tools;
    if (typeof tools === "string" && tools.trim().startsWith("[")) {
        try {
            tools = JSON.parse(tools);
        } catch {
            // left as the string
        }
    }
    if (tools !== undefined && tools !== null && tools !== "") extra = {tools};
    const kwargs = record.chat_template_kwargs;
    if (kwargs !== null && typeof kwargs === "object" && !Array.isArray(kwargs))
        extra = {...extra, ...(kwargs as Record<string, unknown>)};
    return extra;
}

function isIntList(value: unknown): value is number[] {
    return Array.isArray(value) && value.every((v) => Number.isInteger(v));
}

/** the column mapping in words, for messages: ` (columns: "question" as "instruction", …)` */
function mappedNames(options: FormatOptions): string {
    const pairs = Object.entries(options.columns ?? {})
        .filter(([key, from]) => from !== undefined && key in COLUMN_TARGETS)
        .map(([key, from]) => `"${from}" as "${COLUMN_TARGETS[key as keyof ColumnMap]}"`);
    return pairs.length ? ` (columns: ${pairs.join(", ")})` : "";
}

function recordName(where?: RecordWhere): string {
    return where ? `record ${where.index}: ` : "";
}

function keyList(record: DataRecord): string {
    const keys = Object.keys(record);
    return keys.length === 0 ? "none" : keys.slice(0, 12).join(", ") + (keys.length > 12 ? ", …" : "");
}
