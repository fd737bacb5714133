// qlora generate: continue a prompt (or answer it as a chat turn) with the model.
import type {Command} from "commander";
import {QloraError} from "../../errors.js";
import {DEFAULT_SAMPLING, generate} from "../../model/generate.js";
import {
    action,
    addModelOptions,
    loadModelFromFlags,
    type ModelFlags,
    addSamplingOptions,
    parseIntOption,
    samplingOf,
    type SamplingFlags
} from "../run.js";

interface GenerateFlags extends ModelFlags, SamplingFlags {
    prompt: string;
    maxNewTokens: number;
    seed: number;
    chat?: boolean;
    system?: string;
    json?: boolean;
}

export function registerGenerate(program: Command): void {
    const cmd = program
        .command("generate")
        .description("generate text from a prompt with a model (the embedded tiny-qwen2 by default)")
        .requiredOption("-p, --prompt <text>", "the prompt to continue");
    addSamplingOptions(addModelOptions(cmd))
        .option("-n, --max-new-tokens <n>", "the most tokens to generate", parseIntOption("--max-new-tokens", 1), 64)
        .option("--seed <n>", "random seed for sampling", parseIntOption("--seed", 0), DEFAULT_SAMPLING.seed)
        .option("--chat", "wrap the prompt as a user message with the model's chat template")
        .option("--system <text>", "a system message (with --chat)")
        .option("--json", 'print one line {"prompt_ids":[...],"output_ids":[...],"text":"..."} instead of streaming text')
        .action(
            action(async (flags: GenerateFlags) => {
                const {lm, tokenizer, eosTokenIds} = await loadModelFromFlags(flags);
                let text = flags.prompt;
                if (flags.chat) {
                    const messages = flags.system ? [{role: "system", content: flags.system}] : [];
                    messages.push({role: "user", content: flags.prompt});
                    text = tokenizer.applyChatTemplate(messages, {addGenerationPrompt: true});
                } else if (flags.system) throw new QloraError("--system needs --chat");
                const promptIds = tokenizer.encode(text);
                const eos = new Set<number>(eosTokenIds);
                const decoder = tokenizer.createStreamDecoder();
                if (!flags.json && !flags.chat) process.stdout.write(text);
                const result = generate(lm, promptIds, {
                    maxNewTokens: flags.maxNewTokens,
                    ...samplingOf(flags),
                    seed: flags.seed,
                    eosTokenIds: [...eos],
                    onToken: flags.json
                        ? undefined
                        : (id) => {
                              if (!eos.has(id)) process.stdout.write(decoder.push(id));
                          }
                });
                if (flags.json) {
                    // text: the decoded output (prompt included, as transformers' decode(output_ids)); with --chat
                    // only the answer. A final eos token is not part of the text.
                    const ids = flags.chat ? result.newIds : result.outputIds;
                    const shown = result.stopReason === "eos" ? ids.slice(0, -1) : ids;
                    console.log(
                        JSON.stringify({prompt_ids: promptIds, output_ids: result.outputIds, text: tokenizer.decode(shown)})
                    );
                } else process.stdout.write("\n");
            })
        );
}
