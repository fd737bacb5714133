// form.ts: the run form of `qlora ui`. The page draws it from the train config's JSON Schema (zod's conversion of
// the schema `qlora train` parses with); what the user sets comes back as command-line text per key and goes
// through the CLI's own parser (parseFlags + resolveTrainConfig), so a bad value gets the CLI's message, word for
// word, and the run starts with exactly those flags.
import {promises as fs} from "node:fs";
import path from "node:path";
import {z} from "zod";
import {QloraError, quoteValue} from "../errors.js";
import {loadTrainConfig, TRAIN_CONFIG_KEYS, TrainConfigSchema, type TrainConfig} from "../api/train-config.js";
import {RequestError} from "../serve/server.js";
import type {ConfigReply, SchemaReply} from "./api-types.js";

/** the form's groups: each starts at its first key and runs to the next group's (the schema's own grouping) */
const SECTION_STARTS: {title: string; first: keyof TrainConfig}[] = [
    {title: "model and data", first: "model"},
    {title: "quantization (BitsAndBytesConfig)", first: "load_in_4bit"},
    {title: "LoRA (LoraConfig)", first: "r"},
    {title: "training (TrainingArguments)", first: "output_dir"},
    {title: "qlora", first: "device"}
];

export function formSections(): {title: string; keys: string[]}[] {
    const starts = SECTION_STARTS.map((s) => TRAIN_CONFIG_KEYS.indexOf(s.first));
    if (starts.some((i, n) => i < 0 || (n > 0 && i <= starts[n - 1])) || starts[0] !== 0)
        throw new Error(`form sections: the schema's key order changed (${SECTION_STARTS.map((s) => s.first).join(", ")})`);
    return SECTION_STARTS.map((s, n) => ({title: s.title, keys: TRAIN_CONFIG_KEYS.slice(starts[n], starts[n + 1])}));
}

let jsonSchema: SchemaReply["schema"] | null = null;

export async function schemaReply(outputRoot: string): Promise<SchemaReply> {
    // io "input": the keys as a user writes them (defaults optional); refinements zod cannot express are checked
    // by the parser when the form is sent
    jsonSchema ??= z.toJSONSchema(TrainConfigSchema, {io: "input", unrepresentable: "any"}) as SchemaReply["schema"];
    return {schema: jsonSchema, sections: formSections(), outputRoot, suggestedOutputDir: await freeRunName(outputRoot)};
}

/** run-YYYYMMDD-HHMMSS (with -2, -3... when taken): a folder name not in use in the output root */
async function freeRunName(outputRoot: string): Promise<string> {
    const d = new Date();
    const p = (n: number) => String(n).padStart(2, "0");
    const base = `run-${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
    for (let i = 1; ; i++) {
        const name = i === 1 ? base : `${base}-${i}`;
        try {
            await fs.lstat(path.join(outputRoot, name));
        } catch {
            return name;
        }
    }
}

/**
 * the form's values as `qlora train` flags (`--key=value`: a value that starts with "--" stays a value), in the
 * schema's order; a value left empty is not set
 */
export function formFlags(body: Record<string, unknown>): string[] {
    const values = body.values;
    if (typeof values !== "object" || values === null || Array.isArray(values))
        throw new RequestError(400, "`values` must be an object of key: text", "values");
    const flags: string[] = [];
    for (const [key, value] of Object.entries(values)) {
        if (typeof value !== "string") throw new RequestError(400, `values.${key} must be text, got ${quoteValue(value)}`, key);
        // unknown keys reach the parser, which names them as the CLI does
        if (value.trim() !== "" && !TRAIN_CONFIG_KEYS.includes(key as keyof TrainConfig)) flags.push(`--${key}=${value}`);
    }
    for (const key of TRAIN_CONFIG_KEYS) {
        const value = (values as Record<string, string>)[key];
        if (typeof value === "string" && value.trim() !== "") flags.push(`--${key}=${value}`);
    }
    return flags;
}

export interface CheckedForm {
    config: TrainConfig;
    /** the flags for `qlora train`, output_dir made absolute */
    flags: string[];
    outputDir: string;
    /** the run's name: its folder in the output root */
    name: string;
}

/**
 * The form through `qlora train`'s parser (its messages: "command line: key: ..."); output_dir is a folder of the
 * output root (a relative one is taken inside it), where the run list finds it.
 */
export async function checkForm(body: Record<string, unknown>, outputRoot: string): Promise<CheckedForm> {
    const flags = formFlags(body);
    const config = await loadTrainConfig(null, flags);
    const outputDir = path.resolve(outputRoot, config.output_dir);
    if (path.dirname(outputDir) !== outputRoot)
        throw new QloraError(
            `output_dir: ${quoteValue(config.output_dir)} is not a folder directly in the output root ${outputRoot}, ` +
                "where qlora ui lists runs: give a folder name (or start qlora ui with another --output-root)"
        );
    const out = [...flags.filter((f) => !f.startsWith("--output_dir=")), `--output_dir=${outputDir}`];
    return {config, flags: out, outputDir, name: path.basename(outputDir)};
}

/** a command line as a POSIX shell reads it */
export function shellCommand(args: string[]): string {
    return args.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`)).join(" ");
}

export function configReply(checked: CheckedForm): ConfigReply {
    return {
        command: shellCommand(["qlora", "train", ...checked.flags]),
        config: checked.config as unknown as Record<string, unknown>,
        outputDir: checked.outputDir
    };
}
