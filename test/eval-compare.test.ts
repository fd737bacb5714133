// qlora eval --compare: the same user tasks (multiple choice and exact match over GSM8K questions, a loss over the
// example validation data) on base, adapter, merged and GGUF (through node-llama-cpp), with the fixture adapter
// of ../shared/fixtures (B drawn from N(0, 0.02), so it moves every log-likelihood). Checked: the merged model scores as
// the adapter does, question by question; the table and JSON hold the numbers the single runs give, the paired
// difference is that of the per-question scores; the cache tells the columns apart; GGUF f16 scores as the
// merged model does within a measured tolerance and q4_k_m runs; the HTML page is self-contained with one bar per
// column per metric; bad --compare values are one-line errors; a killed run removes its temporary merge.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawn, spawnSync} from "node:child_process";
import {once} from "node:events";
import {existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gunzipSync} from "node:zlib";
import {compareJson, compareModels} from "../src/api/evaluate.js";
import {loadModel} from "../src/api/models.js";
import {meanStderr} from "../src/eval/stats.js";
import {CLI, expectOneLineError, runCli} from "./helpers/cli.js";
import {DATASETS, FIXTURES, MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const ADAPTER = path.join(FIXTURES, "adapter");
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-eval-compare-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));
const CACHE = path.join(tmp, "cache");

/** qlora with the results cache in this test's temporary folder */
function qlora(...args: string[]) {
    return runCli(args, {env: {...process.env, QLORA_CACHE: CACHE}});
}

const expectError = expectOneLineError;

// the user's tasks: GSM8K questions as multiple choice (the right number and three others) and as exact match
const gsm8k = gunzipSync(readFileSync(path.join(DATASETS, "eval", "gsm8k_test.jsonl.gz")))
    .toString("utf8")
    .trim()
    .split("\n")
    .slice(0, 24)
    .map((l) => JSON.parse(l) as {question: string; answer: string});
const records = gsm8k.map(({question, answer}, i) => {
    const right = Number(answer.split("####")[1].trim().replace(/,/g, ""));
    const options = [right, right + 1, right * 2, right + 10];
    // the right option moves through A-D
    const shift = i % 4;
    const shown = options.map((_, k) => options[(k + 4 - shift) % 4]);
    return {
        question: `${question}\nA. ${shown[0]}\nB. ${shown[1]}\nC. ${shown[2]}\nD. ${shown[3]}`,
        label: shift,
        answer: String(right)
    };
});
writeFileSync(path.join(tmp, "mc.jsonl"), records.map((r) => JSON.stringify(r)).join("\n") + "\n");
const CHOICE_TASK = path.join(tmp, "mc.yaml");
writeFileSync(
    CHOICE_TASK,
    'task: mc\ndata: mc.jsonl\nformat: jsonl\ndoc_to_text: "{question}\\nAnswer:"\ndoc_to_target: "{label}"\n' +
        "doc_to_choice: [A, B, C, D]\nmetric: choice_loglik\n"
);
const QA_TASK = path.join(tmp, "qa.yaml");
writeFileSync(
    QA_TASK,
    'task: qa\ndata: mc.jsonl\nformat: jsonl\ndoc_to_text: "{question}\\nAnswer:"\ndoc_to_target: "{answer}"\n' +
        'metric: exact_match\ngeneration_kwargs: {until: ["\\n"], max_gen_toks: 12}\n'
);
// the loss of the first examples of the example validation data
const examples = JSON.parse(readFileSync(path.join(REPO_ROOT, "examples", "data", "alpaca_eval.json"), "utf8"));
writeFileSync(path.join(tmp, "val.json"), JSON.stringify(examples.slice(0, 12)));
const LOSS_TASK = path.join(tmp, "val.yaml");
writeFileSync(LOSS_TASK, "task: val_loss\ndata: val.json\nmetric: loss\nmax_seq_length: 256\n");

