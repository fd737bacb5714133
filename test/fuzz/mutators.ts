// mutators.ts: seeded mutations of valid files. Each mutator takes the bytes of a file and the case's generator,
// returns the new bytes, and appends what it did to `log` (the reproducer printed with a failure).
//
// - bytes: bit flips, interesting bytes, inserts, deletes, duplicated ranges, truncation, appended garbage
// - JSON: a value reached by a random walk from the root is replaced (interesting numbers and strings, type swaps,
//   NaN/Infinity spellings, huge and tiny numbers, very long strings, control and unpaired-surrogate characters,
//   deep nesting, huge arrays), a key is deleted, duplicated or added (names harvested from the seed)
// - JSONL: one line mutated as JSON, lines duplicated, dropped, blank, garbage, CRLF, a BOM, no final newline
// - safetensors: header fields (dtype, shape, data_offsets, names, duplicate keys, __metadata__), the header
//   length word, the header text, and the data (NaN/Inf poison, truncation, flips)
// - YAML: keys set to odd scalars and tags, anchors/aliases (billion laughs), deep nesting, merge keys,
//   duplicate keys, several documents, complex keys, line edits
// - chat templates (Jinja): loops, recursion, huge repeats, raise_exception, out-of-range indexing, broken tags
import type {FuzzRng} from "./rng.js";

// ------------------------------------------------------------------
// bytes

const INTERESTING_BYTES = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x20, 0x0a, 0x0d, 0x22, 0x5c, 0x7b, 0x7d, 0x5b, 0x5d, 0xc0, 0xed, 0xf4];

export function mutateBytes(buf: Buffer, rng: FuzzRng, log: string[]): Buffer {
    const n = buf.length;
    const at = (extra = 0) => rng.int(n + extra);
    const op = rng.weighted([
        [3, "flip"],
        [2, "set"],
        [1.5, "insert"],
        [1.5, "delete"],
        [1, "duplicate"],
        [2, "truncate"],
        [1, "append"],
        [0.5, "splice"]
    ] as const);
    switch (op) {
        case "flip": {
            if (n === 0) break;
            const out = Buffer.from(buf);
            const flips = rng.count(8);
            const where: string[] = [];
            for (let i = 0; i < flips; i++) {
                const p = at(),
                    bit = rng.int(8);
                out[p] ^= 1 << bit;
                where.push(`${p}.${bit}`);
            }
            log.push(`bytes: flip bits (byte.bit) ${where.join(" ")}`);
            return out;
        }
        case "set": {
            if (n === 0) break;
            const out = Buffer.from(buf);
            const p = at(),
                v = rng.pick(INTERESTING_BYTES);
            out[p] = v;
            log.push(`bytes: byte ${p} = 0x${v.toString(16)}`);
            return out;
        }
        case "insert": {
            const p = at(1),
                len = rng.pick([1, 2, 4, 8, 64, 4096]);
            const ins = rng.chance(0.5) ? rng.bytes(len) : Buffer.alloc(len, rng.pick(INTERESTING_BYTES));
            log.push(`bytes: insert ${len} bytes (${ins.subarray(0, 8).toString("hex")}…) at ${p}`);
            return Buffer.concat([buf.subarray(0, p), ins, buf.subarray(p)]);
        }
        case "delete": {
            if (n === 0) break;
            const p = at(),
                len = Math.min(n - p, rng.pick([1, 2, 4, 16, 256, 65536]));
            log.push(`bytes: delete ${len} bytes at ${p}`);
            return Buffer.concat([buf.subarray(0, p), buf.subarray(p + len)]);
        }
        case "duplicate": {
            if (n === 0) break;
            const p = at(),
                len = Math.min(n - p, rng.pick([1, 8, 64, 1024]));
            const q = at(1);
            log.push(`bytes: copy ${len} bytes from ${p} to ${q}`);
            return Buffer.concat([buf.subarray(0, q), buf.subarray(p, p + len), buf.subarray(q)]);
        }
        case "truncate": {
            const p = rng.chance(0.2) ? (rng.pick([0, 1, 7, 8, 9].filter((x) => x < n)) ?? 0) : at();
            log.push(`bytes: truncate to ${p} of ${n} bytes`);
            return buf.subarray(0, p);
        }
        case "append": {
            const len = rng.pick([1, 3, 100, 5000]);
            log.push(`bytes: append ${len} random bytes`);
            return Buffer.concat([buf, rng.bytes(len)]);
        }
        case "splice": {
            if (n < 2) break;
            const p = at(),
                q = at(),
                len = Math.min(n - Math.max(p, q), rng.pick([4, 32, 512]));
            const out = Buffer.from(buf);
            buf.copy(out, q, p, p + len);
            log.push(`bytes: overwrite ${len} bytes at ${q} with the bytes at ${p}`);
            return out;
        }
    }
    log.push("bytes: append one 0x00 byte");
    return Buffer.concat([buf, Buffer.alloc(1)]);
}

// ------------------------------------------------------------------
// JSON: a tree with raw tokens (text JSON.stringify cannot write) and objects with duplicate keys

/** written verbatim: 1e400, -0, lone surrogate escapes, deep nesting */
export class Raw {
    constructor(readonly text: string) {}
}

/** an object whose keys may repeat */
export class DupObject {
    constructor(readonly entries: [string, unknown][]) {}
}

