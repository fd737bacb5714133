// formats.ts: how a case of each format is built. A case copies seed files into its own folder, mutates one or
// more of them, and names the qlora code that reads them (`kind`, run by the worker), the paths that code may
// write, and the `qlora` command line that reads the same files end to end.
import {spawnSync} from "node:child_process";
import {promises as fs} from "node:fs";
import path from "node:path";
import {gunzipSync, gzipSync} from "node:zlib";
import {parse as parseYaml} from "yaml";
import {
    harvest,
    mutateBytes,
    mutateJson,
    mutateJsonl,
    mutateSafetensors,
    mutateTemplate,
    mutateYaml,
    tryParseJson,
    type Dictionary
} from "./mutators.js";
import {type ParquetColumn, writeParquet, type ParquetLies} from "../helpers/parquet-writer.js";
import type {FuzzRng} from "./rng.js";
import {TINY_MODEL, type Seeds} from "./seeds.js";

/** what the worker runs (test/fuzz/targets.ts) */
export type TargetKind =
    | "load-model"
    | "load-adapter"
    | "resume"
    | "export-gguf"
    | "export-gguf-lora"
    | "load-dataset"
    | "tokenizer"
    | "train-config"
    // the harness's own test: each way a case can end
    | "probe-hang"
    | "probe-alloc"
    | "probe-abort"
    | "probe-throw"
    | "probe-escape"
    | "probe-qlora-error";

export interface CaseSpec {
    format: string;
    index: number;
    /** which seed the case started from, for the report */
    variant: string;
    kind: TargetKind;
    params: Record<string, unknown>;
    /** what was done to the seed files (the reproducer) */
    mutations: string[];
    /** paths (relative to the case folder) the code may create or replace; anything else must stay as it was */
    writes: RegExp[];
    /** output files that must exist when the run succeeds */
    expectOutputs: string[];
    /** arguments of `qlora` for the end-to-end run of the same files */
    cli: string[];
}

export interface BuildContext {
    seeds: Seeds;
    rng: FuzzRng;
    /** the case's own empty folder */
    dir: string;
    index: number;
    /** false for the control case: the seed files exactly as written, which must load */
    mutate: boolean;
}

export interface FormatDef {
    name: string;
    description: string;
    build(ctx: BuildContext): Promise<CaseSpec>;
}

// ------------------------------------------------------------------
// helpers

type Mutator = "json" | "jsonl" | "safetensors" | "yaml" | "template" | "bytes";

/** copies a seed folder; the copies are writable whatever the source's mode (the shared model is read-only) */
async function copyInto(from: string, to: string): Promise<void> {
    await fs.cp(from, to, {recursive: true});
    const makeWritable = async (p: string): Promise<void> => {
        const st = await fs.lstat(p);
        if (st.isDirectory()) {
            await fs.chmod(p, 0o755);
            for (const n of await fs.readdir(p)) await makeWritable(path.join(p, n));
        } else if (st.isFile()) await fs.chmod(p, 0o644);
    };
    await makeWritable(to);
}

const dictionaries = new Map<string, Dictionary>();

/** the replacement material for a file: its own keys and values plus the format's known names */
function dictionaryFor(id: string, value: unknown, extraKeys: readonly string[], extraStrings: readonly string[]): Dictionary {
    let d = dictionaries.get(id);
    if (!d) {
        d = harvest(value, extraKeys, extraStrings);
        dictionaries.set(id, d);
    }
    return d;
}

