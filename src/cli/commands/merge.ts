// qlora merge: fold a LoRA adapter into its base model and write a 16-bit Hugging Face folder.
import type {Command} from "commander";
import {deviceLine, resolveModel} from "../../api/models.js";
import {chooseDevice} from "../../backend/cuda.js";
import {QloraError} from "../../errors.js";
import {mergeAdapter} from "../../peft/merge.js";
import {pc} from "../colors.js";
import {action, escapeForTerminal, parseDevice} from "../run.js";

export function registerMerge(program: Command): void {
    program
        .command("merge")
        .description("merge a LoRA adapter into its base: W + (alpha/r) B A, saved as a 16-bit Hugging Face model")
        .requiredOption("-a, --adapter <dir>", "the PEFT adapter folder (e.g. qlora_output/final)")
        .requiredOption("-o, --out <dir>", "the folder to write (new or empty; never the model or adapter folder)")
        .option("-m, --model <dir>", "the base model folder (default: the embedded tiny-qwen2)")
        .option("--dtype <dtype>", "bf16 or f16", "bf16")
        .option(
            "--against-nf4",
            "merge into the dequantized NF4 base the QLoRA adapter was trained on " +
                "(matches the trained model; default: the original 16-bit weights)"
        )
        .option(
            "--device <device>",
            "where to merge: auto (default: the GPU when one is usable), cuda, or cpu " +
                "(the GPU's weights equal the CPU's but for rare one-ulp differences)",
            parseDevice,
            "auto"
        )
        .option("--overwrite", "replace --out when it holds an earlier qlora merge (never any other folder)")
        .action(
            action(
                async (flags: {
                    adapter: string;
                    out: string;
                    model?: string;
                    dtype: string;
                    againstNf4?: boolean;
                    device: "auto" | "cpu" | "cuda";
                    overwrite?: boolean;
                }) => {
                    if (flags.dtype !== "bf16" && flags.dtype !== "f16")
                        throw new QloraError(`--dtype must be bf16 or f16 (got "${flags.dtype}")`);
                    // the same choice and line as generate, chat and eval: cuda without a usable GPU is an error here
                    const choice = chooseDevice(flags.device);
                    const line = deviceLine(choice);
                    if (line) console.error(pc.dim(escapeForTerminal(line)));
                    const r = await mergeAdapter({
                        model: await resolveModel(flags.model),
                        adapter: flags.adapter,
                        out: flags.out,
                        dtype: flags.dtype,
                        againstNf4: flags.againstNf4,
                        overwrite: flags.overwrite,
                        device: choice.device
                    });
                    console.log(
                        `merged ${r.merged} modules into ${r.tensors} tensors on the ${r.device === "cuda" ? "GPU" : "CPU"} ` +
                            `(${flags.dtype}${flags.againstNf4 ? ", against the NF4 base" : ""}): ${r.out}`
                    );
                }
            )
        );
}
