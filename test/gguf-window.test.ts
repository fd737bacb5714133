// Sliding windows in GGUF export: convert_hf_to_gguf.py writes {arch}.attention.sliding_window only for
// architectures whose llama.cpp graph applies it (phi3); a Mistral (llama) or Qwen2 window is not carried, and the
// export says so (ExportGgufResult.notes) instead of writing a file that silently attends further than the model.
import {after, test} from "node:test";
import assert from "node:assert/strict";
import {copyFileSync, mkdirSync, mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gguf} from "@huggingface/gguf";
import {exportGguf} from "../src/api/export-gguf.js";
import {parseModelConfig} from "../src/io/hf-config.js";
import {ggufArchFor, ggufWindowNote} from "../src/export/gguf-metadata.js";
import {writeSyntheticCheckpoint} from "../src/model/synthetic.js";
import {MODEL_DIR} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-gguf-window-"));
after(() => rmSync(tmp, {recursive: true, force: true}));

const MISTRAL = {
    architectures: ["MistralForCausalLM"],
    model_type: "mistral",
    vocab_size: 16384,
    hidden_size: 64,
    intermediate_size: 96,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 256,
    rms_norm_eps: 1e-5,
    sliding_window: 8,
    tie_word_embeddings: true,
    torch_dtype: "float32"
};

test("a window the llama.cpp architecture ignores is a note; none without one, or where llama.cpp applies it", () => {
    const note = (json: Record<string, unknown>) => {
        const cfg = parseModelConfig(json, "m/config.json");
        return ggufWindowNote(cfg, ggufArchFor(cfg));
    };
    assert.match(note(MISTRAL) ?? "", /llama.cpp's llama architecture has no sliding window .* past 8 tokens/);
    assert.equal(note({...MISTRAL, sliding_window: null}), null);
    const qwen2 = {...MISTRAL, architectures: ["Qwen2ForCausalLM"], model_type: "qwen2", use_sliding_window: true};
    // qwen2's window covers only the layers from max_window_layers (28) on: none of these 2
    assert.equal(note(qwen2), null);
    assert.match(note({...qwen2, max_window_layers: 1}) ?? "", /llama.cpp's qwen2 architecture has no sliding window/);
});

test("a mistral with a window exports without a window key and with the note", async () => {
    const dir = path.join(tmp, "mistral");
    mkdirSync(dir);
    await writeSyntheticCheckpoint(dir, {config: MISTRAL, dtype: "F32", seed: 1});
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(path.join(MODEL_DIR, f), path.join(dir, f));
    const out = path.join(tmp, "mistral.gguf");
    const result = await exportGguf({modelDir: dir, outtype: "f16", out});
    assert.equal(result.arch, "llama");
    assert.equal(result.notes.length, 1);
    const {metadata} = await gguf(out, {allowLocalFile: true});
    assert.equal(metadata["general.architecture"], "llama");
    assert.ok(!Object.keys(metadata).some((k) => k.includes("sliding_window")), "no sliding_window key");
});