export function serializeJson(value: unknown, indent = ""): string {
    const nl = indent ? "\n" : "";
    const inner = (depth: number) => indent.repeat(depth);
    const walk = (v: unknown, depth: number): string => {
        if (v instanceof Raw) return v.text;
        if (v instanceof DupObject) {
            if (v.entries.length === 0) return "{}";
            return `{${nl}${v.entries
                .map(([k, x]) => `${inner(depth + 1)}${JSON.stringify(k)}:${indent ? " " : ""}${walk(x, depth + 1)}`)
                .join(`,${nl}`)}${nl}${inner(depth)}}`;
        }
        if (Array.isArray(v)) {
            if (v.length === 0) return "[]";
            return `[${nl}${v.map((x) => `${inner(depth + 1)}${walk(x, depth + 1)}`).join(`,${nl}`)}${nl}${inner(depth)}]`;
        }
        if (v !== null && typeof v === "object") return walk(new DupObject(Object.entries(v as Record<string, unknown>)), depth);
        if (typeof v === "number" && !Number.isFinite(v)) return String(v); // NaN / Infinity: invalid JSON on purpose
        return JSON.stringify(v) ?? "null";
    };
    return walk(value, 0);
}

/** names and values found in a seed, used as replacement material (a key of one place put in another) */
export interface Dictionary {
    keys: string[];
    strings: string[];
    numbers: number[];
}

export function harvest(value: unknown, extraKeys: readonly string[] = [], extraStrings: readonly string[] = []): Dictionary {
    const keys = new Set<string>(extraKeys),
        strings = new Set<string>(extraStrings),
        numbers = new Set<number>();
    let budget = 20000;
    const walk = (v: unknown, depth: number) => {
        if (--budget < 0 || depth > 12) return;
        if (typeof v === "string") {
            if (v.length < 200) strings.add(v);
        } else if (typeof v === "number") numbers.add(v);
        else if (Array.isArray(v)) v.slice(0, 50).forEach((x) => walk(x, depth + 1));
        else if (v && typeof v === "object") {
            for (const [k, x] of Object.entries(v).slice(0, 200)) {
                keys.add(k);
                walk(x, depth + 1);
            }
        }
    };
    walk(value, 0);
    return {keys: [...keys], strings: [...strings].slice(0, 500), numbers: [...numbers].slice(0, 200)};
}

const INTERESTING_NUMBERS: readonly (number | Raw)[] = [
    0,
    -1,
    1,
    2,
    -2,
    3,
    7,
    8,
    16,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4096,
    65535,
    65536,
    2 ** 31 - 1,
    2 ** 31,
    -(2 ** 31),
    2 ** 32,
    2 ** 32 + 1,
    2 ** 53,
    -(2 ** 53),
    1e15,
    1e20,
    1e100,
    1e308,
    -1e308,
    0.5,
    -0.5,
    1.5,
    1e-300,
    5e-324,
    // biome-ignore lint/suspicious/noApproximativeNumericConstant: a number with a fraction, not pi
    3.14159,
    new Raw("9007199254740993"),
    new Raw("1e400"),
    new Raw("-1e400"),
    new Raw("-0"),
    new Raw("1E2"),
    new Raw("100000000000000000000000000000"),
    new Raw("0.0000000000000000000000000000001")
];

const INTERESTING_STRINGS: readonly string[] = [
    "",
    " ",
    "0",
    "-1",
    "1e400",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "inf",
    "null",
    "true",
    "false",
    "undefined",
    "\u0000",
    "\u0000\u0001\u0007\b\t\n\v\f\r\u001b",
    "\uffff",
    "\ufeff",
    "😀",
    "\u202eevil",
    "名字",
    "\n\n\n",
    "%s%n%x",
    "../../../../../etc/passwd",
    "/dev/zero",
    "/dev/stdin",
    "/proc/self/mem",
    "/",
    ".",
    "..",
    "C:\\con",
    "{{ x }}",
    "{% for %}",
    "{instruction}",
    "{",
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a hostile string, not a template
    "${HOME}",
    "<|im_end|>",
    "<|endoftext|>",
    "\\",
    '"'
];

function interestingString(rng: FuzzRng): string | Raw {
    const r = rng.int(10);
    if (r === 0) return new Raw('"\\ud800"'); // an unpaired surrogate, as JSON writes it
    if (r === 1) return new Raw('"\\udfff\\ud800x"');
    if (r === 2) {
        const len = rng.pick([300, 10_000, 1_000_000, 4_000_000]);
        return rng.chance(0.5) ? "A".repeat(len) : "字😀\u0000".repeat(Math.ceil(len / 4));
    }
    return rng.pick(INTERESTING_STRINGS);
}

function deepNesting(rng: FuzzRng): Raw {
    const depth = rng.pick([64, 1000, 100_000]);
    return rng.chance(0.5)
        ? new Raw("[".repeat(depth) + "]".repeat(depth))
        : new Raw('{"a":'.repeat(depth) + "1" + "}".repeat(depth));
}

function hugeArray(rng: FuzzRng): Raw {
    const n = rng.pick([10_000, 1_000_000]);
    const item = rng.pick(["0", "1e308", '""', "null", "[]", '{"a":1}']);
    return new Raw(`[${new Array(n).fill(item).join(",")}]`);
}

/** an interesting replacement value of any JSON type */
export function interestingValue(rng: FuzzRng, dict: Dictionary): unknown {
    return rng.weighted<() => unknown>([
        [4, () => rng.pick(INTERESTING_NUMBERS)],
        [4, () => interestingString(rng)],
        [2, () => (dict.strings.length ? rng.pick(dict.strings) : "")],
        [1, () => (dict.numbers.length ? rng.pick(dict.numbers) : 0)],
        [1, () => rng.pick([null, true, false])],
        [1, () => rng.pick([[], {}, [[]], [null], [""], {"": null}])],
        [0.4, () => deepNesting(rng)],
        [0.3, () => hugeArray(rng)]
    ])();
}

type Container = unknown[] | Record<string, unknown>;

