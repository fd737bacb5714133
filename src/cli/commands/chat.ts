// qlora chat: a conversation with the model through its chat template, tokens streamed as they come.
// Works on a terminal (a prompt per turn) and with a pipe (one user message per input line).
import readline from "node:readline";
import type {Command} from "commander";
import pc from "picocolors";
import {generate} from "../../model/generate.js";
import type {ChatMessage} from "../../tokenizer/index.js";
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

interface ChatFlags extends ModelFlags, SamplingFlags {
    system?: string;
    maxNewTokens: number;
    seed: number;
}

export function registerChat(program: Command): void {
    const cmd = program
        .command("chat")
        .description("chat with a model (and adapter) through its chat template; /reset clears the history, /exit quits");
    addSamplingOptions(addModelOptions(cmd))
        .option("--system <text>", "a system message at the start of the conversation")
        .option("-n, --max-new-tokens <n>", "the most tokens per answer", parseIntOption("--max-new-tokens", 1), 256)
        .option("--seed <n>", "random seed of the first answer (each answer uses seed + turn)", parseIntOption("--seed", 0), 0)
        .action(
            action(async (flags: ChatFlags) => {
                const {lm, tokenizer, eosTokenIds} = await loadModelFromFlags(flags);
                if (!tokenizer.hasChatTemplate) tokenizer.applyChatTemplate([], {}); // throws the "no chat template" error
                const tty = process.stdin.isTTY === true && process.stdout.isTTY === true;
                // colour only on a terminal: a pipe gets the plain conversation, whatever CI or FORCE_COLOR say
                const c = pc.createColors(tty);
                const eos = new Set(eosTokenIds);
                const initial: ChatMessage[] = flags.system ? [{role: "system", content: flags.system}] : [];
                let history: ChatMessage[] = [...initial];
                let turn = 0;
                if (tty) console.log(c.dim("qlora chat: type a message; /reset clears the history, /exit quits"));
                const rl = readline.createInterface({
                    input: process.stdin,
                    output: tty ? process.stdout : undefined,
                    terminal: tty
                });
                const ask = () => {
                    if (!tty) return;
                    rl.setPrompt(c.green("> "));
                    rl.prompt();
                };
                ask();
                for await (const line of rl) {
                    const text = line.trim();
                    if (text === "/exit" || text === "/quit") break;
                    if (text === "/reset") {
                        history = [...initial];
                        console.log(c.dim("(history cleared)"));
                        ask();
                        continue;
                    }
                    if (!text) {
                        ask();
                        continue;
                    }
                    history.push({role: "user", content: text});
                    const prompt = tokenizer.applyChatTemplate(history, {addGenerationPrompt: true});
                    let ids = tokenizer.encode(prompt);
                    // keep the newest turns when the conversation outgrows the context
                    while (ids.length + 1 > lm.config.maxPositionEmbeddings && history.length > initial.length + 1) {
                        history.splice(initial.length, 2);
                        ids = tokenizer.encode(tokenizer.applyChatTemplate(history, {addGenerationPrompt: true}));
                    }
                    const decoder = tokenizer.createStreamDecoder({skipSpecialTokens: true});
                    const result = generate(lm, ids, {
                        maxNewTokens: Math.min(flags.maxNewTokens, lm.config.maxPositionEmbeddings - ids.length),
                        ...samplingOf(flags),
                        seed: flags.seed + turn,
                        eosTokenIds: [...eos],
                        onToken: (id) => {
                            if (!eos.has(id)) process.stdout.write(decoder.push(id));
                        }
                    });
                    process.stdout.write(decoder.flush() + "\n");
                    const answerIds = result.stopReason === "eos" ? result.newIds.slice(0, -1) : result.newIds;
                    history.push({role: "assistant", content: tokenizer.decode(answerIds, {skipSpecialTokens: true})});
                    turn++;
                    ask();
                }
                rl.close();
            })
        );
}
