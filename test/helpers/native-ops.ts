// native-ops.ts: checks from the sources (no compiler, no build) that the three hand-written descriptions of each
// native op agree: the N-API registration in native/addon/*.cpp, the TypeScript mirror in src/backend
// (native-types.ts, native-*-types.ts, cuda-*-types.ts) and the C ABI headers (native/include, native/cuda).
//
// C++ side: a function is registered by `exports.Set("name", Napi::Function::New(env, Fn, "name"))` or through a
// local lambda that wraps that call (`fn("name", Fn)`). The arguments Fn reads are the indices it passes to
// `info[...]` or to a function taking the CallbackInfo (int_arg(info, 3), attn_dims(info, 7, d), Unary<...>(info,
// "op"), ...), followed through those helpers as sums of their parameters, literals and `for (i = 0; i < n; ...)`
// loop counters. An index is optional when the code compares it with `info.Length() >`. Function-like macros that
// define bindings (CONVERT(...)) are expanded first. Addons: CPU = addon_cpu.cpp + cpu_*.cpp, CUDA =
// addon_cuda.cpp + cuda_*.cpp (CMakeLists.txt's globs).
//
// TS side: every method (or function-typed property) of an interface in those files; an interface whose name
// starts with "Cuda" mirrors the CUDA addon, any other the CPU addon.
import {readdirSync, readFileSync} from "node:fs";
import path from "node:path";
import ts from "typescript";

export type AddonName = "cpu" | "cuda";

/** one JS-visible function of an addon, as the C++ registers it */
export interface RegisteredFunction {
    addon: AddonName;
    name: string;
    /** the addon source that registers it */
    file: string;
    /** the C++ function bound to it */
    cppFunction: string;
    /** arguments read: all of them, and those read without an `info.Length()` guard; null when not resolvable */
    maxArgs: number | null;
    minArgs: number | null;
    /** why the count is null */
    unresolved?: string;
}

/** one method of a TS mirror interface */
export interface TsDeclaration {
    addon: AddonName;
    name: string;
    file: string;
    iface: string;
    /** parameters without `?`/default, and all of them (Infinity with a rest parameter) */
    minArgs: number;
    maxArgs: number;
}

// ---------------------------------------------------------------------------------------------------------------
// reading the tree

/** the files the check reads, by path relative to the repository root ("/" separators) */
export function readNativeOpSources(root: string): Map<string, string> {
    const files = new Map<string, string>();
    const add = (dir: string, keep: (name: string) => boolean) => {
        for (const name of readdirSync(path.join(root, dir)).sort())
            if (keep(name)) files.set(`${dir}/${name}`, readFileSync(path.join(root, dir, name), "utf8"));
    };
    add("native/addon", (n) => n.endsWith(".cpp") || n.endsWith(".h"));
    add("native/include", (n) => n.endsWith(".h"));
    add("native/cuda", (n) => n.endsWith(".h"));
    add("src/backend", isTsMirrorFile);
    return files;
}

function isTsMirrorFile(name: string): boolean {
    return name === "native-types.ts" || /^(native|cuda)-[\w-]+-types\.ts$/.test(name);
}

// ---------------------------------------------------------------------------------------------------------------
// C++ text: comments and string contents blanked with the offsets kept

/** `text` with comments replaced by spaces (newlines kept); with `strings`, string/char literal contents too */
function blank(text: string, strings: boolean): string {
    let out = "";
    let i = 0;
    while (i < text.length) {
        const c = text[i];
        const next = text[i + 1];
        if (c === "/" && next === "/") {
            const end = text.indexOf("\n", i);
            const stop = end < 0 ? text.length : end;
            out += " ".repeat(stop - i);
            i = stop;
        } else if (c === "/" && next === "*") {
            const end = text.indexOf("*/", i + 2);
            const stop = end < 0 ? text.length : end + 2;
            out += text.slice(i, stop).replace(/[^\n]/g, " ");
            i = stop;
        } else if (c === '"' || c === "'") {
            let j = i + 1;
            while (j < text.length && text[j] !== c && text[j] !== "\n") j += text[j] === "\\" ? 2 : 1;
            const body = text.slice(i + 1, j);
            out += c + (strings ? body.replace(/[^\n]/g, " ") : body) + (text[j] ?? "");
            i = j + 1;
        } else {
            out += c;
            i++;
        }
    }
    return out;
}

