// qlora eval --task end to end: a user's task file (JSONL scored by exact match, a data file scored by loss), bad
// task files as one-line errors naming the key, the results folder, and the cache (a rerun reads it, touching
// nothing; a new subject is the only thing computed).
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {loadModel} from "../src/api/models.js";
import {loadTask} from "../src/eval/task.js";
import {generate} from "../src/model/generate.js";
import {expectOneLineError, runCli} from "./helpers/cli.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-eval-cli-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));
const CACHE = path.join(tmp, "cache");

/** qlora with the results cache in this test's temporary folder */
function qlora(...args: string[]) {
    return runCli(args, {env: {...process.env, QLORA_CACHE: CACHE}});
}

const expectError = expectOneLineError;

function writeTask(name: string, yaml: string): string {
    const file = path.join(tmp, name);
    writeFileSync(file, yaml);
    return file;
}

// a small JSONL task: half the answers are what the model writes greedily (computed here with generate()), half
// are not, so exact_match must be exactly 0.5
const loaded = await loadModel(MODEL_DIR, {device: "cpu"});
const questions = ["1+1", "the capital of France", "床前明月光", "hello", "2, 4, 6, 8", "猫"];
const greedyAnswers = questions.map((q) => {
    const r = generate(loaded.lm, loaded.tokenizer.encode(`Q: ${q}\nA:`), {
        maxNewTokens: 6,
        greedy: true,
        eosTokenIds: loaded.eosTokenIds
    });
    const ids = r.newIds.filter((id) => !loaded.eosTokenIds.includes(id));
    return loaded.tokenizer.decode(ids, {skipSpecialTokens: true}).split("\n")[0].trim();
});
const records = questions.map((q, i) => ({q, a: i % 2 === 0 ? greedyAnswers[i] : "zzz-not-the-answer"}));
writeFileSync(path.join(tmp, "qa.jsonl"), records.map((r) => JSON.stringify(r)).join("\n") + "\n");
const QA_TASK = `task: qa
data: qa.jsonl
format: jsonl
doc_to_text: "Q: {q}\\nA:"
doc_to_target: "{a}"
metric: exact_match
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
`;
const qaTask = writeTask("qa.yaml", QA_TASK);

test("a user task file scored by exact match: the number is the share of answers the model writes", () => {
    assert.ok(
        greedyAnswers.every((a, i) => i % 2 === 1 || a !== ""),
        `non-empty greedy answers: ${JSON.stringify(greedyAnswers)}`
    );
    const r = qlora("eval", "--task", qaTask, "--device", "cpu", "--batch-size", "1", "--no-cache", "--json");
    assert.equal(r.code, 0, r.stderr);
    const qa = JSON.parse(r.stdout).results.qa;
    assert.equal(qa.metric, "exact_match");
    assert.equal(qa.n, 6);
    assert.equal(qa.exact_match, 0.5);
    assert.equal(qa.exact_match_stderr, Math.sqrt(0.25 / 5));
    assert.equal(qa.cached, false);
});

test("a task file with metric loss gives the loss of qlora eval --data on the same file", () => {
    const examples = JSON.parse(readFileSync(path.join(REPO_ROOT, "examples", "data", "alpaca_eval.json"), "utf8"));
    writeFileSync(path.join(tmp, "val.json"), JSON.stringify(examples.slice(0, 20)));
    const task = writeTask("val.yaml", "task: val_loss\ndata: val.json\nmetric: loss\nmax_seq_length: 256\n");
    const viaTask = qlora("eval", "--task", task, "--device", "cpu", "--no-cache", "--json");
    assert.equal(viaTask.code, 0, viaTask.stderr);
    const viaData = qlora("eval", "--data", path.join(tmp, "val.json"), "--max-seq-length", "256", "--device", "cpu", "--json");
    assert.equal(viaData.code, 0, viaData.stderr);
    const a = JSON.parse(viaTask.stdout).results.val_loss;
    const b = JSON.parse(viaData.stdout);
    assert.equal(a.loss, b.loss);
    assert.equal(a.perplexity, b.perplexity);
    assert.equal(a.tokens, b.tokens);
    assert.equal(a.n, b.rows);
});

test("bad task files are one-line errors naming the key", async () => {
    expectError(
        qlora("eval", "--task", writeTask("typo.yaml", `${QA_TASK}num_fewshots: 2\n`)),
        "typo.yaml",
        'unknown key "num_fewshots"'
    );
    expectError(
        qlora("eval", "--task", writeTask("type.yaml", `${QA_TASK}num_fewshot: five\n`)),
        "type.yaml: num_fewshot:",
        '(got "five")'
    );
    expectError(qlora("eval", "--task", "mmlu,nonesuch"), 'unknown task "nonesuch"', "mmlu", "cmmlu", "gsm8k", "humaneval");
    expectError(qlora("eval"), "needs --task", "or --data FILE");
    const message = async (yaml: string) => {
        try {
            await loadTask(writeTask("t.yaml", yaml));
        } catch (err) {
            assert.doesNotMatch((err as Error).message, /\n/);
            return (err as Error).message;
        }
        return "no error";
    };
    assert.match(await message("task: x\ndata: d.jsonl\nformat: jsonl\ndoc_to_text: q\n"), /t\.yaml: metric: /);
    assert.match(
        await message("task: x\ndata: d.jsonl\nformat: jsonl\ndoc_to_text: q\ndoc_to_target: a\nmetric: choice_loglik\n"),
        /t\.yaml: doc_to_choice: required for metric choice_loglik/
    );
    assert.match(
        await message(`${QA_TASK}filters:\n  - name: f\n    regex_pattern: "(unclosed"\n`),
        /t\.yaml: filters\.0\.regex_pattern: expected a valid regular expression/
    );
    assert.match(
        await message(`${QA_TASK.split("generation_kwargs:")[0]}generation_kwargs:\n  until: ["x"]\n  temperature: 0\n`),
        /t\.yaml: generation_kwargs: unknown key "temperature"/
    );
    assert.match(await message(`task: x\ndata: \${HOME}/d.jsonl\nmetric: loss\n`), /data: \$\{HOME\} is not a known variable/);
    assert.match(await message("- a\n- b\n"), /t\.yaml: expected a mapping of task keys/);
});

