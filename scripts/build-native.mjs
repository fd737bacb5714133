#!/usr/bin/env node
// Builds the native addons with cmake-js: build/Release/qlora_cpu.node always, qlora_cuda.node when nvcc is
// found. QLORA_CUDA=ON forces the CUDA build (fails without nvcc), QLORA_CUDA=OFF skips it; CUDA_ARCHS overrides
// the GPU targets (CMake syntax, e.g. "90-real").
import {spawnSync} from "node:child_process";
import {createRequire} from "node:module";
import path from "node:path";
import {fileURLToPath} from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
const cmakeJs = require.resolve("cmake-js/bin/cmake-js");

const cuda = (process.env.QLORA_CUDA ?? "AUTO").toUpperCase();
// QLORA_BUILD_DIR: another build folder (e.g. an sm_90-only build for the GPU machine beside the full one)
const out = path.resolve(root, process.env.QLORA_BUILD_DIR ?? "build");
const args = [cmakeJs, "build", "--directory", root, "--out", out, `--CDQLORA_CUDA=${cuda}`];
if (process.env.CUDA_ARCHS) args.push(`--CDCMAKE_CUDA_ARCHITECTURES=${process.env.CUDA_ARCHS}`);
if (cuda !== "OFF" && !process.env.CUDACXX) {
    // CMake looks for nvcc on PATH and in /usr/local/cuda/bin
    const which = spawnSync("sh", ["-c", "command -v nvcc || ls /usr/local/cuda/bin/nvcc"], {encoding: "utf8"});
    const nvcc = which.stdout.trim().split("\n")[0];
    if (nvcc) args.push(`--CDCMAKE_CUDA_COMPILER=${nvcc}`);
}
const result = spawnSync(process.execPath, args, {stdio: "inherit", cwd: root});
if (result.status !== 0) {
    console.error(
        "\nqlora: the native build failed. It needs cmake (>= 3.18), a C++17 compiler with OpenMP, and " +
            "optionally nvcc for the CUDA backend. Fix the error above, then run: npm run build:native"
    );
    process.exit(result.status ?? 1);
}
