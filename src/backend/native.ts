// native.ts: loads the native addons built by `npm run build:native` (build/Release/*.node).
import {createRequire} from "node:module";
import {existsSync} from "node:fs";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {QloraError} from "../errors.js";
import type {CpuAddon, CudaAddon} from "./native-types.js";

const require = createRequire(import.meta.url);

/** the package root: two levels above this file in both src/backend and dist/backend */
export const packageRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

function addonPath(name: string): string {
    return path.join(process.env.QLORA_NATIVE_DIR ?? path.join(packageRoot, "build", "Release"), `${name}.node`);
}

let cpuAddon: CpuAddon | undefined;

export function loadNative(): CpuAddon {
    if (cpuAddon) return cpuAddon;
    const file = addonPath("qlora_cpu");
    if (!existsSync(file))
        throw new QloraError(
            "the native addon is not built. Run: npm run build:native " + "(it needs cmake and a C++17 compiler)",
            {file}
        );
    cpuAddon = require(file) as CpuAddon;
    return cpuAddon;
}

let cudaAddon: CudaAddon | null | undefined;
let cudaLoadError: string | null = null;

/** the CUDA addon, or null when it was not built (no nvcc at build time) or cannot load (no driver) */
export function loadCudaAddon(): CudaAddon | null {
    if (cudaAddon !== undefined) return cudaAddon;
    const file = addonPath("qlora_cuda");
    if (!existsSync(file)) {
        cudaLoadError = `${file} was not built (nvcc was not found when running npm run build:native)`;
        cudaAddon = null;
        return null;
    }
    try {
        cudaAddon = require(file) as CudaAddon;
    } catch (err) {
        cudaLoadError = `${file} failed to load: ${(err as Error).message}`;
        cudaAddon = null;
    }
    return cudaAddon;
}

export function cudaAddonError(): string | null {
    loadCudaAddon();
    return cudaLoadError;
}
