// doctor.ts: `qlora doctor`: what this machine has for qlora, one check a line (ok / warn / fail + what to do):
// Node.js, the native CPU addon and the CPU features its kernels use, the CUDA addon, driver, GPUs and cuBLASLt,
// the device --device auto picks, disk space, python3 and node-llama-cpp (each needed by one eval feature only),
// the eval data folder, and whether the current folder is writable. Everything it looks at comes through a
// DoctorEnvironment, so tests fake each missing piece; nothing here needs a GPU or takes long.
import {spawnSync} from "node:child_process";
import {constants as fsConstants, existsSync, promises as fs, readdirSync, readFileSync} from "node:fs";
import {createRequire} from "node:module";
import os from "node:os";
import path from "node:path";
import {
    chooseDevice,
    computeCapability,
    cudaAvailability,
    MIN_COMPUTE_CAPABILITY,
    systemCudaProbe,
    type CudaProbe
} from "../backend/cuda.js";
import {loadNative, packageRoot} from "../backend/native.js";
import {evalDataRoot} from "../eval/task.js";
import {hubCacheDir} from "../io/hub.js";

export type CheckStatus = "ok" | "warn" | "fail";

export interface DoctorCheck {
    name: string;
    status: CheckStatus;
    /** what was found */
    detail: string;
    /** what to do, when not ok */
    fix?: string;
    /** a failure of this check makes qlora unusable (exit code 1) */
    required: boolean;
}

export interface DoctorReport {
    checks: DoctorCheck[];
    /** no required check failed */
    ok: boolean;
}

/** everything the checks look at; systemDoctorEnvironment() is this machine, tests replace pieces */
export interface DoctorEnvironment {
    nodeVersion: string;
    platform: string;
    arch: string;
    cores: number;
    /** loads the CPU addon (throws with the reason when it cannot) and returns its thread count */
    cpuAddonThreads(): number;
    cuda: CudaProbe;
    /** the CPU's feature flags (Linux: /proc/cpuinfo), or null when unknown */
    cpuFlags(): string[] | null;
    env: NodeJS.ProcessEnv;
    cwd: string;
    /** free bytes on the file system holding `dir` (or its nearest existing parent), or null */
    freeDiskBytes(dir: string): Promise<number | null>;
    canWrite(dir: string): Promise<boolean>;
    /** python3's version ("3.12.3"), or null when it is not on the PATH or does not run */
    python3Version(): string | null;
    /** node-llama-cpp's version and whether its prebuilt binary for this platform is installed, or null */
    llamaCpp(): {version: string; binary: boolean} | null;
    /** the benchmark data folder qlora eval would use, and whether it exists; null when none is set */
    evalData(): {dir: string; exists: boolean} | null;
}

/** the first folders of the module resolution paths holding `name`, or null */
function installedPackageDir(name: string): string | null {
    const req = createRequire(path.join(packageRoot, "package.json"));
    for (const dir of req.resolve.paths(name) ?? [])
        if (existsSync(path.join(dir, name, "package.json"))) return path.join(dir, name);
    return null;
}

/** this machine */
export function systemDoctorEnvironment(): DoctorEnvironment {
    return {
        nodeVersion: process.versions.node,
        platform: process.platform,
        arch: process.arch,
        cores: os.availableParallelism(),
        cpuAddonThreads: () => loadNative().getNumThreads(),
        cuda: systemCudaProbe,
        cpuFlags: () => {
            try {
                const m = /^flags\s*:\s*(.*)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"));
                return m ? m[1].trim().split(/\s+/) : null;
            } catch {
                return null;
            }
        },
        env: process.env,
        cwd: process.cwd(),
        freeDiskBytes: async (dir) => {
            let d = path.resolve(dir);
            while (!existsSync(d) && path.dirname(d) !== d) d = path.dirname(d);
            try {
                const s = await fs.statfs(d);
                return s.bavail * s.bsize;
            } catch {
                return null;
            }
        },
        canWrite: async (dir) => {
            try {
                await fs.access(dir, fsConstants.W_OK);
                return true;
            } catch {
                return false;
            }
        },
        python3Version: () => {
            const r = spawnSync("python3", ["--version"], {encoding: "utf8", timeout: 5000});
            if (r.error || r.status !== 0) return null;
            return (r.stdout || r.stderr).trim().replace(/^Python\s+/, "");
        },
        llamaCpp: () => {
            const dir = installedPackageDir("node-llama-cpp");
            if (!dir) return null;
            const version = String(JSON.parse(readFileSync(path.join(dir, "package.json"), "utf8")).version ?? "?");
            // its prebuilt binaries are optional packages @node-llama-cpp/<platform>-<arch>[-variant]
            const scope = path.join(path.dirname(dir), "@node-llama-cpp");
            const prefix = `${process.platform === "darwin" ? "mac" : process.platform === "win32" ? "win" : process.platform}-${process.arch}`;
            let binary = false;
            try {
                binary = readdirSync(scope).some((n) => n === prefix || n.startsWith(`${prefix}-`));
            } catch {
                binary = false;
            }
            return {version, binary};
        },
        evalData: () => {
            const dir = evalDataRoot();
            return dir ? {dir, exists: existsSync(dir)} : null;
        }
    };
}

