// code-exec.ts: runs model-written Python with its tests (HumanEval's pass@1), one python3 process per program.
//
// What confines a program, outermost first:
// - a process of its own in a process group of its own, killed as a group (SIGKILL to -pid) at the time limit
//   and again when it ends, so nothing it started outlives it; on Linux it also dies with its parent
//   (PR_SET_PDEATHSIG), and RLIMIT_CPU stops a CPU loop even if qlora is gone;
// - a fresh scratch directory (mkdtemp) as cwd, HOME and TMPDIR, removed afterwards; an environment of its own
//   (PATH, HOME, locale; nothing inherited, so no tokens, keys or proxy settings); `python3 -I -B` (isolated
//   mode: PYTHON* variables, user site-packages and the script's folder ignored; no .pyc written);
// - stdout and stderr read to the end but kept only up to a cap (head and tail);
// - Landlock (Linux 5.13+, no root needed), where the kernel has it: writing, creating, removing, renaming and
//   linking files is refused outside the scratch directory (and /dev/null), TCP bind/connect is refused (Landlock
//   ABI 4+), and signals to processes outside the sandbox are refused (ABI 6+). The kernel enforces these; the
//   program cannot undo them. Reading files is not restricted;
// - the guard of openai/human-eval's `reliability_guard`, run in Python before the program: resource limits
//   (RLIMIT_AS/DATA memory, RLIMIT_FSIZE, RLIMIT_NPROC = 0 so no new process or thread, RLIMIT_CORE 0), the
//   destructive os/shutil/subprocess functions set to None, and, beyond human-eval, an audit hook (PEP 578; it
//   cannot be removed once added) that refuses sockets and name lookups, subprocesses, fork, exec, kill, ctypes,
//   and file writes, removals, renames and chdir outside the scratch directory.
//
// What it does NOT protect against (openai/human-eval's own warning: this is not a security sandbox): without
// Landlock (macOS, old kernels, kernels built without it), file writes and network access are stopped only by the
// Python guard, which a program written to get around it can defeat (its path checks call os.path functions the
// program can replace); reading any file the user can read (SSH keys included) is never prevented, only sending
// it anywhere; UDP and Unix sockets are stopped only by the Python guard; RLIMIT_NPROC is not enforced for root;
// CPU and memory use of other processes is not isolated. Run untrusted models' code in a container or VM.
import {spawn, spawnSync} from "node:child_process";
import {randomBytes} from "node:crypto";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {QloraError} from "../errors.js";

const PYTHON_MIN: readonly [number, number] = [3, 8]; // sys.addaudithook

/** one line, for requirePython3's refusal */
const PYTHON_NEEDED =
    "the HumanEval task runs each completion's tests with python3, which is needed for this task only (the other tasks run without it)";

const pythonByPath = new Map<string, string>();

/**
 * The python3 interpreter on the PATH (of `env`), as the absolute path of the interpreter itself
 * (sys.executable: a pyenv or conda shim needs environment variables that the clean environment of a test run
 * does not have), or a QloraError that says python3 is needed for HumanEval only and how to get it.
 */
export function requirePython3(env: NodeJS.ProcessEnv = process.env): string {
    const key = env.PATH ?? "";
    const known = pythonByPath.get(key);
    if (known !== undefined) return known;
    const probe = spawnSync("python3", ["-I", "-c", "import sys; print(sys.executable); print(*sys.version_info[:2])"], {
        encoding: "utf8",
        env,
        timeout: 30_000
    });
    if (probe.error !== undefined || probe.status !== 0) {
        const why =
            (probe.error as NodeJS.ErrnoException | undefined)?.code === "ENOENT"
                ? "python3 is not on the PATH"
                : `\`python3\` did not run (${probe.error?.message ?? `exit code ${probe.status}`})`;
        throw new QloraError(
            `${PYTHON_NEEDED}, and ${why}: install Python ${PYTHON_MIN.join(".")} or newer (python.org, ` +
                "`apt install python3`, `brew install python`) and put python3 on the PATH, or leave humaneval out of --task"
        );
    }
    const [executable, version = ""] = probe.stdout.trim().split("\n");
    const [major, minor] = version.split(" ").map(Number);
    if (!(major > PYTHON_MIN[0] || (major === PYTHON_MIN[0] && minor >= PYTHON_MIN[1])))
        throw new QloraError(
            `${PYTHON_NEEDED}, and the python3 on the PATH is ${major}.${minor}: install Python ${PYTHON_MIN.join(".")} ` +
                "or newer and put it first on the PATH"
        );
    const python = executable?.trim() || "python3";
    pythonByPath.set(key, python);
    return python;
}

