// export-gguf.ts: `qlora export gguf` and `qlora export gguf-lora` as library calls.
//
// exportGguf writes a llama.cpp model (f32, f16, q8_0 or q4_k_m) from a Hugging Face folder, optionally with a
// PEFT adapter merged in f32 first (W + scaling·B·A); exportGgufLora writes the adapter alone as a llama.cpp LoRA
// GGUF to apply on top of a base GGUF. The pipeline is SPEC-gguf §8: map names, permute llama's q/k rows,
// choose a type per tensor, quantize, write (streamed tensor by tensor; temporary name, then rename).
import {promises as fs} from "node:fs";
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {loadModelConfig, type ModelConfig} from "../io/hf-config.js";
import {assertFileOutput, assertOutputSeparate} from "../io/atomic.js";
import {GgufMetadata, hasGgufMagic, writeGguf, type GgufTensor} from "../io/gguf.js";
import {
    encodeTensor,
    GGUF_FILE_TYPE,
    GGUF_OUTTYPES,
    GgmlType,
    ggmlTypeName,
    tensorTypeFor,
    type GgufOuttype
} from "../io/gguf-quants.js";
import {
    addArchMetadata,
    GGUF_PROJ_NAMES,
    ggufArchFor,
    ggufNameOfModule,
    llama3RopeFactors,
    permutationHeads,
    permuteQkRows,
    type GgufArch
} from "../io/gguf-model.js";
import {addVocabMetadata, readGgufVocab} from "../io/gguf-vocab.js";
import {addDeltaWeight} from "../lora/layer.js";
import {openCheckpoint, PROJ_NAMES, projHasBias, projModule, projShape, readTensorF32, type ProjName} from "../model/weights.js";
import {readAdapter} from "../peft/adapter-files.js";
import {loadBnb4bitCheckpoint} from "../quant/bnb-checkpoint.js";
import {dequantize4bit, type QuantState4bit} from "../quant/nf4.js";
import {resolveModelDir} from "./models.js";

export interface ExportProgress {
    /** 0-based index of the tensor just written */
    index: number;
    count: number;
    name: string;
    type: string;
    bytes: number;
}

export interface ExportGgufOptions {
    /** Hugging Face model folder (default: the embedded tiny-qwen2) */
    modelDir?: string;
    /** a PEFT adapter folder to merge into the weights first */
    adapterDir?: string;
    outtype: GgufOuttype;
    /** the .gguf file to write */
    out: string;
    /** general.name (default: the model folder's name) */
    name?: string;
    /** tokenizer.ggml.pre, when the tokenizer's pre-tokenizer is not recognized */
    preTokenizer?: string;
    /** replace `out` when it is an existing GGUF file (never any other file) */
    overwrite?: boolean;
    onProgress?: (p: ExportProgress) => void;
}

export interface ExportGgufResult {
    file: string;
    arch: GgufArch;
    bytes: number;
    tensorCount: number;
    /** how many tensors got each ggml type, e.g. {F32: 33, Q4_K: 40, Q6_K: 9} */
    typeCounts: Record<string, number>;
}