function isContainer(v: unknown): v is Container {
    return v !== null && typeof v === "object" && !(v instanceof Raw) && !(v instanceof DupObject);
}

function childKeys(c: Container): (string | number)[] {
    return Array.isArray(c) ? c.map((_, i) => i) : Object.keys(c);
}

/** a random walk from the root: usually stops at a shallow value, sometimes goes deep */
function randomPath(root: unknown, rng: FuzzRng): (string | number)[] {
    const path: (string | number)[] = [];
    let node = root;
    while (isContainer(node)) {
        const keys = childKeys(node);
        if (keys.length === 0 || (path.length > 0 && rng.chance(0.35))) break;
        const k = rng.pick(keys);
        path.push(k);
        node = (node as Record<string | number, unknown>)[k];
    }
    return path;
}

function getAt(root: unknown, path: readonly (string | number)[]): unknown {
    let node = root;
    for (const k of path) node = (node as Record<string | number, unknown>)[k];
    return node;
}

function describePath(path: readonly (string | number)[]): string {
    return path.length === 0 ? "(root)" : path.map((k) => (typeof k === "number" ? `[${k}]` : `.${k}`)).join("");
}

/** a short description of a value for the log, without serializing a huge one */
function describeValue(v: unknown, depth = 0): string {
    const clip = (t: string) => (t.length > 80 ? `${t.slice(0, 60)}… (${t.length} chars)` : t);
    if (v instanceof Raw) return clip(v.text);
    if (typeof v === "string")
        return v.length > 80 ? `${JSON.stringify(v.slice(0, 60))}… (${v.length} chars)` : JSON.stringify(v);
    if (typeof v === "number" && !Number.isFinite(v)) return String(v);
    if (v === null || typeof v !== "object") return String(JSON.stringify(v) ?? v);
    if (depth > 2) return Array.isArray(v) ? "[…]" : "{…}";
    if (Array.isArray(v))
        return v.length === 0 ? "[]" : `[${describeValue(v[0], depth + 1)}${v.length > 1 ? `, … ${v.length} items` : ""}]`;
    const entries = v instanceof DupObject ? v.entries : Object.entries(v);
    return entries.length === 0
        ? "{}"
        : `{${JSON.stringify(entries[0][0])}: ${describeValue(entries[0][1], depth + 1)}${entries.length > 1 ? `, … ${entries.length} keys` : ""}}`;
}

/** the serialized size of a value, stopping early past `limit` (for keeping mutated files within reason) */
function sizeAtMost(v: unknown, limit: number): number {
    let size = 0;
    const walk = (x: unknown, depth: number): void => {
        if (size > limit) return;
        if (x instanceof Raw) size += x.text.length;
        else if (typeof x === "string") size += x.length + 2;
        else if (x === null || typeof x !== "object") size += 8;
        else if (depth > 64)
            size += limit; // deep enough to be treated as huge
        else
            for (const y of Array.isArray(x) ? x : x instanceof DupObject ? x.entries.map((e) => e[1]) : Object.values(x)) {
                size += 4;
                walk(y, depth + 1);
            }
    };
    walk(v, 0);
    return size;
}

/** mutated documents stay below this size: large enough to stress readers, small enough to build quickly */
const MAX_VALUE_CHARS = 8_000_000;

/** applies one mutation to a parsed JSON document; returns the new root (the root itself may be replaced) */
export function mutateJsonTree(root: unknown, rng: FuzzRng, dict: Dictionary, log: string[]): unknown {
    const path = randomPath(root, rng);
    const target = getAt(root, path);
    const parentPath = path.slice(0, -1);
    const parent = path.length ? (getAt(root, parentPath) as Container) : null;
    const key = path.length ? path[path.length - 1] : null;
    const set = (v: unknown, what: string): unknown => {
        log.push(`json: ${describePath(path)} ${what} ${describeValue(v)}`);
        if (!parent) return v;
        (parent as Record<string | number, unknown>)[key!] = v;
        return root;
    };
    const ops: [number, () => unknown][] = [
        [5, () => set(interestingValue(rng, dict), "=")],
        [2, () => set(dict.strings.length ? rng.pick(dict.strings) : "", "= (seed string)")],
        [1.5, () => set(typeSwap(target, rng), "= (type swap)")]
    ];
    if (typeof target === "number") ops.push([3, () => set(numberTweak(target, rng), "= (number tweak)")]);
    if (typeof target === "string") ops.push([2, () => set(stringTweak(target, rng), "= (string tweak)")]);
    if (Array.isArray(target)) ops.push([2, () => set(arrayTweak(target, rng, dict), "= (array edit)")]);
    if (parent) {
        ops.push([
            2,
            () => {
                log.push(`json: delete ${describePath(path)}`);
                if (Array.isArray(parent)) parent.splice(key as number, 1);
                else delete (parent as Record<string, unknown>)[key as string];
                return root;
            }
        ]);
        if (!Array.isArray(parent)) {
            ops.push([
                1,
                () => {
                    // the same key twice: JSON.parse keeps the last, other readers the first
                    const entries = Object.entries(parent as Record<string, unknown>);
                    const other = interestingValue(rng, dict);
                    const copy = new DupObject(
                        rng.chance(0.5) ? [...entries, [key as string, other]] : [[key as string, other], ...entries]
                    );
                    log.push(`json: duplicate key ${describePath(path)} with ${describeValue(other)}`);
                    if (parentPath.length === 0) return copy;
                    (getAt(root, parentPath.slice(0, -1)) as Record<string | number, unknown>)[
                        parentPath[parentPath.length - 1]
                    ] = copy;
                    return root;
                }
            ]);
            ops.push([
                0.7,
                () => {
                    // swap two sibling values (a key's value moved to another key)
                    const keys = Object.keys(parent as Record<string, unknown>);
                    const other = rng.pick(keys);
                    const p = parent as Record<string, unknown>;
                    [p[key as string], p[other]] = [p[other], p[key as string]];
                    log.push(`json: swap ${describePath(path)} with ${describePath([...parentPath, other])}`);
                    return root;
                }
            ]);
        }
    }
    if (isContainer(target) && !Array.isArray(target)) {
        ops.push([
            2,
            () => {
                const k =
                    dict.keys.length && rng.chance(0.8)
                        ? rng.pick(dict.keys)
                        : rng.pick(["__fuzz__", "", "__proto__", "constructor", "x".repeat(300)]);
                const v = interestingValue(rng, dict);
                log.push(`json: ${describePath(path)} add key ${JSON.stringify(k)} = ${describeValue(v)}`);
                if (k === "__proto__") return set(new DupObject([...Object.entries(target), [k, v]]), "=");
                (target as Record<string, unknown>)[k] = v;
                return root;
            }
        ]);
    }
    return rng.weighted(ops)();
}