const CONFIG_KEYS = [
    "rope_scaling",
    "rope_parameters",
    "quantization_config",
    "torch_dtype",
    "dtype",
    "head_dim",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "sliding_window",
    "use_sliding_window",
    "partial_rotary_factor",
    "rope_theta",
    "max_position_embeddings",
    "num_key_value_heads",
    "text_config",
    "pretraining_tp",
    "tie_word_embeddings",
    "vocab_size",
    "rms_norm_eps",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "eos_token_id",
    "bos_token_id",
    "pad_token_id",
    "model_type",
    "architectures",
    "factor",
    "rope_type",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
    "short_factor",
    "long_factor",
    "attention_factor",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "quant_method",
    "bnb_4bit_use_double_quant"
];
const CONFIG_STRINGS = [
    "llama",
    "mistral",
    "qwen2",
    "gpt2",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "bfloat16",
    "float16",
    "float32",
    "float8_e4m3fn",
    "torch.bfloat16",
    "yarn",
    "llama3",
    "linear",
    "dynamic",
    "longrope",
    "default",
    "silu",
    "gelu",
    "relu",
    "bitsandbytes",
    "nf4",
    "fp4",
    "gptq",
    "full_attention",
    "sliding_attention"
];
const TOKENIZER_KEYS = [
    "chat_template",
    "eos_token",
    "pad_token",
    "bos_token",
    "unk_token",
    "added_tokens_decoder",
    "model_max_length",
    "additional_special_tokens",
    "extra_special_tokens",
    "add_bos_token",
    "add_eos_token",
    "tokenizer_class",
    "clean_up_tokenization_spaces",
    "padding_side",
    "content",
    "special",
    "lstrip",
    "rstrip",
    "normalized",
    "single_word",
    "split_special_tokens"
];
const TOKENIZER_STRINGS = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<unk>",
    "</s>",
    "<s>",
    "[PAD]",
    "left",
    "right",
    "PreTrainedTokenizerFast",
    "LlamaTokenizer",
    "BPE",
    "WordPiece",
    "Unigram",
    "ByteLevel",
    "{{ bos_token }}"
];
const ADAPTER_KEYS = [
    "r",
    "lora_alpha",
    "target_modules",
    "peft_type",
    "use_dora",
    "use_rslora",
    "modules_to_save",
    "bias",
    "lora_dropout",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "task_type",
    "base_model_name_or_path",
    "target_parameters",
    "exclude_modules",
    "inference_mode"
];
const ADAPTER_STRINGS = [
    "LORA",
    "PREFIX_TUNING",
    "IA3",
    "all-linear",
    ".*",
    ".*q_proj",
    "q_proj",
    "lm_head",
    "embed_tokens",
    "CAUSAL_LM",
    "SEQ_CLS",
    "gaussian",
    "pissa",
    "olora",
    "loftq",
    "none",
    "all",
    "lora_only",
    "model.layers.0.self_attn.q_proj"
];
const DATA_KEYS = [
    "instruction",
    "input",
    "output",
    "text",
    "prompt",
    "completion",
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "system",
    "input_ids",
    "labels",
    "tools",
    "chosen",
    "rejected",
    "history",
    "data",
    "train"
];
const DATA_STRINGS = [
    "user",
    "assistant",
    "system",
    "human",
    "gpt",
    "tool",
    "function",
    "observation",
    "bogus_role",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "### 回答:"
];
const STATE_KEYS = [
    "global_step",
    "epoch",
    "max_steps",
    "log_history",
    "qlora_log_accumulator",
    "num_input_tokens_seen",
    "train_batch_size",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "best_metric",
    "best_model_checkpoint",
    "lossSum",
    "steps",
    "tokens",
    "dropout",
    "loader",
    "rngState",
    "index",
    "last_epoch",
    "step",
    "_step_count",
    "base_lrs"
];

/** share of a file's mutations that are plain byte edits whatever the file's structure */
const BYTES_SHARE = 0.15;
/** share of mutated files replaced by a FIFO, a folder, a device link, a sparse giant, ... */
const SPECIAL_SHARE = 0.04;

/** one to three mutations of one family (with byte edits mixed in) applied to a file of the case */
async function mutateFile(
    ctx: BuildContext,
    rel: string,
    mutator: Mutator,
    dict: Dictionary | null,
    log: string[]
): Promise<void> {
    const file = path.join(ctx.dir, rel);
    if (!ctx.mutate) return;
    if (ctx.rng.chance(SPECIAL_SHARE)) {
        await replaceWithSpecial(file, ctx.rng, log, rel);
        return;
    }
    let buf: Buffer = await fs.readFile(file);
    const n = ctx.rng.count(3);
    for (let i = 0; i < n; i++) {
        const sub: string[] = [];
        if (mutator === "bytes" || ctx.rng.chance(BYTES_SHARE)) buf = mutateBytes(buf, ctx.rng, sub);
        else if (mutator === "json") buf = mutateJson(buf, ctx.rng, dict!, sub);
        else if (mutator === "jsonl") buf = mutateJsonl(buf, ctx.rng, dict!, sub);
        else if (mutator === "safetensors") buf = mutateSafetensors(buf, ctx.rng, sub);
        else if (mutator === "yaml") buf = mutateYaml(buf, ctx.rng, dict!, sub);
        else buf = Buffer.from(mutateTemplate(buf.toString("utf8"), ctx.rng, sub));
        log.push(...sub.map((s) => `${rel}: ${s}`));
    }
    await fs.writeFile(file, buf);
}

