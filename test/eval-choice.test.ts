// Multiple choice as lm-evaluation-harness scores it, checked against an independent float64 reference: the test
// unpacks the archives with the system's tar, parses the CSV itself, builds the harness's prompts itself and scores
// each letter from the logits of each prompt alone (unbatched); the chosen letters and the accuracy must equal
// evaluateTasks'. Also: batched scores equal unbatched ones, padding included.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {evaluateTasks} from "../src/api/evaluate.js";
import {loadModel} from "../src/api/models.js";
import {loglikelihoods} from "../src/eval/loglik.js";
import {DATASETS, MODEL_DIR} from "./helpers/paths.js";

const loaded = await loadModel(MODEL_DIR, {device: "cpu"});
const {lm, tokenizer} = loaded;
const V = lm.config.vocabSize;
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-eval-choice-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));
for (const archive of ["mmlu.tar.gz", "cmmlu.tar.gz"]) {
    const r = spawnSync("tar", ["-xzf", path.join(DATASETS, "eval", archive), "-C", tmp]);
    assert.equal(r.status, 0, String(r.stderr));
}

/** CSV rows, parsed independently of src/eval/csv.ts (a field: quoted with "" escapes, or up to , or newline) */
function csvRows(text: string): string[][] {
    const rows: string[][] = [];
    let row: string[] = [];
    const field = /"((?:[^"]|"")*)"|([^,\r\n]*)/y;
    let i = 0;
    while (i < text.length) {
        field.lastIndex = i;
        const m = field.exec(text)!;
        row.push(m[1] !== undefined ? m[1].replace(/""/g, '"') : m[2]);
        i = field.lastIndex;
        if (text[i] === ",") i++;
        else {
            rows.push(row);
            row = [];
            i += text.startsWith("\r\n", i) ? 2 : 1;
        }
    }
    return rows;
}

/** the summed log-probability of `cont` after `prompt`, from one unbatched forward, log-softmax in float64 */
const forwards = new Map<string, Float32Array>();
function referenceLoglik(prompt: string, cont: string): number {
    const ctx = tokenizer.encode(prompt);
    const contIds = tokenizer.encode(prompt + cont).slice(ctx.length);
    const input = [...ctx, ...contIds].slice(0, -1);
    // logits only at the positions that predict the continuation (the last contIds.length of the input)
    const rows = contIds.map((_, j) => input.length - contIds.length + j);
    const key = `${input.join(",")}|${rows.join(",")}`;
    let logits = forwards.get(key);
    if (!logits) {
        logits = lm.forward(Int32Array.from(input), 1, input.length, {logitRows: rows});
        forwards.set(key, logits);
    }
    let total = 0;
    contIds.forEach((id, row) => {
        let max = -Infinity;
        for (let v = 0; v < V; v++) max = Math.max(max, logits[row * V + v]);
        let sum = 0;
        for (let v = 0; v < V; v++) sum += Math.exp(logits[row * V + v] - max);
        total += logits[row * V + id] - max - Math.log(sum);
    });
    return total;
}

function referenceLetter(prompt: string): string {
    const lls = ["A", "B", "C", "D"].map((l) => referenceLoglik(prompt, ` ${l}`));
    return "ABCD"[lls.indexOf(Math.max(...lls))];
}