/** index just past the bracket that closes the one at `open` (in blanked text) */
function closing(bare: string, open: number): number {
    const pairs: Record<string, string> = {"(": ")", "[": "]", "{": "}"};
    const stack: string[] = [];
    for (let i = open; i < bare.length; i++) {
        const c = bare[i];
        if (c in pairs) stack.push(pairs[c]);
        else if (c === ")" || c === "]" || c === "}") {
            if (stack.pop() !== c) return -1;
            if (stack.length === 0) return i + 1;
        }
    }
    return -1;
}

/** the arguments of the call whose "(" is at `open`, split at top-level commas: [start, end) offsets */
function callArgs(bare: string, open: number): {args: [number, number][]; end: number} | null {
    const end = closing(bare, open);
    if (end < 0) return null;
    const args: [number, number][] = [];
    let depth = 0;
    let start = open + 1;
    for (let i = open + 1; i < end - 1; i++) {
        const c = bare[i];
        if (c === "(" || c === "[" || c === "{") depth++;
        else if (c === ")" || c === "]" || c === "}") depth--;
        else if (c === "," && depth === 0) {
            args.push([start, i]);
            start = i + 1;
        }
    }
    if (bare.slice(start, end - 1).trim() !== "" || args.length > 0) args.push([start, end - 1]);
    return {args, end};
}

/** expands the function-like macros that define N-API bindings (their body names Napi::CallbackInfo) */
function expandBindingMacros(text: string): string {
    const lines = text.split("\n");
    const macros: {name: string; params: string[]; body: string}[] = [];
    const kept: string[] = [];
    for (let i = 0; i < lines.length; i++) {
        const m = /^\s*#\s*define\s+(\w+)\(([^)]*)\)(.*)$/.exec(lines[i]);
        let last = i;
        while (m && lines[last].trimEnd().endsWith("\\") && last + 1 < lines.length) last++;
        const definition = lines.slice(i, last + 1);
        if (m && definition.join("\n").includes("CallbackInfo")) {
            const body = [m[3], ...definition.slice(1)].map((l) => l.trimEnd().replace(/\\$/, "")).join("\n");
            macros.push({name: m[1], params: m[2].split(",").map((p) => p.trim()), body});
            kept.push(...definition.map(() => "")); // the definition itself defines nothing until used
        } else kept.push(...definition);
        i = last;
    }
    let out = kept.join("\n");
    for (const macro of macros) {
        const bare = blank(out, true);
        const use = new RegExp(`^[ \\t]*${macro.name}\\s*\\(`, "gm");
        let expansions = "";
        for (const m of bare.matchAll(use)) {
            const call = callArgs(bare, m.index! + m[0].length - 1);
            if (!call || call.args.length !== macro.params.length) continue;
            const values = call.args.map(([s, e]) => out.slice(s, e).trim());
            expansions += `\n${macro.body.replace(/\b\w+\b/g, (w) => {
                const k = macro.params.indexOf(w);
                return k < 0 ? w : values[k];
            })}\n`;
        }
        out += expansions;
    }
    return out;
}

// ---------------------------------------------------------------------------------------------------------------
// argument indices as linear expressions over a function's parameters

/** c + sum(coeff * param); null: not a sum of literals, parameters and loop counters */
type Lin = {c: number; terms: Map<string, number>} | null;

function linAdd(a: Lin, b: Lin, sign = 1): Lin {
    if (!a || !b) return null;
    const terms = new Map(a.terms);
    for (const [k, v] of b.terms) terms.set(k, (terms.get(k) ?? 0) + sign * v);
    for (const [k, v] of terms) if (v === 0) terms.delete(k);
    return {c: a.c + sign * b.c, terms};
}

