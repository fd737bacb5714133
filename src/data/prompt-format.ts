// prompt-format.ts: the training format as a chat template (Jinja, the Hugging Face way), so that it travels with
// the adapter, the merged model and the GGUF export, and chat, generate --chat and serve prompt the fine-tuned
// model exactly as it was trained (the most common failure after fine-tuning with the Python tools is a model
// prompted with its base's chat template while it learned another).
//
// For a conversation the template renders each user turn as the training prompt and each assistant turn as the
// training completion followed by the EOS it learned to emit, so [user] with add_generation_prompt is the training
// text up to the response, token for token:
//   alpaca:             the seed template (### 指令: / ### 输入: / ### 回答:), with the input branch taken when the
//                       user message carries a non-empty `input` (as the data's records do); a system message as
//                       a record's `system` (its text and a blank line), earlier turns as a record's `history`
//   template:           the user's {field} template: its first field is the message content, the others are
//                       message fields of the same name; a Jinja template likewise, with its first printed field
//                       as the content (see jinjaConversation)
//   prompt_completion:  the prompt text as it is (text records: the content is the prompt)
//   messages, sharegpt: the tokenizer's own chat template, which training rendered them with
// The {field} and prompt/completion formats have no system turn in training: a system message is left out.
import {QloraError} from "../errors.js";
import {
    ALPACA_SYSTEM_SUFFIX,
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    type DatasetFormat,
    isJinjaTemplate,
    parseTemplate
} from "./formats.js";
import {compileJinjaTemplate, type JinjaUserTemplate, RESPONSE_MARKER, TEMPLATE_MACRO} from "./user-template.js";

export interface PromptFormat {
    /** where it comes from, for the log: "alpaca", "template", "prompt_completion", or "the tokenizer's" */
    source: string;
    /** the chat template (Jinja) */
    template: string;
}

export interface PromptFormatInput {
    format: DatasetFormat;
    /** the EOS string appended to completions in training (null: none) */
    eosToken: string | null;
    /** the user's template ({field} or Jinja) and its response field, for format "template" */
    template?: string | null;
    responseField?: string;
    /** the tokenizer's default chat template, used by chat formats (null: it has none) */
    tokenizerTemplate: string | null;
}

/** the training format as a chat template, or null when the data has no prompt/response structure (text, tokenized) */
export function promptFormatTemplate(input: PromptFormatInput): PromptFormat | null {
    const eos = input.eosToken ? ` + ${jinjaString(input.eosToken)}` : "";
    switch (input.format) {
        case "alpaca": {
            const field = (name: string) => (name === "instruction" ? "message['content']" : `message['${name}']`);
            const withInput = fieldTemplateTurns(ALPACA_TEMPLATE, "output", field);
            const noInput = fieldTemplateTurns(ALPACA_TEMPLATE_NO_INPUT, "output", field);
            if (withInput.completion !== noInput.completion) throw new Error("the alpaca templates disagree on the completion");
            const user =
                "{%- if message['input'] is defined and message['input'] is string and message['input'] | trim != '' -%}" +
                `{{- ${withInput.prompt} -}}{%- else -%}{{- ${noInput.prompt} -}}{%- endif -%}`;
            const system = `{{- message['content'] + ${jinjaString(ALPACA_SYSTEM_SUFFIX)} -}}`;
            return {source: "alpaca", template: conversation(user, `{{- ${withInput.completion}${eos} -}}`, system)};
        }
        case "template": {
            if (!input.template)
                throw new QloraError(
                    `dataset_format "template" needs a template: a string with {field} placeholders, or a Jinja template`
                );
            const response = input.responseField ?? "output";
            if (isJinjaTemplate(input.template)) return jinjaConversation(compileJinjaTemplate(input.template, response), eos);
            const fields = parseTemplate(input.template)
                .map((p) => p.field)
                .filter((f): f is string => f !== undefined && f !== response);
            // the first field is what a chat user types; the others are read from the message by name
            const field = (name: string) =>
                name === fields[0]
                    ? "message['content']"
                    : `(message[${jinjaString(name)}] if message[${jinjaString(name)}] is defined else '')`;
            const turns = fieldTemplateTurns(input.template, response, field);
            return {source: "template", template: conversation(`{{- ${turns.prompt} -}}`, `{{- ${turns.completion}${eos} -}}`)};
        }
        case "prompt_completion":
            return {
                source: "prompt_completion",
                template: conversation("{{- message['content'] -}}", `{{- message['content']${eos} -}}`)
            };
        case "messages":
        case "sharegpt":
            return input.tokenizerTemplate === null ? null : {source: "the tokenizer's", template: input.tokenizerTemplate};
        case "text":
        case "tokenized":
            return null;
    }
}

