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
        let re: RegExp;
        try {
            re = new RegExp(`^(?:${targets})$`);
        } catch (err) {
            throw new QloraError(`target_modules: "${targets}" is not a valid regular expression (${(err as Error).message})`);
        }
        const matched = moduleNames.filter((n) => re.test(n));
        if (matched.length === 0)
            throw new QloraError(`target_modules: the pattern "${targets}" matches no module (a full match against names ` +
                `like ${moduleNames[0]}); linear modules: ${suffixes(moduleNames).join(", ")}`);
        return matched;
    }
    const matched = new Set<string>();
    for (const t of targets) {
        const hits = moduleNames.filter((n) => n === t || n.endsWith(`.${t}`));
        if (hits.length === 0)
            throw new QloraError(`target_modules: "${t}" matches no module of this model; the linear modules are ` +
                `${suffixes(moduleNames).join(", ")} (or use "all-linear")`);
        hits.forEach((h) => matched.add(h));
    }
    return moduleNames.filter((n) => matched.has(n));
}

/** the distinct last name parts, e.g. q_proj, k_proj, ... */
export function suffixes(moduleNames: string[]): string[] {
    return [...new Set(moduleNames.map((n) => n.slice(n.lastIndexOf(".") + 1)))];
}
