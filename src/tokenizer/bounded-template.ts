// Chat templates come from model folders, so they are untrusted code: `{% for i in range(1000000000) %}` made Node
// abort out of memory, nested loops hung it, a macro calling itself overflowed the stack. This file parses and renders
// them with @huggingface/jinja (pinned at 0.5.11) under limits on time, size and depth; breaking one throws a
// TemplateLimitError that says which limit, and the caller turns it into a message naming the template's file.
//
// How: BoundedInterpreter overrides Interpreter.evaluate, which every statement and expression goes through, and
// evaluateBlock, which every loop iteration goes through. Each evaluation counts against the nesting depth, every 16th
// evaluation or iteration reads the clock, and every value an evaluation makes is measured: its size as text (what
// printing or tojson would make of it, a shared part counted each time it appears, so a list holding another list
// twice, 60 levels deep, is caught while it is built, not when printed) and the total of those sizes over the render,
// which bounds the memory a render can hold. Where one library call could make a huge string out of small inputs
// (indent(width), join(sep), replace, tojson(indent)), the size of the result is worked out before the call. range()
// is replaced by one that refuses huge ranges before making them. Real templates (Qwen, Llama 3, Gemma, Mistral,
// with tools) render in well under a millisecond and a few KB, so every limit is hundreds of times what they need.

import {Environment as JinjaEnvironment, Interpreter as JinjaInterpreter, Template} from "@huggingface/jinja";

// The library's .d.ts files import "./runtime" and "./ast" without extensions, which NodeNext resolution cannot
// follow, so its classes type as `any`. These are the parts of them this file uses.
/** a node of the parsed template: statements and expressions, told apart by `type` ("For", "FilterExpression", …) */
interface Statement {
    type: string;
    [field: string]: unknown;
}
/** a value during rendering: "StringValue", "ArrayValue", "NamespaceValue", "FunctionValue", … */
interface RuntimeValue {
    type: string;
    value: unknown;
}
interface Environment {
    /** declares a variable, converting a JavaScript value to a runtime value */
    set(name: string, value: unknown): RuntimeValue;
}
interface Interpreter {
    run(program: Statement): RuntimeValue;
    evaluate(statement: Statement | undefined, environment: Environment): RuntimeValue;
    /** private in the library: renders a list of statements (a loop body once per item, a macro body, an if branch) */
    evaluateBlock(statements: Statement[], environment: Environment): RuntimeValue;
}
const Interpreter = JinjaInterpreter as new (env: Environment) => Interpreter;
// the methods BoundedInterpreter overrides: an upgrade of the library that renamed one must fail here, loudly, and
// not go on rendering without the limits
for (const method of ["evaluate", "evaluateBlock"]) {
    if (typeof (JinjaInterpreter.prototype as Record<string, unknown>)[method] !== "function") {
        throw new Error(
            `@huggingface/jinja's Interpreter has no ${method}(); bounded-template.ts must be updated for this version`
        );
    }
}

export interface TemplateLimits {
    /** wall-clock time of one render, before adding timeMsPerInputMiB for each 2^20 characters of input */
    timeMs: number;
    timeMsPerInputMiB: number;
    /** characters of one value (a string, or a list/mapping as printed), before adding valueCharsPerInputChar × input */
    valueChars: number;
    valueCharsPerInputChar: number;
    /** characters of all values a render makes together, before adding totalCharsPerInputChar × input */
    totalChars: number;
    totalCharsPerInputChar: number;
    /** numbers one range() call may make */
    rangeLength: number;
    /** nested evaluations (expressions inside expressions, macros calling macros) */
    depth: number;
    /** characters of template text */
    templateChars: number;
}

/**
 * Defaults. A render may take 2 s and make values of 4 Mi characters (16 Mi in all), plus 1 s, 4× and 64× for each
 * Mi characters of its input (messages, tools, extra variables), so a long conversation is never refused for being
 * long. range() stops at 100,000 numbers, as in Jinja's own sandbox (MAX_RANGE). 200 nested evaluations is a fifth of
 * where the hungriest pattern found overflows Node's default stack (~930); real templates nest under 20.
 */