function linConst(c: number): Lin {
    return {c, terms: new Map()};
}

/** parses "first + i - 1" given what each identifier stands for */
function parseLin(text: string, ident: (name: string) => Lin): Lin {
    const src = text.replace(/\s+/g, "");
    if (src === "") return null;
    const parts = src.split(/(?=[+-])/);
    let sum: Lin = linConst(0);
    for (const part of parts) {
        const sign = part.startsWith("-") ? -1 : 1;
        const term = part.replace(/^[+-]/, "").replace(/^\((?:size_t|int|int64_t|uint32_t)\)/, "");
        let value: Lin;
        if (/^\d+[uUlL]*$/.test(term)) value = linConst(Number.parseInt(term, 10));
        else if (/^[A-Za-z_]\w*$/.test(term)) value = ident(term);
        else value = null;
        sum = linAdd(sum, value, sign);
    }
    return sum;
}

function linText(l: Lin): string {
    if (!l) return "?";
    const parts = [...l.terms].map(([k, v]) => (v === 1 ? k : `${v}*${k}`));
    if (l.c !== 0 || parts.length === 0) parts.push(String(l.c));
    return parts.join(" + ");
}

// ---------------------------------------------------------------------------------------------------------------
// C++ functions taking a Napi::CallbackInfo

interface CppFunction {
    name: string;
    file: string;
    info: string;
    params: string[];
    /** body offsets in the file's blanked text */
    body: [number, number];
}

interface CppFile {
    path: string;
    code: string; // comments blanked, macros expanded
    bare: string; // strings blanked too
    functions: Map<string, CppFunction>;
}

