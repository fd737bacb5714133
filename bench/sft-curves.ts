// bench/sft-curves.ts: QLoRA on public SFT data with a held-out split, printing the train and held-out loss
// curves: alpaca_zh_demo.json through the seed's alpaca template, messages_demo.jsonl through the chat template.
//
//   node --import tsx bench/sft-curves.ts [--steps 60] [--device cpu|cuda|auto] [--data DIR]
import {mkdtempSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {Rng} from "../src/backend/rng.js";
import {fineTune} from "../src/api/train.js";
import {readRecords} from "../src/data/index.js";
import {DATASETS} from "../test/helpers/paths.js";

const arg = (name: string, def: string) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : def;
};
const steps = Number(arg("steps", "60"));
const device = arg("device", "auto") as "cpu" | "cuda" | "auto";
const dataDir = arg("data", DATASETS);
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-curves-"));

try {
    for (const file of ["alpaca_zh_demo.json", "messages_demo.jsonl"]) {
        const {records} = await readRecords(path.join(dataDir, file));
        const shuffled = new Rng(7).shuffle([...records]);
        const nEval = Math.max(20, Math.round(records.length * 0.1));
        const trainFile = path.join(tmp, `train-${file}.jsonl`),
            evalFile = path.join(tmp, `eval-${file}.jsonl`);
        writeFileSync(
            evalFile,
            shuffled
                .slice(0, nEval)
                .map((r) => JSON.stringify(r))
                .join("\n") + "\n"
        );
        writeFileSync(
            trainFile,
            shuffled
                .slice(nEval)
                .map((r) => JSON.stringify(r))
                .join("\n") + "\n"
        );
        const out = path.join(tmp, file);
        const t0 = Date.now();
        await fineTune({
            dataset: trainFile,
            eval_dataset: evalFile,
            output_dir: out,
            max_steps: steps,
            logging_steps: 10,
            eval_steps: 10,
            max_seq_length: 256,
            per_device_train_batch_size: 4,
            learning_rate: 5e-4,
            device,
            save_steps: 100000
        });
        const recs = readFileSync(path.join(out, "metrics.jsonl"), "utf8")
            .trim()
            .split("\n")
            .map((l) => JSON.parse(l));
        const train = new Map(recs.filter((r) => r.type === "train").map((r) => [r.step, r.loss]));
        const evals = recs.filter((r) => r.type === "eval");
        console.log(
            `\n${file}: ${records.length - nEval} train / ${nEval} held-out records, ${steps} QLoRA steps ` +
                `(r=16, batch 4, lr 5e-4, max_seq_length 256) on ${device}, ${((Date.now() - t0) / 1000).toFixed(0)} s`
        );
        console.log("| step | train loss (mean of 10 steps) | held-out loss |\n|---|---|---|");
        for (const e of evals) console.log(`| ${e.step} | ${train.get(e.step)?.toFixed(4) ?? "-"} | ${e.eval_loss.toFixed(4)} |`);
    }
} finally {
    rmSync(tmp, {recursive: true, force: true});
}