export const DEFAULT_TEMPLATE_LIMITS: Readonly<TemplateLimits> = Object.freeze({
    timeMs: 2000,
    timeMsPerInputMiB: 1000,
    valueChars: 4 * 1024 * 1024,
    valueCharsPerInputChar: 4,
    totalChars: 16 * 1024 * 1024,
    totalCharsPerInputChar: 64,
    rangeLength: 100_000,
    depth: 200,
    templateChars: 1024 * 1024
});

/** a template went past one of the limits; the message says which, as "ran past its … limit …" */
export class TemplateLimitError extends Error {
    constructor(message: string) {
        super(message);
        this.name = "TemplateLimitError";
    }
}

/** true for the RangeError V8 throws when the stack runs out (deep parser recursion, deeply nested data) */
export function isStackOverflow(err: unknown): boolean {
    return err instanceof RangeError && /call stack/i.test(err.message);
}

const formatCount = (n: number): string => Math.round(n).toLocaleString("en-US");

/** Parses a template; errors are the library's (SyntaxError, RangeError for nesting too deep) or a TemplateLimitError. */
export function parseTemplate(text: string, limits: Readonly<TemplateLimits> = DEFAULT_TEMPLATE_LIMITS): Template {
    const tooLong = templateSizeProblem(text, limits);
    if (tooLong) throw new TemplateLimitError(tooLong);
    return new Template(text);
}

/** why a template is too long to accept (rendering, or carrying it into a GGUF file), or null */
export function templateSizeProblem(text: string, limits: Readonly<TemplateLimits> = DEFAULT_TEMPLATE_LIMITS): string | null {
    if (text.length <= limits.templateChars) return null;
    return (
        `ran past its size limit: it is ${formatCount(text.length)} characters long, more than the ` +
        `${formatCount(limits.templateChars)} a template may have (real ones are under 64 K)`
    );
}

/** Renders a parsed template as Template.render does, under `limits`. */
export function renderTemplate(
    template: Template,
    variables: Record<string, unknown>,
    limits: Readonly<TemplateLimits> = DEFAULT_TEMPLATE_LIMITS
): string {
    try {
        const env: Environment = new JinjaEnvironment();
        setupGlobals(env, limits);
        const measure = new Measurer();
        let inputChars = 0;
        for (const [key, value] of Object.entries(variables)) inputChars += measure.chars(env.set(key, value));
        const timeMs = limits.timeMs + (limits.timeMsPerInputMiB * inputChars) / (1024 * 1024);
        const interpreter = new BoundedInterpreter(env, measure, {
            deadline: performance.now() + timeMs,
            timeMs,
            maxValueChars: limits.valueChars + limits.valueCharsPerInputChar * inputChars,
            maxTotalChars: limits.totalChars + limits.totalCharsPerInputChar * inputChars,
            maxDepth: limits.depth
        });
        return interpreter.run(template.parsed as Statement).value as string;
    } catch (err) {
        // the checks above keep a template well inside V8's limits; these are the backstops for anything missed
        if (isStackOverflow(err)) {
            throw new TemplateLimitError(
                "ran past the stack: its macros or data nest too deeply (a macro that calls itself without end?)"
            );
        }
        if (err instanceof RangeError && /Invalid (string|array) length/.test(err.message)) {
            throw new TemplateLimitError(
                `ran past its size limit: it built a value larger than JavaScript allows (${err.message})`
            );
        }
        throw err;
    }
}

// The globals @huggingface/jinja 0.5.11's setupGlobals declares (it is not exported), with range() bounded.
// When upgrading the library, compare with its setupGlobals in src/runtime.ts.
function setupGlobals(env: Environment, limits: Readonly<TemplateLimits>): void {
    env.set("false", false);
    env.set("true", true);
    env.set("none", null);
    env.set("raise_exception", (message: string) => {
        throw new Error(message);
    });
    env.set("range", (start: number, stop?: number, step = 1) => boundedRange(limits.rangeLength, start, stop, step));
    env.set("strftime_now", strftimeNow);
    env.set("True", true);
    env.set("False", false);
    env.set("None", null);
}