/** a file that is not a regular file of sane size: qlora must refuse it, not block or read it whole */
async function replaceWithSpecial(file: string, rng: FuzzRng, log: string[], rel: string): Promise<void> {
    const kind = rng.pick([
        "fifo",
        "folder",
        "empty",
        "/dev/zero",
        "/dev/urandom",
        "/dev/null",
        "dangling link",
        "link loop",
        "sparse 1.5 GB",
        "sparse 5 GB"
    ] as const);
    await fs.rm(file, {recursive: true, force: true});
    if (kind === "fifo") {
        const r = spawnSync("mkfifo", [file]);
        if (r.status !== 0) throw new Error(`mkfifo failed: ${r.stderr}`);
    } else if (kind === "folder") await fs.mkdir(file);
    else if (kind === "empty") await fs.writeFile(file, "");
    else if (kind.startsWith("/dev/")) await fs.symlink(kind, file);
    else if (kind === "dangling link") await fs.symlink(path.join(path.dirname(file), "no-such-file"), file);
    else if (kind === "link loop") await fs.symlink(path.basename(file), file);
    else {
        const h = await fs.open(file, "w");
        await h.truncate(kind === "sparse 1.5 GB" ? 1.5 * 2 ** 30 : 5 * 2 ** 30);
        await h.close();
    }
    log.push(
        `${rel}: replaced by ${kind === "fifo" ? "a FIFO" : kind === "folder" ? "a folder" : kind.startsWith("/dev/") ? `a link to ${kind}` : `a ${kind} file`}`
    );
}

const GENERATE = ["--prompt", "hi", "--greedy", "--max-new-tokens", "2"];
const RESUME_WRITES = [/^checkpoint-3(\/|$)/, /^final(\/|$)/, /^metrics\.jsonl$/, /^report\.html$/];

function resumeCase(ctx: BuildContext): {params: Record<string, unknown>; cli: string[]} {
    const config = {...ctx.seeds.runConfig, output_dir: ctx.dir, resume_from_checkpoint: true};
    return {
        params: {config},
        cli: ["train", ...ctx.seeds.runFlags, "--output_dir", ctx.dir, "--resume_from_checkpoint", "true"]
    };
}

async function jsonDict(id: string, file: string, keys: readonly string[], strings: readonly string[]): Promise<Dictionary> {
    const cached = dictionaries.get(id);
    if (cached) return cached;
    const parsed = tryParseJson(await fs.readFile(file));
    return dictionaryFor(id, parsed.ok ? parsed.value : null, keys, strings);
}

// ------------------------------------------------------------------
// the formats

const safetensors: FormatDef = {
    name: "safetensors",
    description: "model shards, sharded index, adapter and optimizer state files: header fields, length word, data",
    async build(ctx) {
        const log: string[] = [];
        const variant = ctx.rng.weighted([
            [3, "model"],
            [2, "sharded"],
            [3, "adapter"],
            [1, "optimizer"],
            [0.5, "tiny-qwen2"]
        ] as const);
        if (variant === "model" || variant === "sharded" || variant === "tiny-qwen2") {
            // tiny-qwen2: the real 21 MB checkpoint, now and then (its load costs about 0.5 s)
            await copyInto(
                variant === "model" ? ctx.seeds.small : variant === "sharded" ? ctx.seeds.sharded : TINY_MODEL,
                ctx.dir
            );
            const files = (await fs.readdir(ctx.dir)).filter((f) => f.endsWith(".safetensors")).sort();
            if (variant === "sharded" && ctx.rng.chance(0.25)) {
                const index = "model.safetensors.index.json";
                await mutateFile(ctx, index, "json", await jsonDict("index", path.join(ctx.dir, index), [], files), log);
            } else await mutateFile(ctx, ctx.rng.pick(files), "safetensors", null, log);
            return {
                format: "safetensors",
                index: ctx.index,
                variant,
                kind: "load-model",
                params: {model: ctx.dir},
                mutations: log,
                writes: [],
                expectOutputs: [],
                cli: ["generate", "--model", ctx.dir, ...GENERATE]
            };
        }
        if (variant === "adapter") {
            await copyInto(ctx.rng.chance(0.7) ? ctx.seeds.adapter : ctx.seeds.adapterDora, ctx.dir);
            await mutateFile(ctx, "adapter_model.safetensors", "safetensors", null, log);
            return {
                format: "safetensors",
                index: ctx.index,
                variant,
                kind: "load-adapter",
                params: {adapter: ctx.dir, model: ctx.seeds.small},
                mutations: log,
                writes: [],
                expectOutputs: [],
                cli: ["generate", "--model", ctx.seeds.small, "--adapter", ctx.dir, ...GENERATE]
            };
        }
        await copyInto(ctx.seeds.run, ctx.dir);
        await mutateFile(ctx, "checkpoint-2/optimizer.safetensors", "safetensors", null, log);
        const {params, cli} = resumeCase(ctx);
        return {
            format: "safetensors",
            index: ctx.index,
            variant,
            kind: "resume",
            params,
            mutations: log,
            writes: RESUME_WRITES,
            expectOutputs: ["final/adapter_model.safetensors"],
            cli
        };
    }
};