function typeSwap(v: unknown, rng: FuzzRng): unknown {
    if (typeof v === "number") return rng.pick([String(v), [v], {value: v}, v !== 0, null]);
    if (typeof v === "string") return rng.pick([v.length, Number(v), [v], {value: v}, v === "", null]);
    if (typeof v === "boolean") return rng.pick([String(v), Number(v), [v], null]);
    if (Array.isArray(v))
        return rng.pick([Object.fromEntries(v.map((x, i) => [String(i), x])), v.length, v.join(","), v[0] ?? null]);
    if (v && typeof v === "object") return rng.pick([Object.values(v), Object.keys(v), JSON.stringify(v), Object.keys(v).length]);
    return rng.pick([0, "", [], {}]);
}

function numberTweak(v: number, rng: FuzzRng): unknown {
    return rng.pick<() => unknown>([
        () => v + 1,
        () => v - 1,
        () => -v,
        () => v * 2,
        () => v * 1e6,
        () => v / 2 + 0.5,
        () => 0,
        () => Math.floor(v / 3),
        () => new Raw(`${v}e400`),
        () => new Raw("NaN"),
        () => new Raw("Infinity"),
        () => new Raw("-Infinity"),
        () => 2 ** 53 + v
    ])();
}

function stringTweak(v: string, rng: FuzzRng): unknown {
    return rng.pick<() => unknown>([
        () => v + rng.pick(["x", "\u0000", "😀", "\n", " ", "{{", "}}", "{%", "%}", "{", "}"]),
        () => v.slice(0, rng.int(v.length + 1)),
        () => v.repeat(Math.max(1, Math.min(rng.pick([2, 100, 10_000]), Math.floor(MAX_VALUE_CHARS / Math.max(1, v.length))))),
        () => v.toUpperCase(),
        () => ` ${v} `,
        () => v.split("").reverse().join(""),
        () => new Raw(`"${JSON.stringify(v).slice(1, -1)}\\ud800"`)
    ])();
}

function arrayTweak(v: unknown[], rng: FuzzRng, dict: Dictionary): unknown {
    return rng.pick<() => unknown>([
        () => [],
        () => (sizeAtMost(v, MAX_VALUE_CHARS) < MAX_VALUE_CHARS / 2 ? [...v, ...v] : v.slice(0, 1)),
        () =>
            new Array(
                Math.max(
                    2,
                    Math.min(
                        rng.pick([100, 10_000]),
                        Math.floor(MAX_VALUE_CHARS / Math.max(1, sizeAtMost(v[0] ?? null, MAX_VALUE_CHARS)))
                    )
                )
            ).fill(v[0] ?? null),
        () => v.slice(1),
        () => [...v].reverse(),
        () => [...v, interestingValue(rng, dict)],
        () => [interestingValue(rng, dict), ...v.slice(1)]
    ])();
}

/** parses JSON text (null when it is not JSON) */
export function tryParseJson(buf: Buffer): {ok: true; value: unknown} | {ok: false} {
    try {
        return {ok: true, value: JSON.parse(buf.toString("utf8"))};
    } catch {
        return {ok: false};
    }
}

/** one or more tree mutations of a JSON file, re-serialized in the seed's style; byte mutations if it is not JSON */
export function mutateJson(buf: Buffer, rng: FuzzRng, dict: Dictionary, log: string[]): Buffer {
    const parsed = tryParseJson(buf);
    if (!parsed.ok) return mutateBytes(buf, rng, log);
    const sub: string[] = [];
    try {
        let root = parsed.value;
        const n = rng.count(3);
        for (let i = 0; i < n; i++) root = mutateJsonTree(root, rng, dict, sub);
        const indent = buf.includes("\n  ") ? "  " : "";
        const out = Buffer.from(serializeJson(root, indent) + (indent ? "\n" : ""), "utf8");
        log.push(...sub);
        return out;
    } catch (err) {
        // a document an earlier mutation nested too deep to walk recursively: mutate its bytes instead
        if (!(err instanceof RangeError)) throw err;
        return mutateBytes(buf, rng, log);
    }
}

// ------------------------------------------------------------------
// JSONL

const GARBAGE_LINES = [
    "{",
    "}",
    "[]",
    "[{}]",
    "1",
    "null",
    '"str"',
    '{"text": 1}',
    "\u0000",
    "{}",
    '{"a": }',
    "true",
    '{"text": "x"} {"text": "y"}',
    "  \t  ",
    "NaN",
    '{"text": "\\ud800"}'
];

