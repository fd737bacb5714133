// ollama.ts: an Ollama Modelfile for an exported GGUF. Ollama does not run Jinja: its TEMPLATE is a Go template,
// so the chat template in use (the fine-tune's training format, or the model's own) is translated by probing it:
// rendered on conversations whose contents are markers, it shows what each role's turn writes before and after
// its content, what opens the answer, and any default system block. The Go template built from those pieces is
// then checked against the Jinja one on a set of conversations (multi-turn, system or not, an answer last or not):
// a template that keeps state across turns, or changes turns by position, is refused rather than translated wrongly.
import {QloraError} from "../errors.js";
import type {ChatMessage} from "../tokenizer/index.js";

/** renders messages with the chat template in use (HfTokenizer.applyChatTemplate) */
export type ChatRender = (messages: ChatMessage[], addGenerationPrompt: boolean) => string;

/** what a chat template writes around each message, found by probing */
export interface TurnPieces {
    /** written first when the conversation does not start with a system message (a default system prompt) */
    defaultSystem: string;
    /** per role: before and after the content; null for a role the template leaves out */
    system: [string, string] | null;
    user: [string, string];
    assistant: [string, string];
    /** opens the answer after the last message when it is not the assistant's */
    generation: string;
}

const mark = (tag: string) => `\u0001${tag}\u0002`;

/** the pieces of a template, or a QloraError saying why it cannot be read that way */
export function probeTurns(render: ChatRender): TurnPieces {
    const [U, A, U2, S] = [mark("U"), mark("A"), mark("U2"), mark("S")];
    const fail = (why: string): never => {
        throw new QloraError(
            `the chat template cannot be written as an Ollama TEMPLATE (${why}); ` +
                "write the Modelfile's TEMPLATE by hand, or pass --template with a simpler chat template"
        );
    };
    const split = (text: string, marker: string): [string, string] => {
        const at = text.indexOf(marker);
        if (at < 0 || text.indexOf(marker, at + 1) >= 0) fail(`a message's content does not appear exactly once`);
        return [text.slice(0, at), text.slice(at + marker.length)];
    };
    const user = (content: string): ChatMessage => ({role: "user", content});
    const assistant = (content: string): ChatMessage => ({role: "assistant", content});
    // [user] without the generation prompt: D0 uPre U uPost
    const [headU, uPost] = split(render([user(U)], false), U);
    // [user, assistant]: ... U uPost aPre A aPost
    const [, afterU] = split(render([user(U), assistant(A)], false), U);
    const [between, aPost] = split(afterU, A);
    if (!between.startsWith(uPost)) fail("a user turn ends differently before an answer");
    const aPre = between.slice(uPost.length);
    // [user, assistant, user]: ... A aPost uPre U2 ...
    const [, afterA] = split(render([user(U), assistant(A), user(U2)], false), A);
    const [aPostUPre] = split(afterA, U2);
    if (!aPostUPre.startsWith(aPost)) fail("an answer ends differently before the next question");
    const uPre = aPostUPre.slice(aPost.length);
    if (!headU.endsWith(uPre)) fail("the first user turn opens differently from later ones");
    const defaultSystem = headU.slice(0, headU.length - uPre.length);
    // [user] with the generation prompt: ... U uPost GEN
    const [, afterGen] = split(render([user(U)], true), U);
    if (!afterGen.startsWith(uPost)) fail("the generation prompt changes the user turn");
    const generation = afterGen.slice(uPost.length);
    // [system, user]: sPre S sPost uPre U ... (or no S: the template leaves system messages out)
    const withSystem = render([{role: "system", content: S}, user(U)], false);
    let system: [string, string] | null = null;
    if (withSystem.includes(S)) {
        const [sPre, rest] = split(withSystem, S);
        const [sPostUPre] = split(rest, U);
        if (!sPostUPre.endsWith(uPre)) fail("a user turn opens differently after a system message");
        system = [sPre, sPostUPre.slice(0, sPostUPre.length - uPre.length)];
    }
    const pieces: TurnPieces = {defaultSystem, system, user: [uPre, uPost], assistant: [aPre, aPost], generation};
    // the pieces must reproduce the template on conversations of every shape
    const probes: {messages: ChatMessage[]; gen: boolean}[] = [
        {messages: [user("Hi")], gen: true},
        {messages: [user("Hi"), assistant("Hello!")], gen: false},
        {messages: [user("a"), assistant("b"), user("c"), assistant("d"), user("e")], gen: true},
        {messages: [{role: "system", content: "Be brief."}, user("2+2?"), assistant("4"), user("3+3?")], gen: true},
        {messages: [{role: "system", content: "sys"}, user("x")], gen: false}
    ];
    for (const p of probes)
        if (renderTurns(pieces, p.messages, p.gen) !== render(p.messages, p.gen))
            fail(`it renders ${p.messages.map((m) => m.role).join(", ")} otherwise than turn by turn`);
    return pieces;
}

