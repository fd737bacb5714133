// user-template.ts: the `template` key as a Jinja template, the way users of LLaMA-Factory and axolotl write prompt
// formats, with optional parts: `### 指令:\n{{ instruction }}\n{% if input %}### 输入:\n{{ input }}\n{% endif %}`.
// The record's fields (after the column mapping) are its variables; a field a record lacks (or holds null) is
// undefined, so `{% if input %}` takes the other branch. The prompt/response split is the one of {field} templates:
// the response is the record's response field ("output"); where the template prints `{{ output }}`, the prompt is
// what it renders before it and the completion is the response and what it renders after it; a template that does
// not print it renders the prompt, and the response follows it. The EOS is appended to the completion as for
// every prompt/completion record.
//
// Rendering goes through the tokenizer's bounded renderer (a template from a config is as untrusted as one from a
// model folder), with the user's text inside a macro: the same macro goes into the chat template saved with the
// adapter (prompt-format.ts), so training and inference render it with the same text, the same trim_blocks and
// lstrip_blocks as Hugging Face's chat templates, and the template's final newline kept, as in a {field} template
// (Jinja alone would drop it, and a prompt ending in "### 回答:\n" means that newline).
import {QloraError} from "../errors.js";
import {isStackOverflow, parseTemplate, renderTemplate, TemplateLimitError} from "../tokenizer/bounded-template.js";

/** the name of the macro that holds the user's template, in the data render and in the saved chat template */
export const TEMPLATE_MACRO = "qlora_template";
/**
 * stands for the response while finding where it starts: printable (a chat template travels in GGUF metadata and
 * Modelfiles) and unlike anything in data
 */
export const RESPONSE_MARKER = "<|qlora:response|>";

// names the renderer defines (bounded-template.ts setupGlobals and the library's namespace()) and loop variables
const GLOBALS = new Set([
    "true",
    "false",
    "none",
    "True",
    "False",
    "None",
    "range",
    "raise_exception",
    "strftime_now",
    "namespace",
    "loop",
    "caller",
    "varargs",
    "kwargs"
]);
const STATEMENTS = new Set([
    "Program",
    "If",
    "For",
    "Break",
    "Continue",
    "Set",
    "Macro",
    "Comment",
    "CallStatement",
    "FilterStatement"
]);

/** a node of @huggingface/jinja's syntax tree (its .d.ts files do not resolve under NodeNext) */
interface Node {
    type: string;
    [field: string]: unknown;
}

export interface JinjaUserTemplate {
    source: string;
    responseField: string;
    /** the record fields the template reads, in order of first use (the response field included when it reads it) */
    variables: string[];
    /** the field a chat user's message is: the first one the template prints, other than the response (null: none) */
    contentVariable: string | null;
    /** the template reads the response field: the prompt is what it renders before `{{ output }}` */
    printsResponse: boolean;
    /** every use of the response is a plain `{{ output }}`, so nothing around it depends on the response's text */
    responseVerbatim: boolean;
    /** the user's text inside the macro, as the saved chat template holds it */
    macro: string;
    render(values: Record<string, unknown>): string;
}

export interface JinjaRecordParts {
    prompt: string;
    completion: string;
}

/** why a template cannot be used, as the one-line message of the `template` key */
function templateError(err: unknown, what: string): QloraError {
    if (err instanceof QloraError) return err;
    const text = (err instanceof Error ? err.message : String(err)).replace(/\s*\n\s*/g, " ").trim();
    const detail = text.length > 300 ? `${text.slice(0, 300)}…` : text;
    if (err instanceof TemplateLimitError)
        return new QloraError(`template: the Jinja template ${detail}; simplify it`, {cause: err});
    if (isStackOverflow(err))
        return new QloraError(`template: the Jinja template ${what}: it nests deeper than the parser can follow`, {cause: err});
    return new QloraError(
        `template: the Jinja template ${what} (${detail}); fix it, or write a {field} template (no {{ }} or {% %})`,
        {cause: err}
    );
}

let cached: JinjaUserTemplate | null = null;