interface SampleLine {
    subject: string | null;
    where: string;
    prediction: string | null;
    output?: string;
    logliks?: number[];
    scores: Record<string, number>;
}
const samples = (dir: string, task: string): SampleLine[] =>
    readFileSync(path.join(dir, `samples_${task}.jsonl`), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
const maxAbsDiff = (a: SampleLine[], b: SampleLine[]) =>
    Math.max(...a.flatMap((s, i) => (s.logliks as number[]).map((x, c) => Math.abs(x - (b[i].logliks as number[])[c]))));

const LIMIT = "16";
const OUT = path.join(tmp, "compare");

test("--compare base,adapter,merged: merged scores as the adapter per question; the table holds the single runs' numbers", () => {
    const r = qlora(
        "eval",
        "--task",
        `${CHOICE_TASK},${QA_TASK},${LOSS_TASK}`,
        "--limit",
        LIMIT,
        "--device",
        "cpu",
        "--compare",
        "base,adapter,merged",
        "--adapter",
        ADAPTER,
        "--output",
        OUT
    );
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /merging the adapter into a bf16 copy of the base/);
    assert.deepEqual(readdirSync(OUT).sort(), [
        ".qlora.json",
        "adapter",
        "base",
        "compare.html",
        "compare.json",
        "compare.md",
        "merged"
    ]);
    const dir = (column: string) => path.join(OUT, column);
    const [base, adapter, merged] = ["base", "adapter", "merged"].map((c) => samples(dir(c), "mc"));
    assert.equal(adapter.length, 16);
    // the adapter moves the scores; the bf16 merge moves them far less (measured: max 0.015 here, the rounding of
    // W + ΔW to bf16), and the merged model chooses the adapter's letter on every question
    const byAdapter = maxAbsDiff(adapter, base);
    const byMerge = maxAbsDiff(merged, adapter);
    console.log(`max |Δ loglik|: adapter vs base ${byAdapter.toFixed(4)}, merged vs adapter ${byMerge.toFixed(4)}`);
    assert.ok(byAdapter > 0.1, `the adapter changes the log-likelihoods (${byAdapter})`);
    assert.ok(byMerge < 0.02, `merged vs adapter ${byMerge}`);
    assert.deepEqual(
        merged.map((s) => s.prediction),
        adapter.map((s) => s.prediction)
    );
    const [qaAdapter, qaMerged] = ["adapter", "merged"].map((c) => samples(dir(c), "qa"));
    assert.ok(
        qaAdapter.every((s) => (s.output ?? "").length > 0),
        "every question got an answer"
    );
    assert.deepEqual(
        qaMerged.map((s) => s.output),
        qaAdapter.map((s) => s.output)
    );

    // the JSON: each column's results are what a run of that model alone gives; the differences are paired
    const json = JSON.parse(readFileSync(path.join(OUT, "compare.json"), "utf8"));
    assert.deepEqual(json.columns, ["base", "adapter", "merged"]);
    const single = qlora(
        "eval",
        "--task",
        `${CHOICE_TASK},${LOSS_TASK}`,
        "--limit",
        LIMIT,
        "--device",
        "cpu",
        "--no-cache",
        "--json",
        "--adapter",
        ADAPTER
    );
    assert.equal(single.code, 0, single.stderr);
    const alone = JSON.parse(single.stdout).results;
    const inCompare = json.models.adapter.results;
    assert.equal(inCompare.mc.acc, alone.mc.acc);
    assert.equal(inCompare.mc.acc_stderr, alone.mc.acc_stderr);
    assert.equal(inCompare.val_loss.loss, alone.val_loss.loss);
    const accRow = json.rows.find((x: {task: string; metric: string}) => x.task === "mc" && x.metric === "acc");
    assert.deepEqual(accRow.values.adapter, {value: alone.mc.acc, stderr: alone.mc.acc_stderr});
    const lossRow = json.rows.find((x: {task: string; metric: string}) => x.task === "val_loss" && x.metric === "loss");
    assert.deepEqual(lossRow.values.adapter, {value: alone.val_loss.loss, stderr: null});
    // the difference is the mean of the per-question differences (eval-compare-stats checks the arithmetic)
    const paired = meanStderr(adapter.map((s, i) => s.scores.acc - base[i].scores.acc));
    assert.deepEqual(accRow.diffs.adapter, {value: paired.mean, stderr: paired.stderr, paired: true});
    assert.equal(lossRow.diffs.merged.value, lossRow.values.merged.value - lossRow.values.base.value);
    assert.equal(lossRow.diffs.merged.stderr, null);
    assert.ok(Math.abs(lossRow.values.merged.value - lossRow.values.adapter.value) < 2e-3, "merged loss ≈ adapter loss");

    // the markdown: stdout and compare.md, one row per task and metric, values ± stderr, then the differences
    const md = readFileSync(path.join(OUT, "compare.md"), "utf8");
    assert.ok(r.stdout.includes(md.split("\n")[2]), "the table is printed");
    const fmt = (v: {value: number; stderr: number | null}) => `${v.value.toFixed(4)} ± ${(v.stderr as number).toFixed(4)}`;
    const signed = (x: number) => `${x >= 0 ? "+" : "−"}${Math.abs(x).toFixed(4)}`;
    assert.ok(
        md.includes(
            `| mc | acc | 16 | ${fmt(accRow.values.base)} | ${fmt(accRow.values.adapter)} | ${fmt(accRow.values.merged)} | ` +
                `${signed(accRow.diffs.adapter.value)} ± ${accRow.diffs.adapter.stderr.toFixed(4)} |`
        ),
        md
    );
    assert.match(md, /^\| qa \| exact_match \| 16 \| /m);
    assert.match(md, /^\| val_loss \| perplexity \| 12 \| /m);

    // a rerun reads every column from the cache (the merge is not even made); each column has its own entries
    const again = qlora(
        "eval",
        "--task",
        `${CHOICE_TASK},${QA_TASK},${LOSS_TASK}`,
        "--limit",
        LIMIT,
        "--device",
        "cpu",
        "--compare",
        "base,adapter,merged",
        "--adapter",
        ADAPTER,
        "--json"
    );
    assert.equal(again.code, 0, again.stderr);
    assert.doesNotMatch(again.stderr, /merging/);
    const cached = JSON.parse(again.stdout);
    for (const column of ["base", "adapter", "merged"])
        for (const task of ["mc", "qa", "val_loss"])
            assert.equal(cached.models[column].results[task].cached, true, `${column} ${task}`);
    assert.deepEqual(cached.rows, json.rows);
    assert.equal(readdirSync(path.join(CACHE, "eval", "mc")).length, 3, "one cache entry per column");
});