const gguf: FormatDef = {
    name: "gguf",
    description:
        "GGUF export (qlora writes GGUF, it reads none): mutated model, tokenizer (SentencePiece's tokenizer.model too) and adapter inputs; the .gguf written must parse",
    async build(ctx) {
        const log: string[] = [];
        const model = path.join(ctx.dir, "model"),
            adapter = path.join(ctx.dir, "adapter"),
            outDir = path.join(ctx.dir, "out");
        if (ctx.rng.chance(0.2)) {
            // the SentencePiece vocabulary: tokenizer.model read by qlora's protobuf reader and checked against
            // tokenizer.json; without it, the scores derived from tokenizer.json's merges
            await copyInto(ctx.seeds.spm, model);
            const withoutModel = ctx.rng.chance(0.25);
            if (withoutModel && ctx.mutate) await fs.rm(path.join(model, "tokenizer.model"));
            const target = ctx.rng.weighted([
                [withoutModel ? 0 : 50, "tokenizer.model"],
                [withoutModel ? 60 : 25, "tokenizer.json"],
                [withoutModel ? 40 : 25, "tokenizer_config.json"]
            ] as const);
            const rel = `model/${target}`;
            if (target === "tokenizer.model") await mutateFile(ctx, rel, "bytes", null, log);
            else
                await mutateFile(
                    ctx,
                    rel,
                    "json",
                    await jsonDict(`gguf-spm:${target}`, path.join(ctx.dir, rel), TOKENIZER_KEYS, TOKENIZER_STRINGS),
                    log
                );
            const outtype = ctx.rng.pick(["f32", "f16", "q8_0"]);
            const out = path.join(outDir, "model.gguf");
            return {
                format: "gguf",
                index: ctx.index,
                variant: withoutModel ? "spm-without-model" : "spm",
                kind: "export-gguf",
                params: {model, adapter: null, outtype, out},
                mutations: withoutModel && ctx.mutate ? ["model/tokenizer.model: removed", ...log] : log,
                writes: [/^out(\/|$)/],
                expectOutputs: ["out/model.gguf"],
                cli: ["export", "gguf", "--model", model, "--out", out, "--outtype", outtype]
            };
        }
        if (ctx.rng.chance(0.6)) {
            await copyInto(ctx.seeds.small, model);
            const withAdapter = ctx.rng.chance(0.3);
            if (withAdapter) await copyInto(ctx.seeds.adapter, adapter);
            const target = ctx.rng.weighted([
                [25, "config.json"],
                [15, "tokenizer_config.json"],
                [10, "tokenizer.json"],
                [30, "model.safetensors"],
                ...(withAdapter
                    ? ([
                          [10, "adapter_config.json"],
                          [10, "adapter_model.safetensors"]
                      ] as const)
                    : [])
            ]);
            const rel = target.startsWith("adapter") ? `adapter/${target}` : `model/${target}`;
            if (target.endsWith(".safetensors")) await mutateFile(ctx, rel, "safetensors", null, log);
            else {
                const keys =
                    target === "config.json" ? CONFIG_KEYS : target === "adapter_config.json" ? ADAPTER_KEYS : TOKENIZER_KEYS;
                const strings =
                    target === "config.json"
                        ? CONFIG_STRINGS
                        : target === "adapter_config.json"
                          ? ADAPTER_STRINGS
                          : TOKENIZER_STRINGS;
                await mutateFile(ctx, rel, "json", await jsonDict(`gguf:${target}`, path.join(ctx.dir, rel), keys, strings), log);
            }
            const outtype = ctx.rng.pick(["f32", "f16", "q8_0", "q4_k_m"]);
            const out = path.join(outDir, "model.gguf");
            return {
                format: "gguf",
                index: ctx.index,
                variant: withAdapter ? "model+adapter" : "model",
                kind: "export-gguf",
                params: {model, adapter: withAdapter ? adapter : null, outtype, out},
                mutations: log,
                writes: [/^out(\/|$)/],
                expectOutputs: ["out/model.gguf"],
                cli: [
                    "export",
                    "gguf",
                    "--model",
                    model,
                    "--out",
                    out,
                    "--outtype",
                    outtype,
                    ...(withAdapter ? ["--adapter", adapter] : [])
                ]
            };
        }
        await fs.mkdir(model, {recursive: true});
        await fs.copyFile(path.join(ctx.seeds.small, "config.json"), path.join(model, "config.json"));
        // the LoRA seed only: a DoRA adapter with trained biases cannot be a llama.cpp LoRA (refused by design)
        await copyInto(ctx.seeds.adapter, adapter);
        const target = ctx.rng.weighted([
            [40, "adapter/adapter_config.json"],
            [40, "adapter/adapter_model.safetensors"],
            [20, "model/config.json"]
        ] as const);
        if (target.endsWith(".safetensors")) await mutateFile(ctx, target, "safetensors", null, log);
        else if (target === "model/config.json")
            await mutateFile(
                ctx,
                target,
                "json",
                await jsonDict("gguf:config", path.join(ctx.dir, target), CONFIG_KEYS, CONFIG_STRINGS),
                log
            );
        else
            await mutateFile(
                ctx,
                target,
                "json",
                await jsonDict("gguf:adapter", path.join(ctx.dir, target), ADAPTER_KEYS, ADAPTER_STRINGS),
                log
            );
        const outtype = ctx.rng.pick(["f32", "f16"]);
        const out = path.join(outDir, "lora.gguf");
        return {
            format: "gguf",
            index: ctx.index,
            variant: "lora",
            kind: "export-gguf-lora",
            params: {model, adapter, outtype, out},
            mutations: log,
            writes: [/^out(\/|$)/],
            expectOutputs: ["out/lora.gguf"],
            cli: ["export", "gguf-lora", "--adapter", adapter, "--model", model, "--out", out, "--outtype", outtype]
        };
    }
};

