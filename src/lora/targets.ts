// targets.ts: which modules get a LoRA branch, by PEFT's matching rules (SPEC-peft §5).
import {QloraError} from "../errors.js";
import type {LoraConfig} from "./config.js";
import {DEFAULT_TARGETS} from "./config.js";

/** module names of the model's linear layers, e.g. model.layers.0.self_attn.q_proj (lm_head excluded) */
export function matchTargets(moduleNames: string[], cfg: LoraConfig, modelType: string): string[] {
    let targets = cfg.target_modules;
    if (targets === null) targets = DEFAULT_TARGETS[modelType] ?? ["q_proj", "v_proj"];
    if (typeof targets === "string") {
        if (targets.toLowerCase() === "all-linear") return [...moduleNames];
        checkNoNestedRepetition(targets);
        let re: RegExp;
        try {
            re = new RegExp(`^(?:${targets})$`);
        } catch (err) {
            throw new QloraError(`target_modules: "${targets}" is not a valid regular expression (${(err as Error).message})`);
        }
        const matched = moduleNames.filter((n) => re.test(n));
        if (matched.length === 0)
            throw new QloraError(
                `target_modules: the pattern "${targets}" matches no module (a full match against names ` +
                    `like ${moduleNames[0]}); linear modules: ${suffixes(moduleNames).join(", ")}`
            );
        return matched;
    }
    const matched = new Set<string>();
    for (const t of targets) {
        const hits = moduleNames.filter((n) => n === t || n.endsWith(`.${t}`));
        if (hits.length === 0)
            throw new QloraError(
                `target_modules: "${t}" matches no module of this model; the linear modules are ` +
                    `${suffixes(moduleNames).join(", ")} (or use "all-linear")`
            );
        hits.forEach((h) => matched.add(h));
    }
    return moduleNames.filter((n) => matched.has(n));
}

/** the distinct last name parts, e.g. q_proj, k_proj, ... */
export function suffixes(moduleNames: string[]): string[] {
    return [...new Set(moduleNames.map((n) => n.slice(n.lastIndexOf(".") + 1)))];
}

/** more unbounded repetitions than this (like .*.*.*.*.*x) cost polynomial time of a degree that hangs too */
const MAX_UNBOUNDED_REPETITIONS = 4;

/**
 * A group that repeats (*, + or {n,}) and itself holds a repetition or an alternation, like (a+)+ or (.*)*x, makes
 * a backtracking regex engine take exponential time on a failing match: with a 30-character module name, hours.
 * Many unbounded repetitions in a row do the same polynomially. target_modules comes from config files qlora did
 * not write (adapter_config.json), so such patterns are refused before they run.
 */
function checkNoNestedRepetition(pattern: string): void {
    const refuse = (why: string): never => {
        throw new QloraError(
            `target_modules: the pattern "${pattern}" ${why}, which can take exponential time to match ` +
                "a module name; write it with fewer, unnested repetitions"
        );
    };
    const groups: boolean[] = []; // per open group: does it hold a repetition or an alternation?
    let inClass = false,
        unbounded = 0;
    for (let i = 0; i < pattern.length; i++) {
        const ch = pattern[i];
        if (ch === "\\") {
            i++;
            continue;
        }
        if (inClass) {
            if (ch === "]") inClass = false;
            continue;
        }
        const repeats = ch === "*" || ch === "+" || (ch === "{" && /^\{\d*,\}/.test(pattern.slice(i)));
        if (repeats && ++unbounded > MAX_UNBOUNDED_REPETITIONS)
            refuse(`has more than ${MAX_UNBOUNDED_REPETITIONS} unbounded repetitions`);
        if (ch === "[") inClass = true;
        else if (ch === "(") groups.push(false);
        else if ((repeats || ch === "{" || ch === "|") && groups.length > 0) groups[groups.length - 1] = true;
        else if (ch === ")") {
            const risky = groups.pop() ?? false;
            const next = pattern[i + 1];
            if (risky && (next === "*" || next === "+" || next === "{"))
                refuse("repeats a group that itself repeats or alternates (like (a+)+ or (.*)*)");
            // a repetition inside a closed group also marks the enclosing one
            if (risky && groups.length > 0) groups[groups.length - 1] = true;
        }
    }
}