/** what the pieces render: the semantics the Go template below has */
export function renderTurns(p: TurnPieces, messages: ChatMessage[], addGenerationPrompt: boolean): string {
    let out = messages[0]?.role === "system" ? "" : p.defaultSystem;
    for (const m of messages) {
        const around = m.role === "system" ? p.system : m.role === "user" ? p.user : m.role === "assistant" ? p.assistant : null;
        if (around) out += around[0] + m.content + around[1];
    }
    if (addGenerationPrompt && messages[messages.length - 1]?.role !== "assistant") out += p.generation;
    return out;
}

/** Go template text: literal, with `{{` written as an action (the only sequence Go's text/template reads in text) */
function goText(text: string): string {
    return text.replace(/\{\{/g, '{{ "{{" }}');
}

/**
 * The Ollama TEMPLATE of these pieces (Go text/template over .Messages): each message with its role's pieces, the
 * default system block when the conversation has no system message first, the generation prompt after a last
 * message that is not the assistant's. No `{{-` trimming: the pieces' own newlines are kept exactly.
 */
export function ollamaTemplate(p: TurnPieces): string {
    const branch = (role: string, around: [string, string] | null) =>
        `{{ if eq $m.Role "${role}" }}${around ? `${goText(around[0])}{{ $m.Content }}${goText(around[1])}` : ""}{{ end }}`;
    return (
        (p.defaultSystem ? `{{ if ne (index .Messages 0).Role "system" }}${goText(p.defaultSystem)}{{ end }}` : "") +
        "{{ range $i, $m := .Messages }}" +
        branch("system", p.system) +
        branch("user", p.user) +
        branch("assistant", p.assistant) +
        (p.generation
            ? `{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}${goText(p.generation)}{{ end }}`
            : "") +
        "{{ end }}"
    );
}

/** a Modelfile string argument (Ollama reads """…""" verbatim) */
function tripleQuoted(text: string, what: string): string {
    if (text.includes('"""'))
        throw new QloraError(`the ${what} contains """, which a Modelfile cannot quote; write the Modelfile by hand`);
    return `"""${text}"""`;
}

export interface ModelfileOptions {
    /** the GGUF, relative to the Modelfile */
    from: string;
    /** a LoRA GGUF applied on top (relative) */
    adapter?: string;
    template: string;
    /** the strings generation stops at (the EOS tokens the model was trained to emit) */
    stops: string[];
}

export function modelfileText(o: ModelfileOptions): string {
    const lines = [
        "# written by qlora export ollama: ollama create NAME -f Modelfile",
        `FROM ${o.from}`,
        ...(o.adapter ? [`ADAPTER ${o.adapter}`] : []),
        `TEMPLATE ${tripleQuoted(o.template, "chat template")}`,
        ...o.stops.map((s) => `PARAMETER stop ${JSON.stringify(s)}`)
    ];
    return lines.join("\n") + "\n";
}
