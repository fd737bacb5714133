// seeds.ts: the valid files every fuzz case starts from, written at run time under the run's scratch folder.
// A small random Qwen2 (2 layers, hidden 32) with the tiny-qwen2 tokenizer keeps each case fast; adapters and
// checkpoints come from real two-step trainings of it, so every file is exactly what qlora writes.
import {promises as fs} from "node:fs";
import path from "node:path";
import {gzipSync} from "node:zlib";
import {parse as parseYaml} from "yaml";
import {fineTune} from "../../src/api/train.js";
import {writeSyntheticCheckpoint} from "../../src/model/synthetic.js";
import {DATASETS, REPO_ROOT, SHARED} from "../helpers/paths.js";
import type {ParquetColumn} from "../helpers/parquet-writer.js";

/** the read-only tiny model the seeds take their tokenizer and config keys from */
export const TINY_MODEL = path.join(SHARED, "models", "tiny-qwen2");
const TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"];

export interface Seeds {
    root: string;
    /** a small model folder: config.json, model.safetensors, tokenizer files */
    small: string;
    /** the same with the chat template in chat_template.jinja */
    smallTemplate: string;
    /** the same weights in three shards with model.safetensors.index.json */
    sharded: string;
    /**
     * a small Llama with test/fixtures/spm/llama's SentencePiece tokenizer (tokenizer.model, byte-fallback
     * tokenizer.json): the GGUF export's SentencePiece vocabulary
     */
    spm: string;
    /** adapters saved by qlora after training the small model (LoRA; DoRA with trained biases) */
    adapter: string;
    adapterDora: string;
    /**
     * the output folder of a 3-step run with save_steps 1 as if killed after its second checkpoint: checkpoint-1,
     * checkpoint-2 and metrics.jsonl (checkpoint-3, final/ and report.html removed)
     */
    run: string;
    /** the fineTune() input of that run, less output_dir (a resumed run adds output_dir and resume_from_checkpoint) */
    runConfig: Record<string, unknown>;
    /** `qlora train` flags equal to runConfig */
    runFlags: string[];
    data: {json: string[]; jsonl: string[]; jsonlGz: string[]; messages: string};
    parquetColumns: ParquetColumn[][];
    /** a training config for the small model (YAML and JSON) */
    yaml: string;
    configJson: string;
}

function smallConfig(tiny: Record<string, unknown>): Record<string, unknown> {
    const layers = 2;
    return {
        ...tiny,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 256,
        layer_types: Array.isArray(tiny.layer_types) ? (tiny.layer_types as unknown[]).slice(0, layers) : undefined
    };
}

function clip(s: unknown): string {
    const text = String(s ?? "");
    return text.length > 160 ? text.slice(0, 160) : text;
}

async function readJsonFile(file: string): Promise<unknown> {
    return JSON.parse(await fs.readFile(file, "utf8"));
}

async function copyFiles(from: string, to: string, names: string[]): Promise<void> {
    await fs.mkdir(to, {recursive: true});
    for (const n of names) {
        await fs.copyFile(path.join(from, n), path.join(to, n));
        await fs.chmod(path.join(to, n), 0o644); // the shared model's files are read-only
    }
}

export function toFlags(config: Record<string, unknown>): string[] {
    return Object.entries(config).flatMap(([k, v]) => [`--${k}`, Array.isArray(v) ? v.join(",") : String(v)]);
}