function parseCppFile(file: string, text: string): CppFile {
    const code = blank(expandBindingMacros(text), false);
    const bare = blank(code, true);
    const functions = new Map<string, CppFunction>();
    const def = /\b([A-Za-z_]\w*)\s*\(\s*const\s+Napi::CallbackInfo\s*&\s*(\w+)\s*((?:,[^(){};]*)?)\)\s*(?:const\s*)?\{/g;
    for (let m = def.exec(bare); m; m = def.exec(bare)) {
        const open = m.index + m[0].length - 1;
        const end = closing(bare, open);
        if (end < 0) continue;
        const params = m[3]
            .split(",")
            .slice(1)
            .map((p) => /(\w+)\s*(?:=.*)?$/.exec(p.trim())?.[1] ?? "");
        functions.set(m[1], {name: m[1], file, info: m[2], params, body: [open, end]});
    }
    return {path: file, code, bare, functions};
}

/** what a function reads from its CallbackInfo, over its own parameters */
interface ReadSummary {
    reads: Lin[];
    /** indices compared with `info.Length() >` (optional arguments) */
    optional: Lin[];
    /** `info.Length() < N`: the function refuses fewer than N arguments */
    required: Lin[];
    /** why some index could not be followed */
    problems: string[];
}

class ArgumentReader {
    private readonly summaries = new Map<CppFunction, ReadSummary>();
    private readonly active = new Set<CppFunction>();

    constructor(private readonly headers: CppFile[]) {}

    lookup(from: CppFile, name: string): {fn: CppFunction; file: CppFile} | null {
        const own = from.functions.get(name);
        if (own) return {fn: own, file: from};
        for (const h of this.headers) {
            const fn = h.functions.get(name);
            if (fn) return {fn, file: h};
        }
        return null;
    }

    summary(fn: CppFunction, file: CppFile): ReadSummary {
        const known = this.summaries.get(fn);
        if (known) return known;
        if (this.active.has(fn)) return {reads: [], optional: [], required: [], problems: [`${fn.name} calls itself`]};
        this.active.add(fn);
        const s = this.summarize(fn, file);
        this.active.delete(fn);
        this.summaries.set(fn, s);
        return s;
    }

    private summarize(fn: CppFunction, file: CppFile): ReadSummary {
        const body = file.bare.slice(fn.body[0], fn.body[1]);
        const info = fn.info;
        const loops = new Map<string, string>();
        for (const m of body.matchAll(/\bfor\s*\(\s*[\w\s]*?\b(\w+)\s*=\s*0\s*;\s*\1\s*<\s*([^;]+);/g)) loops.set(m[1], m[2]);
        const ident = (name: string, seen = new Set<string>()): Lin => {
            if (fn.params.includes(name)) return {c: 0, terms: new Map([[name, 1]])};
            const bound = loops.get(name);
            if (bound === undefined || seen.has(name)) return null;
            seen.add(name);
            return linAdd(
                parseLin(bound, (n) => ident(n, seen)),
                linConst(1),
                -1
            );
        };
        const lin = (text: string) => parseLin(text, (n) => ident(n));
        const s: ReadSummary = {reads: [], optional: [], required: [], problems: []};
        const track = (list: Lin[], text: string, what: string) => {
            const l = lin(text);
            if (!l) s.problems.push(`${fn.name} ${what} "${text.trim()}"`);
            list.push(l);
        };
        for (const m of body.matchAll(new RegExp(`\\b${info}\\s*\\[([^\\]]+)\\]`, "g"))) track(s.reads, m[1], "reads index");
        for (const m of body.matchAll(
            new RegExp(`\\b${info}\\.Length\\(\\)\\s*(>=?|<=?)\\s*([\\w\\s+\\-]+?)\\s*(?=&&|\\|\\||\\)|;|\\?)`, "g")
        )) {
            const bound = lin(m[2]);
            if (!bound) s.problems.push(`${fn.name} compares ${info}.Length() with "${m[2].trim()}"`);
            if (m[1] === ">") s.optional.push(bound);
            else if (m[1] === ">=") s.optional.push(linAdd(bound, linConst(1), -1));
            else if (m[1] === "<") s.required.push(bound);
            else s.required.push(linAdd(bound, linConst(1)));
        }
        const call = new RegExp(`\\b([A-Za-z_]\\w*)\\s*(?:<[^<>;{}()]*>)?\\s*\\(\\s*${info}\\s*[,)]`, "g");
        for (const m of body.matchAll(call)) {
            const open = fn.body[0] + m.index! + m[0].indexOf("(", m[1].length);
            const target = this.lookup(file, m[1]);
            if (!target) {
                s.problems.push(`${fn.name} passes ${info} to ${m[1]}, which the checker cannot find`);
                continue;
            }
            const args = callArgs(file.bare, open);
            if (!args) continue;
            const inner = this.summary(target.fn, target.file);
            const argLin = (param: string): Lin => {
                const k = target.fn.params.indexOf(param);
                const range = args.args[k + 1];
                return range ? lin(file.bare.slice(range[0], range[1])) : null;
            };
            const substitute = (l: Lin): Lin => {
                if (!l) return null;
                let out: Lin = linConst(l.c);
                for (const [p, coeff] of l.terms) {
                    let term = argLin(p);
                    if (term) term = {c: term.c * coeff, terms: new Map([...term.terms].map(([k, v]) => [k, v * coeff]))};
                    out = linAdd(out, term);
                }
                return out;
            };
            for (const [list, from] of [
                [s.reads, inner.reads],
                [s.optional, inner.optional],
                [s.required, inner.required]
            ] as const) {
                for (const l of from) {
                    const r = substitute(l);
                    if (!r && l) s.problems.push(`${fn.name} calls ${m[1]} with an index the checker cannot follow`);
                    list.push(r);
                }
            }
            s.problems.push(...inner.problems);
        }
        return s;
    }
}

/** the argument counts of a binding (a function whose only parameter is the CallbackInfo) */
function argumentCounts(s: ReadSummary): {min: number; max: number} | string {
    const constant = (l: Lin): number | null => (l && l.terms.size === 0 ? l.c : null);
    if (s.problems.length > 0) return s.problems[0];
    for (const l of [...s.reads, ...s.optional, ...s.required])
        if (constant(l) === null) return `index ${linText(l)} is not a constant`;
    const optional = new Set(s.optional.map((l) => constant(l)!));
    const reads = s.reads.map((l) => constant(l)!);
    const max = reads.length === 0 ? 0 : Math.max(...reads) + 1;
    let min = Math.max(0, ...reads.filter((k) => !optional.has(k)).map((k) => k + 1));
    for (const r of s.required) min = Math.max(min, constant(r)!);
    return {min, max};
}

// ---------------------------------------------------------------------------------------------------------------
// registrations

function addonOf(file: string): AddonName | null {
    const base = path.posix.basename(file);
    if (base === "addon_cpu.cpp" || /^cpu_\w+\.cpp$/.test(base)) return "cpu";
    if (base === "addon_cuda.cpp" || /^cuda_\w+\.cpp$/.test(base)) return "cuda";
    return null;
}

interface ScanResult {
    functions: RegisteredFunction[];
    problems: string[];
    /** qlora_* C functions each addon file names */
    cCalls: Map<string, Set<string>>;
}

function scanAddons(files: ReadonlyMap<string, string>): ScanResult {
    const parsed = new Map<string, CppFile>();
    const headers: CppFile[] = [];
    for (const [file, text] of files) {
        if (!file.startsWith("native/addon/")) continue;
        const cpp = parseCppFile(file, text);
        if (file.endsWith(".h")) headers.push(cpp);
        else parsed.set(file, cpp);
    }
    const reader = new ArgumentReader(headers);
    const out: ScanResult = {functions: [], problems: [], cCalls: new Map()};
    for (const [file, cpp] of parsed) {
        const addon = addonOf(file);
        if (!addon) {
            out.problems.push(`${file}: belongs to no addon (name it addon_cpu.cpp, cpu_*.cpp, addon_cuda.cpp or cuda_*.cpp)`);
            continue;
        }
        const {code, bare} = cpp;
        const calls = new Set<string>();
        for (const m of bare.matchAll(/\bqlora_[a-z0-9]+_\w+\b(?!\s*::)/g)) calls.add(m[0]);
        out.cCalls.set(file, calls);
        for (const unsupported of ["DefineProperties", "PropertyDescriptor", "DefineClass", "InstanceMethod"])
            if (bare.includes(unsupported))
                out.problems.push(`${file}: uses ${unsupported}, a registration form the checker does not read`);

        // lambdas that wrap exports.Set: `auto fn = [&](const char* name, ...) { exports.Set(name, ...); }`
        const registrars = new Set<string>();
        const lambdaBodies: [number, number][] = [];
        for (const m of bare.matchAll(/\bauto\s+(\w+)\s*=\s*\[[^\]]*\]\s*\(/g)) {
            const params = closing(bare, m.index! + m[0].length - 1);
            const open = params < 0 ? -1 : bare.indexOf("{", params);
            const end = open < 0 ? -1 : closing(bare, open);
            if (end < 0 || !bare.slice(open, end).includes("exports.Set(")) continue;
            registrars.add(m[1]);
            lambdaBodies.push([open, end]);
        }
        const register = (name: string, bound: string) => {
            const fnName = bound.replace(/<[\s\S]*>/, "").trim();
            const target = reader.lookup(cpp, fnName);
            if (!/^[A-Za-z_]\w*$/.test(fnName) || !target) {
                out.functions.push({
                    addon,
                    name,
                    file,
                    cppFunction: bound,
                    maxArgs: null,
                    minArgs: null,
                    unresolved: `cannot find the C++ function ${bound}`
                });
                return;
            }
            const counts = argumentCounts(reader.summary(target.fn, target.file));
            if (typeof counts === "string")
                out.functions.push({addon, name, file, cppFunction: fnName, maxArgs: null, minArgs: null, unresolved: counts});
            else out.functions.push({addon, name, file, cppFunction: fnName, maxArgs: counts.max, minArgs: counts.min});
        };
        const literal = (range: [number, number] | undefined): string | null => {
            if (!range) return null;
            const m = /^\s*"([^"]*)"\s*$/.exec(code.slice(range[0], range[1]));
            return m ? m[1] : null;
        };
        for (const m of bare.matchAll(/\b(\w+(?:\.\w+)?)\s*\(/g)) {
            const callee = m[1];
            const isSet = callee === "exports.Set";
            if (!isSet && !registrars.has(callee)) continue;
            const at = m.index!;
            if (lambdaBodies.some(([s, e]) => at > s && at < e)) continue;
            const args = callArgs(bare, at + m[0].length - 1);
            const name = args ? literal(args.args[0]) : null;
            if (!args || name === null || args.args.length < 2) {
                out.problems.push(
                    `${file}: ${code.slice(at, args?.end ?? at + 40).replace(/\s+/g, " ")} is a registration the checker does not read`
                );
                continue;
            }
            if (!isSet) {
                const [s] = args.args[1];
                register(name, code.slice(s, args.args[args.args.length - 1][1]));
                continue;
            }
            // exports.Set("name", Napi::Function::New(env, Fn, "name"))
            const [vs, ve] = args.args[1];
            const value = /^\s*Napi::Function::New\s*\(/.exec(bare.slice(vs, ve));
            const inner = value ? callArgs(bare, vs + value[0].length - 1) : null;
            if (!inner || inner.args.length < 2) {
                out.problems.push(`${file}: exports.Set("${name}", ...) sets something the checker does not read`);
                continue;
            }
            const last = inner.args[inner.args.length - 1];
            const shownName = inner.args.length >= 3 ? literal(last) : null;
            const boundEnd = inner.args.length >= 3 ? inner.args[inner.args.length - 2][1] : last[1];
            if (inner.args.length >= 3 && shownName !== name)
                out.problems.push(
                    `${file}: exports "${name}" as a function named "${shownName ?? code.slice(last[0], last[1]).trim()}"`
                );
            register(name, code.slice(inner.args[1][0], boundEnd));
        }
    }

    // a family's register_* function must be called from its addon's Init, or its functions are not exported
    for (const [file, cpp] of parsed) {
        const addon = addonOf(file);
        if (!addon || path.posix.basename(file).startsWith("addon_")) continue;
        const main = parsed.get(`native/addon/addon_${addon}.cpp`);
        for (const m of cpp.bare.matchAll(/\bvoid\s+(register_\w+)\s*\(/g))
            if (!main || !new RegExp(`\\b${m[1]}\\s*\\(\\s*env`).test(main.bare))
                out.problems.push(
                    `${file}: ${m[1]} is never called from native/addon/addon_${addon}.cpp (its functions are not exported)`
                );
    }
    return out;
}

/** every function the addons register, with the argument counts their C++ reads */
export function registeredFunctions(files: ReadonlyMap<string, string>): RegisteredFunction[] {
    return scanAddons(files).functions;
}

// ---------------------------------------------------------------------------------------------------------------
// TypeScript mirrors

export function tsDeclarations(files: ReadonlyMap<string, string>): TsDeclaration[] {
    const out: TsDeclaration[] = [];
    for (const [file, text] of files) {
        if (!file.startsWith("src/backend/") || !isTsMirrorFile(path.posix.basename(file))) continue;
        const source = ts.createSourceFile(file, text, ts.ScriptTarget.ES2022, false, ts.ScriptKind.TS);
        for (const stmt of source.statements) {
            if (!ts.isInterfaceDeclaration(stmt)) continue;
            const iface = stmt.name.text;
            const addon: AddonName = iface.startsWith("Cuda") ? "cuda" : "cpu";
            for (const member of stmt.members) {
                let params: ts.NodeArray<ts.ParameterDeclaration> | undefined;
                if (ts.isMethodSignature(member)) params = member.parameters;
                else if (ts.isPropertySignature(member) && member.type && ts.isFunctionTypeNode(member.type))
                    params = member.type.parameters;
                if (!params || !member.name || !(ts.isIdentifier(member.name) || ts.isStringLiteral(member.name))) continue;
                const rest = params.some((p) => p.dotDotDotToken);
                const required = params.filter((p) => !p.questionToken && !p.initializer && !p.dotDotDotToken).length;
                out.push({
                    addon,
                    name: member.name.text,
                    file,
                    iface,
                    minArgs: required,
                    maxArgs: rest ? Number.POSITIVE_INFINITY : params.length
                });
            }
        }
    }
    return out;
}

// ---------------------------------------------------------------------------------------------------------------
// the check

/**
 * Every disagreement between the addons' registrations, the TS mirrors and the C headers, one line each, sorted.
 * `files` maps repository-relative paths to their text (readNativeOpSources reads them from a checkout).
 */
export function nativeOpMismatches(files: ReadonlyMap<string, string>): string[] {
    const scan = scanAddons(files);
    const lines = [...scan.problems];
    const decls = tsDeclarations(files);
    for (const addon of ["cpu", "cuda"] as const) {
        const registered = new Map<string, RegisteredFunction>();
        for (const f of scan.functions.filter((r) => r.addon === addon)) {
            const first = registered.get(f.name);
            if (first) lines.push(`${addon}.${f.name}: registered twice (${first.file}, ${f.file})`);
            else registered.set(f.name, f);
        }
        const declared = new Map<string, TsDeclaration>();
        for (const d of decls.filter((x) => x.addon === addon)) {
            const first = declared.get(d.name);
            if (!first) declared.set(d.name, d);
            else if (first.minArgs !== d.minArgs || first.maxArgs !== d.maxArgs)
                lines.push(
                    `${addon}.${d.name}: TS declares it twice with different parameters (${first.file} ${first.iface}, ${d.file} ${d.iface})`
                );
        }
        const tsHome = addon === "cpu" ? "src/backend/native-*-types.ts" : "src/backend/cuda-*-types.ts";
        const cppHome = addon === "cpu" ? "native/addon/addon_cpu.cpp or cpu_*.cpp" : "native/addon/addon_cuda.cpp or cuda_*.cpp";
        for (const [name, f] of registered) {
            const d = declared.get(name);
            const where = d ? ` (${f.file} ${f.cppFunction}; ${d.file} ${d.iface})` : "";
            if (!d) lines.push(`${addon}.${name}: registered in ${f.file}, declared in no TS interface (add it to ${tsHome})`);
            else if (f.maxArgs === null)
                lines.push(`${addon}.${name}: cannot tell how many arguments C++ reads: ${f.unresolved}${where}`);
            else if (d.maxArgs !== f.maxArgs)
                lines.push(
                    `${addon}.${name}: C++ reads ${f.maxArgs} arguments, TS declares ${d.maxArgs === Number.POSITIVE_INFINITY ? "a rest parameter" : d.maxArgs}${where}`
                );
            else if (d.minArgs < f.minArgs!)
                lines.push(
                    `${addon}.${name}: C++ requires ${f.minArgs} arguments (no info.Length() check below that), TS makes ${d.minArgs} required${where}`
                );
        }
        for (const [name, d] of declared)
            if (!registered.has(name))
                lines.push(`${addon}.${name}: declared in ${d.file} ${d.iface}, registered by no C++ (${cppHome})`);
    }

    // every C function an addon names is declared in a C header
    const headerText = [...files]
        .filter(([f]) => /^native\/(include|cuda)\/[^/]+\.h$/.test(f))
        .map(([, text]) => blank(text, true))
        .join("\n");
    for (const [file, calls] of scan.cCalls)
        for (const fn of [...calls].sort())
            if (!new RegExp(`\\b${fn}\\s*\\(`).test(headerText))
                lines.push(`${fn}: named in ${file}, declared in no header under native/include or native/cuda`);
    return lines.sort();
}
