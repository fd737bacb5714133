// soak.ts: the kill-soak of issue 8. A short training (save_steps 1, so most moments are inside or near a save)
// is SIGKILLed at random points and resumed until it finishes; every finished run must end with an adapter
// bit-identical to an uninterrupted run (byte-equal final/adapter_model.safetensors) and the same train and eval
// records in metrics.jsonl, and no kill may lose a checkpoint or final/ that existed before it or leave one that
// does not read back.
//
//   npm run soak -- --kills 100 [--seed N] [--steps 8] [--max-kills-per-trial 3] [--timeout 180]
//                   [--model DIR] [--dataset FILE] [--keep]
// The default run is the embedded tiny-qwen2 on the example data (with its eval split), one CPU thread.
//
// A trial starts in a fresh folder; each run of it is killed with probability 0.75 (at most --max-kills-per-trial
// times), either at a uniformly random moment of the expected run time or 0-20 ms after the temporary folder of its
// k-th checkpoint-N or final/ write (.NAME.tmp-R/.new-R/.old-R; k random) appears in the output folder. The output
// folder is listed right before each kill, which tells whether the kill landed inside a save. A killed run is
// resumed with the same command plus --resume_from_checkpoint true when a checkpoint-N exists, else rerun
// (with --overwrite_output_dir true when that key exists and the folder is not empty).
import {spawn, spawnSync} from "node:child_process";
import {existsSync, promises as fs, readdirSync, readFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {checkSafetensorsBytes} from "../test/fuzz/harness.js";
import {FuzzRng} from "../test/fuzz/rng.js";
import {REPO_ROOT} from "../test/helpers/paths.js";
import {intArg, parseArgs} from "./args.js";

/** ".ts" under tsx, ".js" compiled (scripts/device-pack.sh): compiled runs skip tsx's transpiling in each process */
const EXT = path.extname(new URL(import.meta.url).pathname);
const LOADER = EXT === ".ts" ? ["--import", import.meta.resolve("tsx")] : [];
const CLI = path.join(REPO_ROOT, "src", "cli", `main${EXT}`);
const TEMP_ENTRY = /\.(tmp|new|old)(-\d+)?$|\.(tmp|new|old)-/;
/** the temporary folder of a checkpoint-N or final/ write (`.NAME.tmp-R`, `.NAME.new-R`, `.NAME.old-R`) */
const SAVE_TEMP = /^\.(checkpoint-\d+|final)\.(tmp|new|old)-/;

interface RunEnd {
    code: number | null;
    signal: NodeJS.Signals | null;
    killed: boolean;
    hung: boolean;
    /** the output folder's entries right before the kill */
    listing: string[];
    /** the kill landed while a temporary folder or file existed */
    inSave: boolean;
    stderr: string;
    ms: number;
}

function listing(dir: string): string[] {
    try {
        return readdirSync(dir);
    } catch {
        return [];
    }
}

/** `.NAME.tmp-R` etc. of one checkpoint-N or final/ write, as NAME:R (the same across its stages) */
function saveIdentity(entry: string): string | null {
    const m = /^\.(checkpoint-\d+|final)\.(?:tmp|new|old)-(.+)$/.exec(entry);
    return m ? `${m[1]}:${m[2]}` : null;
}

type KillPlan = null | {atMs: number} | {inSave: number; delayMs: number};

/**
 * runs `qlora train ...args`; kill: null (let it finish), {atMs} (that long after the start) or {inSave: k, delayMs}
 * (delayMs after the k-th checkpoint/final write of this run shows its temporary folder)
 */
async function runTrain(args: string[], out: string, kill: KillPlan, timeoutMs: number): Promise<RunEnd> {
    // temporaries a killed earlier run left behind are not this run's saves
    const leftovers = new Set(listing(out));
    const started = Date.now();
    const child = spawn(process.execPath, [...LOADER, CLI, "train", ...args], {
        cwd: REPO_ROOT,
        stdio: ["ignore", "ignore", "pipe"],
        env: {...process.env, NO_COLOR: "1", FORCE_COLOR: "0", QLORA_DEBUG: ""}
    });
    let stderr = "";
    child.stderr!.on("data", (d: Buffer) => {
        stderr = (stderr + d.toString()).slice(-8000);
    });
    const end: RunEnd = {code: null, signal: null, killed: false, hung: false, listing: [], inSave: false, stderr: "", ms: 0};
    let exited = false;
    const doKill = () => {
        if (exited || end.killed) return;
        end.listing = listing(out);
        end.inSave = end.listing.some((n) => SAVE_TEMP.test(n) && !leftovers.has(n));
        end.killed = true;
        child.kill("SIGKILL");
    };
    const timers: NodeJS.Timeout[] = [];
    if (kill && "atMs" in kill) timers.push(setTimeout(doKill, kill.atMs));
    if (kill && "inSave" in kill) {
        const saves = new Set<string>();
        let armed = false;
        const poll = setInterval(() => {
            if (armed || exited) return;
            for (const n of listing(out)) {
                const id = leftovers.has(n) ? null : saveIdentity(n);
                if (id) saves.add(id);
            }
            if (saves.size >= kill.inSave) {
                armed = true;
                clearInterval(poll);
                if (kill.delayMs === 0) doKill();
                else timers.push(setTimeout(doKill, kill.delayMs));
            }
        }, 1);
        timers.push(poll);
    }
    timers.push(
        setTimeout(() => {
            if (!exited && !end.killed) {
                end.hung = true;
                child.kill("SIGKILL");
            }
        }, timeoutMs)
    );
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((r) =>
        child.on("exit", (c, s) => r([c, s]))
    );
    exited = true;
    for (const t of timers) {
        clearTimeout(t);
        clearInterval(t);
    }
    return {...end, code, signal, stderr: stderr.trim(), ms: Date.now() - started};
}

const ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"];
const CHECKPOINT_FILES = [
    ...ADAPTER_FILES,
    "trainer_state.json",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng_state.json"
];

/** what is wrong with a checkpoint-N or final/ folder (missing files, files that do not parse), or null */
function checkFolder(dir: string, files: string[]): string | null {
    for (const f of files) if (!existsSync(path.join(dir, f))) return `${f} is missing`;
    for (const f of readdirSync(dir)) {
        const p = path.join(dir, f);
        if (TEMP_ENTRY.test(f)) return `temporary ${f} inside`;
        try {
            if (f.endsWith(".json")) JSON.parse(readFileSync(p, "utf8"));
            else if (f.endsWith(".safetensors")) {
                const problem = checkSafetensorsBytes(readFileSync(p));
                if (problem) return `${f}: ${problem}`;
            }
        } catch (err) {
            return `${f}: ${(err as Error).message}`;
        }
    }
    return null;
}

/** data losses after a kill: a folder listed before it that vanished, or a final-named folder that does not read back */
function checkAfterKill(out: string, before: string[]): string[] {
    const losses: string[] = [];
    const now = listing(out);
    for (const name of before) {
        if (!/^checkpoint-\d+$|^final$/.test(name)) continue;
        if (!now.includes(name)) losses.push(`${name} existed before the kill and vanished`);
    }
    for (const name of now) {
        if (!/^checkpoint-\d+$|^final$/.test(name)) continue;
        const problem = checkFolder(path.join(out, name), name === "final" ? ADAPTER_FILES : CHECKPOINT_FILES);
        if (problem) losses.push(`${name}: ${problem}`);
    }
    return losses;
}

interface MetricsView {
    train: string[];
    eval: string[];
}

function metricsView(out: string): MetricsView | string {
    let text: string;
    try {
        text = readFileSync(path.join(out, "metrics.jsonl"), "utf8");
    } catch (err) {
        return `metrics.jsonl: ${(err as Error).message}`;
    }
    const view: MetricsView = {train: [], eval: []};
    for (const [i, line] of text.split("\n").entries()) {
        if (!line.trim()) continue;
        let r: Record<string, unknown>;
        try {
            r = JSON.parse(line);
        } catch {
            return `metrics.jsonl line ${i + 1} is not JSON`;
        }
        // the fields that depend on the numbers only (not on time or memory)
        if (r.type === "train")
            view.train.push(JSON.stringify([r.step, r.loss, r.learning_rate, r.grad_norm, r.epoch, r.num_tokens]));
        if (r.type === "eval") view.eval.push(JSON.stringify([r.step, r.eval_loss, r.eval_tokens]));
    }
    return view;
}

function table(head: string[], row: (string | number)[]): string {
    const cells = row.map(String);
    const w = head.map((h, i) => Math.max(h.length, cells[i].length));
    return [
        `| ${head.map((h, i) => h.padStart(w[i])).join(" | ")} |`,
        `|${w.map((x) => `${"-".repeat(x + 1)}:`).join("|")}|`,
        `| ${cells.map((c, i) => c.padStart(w[i])).join(" | ")} |`
    ].join("\n");
}

async function main(): Promise<number> {
    const args = parseArgs(process.argv.slice(2));
    const known = new Set(["kills", "seed", "steps", "max-kills-per-trial", "timeout", "keep", "model", "dataset"]);
    for (const k of args.keys())
        if (!known.has(k)) throw new Error(`unknown option --${k} (known: ${[...known].map((x) => `--${x}`).join(", ")})`);
    const targetKills = intArg(args, "kills", 20);
    const seed = intArg(args, "seed", Math.floor(Math.random() * 2 ** 31));
    const steps = intArg(args, "steps", 8);
    const maxKillsPerTrial = Math.max(1, intArg(args, "max-kills-per-trial", 3));
    const timeoutMs = intArg(args, "timeout", 180) * 1000;
    const rng = new FuzzRng(seed);
    const root = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-soak-"));
    const help = spawnSync(process.execPath, [...LOADER, CLI, "train", "--help"], {encoding: "utf8", cwd: REPO_ROOT});
    const hasOverwrite = /--overwrite_output_dir\b/.test(help.stdout);
    // the embedded tiny-qwen2 on the example data (with its eval split): 8 steps, a checkpoint after each
    const base = [
        "--max_steps",
        String(steps),
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        "--eval_steps",
        "4",
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "2",
        "--r",
        "4",
        "--lora_alpha",
        "8",
        "--lora_dropout",
        "0.1",
        "--device",
        "cpu",
        "--threads",
        "1",
        ...(args.has("model") ? ["--model", path.resolve(args.get("model")!)] : []),
        ...(args.has("dataset") ? ["--dataset", path.resolve(args.get("dataset")!)] : [])
    ];
    console.log(
        `qlora soak: seed ${seed}, ${targetKills} kills, ${steps}-step runs (save_steps 1); scratch ${root}` +
            `${hasOverwrite ? "" : " (no --overwrite_output_dir key: reruns without a checkpoint reuse the folder as it is)"}`
    );

    const refOut = path.join(root, "reference");
    const ref = await runTrain([...base, "--output_dir", refOut], refOut, null, timeoutMs);
    if (ref.code !== 0) throw new Error(`the uninterrupted run failed (exit ${ref.signal ?? ref.code}): ${ref.stderr}`);
    const refAdapter = readFileSync(path.join(refOut, "final", "adapter_model.safetensors"));
    const refMetrics = metricsView(refOut);
    if (typeof refMetrics === "string") throw new Error(`the uninterrupted run's ${refMetrics}`);
    console.log(
        `uninterrupted run: ${(ref.ms / 1000).toFixed(1)} s, ${refMetrics.train.length} train records, ${refMetrics.eval.length} eval records`
    );

    const stats = {
        kills: 0,
        inSave: 0,
        resumed: 0,
        restarts: 0,
        trials: 0,
        finished: 0,
        identical: 0,
        mismatches: 0,
        crashes: 0,
        hangs: 0,
        dataLosses: 0
    };
    const problems: string[] = [];
    let trial = 0;
    while (stats.kills < targetKills) {
        trial++;
        stats.trials++;
        const out = path.join(root, `trial-${trial}`);
        let killsThisTrial = 0,
            resume = false,
            done = false;
        const history: string[] = [];
        while (!done) {
            const killIt = killsThisTrial < maxKillsPerTrial && rng.chance(0.75);
            // half the kills at a random moment, half inside the k-th save of the run (k over every save, final/ included)
            const plan: KillPlan = !killIt
                ? null
                : rng.chance(0.5)
                  ? {atMs: rng.int(Math.ceil(ref.ms * 1.1))}
                  : {inSave: rng.range(1, steps + 1), delayMs: rng.pick([0, 0, 1, 2, 5, 10, 20])};
            const args = [...base, "--output_dir", out];
            if (resume) args.push("--resume_from_checkpoint", "true");
            else if (hasOverwrite && listing(out).length > 0) args.push("--overwrite_output_dir", "true");
            const end = await runTrain(args, out, plan, timeoutMs);
            const how =
                plan === null
                    ? "no kill"
                    : "atMs" in plan
                      ? `kill at ${plan.atMs} ms`
                      : `kill ${plan.delayMs} ms into save ${plan.inSave}`;
            history.push(
                `${resume ? "resume" : "fresh"} (${how}) -> ${end.killed ? `killed${end.inSave ? " inside a save" : ""}` : end.hung ? "hung" : `exit ${end.signal ?? end.code}`}`
            );
            if (end.hung) {
                stats.hangs++;
                problems.push(`trial ${trial}: a run did not end in ${timeoutMs / 1000} s [${history.join("; ")}]`);
                break;
            }
            if (end.killed) {
                stats.kills++;
                killsThisTrial++;
                if (end.inSave) stats.inSave++;
                const losses = checkAfterKill(out, end.listing);
                if (losses.length) {
                    stats.dataLosses++;
                    problems.push(
                        `trial ${trial}: data loss after a kill (listing before it: ${end.listing.join(", ")}): ${losses.join("; ")} [${history.join("; ")}]`
                    );
                }
                resume = listing(out).some((n) => /^checkpoint-\d+$/.test(n));
                if (resume) stats.resumed++;
                else stats.restarts++;
                continue;
            }
            if (end.code !== 0) {
                stats.crashes++;
                problems.push(
                    `trial ${trial}: exit ${end.signal ?? end.code}: ${end.stderr.split("\n").slice(-3).join(" / ")} [${history.join("; ")}]`
                );
                break;
            }
            done = true;
            stats.finished++;
            const adapter = readFileSync(path.join(out, "final", "adapter_model.safetensors"));
            const metrics = metricsView(out);
            const same = adapter.equals(refAdapter);
            const sameMetrics = typeof metrics !== "string" && JSON.stringify(metrics) === JSON.stringify(refMetrics);
            if (same && sameMetrics) stats.identical++;
            else {
                stats.mismatches++;
                const why = [
                    !same ? "the adapter differs" : null,
                    typeof metrics === "string"
                        ? metrics
                        : !sameMetrics
                          ? `metrics differ (train ${metrics.train.length} vs ${refMetrics.train.length} records, ` +
                            `first difference at train record ${metrics.train.findIndex((x, i) => x !== refMetrics.train[i])}; eval ${metrics.eval.length} vs ${refMetrics.eval.length})`
                          : null
                ]
                    .filter(Boolean)
                    .join("; ");
                problems.push(`trial ${trial}: ${why} [${history.join("; ")}]`);
            }
        }
        if (!args.has("keep") && !problems.some((p) => p.startsWith(`trial ${trial}:`)))
            await fs.rm(out, {recursive: true, force: true});
        console.log(`trial ${trial}: ${history.join("; ")}`);
    }
    console.log("");
    console.log(
        table(
            [
                "kills",
                "kills inside a checkpoint/final write",
                "resumed runs",
                "restarts (no checkpoint yet)",
                "finished trials",
                "bit-identical",
                "mismatches",
                "crashes",
                "hangs",
                "data losses"
            ],
            [
                stats.kills,
                stats.inSave,
                stats.resumed,
                stats.restarts,
                stats.finished,
                stats.identical,
                stats.mismatches,
                stats.crashes,
                stats.hangs,
                stats.dataLosses
            ]
        )
    );
    for (const p of problems) console.log(`PROBLEM ${p}`);
    if (problems.length === 0 && !args.has("keep")) await fs.rm(root, {recursive: true, force: true});
    else console.log(`folders kept under ${root}`);
    return problems.length ? 1 : 0;
}

main().then(
    (code) => process.exit(code),
    (err) => {
        console.error(`soak: ${(err as Error).stack ?? err}`);
        process.exit(2);
    }
);
