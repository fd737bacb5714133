// gemv4bit-timing.ts: device time of the fused 4-bit GEMV on the Qwen2-7B shapes (NF4, double quant, blocksize
// 64, bf16), printed as us and GB/s of weight bytes (packed codes + 8-bit scales + nested scales). Run by
// test/gpu/nf4.test.ts once per kernel variant (QLORA_GEMV4BIT_VARIANT, which the addon reads once per process);
// `node --import tsx test/gpu/gemv4bit-timing.ts` runs it alone. Every call is recorded into a CUDA graph and
// replayed (no host launch overhead), over copies of the weights that add up to >= 128 MB, so that they come
// from HBM and not from the 50 MB L2.
import {randomFillSync} from "node:crypto";
import {DeviceBuffer} from "../../src/backend/cuda.js";
import {cudaGemmOps, type Gemv4bitPart} from "../../src/backend/cuda-gemm-types.js";
import {Rng} from "../../src/backend/rng.js";
import {graphMicros} from "../helpers/gpu-timing.js";
import {NF4_CODE, SIGNED_DYNAMIC_MAP} from "../../src/quant/nf4.js";

const ops = cudaGemmOps();
const BLOCKSIZE = 64,
    NESTED_BLOCKSIZE = 256,
    RANK = 16;
const rng = new Rng(5);
const nestedCode = DeviceBuffer.from("f32", SIGNED_DYNAMIC_MAP),
    code = DeviceBuffer.from("f32", NF4_CODE);

/** random bf16 values in (-a, a) (finite, no subnormals) */
function bf16Buffer(n: number, a: number): DeviceBuffer {
    const bits = new Uint16Array(n);
    const f = new Float32Array(1),
        u = new Uint32Array(f.buffer);
    for (let i = 0; i < n; i++) {
        f[0] = a * (rng.next() * 2 - 1);
        bits[i] = u[0] >>> 16;
    }
    return DeviceBuffer.from("bf16", bits);
}

/** `copies` random NF4 weights [N, K] with double quant, back to back, and their LoRA B */
class Weight {
    readonly bytes: number;
    readonly nblocks: number;
    readonly nnested: number;
    readonly packed: DeviceBuffer;
    readonly absmaxQ: DeviceBuffer;
    readonly nested: DeviceBuffer;
    readonly loraB: DeviceBuffer;

    constructor(
        readonly N: number,
        readonly K: number,
        readonly copies: number
    ) {
        this.bytes = (N * K) / 2;
        this.nblocks = (N * K) / BLOCKSIZE;
        this.nnested = Math.ceil(this.nblocks / NESTED_BLOCKSIZE);
        const packedHost = new Uint8Array(copies * this.bytes),
            qHost = new Uint8Array(copies * this.nblocks);
        randomFillSync(packedHost);
        randomFillSync(qHost);
        this.packed = DeviceBuffer.from("u8", packedHost);
        this.absmaxQ = DeviceBuffer.from("u8", qHost);
        this.nested = DeviceBuffer.from(
            "f32",
            Float32Array.from({length: copies * this.nnested}, () => 0.05 * rng.next())
        );
        this.loraB = bf16Buffer(N * RANK, 0.1);
    }

    /** the bytes one call reads of the weight */
    get weightBytes(): number {
        return this.bytes + this.nblocks + this.nnested * 4;
    }

    /** copy c as a gemv4bitGroup part writing y (with the LoRA term when xa is given) */
    part(c: number, y: DeviceBuffer, xa: DeviceBuffer | null): Gemv4bitPart {
        const part: Gemv4bitPart = {
            y: y.ptr,
            yDtype: "bf16",
            packed: this.packed.ptr + c * this.bytes,
            absmax: 0,
            absmaxQ: this.absmaxQ.ptr + c * this.nblocks,
            nestedAbsmax: this.nested.ptr + c * this.nnested * 4,
            nestedCode: nestedCode.ptr,
            offset: 0.03,
            code: code.ptr,
            blocksize: BLOCKSIZE,
            nestedBlocksize: NESTED_BLOCKSIZE,
            N: this.N
        };
        if (xa) Object.assign(part, {loraXa: xa.ptr, loraB: this.loraB.ptr, loraR: RANK, loraScale: 2});
        return part;
    }