function dataOptions(rng: FuzzRng): Record<string, unknown> {
    const options: Record<string, unknown> = {max_seq_length: rng.pick([64, 64, 64, 16, 2048])};
    if (rng.chance(0.3)) options.packing = true;
    if (rng.chance(0.1)) options.dataset_format = rng.pick(["alpaca", "text", "prompt_completion", "messages", "sharegpt"]);
    if (rng.chance(0.05))
        options.template = rng.pick(["### {instruction}\n{output}", "{text}", "{missing}", "{", "{{instruction}}"]);
    return options;
}

function datasetCase(ctx: BuildContext, format: string, variant: string, file: string, log: string[]): CaseSpec {
    const options = ctx.mutate ? dataOptions(ctx.rng) : {max_seq_length: 64};
    return {
        format,
        index: ctx.index,
        variant,
        kind: "load-dataset",
        params: {data: file, options, tokenizer: ctx.seeds.small},
        mutations: log,
        writes: [],
        expectOutputs: [],
        cli: ["eval", "--data", file, "--model", ctx.seeds.small, "--max-seq-length", String(options.max_seq_length)]
    };
}

const datasetJson: FormatDef = {
    name: "dataset-json",
    description: "JSON array data sets (alpaca, messages, ShareGPT, text, prompt/completion)",
    async build(ctx) {
        const log: string[] = [];
        const seed = ctx.rng.pick(ctx.seeds.data.json);
        const rel = path.basename(seed);
        await fs.copyFile(seed, path.join(ctx.dir, rel));
        await mutateFile(ctx, rel, "json", await jsonDict(`data:${rel}`, seed, DATA_KEYS, DATA_STRINGS), log);
        return datasetCase(ctx, "dataset-json", rel, path.join(ctx.dir, rel), log);
    }
};

const datasetJsonl: FormatDef = {
    name: "dataset-jsonl",
    description: "JSONL data sets, plain and gzipped",
    async build(ctx) {
        const log: string[] = [];
        const gz = ctx.rng.chance(0.25);
        const seed = ctx.rng.pick(gz ? ctx.seeds.data.jsonlGz : ctx.seeds.data.jsonl);
        const rel = path.basename(seed);
        const file = path.join(ctx.dir, rel);
        await fs.copyFile(seed, file);
        const plainSeed = gz ? seed.slice(0, -3) : seed;
        const dict = await jsonDict(
            `data:${path.basename(plainSeed)}`,
            plainSeed.replace(/\.jsonl$/, ".json"),
            DATA_KEYS,
            DATA_STRINGS
        );
        if (gz && ctx.mutate && ctx.rng.chance(0.6)) {
            // mutate the text inside, then compress it again
            const inner = path.join(ctx.dir, "inner.jsonl");
            await fs.writeFile(inner, gunzipSync(await fs.readFile(file)));
            await mutateFile(ctx, "inner.jsonl", "jsonl", dict, log);
            const st = await fs.lstat(inner);
            if (st.isFile() && st.size < 64 * 2 ** 20) await fs.writeFile(file, gzipSync(await fs.readFile(inner)));
            else log.push(`${rel}: left as it was (the special file replaced the text inside only)`);
            await fs.rm(inner, {recursive: true, force: true});
        } else await mutateFile(ctx, rel, gz ? "bytes" : "jsonl", dict, log);
        return datasetCase(ctx, "dataset-jsonl", rel, file, log);
    }
};

