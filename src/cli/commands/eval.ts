// qlora eval: loss and perplexity on a data file, optionally with an adapter and a 4-bit base.
import type {Command} from "commander";
import {evaluateLoss} from "../../api/evaluate.js";
import type {DataOptions} from "../../data/index.js";
import {action, addModelOptions, loadModelFromFlags, type ModelFlags, parseIntOption} from "../run.js";

interface EvalFlags {
    model?: string;
    adapter?: string;
    loadIn4bit?: boolean;
    device?: ModelFlags["device"];
    data: string;
    datasetFormat?: string;
    maxSeqLength: number;
    batchSize: number;
    allTokens?: boolean;
    json?: boolean;
}

export function registerEval(program: Command): void {
    const cmd = program
        .command("eval")
        .description("loss and perplexity of a model (and adapter) on a JSON, JSONL or Parquet data file")
        .requiredOption("-d, --data <file>", "the data to evaluate on (any format qlora train reads)");
    addModelOptions(cmd)
        .option("--dataset-format <format>", "alpaca, text, prompt_completion, messages or sharegpt (default: detected)")
        .option("--max-seq-length <n>", "truncate examples to this many tokens", parseIntOption("--max-seq-length", 2), 1024)
        .option("--batch-size <n>", "examples per forward pass", parseIntOption("--batch-size", 1), 8)
        .option("--all-tokens", "score every token, not only responses / assistant turns")
        .option("--json", "print the result as one JSON line")
        .action(
            action(async (flags: EvalFlags) => {
                const loaded = await loadModelFromFlags(flags);
                const options: DataOptions = {
                    dataset_format: flags.datasetFormat as DataOptions["dataset_format"],
                    max_seq_length: flags.maxSeqLength,
                    completion_only_loss: !flags.allTokens,
                    assistant_only_loss: !flags.allTokens
                };
                const r = await evaluateLoss(loaded, flags.data, options, flags.batchSize);
                // on stderr, so --json output stays one line; truncated examples change what the loss measures
                for (const w of r.warnings) console.error(`warning: ${w}`);
                if (flags.json) {
                    console.log(
                        JSON.stringify({
                            loss: r.loss,
                            perplexity: r.perplexity,
                            tokens: r.tokens,
                            rows: r.rows,
                            format: r.stats.format,
                            adapter: flags.adapter ?? null
                        })
                    );
                    return;
                }
                console.log(`data        ${flags.data} (${r.stats.format}, ${r.rows} examples, ${r.tokens} scored tokens)`);
                console.log(`loss        ${r.loss.toFixed(4)}`);
                console.log(`perplexity  ${r.perplexity.toFixed(3)}`);
            })
        );
}
