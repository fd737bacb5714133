// HumanEval execution (src/eval/code-exec.ts): program assembly as openai/human-eval does it, pass/fail/timeout,
// and the confinement: no process left behind, no write outside the scratch directory, no network, a clean
// environment, the scratch directory removed, output capped. Skipped where python3 is not on the PATH.
import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync} from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import {gunzipSync} from "node:zlib";
import {QloraError} from "../src/errors.js";
import {
    humanEvalProgram,
    requirePython3,
    runPythonTests,
    runPythonTestsMany,
    type HumanEvalProblem
} from "../src/eval/code-exec.js";
import {DATASETS} from "./helpers/paths.js";

interface HumanEvalRecord extends HumanEvalProblem {
    task_id: string;
    canonical_solution: string;
}

function humanEval(): HumanEvalRecord[] {
    return gunzipSync(readFileSync(path.join(DATASETS, "eval", "humaneval.jsonl.gz")))
        .toString("utf8")
        .trim()
        .split("\n")
        .map((line) => JSON.parse(line) as HumanEvalRecord);
}

function python3OrNull(): string | null {
    try {
        return requirePython3();
    } catch {
        return null;
    }
}

/** whether a process (or, with a negative id, a process group) exists */
function alive(pid: number): boolean {
    try {
        process.kill(pid, 0);
        return true;
    } catch (err) {
        return (err as NodeJS.ErrnoException).code !== "ESRCH";
    }
}

test("requirePython3 without python3 on the PATH: one line that says HumanEval needs it and how to get it", () => {
    const empty = mkdtempSync(path.join(os.tmpdir(), "qlora-nopython-"));
    try {
        assert.throws(
            () => requirePython3({PATH: empty}),
            (err: unknown) =>
                err instanceof QloraError &&
                !err.message.includes("\n") &&
                err.message.includes("HumanEval task") &&
                err.message.includes("needed for this task only") &&
                err.message.includes("python3 is not on the PATH") &&
                err.message.includes("install Python 3.8 or newer")
        );
    } finally {
        rmSync(empty, {recursive: true});
    }
});

test("humanEvalProgram is prompt + completion + test + check(entry_point)", () => {
    const problem = {prompt: "def f(x):\n", test: "def check(c):\n    assert c(1) == 2\n", entry_point: "f"};
    assert.equal(
        humanEvalProgram(problem, "    return x + 1\n"),
        "def f(x):\n    return x + 1\n\ndef check(c):\n    assert c(1) == 2\n\ncheck(f)"
    );
});

const python = python3OrNull();
const skip = python === null && "python3 is not on the PATH (only the HumanEval task needs it)";