    free(): void {
        for (const b of [this.packed, this.absmaxQ, this.nested, this.loraB]) b.free();
    }
}

/** the gemv4bit call of one part */
function gemv4bit(x: DeviceBuffer, M: number, K: number, p: Gemv4bitPart): void {
    const args = [
        p.y,
        p.yDtype,
        x.ptr,
        "bf16",
        p.packed,
        p.absmax,
        p.absmaxQ,
        p.nestedAbsmax,
        p.nestedCode,
        p.offset,
        p.code,
        p.blocksize,
        p.nestedBlocksize,
        M,
        p.N,
        K
    ] as const;
    if (p.loraR) ops.gemv4bit(...args, p.loraXa, p.loraB, p.loraR, p.loraScale);
    else ops.gemv4bit(...args);
}

function report(label: string, us: number, bytes: number): void {
    console.log(`${label}: ${us.toFixed(1)} us, ${(bytes / us / 1e3).toFixed(0)} GB/s of weight bytes`);
}

/** copies of a weight set of `bytes` that add up to >= 128 MB */
function copiesFor(bytes: number): number {
    return Math.max(1, Math.ceil(128e6 / bytes));
}

const shapes: [string, number, number][] = [
    ["q/o", 3584, 3584],
    ["k/v", 512, 3584],
    ["gate/up", 18944, 3584],
    ["down", 3584, 18944]
];
// QLORA_GEMV_TIMING_ONLY=gate/up (a comma list of the names below) times only those shapes and groups, e.g. to run
// the script under a profiler (ncu) with few launches before the one of interest
const only = process.env.QLORA_GEMV_TIMING_ONLY?.split(",") ?? null;
const wanted = (name: string) => only === null || only.includes(name);
for (const [name, N, K] of shapes.filter(([name]) => wanted(name))) {
    const w = new Weight(N, K, copiesFor((N * K) / 2));
    for (const M of [1, 8]) {
        const x = bf16Buffer(M * K, 1),
            y = DeviceBuffer.alloc("bf16", M * N),
            xa = bf16Buffer(M * RANK, 1);
        for (const lora of [false, true]) {
            const us = graphMicros((i) => gemv4bit(x, M, K, w.part(i % w.copies, y, lora ? xa : null)), Math.max(w.copies, 20));
            report(`gemv4bit ${name} ${N}x${K} M=${M}${lora ? ` + LoRA r=${RANK}` : ""}`, us, w.weightBytes);
        }
        for (const b of [x, y, xa]) b.free();
    }
    w.free();
}

// the projections decoding computes from one x: one gemv4bitGroup launch against one gemv4bit per part
const groups: [string, number[], number][] = [
    ["q+k+v", [3584, 512, 512], 3584],
    ["gate+up", [18944, 18944], 3584]
];
for (const [name, Ns, K] of groups.filter(([name]) => wanted(name))) {
    const setBytes = Ns.reduce((a, N) => a + (N * K) / 2, 0);
    const copies = copiesFor(setBytes);
    const ws = Ns.map((N) => new Weight(N, K, copies));
    const bytes = ws.reduce((a, w) => a + w.weightBytes, 0);
    for (const M of [1, 8]) {
        const x = bf16Buffer(M * K, 1),
            xa = bf16Buffer(M * RANK, 1);
        const ys = Ns.map((N) => DeviceBuffer.alloc("bf16", M * N));
        for (const lora of [false, true]) {
            const parts = (i: number) => ws.map((w, j) => w.part(i % copies, ys[j], lora ? xa : null));
            const label = `${name} ${Ns.join("+")}x${K} M=${M}${lora ? ` + LoRA r=${RANK}` : ""}`;
            const calls = Math.max(copies, 20);
            report(
                `${label}, one gemv4bitGroup`,
                graphMicros((i) => ops.gemv4bitGroup(x.ptr, "bf16", M, K, parts(i)), calls),
                bytes
            );
            report(
                `${label}, ${Ns.length} gemv4bit`,
                graphMicros((i) => {
                    for (const p of parts(i)) gemv4bit(x, M, K, p);
                }, calls),
                bytes
            );
        }
        for (const b of [x, xa, ...ys]) b.free();
    }
    for (const w of ws) w.free();
}
nestedCode.free();
code.free();
