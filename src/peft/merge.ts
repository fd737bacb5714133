// merge.ts: W' = W + (alpha / r) * B A folded into the base weights, written as a Hugging Face model folder
// (config.json, sharded safetensors + index, tokenizer and generation config) in bf16 or f16.
//
// Two bases to merge into (SPEC-peft §11):
//  - "original" (default): the checkpoint's own 16-bit weights. This is what PEFT's merge_and_unload on a
//    16-bit model does and what most users ship, but a QLoRA adapter was trained against dequant(NF4(W)),
//    so the merged model differs from the trained one by the quantization error.
//  - "nf4": dequant(NF4(W)) + delta, exactly the weights the adapter saw in training, stored in 16 bits. The
//    merged model then behaves like the trained QLoRA model, at the cost of carrying the 4-bit rounding of W.
//
// Each projection is merged by mergeProjection, written once over a MergeExecutor (merge-executor.ts): on the host,
// or on an NVIDIA GPU (device "cuda": the same steps as kernels; equal to the host's merge but for rare one-ulp
// differences of the fp32 GEMM's summation order, which merge-executor.ts describes).
import path from "node:path";
import {CHAT_TEMPLATE_FILE_NAME, TOKENIZER_FOLDER_FILES} from "../tokenizer/index.js";
import {readChatTemplateFile} from "../io/gguf-vocab.js";
import {QloraError} from "../errors.js";
import {f32ToHalf, halfToF32} from "../backend/cpu.js";
import {assertDirOutput, assertOutputSeparate, writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {pathExists, readRegularFile} from "../io/files.js";
import {loadModelConfig} from "../io/hf-config.js";
import {SafetensorsCheckpoint, writeShardedSafetensors, type TensorToWrite} from "../io/safetensors.js";
import {
    assertFinite,
    checkConfigAgainstCheckpoint,
    expectedTensors,
    readFloatTensor,
    type RawFloatTensor
} from "../model/weights.js";
import {readAdapter, type AdapterBranch} from "./adapter-files.js";
import {cpuMergeExecutor, cudaMergeExecutor, type MergeExecutor} from "./merge-executor.js";

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
    /**
     * where the merge computes (default "cpu"): "cuda" runs each projection's merge on the GPU (chooseDevice of
     * backend/cuda.ts resolves --device's auto); the result equals the host's but for rare one-ulp differences
     */
    device?: "cpu" | "cuda";
}

/**
 * W' = W + s B A of one projection (DoRA: rows rescaled to m / ||W + s B A||), W the base weight as loaded by the
 * executor (or its NF4 round trip with againstNf4), as 16-bit bits: the merge, written once for every device
 */
export function mergeProjection<T>(
    ex: MergeExecutor<T>,
    base: T,
    branch: AdapterBranch,
    againstNf4: boolean,
    dtype: "BF16" | "F16"
): Uint16Array {
    const R = branch.outFeatures,
        C = branch.inFeatures;
    let W = base;
    try {
        if (againstNf4) {
            // the base as QLoRA training saw it: NF4 + double quant of the bf16 weights, dequantized
            const q = ex.nf4RoundTrip(W, R, C);
            ex.free(W);
            W = q;
        }
        ex.addDelta(W, branch);
        // DoRA: W' = (m / ||W + s B A||_row) (W + s B A)
        if (branch.magnitude) ex.applyMagnitude(W, branch.magnitude, R, C);
        return ex.toHalf(W, dtype);
    } finally {
        ex.free(W);
    }
}

/** the kind in the marker of a merged model folder: `--overwrite` replaces only folders of this kind */
export const MERGED_MODEL_KIND = "merged-model";

