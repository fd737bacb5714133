// cuda.ts: the CUDA backend as TypeScript sees it: is a GPU usable (and if not, what exactly is missing), and
// device buffers with a dtype and an element count on top of the addon's raw addresses.
import {QloraError} from "../errors.js";
import {cudaAddonError, loadCudaAddon} from "./native.js";
import type {CudaAddon, CudaDeviceInfo, CudaMemoryStats} from "./native-types.js";

/** the oldest GPUs the kernels are built for: Ampere (sm_80) */
export const MIN_COMPUTE_CAPABILITY = 8.0;

export interface CudaAvailability {
    usable: boolean;
    /** what is missing and how to fix it, when not usable */
    reason: string | null;
    info: CudaDeviceInfo | null;
}

/** checks the addon, the driver, a device of compute capability >= 8.0 and cuBLASLt, in that order */
export function cudaAvailability(): CudaAvailability {
    const addon = loadCudaAddon();
    if (!addon)
        return {
            usable: false,
            info: null,
            reason:
                `the CUDA backend is not built: ${cudaAddonError()}. Install the CUDA ` +
                "toolkit (nvcc) and run: npm run build:native"
        };
    const info = addon.deviceInfo();
    if (info.error || info.devices.length === 0)
        return {
            usable: false,
            info,
            reason:
                `no usable NVIDIA GPU: ${info.error ?? "no device found"}` +
                (info.driverVersion === 0
                    ? " (no NVIDIA driver: install it, or check that libcuda.so.1 is on the library path)"
                    : "")
        };
    const best = info.devices.reduce((max, d) => Math.max(max, d.major + d.minor / 10), 0);
    if (best < MIN_COMPUTE_CAPABILITY)
        return {
            usable: false,
            info,
            reason:
                `the GPU (${info.devices[0].name}, compute capability ${best.toFixed(1)}) is ` +
                `older than the ${MIN_COMPUTE_CAPABILITY.toFixed(1)} (Ampere) the kernels need`
        };
    if (!info.cublasLt)
        return {
            usable: false,
            info,
            reason:
                "libcublasLt.so (CUDA 12 or 13) was not found: install the CUDA toolkit's " +
                "cuBLAS (e.g. the libcublas-13-0 package) or add its lib64 folder to LD_LIBRARY_PATH"
        };
    return {usable: true, info, reason: null};
}

/** `--device`: auto takes the GPU when one is usable; cuda fails with the reason when it is not */
export function resolveDevice(requested: "auto" | "cpu" | "cuda"): "cpu" | "cuda" {
    if (requested === "cpu") return "cpu";
    const a = cudaAvailability();
    if (a.usable) return "cuda";
    if (requested === "cuda") throw new QloraError(`--device cuda: ${a.reason}`);
    return "cpu";
}

let addon: CudaAddon | null = null;

export function cuda(): CudaAddon {
    if (addon) return addon;
    const a = cudaAvailability();
    if (!a.usable) throw new QloraError(`CUDA is not usable: ${a.reason}`);
    addon = loadCudaAddon()!;
    return addon;
}

export type DeviceDtype = "f32" | "bf16" | "f16" | "u8" | "i32";
const DTYPE_BYTES: Record<DeviceDtype, number> = {f32: 4, bf16: 2, f16: 2, u8: 1, i32: 4};

/** a device buffer: an address, a dtype and a length in elements */
export class DeviceBuffer {
    private freed = false;
    constructor(
        readonly ptr: number,
        readonly dtype: DeviceDtype,
        readonly length: number
    ) {}

    static alloc(dtype: DeviceDtype, length: number): DeviceBuffer {
        return new DeviceBuffer(cuda().alloc(Math.max(1, length) * DTYPE_BYTES[dtype]), dtype, length);
    }

    static zeros(dtype: DeviceDtype, length: number): DeviceBuffer {
        const b = DeviceBuffer.alloc(dtype, length);
        cuda().memset(b.ptr, 0, b.bytes);
        return b;
    }

    /** f32 from a Float32Array, bf16/f16 from a Uint16Array of bits, u8, i32 */
    static from(dtype: DeviceDtype, data: Float32Array | Uint16Array | Uint8Array | Int32Array): DeviceBuffer {
        const b = DeviceBuffer.alloc(dtype, data.length);
        cuda().upload(b.ptr, data);
        return b;
    }

    get bytes(): number {
        return this.length * DTYPE_BYTES[this.dtype];
    }

    /** copies the buffer to the host (waits for queued work) */
    toHost(): Float32Array | Uint16Array | Uint8Array | Int32Array {
        const out =
            this.dtype === "f32"
                ? new Float32Array(this.length)
                : this.dtype === "i32"
                  ? new Int32Array(this.length)
                  : this.dtype === "u8"
                    ? new Uint8Array(this.length)
                    : new Uint16Array(this.length);
        cuda().download(out, this.ptr);
        return out;
    }

    free(): void {
        if (this.freed) return;
        this.freed = true;
        cuda().free(this.ptr);
    }

    [Symbol.dispose](): void {
        this.free();
    }
}

export function cudaMemoryStats(): CudaMemoryStats {
    return cuda().memoryStats();
}