const GiB = 2 ** 30;
const gib = (b: number) => `${(b / GiB).toFixed(1)} GiB`;
/** a 7B model in bf16 takes 15 GiB of disk: less free than this in the cache is worth a warning */
const CACHE_FREE_WARN = 16 * GiB;
/** checkpoints and adapters of a run: a few GiB */
const CWD_FREE_WARN = 2 * GiB;

/** the CUDA driver's version as the driver API encodes it (12040) in the usual form (12.4) */
function cudaVersion(v: number): string {
    return `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}`;
}

/** the checks, in order */
export async function runDoctor(e: DoctorEnvironment = systemDoctorEnvironment()): Promise<DoctorReport> {
    const checks: DoctorCheck[] = [];
    const add = (name: string, status: CheckStatus, detail: string, fix?: string, required = false) =>
        checks.push({name, status, detail, ...(fix ? {fix} : {}), required});

    const major = Number(e.nodeVersion.split(".")[0]);
    add(
        "node",
        major >= 20 ? "ok" : "fail",
        `Node.js ${e.nodeVersion} (${e.platform}-${e.arch})`,
        major >= 20 ? undefined : "qlora needs Node.js 20 or newer: install it from nodejs.org or with nvm",
        true
    );

    try {
        const threads = e.cpuAddonThreads();
        add("cpu addon", "ok", `native CPU ops loaded; ${threads} threads on ${e.cores} cores`, undefined, true);
    } catch (err) {
        add(
            "cpu addon",
            "fail",
            (err as Error).message,
            "run: npm run build:native (needs cmake and a C++17 compiler with OpenMP)",
            true
        );
    }

    const flags = e.cpuFlags();
    if (e.arch === "x64" && flags) {
        const has = (f: string) => flags.includes(f);
        const avx512 = ["avx512f", "avx512bw", "avx512vl", "avx512dq"].every(has);
        const noAvx512 = e.env.QLORA_NO_AVX512 === "1";
        if (!has("avx2") || !has("fma") || !has("f16c"))
            add(
                "cpu features",
                "fail",
                `the CPU lacks ${["avx2", "fma", "f16c"].filter((f) => !has(f)).join(", ")}, which the CPU ops are built for`,
                "rebuild the addon without them (QLORA_CPU_FLAGS in CMakeLists.txt), or use a newer CPU",
                true
            );
        else
            add(
                "cpu features",
                "ok",
                `matrix kernels: ${avx512 && !noAvx512 ? "AVX-512" : "AVX2 + FMA"}` +
                    (avx512 && noAvx512 ? " (AVX-512 present, turned off by QLORA_NO_AVX512=1)" : "") +
                    (!avx512 ? " (no AVX-512)" : ""),
                undefined,
                true
            );
    } else
        add(
            "cpu features",
            "warn",
            e.arch === "x64"
                ? "the CPU's feature flags are unknown here"
                : `${e.arch}: the CPU ops run their portable scalar code (slow)`,
            e.arch === "x64" ? undefined : "train on a GPU, or on an x86-64 CPU with AVX2",
            true
        );

    const a = cudaAvailability(e.cuda);
    if (!a.info)
        add(
            "cuda addon",
            "warn",
            `not built or not loadable: ${e.cuda.addonError() ?? "unknown reason"}`,
            "only needed for GPUs: install the CUDA toolkit (nvcc), then npm run build:native"
        );
    else {
        add("cuda addon", "ok", `built (CUDA runtime ${cudaVersion(a.info.runtimeVersion)})`);
        if (a.info.driverVersion === 0 || a.info.devices.length === 0)
            add(
                "gpu",
                "warn",
                `no usable NVIDIA GPU: ${a.info.error ?? "no device found"}`,
                a.info.driverVersion === 0
                    ? "install the NVIDIA driver (libcuda.so.1 on the library path)"
                    : "check CUDA_VISIBLE_DEVICES"
            );
        for (const d of a.info.devices) {
            const cc = computeCapability(d);
            const memory = `${gib(d.totalBytes)}${d.freeBytes === undefined ? "" : `, ${gib(d.freeBytes)} free`}`;
            add(
                `gpu ${d.index}`,
                cc >= MIN_COMPUTE_CAPABILITY ? "ok" : "warn",
                `${d.name}, compute capability ${cc.toFixed(1)}, ${memory}, driver CUDA ${cudaVersion(a.info.driverVersion)}`,
                cc >= MIN_COMPUTE_CAPABILITY
                    ? undefined
                    : `older than the ${MIN_COMPUTE_CAPABILITY.toFixed(1)} (Ampere) the kernels need: qlora runs on the CPU here`
            );
        }
        add(
            "cublasLt",
            a.info.cublasLt ? "ok" : "warn",
            a.info.cublasLt ?? "libcublasLt.so (CUDA 12 or 13) not found",
            a.info.cublasLt
                ? undefined
                : "install the CUDA toolkit's cuBLAS (e.g. libcublas-13-0) or add its lib64 folder to LD_LIBRARY_PATH"
        );
    }
    const choice = chooseDevice("auto", e.cuda);
    add(
        "device auto",
        choice.device === "cpu" && choice.gpuSeen ? "warn" : "ok",
        choice.device === "cuda" || choice.gpuSeen
            ? choice.line.replace(/^device: /, "picks ")
            : "picks cpu (no GPU here: see the cuda checks above)"
    );

    const cache = hubCacheDir(e.env);
    const cacheFree = await e.freeDiskBytes(cache);
    add(
        "hf cache",
        cacheFree === null ? "warn" : cacheFree < CACHE_FREE_WARN ? "warn" : "ok",
        `${cache}: ${cacheFree === null ? "free space unknown" : `${gib(cacheFree)} free`}`,
        cacheFree !== null && cacheFree < CACHE_FREE_WARN
            ? "a 7B model takes 15 GiB: free some space or point HF_HUB_CACHE (or HF_HOME) at a larger disk"
            : undefined
    );
    const cwdFree = await e.freeDiskBytes(e.cwd);
    const writable = await e.canWrite(e.cwd);
    add(
        "current folder",
        !writable || cwdFree === null || cwdFree < CWD_FREE_WARN ? "warn" : "ok",
        `${e.cwd}: ${writable ? "writable" : "not writable"}, ${cwdFree === null ? "free space unknown" : `${gib(cwdFree)} free`}`,
        !writable
            ? "qlora train writes ./qlora_output by default: run it where you can write, or set output_dir"
            : cwdFree !== null && cwdFree < CWD_FREE_WARN
              ? "checkpoints take space: free some, or set output_dir on a larger disk"
              : undefined
    );

    const python = e.python3Version();
    add(
        "python3",
        python ? "ok" : "warn",
        python ? `Python ${python} (used only by the humaneval eval task)` : "not found (used only by the humaneval eval task)",
        python ? undefined : "install Python 3 and put python3 on the PATH to run qlora eval --task humaneval"
    );
    const llama = e.llamaCpp();
    add(
        "node-llama-cpp",
        llama?.binary ? "ok" : "warn",
        llama
            ? `${llama.version}${llama.binary ? "" : ", without a prebuilt llama.cpp binary for this platform"} (used only by qlora eval --compare gguf)`
            : "not installed (an optional dependency, used only by qlora eval --compare gguf)",
        llama?.binary ? undefined : "npm install node-llama-cpp@3.21.1"
    );
    const data = e.evalData();
    add(
        "eval data",
        data?.exists ? "ok" : "warn",
        data
            ? `${data.dir}${data.exists ? "" : " does not exist"} (the benchmark data of qlora eval --task)`
            : "no benchmark data folder (the data of qlora eval --task mmlu, ...)",
        data?.exists ? undefined : "set QLORA_EVAL_DATA to the folder with the benchmark archives, or pass --data-dir"
    );
    return {checks, ok: !checks.some((c) => c.required && c.status === "fail")};
}