const MMLU_SUBJECTS = [
    "miscellaneous",
    "world_religions",
    "conceptual_physics",
    "management",
    "human_aging",
    "philosophy",
    "high_school_geography",
    "clinical_knowledge",
    "medical_genetics",
    "abstract_algebra",
    "elementary_mathematics",
    "virology",
    "electrical_engineering",
    "human_sexuality",
    "marketing",
    "high_school_biology",
    "anatomy",
    "high_school_chemistry",
    "sociology",
    "high_school_psychology"
];
const CMMLU_SUBJECTS = [
    "sports_science",
    "world_religions",
    "anatomy",
    "traditional_chinese_medicine",
    "arts",
    "food_science",
    "education",
    "elementary_chinese",
    "elementary_commonsense",
    "sociology",
    "ancient_chinese",
    "chinese_literature",
    "management",
    "college_medicine",
    "virology",
    "agronomy",
    "philosophy",
    "business_ethics",
    "astronomy",
    "professional_psychology"
];
const CMMLU_NAMES: Record<string, string> = {
    sports_science: "体育学",
    world_religions: "世界宗教",
    anatomy: "解剖学",
    traditional_chinese_medicine: "中医中药",
    arts: "艺术学",
    food_science: "食品科学",
    education: "教育学",
    elementary_chinese: "小学语文",
    elementary_commonsense: "小学常识",
    sociology: "社会学",
    ancient_chinese: "古汉语",
    chinese_literature: "中国文学",
    management: "管理学",
    college_medicine: "大学医学",
    virology: "病毒学",
    agronomy: "农学",
    philosophy: "哲学",
    business_ethics: "商业伦理",
    astronomy: "天文学",
    professional_psychology: "专业心理学"
};

/** the chosen letters of evaluateTasks, per question in subject order, and its reported accuracy */
async function implementation(task: string, subjects: string[], limit: number, numFewshot: number) {
    const report = await evaluateTasks(loaded, [task], {subjects, limit, numFewshot, cache: false, batchSize: 8});
    const result = report.tasks[0];
    return {
        letters: result.groups.flatMap((g) => g.samples.map((s) => s.prediction)),
        acc: result.scores.acc.mean,
        stderr: result.scores.acc.stderr,
        n: result.n
    };
}

test("MMLU: 200 questions (0-shot, 20 subjects x 10) choose the letters of the float64 reference", async () => {
    const prompts: string[] = [];
    const answers: string[] = [];
    for (const subject of MMLU_SUBJECTS) {
        const rows = csvRows(readFileSync(path.join(tmp, "mmlu", "test", `${subject}_test.csv`), "utf8"));
        const data = rows[0][0] === "question" ? rows.slice(1) : rows; // cais/mmlu exports carry a header row
        for (const [q, a, b, c, d, answer] of data.slice(0, 10)) {
            prompts.push(
                `The following are multiple choice questions (with answers) about ${subject.split("_").join(" ")}.\n\n` +
                    `${q.trim()}\nA. ${a}\nB. ${b}\nC. ${c}\nD. ${d}\nAnswer:`
            );
            answers.push("ABCD"[Number(answer)] ?? answer);
        }
    }
    assert.equal(prompts.length, 200);
    const impl = await implementation("mmlu", MMLU_SUBJECTS, 10, 0);
    const reference = prompts.map(referenceLetter);
    assert.equal(impl.n, 200);
    assert.deepEqual(impl.letters, reference);
    const correct = reference.filter((l, i) => l === answers[i]).length;
    assert.equal(impl.acc, correct / 200);
    const p = correct / 200;
    assert.ok(Math.abs((impl.stderr ?? NaN) - Math.sqrt((p * (1 - p)) / 199)) < 1e-12);
});

test("CMMLU: 200 questions (0-shot, 20 subjects x 10) choose the letters of the float64 reference", async () => {
    const prompts: string[] = [];
    const answers: string[] = [];
    for (const subject of CMMLU_SUBJECTS) {
        const [header, ...rows] = csvRows(readFileSync(path.join(tmp, "test", `${subject}.csv`), "utf8"));
        const col = (name: string) => header.indexOf(name);
        for (const row of rows.slice(0, 10)) {
            prompts.push(
                `以下是关于${CMMLU_NAMES[subject]}的单项选择题，请直接给出正确答案的选项。\n\n${row[col("Question")].trim()}\n` +
                    `A. ${row[col("A")]}\nB. ${row[col("B")]}\nC. ${row[col("C")]}\nD. ${row[col("D")]}\n答案：`
            );
            answers.push(row[col("Answer")]);
        }
    }
    assert.equal(prompts.length, 200);
    const impl = await implementation("cmmlu", CMMLU_SUBJECTS, 10, 0);
    const reference = prompts.map(referenceLetter);
    assert.deepEqual(impl.letters, reference);
    assert.equal(impl.acc, reference.filter((l, i) => l === answers[i]).length / 200);
});