/** writes a llama.cpp GGUF model from a Hugging Face folder (and optionally a PEFT adapter merged into it) */
export async function exportGguf(opts: ExportGgufOptions): Promise<ExportGgufResult> {
    if (!GGUF_OUTTYPES.includes(opts.outtype))
        throw new QloraError(`--outtype ${quoteValue(opts.outtype)} is not one of ${GGUF_OUTTYPES.join(", ")}`);
    const dir = resolveModelDir(opts.modelDir);
    await assertGgufOutput(opts.out, opts.overwrite, [
        {path: dir, what: "model folder"},
        ...(opts.adapterDir ? [{path: opts.adapterDir, what: "adapter folder"}] : [])
    ]);
    const cfg = await loadModelConfig(dir);
    const arch = ggufArchFor(cfg);
    // everything that can be checked without the weights is checked before they are read
    const vocab = await readGgufVocab(dir, {vocabSize: cfg.vocabSize, preTokenizer: opts.preTokenizer});
    const ropeFactors = arch === "llama" ? llama3RopeFactors(cfg) : null;
    addArchMetadataCheck(cfg, arch);

    // weights are read one tensor at a time when the writer needs them: memory stays at about one tensor
    const weights = await openWeights(dir, cfg);
    try {
        // the adapter is checked against the config's shapes; its A/B (and trained biases) are merged per tensor
        const adapter = opts.adapterDir
            ? await readAdapter(opts.adapterDir, cfg, {
                  checkConfig: (c) => {
                      if (c.modules_to_save?.length)
                          throw new QloraError(
                              "an adapter with modules_to_save (full lm_head / embed_tokens copies) cannot be merged " +
                                  "during GGUF export; run qlora merge first and export the merged model",
                              {file: opts.adapterDir}
                          );
                      if (c.use_dora)
                          throw new QloraError(
                              "a DoRA adapter cannot be merged during GGUF export; run qlora merge first and export " +
                                  "the merged model",
                              {file: opts.adapterDir}
                          );
                  }
              })
            : null;

        const md = new GgufMetadata();
        md.string("general.architecture", arch);
        md.string("general.type", "model");
        md.string("general.name", opts.name ?? modelName(cfg, dir));
        md.u32("general.file_type", GGUF_FILE_TYPE[opts.outtype]);
        md.u32("general.quantization_version", 2);
        addArchMetadata(md, cfg, arch);
        addVocabMetadata(md, vocab);

        const tied = cfg.tieWordEmbeddings;
        const ctx = {blockCount: cfg.numHiddenLayers, tiedEmbeddings: tied};
        const C = cfg.hiddenSize;
        const tensors: GgufTensor[] = [];
        const typeCounts: Record<string, number> = {};
        // `rows` rows of `cols` values; `values` is called only when the writer reaches the tensor
        const add = (name: string, rows: number, cols: number, values: () => Promise<Float32Array>) => {
            const ne = rows === 1 ? [cols] : [cols, rows];
            const type = tensorTypeFor(name, ne, opts.outtype, ctx);
            typeCounts[ggmlTypeName(type)] = (typeCounts[ggmlTypeName(type)] ?? 0) + 1;
            tensors.push({name, type, ne, data: async () => encodeTensor(type, await values(), cols, rows)});
        };

        add("token_embd.weight", cfg.vocabSize, C, () => weights.read("model.embed_tokens.weight", cfg.vocabSize * C));
        for (let l = 0; l < cfg.numHiddenLayers; l++) {
            add(`blk.${l}.attn_norm.weight`, 1, C, () => weights.read(`model.layers.${l}.input_layernorm.weight`, C));
            for (const p of PROJ_NAMES) {
                if (p === "gate_proj")
                    add(`blk.${l}.ffn_norm.weight`, 1, C, () =>
                        weights.read(`model.layers.${l}.post_attention_layernorm.weight`, C)
                    );
                const [outF, inF] = projShape(cfg, p);
                const module = projModule(l, p);
                const heads = permutationHeads(arch, cfg, p);
                const base = `blk.${l}.${GGUF_PROJ_NAMES[p]}`;
                const branch = adapter?.branches.get(module);
                add(`${base}.weight`, outF, inF, async () => {
                    const w = await weights.read(`${module}.weight`, outF * inF);
                    // W + scaling·B·A (in place: `w` is a fresh array)
                    if (branch) addDeltaWeight(w, branch, outF, inF);
                    return heads ? permuteQkRows(w, heads, inF) : w;
                });
                if (projHasBias(cfg, p)) {
                    add(`${base}.bias`, 1, outF, async () => {
                        // a bias the adapter trained replaces the checkpoint's
                        const b = adapter?.biases.get(`${module}.bias`) ?? (await weights.read(`${module}.bias`, outF));
                        return heads ? permuteQkRows(b, heads, 1) : b;
                    });
                }
            }
        }
        add("output_norm.weight", 1, C, () => weights.read("model.norm.weight", C));
        if (!tied) add("output.weight", cfg.vocabSize, C, () => weights.read("lm_head.weight", cfg.vocabSize * C));
        if (ropeFactors) add("rope_freqs.weight", 1, ropeFactors.length, async () => ropeFactors);

        const written = await writeGguf(
            opts.out,
            {metadata: md, tensors},
            {
                onTensor: (index, tensor, bytes) =>
                    opts.onProgress?.({index, count: tensors.length, name: tensor.name, type: ggmlTypeName(tensor.type), bytes})
            }
        );
        return {file: written.file, arch, bytes: written.bytes, tensorCount: written.tensorCount, typeCounts};
    } finally {
        await weights.close();
    }
}

