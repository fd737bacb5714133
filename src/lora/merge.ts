// merge.ts: W' = W + (alpha / r) * B A folded into the base weights, written as a Hugging Face model folder
// (config.json, sharded safetensors + index, tokenizer and generation config) in bf16 or f16.
//
// Two bases to merge into (SPEC-peft §11):
//  - "original" (default): the checkpoint's own 16-bit weights. This is what PEFT's merge_and_unload on a
//    16-bit model does and what most users ship, but a QLoRA adapter was trained against dequant(NF4(W)),
//    so the merged model differs from the trained one by the quantization error.
//  - "nf4": dequant(NF4(W)) + delta, exactly the weights the adapter saw in training, stored in 16 bits. The
//    merged model then behaves like the trained QLoRA model, at the cost of carrying the 4-bit rounding of W.
import path from "node:path";
import {QloraError} from "../errors.js";
import {f32ToHalf} from "../backend/cpu.js";
import {assertDirOutput, assertOutputSeparate, writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {pathExists, readRegularFile} from "../io/files.js";
import {loadModelConfig} from "../io/hf-config.js";
import {SafetensorsCheckpoint, SafetensorsFile, writeShardedSafetensors, type TensorToWrite} from "../io/safetensors.js";
import {assertFinite, checkConfigAgainstCheckpoint, expectedTensors, readTensorF32} from "../model/weights.js";
import {dequantize4bit, quantize4bit} from "../quant/nf4.js";
import {ADAPTER_WEIGHTS_FILE, readAdapterConfig, readAdapterTensor} from "./adapter.js";
import {checkRankFits, loraScaling} from "./config.js";
import {addDeltaWeight, applyDoraMagnitude} from "./layer.js";

export interface MergeOptions {
    model: string;
    adapter: string;
    out: string;
    dtype?: "bf16" | "f16";
    /** merge into the dequantized NF4 base the adapter was trained on, instead of the 16-bit weights */
    againstNf4?: boolean;
    maxShardBytes?: number;
    /** replace `out` when it is a folder an earlier qlora merge wrote (never any other folder) */
    overwrite?: boolean;
}

/** the kind in the marker of a merged model folder: `--overwrite` replaces only folders of this kind */
export const MERGED_MODEL_KIND = "merged-model";

const EXTRA_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json"];

interface LoraPair {
    A: Float32Array; // [r, in]
    B: Float32Array; // [out, r]
    r: number;
    /** DoRA's magnitude [out], when the adapter is a DoRA adapter */
    magnitude?: Float32Array;
}

/** full weights an adapter carries (modules_to_save): lm_head.weight / model.embed_tokens.weight */
const FULL_WEIGHT = /^base_model\.model\.(lm_head|model\.embed_tokens)(?:\.modules_to_save\.default)?\.weight$/;

async function readAdapterPairs(adapterDir: string, full: Map<string, Float32Array>): Promise<Map<string, LoraPair>> {
    const file = path.join(adapterDir, ADAPTER_WEIGHTS_FILE);
    const st = await SafetensorsFile.open(file).catch((err) => {
        throw new QloraError(`cannot open the adapter weights (${(err as Error).message.split("\n")[0]})`, {file});
    });
    const pairs = new Map<string, Partial<LoraPair>>();
    try {
        for (const name of st.names()) {
            const fw = FULL_WEIGHT.exec(name);
            if (fw) {
                full.set(`${fw[1]}.weight`, await readAdapterTensor(st, name));
                continue;
            }
            const mag = /^base_model\.model\.(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$/.exec(name);
            if (mag) {
                const p = pairs.get(mag[1]) ?? {};
                p.magnitude = await readAdapterTensor(st, name);
                pairs.set(mag[1], p);
                continue;
            }
            const m = /^base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$/.exec(name);
            if (!m) throw new QloraError(`tensor "${name}" is not a LoRA weight qlora can merge`, {file});
            const info = st.info(name);
            const data = await readAdapterTensor(st, name);
            const p = pairs.get(m[1]) ?? {};
            if (m[2] === "lora_A") {
                p.A = data;
                p.r = info.shape[0];
            } else p.B = data;
            pairs.set(m[1], p);
        }
    } finally {
        await st.close();
    }
    const out = new Map<string, LoraPair>();
    for (const [mod, p] of pairs) {
        if (!p.A || !p.B) throw new QloraError(`module ${mod} has only one of lora_A / lora_B`, {file});
        out.set(mod, p as LoraPair);
    }
    return out;
}

export async function mergeAdapter(opts: MergeOptions): Promise<{out: string; merged: number; tensors: number}> {
    const dtype = opts.dtype ?? "bf16";
    const out = path.resolve(opts.out);
    // the output is checked before anything is read: a refused merge is quick, and never touches its inputs
    await assertOutputSeparate(out, [{path: opts.model, what: "base model folder"}, {path: opts.adapter, what: "adapter folder"}]);
    const outputPolicy = {replace: opts.overwrite ? "owned" : "never", kind: MERGED_MODEL_KIND, overwriteHint: "--overwrite"} as const;
    await assertDirOutput(out, outputPolicy);
    const cfg = await loadModelConfig(opts.model);
    if (cfg.quantizationConfig)
        throw new QloraError("the base is a pre-quantized 4-bit checkpoint; merge into its original 16-bit model " +
            "(and use --against-nf4 to keep the 4-bit rounding the adapter was trained with)", {file: opts.model});
    const adapterCfg = await readAdapterConfig(opts.adapter);
    const scaling = loraScaling(adapterCfg);
    const full = new Map<string, Float32Array>();
    const pairs = await readAdapterPairs(opts.adapter, full);
    // a trained copy of either side of a tied embedding unties it (PEFT trains one copy; the other keeps the
    // original): the merged model gets its own output layer
    const untie = cfg.tieWordEmbeddings && full.size > 0;
    const shapes = expectedTensors(untie ? {...cfg, tieWordEmbeddings: false} : cfg);
    for (const [name, w] of full) {
        const shape = shapes.get(name)!;
        if (w.length !== shape[0] * shape[1])
            throw new QloraError(`tensor "base_model.model.${name}" has ${w.length} values but the base's ${name} needs ` +
                `[${shape.join(", ")}]: the adapter was trained on another base model`, {file: opts.adapter});
    }
    // check every LoRA pair against the base before writing anything
    for (const [mod, p] of pairs) {
        const shape = shapes.get(`${mod}.weight`);
        const prefix = `base_model.model.${mod}`;
        if (!shape) throw new QloraError(`tensor "${prefix}.lora_A.weight" belongs to module ${mod}, which the base ` +
            "model does not have: the adapter was trained on another base model", {file: opts.adapter});
        if (p.r !== adapterCfg.r)
            throw new QloraError(`tensor "${prefix}.lora_A.weight" has rank ${p.r} but adapter_config.json says r ` +
                `${adapterCfg.r}: the scaling alpha/r would be wrong; the adapter files do not belong together`, {file: opts.adapter});
        if (p.A.length !== p.r * shape[1])
            throw new QloraError(`tensor "${prefix}.lora_A.weight" has ${p.A.length} elements but the base's ${mod} ` +
                `needs [${p.r}, ${shape[1]}]: the adapter was trained on another base model`, {file: opts.adapter});
        if (p.B.length !== shape[0] * p.r)
            throw new QloraError(`tensor "${prefix}.lora_B.weight" has ${p.B.length} elements but the base's ${mod} ` +
                `needs [${shape[0]}, ${p.r}]: the adapter was trained on another base model`, {file: opts.adapter});
    }
    checkRankFits(adapterCfg.r, [...pairs.keys()].map((mod) => {
        const [outFeatures, inFeatures] = shapes.get(`${mod}.weight`)!;
        return {name: mod, outFeatures, inFeatures};
    }), path.join(opts.adapter, "adapter_config.json"));
    const ckpt = await SafetensorsCheckpoint.open(opts.model);
    let merged = 0;
    const tensors: TensorToWrite[] = [];
    try {
        checkConfigAgainstCheckpoint(cfg, ckpt);
        for (const [name, shape] of shapes) {
            const replaced = full.get(name);
            // an untied output layer starts from the tied embedding of the checkpoint
            const source = untie && name === "lm_head.weight" ? "model.embed_tokens.weight" : name;
            if (!replaced && !ckpt.has(source)) throw new QloraError(`tensor "${source}" is missing from the base checkpoint`, {file: opts.model});
            let w = replaced ?? await readTensorF32(ckpt, source);
            const mod = name.replace(/\.weight$/, "");
            const pair = name.endsWith(".weight") ? pairs.get(mod) : undefined;
            if (pair) {
                if (opts.againstNf4) {
                    // the base as QLoRA training saw it: NF4 + double quant of the bf16 weights, dequantized
                    const bits = f32ToHalf(w, "BF16");
                    w = dequantize4bit(quantize4bit({bf16: bits}, {shape: [shape[0], shape[1]]}), {roundToDtype: false});
                }
                addDeltaWeight(w, {...pair, scaling}, shape[0], shape[1]);
                // DoRA: W' = (m / ||W + s B A||_row) (W + s B A)
                if (pair.magnitude) applyDoraMagnitude(w, pair.magnitude, shape[0], shape[1]);
                merged++;
            }
            const halfDtype = dtype === "bf16" ? "BF16" : "F16";
            const bits = f32ToHalf(w, halfDtype);
            // f16 tops out at 65504: a merged weight beyond it would be written as Inf
            assertFinite(name, bits, out, halfDtype, dtype === "f16" ? "the merged weights exceed the f16 range: merge with --dtype bf16"
                : "the adapter or the base holds values out of range");
            tensors.push({name, dtype: halfDtype, shape, data: bits});
        }
    } finally {
        await ckpt.close();
    }
    if (merged !== pairs.size) throw new QloraError(`only ${merged} of the adapter's ${pairs.size} modules were merged`);
    await writeDirAtomic(out, async (tmp) => {
        await writeShardedSafetensors(tmp, "model", tensors, opts.maxShardBytes ?? 5 * 2 ** 30, {format: "pt",
            qlora_merge: opts.againstNf4 ? "dequantized-nf4 base + lora" : "16-bit base + lora",
            qlora_adapter: path.basename(path.resolve(opts.adapter))});
        const config: Record<string, unknown> = {...cfg.raw, torch_dtype: dtype === "bf16" ? "bfloat16" : "float16"};
        if (untie) config.tie_word_embeddings = false;
        if ("dtype" in config) config.dtype = config.torch_dtype;
        delete (config as Record<string, unknown>).quantization_config;
        await writeFileAtomic(path.join(tmp, "config.json"), JSON.stringify(config, null, 2) + "\n");
        for (const f of EXTRA_FILES) {
            const source = path.join(opts.model, f);
            // read through files.ts: a FIFO or a folder under a tokenizer file's name is an error, not a hang
            if (await pathExists(source)) await writeFileAtomic(path.join(tmp, f), await readRegularFile(source, {what: f}));
        }
    }, outputPolicy);
    return {out, merged, tensors: tensors.length};
}
