// merge.test.ts (GPU): qlora merge on the GPU (src/peft/merge-executor.ts, cudaMergeExecutor) against the CPU merge.
// The kernels it adds are bit-exact with their host code: the 4-bit quantizer (native/cuda/nf4.cu) gives the CPU's
// codes and scales, the NF4 round trip, the conversions and the DoRA row scale the CPU executor's bits. Whole merges
// of the fixture adapter (and a DoRA adapter) then differ from the CPU's only through the fp32 GEMM's summation
// order: every value within one bf16/f16 ulp, at most MAX_DIFFERING of the merged values differing (expected: about
// 2^-15 of the values whose f32 sum differs by an ulp for bf16, 2^-12 for f16, i.e. 1e-5..1e-4), the tensors
// without a branch equal.
import {test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {chooseDevice, cudaAvailability, DeviceBuffer} from "../../src/backend/cuda.js";
import {cudaGemmOps} from "../../src/backend/cuda-gemm-types.js";
import {cudaLoraOps} from "../../src/backend/cuda-lora-types.js";
import {f32ToHalf} from "../../src/backend/cpu.js";
import {loadQuantOps, QUANT_TYPE_CODE} from "../../src/backend/native-quant-types.js";
import {Rng} from "../../src/backend/rng.js";
import {loadModelConfig} from "../../src/io/hf-config.js";
import {SafetensorsCheckpoint} from "../../src/io/safetensors.js";
import type {RawFloatTensor} from "../../src/model/weights.js";
import {readAdapter} from "../../src/peft/adapter-files.js";
import {mergeAdapter} from "../../src/peft/merge.js";
import {cpuMergeExecutor, cudaMergeExecutor} from "../../src/peft/merge-executor.js";
import {FIXTURES, MODEL_DIR} from "../helpers/paths.js";
import {doraAdapter} from "../helpers/dora-adapter.js";

const gpu = cudaAvailability();
const skip = gpu.usable ? false : `no usable GPU: ${gpu.reason}`;
const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-gpu-merge-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

/** the most of a merge's projection values that may differ from the CPU merge (each by one ulp) */
const MAX_DIFFERING = 1e-3;

/** normal(0, std) values with the awkward ones mixed in: all-zero blocks, subnormals, -0, one large value a block */
function awkwardValues(n: number, seed: number, std = 0.02): Float32Array {
    const rng = new Rng(seed);
    const v = new Float32Array(n);
    for (let i = 0; i < n; i++) v[i] = std * rng.normal();
    for (let i = 0; i + 64 <= n; i += 64 * 7) v.fill(0, i, i + 64); // a zero block every 7 blocks (of 64)
    for (let i = 5; i < n; i += 301) v[i] = (rng.next() < 0.5 ? -1 : 1) * 1e-39; // f32 subnormals (bf16 keeps them)
    for (let i = 11; i < n; i += 499) v[i] = -0;
    for (let i = 17; i < n; i += 997) v[i] = 40 * std * rng.normal();
    return v;
}

function bytes(a: ArrayBufferView): Buffer {
    return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

test("quantize4bitBf16: the GPU's 4-bit codes and block scales are the CPU's, bit for bit", {skip}, () => {
    const ops = loadQuantOps();
    for (const quantType of ["nf4", "fp4"] as const)
        for (const [n, blocksize] of [
            [64 * 4099 + 37, 64], // an odd n: the last byte's low nibble is the code of 0
            [1, 64],
            [63, 64],
            [32 * 1001, 32],
            [128 * 300 + 2, 128],
            [4096 * 5 + 1000, 4096]
        ]) {
            const bits = f32ToHalf(awkwardValues(n, n + blocksize), "BF16");
            const nblocks = Math.ceil(n / blocksize);
            const packed = new Uint8Array(Math.ceil(n / 2)),
                absmax = new Float32Array(nblocks);
            ops.quantize4bitBf16(packed, absmax, bits, QUANT_TYPE_CODE[quantType], blocksize, n);
            const dIn = DeviceBuffer.from("bf16", bits);
            const dPacked = DeviceBuffer.alloc("u8", packed.length),
                dAbsmax = DeviceBuffer.alloc("f32", nblocks);
            cudaGemmOps().quantize4bitBf16(dPacked.ptr, dAbsmax.ptr, dIn.ptr, QUANT_TYPE_CODE[quantType], blocksize, n);
            const what = `${quantType}, n ${n}, block ${blocksize}`;
            assert.ok(bytes(dAbsmax.toHost()).equals(bytes(absmax)), `${what}: absmax`);
            assert.ok(bytes(dPacked.toHost()).equals(bytes(packed)), `${what}: codes`);
            for (const b of [dIn, dPacked, dAbsmax]) b.free();
        }
    const b = DeviceBuffer.alloc("f32", 16);
    assert.throws(() => cudaGemmOps().quantize4bitBf16(b.ptr, b.ptr, b.ptr, 0, 63, 10), RangeError, "an odd block size");
    b.free();
});

test("the CUDA executor's steps give the CPU executor's bits: load, NF4 round trip, DoRA row scale, 16-bit rounding", {
    skip
}, () => {
    const cpuEx = cpuMergeExecutor(),
        cudaEx = cudaMergeExecutor();
    try {
        for (const [R, C] of [
            [128, 200],
            [7, 97], // n odd, a partial block (no row all zeros: its DoRA scale would be 0 * inf, a NaN)
            [896, 1024]
        ]) {
            const values = awkwardValues(R * C, R * 31 + C);
            const inputs: RawFloatTensor[] = [
                {dtype: "F32", values},
                {dtype: "BF16", values: f32ToHalf(values, "BF16")},
                {dtype: "F16", values: f32ToHalf(values, "F16")}
            ];
            for (const raw of inputs) {
                const what = `[${R}, ${C}] from ${raw.dtype}`;
                const copy = (t: RawFloatTensor): RawFloatTensor =>
                    t.dtype === "F32" ? {dtype: "F32", values: Float32Array.from(t.values)} : t;
                const h = cpuEx.weight(copy(raw));
                const d = cudaEx.weight(raw);
                assert.ok(bytes(d.toHost()).equals(bytes(h)), `${what}: f32 weight`);
                const hq = cpuEx.nf4RoundTrip(h, R, C);
                const dq = cudaEx.nf4RoundTrip(d, R, C);
                assert.ok(bytes(dq.toHost()).equals(bytes(hq)), `${what}: NF4 round trip`);
                // the DoRA scale of the same W (norms of W from each device: float64 sums, equal in all but ties)
                const m = awkwardValues(R, R, 1).map((x) => 0.5 + Math.abs(x));
                cpuEx.applyMagnitude(hq, m, R, C);
                cudaEx.applyMagnitude(dq, m, R, C);
                assert.ok(bytes(dq.toHost()).equals(bytes(hq)), `${what}: DoRA rows`);
                for (const dtype of ["BF16", "F16"] as const)
                    assert.ok(bytes(cudaEx.toHalf(dq, dtype)).equals(bytes(cpuEx.toHalf(hq, dtype))), `${what}: ${dtype}`);
                cudaEx.free(d);
                cudaEx.free(dq);
            }
        }
    } finally {
        cudaEx.close();
    }
});

test("scaleRowsRatioF32: fl32(w (m / n)) with the ratio and the product in float64, subnormals kept", {skip}, () => {
    const R = 5,
        C = 7;
    const W = Float32Array.from({length: R * C}, (_, i) => [3.1e-39, -1.7e-40, 1.2345678, -65504.5, 3e38][i % 5] * (1 + i / 64));
    const num = Float32Array.from([1, 3, 1e-3, 7, 1]),
        den = Float32Array.from([3, 7, 1e-30, 3, 1e38]);
    const want = Float32Array.from(W, (w, i) => w * (num[Math.floor(i / C)] / den[Math.floor(i / C)]));
    const dW = DeviceBuffer.from("f32", W),
        dNum = DeviceBuffer.from("f32", num),
        dDen = DeviceBuffer.from("f32", den);
    cudaLoraOps().scaleRowsRatioF32(dW.ptr, dNum.ptr, dDen.ptr, R, C);
    assert.ok(bytes(dW.toHost()).equals(bytes(want)));
    for (const b of [dW, dNum, dDen]) b.free();
});

/** distance in units in the last place between two bf16 or f16 bit patterns (same sign-magnitude order) */
function ulps(a: number, b: number): number {
    const ord = (x: number) => (x & 0x8000 ? -(x & 0x7fff) : x & 0x7fff);
    return Math.abs(ord(a) - ord(b));
}

for (const c of [
    {
        what: "the fixture adapter, bf16",
        adapter: () => Promise.resolve(path.join(FIXTURES, "adapter")),
        nf4: false,
        dtype: "bf16"
    },
    {
        what: "the fixture adapter, bf16, --against-nf4",
        adapter: () => Promise.resolve(path.join(FIXTURES, "adapter")),
        nf4: true,
        dtype: "bf16"
    },
    {
        what: "the fixture adapter, f16, --against-nf4",
        adapter: () => Promise.resolve(path.join(FIXTURES, "adapter")),
        nf4: true,
        dtype: "f16"
    },
    {what: "a DoRA adapter, bf16, --against-nf4", adapter: () => doraAdapter(tmp), nf4: true, dtype: "bf16"}
] as const)
    test(`merge on the GPU: ${c.what}: every value within one ulp of the CPU merge, at most ${MAX_DIFFERING * 100}% differ`, {
        skip
    }, async () => {
        const adapter = await c.adapter();
        const name = c.what.replace(/\W+/g, "-");
        const outs = {cpu: path.join(tmp, `${name}-cpu`), cuda: path.join(tmp, `${name}-cuda`)};
        for (const device of ["cpu", "cuda"] as const) {
            const r = await mergeAdapter({
                model: MODEL_DIR,
                adapter,
                out: outs[device],
                againstNf4: c.nf4,
                dtype: c.dtype,
                device
            });
            assert.equal(r.device, device);
        }
        const branches = (await readAdapter(adapter, await loadModelConfig(MODEL_DIR))).branches;
        const a = await SafetensorsCheckpoint.open(outs.cpu),
            b = await SafetensorsCheckpoint.open(outs.cuda);
        assert.equal(b.fileFor(b.names()[0]).metadata.qlora_merge_device, "cuda");
        assert.deepEqual(b.names(), a.names());
        let merged = 0,
            mergedTensors = 0,
            differing = 0,
            worst = 0,
            tensorsDiffering = 0;
        for (const t of a.names()) {
            const x = (await a.readTyped(t)) as Uint16Array,
                y = (await b.readTyped(t)) as Uint16Array;
            assert.equal(y.length, x.length, t);
            const isBranch = branches.has(t.replace(/\.weight$/, ""));
            let here = 0;
            for (let i = 0; i < x.length; i++) {
                const d = ulps(x[i], y[i]);
                if (d === 0) continue;
                here++;
                worst = Math.max(worst, d);
            }
            if (!isBranch) assert.equal(here, 0, `${t} has no LoRA branch: converted on the host either way`);
            if (isBranch) {
                merged += x.length;
                mergedTensors++;
            }
            differing += here;
            tensorsDiffering += here > 0 ? 1 : 0;
        }
        await a.close();
        await b.close();
        assert.equal(mergedTensors, branches.size);
        console.log(
            `${c.what}: ${differing} of ${merged} merged values differ from the CPU merge (${((differing / merged) * 100).toFixed(4)}%, ` +
                `in ${tensorsDiffering} tensors), by at most ${worst} ulp`
        );
        assert.ok(worst <= 1, `a value ${worst} ulps from the CPU merge`);
        assert.ok(differing <= MAX_DIFFERING * merged, `${differing} of ${merged} values differ`);
    });

test("--device auto takes the GPU here, with the line generate/chat/eval print", {skip}, () => {
    const c = chooseDevice("auto");
    assert.equal(c.device, "cuda");
    assert.match(c.line, /^device: cuda \(.+, compute capability \d+\.\d, [\d.]+ GiB\)$/);
});