/** a HumanEval record: the function's signature and docstring, its tests, the function the tests call */
export interface HumanEvalProblem {
    prompt: string;
    test: string;
    entry_point: string;
}

/** the program openai/human-eval's check_correctness executes for a completion */
export function humanEvalProgram(problem: HumanEvalProblem, completion: string): string {
    return `${problem.prompt}${completion}\n${problem.test}\ncheck(${problem.entry_point})`;
}

export interface PythonTestOptions {
    /** the wall-clock limit of one program, in milliseconds (openai/human-eval: 3 s) */
    timeoutMs: number;
    /** the interpreter; requirePython3() when not given */
    python?: string;
    /** RLIMIT_AS and RLIMIT_DATA, bytes (default 4 GiB) */
    memoryBytes?: number;
    /** RLIMIT_FSIZE: the largest file the program may write, bytes (default 16 MiB) */
    maxFileBytes?: number;
    /** what is kept of stdout and of stderr each, bytes (default 64 KiB: the first and the last half) */
    maxOutputBytes?: number;
    /**
     * which confinement layers run (both by default). Turning one off is for testing the other: `python: false`
     * skips the Python guard (audit hook, human-eval's disabled functions), so a test can show what Landlock
     * alone refuses.
     */
    layers?: {python?: boolean; landlock?: boolean};
}

export interface PythonTestResult {
    /** passed: the program ran to its end (every test assertion held); timeout: killed at the time limit */
    status: "passed" | "failed" | "timeout";
    /** why it failed: the last line of the traceback ("AssertionError", "NameError: name 'x' is not defined") */
    detail: string;
    stdout: string;
    stderr: string;
    /** the process id (its process group is gone when the result arrives) */
    pid: number;
    /** the Landlock ABI version in force (0: not available, so only the Python guard confined file writes) */
    landlockAbi: number;
    elapsedMs: number;
}

const DEFAULT_MEMORY_BYTES = 4 * 1024 ** 3;
const DEFAULT_MAX_FILE_BYTES = 16 * 1024 ** 2;
const DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024;
const GUARD_FILE = "_qlora_guard.py";
const PROGRAM_FILE = "program.py";