export function mutateJsonl(buf: Buffer, rng: FuzzRng, dict: Dictionary, log: string[]): Buffer {
    const text = buf.toString("utf8");
    const lines = text.split("\n");
    const hadFinalNewline = lines[lines.length - 1] === "";
    if (hadFinalNewline) lines.pop();
    const i = rng.int(lines.length);
    const op = rng.weighted([
        [5, "json"],
        [1, "dup"],
        [1, "drop"],
        [1, "blank"],
        [1.5, "garbage"],
        [0.5, "crlf"],
        [0.5, "nofinal"],
        [0.5, "long"],
        [0.3, "bom"],
        [0.5, "utf8"]
    ] as const);
    switch (op) {
        case "json": {
            const sub: string[] = [];
            const mutated = mutateJson(Buffer.from(lines[i] ?? "{}"), rng, dict, sub);
            lines[i] = mutated.toString("utf8").replace(/\n/g, rng.chance(0.5) ? " " : "\n");
            log.push(...sub.map((s) => `line ${i + 1}: ${s}`));
            break;
        }
        case "dup":
            log.push(`jsonl: duplicate line ${i + 1} x${lines.length > 0 ? 1 : 0}`);
            lines.splice(i, 0, lines[i] ?? "");
            break;
        case "drop":
            log.push(`jsonl: drop line ${i + 1}`);
            lines.splice(i, 1);
            break;
        case "blank": {
            const blank = rng.pick(["", " ", "\t", "\r", "   \r"]);
            log.push(`jsonl: insert blank line ${JSON.stringify(blank)} before line ${i + 1}`);
            lines.splice(i, 0, blank);
            break;
        }
        case "garbage": {
            const g = rng.pick(GARBAGE_LINES);
            log.push(`jsonl: insert ${JSON.stringify(g)} before line ${i + 1}`);
            lines.splice(i, 0, g);
            break;
        }
        case "crlf":
            log.push("jsonl: CRLF line ends");
            return Buffer.from(lines.join("\r\n") + (hadFinalNewline ? "\r\n" : ""));
        case "nofinal":
            log.push("jsonl: no final newline");
            return Buffer.from(lines.join("\n"));
        case "long": {
            const len = rng.pick([100_000, 5_000_000]);
            log.push(`jsonl: line ${i + 1} holds a ${len}-character text`);
            lines[i] = JSON.stringify({text: "長".repeat(len)});
            break;
        }
        case "bom":
            log.push("jsonl: UTF-8 BOM");
            return Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(lines.join("\n") + "\n")]);
        case "utf8": {
            const bad = rng.pick([[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xe2, 0x82]]);
            log.push(`jsonl: invalid UTF-8 ${Buffer.from(bad).toString("hex")} inside line ${i + 1}`);
            const line = Buffer.from(lines[i] ?? "");
            const p = rng.int(line.length + 1);
            const before = Buffer.from(
                lines
                    .slice(0, i)
                    .map((l) => l + "\n")
                    .join("")
            );
            const after = Buffer.from(
                lines
                    .slice(i + 1)
                    .map((l) => "\n" + l)
                    .join("") + "\n"
            );
            return Buffer.concat([before, line.subarray(0, p), Buffer.from(bad), line.subarray(p), after]);
        }
    }
    return Buffer.from(lines.join("\n") + (hadFinalNewline ? "\n" : ""));
}

// ------------------------------------------------------------------
// safetensors

const DTYPE_BYTES: Record<string, number> = {F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1};

/** header and data of a safetensors file (null when the bytes are no longer one) */
export function splitSafetensors(buf: Buffer): {header: Record<string, unknown>; data: Buffer} | null {
    if (buf.length < 8) return null;
    const n = buf.readBigUInt64LE(0);
    if (n > BigInt(buf.length - 8)) return null;
    const parsed = tryParseJson(buf.subarray(8, 8 + Number(n)));
    if (!parsed.ok || !parsed.value || typeof parsed.value !== "object" || Array.isArray(parsed.value)) return null;
    return {header: parsed.value as Record<string, unknown>, data: buf.subarray(8 + Number(n))};
}

function joinSafetensors(headerText: string, data: Buffer, lengthWord?: bigint): Buffer {
    const header = Buffer.from(headerText, "utf8");
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(lengthWord ?? BigInt(header.length));
    return Buffer.concat([len, header, data]);
}

type Entry = {dtype?: unknown; shape?: unknown; data_offsets?: unknown};

/** the poison values of a float dtype: NaN, +Inf, -Inf (little-endian bytes) */
function poisonBytes(dtype: string, rng: FuzzRng): Buffer | null {
    const pick = rng.int(3);
    const b = Buffer.alloc(DTYPE_BYTES[dtype] ?? 0);
    if (dtype === "F32") b.writeUInt32LE([0x7fc00000, 0x7f800000, 0xff800000][pick]);
    else if (dtype === "BF16") b.writeUInt16LE([0x7fc0, 0x7f80, 0xff80][pick]);
    else if (dtype === "F16") b.writeUInt16LE([0x7e00, 0x7c00, 0xfc00][pick]);
    else if (dtype === "F64") b.writeDoubleLE([NaN, Infinity, -Infinity][pick]);
    else return null;
    return b;
}