const PARQUET_LIES: readonly (keyof ParquetLies)[] = [
    "uncompressedPageSize",
    "compressedPageSize",
    "numValues",
    "numRows",
    "dataPageOffset",
    "codec",
    "physicalType",
    "numChildren",
    "repetition",
    "footerLength",
    "dropMagic",
    "definitionLevelRun",
    "dictionaryIndexRun",
    "deltaPrefixLength"
];

/**
 * the seed columns written the ways Parquet writers write them: a column may be OPTIONAL (with some nulls),
 * dictionary-encoded, DELTA_BYTE_ARRAY (strings) and on a v2 page, so the lies and byte mutations reach the
 * level, dictionary and delta decoders, not only PLAIN pages
 */
function writtenColumns(rng: FuzzRng, columns: readonly ParquetColumn[], withNulls: boolean, log: string[]): ParquetColumn[] {
    return columns.map((c) => {
        const optional = rng.chance(0.3),
            encoding = rng.pick(["plain", "dictionary", "delta"] as const),
            v2 = rng.chance(0.3);
        const delta = encoding === "delta" && c.kind === "string";
        // nulls only where the case mutates: the control case's rows must load
        const nulls = withNulls && optional && rng.chance(0.5) ? Math.max(1, Math.round(c.values.length * 0.1)) : 0;
        const values = c.values.map((v, i) => (nulls > 0 && i % Math.ceil(c.values.length / nulls) === 0 ? null : v));
        if (optional || encoding !== "plain" || v2)
            log.push(
                `parquet: ${c.name} ${optional ? `optional (${nulls} nulls)` : "required"}, ${delta ? "delta" : encoding === "delta" ? "plain" : encoding}` +
                    `${v2 ? ", v2 page" : ""}`
            );
        return {...c, values, optional, dictionary: encoding === "dictionary", delta, v2} as ParquetColumn;
    });
}

function lieValue(rng: FuzzRng, lie: keyof ParquetLies): ParquetLies[keyof ParquetLies] {
    switch (lie) {
        case "codec":
            return rng.pick([0, 1, 2, 3, 4, 5, 6, 7, 99]);
        case "physicalType":
            return rng.pick([0, 1, 2, 3, 4, 5, 6, 7, 42]);
        case "numChildren":
            return rng.pick([0, 1, 5, 100, 2 ** 31 - 1, -1]);
        case "repetition":
            return rng.pick([1, 2, 7]);
        case "footerLength":
            return rng.pick([0, 1, 8, 100_000, 2 ** 31, 0xffffffff]);
        case "dropMagic":
            return rng.pick(["head", "tail"] as const);
        case "definitionLevelRun":
        case "dictionaryIndexRun":
        case "deltaPrefixLength":
            return rng.pick([0, 1, 7, 1000, 2 ** 20, 2 ** 31 - 1]);
        default:
            return rng.pick<number | bigint>([0, -1, 1, 3, 2 ** 31 - 1, 2 ** 31, 2 ** 40, 2n ** 62n, 1_000_000, 100_000_000]);
    }
}

const datasetParquet: FormatDef = {
    name: "dataset-parquet",
    description:
        "Parquet data sets (optional, dictionary, delta and v2 columns): lying footer fields (sizes, counts, offsets, " +
        "codec, types, level and index runs, delta prefixes) and byte mutations",
    async build(ctx) {
        const log: string[] = [];
        const columns = writtenColumns(ctx.rng, ctx.rng.pick(ctx.seeds.parquetColumns), ctx.mutate, log);
        const codec = ctx.rng.pick(["none", "gzip"] as const);
        const lies: ParquetLies = {};
        const structural = ctx.mutate && ctx.rng.chance(0.5);
        if (structural) {
            const n = ctx.rng.count(2);
            for (let i = 0; i < n; i++) {
                const lie = ctx.rng.pick(PARQUET_LIES);
                (lies as Record<string, unknown>)[lie] = lieValue(ctx.rng, lie);
            }
            log.push(`parquet: written with ${JSON.stringify(lies, (_, v) => (typeof v === "bigint" ? `${v}n` : v))}`);
        }
        const rel = "train.parquet";
        await fs.writeFile(path.join(ctx.dir, rel), writeParquet(columns, codec, lies));
        log.unshift(`parquet: columns ${columns.map((c) => c.name).join(",")}, codec ${codec}`);
        if (!structural || ctx.rng.chance(0.3)) await mutateFile(ctx, rel, "bytes", null, log);
        return datasetCase(ctx, "dataset-parquet", columns.map((c) => c.name).join("+"), path.join(ctx.dir, rel), log);
    }
};