/** Python's range() as the library implements it, refusing more than maxLength numbers before making any */
function boundedRange(maxLength: number, start: number, stop?: number, step = 1): number[] {
    if (stop === undefined) {
        stop = start;
        start = 0;
    }
    if (step === 0) throw new Error("range() step must not be zero");
    const length = Math.max(0, Math.ceil((stop - start) / step));
    if (length > maxLength) {
        throw new TemplateLimitError(
            `ran past its range() limit: range(${[start, stop, step].join(", ")}) would make ${formatCount(length)} numbers, ` +
                `more than the ${formatCount(maxLength)} one range() may make`
        );
    }
    const result: number[] = [];
    // counting as well as comparing: at 1e17, i += 1 leaves i unchanged and the library's loop never ends (one more
    // than `length` is allowed, as float steps may round to one more number than the division says)
    for (let i = start, n = 0; (step > 0 ? i < stop : i > stop) && n <= length; i += step, n++) result.push(i);
    return result;
}

/** the library's strftime_now (the Python strftime codes it knows: %Y %m %d %b %B %H %M %%) */
function strftimeNow(format: string): string {
    const date = new Date();
    const pad2 = (n: number): string => (n < 10 ? "0" + n : n.toString());
    return format.replace(/%[YmdbBHM%]/g, (token) => {
        switch (token) {
            case "%Y":
                return date.getFullYear().toString();
            case "%m":
                return pad2(date.getMonth() + 1);
            case "%d":
                return pad2(date.getDate());
            case "%b":
                return new Intl.DateTimeFormat(undefined, {month: "short"}).format(date);
            case "%B":
                return new Intl.DateTimeFormat(undefined, {month: "long"}).format(date);
            case "%H":
                return pad2(date.getHours());
            case "%M":
                return pad2(date.getMinutes());
            case "%%":
                return "%";
            default:
                return token;
        }
    });
}

/** what a value amounts to when printed: characters, and for tojson(indent=…) the number of values and the nesting */
interface Measure {
    chars: number;
    values: number;
    depth: number;
    /** a namespace is inside, which can still be assigned to, so the measure may grow */
    mutable: boolean;
}

const SCALAR: Measure = Object.freeze({chars: 1, values: 1, depth: 0, mutable: false});

/**
 * Measures runtime values as the text they print to. A number counts as one character: the point is to bound how
 * big things get, within a small factor. Lists and mappings never change once made, so their measure is remembered:
 * a list that contains another list many times is measured once per distinct list, and a list of a million numbers
 * once, not at every use. Namespaces change (`{% set ns.x = … %}`), so they and whatever holds them are measured
 * afresh each time.
 */
class Measurer {
    private readonly known = new WeakMap<object, Measure>();
    private readonly inProgress = new Set<object>();

    /** characters only: the common case, a string, without making a Measure */
    chars(v: RuntimeValue): number {
        return v.type === "StringValue" ? (v.value as string).length : CONTAINERS.has(v.type) ? this.of(v).chars : 1;
    }

    of(v: RuntimeValue): Measure {
        if (v.type === "StringValue") return {chars: (v.value as string).length, values: 1, depth: 0, mutable: false};
        if (!CONTAINERS.has(v.type)) return SCALAR;
        const remembered = this.known.get(v);
        if (remembered) return remembered;
        if (this.inProgress.has(v)) {
            throw new TemplateLimitError("ran past its size limit: a namespace contains itself, so printing it would never end");
        }
        this.inProgress.add(v);
        const m: Measure = {chars: 2, values: 1, depth: 0, mutable: v.type === "NamespaceValue"};
        try {
            const isList = Array.isArray(v.value);
            const entries = isList ? (v.value as RuntimeValue[]).entries() : (v.value as Map<string, RuntimeValue>).entries();
            for (const [key, child] of entries) {
                const c = this.of(child);
                // a list item adds ", "; a mapping entry adds its key, quotes, ": " and ", "
                m.chars += c.chars + (isList ? 2 : (key as string).length + 6);
                m.values += c.values;
                if (c.depth + 1 > m.depth) m.depth = c.depth + 1;
                if (c.mutable) m.mutable = true;
            }
        } finally {
            this.inProgress.delete(v);
        }
        if (!m.mutable) this.known.set(v, m);
        return m;
    }
}

