// model-copy.ts: a copy of the embedded tiny-qwen2 folder to break on purpose in error tests.
import {copyFileSync, mkdirSync, readFileSync, writeFileSync} from "node:fs";
import path from "node:path";
import {MODEL_DIR} from "./paths.js";

/** copies the model's files into `dir` (created) and applies `edit` */
export function copyModel(dir: string, edit: (dir: string) => void = () => undefined): string {
    mkdirSync(dir);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
        copyFileSync(path.join(MODEL_DIR, f), path.join(dir, f));
    edit(dir);
    return dir;
}

/** rewrites dir/config.json through `change` */
export function editConfig(dir: string, change: (c: Record<string, unknown>) => void): void {
    const file = path.join(dir, "config.json");
    const c = JSON.parse(readFileSync(file, "utf8"));
    change(c);
    writeFileSync(file, JSON.stringify(c));
}