// The guard, run as `python3 -I -B _qlora_guard.py CONFIG` in the scratch directory with the program in
// program.py. The parent writes a one-time token on stdin; the guard writes it to fd 3 only after the program
// returned, so sys.exit(0) or os._exit(0) inside a completion is not a pass. Layers in order: PR_SET_PDEATHSIG
// and Landlock (they need ctypes, which the audit hook then refuses), resource limits, the audit hook,
// human-eval's disabled functions.
const GUARD_SOURCE = `import sys, os, json, builtins, traceback, posixpath

def _qlora_main():
    cfg = json.loads(sys.argv[1])
    token = sys.stdin.buffer.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    scratch = os.path.realpath(os.getcwd())
    with open(${JSON.stringify(PROGRAM_FILE)}, encoding="utf-8") as f:
        source = f.read()
    landlock_abi = _linux(scratch, cfg["parent_pid"], cfg["landlock"]) if sys.platform == "linux" else 0
    os.write(3, b"landlock %d\\n" % landlock_abi)
    _limits(cfg)
    write, exit_now = os.write, os._exit
    if cfg["python_guard"]:
        _audit_hook(scratch)
        _reliability_guard()
    sys.argv = [${JSON.stringify(PROGRAM_FILE)}]
    try:
        exec(compile(source, ${JSON.stringify(PROGRAM_FILE)}, "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        exit_now(1)
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    write(3, b"done " + token + b"\\n")
    exit_now(0)

def _linux(scratch, parent_pid, use_landlock):
    # PR_SET_PDEATHSIG, then Landlock; returns the Landlock ABI in force (0: none)
    try:
        import ctypes, struct
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return 0
    try:
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL: die with qlora
        if os.getppid() != parent_pid:  # a launcher between us (still fine), or qlora already gone
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(137)
        return _landlock(ctypes, struct, libc, scratch) if use_landlock else 0
    finally:
        # the program gets a fresh ctypes, whose import the audit hook refuses
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.") or m == "_ctypes"]:
            del sys.modules[name]

def _landlock(ctypes, struct, libc, scratch):
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    L = ctypes.c_long
    abi = syscall(L(444), None, L(0), L(1))  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    WRITE_FILE, TRUNCATE = 1 << 1, 1 << 14
    # write, remove dir/file, make char/dir/reg/sock/fifo/block/sym; REFER (abi 2); TRUNCATE (abi 3)
    fs = WRITE_FILE | sum(1 << b for b in range(4, 13))
    if abi >= 2:
        fs |= 1 << 13
    if abi >= 3:
        fs |= TRUNCATE
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 3 if abi >= 6 else 0  # abstract Unix sockets, signals: only within the sandbox
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", fs, net, scoped)[:size], size)
    ruleset = syscall(L(444), attr, L(size), L(0))
    if ruleset < 0:
        return 0  # refused (a seccomp filter, a container): the Python guard alone, and landlock 0 says so
    try:
        for where, access in ((scratch, fs), (os.devnull, WRITE_FILE | (TRUNCATE if abi >= 3 else 0))):
            fd = os.open(where, os.O_PATH | os.O_CLOEXEC)
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
            failed = syscall(L(445), L(ruleset), L(1), rule, L(0))  # LANDLOCK_RULE_PATH_BENEATH
            os.close(fd)
            if failed:
                return 0
        # PR_SET_NO_NEW_PRIVS, which restricting oneself without root requires
        if libc.prctl(38, 1, 0, 0, 0) != 0 or syscall(L(446), L(ruleset), L(0)) != 0:
            return 0
        return abi
    finally:
        os.close(ruleset)

def _limits(cfg):
    import resource
    wanted = [
        ("RLIMIT_AS", cfg["memory_bytes"]),
        ("RLIMIT_DATA", cfg["memory_bytes"]),
        ("RLIMIT_FSIZE", cfg["max_file_bytes"]),
        ("RLIMIT_CPU", cfg["cpu_seconds"]),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NPROC", 0),
    ]
    for name, value in wanted:
        if hasattr(resource, name):
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (ValueError, OSError):
                pass  # a hard limit already lower, or a platform without it

def _audit_hook(scratch):
    getcwd, realpath, join, fspath, fsdecode = os.getcwd, posixpath.realpath, posixpath.join, os.fspath, os.fsdecode
    inside_prefix = scratch.rstrip("/") + "/"
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def inside(p):
        if isinstance(p, int):
            return True  # a descriptor already open
        try:
            full = realpath(join(getcwd(), fsdecode(fspath(p))))
        except Exception:
            return False
        return full == scratch or full.startswith(inside_prefix) or full == os.devnull
    refused = {
        "socket.__new__", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
        "socket.gethostbyaddr", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "os.fork", "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym",
        "ctypes.call_function", "ctypes.cdata",
    }
    # the arguments of each file-changing event that name a path to check
    path_args = {
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
        "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
        "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "os.chdir": (0,),
        "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copymode": (1,), "shutil.copystat": (1,),
        "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.chown": (0,),
    }
    def hook(event, args):
        if event == "open":
            if args[2] & writes and not inside(args[0]):
                raise PermissionError("qlora sandbox: writing outside the scratch directory is not allowed: %r" % (args[0],))
        elif event in refused:
            raise PermissionError("qlora sandbox: %s is not allowed" % event)
        elif event in path_args:
            for i in path_args[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError("qlora sandbox: %s outside the scratch directory is not allowed: %r" % (event, args[i]))
    sys.addaudithook(hook)

def _reliability_guard():
    # openai/human-eval's reliability_guard (its resource limits are in _limits)
    import faulthandler, shutil, subprocess
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    os.mkfifo = None  # beyond human-eval: no audit event covers these two
    os.mknod = None
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None

_qlora_main()
`;

