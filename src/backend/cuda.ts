// cuda.ts: the CUDA backend as TypeScript sees it: is a GPU usable (and if not, what exactly is missing), which
// device --device picks and why, and device buffers with a dtype and an element count on top of the addon's raw
// addresses.
import {existsSync} from "node:fs";
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

/** what cudaAvailability looks at; tests hand in a fake one (the CUDA addon is loaded once per process) */
export interface CudaProbe {
    /** the CUDA addon's device query, or null when the addon is not built or cannot load */
    deviceInfo(): CudaDeviceInfo | null;
    /** why the addon is missing, when it is */
    addonError(): string | null;
    /**
     * the machine shows this process an NVIDIA GPU whether or not the addon is built: a loaded kernel driver
     * (Linux: /proc/driver/nvidia/version) and no CUDA_VISIBLE_DEVICES hiding every device
     */
    gpuPresent(): boolean;
}

export const systemCudaProbe: CudaProbe = {
    deviceInfo: () => loadCudaAddon()?.deviceInfo() ?? null,
    addonError: cudaAddonError,
    gpuPresent: () => {
        const visible = process.env.CUDA_VISIBLE_DEVICES;
        return existsSync("/proc/driver/nvidia/version") && visible !== "" && visible !== "-1";
    }
};

/** a device's compute capability as a number (8.6) */
export function computeCapability(d: {major: number; minor: number}): number {
    return d.major + d.minor / 10;
}