test("MMLU 1-shot: the example is the subject's first dev question with its letter", async () => {
    const subjects = ["abstract_algebra", "marketing"];
    const prompts: string[] = [];
    for (const subject of subjects) {
        const dev = csvRows(readFileSync(path.join(tmp, "mmlu", "dev", `${subject}_dev.csv`), "utf8"));
        const [sq, sa, sb, sc, sd, sanswer] = dev[0][0] === "question" ? dev[1] : dev[0];
        const shot = `${sq.trim()}\nA. ${sa}\nB. ${sb}\nC. ${sc}\nD. ${sd}\nAnswer: ${"ABCD"[Number(sanswer)] ?? sanswer}\n\n`;
        const test = csvRows(readFileSync(path.join(tmp, "mmlu", "test", `${subject}_test.csv`), "utf8"));
        for (const [q, a, b, c, d] of (test[0][0] === "question" ? test.slice(1) : test).slice(0, 5))
            prompts.push(
                `The following are multiple choice questions (with answers) about ${subject.split("_").join(" ")}.\n\n` +
                    `${shot}${q.trim()}\nA. ${a}\nB. ${b}\nC. ${c}\nD. ${d}\nAnswer:`
            );
    }
    const impl = await implementation("mmlu", subjects, 5, 1);
    assert.deepEqual(impl.letters, prompts.map(referenceLetter));
});

test("batched log-likelihoods equal unbatched ones (batch 8 vs 1, right padding, multi-token continuations)", () => {
    const contexts = [
        "The capital of France is",
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
        "床前明月光，",
        "Question: what is two plus two?\nAnswer:",
        "a",
        "The following are multiple choice questions (with answers) about anatomy.\n\nWhich bone is the longest?\nA. femur\nB. tibia\nC. ulna\nD. radius\nAnswer:",
        "答案：",
        "Once upon a time there was",
        "x y z"
    ];
    const single = contexts.map((context) => ({context, continuations: [" A", " B", " C", " D"]}));
    // continuations of several tokens: one row per continuation
    const multi = contexts.map((context) => ({context, continuations: [" Paris is nice", " 13, 14", "疑是地上霜"]}));
    const requests = [...single, ...multi];
    const one = loglikelihoods(lm, tokenizer, requests, {batchSize: 1});
    const eight = loglikelihoods(lm, tokenizer, requests, {batchSize: 8});
    assert.ok(new Set(contexts.map((c) => tokenizer.encode(c).length)).size > 5, "rows of different lengths are padded");
    requests.forEach((req, r) => {
        req.continuations.forEach((cont, c) => {
            assert.ok(Math.abs(one[r].logliks[c] - eight[r].logliks[c]) < 1e-4, `${JSON.stringify(req.context)} + ${cont}`);
            assert.equal(one[r].greedy[c], eight[r].greedy[c]);
        });
        // and each equals the unbatched float64 reference
        req.continuations.forEach((cont, c) =>
            assert.ok(Math.abs(one[r].logliks[c] - referenceLoglik(req.context, cont)) < 1e-4, `${req.context} + ${cont}`)
        );
    });
    assert.ok(
        multi.every((_, i) => one[single.length + i].logliks.every((x) => x < -1)),
        "multi-token sums are real"
    );
});

test("a prompt longer than the context keeps its last tokens, and is counted", () => {
    const long = "word ".repeat(3000) + "Answer:";
    const [r] = loglikelihoods(lm, tokenizer, [{context: long, continuations: [" A", " B"]}], {batchSize: 1, maxLength: 64});
    assert.equal(r.truncated, true);
    const ctx = tokenizer.encode(long).slice(-64);
    const logits = lm.forward(Int32Array.from(ctx), 1, 64, {logitRows: [63]});
    const a = tokenizer.encode(long + " A").slice(tokenizer.encode(long).length)[0];
    let max = -Infinity;
    for (const x of logits) max = Math.max(max, x);
    let sum = 0;
    for (const x of logits) sum += Math.exp(x - max);
    assert.ok(Math.abs(r.logliks[0] - (logits[a] - max - Math.log(sum))) < 1e-9);
});
