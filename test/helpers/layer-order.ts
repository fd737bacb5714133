// layer-order.ts: the layering rule of docs/DESIGN.md as a check: each folder under src/ is a layer, and a file
// may import only its own layer and the layers below it. Imports are found by TypeScript's own scanner
// (ts.preProcessFile: static imports, `export ... from`, dynamic `import("...")`, `typeof import("...")`; not
// text in comments or strings).
import path from "node:path";
import ts from "typescript";

/** the layers, highest first */
export const LAYER_ORDER = [
    "cli",
    "ui",
    "serve",
    "api",
    "eval",
    "export",
    "train",
    "parallel",
    "data",
    "peft",
    "model",
    "lora",
    "quant",
    "optim",
    "tokenizer",
    "io",
    "backend"
] as const;

/** the layer of a path relative to src/ ("lora/layer.ts" -> "lora"); null for files directly under src/ */
function layerOf(file: string): string | null {
    const slash = file.indexOf("/");
    return slash < 0 ? null : file.slice(0, slash);
}

/**
 * every import that breaks the order, as "src/<file> -> <import as written> (why)". `files` maps paths relative
 * to src/ (with "/" separators) to their source text. Files directly under src/ (errors.ts) may be imported by
 * anyone and import only each other; a folder may import itself; a folder not in LAYER_ORDER is reported.
 */
export function layerViolations(files: ReadonlyMap<string, string>): string[] {
    const rank = new Map<string, number>(LAYER_ORDER.map((layer, i) => [layer, i]));
    const out: string[] = [];
    for (const [file, text] of files) {
        const from = layerOf(file);
        if (from !== null && !rank.has(from)) {
            out.push(`src/${file}: folder src/${from}/ is not in the layer order (add it to LAYER_ORDER and docs/DESIGN.md)`);
            continue;
        }
        for (const {fileName} of ts.preProcessFile(text, true, true).importedFiles) {
            if (!fileName.startsWith(".")) continue; // packages and node: builtins
            const target = path.posix.normalize(path.posix.join(path.posix.dirname(file), fileName));
            const edge = `src/${file} -> ${fileName}`;
            if (target.startsWith("../")) {
                out.push(`${edge} (outside src/)`);
                continue;
            }
            const to = layerOf(target);
            if (to === null || to === from) continue;
            if (!rank.has(to)) out.push(`${edge} (src/${to}/ is not in the layer order)`);
            else if (from === null) out.push(`${edge} (files directly under src/ import only each other)`);
            else if (rank.get(to)! < rank.get(from)!) out.push(`${edge} (${from} may not import ${to}, a higher layer)`);
        }
    }
    return out;
}