interface Bounds {
    deadline: number;
    timeMs: number;
    maxValueChars: number;
    maxTotalChars: number;
    maxDepth: number;
}

// evaluations that hand back a value that already exists (a variable, a field of one, a branch) or a constant of the
// template's text: they make nothing new, so they are not measured
const PASS_THROUGH = new Set([
    "Identifier",
    "Ternary",
    "SelectExpression",
    "StringLiteral",
    "IntegerLiteral",
    "FloatLiteral",
    "Comment",
    "Break",
    "Continue",
    "Set",
    "Macro",
    "TestExpression",
    "UnaryExpression"
]);
// `a and b`, `a or b` give back one of their operands
const LOGICAL_OPERATORS = new Set(["and", "or"]);

const CONTAINERS = new Set(["ArrayValue", "TupleValue", "ObjectValue", "KeywordArgumentsValue", "NamespaceValue"]);

// a node carrying an already evaluated value, so a call can be checked before it runs without evaluating twice
const PRECOMPUTED = "QloraPrecomputedValue";

// the filters whose result can be far larger than their inputs
const SIZE_CHECKED_FILTERS = new Set(["indent", "join", "replace", "tojson"]);

class BoundedInterpreter extends Interpreter {
    private depth = 0;
    private steps = 0;
    private totalChars = 0;

    constructor(
        env: Environment,
        private readonly measure: Measurer,
        private readonly bounds: Bounds
    ) {
        super(env);
    }

    override evaluate(node: Statement | undefined, environment: Environment): RuntimeValue {
        if (!node) return super.evaluate(node, environment);
        if (node.type === PRECOMPUTED) return node.value as RuntimeValue;
        this.depth++;
        try {
            if (this.depth > this.bounds.maxDepth) {
                throw new TemplateLimitError(
                    `ran past its depth limit: it nests evaluations more than ${this.bounds.maxDepth} deep (a macro that calls itself without end, or expressions nested that deep)`
                );
            }
            if ((++this.steps & 15) === 0) this.checkDeadline();
            let result: RuntimeValue;
            let made: boolean;
            switch (node.type) {
                case "FilterExpression":
                case "FilterStatement":
                    result = this.evaluateFilter(node, environment);
                    made = true;
                    break;
                case "MemberExpression":
                    result = this.evaluateMember(node, environment);
                    made = (node.property as Statement).type === "SliceExpression";
                    break;
                case "BinaryExpression":
                    result = super.evaluate(node, environment);
                    made = !LOGICAL_OPERATORS.has((node.operator as {value: string}).value);
                    break;
                default:
                    result = super.evaluate(node, environment);
                    made = !PASS_THROUGH.has(node.type);
            }
            if (made) {
                this.account(result);
            } else if (CONTAINERS.has(result.type)) {
                // a list or mapping that already existed may have grown since it was made (a namespace in it was
                // assigned to): it is measured again before anything prints it
                const chars = this.measure.of(result).chars;
                if (chars > this.bounds.maxValueChars) this.refuseSize(chars);
            }
            return result;
        } finally {
            this.depth--;
        }
    }

    // a loop runs its body through here once per item, even an empty body that evaluates nothing
    override evaluateBlock(statements: Statement[], environment: Environment): RuntimeValue {
        if ((++this.steps & 15) === 0) this.checkDeadline();
        return super.evaluateBlock(statements, environment);
    }

    private checkDeadline(): void {
        if (performance.now() > this.bounds.deadline) {
            throw new TemplateLimitError(
                `ran past its time limit of ${(this.bounds.timeMs / 1000).toFixed(1)} s for this render (real templates take well under a millisecond)`
            );
        }
    }

    /** counts a value the template made against the per-value and the whole-render size limits */
    private account(value: RuntimeValue): void {
        const chars = this.measure.chars(value);
        if (chars > this.bounds.maxValueChars) this.refuseSize(chars);
        this.totalChars += chars;
        if (this.totalChars > this.bounds.maxTotalChars) {
            throw new TemplateLimitError(
                `ran past its size limit: the values it built add up to more than ${formatCount(this.bounds.maxTotalChars)} characters`
            );
        }
    }