/** the template parsed and checked (the last one is kept: a dataset formats every record with the same one) */
export function compileJinjaTemplate(source: string, responseField: string): JinjaUserTemplate {
    if (cached?.source === source && cached.responseField === responseField) return cached;
    let tree: Node;
    try {
        tree = parseTemplate(source).parsed as Node;
    } catch (err) {
        throw templateError(err, "cannot be parsed");
    }
    const {variables, printed, responseVerbatim} = readVariables(tree, responseField);
    const macro = `{% macro ${TEMPLATE_MACRO}(${variables.join(", ")}) %}\n${source}{{ '' }}{% endmacro %}`;
    let wrapped: ReturnType<typeof parseTemplate>;
    try {
        wrapped = parseTemplate(`${macro}{{ ${TEMPLATE_MACRO}(${variables.join(", ")}) }}`);
    } catch (err) {
        throw templateError(err, "cannot be parsed inside a macro");
    }
    const compiled: JinjaUserTemplate = {
        source,
        responseField,
        variables,
        contentVariable: printed.find((v) => v !== responseField) ?? variables.find((v) => v !== responseField) ?? null,
        printsResponse: variables.includes(responseField),
        responseVerbatim,
        macro,
        render(values) {
            try {
                return renderTemplate(wrapped, values);
            } catch (err) {
                throw templateError(err, "failed to render");
            }
        }
    };
    cached = compiled;
    return compiled;
}

/**
 * A record (its fields after the column mapping) as prompt and completion. `response` is the response text;
 * `fail` throws a QloraError naming the record.
 */
export function renderJinjaRecord(
    t: JinjaUserTemplate,
    record: Record<string, unknown>,
    response: string,
    fail: (problem: string) => never
): JinjaRecordParts {
    const values: Record<string, unknown> = {};
    for (const name of t.variables) {
        const value = record[name];
        if (value !== undefined && value !== null) values[name] = value;
    }
    if (!t.printsResponse) return {prompt: t.render(values), completion: response};
    const marked = t.render({...values, [t.responseField]: RESPONSE_MARKER});
    const at = marked.indexOf(RESPONSE_MARKER);
    const field = `"${t.responseField}" (the response)`;
    if (at < 0)
        fail(
            `the template does not print ${field} as {{ ${t.responseField} }} for this record, so the prompt has no end; ` +
                `print it once, unfiltered, or leave it out and the response follows the prompt`
        );
    if (marked.indexOf(RESPONSE_MARKER, at + 1) >= 0)
        fail(`the template prints ${field} more than once, so the prompt would hold the answer; print it once`);
    const prompt = marked.slice(0, at);
    const completion = response + marked.slice(at + RESPONSE_MARKER.length);
    // a template that tests or transforms the response renders other text around it than the marker showed
    if (!t.responseVerbatim && t.render({...values, [t.responseField]: response}) !== prompt + completion)
        fail(
            `the template's text around {{ ${t.responseField} }} depends on ${field}; print it as {{ ${t.responseField} }} ` +
                "and do not test or filter it"
        );
    return {prompt, completion};
}

/**
 * The variables a template reads that it does not set itself, in order of first use; those it prints; and whether
 * the response is only ever printed as it is (`{{ output }}` directly in the text).
 */