/** keeps the first and the last `cap / 2` bytes of a stream, counting what is cut */
class CappedOutput {
    private head: Buffer[] = [];
    private headBytes = 0;
    private tail: Buffer[] = [];
    private tailBytes = 0;
    private cut = 0;
    constructor(private readonly cap: number) {}
    add(chunk: Buffer): void {
        const headRoom = Math.ceil(this.cap / 2) - this.headBytes;
        if (headRoom > 0) {
            this.head.push(chunk.subarray(0, headRoom));
            this.headBytes += Math.min(headRoom, chunk.length);
            chunk = chunk.subarray(headRoom);
        }
        if (chunk.length === 0) return;
        this.tail.push(chunk);
        this.tailBytes += chunk.length;
        const tailCap = Math.floor(this.cap / 2);
        while (this.tailBytes - this.tail[0].length >= tailCap) {
            this.tailBytes -= this.tail[0].length;
            this.cut += this.tail.shift()!.length;
        }
        if (this.tailBytes > tailCap) {
            const drop = this.tailBytes - tailCap;
            this.tail[0] = this.tail[0].subarray(drop);
            this.tailBytes -= drop;
            this.cut += drop;
        }
    }
    text(): string {
        const head = Buffer.concat(this.head).toString("utf8");
        const tail = Buffer.concat(this.tail).toString("utf8");
        return this.cut > 0 ? `${head}\n…[${this.cut} bytes cut]…\n${tail}` : head + tail;
    }
}

/** process groups of programs still running, killed if qlora exits first */
const liveGroups = new Set<number>();
let exitHookInstalled = false;

function killGroup(pid: number): void {
    try {
        process.kill(-pid, "SIGKILL");
    } catch {
        // ESRCH: the group is already gone
    }
}

function lastLine(text: string): string {
    const lines = text.split("\n").filter((l) => l.trim() !== "" && !l.startsWith("…["));
    return lines.length > 0 ? lines[lines.length - 1].trim() : "";
}

function checkPositive(value: number | undefined, name: string): void {
    if (value !== undefined && !(Number.isFinite(value) && value > 0))
        throw new QloraError(`${name} must be a positive number, got ${value}`);
}

/** removes the scratch directory even when the program took the permissions off something in it */
async function removeScratch(dir: string): Promise<void> {
    try {
        await fs.rm(dir, {recursive: true, force: true});
    } catch {
        const walk = async (d: string): Promise<void> => {
            await fs.chmod(d, 0o700).catch(() => undefined);
            for (const entry of await fs.readdir(d, {withFileTypes: true}).catch(() => []))
                if (entry.isDirectory()) await walk(path.join(d, entry.name));
        };
        await walk(dir);
        await fs.rm(dir, {recursive: true, force: true});
    }
}

/**
 * Runs `program` (a whole Python program: for HumanEval, humanEvalProgram's prompt + completion + tests +
 * check call) in a separate python3 process, confined as this module's header says, and tells whether it ran
 * to its end within `timeoutMs`.
 */
export async function runPythonTests(program: string, opts: PythonTestOptions): Promise<PythonTestResult> {
    checkPositive(opts.timeoutMs, "timeoutMs");
    checkPositive(opts.memoryBytes, "memoryBytes");
    checkPositive(opts.maxFileBytes, "maxFileBytes");
    checkPositive(opts.maxOutputBytes, "maxOutputBytes");
    const python = opts.python ?? requirePython3();
    const scratch = await fs.realpath(await fs.mkdtemp(path.join(os.tmpdir(), "qlora-exec-")));
    try {
        await fs.writeFile(path.join(scratch, GUARD_FILE), GUARD_SOURCE);
        await fs.writeFile(path.join(scratch, PROGRAM_FILE), program);
        const config = {
            parent_pid: process.pid,
            landlock: opts.layers?.landlock ?? true,
            python_guard: opts.layers?.python ?? true,
            memory_bytes: Math.floor(opts.memoryBytes ?? DEFAULT_MEMORY_BYTES),
            max_file_bytes: Math.floor(opts.maxFileBytes ?? DEFAULT_MAX_FILE_BYTES),
            // a backstop for a CPU loop that outlives qlora; the wall-clock limit below normally acts first
            cpu_seconds: Math.ceil(opts.timeoutMs / 1000) + 1
        };
        return await runGuarded(python, scratch, config, opts);
    } finally {
        await removeScratch(scratch);
    }
}