test("missing benchmark data names the file and where to get it", () => {
    const empty = path.join(tmp, "no-data");
    mkdirSync(empty);
    expectError(
        qlora("eval", "--task", "gsm8k", "--data-dir", empty, "--device", "cpu"),
        path.join(empty, "gsm8k_test.jsonl.gz"),
        "does not exist",
        "github.com/openai/grade-school-math",
        "--data-dir"
    );
});

test("results folder and cache: a rerun reads the cache and touches nothing; only a new subject is computed", () => {
    const out = path.join(tmp, "results");
    const first = qlora("eval", "--task", qaTask, "--device", "cpu", "--batch-size", "1", "--output", out, "--json");
    assert.equal(first.code, 0, first.stderr);
    const one = JSON.parse(first.stdout).results.qa;
    assert.equal(one.cached, false);
    const cacheDir = path.join(CACHE, "eval", "qa");
    const cacheFiles = readdirSync(cacheDir);
    assert.equal(cacheFiles.length, 1);
    const cacheFile = path.join(cacheDir, cacheFiles[0]);
    const mtime = statSync(cacheFile).mtimeMs;
    // the folder: results.json (what --json printed), results.md (the table), the samples, the marker
    assert.deepEqual(readdirSync(out).sort(), [".qlora.json", "results.json", "results.md", "samples_qa.jsonl"]);
    assert.deepEqual(JSON.parse(readFileSync(path.join(out, "results.json"), "utf8")).results.qa, one);
    assert.match(
        readFileSync(path.join(out, "results.md"), "utf8"),
        /^\| qa \| {2}\| none \| 0 \| exact_match \| 6 \| 0\.5000 \| 0\.2236 \|$/m
    );
    const samples = readFileSync(path.join(out, "samples_qa.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
    assert.deepEqual(
        samples.map((s) => s.scores.exact_match),
        [1, 0, 1, 0, 1, 0]
    );
    assert.deepEqual(
        samples.map((s) => s.target),
        records.map((r) => r.a)
    );

    // earlier results are replaced only when asked
    expectError(qlora("eval", "--task", qaTask, "--device", "cpu", "--output", out), "results", "pass --overwrite to replace it");
    const second = qlora("eval", "--task", qaTask, "--device", "cpu", "--output", out, "--overwrite", "--json");
    assert.equal(second.code, 0, second.stderr);
    const two = JSON.parse(second.stdout).results.qa;
    assert.equal(two.cached, true);
    assert.equal(two.exact_match, one.exact_match);
    assert.equal(statSync(cacheFile).mtimeMs, mtime, "the cache file was read, not rewritten");
    assert.equal(readdirSync(cacheDir).length, 1);
    // the task file changes: its results are computed again
    writeFileSync(qaTask, QA_TASK.replace("max_gen_toks: 6", "max_gen_toks: 5"));
    const third = qlora("eval", "--task", qaTask, "--device", "cpu", "--json");
    assert.equal(JSON.parse(third.stdout).results.qa.cached, false);
    writeFileSync(qaTask, QA_TASK);

    // per subject: two subjects cached, then a third added: only it is computed
    const subjects = (list: string) =>
        JSON.parse(
            qlora("eval", "--task", "mmlu", "--subjects", list, "--limit", "2", "--num_fewshot", "0", "--device", "cpu", "--json")
                .stdout
        ).results.mmlu;
    const ab = subjects("anatomy,astronomy");
    assert.deepEqual([ab.subjects.anatomy.cached, ab.subjects.astronomy.cached], [false, false]);
    const abc = subjects("anatomy,astronomy,virology");
    assert.deepEqual(
        [abc.subjects.anatomy.cached, abc.subjects.astronomy.cached, abc.subjects.virology.cached],
        [true, true, false]
    );
    assert.equal(abc.subjects.anatomy.acc, ab.subjects.anatomy.acc);
    assert.equal(abc.n, 6);

    // a non-empty folder qlora did not write is refused before anything runs
    const foreign = path.join(tmp, "foreign");
    mkdirSync(foreign);
    writeFileSync(path.join(foreign, "notes.txt"), "mine");
    expectError(qlora("eval", "--task", qaTask, "--output", foreign), "foreign", "was not written by qlora");
    assert.deepEqual(readdirSync(foreign), ["notes.txt"]);
});
