// gguf-model.ts: a Hugging Face model folder (optionally with a PEFT adapter merged in f32 first: W + scaling·B·A)
// to a llama.cpp GGUF model (f32, f16, q8_0 or q4_k_m). The pipeline is SPEC-gguf §8: map names, permute llama's
// q/k rows (gemma3: add the norms' 1, fold query_pre_attn_scalar into q's norm), choose a type per tensor, quantize,
// write (streamed tensor by tensor; temporary name, then rename).
import path from "node:path";
import {QloraError} from "../errors.js";
import {loadModelConfig, type ModelConfig} from "../io/hf-config.js";
import {GgufMetadata, type GgufTensor} from "../io/gguf.js";
import {encodeTensor, GGUF_FILE_TYPE, ggmlTypeName, tensorTypeFor, type GgufOuttype} from "../io/gguf-quants.js";
import {addVocabMetadata, readChatTemplateFile, readGgufVocab} from "../io/gguf-vocab.js";
import {addDeltaWeight} from "../lora/layer.js";
import {
    layerNormNames,
    openCheckpoint,
    projHasBias,
    projModule,
    projNames,
    projShape,
    qkNormNames,
    readTensorF32
} from "../model/weights.js";
import {readAdapter} from "../peft/adapter-files.js";
import {templateSizeProblem} from "../tokenizer/bounded-template.js";
import {loadBnb4bitCheckpoint} from "../quant/bnb-checkpoint.js";
import {dequantize4bit, type QuantState4bit} from "../quant/nf4.js";
import {
    addArchMetadata,
    GGUF_PROJ_NAMES,
    gemma3EmbedScaleNote,
    gemma3QueryNormScale,
    ggufArchFor,
    ggufQkNormNames,
    ggufSandwichNormNames,
    ggufWindowNote,
    llama3RopeFactors,
    phi3NameProblem,
    phi3RopeFactors,
    permutationHeads,
    permuteQkRows,
    type GgufArch
} from "./gguf-metadata.js";
import {assertGgufOutput, type ExportProgress, writeGgufReporting} from "./gguf-output.js";

export interface ModelToGgufOptions {
    /** the Hugging Face model folder, resolved and known to exist */
    modelDir: string;
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
    /** what llama.cpp will do otherwise than the model (ggufWindowNote, gemma3EmbedScaleNote), one sentence each */
    notes: string[];
}

/** writes a llama.cpp GGUF model from a Hugging Face folder (and optionally a PEFT adapter merged into it) */
export async function exportModelToGguf(opts: ModelToGgufOptions): Promise<ExportGgufResult> {
    const dir = opts.modelDir;
    await assertGgufOutput(opts.out, opts.overwrite, [
        {path: dir, what: "model folder"},
        ...(opts.adapterDir ? [{path: opts.adapterDir, what: "adapter folder"}] : [])
    ]);
    const cfg = await loadModelConfig(dir);
    const arch = ggufArchFor(cfg);
    // everything that can be checked without the weights is checked before they are read
    const vocab = await readGgufVocab(dir, {vocabSize: cfg.vocabSize, preTokenizer: opts.preTokenizer});
    // a fine-tune prompts as it was trained: the adapter's training format replaces the base's template
    const trainedFormat = opts.adapterDir ? await readChatTemplateFile(opts.adapterDir) : null;
    if (trainedFormat !== null) vocab.chatTemplate = trainedFormat;
    // the chat template goes into the file as it is: the limit that rendering applies holds here too
    for (const [name, text] of [["chat_template", vocab.chatTemplate], ...vocab.namedChatTemplates] as const) {
        const tooLong = text === null ? null : templateSizeProblem(text);
        if (tooLong) throw new QloraError(`${name} ${tooLong}`, {file: path.join(dir, "tokenizer_config.json")});
    }
    const name = opts.name ?? modelName(cfg, dir);
    const badName = arch === "phi3" ? phi3NameProblem(name, vocab.tokens) : null;
    if (badName) throw new QloraError(badName);
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
        md.string("general.name", name);
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

        // Gemma3RMSNorm multiplies by (1 + w) and llama.cpp by the weight itself: the 1 is added in f32, as the
        // converter does and as qlora's loader does
        const readNorm = async (name: string, n: number) => {
            const w = await weights.read(name, n);
            if (cfg.rmsNormUnitOffset) for (let i = 0; i < n; i++) w[i] += 1;
            return w;
        };
        // gemma3: query_pre_attn_scalar folded into q's norm (gemma3QueryNormScale)
        const qNormScale = arch === "gemma3" ? gemma3QueryNormScale(cfg) : 1;

        add("token_embd.weight", cfg.vocabSize, C, () => weights.read("model.embed_tokens.weight", cfg.vocabSize * C));
        for (let l = 0; l < cfg.numHiddenLayers; l++) {
            const norms = layerNormNames(cfg, l);
            add(`blk.${l}.attn_norm.weight`, 1, C, () => readNorm(norms.input, C));
            if (cfg.qkNorm) {
                const hf = qkNormNames(l),
                    gg = ggufQkNormNames(l);
                add(gg.q, 1, cfg.headDim, async () => {
                    const w = await readNorm(hf.q, cfg.headDim);
                    if (qNormScale !== 1) for (let i = 0; i < w.length; i++) w[i] *= qNormScale;
                    return w;
                });
                add(gg.k, 1, cfg.headDim, () => readNorm(hf.k, cfg.headDim));
            }
            const sandwich = ggufSandwichNormNames(l);
            if (norms.attnOut) {
                const name = norms.attnOut;
                add(sandwich.attnOut, 1, C, () => readNorm(name, C));
            }
            for (const p of projNames(cfg)) {
                if (p === "gate_proj" || p === "gate_up_proj")
                    add(`blk.${l}.ffn_norm.weight`, 1, C, () => readNorm(norms.preMlp, C));
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
            if (norms.mlpOut) {
                const name = norms.mlpOut;
                add(sandwich.mlpOut, 1, C, () => readNorm(name, C));
            }
        }
        add("output_norm.weight", 1, C, () => readNorm("model.norm.weight", C));
        if (!tied) add("output.weight", cfg.vocabSize, C, () => weights.read("lm_head.weight", cfg.vocabSize * C));
        if (ropeFactors) add("rope_freqs.weight", 1, ropeFactors.length, async () => ropeFactors);
        const longrope = arch === "phi3" ? phi3RopeFactors(cfg) : null;
        if (longrope) {
            add("rope_factors_long.weight", 1, longrope.long.length, async () => longrope.long);
            add("rope_factors_short.weight", 1, longrope.short.length, async () => longrope.short);
        }

        const written = await writeGgufReporting(opts.out, {metadata: md, tensors}, opts.onProgress);
        const notes = [ggufWindowNote(cfg, arch), arch === "gemma3" ? gemma3EmbedScaleNote(cfg) : null].filter(
            (n): n is string => n !== null
        );
        return {file: written.file, arch, bytes: written.bytes, tensorCount: written.tensorCount, typeCounts, notes};
    } finally {
        await weights.close();
    }
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
