// extract.ts: answer extraction and exact match for generation tasks (GSM8K and user tasks scored by exact match),
// as lm-evaluation-harness does it: a regex filter picks one match out of the completion (its RegexFilter:
// `re.findall`, the match at `group_select`, the first non-empty capture group of that match, stripped), then the
// prediction and the target are compared after normalization.
import {QloraError, quoteValue} from "../errors.js";

/** a named regex filter, lm-evaluation-harness's `filter_list` entry (function: regex, then take_first) */
export interface ExtractionFilter {
    /** the filter's name in lm-evaluation-harness, reported with the score ("strict-match", "flexible-extract") */
    readonly name: string;
    /** the pattern as lm-evaluation-harness writes it (Python `re` syntax that JavaScript reads the same) */
    readonly regex: string;
    /** which match: 0 the first, -1 the last (lm-evaluation-harness's `group_select`) */
    readonly group: number;
    /** where the pattern comes from */
    readonly source: string;
}

/**
 * gsm8k_cot's "strict-match": the number in "The answer is N." (the 8-shot chain-of-thought exemplars end that
 * way), first match. The trailing "." of the pattern is any character but a line break, so, exactly as in
 * lm-evaluation-harness, "The answer is 42" at the very end of a completion gives "4" (the "." takes the "2").
 */
export const GSM8K_STRICT: ExtractionFilter = {
    name: "strict-match",
    regex: "The answer is (\\-?[0-9\\.\\,]+).",
    group: 0,
    source: "EleutherAI/lm-evaluation-harness lm_eval/tasks/gsm8k/gsm8k-cot.yaml (task gsm8k_cot, version 3.0)"
};

/** gsm8k's "strict-match": the number after "#### " (the dataset's own answer format), first match */
export const GSM8K_STRICT_HASH: ExtractionFilter = {
    name: "strict-match",
    regex: "#### (\\-?[0-9\\.\\,]+)",
    group: 0,
    source: "EleutherAI/lm-evaluation-harness lm_eval/tasks/gsm8k/gsm8k.yaml (task gsm8k, version 3.0)"
};

/**
 * "flexible-extract" of both gsm8k and gsm8k_cot: the last number-like run in the completion (two or more of
 * digits, "$", ",", "." with an optional "-", or a single digit).
 */
export const GSM8K_FLEXIBLE: ExtractionFilter = {
    name: "flexible-extract",
    regex: "(-?[$0-9.,]{2,})|(-?[0-9]+)",
    group: -1,
    source: "EleutherAI/lm-evaluation-harness lm_eval/tasks/gsm8k/gsm8k.yaml and gsm8k-cot.yaml (version 3.0)"
};

/**
 * A regex written for Python's `re` (task files copied from lm-evaluation-harness) as a global JavaScript RegExp.
 * The two Python spellings JavaScript lacks are translated: named groups `(?P<name>...)` and leading inline flags
 * `(?ims)`. Anything else JavaScript cannot read is a QloraError naming the pattern.
 */
export function compileExtractionRegex(regex: string | RegExp): RegExp {
    if (regex instanceof RegExp) return regex.global ? regex : new RegExp(regex.source, `${regex.flags}g`);
    let source = regex.replace(/\(\?P</g, "(?<");
    let flags = "g";
    const inline = /^\(\?([a-zA-Z]+)\)/.exec(source);
    if (inline) {
        const unsupported = [...inline[1]].filter((f) => !"ims".includes(f));
        if (unsupported.length > 0)
            throw new QloraError(
                `the answer-extraction regex ${quoteValue(regex)} uses the inline flag(s) "${unsupported.join("")}", ` +
                    "which JavaScript regexes do not have; only (?i), (?m) and (?s) are understood"
            );
        flags += inline[1];
        source = source.slice(inline[0].length);
    }
    try {
        return new RegExp(source, flags);
    } catch (err) {
        throw new QloraError(
            `the answer-extraction regex ${quoteValue(regex)} is not a valid regex (${(err as Error).message}); ` +
                "write it as lm-evaluation-harness's regex_pattern",
            {cause: err}
        );
    }
}

/**
 * The answer in `text`: the match number `group` of `regex` (0 the first, -1 the last; lm-evaluation-harness's
 * group_select), its first non-empty capture group (the whole match when the pattern has no group), stripped of
 * surrounding white space. null when nothing matches, the match does not exist or what it captured is empty
 * (lm-evaluation-harness's "[invalid]").
 */
export function extractAnswer(text: string, regex: string | RegExp, group = -1): string | null {
    const matches = [...text.matchAll(compileExtractionRegex(regex))];
    const match = matches[group < 0 ? matches.length + group : group];
    if (match === undefined) return null;
    const value = match.length === 1 ? match[0] : match.slice(1).find((g) => g !== undefined && g !== "");
    const stripped = value?.trim();
    return stripped ? stripped : null;
}

/** extractAnswer with a named filter (GSM8K_STRICT, GSM8K_FLEXIBLE, ...) */
export function applyFilter(text: string, filter: ExtractionFilter): string | null {
    return extractAnswer(text, filter.regex, filter.group);
}

/**
 * The canonical form of an answer for comparison. lm-evaluation-harness's gsm8k removes "," and "$" and one
 * trailing "." and ignores case; white space is removed too (" 1 000" and "- 5" are what models write). A string
 * that is then a decimal number gets its numeric canonical form: no leading zeros, no trailing zeros after the
 * point, no point without a fraction, "-" kept, "-0" as "0": "1,000.00" and "1000" both become "1000". This is
 * more lenient than lm-evaluation-harness, where "18.00" does not equal "18"; GSM8K's targets are integers, so a
 * score differs from lm-evaluation-harness's only on completions that write a whole number with a zero fraction.
 * Anything else is returned as text (lower case).
 */
export function normalizeNumber(s: string): string {
    let text = s.replace(/[$,\s]/g, "");
    if (text.endsWith(".")) text = text.slice(0, -1);
    const m = /^([+-]?)(\d*)(?:\.(\d*))?$/.exec(text);
    if (m === null || (m[2] === "" && (m[3] ?? "") === "")) return text.toLowerCase();
    const whole = m[2].replace(/^0+/, "") || "0";
    const fraction = (m[3] ?? "").replace(/0+$/, "");
    const magnitude = fraction ? `${whole}.${fraction}` : whole;
    return m[1] === "-" && magnitude !== "0" ? `-${magnitude}` : magnitude;
}

const CANONICAL_NUMBER = /^-?\d+(\.\d+)?$/;

/**
 * The target of a GSM8K record: the normalized number after the last "####" of its `answer` (the dataset puts
 * the worked solution first and "#### 72" last; lm-evaluation-harness takes `answer.split('####')[-1].strip()`).
 * `where` names the record in the error ("gsm8k_test.jsonl.gz line 12").
 */
export function gsm8kTarget(answer: string, where?: string): string {
    const at = answer.lastIndexOf("####");
    const tail = at < 0 ? "" : answer.slice(at + 4).trim();
    const target = normalizeNumber(tail);
    if (at < 0 || !CANONICAL_NUMBER.test(target))
        throw new QloraError(
            at < 0
                ? `a GSM8K answer must end with "#### <number>" (the dataset's final-answer line); found none in ${quoteValue(answer)}`
                : `a GSM8K answer must end with "#### <number>"; found "#### " followed by ${quoteValue(tail)}`,
            {file: where}
        );
    return target;
}

/** whether the extracted prediction equals the target after normalizeNumber on both; no prediction never matches */
export function exactMatch(prediction: string | null, target: string): boolean {
    return prediction !== null && normalizeNumber(prediction) === normalizeNumber(target);
}