    private refuseSize(chars: number, what = "a value of"): never {
        throw new TemplateLimitError(
            `ran past its size limit: it built ${what} ${formatCount(chars)} characters, more than the ` +
                `${formatCount(this.bounds.maxValueChars)} allowed for this render`
        );
    }

    // `x | f(args)` and `{% filter f(args) %}…{% endfilter %}`: for the filters whose result can be far larger than
    // their inputs, the operand and arguments are evaluated here (in the library's order), the result's size is
    // worked out, and only then does the library apply the filter to the values
    private evaluateFilter(node: Statement, environment: Environment): RuntimeValue {
        const filter = node.filter as Statement;
        const callee = filter.callee as Statement | undefined;
        const name = filter.type === "CallExpression" && callee?.type === "Identifier" ? (callee.value as string) : "";
        if (!SIZE_CHECKED_FILTERS.has(name)) return super.evaluate(node, environment);
        const operand =
            node.type === "FilterExpression"
                ? this.evaluate(node.operand as Statement, environment)
                : super.evaluate({type: "Program", body: node.body}, environment); // what the filter block renders to
        const {nodes, positional, keyword} = this.evaluateArgumentValues(filter.args as Statement[], environment);
        this.checkFilterSize(name, operand, positional, keyword);
        return super.evaluate(
            {type: "FilterExpression", operand: precomputed(operand), filter: {...filter, args: nodes}},
            environment
        );
    }

    // `s.replace` (or `s['replace']`, or a computed name) comes back wrapped in a check of the result's size, however
    // it is called later; other members are left to the library
    private evaluateMember(node: Statement, environment: Environment): RuntimeValue {
        const property = node.property as Statement;
        const staticName =
            !node.computed || property.type === "StringLiteral" || property.type === "IntegerLiteral"
                ? property.value
                : undefined;
        if ((staticName !== undefined && staticName !== "replace") || property.type === "SliceExpression") {
            return super.evaluate(node, environment);
        }
        const object = this.evaluate(node.object as Statement, environment);
        let name: unknown = staticName;
        let propertyNode: Statement = property;
        if (name === undefined) {
            const key = this.evaluate(property, environment);
            name = key.value;
            propertyNode = precomputed(key);
        }
        const member = super.evaluate({...node, object: precomputed(object), property: propertyNode}, environment);
        const text = stringOf(object);
        if (name !== "replace" || text === null || member.type !== "FunctionValue") return member;
        const replace = member.value as (args: RuntimeValue[], scope: Environment) => RuntimeValue;
        const FunctionValue = member.constructor as new (fn: typeof replace) => RuntimeValue;
        return new FunctionValue((args, scope) => {
            // keyword arguments come last, as one KeywordArgumentsValue
            const last = args.at(-1);
            const keywordArgs = last?.type === "KeywordArgumentsValue";
            this.checkReplaceSize(
                text,
                keywordArgs ? args.slice(0, -1) : args,
                keywordArgs ? (last.value as Map<string, RuntimeValue>) : new Map()
            );
            return replace(args, scope);
        });
    }

    // the library's evaluateArguments, keeping the values: positional ones (and *spreads) first, then keyword ones
    // (and **spreads); `nodes` are the arguments again, as precomputed values
    private evaluateArgumentValues(
        args: Statement[],
        environment: Environment
    ): {nodes: Statement[]; positional: RuntimeValue[]; keyword: Map<string, RuntimeValue>} {
        const nodes: Statement[] = new Array(args.length);
        const positional: RuntimeValue[] = [];
        const keyword = new Map<string, RuntimeValue>();
        args.forEach((arg, i) => {
            if (arg.type === "KeywordArgumentExpression" || arg.type === "KeywordSpreadExpression") return;
            if (arg.type === "SpreadExpression") {
                const value = this.evaluate(arg.argument as Statement, environment);
                nodes[i] = {...arg, argument: precomputed(value)};
                if (Array.isArray(value.value)) positional.push(...(value.value as RuntimeValue[]));
            } else {
                const value = this.evaluate(arg, environment);
                nodes[i] = precomputed(value);
                positional.push(value);
            }
        });
        args.forEach((arg, i) => {
            if (arg.type === "KeywordArgumentExpression") {
                const value = this.evaluate(arg.value as Statement, environment);
                nodes[i] = {...arg, value: precomputed(value)};
                keyword.set((arg.key as Statement).value as string, value);
            } else if (arg.type === "KeywordSpreadExpression") {
                const value = this.evaluate(arg.argument as Statement, environment);
                nodes[i] = {...arg, argument: precomputed(value)};
                if (value.value instanceof Map)
                    for (const [key, v] of value.value as Map<string, RuntimeValue>) keyword.set(key, v);
            }
        });
        return {nodes, positional, keyword};
    }

