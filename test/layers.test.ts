// The layering of docs/DESIGN.md holds in src/: every relative import points to the importing file's own folder,
// a lower layer, or a file directly under src/ (order: cli > serve > api > export > train > data > peft > model > lora > quant >
// optim > tokenizer > io > backend).
import {test} from "node:test";
import assert from "node:assert/strict";
import {readdirSync, readFileSync} from "node:fs";
import path from "node:path";
import {REPO_ROOT} from "./helpers/paths.js";
import {layerViolations} from "./helpers/layer-order.js";

const SRC = path.join(REPO_ROOT, "src");

/** every .ts file under src/, by its path relative to src/ with "/" separators */
function sourceFiles(dir = SRC, files = new Map<string, string>()): Map<string, string> {
    for (const entry of readdirSync(dir, {withFileTypes: true})) {
        const full = path.join(dir, entry.name);
        if (entry.isDirectory()) sourceFiles(full, files);
        else if (entry.isFile() && entry.name.endsWith(".ts"))
            files.set(path.relative(SRC, full).split(path.sep).join("/"), readFileSync(full, "utf8"));
    }
    return files;
}

test("every import in src/ points to its own layer or a lower one", () => {
    const files = sourceFiles();
    // the scan sees the tree: the layers' main files are there
    for (const f of ["cli/main.ts", "export/gguf-model.ts", "peft/merge.ts", "lora/layer.ts", "backend/native.ts", "errors.ts"])
        assert.ok(files.has(f), f);
    assert.deepEqual(layerViolations(files), []);
});

test("an upward import is named as file -> import, in every import form; comments and strings are not imports", () => {
    const files = new Map<string, string>([
        // the two violations of the tree before src/peft/ existed
        [
            "lora/adapter.ts",
            `import type {DecoderModel} from "../model/decoder.js";\nimport {assertFinite} from "../model/weights.js";`
        ],
        ["lora/merge.ts", `import {readTensorF32} from "../model/weights.js";\nimport {addDeltaWeight} from "./layer.js";`],
        ["io/files.ts", `export {HfTokenizer} from "../tokenizer/index.js";\nimport {cpu} from "../backend/cpu.js";`],
        ["backend/cuda.ts", `async function f() { return import("../api/index.js"); }`],
        [
            "data/tokenize.ts",
            `// import {x} from "../cli/run.js";\nconst s = 'import("../train/trainer.js")';\n` +
                `/* export * from "../api/index.js" */\nimport {QloraError} from "../errors.js";\nimport {HfTokenizer} from "../tokenizer/index.js";`
        ],
        ["errors.ts", `import {cpu} from "./backend/cpu.js";\nimport {x} from "./other.js";`],
        ["cli/commands/merge.ts", `import {mergeAdapter} from "../../peft/merge.js";\nimport {run} from "../run.js";`],
        ["model/decoder.ts", `import {LoraLinear} from "../lora/layer.js";\nimport {y} from "../../package.js";`],
        ["extra/thing.ts", `import {QloraError} from "../errors.js";`]
    ]);
    assert.deepEqual(layerViolations(files), [
        "src/lora/adapter.ts -> ../model/decoder.js (lora may not import model, a higher layer)",
        "src/lora/adapter.ts -> ../model/weights.js (lora may not import model, a higher layer)",
        "src/lora/merge.ts -> ../model/weights.js (lora may not import model, a higher layer)",
        "src/io/files.ts -> ../tokenizer/index.js (io may not import tokenizer, a higher layer)",
        "src/backend/cuda.ts -> ../api/index.js (backend may not import api, a higher layer)",
        "src/errors.ts -> ./backend/cpu.js (files directly under src/ import only each other)",
        "src/model/decoder.ts -> ../../package.js (outside src/)",
        "src/extra/thing.ts: folder src/extra/ is not in the layer order (add it to LAYER_ORDER and docs/DESIGN.md)"
    ]);
});
