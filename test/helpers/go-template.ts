// go-template.ts: a small interpreter of Go's text/template, the subset Ollama TEMPLATEs written by
// src/export/ollama.ts use, to check them against the Jinja templates they translate: text, {{ if }} / {{ else }}
// / {{ end }}, {{ range $i, $m := PIPE }}, and expressions of fields (.X, $.X, $v.X), variables, string and
// integer literals, parentheses and the functions eq, ne, and, len, slice and index. Whitespace trimming ({{- -}})
// is refused: the templates must not use it.
type Value = unknown;

interface Scope {
    dot: Value;
    root: Value;
    vars: Map<string, Value>;
}

type Node =
    | {kind: "text"; text: string}
    | {kind: "expr"; expr: string}
    | {kind: "if"; cond: string; whenTrue: Node[]; whenFalse: Node[]}
    | {kind: "range"; index: string; value: string; over: string; body: Node[]};

function parse(template: string): Node[] {
    const tokens: {text?: string; action?: string}[] = [];
    let at = 0;
    while (at < template.length) {
        const open = template.indexOf("{{", at);
        if (open < 0) {
            tokens.push({text: template.slice(at)});
            break;
        }
        if (open > at) tokens.push({text: template.slice(at, open)});
        const close = findClose(template, open + 2);
        const action = template.slice(open + 2, close);
        if (action.startsWith("-") || action.endsWith("-")) throw new Error("whitespace trimming is not supported");
        tokens.push({action: action.trim()});
        at = close + 2;
    }
    let i = 0;
    const block = (stopAt: string[]): Node[] => {
        const out: Node[] = [];
        while (i < tokens.length) {
            const t = tokens[i];
            if (t.text !== undefined) {
                out.push({kind: "text", text: t.text});
                i++;
                continue;
            }
            const a = t.action!;
            if (stopAt.some((s) => a === s || a.startsWith(`${s} `))) return out;
            i++;
            if (a.startsWith("if ")) {
                const node: Node = {kind: "if", cond: a.slice(3), whenTrue: block(["else", "end"]), whenFalse: []};
                if (tokens[i]?.action === "else") {
                    i++;
                    node.whenFalse = block(["end"]);
                }
                if (tokens[i++]?.action !== "end") throw new Error("if without end");
                out.push(node);
            } else if (a.startsWith("range ")) {
                const m = /^range \$(\w+), \$(\w+) := (.+)$/.exec(a);
                if (!m) throw new Error(`unsupported range: ${a}`);
                out.push({kind: "range", index: m[1], value: m[2], over: m[3], body: block(["end"])});
                if (tokens[i++]?.action !== "end") throw new Error("range without end");
            } else out.push({kind: "expr", expr: a});
        }
        return out;
    };
    const nodes = block([]);
    if (i !== tokens.length) throw new Error("unbalanced template");
    return nodes;
}

/** the end of an action, skipping string literals */
function findClose(s: string, from: number): number {
    for (let i = from; i < s.length; i++) {
        if (s[i] === '"') {
            for (i++; i < s.length && s[i] !== '"'; i++) if (s[i] === "\\") i++;
            continue;
        }
        if (s[i] === "}" && s[i + 1] === "}") return i;
    }
    throw new Error("unclosed action");
}

function tokenize(expr: string): string[] {
    const out: string[] = [];
    let i = 0;
    while (i < expr.length) {
        const c = expr[i];
        if (c === " ") i++;
        else if (c === "(") out.push(expr[i++]);
        else if (c === ")") {
            out.push(expr[i++]);
            // a field of the parenthesized value: (index .Messages 0).Role
            if (expr[i] === ".") {
                let j = i;
                while (j < expr.length && !" ()".includes(expr[j])) j++;
                out.push(`@${expr.slice(i, j)}`);
                i = j;
            }
        } else if (c === '"') {
            let j = i + 1;
            while (expr[j] !== '"') j += expr[j] === "\\" ? 2 : 1;
            out.push(expr.slice(i, j + 1));
            i = j + 1;
        } else {
            let j = i;
            while (j < expr.length && !" ()".includes(expr[j])) j++;
            out.push(expr.slice(i, j));
            i = j;
        }
    }
    return out;
}

function evaluate(expr: string, scope: Scope): Value {
    const tokens = tokenize(expr);
    let i = 0;
    const operand = (): Value => {
        const t = tokens[i++];
        if (t === "(") {
            let v = command();
            if (tokens[i++] !== ")") throw new Error("missing )");
            if (tokens[i]?.startsWith("@.")) for (const f of tokens[i++].slice(2).split(".")) v = (v as Record<string, Value>)[f];
            return v;
        }
        if (t.startsWith('"')) return JSON.parse(t);
        if (/^-?\d+$/.test(t)) return Number(t);
        const path = t.split(".");
        let v: Value;
        if (path[0] === "") v = scope.dot;
        else if (path[0] === "$") v = scope.root;
        else if (path[0].startsWith("$")) {
            if (!scope.vars.has(path[0].slice(1))) throw new Error(`undefined variable ${path[0]}`);
            v = scope.vars.get(path[0].slice(1));
        } else throw new Error(`unsupported operand ${t}`);
        for (const f of path.slice(1)) if (f) v = (v as Record<string, Value>)[f];
        return v;
    };
    const FUNCS: Record<string, (...args: Value[]) => Value> = {
        eq: (a, b) => a === b,
        ne: (a, b) => a !== b,
        and: (a, b) => (truthy(a) ? b : a),
        len: (a) => (a as unknown[]).length,
        slice: (a, from) => (a as unknown[]).slice(from as number),
        index: (a, k) => (a as unknown[])[k as number]
    };
    const command = (): Value => {
        const f = FUNCS[tokens[i]];
        if (!f) return operand();
        i++;
        const args: Value[] = [];
        while (i < tokens.length && tokens[i] !== ")") args.push(operand());
        return f(...args);
    };
    const v = command();
    if (i !== tokens.length) throw new Error(`trailing tokens in ${expr}`);
    return v;
}

function truthy(v: Value): boolean {
    if (Array.isArray(v)) return v.length > 0;
    return v !== undefined && v !== null && v !== false && v !== "" && v !== 0;
}

function run(nodes: Node[], scope: Scope): string {
    let out = "";
    for (const n of nodes) {
        if (n.kind === "text") out += n.text;
        else if (n.kind === "expr") out += String(evaluate(n.expr, scope));
        else if (n.kind === "if") out += run(truthy(evaluate(n.cond, scope)) ? n.whenTrue : n.whenFalse, scope);
        else
            (evaluate(n.over, scope) as Value[]).forEach((item, idx) => {
                const vars = new Map(scope.vars);
                vars.set(n.index, idx);
                vars.set(n.value, item);
                out += run(n.body, {dot: item, root: scope.root, vars});
            });
    }
    return out;
}

/** renders a Go template with `data` as dot (and $) */
export function renderGoTemplate(template: string, data: Record<string, Value>): string {
    return run(parse(template), {dot: data, root: data, vars: new Map()});
}