    /** refuses a filter call whose result could pass the size limit (wrong argument types are left to the library) */
    private checkFilterSize(
        name: string,
        operand: RuntimeValue,
        positional: RuntimeValue[],
        keyword: Map<string, RuntimeValue>
    ): void {
        const text = stringOf(operand);
        let estimate = 0;
        if (name === "replace") {
            if (text !== null) this.checkReplaceSize(text, positional, keyword);
            return;
        } else if (name === "indent") {
            // every line but the first (and blank ones) gets `width` spaces; counted for all of them
            const width = Math.max(numberOf(positional[0] ?? keyword.get("width")) ?? 0, 0);
            if (text !== null) estimate = text.length + (countOf(text, "\n", Infinity) + 1) * width;
        } else if (name === "join") {
            const separator = stringOf(positional[0] ?? keyword.get("separator")) ?? "";
            if (text !== null) {
                estimate = text.length * (1 + separator.length); // a string is joined character by character
            } else if (Array.isArray(operand.value)) {
                // items that are not strings print as JSON: at most 6 characters (a \uXXXX escape) per measured one
                for (const item of operand.value as RuntimeValue[]) {
                    estimate += (stringOf(item)?.length ?? 6 * this.measure.of(item).chars + 24) + separator.length;
                }
            }
        } else if (name === "tojson") {
            const m = this.measure.of(operand);
            const indent = Math.max(numberOf(keyword.get("indent")) ?? 0, 0);
            const separators = keyword.get("separators")?.value;
            let separatorChars = 0;
            if (Array.isArray(separators))
                for (const s of separators as RuntimeValue[]) separatorChars += stringOf(s)?.length ?? 0;
            // at most 6 characters per one measured (\uXXXX), and each value on a line of its own, indented by its depth
            estimate = 6 * m.chars + m.values * (1 + m.depth * indent + separatorChars);
        }
        if (estimate > this.bounds.maxValueChars) this.refuseSize(estimate, `with ${name}(…) a text of up to`);
    }

    private checkReplaceSize(text: string, positional: RuntimeValue[], keyword: Map<string, RuntimeValue>): void {
        const oldText = stringOf(positional[0]);
        const newText = stringOf(positional[1]);
        if (oldText === null || newText === null || newText.length <= oldText.length) return;
        const count = numberOf(positional[2] ?? keyword.get("count"));
        const limit = count !== null && count >= 0 ? count : Infinity;
        // an empty old text matches between every two characters
        const matches = oldText === "" ? Math.min(text.length + 1, limit) : countOf(text, oldText, limit);
        const estimate = text.length + matches * (newText.length - oldText.length);
        if (estimate > this.bounds.maxValueChars) this.refuseSize(estimate, "with replace(…) a text of");
    }
}

function precomputed(value: RuntimeValue): Statement {
    return {type: PRECOMPUTED, value};
}

function stringOf(value: RuntimeValue | undefined): string | null {
    return value?.type === "StringValue" ? (value.value as string) : null;
}

function numberOf(value: RuntimeValue | undefined): number | null {
    return value?.type === "IntegerValue" || value?.type === "FloatValue" ? (value.value as number) : null;
}

/** occurrences of `part` (not empty) in `text`, counting no further than `limit` */
function countOf(text: string, part: string, limit: number): number {
    let n = 0;
    for (let at = text.indexOf(part); at !== -1 && n < limit; at = text.indexOf(part, at + part.length)) n++;
    return n;
}
