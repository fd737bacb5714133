// qlora inspect: what a model folder holds: architecture, sizes, parameter count, dtypes, tokenizer.
import type {Command} from "commander";
import {pc} from "../colors.js";
import {resolveModel} from "../../api/models.js";
import {inspectModel} from "../../api/inspect.js";
import {action} from "../run.js";

// Control characters (C0, DEL, C1) and the invisible bidi/line-separator characters, which a hostile config.json,
// tokenizer or tensor name could use to move the cursor, recolour or rewrite what the terminal shows.
const UNSAFE_FOR_TERMINAL = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** a string from the model folder, safe to print: unsafe characters escaped the way JSON.stringify writes them */
function printable(text: string): string {
    return text.replace(UNSAFE_FOR_TERMINAL, (ch) => {
        const json = JSON.stringify(ch);
        return json.length > 3 ? json.slice(1, -1) : `\\u${ch.charCodeAt(0).toString(16).padStart(4, "0")}`;
    });
}

/** at most this many unused tensor names are listed */
const UNUSED_SHOWN = 5;

export function registerInspect(program: Command): void {
    program
        .command("inspect")
        .description("describe a model folder: architecture, parameters, dtypes, tokenizer and context length")
        .option("-m, --model <dir>", "Hugging Face model folder (default: the embedded tiny-qwen2)")
        .option("--json", "print the description as JSON")
        .action(
            action(async (flags: {model?: string; json?: boolean}) => {
                const info = await inspectModel(await resolveModel(flags.model));
                if (flags.json) {
                    console.log(JSON.stringify(info, null, 2));
                    return;
                }
                // every value printed goes through printable(): they come from files qlora did not write
                const line = (k: string, v: string | number) => console.log(`${pc.dim(k.padEnd(22))} ${printable(String(v))}`);
                const c = info.config;
                line("model", info.dir);
                line("architecture", `${c.architectures.join(", ") || "?"} (model_type ${c.modelType})`);
                line("parameters", `${info.parameters.toLocaleString("en-US")} (${(info.parameters / 1e6).toFixed(2)} M)`);
                line(
                    "dtypes",
                    Object.entries(info.dtypes)
                        .map(([d, n]) => `${d}: ${n.toLocaleString("en-US")}`)
                        .join(", ")
                );
                line("checkpoint", `${info.files.length} file(s), ${(info.bytes / 2 ** 20).toFixed(1)} MiB`);
                line("layers", c.numHiddenLayers);
                line("hidden size", c.hiddenSize);
                line("intermediate size", c.intermediateSize);
                line("attention heads", `${c.numAttentionHeads} query, ${c.numKeyValueHeads} key/value, head dim ${c.headDim}`);
                line("attention bias", c.attentionBias ? "q, k, v" + (c.attentionOutputBias ? ", o" : "") : "none");
                line(
                    "rope",
                    `theta ${c.ropeTheta}` +
                        (c.ropeScaling
                            ? `, scaling ${c.ropeScaling.type}` + (c.ropeScaling.factor ? ` x${c.ropeScaling.factor}` : "")
                            : "")
                );
                line("rms_norm_eps", c.rmsNormEps);
                line("tied embeddings", c.tieWordEmbeddings ? "yes" : "no");
                line("context length", c.maxPositionEmbeddings);
                line("vocabulary", `${c.vocabSize} (tokenizer: ${info.tokenizer.vocabSize} tokens)`);
                line("special tokens", info.tokenizer.specialTokens.map((t) => `${t.content}=${t.id}`).join(" ") || "none");
                line(
                    "eos / pad / bos",
                    [info.tokenizer.eosTokenId, info.tokenizer.padTokenId, info.tokenizer.bosTokenId]
                        .map((x) => x ?? "-")
                        .join(" / ")
                );
                line("chat template", info.tokenizer.hasChatTemplate ? "yes" : "no");
                if (c.quantizationConfig) line("quantization", JSON.stringify(c.quantizationConfig));
                if (info.unusedTensors.length > 0) {
                    const shown = info.unusedTensors
                        .slice(0, UNUSED_SHOWN)
                        .map((n) => JSON.stringify(n))
                        .join(", ");
                    const more = info.unusedTensors.length - UNUSED_SHOWN;
                    line(
                        "unused tensors",
                        `${info.unusedTensors.length} (not described by config.json, ignored when loading): ` +
                            shown +
                            (more > 0 ? `, ... ${more} more` : "")
                    );
                }
            })
        );
}
