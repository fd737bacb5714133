// gguf-lora.ts: a PEFT LoRA adapter alone as a llama.cpp LoRA GGUF (SPEC-gguf §9), to apply on top of the base
// model's GGUF: lora_a / lora_b per targeted projection, llama's q/k rows permuted in B as in the base model.
import path from "node:path";
import {QloraError} from "../errors.js";
import {loadModelConfig} from "../io/hf-config.js";
import {GgufMetadata, type GgufTensor} from "../io/gguf.js";
import {encodeTensor, GgmlType} from "../io/gguf-quants.js";
import {projNames, type ProjName} from "../model/weights.js";
import {readAdapter} from "../peft/adapter-files.js";
import {ggufArchFor, ggufNameOfModule, permutationHeads, permuteQkRows, type GgufArch} from "./gguf-metadata.js";
import {assertGgufOutput, type ExportProgress, writeGgufReporting} from "./gguf-output.js";

export type GgufLoraOuttype = "f32" | "f16";

export interface AdapterToGgufOptions {
    adapterDir: string;
    /** the base model the adapter was trained on, resolved and known to exist (only config.json is read) */
    modelDir: string;
    out: string;
    outtype: GgufLoraOuttype;
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
export async function exportAdapterToGguf(opts: AdapterToGgufOptions): Promise<ExportGgufLoraResult> {
    const dir = opts.modelDir;
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

    const type = opts.outtype === "f16" ? GgmlType.F16 : GgmlType.F32;
    const tensors: GgufTensor[] = [];
    for (const module of [...adapter.branches.keys()].sort(moduleOrder(projNames(cfg)))) {
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
    const written = await writeGgufReporting(opts.out, {metadata: md, tensors}, opts.onProgress);
    return {file: written.file, arch, bytes: written.bytes, tensorCount: written.tensorCount, alpha, r};
}

/** layer order, then the projection order of a block (`names`: the model's projections) */
function moduleOrder(names: readonly ProjName[]): (a: string, b: string) => number {
    const key = (m: string) => {
        const match = /^model\.layers\.(\d+)\.\w+\.(\w+)$/.exec(m);
        return match ? Number(match[1]) * 16 + names.indexOf(match[2] as ProjName) : 0;
    };
    return (a, b) => key(a) - key(b);
}
