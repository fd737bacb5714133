// form.ts: the run form, drawn from the train config's JSON Schema: one field per key with its default and
// description. Each field holds the key's text as on the command line; only the fields that differ from their
// default are sent, and the server parses them with `qlora train`'s own parser.
import type {JsonSchema, SchemaReply} from "../api-types.js";

/** a default as command-line text: lists comma-separated, maps as JSON, null as empty */
function defaultText(v: unknown): string {
    if (v === null || v === undefined) return "";
    if (Array.isArray(v)) return v.join(",");
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
}

/** the choices of a key that takes a few fixed values (an enum, a boolean or a literal), else null */
function choicesOf(s: JsonSchema): string[] | null {
    if (s.enum) return s.enum.map(String);
    if (s.type === "boolean") return ["true", "false"];
    if (s.anyOf) {
        const out: string[] = [];
        for (const alt of s.anyOf) {
            const c = alt.const !== undefined ? [String(alt.const)] : choicesOf(alt);
            if (!c) return null;
            out.push(...c);
        }
        return out;
    }
    return null;
}

/** what a text field expects, as a hint under it */
function typeHint(s: JsonSchema): string {
    const types = s.anyOf ? s.anyOf.map((a) => a.type ?? (a.const !== undefined ? JSON.stringify(a.const) : "?")) : [s.type];
    const flat = types.flat().filter((t): t is string => typeof t === "string");
    const words = flat.map((t) => (t === "array" ? "comma-separated list" : t === "object" ? "JSON object" : t));
    return [...new Set(words)].join(" or ");
}

export class RunForm {
    private readonly fields = new Map<string, {input: HTMLInputElement | HTMLSelectElement; initial: string; row: HTMLElement}>();

    constructor(el: HTMLFormElement, reply: SchemaReply) {
        const props = reply.schema.properties;
        reply.sections.forEach((section, i) => {
            const details = document.createElement("details");
            details.className = "section";
            details.open = i === 0;
            const summary = document.createElement("summary");
            summary.textContent = section.title;
            details.append(summary);
            for (const key of section.keys)
                details.append(this.field(key, props[key] ?? {}, key === "output_dir" ? reply.suggestedOutputDir : undefined));
            el.append(details);
        });
    }

    private field(key: string, s: JsonSchema, initialValue?: string): HTMLElement {
        const row = document.createElement("div");
        row.className = "field";
        const id = `f-${key}`;
        const label = document.createElement("label");
        label.htmlFor = id;
        label.textContent = key;
        const def = defaultText(s.default);
        const choices = choicesOf(s);
        let input: HTMLInputElement | HTMLSelectElement;
        if (choices) {
            input = document.createElement("select");
            for (const c of choices) input.append(new Option(c, c));
        } else {
            input = document.createElement("input");
            input.type = "text";
            input.placeholder = def === "" ? "(not set)" : def;
            if (s.type === "number" || s.type === "integer") input.inputMode = "decimal";
        }
        input.id = id;
        input.name = key;
        const initial = initialValue ?? def;
        input.value = initial;
        input.dataset.default = def;
        input.addEventListener("input", () => row.classList.toggle("changed", input.value !== def));
        input.addEventListener("change", () => row.classList.toggle("changed", input.value !== def));
        row.classList.toggle("changed", initial !== def);
        const help = document.createElement("div");
        help.className = "help";
        const hint = choices ? "" : typeHint(s);
        help.textContent = [s.description, `default ${def === "" ? "none" : def}${hint ? ` · ${hint}` : ""}`]
            .filter(Boolean)
            .join(" — ");
        if (key === "output_dir") help.textContent = "the run's folder in the output root (a name); " + help.textContent;
        row.append(label, input, help);
        this.fields.set(key, {input, initial, row});
        return row;
    }

    /** the keys set to something other than their default, as command-line text */
    values(): Record<string, string> {
        const out: Record<string, string> = {};
        for (const [key, {input}] of this.fields) {
            const v = input.value.trim();
            if (v !== (input.dataset.default ?? "") || key === "output_dir") out[key] = v;
        }
        return out;
    }

    set(key: string, value: string): void {
        const f = this.fields.get(key);
        if (!f) throw new Error(`no field ${key}`);
        f.input.value = value;
        f.input.dispatchEvent(new Event("change"));
    }

    keys(): string[] {
        return [...this.fields.keys()];
    }
}
