// column-map.ts: the `columns` and `tags` settings (LLaMA-Factory's dataset_info names for other column names and
// ShareGPT keys/role names), written once: the train config (file, flags, API) and `qlora data preview` check
// them with this schema and report a mistake in the same words.
import {z} from "zod";
import {nearestKey, QloraError, quoteValue} from "../errors.js";

const columnName = z.string().min(1).optional();

const columnShape = {
    prompt: columnName,
    query: columnName,
    response: columnName,
    system: columnName,
    history: columnName,
    messages: columnName
};

const tagShape = {
    role_tag: columnName,
    content_tag: columnName,
    user_tag: columnName,
    assistant_tag: columnName,
    system_tag: columnName,
    observation_tag: columnName
};

/** zod's message for keys the mapping does not have: each named, with the key meant when it is near enough */
function unknownKeyMessage(known: readonly string[]): z.core.$ZodErrorMap {
    return (issue) => {
        if (issue.code !== "unrecognized_keys") return undefined;
        const near = issue.keys.map((key) => nearestKey(key, known));
        const list = `; the keys are ${known.join(", ")}`;
        if (issue.keys.length === 1)
            return `unknown key ${quoteValue(issue.keys[0])}` + (near[0] ? `; did you mean "${near[0]}"?` : list);
        const named = issue.keys.map((key, i) => quoteValue(key) + (near[i] ? ` (did you mean "${near[i]}"?)` : ""));
        return `unknown keys ${named.join(", ")}` + (near.every(Boolean) ? "" : list);
    };
}

/** other column names, as LLaMA-Factory's dataset_info: prompt, query, response, system, history, messages */
export const ColumnMapSchema = z.strictObject(columnShape, {error: unknownKeyMessage(Object.keys(columnShape))});
/** ShareGPT keys and role names, as LLaMA-Factory's tags: role_tag, content_tag, user_tag, ... */
export const TagMapSchema = z.strictObject(tagShape, {error: unknownKeyMessage(Object.keys(tagShape))});

export type ColumnMap = z.infer<typeof ColumnMapSchema>;
export type TagMap = z.infer<typeof TagMapSchema>;

const MAP_SETTINGS = {columns: ColumnMapSchema, tags: TagMapSchema};
export type MapSetting = keyof typeof MAP_SETTINGS;

const FLAG_EXAMPLES: Record<MapSetting, string> = {
    columns: '{"prompt": "question", "response": "answer"}',
    tags: '{"role_tag": "from", "content_tag": "value"}'
};

/** the value of a `--columns` / `--tags` flag: a JSON object (checked by checkMapSetting) */
export function parseMapFlag(key: MapSetting, text: string): unknown {
    try {
        return JSON.parse(text);
    } catch {
        throw new QloraError(`--${key} expects a JSON object, e.g. '${FLAG_EXAMPLES[key]}' (got ${quoteValue(text)})`);
    }
}

/**
 * `value` as the `columns` or `tags` setting (null or undefined: none). The message of a wrong value is the one
 * the train config gives for the same key: the path, zod's words, and the value when the whole of it is wrong.
 */
export function checkMapSetting<K extends MapSetting>(key: K, value: unknown): z.infer<(typeof MAP_SETTINGS)[K]> | undefined {
    if (value === undefined || value === null) return undefined;
    const result = MAP_SETTINGS[key].safeParse(value);
    if (result.success) return result.data as z.infer<(typeof MAP_SETTINGS)[K]>;
    const issue = result.error.issues[0];
    throw new QloraError(
        `${[key, ...issue.path].join(".")}: ${issue.message}` + (issue.path.length === 0 ? ` (got ${quoteValue(value)})` : "")
    );
}

/** a `--columns` / `--tags` flag's text (undefined: not given) parsed and checked */
export function mapSettingFromFlag<K extends MapSetting>(
    key: K,
    text: string | undefined
): z.infer<(typeof MAP_SETTINGS)[K]> | undefined {
    return text === undefined ? undefined : checkMapSetting(key, parseMapFlag(key, text));
}