const config: FormatDef = {
    name: "config",
    description: "config.json of a model folder (loaded, then a 3-token forward)",
    async build(ctx) {
        const log: string[] = [];
        await copyInto(ctx.seeds.small, ctx.dir);
        await mutateFile(
            ctx,
            "config.json",
            "json",
            await jsonDict("config", path.join(ctx.seeds.small, "config.json"), CONFIG_KEYS, CONFIG_STRINGS),
            log
        );
        const cli = ctx.rng.chance(0.5) ? ["inspect", "--model", ctx.dir] : ["generate", "--model", ctx.dir, ...GENERATE];
        return {
            format: "config",
            index: ctx.index,
            variant: "config.json",
            kind: "load-model",
            params: {model: ctx.dir},
            mutations: log,
            writes: [],
            expectOutputs: [],
            cli
        };
    }
};

const tokenizerConfig: FormatDef = {
    name: "tokenizer_config",
    description: "tokenizer_config.json (special tokens, chat template), chat_template.jinja, tokenizer.json",
    async build(ctx) {
        const log: string[] = [];
        const withTemplateFile = ctx.rng.chance(0.25);
        await copyInto(withTemplateFile ? ctx.seeds.smallTemplate : ctx.seeds.small, ctx.dir);
        const target = ctx.rng.weighted([
            [withTemplateFile ? 40 : 80, "tokenizer_config.json"],
            [withTemplateFile ? 50 : 0, "chat_template.jinja"],
            [10, "tokenizer.json"]
        ] as const);
        const file = path.join(ctx.dir, target);
        if (target === "chat_template.jinja") await mutateFile(ctx, target, "template", null, log);
        else if (target === "tokenizer.json") {
            await mutateFile(
                ctx,
                target,
                "json",
                await jsonDict(
                    "tokenizer.json",
                    file,
                    [
                        "model",
                        "pre_tokenizer",
                        "decoder",
                        "normalizer",
                        "added_tokens",
                        "vocab",
                        "merges",
                        "type",
                        "post_processor"
                    ],
                    TOKENIZER_STRINGS
                ),
                log
            );
        } else {
            const dict = await jsonDict("tokenizer_config", file, TOKENIZER_KEYS, TOKENIZER_STRINGS);
            const parsed = JSON.parse(await fs.readFile(file, "utf8")) as Record<string, unknown>;
            if (ctx.mutate && typeof parsed.chat_template === "string" && ctx.rng.chance(0.4)) {
                // the template inside the JSON: Jinja mutations, or the list-of-named-templates form
                const sub: string[] = [];
                if (ctx.rng.chance(0.8)) parsed.chat_template = mutateTemplate(parsed.chat_template, ctx.rng, sub);
                else {
                    parsed.chat_template = [
                        {name: "default", template: parsed.chat_template},
                        {name: ctx.rng.pick(["tool_use", "default", ""]), template: ctx.rng.pick(["{{ x", "ok", 5, null])}
                    ];
                    sub.push("chat_template as a list of named templates (with a second, odd one)");
                }
                log.push(...sub.map((s) => `${target}: chat_template: ${s}`));
                await fs.writeFile(file, JSON.stringify(parsed, null, 2));
                if (ctx.rng.chance(0.3)) await mutateFile(ctx, target, "json", dict, log);
            } else await mutateFile(ctx, target, "json", dict, log);
        }
        return {
            format: "tokenizer_config",
            index: ctx.index,
            variant: withTemplateFile ? `${target} (template file)` : target,
            kind: "tokenizer",
            params: {model: ctx.dir, messages: ctx.seeds.data.messages},
            mutations: log,
            writes: [],
            expectOutputs: [],
            cli: ["generate", "--model", ctx.dir, "--chat", ...GENERATE]
        };
    }
};

