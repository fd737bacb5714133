// The LoRA "A" products of a decoding step in one launch (loraDown) against a float64 CPU reference computed from
// the same bf16 values: M = 1, 3, 8; r = 1, 16, 64; K = 8, 3584, 18944 and 4104 (513 chunks of 8, split unevenly);
// 1 to 4 parts of different ranks; no write outside out; the same bits on every run and in a CUDA graph replay;
// the shapes and layouts it refuses. Prints its time against one cuBLAS gemm per part on the Qwen2-7B groups.
// Runs only on a machine with a usable GPU (npm run test:gpu).
import {test, describe} from "node:test";
import assert from "node:assert/strict";
import {cpu} from "../../src/backend/cpu.js";
import {cudaAvailability, CudaGraph, DeviceBuffer} from "../../src/backend/cuda.js";
import {cudaGemmOps} from "../../src/backend/cuda-gemm-types.js";
import {cudaLoraOps, type LoraDownPart} from "../../src/backend/cuda-lora-types.js";
import {Rng} from "../../src/backend/rng.js";
import {graphMicros} from "../helpers/gpu-timing.js";

const availability = cudaAvailability();

if (!availability.usable) {
    test("cuda", {skip: availability.reason ?? "CUDA is not usable"}, () => {});
} else {
    const ops = cudaLoraOps();
    /** bf16 bits of a NaN no kernel writes: what out holds where nothing was written */
    const SENTINEL = 0x7fa5;
    /** sentinel elements after each out: the kernel must leave them alone */
    const PAD = 16;

    /** n values uniform in [-scale, scale), rounded to bf16: the bits and their f32 values */
    function bf16Values(n: number, scale: number, rng: Rng): {bits: Uint16Array; values: Float32Array} {
        const f = Float32Array.from({length: n}, () => (rng.next() * 2 - 1) * scale);
        const bits = new Uint16Array(n);
        cpu().f32ToBf16(bits, f, n);
        const values = new Float32Array(n);
        cpu().bf16ToF32(values, bits, n);
        return {bits, values};
    }

    function toF32(bits: Uint16Array): Float32Array {
        const out = new Float32Array(bits.length);
        cpu().bf16ToF32(out, bits, bits.length);
        return out;
    }

    interface Problem {
        M: number;
        K: number;
        x: Float32Array;
        /** x's device buffer and the address passed (a view one row in: x's row 0 is row 1 of the buffer) */
        dx: DeviceBuffer;
        xPtr: number;
        parts: {r: number; A: Float32Array; dA: DeviceBuffer; out: DeviceBuffer}[];
        free(): void;
    }

    /** x [M, K] (uniform in [-1, 1)) and one A [r, K] (uniform in [-0.05, 0.05)) per rank; out filled with SENTINEL */
    function problem(M: number, K: number, ranks: number[], seed: number): Problem {
        const rng = new Rng(seed);
        // one spare row in front: the op reads x through a view at a 16-byte aligned offset, as a slice would give
        const x = bf16Values((M + 1) * K, 1, rng);
        const dx = DeviceBuffer.from("bf16", x.bits);
        const parts = ranks.map((r) => {
            const A = bf16Values(r * K, 0.05, rng);
            return {
                r,
                A: A.values,
                dA: DeviceBuffer.from("bf16", A.bits),
                out: DeviceBuffer.from("bf16", new Uint16Array(M * r + PAD).fill(SENTINEL))
            };
        });
        return {
            M,
            K,
            x: x.values.subarray(K),
            dx,
            xPtr: dx.ptr + K * 2,
            parts,
            free() {
                dx.free();
                for (const p of parts) {
                    p.dA.free();
                    p.out.free();
                }
            }
        };
    }

    function partArgs(p: Problem): LoraDownPart[] {
        return p.parts.map((q) => ({out: q.out.ptr, A: q.dA.ptr, r: q.r}));
    }

    /**
     * Checks every part's out against sum_k x[m, k] A[j, k] in float64. The GPU sums in fp32, in its own order,
     * and rounds once to bf16: |out - ref| <= 2^-8 |ref| (one bf16 rounding: half an ulp is at most 2^-8 of the
     * value) + 2^-16 S, S = sum_k |x[m, k] A[j, k]| (the fp32 summation error, at most 2^-24 S per level of a sum
     * tree under 256 levels deep; it carries the near-zero sums, where the relative term vanishes). Dropping one
     * chunk of 8 products changes a sum by about sqrt(8 / K) of itself: 2% at K = 18944, well past the tolerance.
     */
    function checkOut(p: Problem, what: string): void {
        const {M, K, x} = p;
        for (const [i, part] of p.parts.entries()) {
            const got = part.out.toHost() as Uint16Array;
            const values = toF32(got);
            for (let m = 0; m < M; m++) {
                for (let j = 0; j < part.r; j++) {
                    let ref = 0,
                        S = 0;
                    for (let k = 0; k < K; k++) {
                        const v = x[m * K + k] * part.A[j * K + k];
                        ref += v;
                        S += Math.abs(v);
                    }
                    const g = values[m * part.r + j];
                    const tol = 2 ** -8 * Math.abs(ref) + 2 ** -16 * S;
                    if (!(Math.abs(g - ref) <= tol))
                        assert.fail(
                            `${what}: part ${i} (r = ${part.r}) out[${m}, ${j}] = ${g}, reference ${ref} ` +
                                `(|err| ${Math.abs(g - ref).toExponential(2)} > tol ${tol.toExponential(2)})`
                        );
                }
            }
            for (let e = M * part.r; e < got.length; e++)
                assert.equal(got[e], SENTINEL, `${what}: part ${i} wrote element ${e}, past out [${M}, ${part.r}]`);
        }
    }

    function run(M: number, K: number, ranks: number[], seed: number): void {
        const p = problem(M, K, ranks, seed);
        try {
            ops.loraDown(p.xPtr, M, K, partArgs(p));
            checkOut(p, `M = ${M}, K = ${K}, r = [${ranks}]`);
        } finally {
            p.free();
        }
    }

    describe("loraDown vs a float64 CPU reference", () => {
        // K = 8: one chunk; 3584, 18944: the Qwen2-7B inputs (448 and 2368 chunks); 4104: 513 chunks, odd
        for (const K of [8, 3584, 4104, 18944]) {
            test(`one part, K = ${K}: M = 1, 3, 8 x r = 1, 16, 64`, () => {
                let seed = K;
                for (const M of [1, 3, 8]) for (const r of [1, 16, 64]) run(M, K, [r], seed++);
            });
        }

        test("2, 3 and 4 parts of different ranks in one launch", () => {
            run(1, 3584, [16, 16, 16], 1); // q, k, v
            run(8, 3584, [16, 16, 16], 2);
            run(3, 18944, [64, 5], 3);
            run(8, 4104, [16, 1, 64, 7], 4);
            run(2, 8, [3, 64, 1, 16], 5);
            run(5, 3584, [1, 2], 6);
        });
    });

    describe("loraDown determinism and graphs", () => {
        test("the same bits on every run, and from a CUDA graph replay", () => {
            for (const [M, K] of [
                [1, 18944],
                [8, 3584]
            ]) {
                const p = problem(M, K, [16, 64, 3], 11);
                const args = partArgs(p);
                const snapshot = () => p.parts.map((q) => q.out.toHost() as Uint16Array);
                const fill = () => {
                    for (const q of p.parts) q.out.upload(new Uint16Array(M * q.r + PAD).fill(SENTINEL));
                };
                let graph: CudaGraph | null = null;
                try {
                    ops.loraDown(p.xPtr, M, K, args);
                    checkOut(p, `M = ${M}, K = ${K}, first run`);
                    const first = snapshot();
                    fill();
                    ops.loraDown(p.xPtr, M, K, args);
                    assert.deepEqual(snapshot(), first, `M = ${M}, K = ${K}: a second run changed the bits`);
                    fill();
                    graph = CudaGraph.capture(() => ops.loraDown(p.xPtr, M, K, args));
                    assert.ok(
                        snapshot().every((o) => o.every((v) => v === SENTINEL)),
                        "the capture ran the kernel"
                    );
                    graph.launch();
                    assert.deepEqual(snapshot(), first, `M = ${M}, K = ${K}: the graph replay changed the bits`);
                    graph.launch();
                    assert.deepEqual(snapshot(), first, `M = ${M}, K = ${K}: a second replay changed the bits`);
                } finally {
                    graph?.destroy();
                    p.free();
                }
            }
        });
    });

    describe("loraDown refusals", () => {
        test("shapes, ranks, part lists and layouts it does not take throw, and nothing is written", () => {
            const M = 2,
                K = 64;
            const p = problem(M, K, [16, 8], 21);
            const args = partArgs(p);
            const call = (x: number, m: number, k: number, parts: unknown) =>
                (ops.loraDown as (...a: unknown[]) => void)(x, m, k, parts);
            const rangeError = (re: RegExp) => (err: Error) => err instanceof RangeError && re.test(err.message);
            const typeError = (re: RegExp) => (err: Error) => err instanceof TypeError && re.test(err.message);
            try {
                assert.throws(() => call(p.xPtr, 0, K, args), rangeError(/M = 0, K = 64; needs 1 <= M <= 8 and K >= 1/));
                assert.throws(() => call(p.xPtr, 9, K, args), rangeError(/M = 9/));
                assert.throws(() => call(p.xPtr, M, 0, args), rangeError(/K = 0; needs/));
                assert.throws(
                    () => call(p.xPtr, M, 60, args),
                    rangeError(/unsupported layout \(K = 60 is not a multiple of 8; .*\): use gemm instead/)
                );
                assert.throws(() => call(p.xPtr + 2, M, K, args), rangeError(/unsupported layout \(x is not 16-byte aligned/));
                // a view of A at an offset: only the second part is misaligned, and the first is not written either
                const shifted = [args[0], {...args[1], A: args[1].A + 8}];
                assert.throws(() => call(p.xPtr, M, K, shifted), rangeError(/parts\[1\]\.A is not 16-byte aligned/));
                for (const r of [0, 65, 16.5])
                    assert.throws(
                        () => call(p.xPtr, M, K, [{...args[0], r}]),
                        rangeError(new RegExp(`parts\\[0\\]\\.r = ${r} is not a rank in 1\\.\\.64`))
                    );
                assert.throws(() => call(p.xPtr, M, K, []), rangeError(/0 parts, it takes 1\.\.4/));
                assert.throws(() => call(p.xPtr, M, K, [...args, ...args, args[0]]), rangeError(/5 parts/));
                assert.throws(() => call(p.xPtr, M, K, args[0]), typeError(/expected an array of parts/));
                assert.throws(() => call(p.xPtr, M, K, [args[0], 7]), typeError(/parts\[1\]: expected an object/));
                assert.throws(
                    () => call(p.xPtr, M, K, [{A: args[0].A, r: 16}]),
                    typeError(/parts\[0\]\.out: expected a device buffer address/)
                );
                assert.throws(() => call(p.xPtr, M, K, [{...args[0], A: 0}]), typeError(/parts\[0\]\.A/));
                assert.throws(() => call(0, M, K, args), typeError(/null device buffer/));
                for (const [i, q] of p.parts.entries())
                    assert.ok(
                        (q.out.toHost() as Uint16Array).every((v) => v === SENTINEL),
                        `part ${i}'s out was written by a refused call`
                    );
                // the same buffers, well formed: it runs
                call(p.xPtr, M, K, args);
                checkOut(p, "after the refusals");
            } finally {
                p.free();
            }
        });
    });

    /**
     * Device microseconds per call of `call(i)`, i = 0 .. calls - 1: the calls recorded once into a CUDA graph and
     * replayed (no host launch overhead); queued one by one from JavaScript when the capture fails.
     */

    describe("loraDown on the Qwen2-7B groups (printed, not asserted)", () => {
        test("q,k,v; o; gate,up; down at r = 16, M = 1 and 8: one loraDown launch vs one cuBLAS gemm per part", () => {
            const gemm = cudaGemmOps();
            const groups: [string, number, number[]][] = [
                ["q,k,v", 3584, [16, 16, 16]],
                ["o", 3584, [16]],
                ["gate,up", 3584, [16, 16]],
                ["down", 18944, [16]]
            ];
            const rng = new Rng(7);
            for (const [name, K, ranks] of groups) {
                const rows = ranks.reduce((a, b) => a + b, 0);
                const bytes = rows * K * 2;
                // copies of the group's A matrices cycled through, 128 MB in all, so that they come from HBM, not
                // the 50 MB L2, as in a decoding step where the base weights stream through L2 between them
                const copies = Math.max(1, Math.ceil(128e6 / bytes));
                const As = DeviceBuffer.zeros("bf16", copies * rows * K);
                for (const M of [1, 8]) {
                    const x = DeviceBuffer.from("bf16", bf16Values(M * K, 1, rng).bits);
                    const outs = ranks.map((r) => DeviceBuffer.alloc("bf16", M * r));
                    const partsOf = Array.from({length: copies}, (_, c) => {
                        let row = c * rows;
                        return ranks.map((r, i) => {
                            const part = {out: outs[i].ptr, A: As.ptr + row * K * 2, r};
                            row += r;
                            return part;
                        });
                    });
                    const ours = graphMicros((i) => ops.loraDown(x.ptr, M, K, partsOf[i % copies]), copies);
                    const theirs = graphMicros((i) => {
                        for (const {out, A, r} of partsOf[i % copies])
                            gemm.gemm(false, true, M, r, K, 1, x.ptr, K, "bf16", A, K, "bf16", 0, out, r, "bf16");
                    }, copies);
                    console.log(
                        `lora A ${name} (K = ${K}, r = ${ranks.join("+")}) M = ${M}: loraDown ${ours.toFixed(2)} us/launch ` +
                            `(${(bytes / ours / 1e3).toFixed(0)} GB/s of A, graph replay); cuBLAS ${theirs.toFixed(2)} us for ` +
                            `${ranks.length} gemm${ranks.length > 1 ? "s" : ""}, ${(theirs / ranks.length).toFixed(2)} us/launch (graph replay)`
                    );
                    x.free();
                    for (const o of outs) o.free();
                }
                As.free();
            }
        });
    });
}