function readVariables(tree: Node, response: string): {variables: string[]; printed: string[]; responseVerbatim: boolean} {
    const variables: string[] = [];
    const printed: string[] = [];
    let responseVerbatim = true;
    const use = (name: string, bound: Set<string>, inPrint: boolean, verbatim: boolean): void => {
        if (bound.has(name) || GLOBALS.has(name)) return;
        if (!variables.includes(name)) variables.push(name);
        if (inPrint && !printed.includes(name)) printed.push(name);
        if (name === response && !verbatim) responseVerbatim = false;
    };
    const names = (target: Node): string[] =>
        target.type === "Identifier"
            ? [target.value as string]
            : target.type === "TupleLiteral"
              ? (target.value as Node[]).flatMap(names)
              : [];
    const expr = (node: Node | undefined | null, bound: Set<string>, inPrint: boolean): void => {
        if (!node || typeof node !== "object") return;
        switch (node.type) {
            case "Identifier":
                use(node.value as string, bound, inPrint, false);
                return;
            case "MemberExpression":
                expr(node.object as Node, bound, inPrint);
                if (node.computed) expr(node.property as Node, bound, inPrint);
                return;
            case "FilterExpression": {
                expr(node.operand as Node, bound, inPrint);
                const filter = node.filter as Node;
                // the filter's name is not a variable; its arguments are
                if (filter.type === "CallExpression") for (const arg of filter.args as Node[]) expr(arg, bound, inPrint);
                return;
            }
            case "TestExpression":
                expr(node.operand as Node, bound, inPrint);
                return;
            case "KeywordArgumentExpression":
                expr(node.value as Node, bound, inPrint);
                return;
            case "ObjectLiteral":
                for (const [key, value] of node.value as Map<Node, Node>) {
                    expr(key, bound, inPrint);
                    expr(value, bound, inPrint);
                }
                return;
            case "StringLiteral":
            case "IntegerLiteral":
            case "FloatLiteral":
                return;
            default:
                // calls, operators, lists, slices, ternaries, spreads: every child node is an expression
                for (const value of Object.values(node)) {
                    if (Array.isArray(value)) for (const item of value) expr(item as Node, bound, inPrint);
                    else if (value && typeof value === "object" && typeof (value as Node).type === "string")
                        expr(value as Node, bound, inPrint);
                }
        }
    };
    const block = (list: Node[], bound: Set<string>): void => {
        for (const node of list) {
            if (!STATEMENTS.has(node.type)) {
                // printed: `{{ output }}` as it is is the one use of the response that keeps the text around it fixed
                if (node.type === "Identifier") use(node.value as string, bound, true, true);
                else expr(node, bound, true);
                continue;
            }
            switch (node.type) {
                case "If":
                    expr(node.test as Node, bound, false);
                    block(node.body as Node[], bound);
                    block(node.alternate as Node[], bound);
                    break;
                case "For": {
                    const inner = new Set([...bound, ...names(node.loopvar as Node)]);
                    const iterable = node.iterable as Node;
                    // `for x in xs if test`: the test reads the loop variable
                    if (iterable.type === "SelectExpression") {
                        expr(iterable.lhs as Node, bound, false);
                        expr(iterable.test as Node, inner, false);
                    } else expr(iterable, bound, false);
                    block(node.body as Node[], inner);
                    block(node.defaultBlock as Node[], bound);
                    break;
                }
                case "Set": {
                    expr(node.value as Node | null, bound, false);
                    block(node.body as Node[], bound);
                    const target = node.assignee as Node;
                    if (target.type === "MemberExpression") expr(target.object as Node, bound, false);
                    // later uses read the template's own variable, not a field
                    for (const name of names(target)) bound.add(name);
                    break;
                }
                case "Macro": {
                    bound.add((node.name as Node).value as string);
                    const inner = new Set(bound);
                    for (const arg of node.args as Node[]) {
                        if (arg.type === "KeywordArgumentExpression") {
                            expr(arg.value as Node, bound, false);
                            inner.add((arg.key as Node).value as string);
                        } else inner.add(arg.value as string);
                    }
                    block(node.body as Node[], inner);
                    break;
                }
                case "CallStatement": {
                    expr(node.call as Node, bound, false);
                    const inner = new Set(bound);
                    for (const arg of (node.callerArgs as Node[] | null) ?? []) for (const name of names(arg)) inner.add(name);
                    block(node.body as Node[], inner);
                    break;
                }
                case "FilterStatement": {
                    const filter = node.filter as Node;
                    if (filter.type === "CallExpression") for (const arg of filter.args as Node[]) expr(arg, bound, false);
                    block(node.body as Node[], bound);
                    break;
                }
                case "Program":
                    block(node.body as Node[], bound);
                    break;
                // Comment, Break, Continue read nothing
            }
        }
    };
    block([tree], new Set());
    return {variables, printed, responseVerbatim};
}