export function mutateSafetensors(buf: Buffer, rng: FuzzRng, log: string[]): Buffer {
    const st = splitSafetensors(buf);
    if (!st) return mutateBytes(buf, rng, log);
    const {header, data} = st;
    const names = Object.keys(header).filter((k) => k !== "__metadata__");
    if (names.length === 0) return mutateBytes(buf, rng, log);
    const name = rng.pick(names);
    const entry = header[name] as Entry;
    const offsets = Array.isArray(entry?.data_offsets) ? (entry.data_offsets as number[]) : [0, 0];
    const [b, e] = offsets;
    const other = header[rng.pick(names)] as Entry;
    const done = (what: string, h: unknown = header): Buffer => {
        log.push(`safetensors: ${what}`);
        return joinSafetensors(serializeJson(h), data);
    };
    const op = rng.weighted([
        [3, "dtype"],
        [3, "shape"],
        [3, "offsets"],
        [1, "delete"],
        [1, "rename"],
        [1, "dupkey"],
        [1, "add"],
        [1, "metadata"],
        [1.5, "length"],
        [1, "text"],
        [2, "poison"],
        [1, "truncate"],
        [0.5, "append"],
        [1, "flip"]
    ] as const);
    switch (op) {
        case "dtype": {
            const v = rng.pick<unknown>([
                "F32",
                "F16",
                "BF16",
                "F64",
                "I64",
                "I32",
                "I16",
                "I8",
                "U8",
                "BOOL",
                "F8_E4M3",
                "F8_E5M2",
                "U16",
                "U32",
                "U64",
                "C64",
                "f32",
                "",
                null,
                5,
                ["F32"]
            ]);
            entry.dtype = v;
            return done(`"${name}".dtype = ${JSON.stringify(v)}`);
        }
        case "shape": {
            const shape = Array.isArray(entry.shape) ? (entry.shape as number[]) : [];
            const numel = shape.reduce((a, x) => a * x, 1);
            const v = rng.pick<unknown>([
                [],
                [0],
                [-1],
                [1.5],
                ["2"],
                [2 ** 53],
                [2 ** 31, 2 ** 31],
                [1e20],
                [2 ** 32, 2 ** 32, 2 ** 32],
                [...shape, 1],
                [1, ...shape],
                [...shape].reverse(),
                [numel],
                shape.length ? [shape[0] * 2, ...shape.slice(1)] : [2],
                shape.length ? [shape[0] + 1, ...shape.slice(1)] : [1],
                [numel, 0],
                null,
                "[1]",
                [[1]],
                [-numel, -1]
            ]);
            entry.shape = v;
            return done(`"${name}".shape = ${JSON.stringify(v)} (was ${JSON.stringify(shape)})`);
        }
        case "offsets": {
            const otherOffsets = Array.isArray(other?.data_offsets) ? other.data_offsets : [0, 0];
            const v = rng.pick<unknown>([
                [e, b],
                [b, b],
                [-1, e],
                [b, e + 1],
                [b + 1, e + 1],
                [b - 1, e - 1],
                [0, e - b],
                [b, 2 ** 53],
                [b, 1e30],
                [b],
                [b, e, 0],
                "0,1",
                otherOffsets,
                [b, data.length + 1],
                [data.length, data.length + (e - b)],
                [b + 0.5, e + 0.5],
                [String(b), String(e)],
                [b, -e],
                [2 ** 64, 2 ** 64 + (e - b)]
            ]);
            entry.data_offsets = v;
            return done(`"${name}".data_offsets = ${JSON.stringify(v)} (was [${b}, ${e}])`);
        }
        case "delete":
            delete header[name];
            return done(`delete tensor "${name}"`);
        case "rename": {
            const to = rng.pick([
                "",
                "x".repeat(1000),
                "model.layers.99.self_attn.q_proj.weight",
                "__metadata__",
                "lm_head.weight",
                `${name}.extra`,
                "名字😀",
                "model.embed_tokens.weight",
                rng.pick(names)
            ]);
            const entries = Object.entries(header).map(([k, v]) => [k === name ? to : k, v] as [string, unknown]);
            return done(
                `rename tensor "${name}" to ${JSON.stringify(to.length > 40 ? to.slice(0, 20) + "…" : to)}`,
                new DupObject(entries)
            );
        }
        case "dupkey": {
            const copy = {...entry, data_offsets: rng.pick([[0, e - b], other?.data_offsets ?? [0, 0], [b, e]])};
            const entries: [string, unknown][] = Object.entries(header);
            entries.splice(rng.int(entries.length + 1), 0, [name, copy]);
            return done(
                `tensor "${name}" twice (second data_offsets ${JSON.stringify(copy.data_offsets)})`,
                new DupObject(entries)
            );
        }
        case "add": {
            const n = rng.pick([1, 4, 1024, 2 ** 20]);
            const start = rng.pick([0, b, data.length, Math.max(0, data.length - 4)]);
            const added = {dtype: "F32", shape: [n], data_offsets: [start, start + 4 * n]};
            const key = rng.pick([
                "extra.weight",
                "model.layers.0.self_attn.q_proj.weight.extra",
                "base_model.model.extra.lora_A.weight"
            ]);
            header[key] = added;
            return done(`add tensor "${key}" = ${JSON.stringify(added)}`);
        }
        case "metadata": {
            const v = rng.pick<unknown>([
                {},
                [],
                "pt",
                5,
                null,
                {format: 5},
                {format: "x".repeat(100_000)},
                {a: {b: "c"}},
                undefined
            ]);
            if (v === undefined) delete header.__metadata__;
            else header.__metadata__ = v;
            return done(`__metadata__ = ${v === undefined ? "(removed)" : describeValue(v)}`);
        }
        case "length": {
            const text = serializeJson(header);
            const real = BigInt(Buffer.byteLength(text));
            const v = rng.pick([
                0n,
                1n,
                real - 1n,
                real + 1n,
                BigInt(buf.length),
                2n ** 32n,
                2n ** 53n,
                2n ** 63n - 1n,
                0xffffffffffffffffn,
                100_000_001n
            ]);
            log.push(`safetensors: header length word = ${v} (real ${real})`);
            return joinSafetensors(text, data, v);
        }
        case "text": {
            const text = serializeJson(header);
            const v = rng.pick<() => [string, string]>([
                () => [text + " ".repeat(rng.pick([1, 7, 4096])), "header padded with spaces"],
                () => [text + "garbage", "garbage after the header JSON"],
                () => [text.slice(0, rng.int(text.length)), "header JSON cut short"],
                () => [`[${text}]`, "header is an array"],
                () => [text.replace("{", "{\u0000"), "NUL inside the header"],
                () => [text.replace(/"/, '"\\ud800'), "unpaired surrogate escape in a name"],
                () => ["", "empty header"],
                () => ["null", "header is null"]
            ])();
            log.push(`safetensors: ${v[1]}`);
            return joinSafetensors(v[0], data);
        }
        case "poison": {
            const floats = names.filter((k) => {
                const en = header[k] as Entry;
                return (
                    typeof en?.dtype === "string" &&
                    poisonBytes(en.dtype, rng) &&
                    Array.isArray(en.data_offsets) &&
                    (en.data_offsets as number[])[1] > (en.data_offsets as number[])[0]
                );
            });
            if (floats.length === 0) break;
            const k = rng.pick(floats);
            const en = header[k] as Entry;
            const [pb, pe] = en.data_offsets as number[];
            const size = DTYPE_BYTES[en.dtype as string];
            const count = rng.count(4);
            const out = Buffer.from(data);
            const where: number[] = [];
            for (let i = 0; i < count; i++) {
                const element = rng.int((pe - pb) / size);
                poisonBytes(en.dtype as string, rng)!.copy(out, pb + element * size);
                where.push(element);
            }
            log.push(`safetensors: NaN/Inf written into "${k}" at elements ${where.join(", ")}`);
            return joinSafetensors(serializeJson(header), out);
        }
        case "truncate": {
            const p = rng.int(data.length);
            log.push(`safetensors: data section cut to ${p} of ${data.length} bytes`);
            return joinSafetensors(serializeJson(header), data.subarray(0, p));
        }
        case "append":
            log.push("safetensors: 4096 bytes appended after the data");
            return joinSafetensors(serializeJson(header), Buffer.concat([data, rng.bytes(4096)]));
        case "flip": {
            const out = Buffer.from(data);
            const n = rng.count(16);
            for (let i = 0; i < n; i++) out[rng.int(out.length)] ^= 1 << rng.int(8);
            log.push(`safetensors: ${n} random bit flips in the data`);
            return joinSafetensors(serializeJson(header), out);
        }
    }
    return mutateBytes(buf, rng, log);
}

// ------------------------------------------------------------------
// YAML

const YAML_VALUES = [
    "-1",
    "0",
    "1",
    "1e999",
    "-1e999",
    ".nan",
    ".inf",
    "-.inf",
    "0x7fffffff",
    "0o17",
    "1_000_000",
    "~",
    "null",
    "yes",
    "no",
    "on",
    "off",
    "'true'",
    '""',
    "[]",
    "{}",
    "[a, b]",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!timestamp 2001-12-14",
    "!!str 5",
    "!!int '12'",
    "!!float '1.5'",
    "!custom x",
    "*undefined_alias",
    "&anchor 5",
    "|\n  multi\n  line",
    ">\n  folded\n  text",
    "/dev/zero",
    '"\\0"',
    "9007199254740993",
    "1e400",
    "-0",
    "2.5",
    "1e-9",
    "4294967297",
    "'x'",
    '"\\ud800"',
    "'{{ x }}'",
    "!!js/function 'function(){}'",
    "!!python/object:os.system ['ls']"
];

export function mutateYaml(buf: Buffer, rng: FuzzRng, dict: Dictionary, log: string[]): Buffer {
    const text = buf.toString("utf8");
    const lines = text.split("\n");
    const keyLines = lines.map((l, i) => ({l, i})).filter(({l}) => /^[a-z_0-9]+:/.test(l));
    const setKey = (key: string, value: string) => {
        const existing = lines.findIndex((l) => l.startsWith(`${key}:`));
        if (existing >= 0) lines[existing] = `${key}: ${value}`;
        else lines.push(`${key}: ${value}`);
    };
    const op = rng.weighted([
        [5, "set"],
        [1, "laughs"],
        [0.5, "deep"],
        [0.5, "merge"],
        [1, "dupkey"],
        [0.5, "multidoc"],
        [1.5, "lines"],
        [0.3, "complex"],
        [0.3, "toplevel"],
        [1, "jsonvalue"],
        [0.5, "anchor"]
    ] as const);
    switch (op) {
        case "set": {
            const key =
                dict.keys.length && rng.chance(0.9)
                    ? rng.pick(dict.keys)
                    : rng.pick(["unknown_key", "Model", "max steps", "__proto__"]);
            const value = rng.chance(0.8)
                ? rng.pick(YAML_VALUES)
                : JSON.stringify(rng.pick(dict.strings.length ? dict.strings : [""]));
            setKey(key, value);
            log.push(`yaml: ${key}: ${value.replace(/\n/g, "\\n")}`);
            break;
        }
        case "laughs": {
            // billion laughs: each level references the previous one 9 times
            const levels = rng.pick([5, 9, 12]);
            const defs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'];
            for (let i = 1; i < levels; i++) {
                const p = String.fromCharCode(97 + i - 1),
                    c = String.fromCharCode(97 + i);
                defs.push(`${c}: &${c} [${new Array(9).fill(`*${p}`).join(",")}]`);
            }
            const last = String.fromCharCode(97 + levels - 1);
            const key = rng.pick(["template", "target_modules", "modules_to_save", "dataset"]);
            log.push(`yaml: billion laughs, ${levels} levels, used by ${key}`);
            // the anchors sit in a list under a key qlora rejects only after parsing, so parsing must survive them
            return Buffer.from(
                `${text}\nx_anchors:\n${defs.map((d) => `  - ${d.replace(/^(\w+): /, "")}`).join("\n")}\n${key}: *${last}\n`
            );
        }
        case "deep": {
            const n = rng.pick([100, 5000, 5000, 100_000]);
            const key = rng.pick(keyLines.map((k) => k.l.split(":")[0]).concat(["r"]));
            log.push(`yaml: ${key} nested ${n} deep`);
            setKey(key, rng.chance(0.5) ? "[".repeat(n) + "]".repeat(n) : "{a: ".repeat(n) + "1" + "}".repeat(n));
            break;
        }
        case "merge":
            log.push("yaml: merge key <<");
            lines.push(rng.pick(["<<: {r: 1000000000}", "<<: *nope", "<<: [1, 2]", "base: &b {r: 4}\n<<: *b"]));
            break;
        case "dupkey": {
            if (keyLines.length === 0) break;
            const k = rng.pick(keyLines).l.split(":")[0];
            const v = rng.pick(YAML_VALUES);
            log.push(`yaml: key ${k} twice (second: ${v})`);
            lines.push(`${k}: ${v}`);
            break;
        }
        case "multidoc":
            log.push("yaml: several documents");
            return Buffer.from(
                rng.pick([`${text}\n---\nr: 4\n`, `--- !!map\n${text}`, `---\n---\n${text}`, `${text}\n...\n%YAML 1.2\n---\nx\n`])
            );
        case "lines": {
            if (lines.length === 0) break;
            const i = rng.int(lines.length);
            const what = rng.pick(["delete", "dup", "indent", "tab", "crlf", "swap"] as const);
            log.push(`yaml: ${what} line ${i + 1}`);
            if (what === "delete") lines.splice(i, 1);
            else if (what === "dup") lines.splice(i, 0, lines[i]);
            else if (what === "indent") lines[i] = "  " + lines[i];
            else if (what === "tab") lines[i] = "\t" + lines[i];
            else if (what === "crlf") return Buffer.from(lines.join("\r\n"));
            else {
                const j = rng.int(lines.length);
                [lines[i], lines[j]] = [lines[j], lines[i]];
            }
            break;
        }
        case "complex":
            log.push("yaml: complex key");
            lines.push(rng.pick(["? [a, b]\n: 1", "[a]: 1", "{a: 1}: 2", "? |\n  block key\n: 3"]));
            break;
        case "toplevel": {
            const v = rng.pick(["- a\n- b\n", "42\n", "'str'\n", "", "~\n", "!!binary aGVsbG8=\n", "[r, 4]\n"]);
            log.push(`yaml: the whole file is ${JSON.stringify(v)}`);
            return Buffer.from(v);
        }
        case "jsonvalue": {
            const key = rng.pick(dict.keys.length ? dict.keys : ["r"]);
            const v = interestingValue(rng, dict);
            const s = serializeJson(v);
            log.push(`yaml: ${key}: ${describeValue(v)}`);
            setKey(key, s);
            break;
        }
        case "anchor":
            log.push("yaml: alias of an anchor defined later, and a self-referencing anchor");
            lines.push(rng.pick(["template: *later\nx: &later y", "target_modules: &s [*s]", "r: &r *r"]));
            break;
    }
    return Buffer.from(lines.join("\n"));
}

// ------------------------------------------------------------------
// chat templates (Jinja)

const TEMPLATE_SNIPPETS = [
    "{% for i in range(100000000) %}{% endfor %}",
    "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}x{% endfor %}{% endfor %}{% endfor %}",
    "{{ 'x' * 1000000000 }}",
    "{{ messages[0]['content'] * 100000000 }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{{ raise_exception('fuzz: the template raised') }}",
    "{{ messages[1000].content }}",
    "{{ messages.foo.bar }}",
    "{{ x | bogus_filter }}",
    "{% if %}",
    "{{",
    "{% for %}",
    "{% endfor %}",
    "{% endif %}",
    "}}",
    "{#",
    "{% raw %}",
    "{{ 1 / 0 }}",
    "{{ messages | tojson }}",
    "{% set ns = namespace(a=1) %}{{ ns.a }}",
    "{{ (messages | length) ** 100 }}",
    "{{ undefined_function() }}",
    "{% set x = [] %}{% for i in range(100000) %}{% set x = x + [i] %}{% endfor %}",
    "{{ '\u0000' }}"
];

export function mutateTemplate(text: string, rng: FuzzRng, log: string[]): string {
    const op = rng.weighted([
        [3, "insert"],
        [1, "replace"],
        [1, "delete"],
        [0.5, "dup"]
    ] as const);
    if (op === "insert" || op === "replace") {
        const snippet = rng.pick(TEMPLATE_SNIPPETS);
        log.push(`template: ${op} ${JSON.stringify(snippet)}`);
        if (op === "replace") return `{% for message in messages %}${snippet}{{ message['content'] }}{% endfor %}`;
        const p = rng.int(text.length + 1);
        return text.slice(0, p) + snippet + text.slice(p);
    }
    const p = rng.int(text.length + 1),
        len = rng.pick([1, 2, 5, 20]);
    if (op === "delete") {
        log.push(`template: delete ${len} chars at ${p}`);
        return text.slice(0, p) + text.slice(p + len);
    }
    log.push(`template: duplicate ${len * 5} chars at ${p}`);
    return text.slice(0, p) + text.slice(p, p + len * 5) + text.slice(p);
}