const adapterConfig: FormatDef = {
    name: "adapter_config",
    description: "adapter_config.json of PEFT adapters (LoRA; DoRA with trained biases), loaded onto the model",
    async build(ctx) {
        const log: string[] = [];
        const dora = ctx.rng.chance(0.3);
        await copyInto(dora ? ctx.seeds.adapterDora : ctx.seeds.adapter, ctx.dir);
        await mutateFile(
            ctx,
            "adapter_config.json",
            "json",
            await jsonDict(`adapter:${dora}`, path.join(ctx.dir, "adapter_config.json"), ADAPTER_KEYS, ADAPTER_STRINGS),
            log
        );
        return {
            format: "adapter_config",
            index: ctx.index,
            variant: dora ? "dora" : "lora",
            kind: "load-adapter",
            params: {adapter: ctx.dir, model: ctx.seeds.small},
            mutations: log,
            writes: [],
            expectOutputs: [],
            cli: ["generate", "--model", ctx.seeds.small, "--adapter", ctx.dir, ...GENERATE]
        };
    }
};

const trainerState: FormatDef = {
    name: "trainer_state",
    description:
        "checkpoint state files (trainer_state.json mostly; rng_state, scheduler, optimizer.json, metrics.jsonl) under a resumed run",
    async build(ctx) {
        const log: string[] = [];
        await copyInto(ctx.seeds.run, ctx.dir);
        // trainer_state.json mostly, then the other state files the checkpoint holds (whatever this version writes)
        const others = (await fs.readdir(path.join(ctx.dir, "checkpoint-2")))
            .filter(
                (f) =>
                    f.endsWith(".json") &&
                    f !== "trainer_state.json" &&
                    !/^(tokenizer|adapter_config|generation_config|special_tokens)/.test(f)
            )
            .sort();
        const target = ctx.rng.weighted<string>([
            [50, "checkpoint-2/trainer_state.json"],
            ...others.map((f) => [42 / others.length, `checkpoint-2/${f}`] as const),
            [8, "metrics.jsonl"]
        ]);
        const file = path.join(ctx.dir, target);
        if (target === "metrics.jsonl")
            await mutateFile(
                ctx,
                target,
                "jsonl",
                dictionaryFor("metrics", null, ["type", "step", "loss"], ["train", "eval", "save", "start", "end"]),
                log
            );
        else await mutateFile(ctx, target, "json", await jsonDict(`state:${target}`, file, STATE_KEYS, []), log);
        const {params, cli} = resumeCase(ctx);
        return {
            format: "trainer_state",
            index: ctx.index,
            variant: path.basename(target),
            kind: "resume",
            params,
            mutations: log,
            writes: RESUME_WRITES,
            expectOutputs: ["final/adapter_model.safetensors"],
            cli
        };
    }
};

const yaml: FormatDef = {
    name: "yaml",
    description: "training config files (YAML, and JSON) through loadTrainConfig, then a 2-step run when valid",
    async build(ctx) {
        const log: string[] = [];
        const json = ctx.rng.chance(0.2);
        const rel = json ? "config.json" : "config.yaml";
        await fs.copyFile(json ? ctx.seeds.configJson : ctx.seeds.yaml, path.join(ctx.dir, rel));
        const seedValue = parseYaml(await fs.readFile(ctx.seeds.yaml, "utf8")) as Record<string, unknown>;
        const dict = dictionaryFor(
            "yaml",
            seedValue,
            ["unknown_key", "overwrite_output_dir"],
            [
                "cosine",
                "linear",
                "constant",
                "adamw_torch",
                "adamw_8bit",
                "paged_adamw_32bit",
                "sgd",
                "all-linear",
                "cuda",
                "auto",
                "lm_head",
                "embed_tokens"
            ]
        );
        await mutateFile(ctx, rel, json ? "json" : "yaml", dict, log);
        const out = path.join(ctx.dir, "out");
        return {
            format: "yaml",
            index: ctx.index,
            variant: rel,
            kind: "train-config",
            params: {config: path.join(ctx.dir, rel), out},
            mutations: log,
            writes: [/^out(\/|$)/],
            expectOutputs: [],
            cli: ["train", path.join(ctx.dir, rel), "--output_dir", out, "--max_steps", "2", "--gradient_accumulation_steps", "1"]
        };
    }
};

export const FORMATS: readonly FormatDef[] = [
    safetensors,
    gguf,
    datasetJson,
    datasetJsonl,
    datasetParquet,
    config,
    tokenizerConfig,
    adapterConfig,
    trainerState,
    yaml
];

export function formatByName(name: string): FormatDef {
    const f = FORMATS.find((x) => x.name === name);
    if (!f) throw new Error(`unknown format "${name}" (formats: ${FORMATS.map((x) => x.name).join(", ")})`);
    return f;
}