describe("runPythonTests", {skip}, () => {
    const problems = python === null ? [] : humanEval();
    const opts = {timeoutMs: 5000};

    test("HumanEval/0 with its canonical solution passes; a wrong completion fails with the assertion", async () => {
        const problem = problems[0];
        assert.equal(problem.task_id, "HumanEval/0");
        const right = await runPythonTests(humanEvalProgram(problem, problem.canonical_solution), opts);
        assert.equal(right.status, "passed", right.stderr);
        assert.equal(right.detail, "");
        const wrong = await runPythonTests(humanEvalProgram(problem, "    return False\n"), opts);
        assert.equal(wrong.status, "failed");
        assert.equal(wrong.detail, "AssertionError");
        assert.match(wrong.stderr, /File "program\.py", line \d+, in check/);
        const broken = await runPythonTests(humanEvalProgram(problem, "    return undefined_name\n"), opts);
        assert.equal(broken.detail, "NameError: name 'undefined_name' is not defined");
    });

    test("leaving early is not a pass: sys.exit(0), os._exit(0)", async () => {
        const viaSys = await runPythonTests("import sys\nsys.exit(0)\nassert False\n", opts);
        assert.deepEqual([viaSys.status, viaSys.detail], ["failed", "SystemExit: 0"]);
        const viaOs = await runPythonTests("import os\nos._exit(0)\nassert False\n", opts);
        assert.deepEqual([viaOs.status, viaOs.detail], ["failed", "exited with code 0 before the tests finished"]);
    });

    test("a completion that loops forever ends as timeout within the limit + 1 s and leaves no process", async () => {
        const problem = problems[0];
        const started = performance.now();
        const result = await runPythonTests(humanEvalProgram(problem, "    while True:\n        pass\n"), {timeoutMs: 1000});
        const elapsed = performance.now() - started;
        assert.equal(result.status, "timeout");
        assert.equal(result.detail, "timed out after 1000 ms");
        assert.ok(elapsed >= 1000 && elapsed < 2000, `${elapsed} ms`);
        assert.ok(!alive(result.pid), `pid ${result.pid} still exists`);
        assert.ok(!alive(-result.pid), `process group ${result.pid} still exists`);
    });

    test("writes outside the scratch directory do not succeed; writes inside it do", async (t) => {
        const outside = mkdtempSync(path.join(os.tmpdir(), "qlora-outside-"));
        const victim = path.join(outside, "victim.txt");
        writeFileSync(victim, "original");
        try {
            const plain = await runPythonTests(`open(${JSON.stringify(victim)}, "w").write("pwned")\n`, opts);
            assert.equal(plain.status, "failed");
            assert.match(plain.detail, /^PermissionError: /);
            // every way of changing a file that each attempt below takes; the program prints the ones that worked
            const attempts = `import os, json, pathlib
outside, victim = ${JSON.stringify(outside)}, ${JSON.stringify(victim)}
done = []
def attempt(name, fn):
    try:
        fn()
        done.append(name)
    except BaseException:
        pass
attempt("open w", lambda: open(victim, "w").write("pwned"))
attempt("open a", lambda: open(victim, "a").write("pwned"))
attempt("open x", lambda: open(os.path.join(outside, "new.txt"), "x").write("pwned"))
attempt("os.open", lambda: os.write(os.open(os.path.join(outside, "new2.txt"), os.O_WRONLY | os.O_CREAT), b"x"))
attempt("pathlib", lambda: pathlib.Path(outside, "new3.txt").write_text("pwned"))
attempt("remove", lambda: os.remove(victim))
attempt("rename", lambda: os.rename(victim, "stolen.txt"))
attempt("mkdir", lambda: os.mkdir(os.path.join(outside, "d")))
attempt("mkfifo", lambda: os.mkfifo(os.path.join(outside, "fifo")))
attempt("symlink", lambda: os.symlink("/etc/passwd", os.path.join(outside, "link")))
attempt("symlink inside", lambda: os.symlink(victim, "inside-link"))
attempt("write through it", lambda: open("inside-link", "w").write("pwned"))
attempt("write inside", lambda: open("mine.txt", "w").write("mine"))
print(json.dumps(done))
`;
            const full = await runPythonTests(attempts, opts);
            assert.equal(full.status, "passed", full.stderr);
            assert.deepEqual(JSON.parse(full.stdout), ["symlink inside", "write inside"]);
            // Landlock alone (the Python guard off), where the kernel has it: the kernel refuses the same
            const kernel = await runPythonTests(attempts, {...opts, layers: {python: false}});
            if (kernel.landlockAbi === 0) t.diagnostic("Landlock is not available here: only the Python guard was tested");
            else assert.deepEqual(JSON.parse(kernel.stdout), ["symlink inside", "write inside"]);
            assert.equal(readFileSync(victim, "utf8"), "original");
            assert.deepEqual(readdirSync(outside), ["victim.txt"]);
        } finally {
            rmSync(outside, {recursive: true, force: true});
        }
    });

    describe("network", () => {
        let server: net.Server;
        let port = 0;
        let connections = 0;
        before(async () => {
            server = net.createServer((socket) => {
                connections++;
                socket.end("hello\n");
            });
            await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
            port = (server.address() as net.AddressInfo).port;
        });
        after(() => new Promise<void>((resolve) => server.close(() => resolve())));

        const connect = () =>
            `import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(("127.0.0.1", ${port}))\nprint(s.recv(10))\n`;

        test("a program that opens a socket fails, and nothing reaches a server on this machine", async () => {
            const result = await runPythonTests(connect(), opts);
            assert.equal(result.status, "failed");
            assert.equal(result.detail, "PermissionError: qlora sandbox: socket.__new__ is not allowed");
            assert.equal(connections, 0);
        });

        test("with the Python guard off, Landlock refuses the TCP connection (ABI 4+)", async (t) => {
            const result = await runPythonTests(connect(), {...opts, layers: {python: false}});
            if (result.landlockAbi < 4) {
                t.skip(`Landlock ABI ${result.landlockAbi}: no network rules on this kernel`);
                return;
            }
            assert.equal(result.status, "failed");
            assert.equal(result.detail, "PermissionError: [Errno 13] Permission denied");
            assert.equal(connections, 0);
        });
    });

    test("a clean environment, HOME in the scratch directory, which is removed afterwards", async () => {
        const saved = {secret: process.env.QLORA_TEST_SECRET, proxy: process.env.HTTPS_PROXY};
        process.env.QLORA_TEST_SECRET = "hunter2";
        process.env.HTTPS_PROXY = "http://proxy.invalid:3128";
        try {
            const program = `import os, json\nopen("marker.txt", "w").write("x")\nprint(json.dumps(dict(os.environ)))\n`;
            const result = await runPythonTests(program, opts);
            assert.equal(result.status, "passed", result.stderr);
            const env = JSON.parse(result.stdout) as Record<string, string>;
            assert.deepEqual(Object.keys(env).sort(), [
                "HOME",
                "LANG",
                "LC_ALL",
                "OMP_NUM_THREADS",
                "PATH",
                "PYTHONDONTWRITEBYTECODE",
                "TMPDIR"
            ]);
            assert.equal(env.TMPDIR, env.HOME);
            assert.match(path.basename(env.HOME), /^qlora-exec-/);
            assert.ok(!existsSync(env.HOME), `${env.HOME} was left behind`);
        } finally {
            for (const [key, value] of [
                ["QLORA_TEST_SECRET", saved.secret],
                ["HTTPS_PROXY", saved.proxy]
            ] as const)
                if (value === undefined) delete process.env[key];
                else process.env[key] = value;
        }
    });

    test("output is capped: the first and the last half kept, the cut counted", async () => {
        const result = await runPythonTests("for i in range(200000):\n    print(i)\n", {...opts, maxOutputBytes: 1000});
        assert.equal(result.status, "passed");
        const total = Array.from({length: 200000}, (_, i) => `${i}\n`).join("").length;
        assert.ok(result.stdout.startsWith("0\n1\n2\n"));
        assert.ok(result.stdout.endsWith("199998\n199999\n"));
        assert.ok(result.stdout.includes(`…[${total - 1000} bytes cut]…`), result.stdout.slice(490, 560));
    });

    test("the memory limit turns a huge allocation into a MemoryError", async () => {
        const result = await runPythonTests("x = bytearray(3 * 1024 ** 3)\n", {...opts, memoryBytes: 1024 ** 3});
        assert.deepEqual([result.status, result.detail], ["failed", "MemoryError"]);
    });

    test("runPythonTestsMany: the canonical solutions of HumanEval/0-19 all pass, in order", async () => {
        const first20 = problems.slice(0, 20);
        const programs = first20.map((p) => humanEvalProgram(p, p.canonical_solution));
        programs[7] = humanEvalProgram(first20[7], "    return []\n"); // one wrong answer, to see the order kept
        const results = await runPythonTestsMany(programs, {timeoutMs: 5000, jobs: 2});
        const expected = first20.map((_, i) => (i === 7 ? "failed" : "passed"));
        assert.deepEqual(
            results.map((r) => r.status),
            expected,
            results.map((r, i) => `${first20[i].task_id}: ${r.detail}`).join("; ")
        );
        const fixed = await runPythonTests(humanEvalProgram(first20[7], first20[7].canonical_solution), opts);
        assert.equal(fixed.status, "passed");
    });
});
