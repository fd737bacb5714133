// fuzz.ts: long fuzz runs of qlora's input readers (issue 8). `npm test` runs a fixed-seed few hundred cases per
// format (test/harden-fuzz.test.ts); this runs as many as asked, with a new seed each time unless one is given.
//
//   npm run fuzz -- --cases 10000                  every format, 10000 cases each, a random seed (printed)
//   npm run fuzz -- --format gguf,yaml --seed 7    some formats, a fixed seed
//   npm run fuzz -- --format config --seed 7 --case 123 [--cli]   replay one case (its folder is kept)
//
// --jobs N spreads each format's cases over N workers, and --start K runs case numbers K.. (case i of a seed is the
// same case whatever the jobs or the run: two runs with --start 0 and --start 5000 make one run of 10000 cases).
// Options: --verbose (every case's outcome), --control (with --case: the unmutated seed), --cli-cases N (CLI end-to-end cases per format; default cases/100, at least 2), --timeout MS (a worker
// case), --cli-timeout MS, --rss-mb N (memory cap per case), --heap-mb N (the worker's V8 heap), --list.
// Prints a table per format and every failure with its seed, case number and mutations; failing case folders are
// kept under $TMPDIR/qlora-fuzz-failures/. Exit code 1 when any case failed.
import {FORMATS} from "../test/fuzz/formats.js";
import {
    describeFailure,
    FAILURES_DIR,
    formatTable,
    FuzzSession,
    isFailure,
    summarize,
    type CaseResult,
    type FormatSummary
} from "../test/fuzz/harness.js";
import {intArg, parseArgs} from "./args.js";

async function main(): Promise<number> {
    const args = parseArgs(process.argv.slice(2));
    const known = new Set([
        "cases",
        "format",
        "seed",
        "case",
        "cli",
        "cli-cases",
        "timeout",
        "cli-timeout",
        "rss-mb",
        "heap-mb",
        "list",
        "verbose",
        "control",
        "jobs",
        "start"
    ]);
    for (const k of args.keys())
        if (!known.has(k)) throw new Error(`unknown option --${k} (known: ${[...known].map((x) => `--${x}`).join(", ")})`);
    if (args.has("list")) {
        for (const f of FORMATS) console.log(`${f.name.padEnd(18)} ${f.description}`);
        return 0;
    }
    const formats =
        args
            .get("format")
            ?.split(",")
            .map((s) => s.trim())
            .filter(Boolean) ?? FORMATS.map((f) => f.name);
    for (const f of formats) if (!FORMATS.some((x) => x.name === f)) throw new Error(`unknown format "${f}" (--list shows them)`);
    const seed = intArg(args, "seed", Math.floor(Math.random() * 2 ** 31));
    const cases = intArg(args, "cases", 200);
    const cliCases = intArg(args, "cli-cases", Math.max(2, Math.floor(cases / 100)));
    const start = intArg(args, "start", 0),
        cliStart = Math.floor(start / 100);
    const jobs = args.has("case") ? 1 : intArg(args, "jobs", 1);
    if (jobs < 1) throw new Error("--jobs must be at least 1");
    const sessions = await Promise.all(
        Array.from({length: jobs}, () =>
            FuzzSession.create({
                seed,
                timeoutMs: intArg(args, "timeout", 60_000),
                cliTimeoutMs: intArg(args, "cli-timeout", 90_000),
                rssCapMb: intArg(args, "rss-mb", 2048),
                heapMb: intArg(args, "heap-mb", 1024),
                keepFailures: true,
                verbose: args.has("verbose"),
                log: (l) => console.log(l)
            })
        )
    );
    const session = sessions[0];
    const summaries: FormatSummary[] = [];
    const failures: CaseResult[] = [];
    try {
        if (args.has("case")) {
            const index = intArg(args, "case", 0);
            const via = args.has("cli") ? "cli" : "lib";
            for (const format of formats) {
                const r = await session.runCase(format, index, via, !args.has("control"));
                console.log(
                    isFailure(r)
                        ? describeFailure(r)
                        : `ok: ${format} seed ${seed} case ${index} (${via}) ended ${r.primary}` +
                              `${r.detail ? `: ${r.detail}` : ""}\n    mutations: ${r.mutations.join(" | ")}`
                );
                summaries.push(summarize(format, via, [r]));
                if (isFailure(r)) failures.push(r);
            }
        } else {
            console.log(
                `qlora fuzz: seed ${seed}, ${cases} cases per format in the worker + ${cliCases} through the CLI${start ? ` from case ${start} (CLI ${cliStart})` : ""}; ` +
                    `formats ${formats.join(", ")}${jobs > 1 ? `; ${jobs} jobs` : ""}`
            );
            for (const format of formats) {
                const started = Date.now();
                // job j takes the j-th contiguous slice of the case numbers (and of the CLI case numbers)
                const slice = (n: number, j: number) => [Math.floor((n * j) / jobs), Math.floor((n * (j + 1)) / jobs)];
                const parts = await Promise.all(
                    sessions.map((s, j) => {
                        const [a, b] = slice(cases, j),
                            [ca, cb] = slice(cliCases, j);
                        return s.runFormat(format, b - a, cb - ca, start + a, cliStart + ca);
                    })
                );
                const control = parts.flatMap((p) => p.control),
                    lib = parts.flatMap((p) => p.lib),
                    cli = parts.flatMap((p) => p.cli);
                summaries.push(summarize(format, "lib", lib), summarize(format, "cli", cli));
                failures.push(...control.filter(isFailure), ...lib.filter(isFailure), ...cli.filter(isFailure));
                console.log(formatTable(summaries.slice(-2)));
                console.log(
                    `${format}: ${lib.length + cli.length} cases in ${((Date.now() - started) / 1000).toFixed(1)} s, ` +
                        `${lib.filter(isFailure).length + cli.filter(isFailure).length} failing` +
                        (control.some(isFailure)
                            ? "; THE CONTROL CASE FAILED: the seeds do not load, the counts mean little"
                            : "")
                );
            }
        }
    } finally {
        await Promise.all(sessions.map((s) => s.close()));
    }
    console.log(`\nseed ${seed}\n${formatTable(summaries)}`);
    if (failures.length) console.log(`\n${failures.length} failing cases (folders kept under ${FAILURES_DIR})`);
    return failures.length ? 1 : 0;
}

main().then(
    (code) => process.exit(code),
    (err) => {
        console.error(`fuzz: ${(err as Error).stack ?? err}`);
        process.exit(2);
    }
);