export async function mergeAdapter(
    opts: MergeOptions
): Promise<{out: string; merged: number; tensors: number; device: "cpu" | "cuda"}> {
    const dtype = opts.dtype ?? "bf16";
    const out = path.resolve(opts.out);
    // the output is checked before anything is read: a refused merge is quick, and never touches its inputs
    await assertOutputSeparate(out, [
        {path: opts.model, what: "base model folder"},
        {path: opts.adapter, what: "adapter folder"}
    ]);
    const outputPolicy = {
        replace: opts.overwrite ? "owned" : "never",
        kind: MERGED_MODEL_KIND,
        overwriteHint: "--overwrite"
    } as const;
    await assertDirOutput(out, outputPolicy);
    const cfg = await loadModelConfig(opts.model);
    if (cfg.quantizationConfig)
        throw new QloraError(
            "the base is a pre-quantized 4-bit checkpoint; merge into its original 16-bit model " +
                "(and use --against-nf4 to keep the 4-bit rounding the adapter was trained with)",
            {file: opts.model}
        );
    // every adapter tensor is checked against the base's shapes (and read) before anything is written
    const adapter = await readAdapter(opts.adapter, cfg);
    // a trained copy of either side of a tied embedding unties it (PEFT trains one copy; the other keeps the
    // original): the merged model gets its own output layer
    const untie = cfg.tieWordEmbeddings && adapter.fullWeights.size > 0;
    const shapes = expectedTensors(untie ? {...cfg, tieWordEmbeddings: false} : cfg);
    const device = opts.device ?? "cpu";
    // a GPU that cannot run is refused here, before anything is read
    const ex: MergeExecutor<unknown> = device === "cuda" ? cudaMergeExecutor() : cpuMergeExecutor();
    const ckpt = await SafetensorsCheckpoint.open(opts.model);
    let merged = 0;
    const halfDtype = dtype === "bf16" ? "BF16" : "F16";
    // one tensor at a time: each is read, merged and converted when the writer reaches it (a 7B merge holds one
    // projection in memory, not the model); a refusal on the way aborts the temporary folder, the output is untouched
    const tensors: TensorToWrite[] = [];
    try {
        checkConfigAgainstCheckpoint(cfg, ckpt);
        for (const [name, shape] of shapes) {
            // a tensor the adapter trained whole (a modules_to_save copy, a bias) replaces the base's
            const replaced = adapter.fullWeights.get(name) ?? adapter.biases.get(name);
            // an untied output layer starts from the tied embedding of the checkpoint
            const source = untie && name === "lm_head.weight" ? "model.embed_tokens.weight" : name;
            if (!replaced && !ckpt.has(source))
                throw new QloraError(`tensor "${source}" is missing from the base checkpoint`, {file: opts.model});
            const mod = name.replace(/\.weight$/, "");
            const branch = name.endsWith(".weight") ? adapter.branches.get(mod) : undefined;
            const mergedTensor = async (): Promise<Uint16Array> => {
                // the checkpoint's values are checked for NaN and Inf once the executor holds them, before the merge
                const read = <R>(use: (raw: RawFloatTensor) => R): Promise<R> =>
                    replaced ? Promise.resolve(use({dtype: "F32", values: replaced})) : readFloatTensor(ckpt, source, use);
                const bits = branch
                    ? mergeProjection(ex, await read((raw) => ex.weight(raw)), branch, opts.againstNf4 ?? false, halfDtype)
                    : // a tensor without a branch is only converted (a 16-bit one of the output dtype is kept as it is)
                      await read((raw) => (raw.dtype === halfDtype ? raw.values : f32ToHalf(toF32(raw), halfDtype)));
                // f16 tops out at 65504: a merged weight beyond it would be written as Inf
                assertFinite(
                    name,
                    bits,
                    out,
                    halfDtype,
                    dtype === "f16"
                        ? "the merged weights exceed the f16 range: merge with --dtype bf16"
                        : "the adapter or the base holds values out of range"
                );
                return bits;
            };
            if (branch) merged++;
            tensors.push({name, dtype: halfDtype, shape, data: mergedTensor});
        }
        // every module of the adapter has its weight in the model: checked before anything is written
        if (merged !== adapter.branches.size)
            throw new QloraError(`only ${merged} of the adapter's ${adapter.branches.size} modules were merged`);
        await writeDirAtomic(
            out,
            async (tmp) => {
                await writeShardedSafetensors(tmp, "model", tensors, opts.maxShardBytes ?? 5 * 2 ** 30, {
                    format: "pt",
                    qlora_merge: opts.againstNf4 ? "dequantized-nf4 base + lora" : "16-bit base + lora",
                    qlora_adapter: path.basename(path.resolve(opts.adapter)),
                    // the bits depend on it in rare ulps (the GEMM's summation order)
                    qlora_merge_device: device
                });
                const config: Record<string, unknown> = {...cfg.raw, torch_dtype: dtype === "bf16" ? "bfloat16" : "float16"};
                if (untie) config.tie_word_embeddings = false;
                if ("dtype" in config) config.dtype = config.torch_dtype;
                delete (config as Record<string, unknown>).quantization_config;
                await writeFileAtomic(path.join(tmp, "config.json"), JSON.stringify(config, null, 2) + "\n");
                // the adapter's training format (qlora writes it beside the adapter) is the merged model's chat template
                const trainedFormat = await readChatTemplateFile(opts.adapter);
                if (trainedFormat !== null) await writeFileAtomic(path.join(tmp, CHAT_TEMPLATE_FILE_NAME), trainedFormat);
                for (const f of TOKENIZER_FOLDER_FILES) {
                    if (f === CHAT_TEMPLATE_FILE_NAME && trainedFormat !== null) continue;
                    const source = path.join(opts.model, f);
                    // read through files.ts: a FIFO or a folder under a tokenizer file's name is an error, not a hang
                    if (await pathExists(source))
                        await writeFileAtomic(path.join(tmp, f), await readRegularFile(source, {what: f}));
                }
            },
            outputPolicy
        );
    } finally {
        ex.close();
        await ckpt.close();
    }
    return {out, merged, tensors: tensors.length, device};
}

function toF32(raw: RawFloatTensor): Float32Array {
    return raw.dtype === "F32" ? raw.values : halfToF32(raw.values, raw.dtype);
}