function runGuarded(python: string, scratch: string, config: object, opts: PythonTestOptions): Promise<PythonTestResult> {
    const cap = opts.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES;
    const token = randomBytes(16).toString("hex");
    const env = {
        PATH: "/usr/local/bin:/usr/bin:/bin",
        HOME: scratch,
        TMPDIR: scratch,
        LANG: "C.UTF-8",
        LC_ALL: "C.UTF-8",
        PYTHONDONTWRITEBYTECODE: "1",
        OMP_NUM_THREADS: "1"
    };
    const started = performance.now();
    return new Promise((resolve, reject) => {
        const child = spawn(python, ["-I", "-B", "-X", "utf8", GUARD_FILE, JSON.stringify(config)], {
            cwd: scratch,
            env,
            detached: true, // a process group of its own, killed as a whole
            stdio: ["pipe", "pipe", "pipe", "pipe"]
        });
        const stdout = new CappedOutput(cap);
        const stderr = new CappedOutput(cap);
        let control = "";
        let timedOut = false;
        const pid = child.pid;
        if (pid !== undefined) {
            liveGroups.add(pid);
            if (!exitHookInstalled) {
                exitHookInstalled = true;
                process.on("exit", () => {
                    for (const group of liveGroups) killGroup(group);
                });
            }
        }
        const timer = setTimeout(() => {
            timedOut = true;
            if (pid !== undefined) killGroup(pid);
        }, opts.timeoutMs);
        child.stdin.on("error", () => undefined); // EPIPE when it died before reading its token
        child.stdin.end(`${token}\n`);
        child.stdout.on("data", (chunk: Buffer) => stdout.add(chunk));
        child.stderr.on("data", (chunk: Buffer) => stderr.add(chunk));
        const controlStream = child.stdio[3];
        controlStream?.on("data", (chunk: Buffer) => {
            if (control.length < 4096) control += chunk.toString("utf8");
        });
        controlStream?.on("error", () => undefined);
        child.on("error", (err) => {
            clearTimeout(timer);
            if (pid !== undefined) liveGroups.delete(pid);
            reject(new QloraError(`cannot run ${python} (${(err as NodeJS.ErrnoException).code ?? err.message})`, {cause: err}));
        });
        // whatever the program left running in its group goes with it, so that its pipes close
        child.on("exit", () => {
            if (pid !== undefined) killGroup(pid);
        });
        child.on("close", (code, signal) => {
            clearTimeout(timer);
            if (pid === undefined) return;
            killGroup(pid);
            liveGroups.delete(pid);
            const landlockAbi = Number(/^landlock (\d+)$/m.exec(control)?.[1] ?? 0);
            const finished = control.split("\n").includes(`done ${token}`);
            const err = stderr.text();
            let status: PythonTestResult["status"];
            let detail: string;
            if (timedOut) {
                status = "timeout";
                detail = `timed out after ${opts.timeoutMs} ms`;
            } else if (code === 0 && finished) {
                status = "passed";
                detail = "";
            } else {
                status = "failed";
                // exit code 0 without the token: sys.exit(0) or os._exit(0) before the tests ran
                detail =
                    (code !== 0 && lastLine(err)) ||
                    (signal
                        ? `killed by ${signal}${signal === "SIGXCPU" ? " (CPU time limit)" : ""}`
                        : `exited with code ${code} before the tests finished`);
            }
            resolve({
                status,
                detail,
                stdout: stdout.text(),
                stderr: err,
                pid,
                landlockAbi,
                elapsedMs: performance.now() - started
            });
        });
    });
}

/**
 * runPythonTests over many programs, at most `jobs` at once (default: the number of CPUs); results in the
 * order of `programs`.
 */
export async function runPythonTestsMany(
    programs: readonly string[],
    opts: PythonTestOptions & {jobs?: number}
): Promise<PythonTestResult[]> {
    checkPositive(opts.jobs, "jobs");
    const python = opts.python ?? requirePython3();
    const jobs = Math.max(1, Math.min(Math.floor(opts.jobs ?? os.availableParallelism()), programs.length));
    const results: PythonTestResult[] = new Array(programs.length);
    let next = 0;
    const worker = async (): Promise<void> => {
        while (next < programs.length) {
            const i = next++;
            results[i] = await runPythonTests(programs[i], {...opts, python});
        }
    };
    await Promise.all(Array.from({length: jobs}, worker));
    return results;
}
