// qlora data preview: the dataset as training will see it, before training.
import type {Command} from "commander";
import {previewDataset} from "../../api/data-preview.js";
import {formatDatasetDescription} from "../../data/index.js";
import {QloraError, quoteValue} from "../../errors.js";
import picocolors from "picocolors";
import {mapSettingFromFlag} from "../../data/column-map.js";
import {action, escapeForTerminal, parseIntOption} from "../run.js";

interface PreviewFlags {
    dataset: string;
    model?: string;
    datasetFormat?: string;
    template?: string;
    maxSeqLength?: number;
    packing?: boolean;
    /** JSON text, parsed and checked as the train keys are */
    columns?: string;
    tags?: string;
    n: number;
    json?: boolean;
}

const FORMATS = ["auto", "alpaca", "text", "prompt_completion", "messages", "sharegpt", "template", "tokenized"];

export function registerData(program: Command): void {
    const data = program.command("data").description("look at a dataset as training will see it");
    data.command("preview")
        .description("the detected format, counts, a length histogram and the first samples with the trained tokens marked")
        .requiredOption("-d, --dataset <file>", "JSON, JSONL or Parquet file, or a folder")
        .option("-m, --model <dir>", "the model whose tokenizer prepares the data (default: the embedded tiny-qwen2)")
        .option("--dataset-format <format>", `record format: ${FORMATS.join(", ")}`)
        .option("--template <text>", "a prompt template with {field} placeholders or in Jinja (as the train key)")
        .option(
            "--max-seq-length <n>",
            "truncate each example to this many tokens (default 1024)",
            parseIntOption("--max-seq-length", 2)
        )
        .option("--packing", "pack examples into rows of max_seq_length")
        .option("--columns <json>", 'other column names, as the train key: \'{"prompt": "question", "response": "answer"}\'')
        .option("--tags <json>", "ShareGPT keys and role names, as the train key (role_tag, content_tag, user_tag, ...)")
        .option("-n, --n <n>", "samples to show", parseIntOption("-n", 0), 5)
        .option("--json", "one JSON object: the summary, and input_ids and label_mask of each sample")
        .action(
            action(async (flags: PreviewFlags) => {
                if (flags.datasetFormat !== undefined && !FORMATS.includes(flags.datasetFormat))
                    throw new QloraError(
                        `--dataset-format must be one of ${FORMATS.join(", ")}, got ${quoteValue(flags.datasetFormat)}`
                    );
                const preview = await previewDataset(flags.dataset, {
                    model: flags.model,
                    dataset_format: flags.datasetFormat === "auto" ? undefined : (flags.datasetFormat as never),
                    template: flags.template,
                    max_seq_length: flags.maxSeqLength,
                    packing: flags.packing,
                    columns: mapSettingFromFlag("columns", flags.columns),
                    tags: mapSettingFromFlag("tags", flags.tags),
                    samples: flags.n
                });
                if (flags.json) {
                    console.log(
                        JSON.stringify({
                            ...preview.description,
                            prompt_format: preview.promptFormat,
                            samples: preview.samples.map((s) => ({input_ids: s.inputIds, label_mask: s.labelMask}))
                        })
                    );
                    return;
                }
                // colour on a terminal; brackets around trained text in a pipe
                const tty = process.stdout.isTTY === true;
                const c = picocolors.createColors(tty);
                for (const line of formatDatasetDescription(preview.description)) console.log(line);
                console.log(
                    `prompt format ${preview.promptFormat ?? "none (plain text: the adapter keeps the base's chat template)"}`
                );
                for (const w of preview.description.warnings) console.log(c.yellow(`warning: ${escapeForTerminal(w)}`));
                preview.samples.forEach((s, i) => {
                    const trained = s.labelMask.reduce((a, b) => a + b, 0);
                    console.log(c.bold(`\n--- sample ${i + 1}: ${s.inputIds.length} tokens, ${trained} trained`));
                    const text = s.segments
                        .map((seg) =>
                            seg.trained ? (tty ? c.green(seg.text) : `[[${seg.text}]]`) : tty ? c.dim(seg.text) : seg.text
                        )
                        .join("");
                    console.log(text);
                });
                if (!tty && preview.samples.length) console.log("\n([[...]]: the tokens training learns to produce)");
            })
        );
}
