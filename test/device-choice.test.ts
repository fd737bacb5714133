// --device: what cudaAvailability reports and what chooseDevice picks, with each missing piece faked (no addon, no
// driver, a GPU too old, no libcublasLt) and a usable H100; and the out-of-memory message of a failed allocation.
import {test} from "node:test";
import assert from "node:assert/strict";
import {chooseDevice, cudaAvailability, outOfMemoryError, type CudaProbe} from "../src/backend/cuda.js";
import type {CudaDeviceInfo} from "../src/backend/native-types.js";
import {QloraError} from "../src/errors.js";

const H100 = {index: 0, name: "NVIDIA H100 80GB HBM3", major: 9, minor: 0, totalBytes: 85_045_870_592, freeBytes: 84_500_000_000};

function probe(info: CudaDeviceInfo | null, opts: {gpuPresent?: boolean; addonError?: string} = {}): CudaProbe {
    return {
        deviceInfo: () => info,
        addonError: () => opts.addonError ?? null,
        gpuPresent: () => opts.gpuPresent ?? false
    };
}

const info = (patch: Partial<CudaDeviceInfo>): CudaDeviceInfo => ({
    runtimeVersion: 12080,
    driverVersion: 12080,
    error: null,
    devices: [H100],
    cublasLt: "/usr/local/cuda/lib64/libcublasLt.so.12",
    ...patch
});

test("no CUDA addon: auto takes the CPU, and says so only where a GPU is present", () => {
    const missing = "/x/build/Release/qlora_cuda.node was not built (nvcc was not found when running npm run build:native)";
    const a = cudaAvailability(probe(null, {addonError: missing}));
    assert.equal(a.usable, false);
    assert.equal(a.info, null);
    assert.match(a.reason!, /^the CUDA backend is not built: \/x\/build\/Release\/qlora_cuda\.node was not built/);
    assert.match(a.reason!, /npm run build:native$/);
    const quiet = chooseDevice("auto", probe(null, {addonError: missing}));
    assert.equal(quiet.device, "cpu");
    assert.equal(quiet.gpuSeen, false, "no GPU on the machine: nothing to tell");
    assert.equal(quiet.line, `device: cpu (auto: ${a.reason})`);
    const told = chooseDevice("auto", probe(null, {addonError: missing, gpuPresent: true}));
    assert.equal(told.device, "cpu");
    assert.equal(told.gpuSeen, true, "a driver is loaded but the addon is not built: worth a line");
    assert.throws(
        () => chooseDevice("cuda", probe(null, {addonError: missing})),
        (err: Error) => {
            assert.ok(err instanceof QloraError);
            assert.match(err.message, /^--device cuda: the CUDA backend is not built: /);
            return true;
        }
    );
});

test("no driver (driverVersion 0): the reason says to install it", () => {
    const p = probe(info({driverVersion: 0, devices: [], error: "CUDA driver version is insufficient for CUDA runtime version"}));
    const a = cudaAvailability(p);
    assert.equal(a.usable, false);
    assert.equal(
        a.reason,
        "no usable NVIDIA GPU: CUDA driver version is insufficient for CUDA runtime version " +
            "(no NVIDIA driver: install it, or check that libcuda.so.1 is on the library path)"
    );
    const c = chooseDevice("auto", p);
    assert.deepEqual([c.device, c.gpuSeen], ["cpu", false]);
    // a driver without devices (CUDA_VISIBLE_DEVICES="") is no driver problem
    const hidden = cudaAvailability(probe(info({devices: [], error: "no CUDA-capable device is detected"})));
    assert.equal(hidden.reason, "no usable NVIDIA GPU: no CUDA-capable device is detected");
});

test("compute capability 7.5: passed over with its name and capability, and auto says so", () => {
    const t4 = {index: 0, name: "Tesla T4", major: 7, minor: 5, totalBytes: 15_843_721_216};
    const p = probe(info({devices: [t4]}));
    const a = cudaAvailability(p);
    assert.equal(a.usable, false);
    assert.equal(a.reason, "the GPU (Tesla T4, compute capability 7.5) is older than the 8.0 (Ampere) the kernels need");
    const c = chooseDevice("auto", p);
    assert.equal(c.device, "cpu");
    assert.equal(c.gpuSeen, true);
    assert.equal(c.line, `device: cpu (auto: ${a.reason})`);
    assert.throws(() => chooseDevice("cuda", p), /^QloraError: --device cuda: the GPU \(Tesla T4, compute capability 7\.5\)/);
});

test("no libcublasLt: passed over with what to install", () => {
    const p = probe(info({cublasLt: null}));
    const c = chooseDevice("auto", p);
    assert.equal(c.device, "cpu");
    assert.equal(c.gpuSeen, true);
    assert.match(c.reason, /^auto: libcublasLt\.so \(CUDA 12 or 13\) was not found: install the CUDA toolkit's cuBLAS/);
});

test("a usable GPU: cuda, named with its compute capability and memory; --device cpu stays on the CPU", () => {
    const p = probe(info({}));
    assert.deepEqual(cudaAvailability(p), {usable: true, reason: null, info: info({})});
    for (const requested of ["auto", "cuda"] as const) {
        const c = chooseDevice(requested, p);
        assert.equal(c.device, "cuda");
        assert.equal(c.line, "device: cuda (NVIDIA H100 80GB HBM3, compute capability 9.0, 79.2 GiB)");
    }
    const cpu = chooseDevice("cpu", p);
    assert.deepEqual([cpu.device, cpu.line, cpu.gpuSeen], ["cpu", "device: cpu (--device cpu)", false]);
});

test("out of GPU memory: the bytes asked for, the allocator's use and peak, and what to change", () => {
    const GiB = 2 ** 30;
    const err = outOfMemoryError(
        3 * GiB,
        {
            allocated: 70.5 * GiB,
            reserved: 72 * GiB,
            peakAllocated: 75.25 * GiB,
            peakReserved: 76 * GiB,
            numAllocs: 10,
            pagedBytes: 0,
            pinnedHostBytes: 0,
            deviceFree: 1.5 * GiB,
            deviceTotal: 79.19 * GiB
        },
        new Error("out of GPU memory allocating 3221225472 bytes")
    );
    assert.ok(err instanceof QloraError);
    assert.ok(!err.message.includes("\n"));
    assert.match(
        err.message,
        /^out of GPU memory: allocating 3,221,225,472 bytes \(3\.00 GiB\) failed with 70\.50 GiB in use by qlora \(peak 75\.25 GiB\) and 1\.50 GiB free of the GPU's 79\.19 GiB/
    );
    for (const knob of [
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_seq_length",
        "gradient_checkpointing",
        "qlora plan"
    ])
        assert.ok(err.message.includes(knob), knob);
});