/**
 * `out` must not be, or contain, an input folder or any file in one but a GGUF (the weights, config.json, the
 * tokenizer: it may sit beside them), and an existing `out` is replaced only with `overwrite` and only when it is a
 * GGUF file. Checked before anything is read, so a refused export is quick.
 */
async function assertGgufOutput(
    out: string,
    overwrite: boolean | undefined,
    folders: {path: string; what: string}[]
): Promise<void> {
    const inputs = [...folders];
    for (const folder of folders) {
        const names = await fs.readdir(folder.path).catch(() => [] as string[]); // a missing folder is reported later
        for (const name of names)
            if (!name.endsWith(".gguf")) inputs.push({path: path.join(folder.path, name), what: `${name} of the ${folder.what}`});
    }
    await assertOutputSeparate(out, inputs);
    await assertFileOutput(out, {overwrite: overwrite ?? false, looksOwned: hasGgufMagic, what: "a GGUF file"});
}

interface WeightSource {
    /** one tensor as f32 (4-bit weights dequantized); `numel` is checked */
    read(name: string, numel: number): Promise<Float32Array>;
    close(): Promise<void>;
}

/** the checkpoint of a model folder, shape-checked against config.json; bitsandbytes 4-bit folders too */
async function openWeights(dir: string, cfg: ModelConfig): Promise<WeightSource> {
    let states = new Map<string, QuantState4bit>();
    if (cfg.quantizationConfig) {
        const bnb = await loadBnb4bitCheckpoint(dir);
        await bnb.ckpt.close();
        states = bnb.states;
    }
    const ckpt = await openCheckpoint(dir, cfg, new Set(states.keys()));
    return {
        async read(name: string, numel: number): Promise<Float32Array> {
            const state = states.get(name);
            const values = state ? dequantize4bit(state) : await readTensorF32(ckpt, name);
            if (values.length !== numel)
                throw new QloraError(`tensor "${name}" has ${values.length} values, but config.json implies ${numel}`, {
                    file: dir
                });
            return values;
        },
        close: () => ckpt.close()
    };
}
/** fails early on configs whose metadata cannot be written (rope types llama.cpp lacks) */
function addArchMetadataCheck(cfg: ModelConfig, arch: GgufArch): void {
    addArchMetadata(new GgufMetadata(), cfg, arch);
}

function modelName(cfg: ModelConfig, dir: string): string {
    const named = cfg.raw._name_or_path;
    const name = typeof named === "string" && named ? path.basename(named) : path.basename(dir);
    return name || "model";
}

// ------------------------------------------------------------------
// LoRA adapter GGUF (SPEC-gguf §9)

export type GgufLoraOuttype = "f32" | "f16";

export interface ExportGgufLoraOptions {
    adapterDir: string;
    /** the base model the adapter was trained on (only config.json is read) */
    modelDir?: string;
    out: string;
    /** f32 (default, as convert_lora_to_gguf) or f16 */
    outtype?: GgufLoraOuttype;
    name?: string;
    /** replace `out` when it is an existing GGUF file (never any other file) */
    overwrite?: boolean;
    onProgress?: (p: ExportProgress) => void;
}

export interface ExportGgufLoraResult {
    file: string;
    arch: GgufArch;
    bytes: number;
    tensorCount: number;
    /** adapter.lora.alpha as written (lora_alpha, or lora_alpha·√r for rsLoRA) */
    alpha: number;
    r: number;
}