export async function buildSeeds(root: string): Promise<Seeds> {
    await fs.mkdir(root, {recursive: true});
    const tinyConfig = (await readJsonFile(path.join(TINY_MODEL, "config.json"))) as Record<string, unknown>;
    const config = smallConfig(tinyConfig);

    const small = path.join(root, "small");
    await writeSyntheticCheckpoint(small, {config, seed: 7, dtype: "BF16"});
    await copyFiles(TINY_MODEL, small, TOKENIZER_FILES);

    const smallTemplate = path.join(root, "small-template");
    await copyFiles(small, smallTemplate, ["config.json", "model.safetensors", ...TOKENIZER_FILES]);
    const tokCfg = (await readJsonFile(path.join(small, "tokenizer_config.json"))) as Record<string, unknown>;
    await fs.writeFile(path.join(smallTemplate, "chat_template.jinja"), String(tokCfg.chat_template ?? ""));
    delete tokCfg.chat_template;
    await fs.writeFile(path.join(smallTemplate, "tokenizer_config.json"), JSON.stringify(tokCfg, null, 2) + "\n");

    const spm = path.join(root, "spm");
    await writeSyntheticCheckpoint(spm, {
        config: {
            architectures: ["LlamaForCausalLM"],
            model_type: "llama",
            vocab_size: 1024,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10000,
            tie_word_embeddings: false,
            bos_token_id: 1,
            eos_token_id: 2,
            hidden_act: "silu"
        },
        seed: 7,
        dtype: "BF16"
    });
    await copyFiles(path.join(REPO_ROOT, "test", "fixtures", "spm", "llama"), spm, [
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json"
    ]);

    const sharded = path.join(root, "sharded");
    await writeSyntheticCheckpoint(sharded, {config, seed: 7, dtype: "BF16", maxShardBytes: 450_000});
    await copyFiles(TINY_MODEL, sharded, TOKENIZER_FILES);

    // data: a few records of each format from the shared data sets
    const dataDir = path.join(root, "data");
    await fs.mkdir(dataDir, {recursive: true});
    const zh = (await readJsonFile(path.join(DATASETS, "alpaca_zh_demo.json"))) as Record<string, unknown>[];
    const en = (await readJsonFile(path.join(DATASETS, "alpaca_en_demo.json"))) as Record<string, unknown>[];
    const alpaca = [...zh.slice(0, 4), ...en.slice(0, 3)].map((r) => ({
        instruction: clip(r.instruction),
        input: clip(r.input),
        output: clip(r.output)
    }));
    const messages = (await fs.readFile(path.join(DATASETS, "messages_demo.jsonl"), "utf8"))
        .split("\n")
        .filter(Boolean)
        .slice(0, 5)
        .map((l) => JSON.parse(l) as {messages: {role: string; content: string}[]})
        .map((r) => ({messages: r.messages.map((m) => ({role: m.role, content: clip(m.content)}))}));
    const sharegpt = (
        (await readJsonFile(path.join(DATASETS, "sharegpt_demo.json"))) as {conversations: {from: string; value: string}[]}[]
    )
        .slice(0, 3)
        .map((r) => ({conversations: r.conversations.slice(0, 4).map((c) => ({from: c.from, value: clip(c.value)}))}));
    const text = alpaca.map((r) => ({text: `${r.instruction}\n${r.output}`}));
    const promptCompletion = alpaca.map((r) => ({prompt: r.instruction, completion: r.output}));
    const sets: Record<string, unknown[]> = {alpaca, messages, sharegpt, text, prompt_completion: promptCompletion};
    const data: Seeds["data"] = {json: [], jsonl: [], jsonlGz: [], messages: path.join(dataDir, "messages.jsonl")};
    for (const [name, records] of Object.entries(sets)) {
        const json = path.join(dataDir, `${name}.json`);
        await fs.writeFile(json, JSON.stringify(records, null, 2) + "\n");
        data.json.push(json);
        const jsonl = path.join(dataDir, `${name}.jsonl`);
        const lines = records.map((r) => JSON.stringify(r)).join("\n") + "\n";
        await fs.writeFile(jsonl, lines);
        data.jsonl.push(jsonl);
        if (name === "alpaca" || name === "messages") {
            await fs.writeFile(`${jsonl}.gz`, gzipSync(lines));
            data.jsonlGz.push(`${jsonl}.gz`);
        }
    }
    const parquetColumns: ParquetColumn[][] = [
        [
            {name: "instruction", kind: "string", values: alpaca.map((r) => r.instruction)},
            {name: "input", kind: "string", values: alpaca.map((r) => r.input)},
            {name: "output", kind: "string", values: alpaca.map((r) => r.output)}
        ],
        [
            {name: "text", kind: "string", values: text.map((r) => r.text)},
            {name: "id", kind: "int64", values: text.map((_, i) => i)}
        ],
        [
            {name: "prompt", kind: "string", values: promptCompletion.map((r) => r.prompt)},
            {name: "completion", kind: "string", values: promptCompletion.map((r) => r.completion)}
        ]
    ];

    // a finished run of the small model: its checkpoints and final adapter are the seeds of the state files
    const runConfig: Record<string, unknown> = {
        model: small,
        dataset: path.join(dataDir, "alpaca.jsonl"),
        max_steps: 3,
        save_steps: 1,
        max_seq_length: 64,
        per_device_train_batch_size: 2,
        logging_steps: 1,
        r: 2,
        lora_alpha: 4,
        lora_dropout: 0.1,
        learning_rate: 1e-3,
        device: "cpu",
        threads: 1
    };
    const run = path.join(root, "run");
    await fineTune({...runConfig, output_dir: run});
    const adapter = path.join(root, "adapter");
    await fs.cp(path.join(run, "final"), adapter, {recursive: true});
    for (const name of ["checkpoint-3", "final", "report.html"])
        await fs.rm(path.join(run, name), {recursive: true, force: true});
    const doraRun = path.join(root, "run-dora");
    await fineTune({...runConfig, max_steps: 1, use_dora: true, bias: "lora_only", output_dir: doraRun});
    const adapterDora = path.join(root, "adapter-dora");
    await fs.cp(path.join(doraRun, "final"), adapterDora, {recursive: true});
    await fs.rm(doraRun, {recursive: true, force: true});

    // a training config: the example config with every key, pointed at the small model and data
    const overrides: Record<string, string> = {
        model: JSON.stringify(small),
        dataset: JSON.stringify(path.join(dataDir, "alpaca.jsonl")),
        max_steps: "2",
        max_seq_length: "64",
        per_device_train_batch_size: "2",
        logging_steps: "1",
        save_steps: "1",
        r: "4",
        lora_alpha: "8",
        device: '"cpu"',
        threads: "1",
        output_dir: '"./fuzz_output"'
    };
    let yamlText = await fs.readFile(path.join(REPO_ROOT, "examples", "qlora.yaml"), "utf8");
    for (const [k, v] of Object.entries(overrides)) {
        const line = new RegExp(`^${k}:.*$`, "m");
        yamlText = line.test(yamlText) ? yamlText.replace(line, `${k}: ${v}`) : `${yamlText}\n${k}: ${v}\n`;
    }
    const yaml = path.join(root, "config.yaml");
    await fs.writeFile(yaml, yamlText);
    const configJson = path.join(root, "config.json");
    await fs.writeFile(configJson, JSON.stringify(parseYaml(yamlText), null, 2) + "\n");

    return {
        root,
        small,
        smallTemplate,
        spm,
        sharded,
        adapter,
        adapterDora,
        run,
        runConfig,
        runFlags: toFlags(runConfig),
        data,
        parquetColumns,
        yaml,
        configJson
    };
}
