// export-ollama.ts: a folder Ollama imports with `ollama create NAME -f DIR/Modelfile`: the GGUF (the adapter merged
// in, or the base with the adapter as a LoRA GGUF) and a Modelfile whose TEMPLATE prompts the model as it was
// trained (the adapter's training format, translated from Jinja) and whose stops are the EOS it learned.
import path from "node:path";
import {assertDirOutput, assertOutputSeparate, writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {loadModelConfig} from "../io/hf-config.js";
import type {GgufOuttype} from "../io/gguf-quants.js";
import {modelfileText, ollamaTemplate, probeTurns} from "../export/ollama.js";
import {HfTokenizer} from "../tokenizer/index.js";
import {exportGguf, exportGgufLora} from "./export-gguf.js";
import {chatTemplateFor, resolveModel, stopTokenIds} from "./models.js";

export const OLLAMA_FOLDER_KIND = "ollama-model";

export interface ExportOllamaOptions {
    /** Hugging Face model folder (default: the embedded tiny-qwen2) */
    modelDir?: string;
    adapterDir?: string;
    /** the folder to write (new or empty; with overwrite, one an earlier export wrote) */
    out: string;
    outtype: GgufOuttype;
    /** keep the adapter separate: the base GGUF with ADAPTER (a llama.cpp LoRA GGUF) instead of merging it */
    lora?: boolean;
    /** a Jinja chat template file, or "base" (default: the adapter's training format, else the model's) */
    template?: string;
    overwrite?: boolean;
}

export interface ExportOllamaResult {
    dir: string;
    files: string[];
    template: string;
    stops: string[];
    /** what llama.cpp will do otherwise than the model (the GGUF export's notes), one sentence each */
    notes: string[];
}

export async function exportOllama(opts: ExportOllamaOptions): Promise<ExportOllamaResult> {
    const modelDir = await resolveModel(opts.modelDir);
    const out = path.resolve(opts.out);
    await assertOutputSeparate(out, [
        {path: modelDir, what: "model folder"},
        ...(opts.adapterDir ? [{path: opts.adapterDir, what: "adapter folder"}] : [])
    ]);
    const policy = {replace: opts.overwrite ? "owned" : "never", kind: OLLAMA_FOLDER_KIND, overwriteHint: "--overwrite"} as const;
    await assertDirOutput(out, policy);
    // the template first: a chat template Ollama cannot express is refused before anything is written
    const tokenizer = await chatTemplateFor(await HfTokenizer.load(modelDir), opts.adapterDir, opts.template);
    const template = ollamaTemplate(
        probeTurns((messages, gen) => tokenizer.applyChatTemplate(messages, {addGenerationPrompt: gen}))
    );
    const eosIds = await stopTokenIds(modelDir, await loadModelConfig(modelDir), tokenizer);
    const stops = [...new Set(eosIds.map((id) => tokenizer.idToToken(id)).filter((t): t is string => t !== null))];
    const files = opts.lora && opts.adapterDir ? ["model.gguf", "adapter.gguf", "Modelfile"] : ["model.gguf", "Modelfile"];
    let notes: string[] = [];
    await writeDirAtomic(
        out,
        async (tmp) => {
            ({notes} = await exportGguf({
                modelDir,
                adapterDir: opts.lora ? undefined : opts.adapterDir,
                outtype: opts.outtype,
                out: path.join(tmp, "model.gguf")
            }));
            if (opts.lora && opts.adapterDir)
                await exportGgufLora({modelDir, adapterDir: opts.adapterDir, out: path.join(tmp, "adapter.gguf")});
            const modelfile = modelfileText({
                from: "./model.gguf",
                adapter: opts.lora && opts.adapterDir ? "./adapter.gguf" : undefined,
                template,
                stops
            });
            await writeFileAtomic(path.join(tmp, "Modelfile"), modelfile);
        },
        policy
    );
    return {dir: out, files, template, stops, notes};
}