test("the HTML page: self-contained, one bar per column per metric", () => {
    const html = readFileSync(path.join(OUT, "compare.html"), "utf8");
    const json = JSON.parse(readFileSync(path.join(OUT, "compare.json"), "utf8"));
    assert.doesNotMatch(html, /https?:\/\//);
    assert.doesNotMatch(html, /<script|<link|<img|@import|url\(/i);
    assert.equal(json.rows.length, 4, "mc acc, qa exact_match, val_loss loss and perplexity");
    assert.equal((html.match(/<svg /g) ?? []).length, json.rows.length);
    assert.equal((html.match(/<rect class="bar"/g) ?? []).length, json.rows.length * 3);
    for (const column of ["base", "adapter", "merged"])
        assert.equal((html.match(new RegExp(`<rect class="bar" data-column="${column}"`, "g")) ?? []).length, json.rows.length);
    // the table is in the page too, with the error bars drawn where a standard error exists (acc, exact_match)
    assert.ok(html.includes(`<td>${json.rows[0].values.adapter.value.toFixed(4)} ± `));
    assert.ok((html.match(/<path class="err"/g) ?? []).length >= 3);
});

test("gguf:f16 through node-llama-cpp scores as the merged model; q4_k_m runs", async () => {
    const base = await loadModel(MODEL_DIR, {device: "cpu"});
    const status: string[] = [];
    const report = await compareModels(base, [CHOICE_TASK, QA_TASK, LOSS_TASK], ["merged", "gguf:f16", "gguf:q4_k_m"], {
        adapter: ADAPTER,
        limit: 16,
        cache: false,
        ggufThreads: 1,
        onStatus: (m) => status.push(m)
    });
    const [merged, f16, q4] = report.columns.map((c) => c.report.tasks);
    const choices = (tasks: typeof merged) => tasks[0].groups.flatMap((g) => g.samples);
    const diff = (a: typeof merged, b: typeof merged) =>
        choices(a).flatMap((s, i) => (s.logliks as number[]).map((x, c) => Math.abs(x - (choices(b)[i].logliks as number[])[c])));
    const f16Diff = diff(f16, merged);
    const q4Diff = diff(q4, merged);
    const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;
    const agree = (a: typeof merged, b: typeof merged) =>
        choices(a).filter((s, i) => s.prediction === choices(b)[i].prediction).length / choices(a).length;
    console.log(
        `|Δ loglik| vs merged: f16 max ${Math.max(...f16Diff).toFixed(4)} mean ${mean(f16Diff).toFixed(5)}; ` +
            `q4_k_m max ${Math.max(...q4Diff).toFixed(4)} mean ${mean(q4Diff).toFixed(5)}; ` +
            `same letter: f16 ${agree(f16, merged)}, q4_k_m ${agree(q4, merged)}`
    );
    // measured: f16 within 0.003 of the merged model (f16 weights, llama.cpp's f32 probabilities); q4_k_m off by more
    assert.ok(Math.max(...f16Diff) < 0.01, `f16 max |Δ| ${Math.max(...f16Diff)}`);
    assert.ok(agree(f16, merged) >= 15 / 16, `f16 chooses the merged model's letters (${agree(f16, merged)})`);
    assert.ok(mean(q4Diff) > 2 * mean(f16Diff), "q4_k_m is quantized: further from the merged model than f16");
    assert.ok(agree(q4, merged) >= 0.5, `q4_k_m mostly agrees (${agree(q4, merged)})`);
    // generation through llama.cpp stops at the same stop string and length: f16 writes the merged model's answers
    const outputs = (tasks: typeof merged) => tasks[1].groups.flatMap((g) => g.samples.map((s) => s.output));
    const sameText = outputs(f16).filter((o, i) => o === outputs(merged)[i]).length;
    assert.ok(sameText >= 14, `f16 greedy answers equal the merged model's on ${sameText} of 16`);
    assert.ok(
        outputs(q4).every((o) => o !== undefined && !o.includes("\n")),
        "q4_k_m stops at the stop string"
    );
    // the loss from llama.cpp's probabilities of the target tokens
    const loss = (tasks: typeof merged) => tasks[2].loss?.loss as number;
    console.log(`val_loss: merged ${loss(merged)}, f16 ${loss(f16)}, q4_k_m ${loss(q4)}`);
    assert.ok(Math.abs(loss(f16) - loss(merged)) < 2e-3, `f16 loss ${loss(f16)} vs ${loss(merged)}`);
    assert.equal(f16[2].loss?.tokens, merged[2].loss?.tokens);
    assert.ok(Number.isFinite(loss(q4)) && loss(q4) !== loss(f16));
    // the JSON tells the columns apart, with the adapter they came from
    const json = compareJson(report) as {columns: string[]; models: Record<string, {config: {form?: string}}>};
    assert.deepEqual(json.columns, ["merged", "gguf:f16", "gguf:q4_k_m"]);
    assert.equal(json.models["gguf:q4_k_m"].config.form, "gguf:q4_k_m");
    // the merge and the GGUF files were temporary
    const made = status.flatMap((m) => /\((\/.*qlora-compare-[^/]+)\//.exec(m)?.[1] ?? []);
    assert.equal(made.length, 3, status.join("\n"));
    assert.ok(made.every((dir) => dir === made[0] && !existsSync(dir)));
});

test("--compare errors are one line, before the model loads", () => {
    expectError(qlora("eval", "--task", CHOICE_TASK, "--compare", "base,adapter"), "--compare adapter needs --adapter DIR");
    expectError(
        qlora("eval", "--task", CHOICE_TASK, "--compare", "base,lora", "--adapter", ADAPTER),
        'unknown column "lora"',
        "base, adapter, merged or gguf[:TYPE]"
    );
    expectError(
        qlora("eval", "--task", CHOICE_TASK, "--compare", "base,gguf:q5_k", "--adapter", ADAPTER),
        '"gguf:q5_k" names no GGUF type',
        "gguf:q4_k_m"
    );
    expectError(qlora("eval", "--task", CHOICE_TASK, "--compare", "merged,merged", "--adapter", ADAPTER), "merged twice");
    expectError(qlora("eval", "--data", path.join(tmp, "val.json"), "--compare", "base"), "--compare runs benchmark tasks");
});

test("without node-llama-cpp the gguf column is a one-line error naming the package to install", () => {
    // a resolve hook makes node-llama-cpp unavailable, as in an install without it
    const hooks = path.join(tmp, "no-llama-hooks.mjs");
    writeFileSync(
        hooks,
        'export async function resolve(specifier, context, next) {\n  if (specifier === "node-llama-cpp") {\n' +
            '    const err = new Error("Cannot find package \'node-llama-cpp\'");\n    err.code = "ERR_MODULE_NOT_FOUND";\n' +
            "    throw err;\n  }\n  return next(specifier, context);\n}\n"
    );
    const register = path.join(tmp, "no-llama.mjs");
    writeFileSync(register, `import {register} from "node:module";\nregister(${JSON.stringify(`file://${hooks}`)});\n`);
    const r = spawnSync(
        process.execPath,
        [
            "--import",
            "tsx",
            "--import",
            register,
            CLI,
            "eval",
            "--task",
            CHOICE_TASK,
            "--device",
            "cpu",
            "--compare",
            "base,gguf",
            "--adapter",
            ADAPTER
        ],
        {encoding: "utf8", cwd: REPO_ROOT, env: {...process.env, QLORA_CACHE: CACHE}}
    );
    expectError({code: r.status, stdout: r.stdout, stderr: r.stderr}, "node-llama-cpp", "npm install node-llama-cpp@3.21.1");
    assert.doesNotMatch(r.stdout, /\| mc \|/, "nothing ran before the check");
});

test("a killed comparison leaves no temporary merge behind", async () => {
    const child = spawn(
        process.execPath,
        [
            "--import",
            "tsx",
            CLI,
            "eval",
            "--task",
            CHOICE_TASK,
            "--device",
            "cpu",
            "--no-cache",
            "--compare",
            "merged",
            "--adapter",
            ADAPTER
        ],
        {cwd: REPO_ROOT, env: {...process.env, QLORA_CACHE: CACHE}}
    );
    let stderr = "";
    let scratch: string | null = null;
    child.stderr.on("data", (chunk: Buffer) => {
        stderr += chunk.toString();
        const made = /\((\/.*qlora-compare-[^/]+)\/merged\)/.exec(stderr);
        if (made && !scratch) {
            scratch = made[1];
            child.kill("SIGTERM");
        }
    });
    const [code, signal] = (await once(child, "exit")) as [number | null, NodeJS.Signals | null];
    assert.ok(scratch, stderr);
    assert.equal(signal, "SIGTERM", `ended by the signal (code ${code}): ${stderr}`);
    assert.equal(existsSync(scratch), false, `${scratch} is removed`);
});