/** writes a PEFT LoRA adapter as a llama.cpp LoRA GGUF for the base model in modelDir */
export async function exportGgufLora(opts: ExportGgufLoraOptions): Promise<ExportGgufLoraResult> {
    const outtype = opts.outtype ?? "f32";
    if (outtype !== "f32" && outtype !== "f16")
        throw new QloraError(`--outtype ${quoteValue(outtype)} is not one of f32, f16 for a LoRA adapter`);
    const dir = resolveModelDir(opts.modelDir);
    await assertGgufOutput(opts.out, opts.overwrite, [
        {path: opts.adapterDir, what: "adapter folder"},
        {path: dir, what: "model folder"}
    ]);
    const cfg = await loadModelConfig(dir);
    const arch = ggufArchFor(cfg);
    const adapter = await readAdapter(opts.adapterDir, cfg, {
        checkConfig: (c) => {
            if (c.bias !== "none")
                throw new QloraError(
                    `the adapter trains biases (bias: "${c.bias}"), which a llama.cpp LoRA adapter ` +
                        "cannot carry; merge it into the model instead: qlora export gguf --adapter",
                    {file: opts.adapterDir}
                );
            if (c.modules_to_save?.length)
                throw new QloraError(
                    "llama.cpp LoRA adapters cannot carry full module copies (modules_to_save); merge the adapter " +
                        "(qlora merge) and export the merged model instead",
                    {file: opts.adapterDir}
                );
            if (c.use_dora)
                throw new QloraError(
                    "llama.cpp LoRA adapters cannot express DoRA; merge the adapter (qlora merge) and export " +
                        "the merged model instead",
                    {file: opts.adapterDir}
                );
        }
    });

    const r = adapter.config.r;
    const alpha = adapter.config.use_rslora ? adapter.config.lora_alpha * Math.sqrt(r) : adapter.config.lora_alpha;
    const md = new GgufMetadata();
    md.string("general.architecture", arch);
    md.string("general.type", "adapter");
    md.string("general.name", opts.name ?? path.basename(path.resolve(opts.adapterDir)));
    md.u32("general.quantization_version", 2);
    md.string("adapter.type", "lora");
    md.f32("adapter.lora.alpha", alpha);

    const type = outtype === "f16" ? GgmlType.F16 : GgmlType.F32;
    const tensors: GgufTensor[] = [];
    for (const module of [...adapter.branches.keys()].sort(compareModules)) {
        const {A, B, r: rank, inFeatures: K, outFeatures: N} = adapter.branches.get(module)!;
        const name = ggufNameOfModule(module);
        if (!name) throw new QloraError(`the adapter targets ${module}, which has no GGUF tensor`, {file: opts.adapterDir});
        const proj = module.slice(module.lastIndexOf(".") + 1);
        const heads = permutationHeads(arch, cfg, proj);
        // lora_A [r, in] → ne [in, r]; lora_B [out, r] → ne [r, out]; bytes unchanged, B's rows permuted for llama q/k
        tensors.push({name: `${name}.lora_a`, type, ne: [K, rank], data: () => encodeTensor(type, A, K, rank)});
        tensors.push({
            name: `${name}.lora_b`,
            type,
            ne: [rank, N],
            data: () => encodeTensor(type, heads ? permuteQkRows(B, heads, rank) : B, rank, N)
        });
    }
    const written = await writeGguf(
        opts.out,
        {metadata: md, tensors},
        {
            onTensor: (index, tensor, bytes) =>
                opts.onProgress?.({index, count: tensors.length, name: tensor.name, type: ggmlTypeName(tensor.type), bytes})
        }
    );
    return {file: written.file, arch, bytes: written.bytes, tensorCount: written.tensorCount, alpha, r};
}

/** layer order, then the projection order of a block */
function compareModules(a: string, b: string): number {
    const key = (m: string) => {
        const match = /^model\.layers\.(\d+)\.\w+\.(\w+)$/.exec(m);
        return match ? Number(match[1]) * 16 + PROJ_NAMES.indexOf(match[2] as ProjName) : 0;
    };
    return key(a) - key(b);
}