/**
 * A user's Jinja template over the conversation: its text is the macro the data was rendered with
 * (user-template.ts), called for each user turn with the message's content as the template's first printed field
 * and the message's other fields by name (absent ones undefined, as in a record that lacks them). The user turn
 * is what the macro renders before the response; the assistant turn is the answer, what the macro renders after
 * the response (for the fields of the user turn before it) and the EOS.
 */
function jinjaConversation(t: JinjaUserTemplate, eos: string): PromptFormat {
    const args = (message: string, response: string) =>
        t.variables
            .map((name) =>
                name === t.responseField
                    ? response
                    : name === t.contentVariable
                      ? `${message}['content']`
                      : `${message}[${jinjaString(name)}]`
            )
            .join(", ");
    const marker = jinjaString(RESPONSE_MARKER);
    const call = (message: string) => `${TEMPLATE_MACRO}(${args(message, marker)})`;
    const user = t.printsResponse ? `{{- ${call("message")}.split(${marker})[0] -}}` : `{{- ${call("message")} -}}`;
    const after = t.printsResponse ? ` + ${call("qlora.user")}.split(${marker})[1]` : "";
    const assistant = `{{- message['content']${after}${eos} -}}`;
    // the macro, and the last user turn remembered for the text after the answer
    const preamble = `${t.macro}{%- set qlora = namespace(user={}) -%}`;
    return {
        source: "template",
        template: conversation(`{%- set qlora.user = message -%}${user}`, assistant, undefined, preamble)
    };
}

/**
 * a template over the conversation: user turns as prompts, assistant turns as completions, system messages as the
 * format writes them (or left out when it has none), other roles left out; `preamble` comes before the loop
 */
function conversation(user: string, assistant: string, system?: string, preamble = ""): string {
    return (
        "{#- qlora: the training format of this fine-tune (data/prompt-format.ts) -#}\n" +
        preamble +
        "{%- for message in messages -%}" +
        `{%- if message['role'] == 'user' -%}${user}` +
        `{%- elif message['role'] == 'assistant' -%}${assistant}` +
        (system ? `{%- elif message['role'] == 'system' -%}${system}` : "") +
        "{%- endif -%}" +
        "{%- endfor -%}"
    );
}

/**
 * A {field} template as two Jinja expressions: the prompt (everything before the response field) and the
 * completion (the response and what follows it), the response being message['content'] of the assistant turn.
 */
function fieldTemplateTurns(
    template: string,
    responseField: string,
    field: (name: string) => string
): {prompt: string; completion: string} {
    const prompt: string[] = [],
        completion: string[] = [];
    let inCompletion = false;
    for (const part of parseTemplate(template)) {
        if (part.field === responseField) {
            inCompletion = true;
            completion.push("message['content']");
            continue;
        }
        const expr = part.field === undefined ? jinjaString(part.text ?? "") : field(part.field);
        (inCompletion ? completion : prompt).push(expr);
    }
    // a template without the response field: the response follows the prompt (as splitTemplate reads it)
    if (!inCompletion) completion.push("message['content']");
    return {prompt: prompt.length ? prompt.join(" + ") : "''", completion: completion.join(" + ")};
}

/** a Jinja string literal */
function jinjaString(text: string): string {
    return `'${text.replace(/\\/g, "\\\\").replace(/'/g, "\\'").replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t")}'`;
}