/** checks the addon, the driver, a device of compute capability >= 8.0 and cuBLASLt, in that order */
export function cudaAvailability(probe: CudaProbe = systemCudaProbe): CudaAvailability {
    const info = probe.deviceInfo();
    if (!info)
        return {
            usable: false,
            info: null,
            reason:
                `the CUDA backend is not built: ${probe.addonError()}. Install the CUDA ` +
                "toolkit (nvcc) and run: npm run build:native"
        };
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
    const best = info.devices.reduce((max, d) => Math.max(max, computeCapability(d)), 0);
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

/** the device a command runs on, and why */
export interface DeviceChoice {
    device: "cpu" | "cuda";
    /** why: the GPU's name, compute capability and memory; or why auto passed the GPU over */
    reason: string;
    /**
     * the machine has an NVIDIA GPU (or driver) to tell about: the GPU was chosen, or passed over for a reason the
     * user can fix. On a machine without one, auto's choice of the CPU needs no line.
     */
    gpuSeen: boolean;
    /** the one line commands print: `device: cuda (NVIDIA H100 80GB HBM3, compute capability 9.0, 79.1 GiB)` */
    line: string;
    availability: CudaAvailability | null;
}

/** the GPU a CUDA run uses (device 0: the kernels run on the current device, which is 0 unless set) */
function gpuDescription(info: CudaDeviceInfo): string {
    const d = info.devices[0];
    return `${d.name}, compute capability ${computeCapability(d).toFixed(1)}, ${(d.totalBytes / 2 ** 30).toFixed(1)} GiB`;
}

/** `--device`: auto takes the GPU when one is usable (else the CPU, saying why); cuda fails with the reason */
export function chooseDevice(requested: "auto" | "cpu" | "cuda", probe: CudaProbe = systemCudaProbe): DeviceChoice {
    const choice = (device: "cpu" | "cuda", reason: string, gpuSeen: boolean, availability: CudaAvailability | null) => ({
        device,
        reason,
        gpuSeen,
        line: `device: ${device} (${reason})`,
        availability
    });
    if (requested === "cpu") return choice("cpu", "--device cpu", false, null);
    const a = cudaAvailability(probe);
    if (a.usable && a.info) return choice("cuda", gpuDescription(a.info), true, a);
    if (requested === "cuda") throw new QloraError(`--device cuda: ${a.reason}`);
    const gpuSeen = (a.info?.devices.length ?? 0) > 0 || probe.gpuPresent();
    return choice("cpu", `auto: ${a.reason}`, gpuSeen, a);
}

/** `--device` as a device name (chooseDevice without the reason) */
export function resolveDevice(requested: "auto" | "cpu" | "cuda"): "cpu" | "cuda" {
    return chooseDevice(requested).device;
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
export const DTYPE_BYTES: Record<DeviceDtype, number> = {f32: 4, bf16: 2, f16: 2, u8: 1, i32: 4};

/** a device buffer: an address, a dtype and a length in elements */
export class DeviceBuffer {
    private freed = false;
    constructor(
        readonly ptr: number,
        readonly dtype: DeviceDtype,
        readonly length: number,
        /** in pinned host memory mapped for the device (hostResident), not in device memory */
        readonly onHost = false
    ) {}

    static alloc(dtype: DeviceDtype, length: number): DeviceBuffer {
        const bytes = Math.max(1, length) * DTYPE_BYTES[dtype];
        try {
            return new DeviceBuffer(cuda().alloc(bytes), dtype, length);
        } catch (err) {
            if (err instanceof Error && /out of GPU memory/.test(err.message))
                throw outOfMemoryError(bytes, cuda().memoryStats(), err);
            throw err;
        }
    }

    static zeros(dtype: DeviceDtype, length: number): DeviceBuffer {
        const b = DeviceBuffer.alloc(dtype, length);
        cuda().memset(b.ptr, 0, b.bytes);
        return b;
    }

    /**
     * A buffer in pinned host memory that kernels read over PCIe, for frozen tables a step reads a few rows of
     * (the input embedding: 1 GiB of a 7B model's device memory for about 15 MB read a step). Its address is
     * the device's (unified addressing), so every op takes it as it takes a device buffer.
     */
    static hostResident(dtype: DeviceDtype, data: Float32Array | Uint16Array | Uint8Array | Int32Array): DeviceBuffer {
        const b = new DeviceBuffer(cuda().hostAlloc(Math.max(1, data.length) * DTYPE_BYTES[dtype]), dtype, data.length, true);
        cuda().upload(b.ptr, data);
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

    /** overwrites the buffer with host data of its length (synchronous) */
    upload(data: Float32Array | Uint16Array | Uint8Array | Int32Array): void {
        if (data.length !== this.length) throw new Error(`upload: ${data.length} elements into a buffer of ${this.length}`);
        cuda().upload(this.ptr, data);
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
        if (this.onHost) cuda().hostFree(this.ptr);
        else cuda().free(this.ptr);
    }

    [Symbol.dispose](): void {
        this.free();
    }
}

/** the addon's out-of-memory error as a one-line QloraError: what was asked for, what is in use, what to change */
export function outOfMemoryError(bytes: number, s: CudaMemoryStats, cause?: unknown): QloraError {
    const gib = (b: number | undefined) => (b === undefined ? "?" : (b / 2 ** 30).toFixed(2));
    return new QloraError(
        `out of GPU memory: allocating ${bytes.toLocaleString("en-US")} bytes (${gib(bytes)} GiB) failed with ${gib(s.allocated)} GiB in use by qlora ` +
            `(peak ${gib(s.peakAllocated)} GiB) and ${gib(s.deviceFree)} GiB free of the GPU's ${gib(s.deviceTotal)} GiB. ` +
            "Training: lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective batch), " +
            "max_seq_length or per_device_eval_batch_size, or set gradient_checkpointing, gradient_checkpointing_offload " +
            "or load_in_4bit (qlora plan shows what fits); generation: lower --max-batch or --ctx-size",
        {cause}
    );
}

export function cudaMemoryStats(): CudaMemoryStats {
    return cuda().memoryStats();
}

/**
 * A CUDA graph: the work some code queues on the stream, recorded once and replayed with one launch (the decoding
 * step of a 7B model is about a thousand kernels; queued one by one from JavaScript, the host, not the GPU, sets
 * the pace). The recorded kernels keep their arguments: what changes between replays must live in device buffers
 * the code read (token ids, positions, lengths), written before each launch. The buffers the recording allocates
 * come from the graph pool (native/cuda/runtime.cpp) and keep their addresses while any graph exists.
 */
export class CudaGraph {
    private destroyed = false;
    private constructor(private readonly handle: number) {}

    /** records what `record` queues (nothing runs); throws, with the recording abandoned, when it cannot be captured */
    static capture(record: () => void): CudaGraph {
        const addon = cuda();
        addon.graphBegin();
        try {
            record();
        } catch (err) {
            try {
                addon.graphDestroy(addon.graphEnd());
            } catch {
                // the capture is over either way; the recording's own error is the one to report
            }
            throw err;
        }
        return new CudaGraph(addon.graphEnd());
    }

    /** queues one replay */
    launch(): void {
        if (this.destroyed) throw new Error("CudaGraph: launched after destroy()");
        cuda().graphLaunch(this.handle);
    }

    /** waits for queued work and frees the graph */
    destroy(): void {
        if (this.destroyed) return;
        this.destroyed = true;
        cuda().graphDestroy(this.handle);
    }
}
