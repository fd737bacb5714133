// cuBLASLt GEMM against the CPU sgemm (the reference): every transpose combination, alpha/beta, odd sizes,
// leading dimensions larger than the rows (padding filled with NaN, which must be neither read nor written),
// f32 / bf16 / f16 inputs with f32 or 16-bit C, strided batches, K == 0, argument errors, the plan cache, and
// a throughput print. Runs only on a machine with a usable GPU (npm run test:gpu).
import {test, describe} from "node:test";
import assert from "node:assert/strict";
import {cpu} from "../../src/backend/cpu.js";
import {cuda, cudaAvailability, DeviceBuffer, type DeviceDtype} from "../../src/backend/cuda.js";
import {cudaGemmOps, type GemmDtype} from "../../src/backend/cuda-gemm-types.js";
import {Rng} from "../../src/backend/rng.js";

const availability = cudaAvailability();

if (!availability.usable) {
    test("cuda", {skip: availability.reason ?? "CUDA is not usable"}, () => {});
} else {
    const ops = cudaGemmOps();

    /** values rounded to the dtype (f32 passes through; NaN stays NaN) */
    function roundTo(values: Float32Array, dtype: GemmDtype): Float32Array {
        if (dtype === "f32") return values;
        const bits = new Uint16Array(values.length);
        const out = new Float32Array(values.length);
        if (dtype === "bf16") {
            cpu().f32ToBf16(bits, values, values.length);
            cpu().bf16ToF32(out, bits, bits.length);
        } else {
            cpu().f32ToF16(bits, values, values.length);
            cpu().f16ToF32(out, bits, bits.length);
        }
        return out;
    }

    /** a device copy of f32 values stored as `dtype` (values must already be representable) */
    function upload(values: Float32Array, dtype: GemmDtype): DeviceBuffer {
        if (dtype === "f32") return DeviceBuffer.from("f32", values);
        const bits = new Uint16Array(values.length);
        if (dtype === "bf16") cpu().f32ToBf16(bits, values, values.length);
        else cpu().f32ToF16(bits, values, values.length);
        return DeviceBuffer.from(dtype as DeviceDtype, bits);
    }

    function download(buf: DeviceBuffer): Float32Array {
        const host = buf.toHost();
        if (host instanceof Float32Array) return host;
        const out = new Float32Array(host.length);
        if (buf.dtype === "bf16") cpu().bf16ToF32(out, host as Uint16Array, host.length);
        else cpu().f16ToF32(out, host as Uint16Array, host.length);
        return out;
    }

    /**
     * a rows x cols matrix with leading dimension ld: `gpu` has NaN in the padding columns, `ref` zeros there;
     * the interior is uniform in [-1, 1) rounded to the dtype (or NaN everywhere in `gpu` when nanInterior)
     */
    function matrix(rng: Rng, rows: number, cols: number, ld: number, dtype: GemmDtype, nanInterior = false) {
        const gpu = new Float32Array(Math.max(1, rows * ld)).fill(NaN);
        const ref = new Float32Array(Math.max(1, rows * ld));
        for (let r = 0; r < rows; r++) {
            for (let c = 0; c < cols; c++) {
                const v = rng.next() * 2 - 1;
                ref[r * ld + c] = nanInterior ? 0 : v;
                if (!nanInterior) gpu[r * ld + c] = v;
            }
        }
        return {gpu: roundTo(gpu, dtype), ref: roundTo(ref, dtype)};
    }

    interface Case {
        transA: boolean;
        transB: boolean;
        M: number;
        N: number;
        K: number;
        alpha: number;
        beta: number;
        /** extra columns beyond the minimal leading dimension of A, B, C */
        pad: [number, number, number];
        dtypeAB: GemmDtype;
        dtypeC: GemmDtype;
    }

    /** runs one case on the GPU and checks it against the CPU sgemm on the same (rounded) data */
    function check(c: Case, seed: number): void {
        const rng = new Rng(seed);
        const {transA, transB, M, N, K, alpha, beta} = c;
        const [rowsA, colsA] = transA ? [K, M] : [M, K];
        const [rowsB, colsB] = transB ? [N, K] : [K, N];
        const lda = colsA + c.pad[0],
            ldb = colsB + c.pad[1],
            ldc = N + c.pad[2];
        const A = matrix(rng, rowsA, colsA, lda, c.dtypeAB);
        const B = matrix(rng, rowsB, colsB, ldb, c.dtypeAB);
        // beta == 0: C is write-only, so its interior starts as NaN on the GPU
        const C = matrix(rng, M, N, ldc, c.dtypeC, beta === 0);

        const ref = C.ref.slice();
        cpu().sgemm(transA, transB, M, N, K, alpha, A.ref, lda, B.ref, ldb, beta, ref, ldc);
        // S = |alpha| |A| |B| + |beta| |C|: the scale of each element's rounding error
        const S = C.ref.map(Math.abs);
        cpu().sgemm(
            transA,
            transB,
            M,
            N,
            K,
            Math.abs(alpha),
            A.ref.map(Math.abs),
            lda,
            B.ref.map(Math.abs),
            ldb,
            Math.abs(beta),
            S,
            ldc
        );

        const dA = upload(A.gpu, c.dtypeAB),
            dB = upload(B.gpu, c.dtypeAB),
            dC = upload(C.gpu, c.dtypeC);
        try {
            ops.gemm(transA, transB, M, N, K, alpha, dA.ptr, lda, c.dtypeAB, dB.ptr, ldb, c.dtypeAB, beta, dC.ptr, ldc, c.dtypeC);
            const got = download(dC);
            // f32 accumulation in another order: |err| <= 1e-5 sqrt(K) S (the worst case K * 2^-24 * S is
            // smaller for K <= 1000); a 16-bit C adds one rounding of the result: half an ulp, 2^-9 (bf16) or
            // 2^-12 (f16) relative, allowed four times over (one whole ulp: when cuBLASLt's heuristic offers no
            // plan with fp32 split-K reduction, partial sums may be reduced in the 16-bit output type; seen on the
            // H200 for 64x96x128 with beta = 1: one ulp off), plus f16's subnormal spacing
            const accTol = 1e-5 * Math.sqrt(Math.max(K, 1));
            const relTol = c.dtypeC === "bf16" ? 2 ** -7 : c.dtypeC === "f16" ? 2 ** -9 : 0;
            const absTol = c.dtypeC === "f16" ? 1e-7 : 1e-30;
            const what =
                `${c.dtypeAB}->${c.dtypeC} transA=${transA} transB=${transB} M=${M} N=${N} K=${K} ` +
                `alpha=${alpha} beta=${beta} lda=${lda} ldb=${ldb} ldc=${ldc}`;
            for (let r = 0; r < M; r++) {
                for (let col = 0; col < ldc; col++) {
                    const i = r * ldc + col;
                    if (col >= N) {
                        assert.ok(Number.isNaN(got[i]), `${what}: padding C[${r}, ${col}] was written (${got[i]})`);
                        continue;
                    }
                    const err = Math.abs(got[i] - ref[i]);
                    const tol = accTol * S[i] + relTol * Math.abs(ref[i]) + absTol;
                    if (!(err <= tol))
                        assert.fail(
                            `${what}: C[${r}, ${col}] = ${got[i]}, CPU ${ref[i]} (|err| ${err.toExponential(2)} > ` +
                                `tol ${tol.toExponential(2)})`
                        );
                }
            }
        } finally {
            dA.free();
            dB.free();
            dC.free();
        }
    }

    const SHAPES: [number, number, number][] = [
        [1, 1, 1],
        [7, 13, 5],
        [37, 129, 300],
        [130, 67, 1000]
    ];
    const DTYPES: [GemmDtype, GemmDtype][] = [
        ["f32", "f32"],
        ["bf16", "f32"],
        ["bf16", "bf16"],
        ["f16", "f32"],
        ["f16", "f16"]
    ];
    // minimal leading dimensions; padded to keep 16-byte rows aligned; padded by odd amounts
    const SCALARS: {alpha: number; beta: number; pad: [number, number, number]}[] = [
        {alpha: 1, beta: 0, pad: [0, 0, 0]},
        {alpha: 0.75, beta: -1.25, pad: [8, 16, 8]},
        {alpha: -0.5, beta: 1, pad: [3, 5, 1]}
    ];

    describe("gemm vs CPU sgemm", () => {
        let seed = 1;
        for (const [dtypeAB, dtypeC] of DTYPES) {
            for (const [M, N, K] of SHAPES) {
                test(`${dtypeAB} -> ${dtypeC}, ${M}x${N}x${K}, all transposes, alpha/beta, leading dims`, () => {
                    for (const transA of [false, true])
                        for (const transB of [false, true])
                            for (const s of SCALARS) check({transA, transB, M, N, K, dtypeAB, dtypeC, ...s}, seed++);
                });
            }
        }
    });

    describe("gemm details", () => {
        test("gemmInfo names the cuBLASLt library and version", () => {
            const info = ops.gemmInfo();
            console.log(`cuBLASLt: ${info.library} version ${info.version}`);
            assert.match(info.library, /^libcublasLt\.so/);
            assert.ok(info.version >= 110000, `version ${info.version}`);
        });

        test("aligned shapes run on cuBLASLt, not the fallback kernel", () => {
            const before = ops.gemmInfo().fallbackCalls;
            for (const [dtypeAB, dtypeC] of DTYPES)
                for (const [transA, transB] of [
                    [false, false],
                    [false, true],
                    [true, false]
                ] as const)
                    check({transA, transB, M: 256, N: 192, K: 320, alpha: 1, beta: 0.5, pad: [0, 0, 0], dtypeAB, dtypeC}, 7);
            const info = ops.gemmInfo();
            assert.equal(info.fallbackCalls, before, "calls fell back to the built-in kernel");
            console.log(`gemm stats: ${JSON.stringify(info)}`);
        });

        test("repeated shapes reuse the cached plan (no new heuristic run)", () => {
            check(
                {
                    transA: false,
                    transB: true,
                    M: 64,
                    N: 96,
                    K: 128,
                    alpha: 1,
                    beta: 0,
                    pad: [0, 0, 0],
                    dtypeAB: "bf16",
                    dtypeC: "bf16"
                },
                11
            );
            const runs = ops.gemmInfo().heuristicRuns;
            check(
                {
                    transA: false,
                    transB: true,
                    M: 64,
                    N: 96,
                    K: 128,
                    alpha: 2,
                    beta: 1,
                    pad: [0, 0, 0],
                    dtypeAB: "bf16",
                    dtypeC: "bf16"
                },
                12
            );
            assert.equal(ops.gemmInfo().heuristicRuns, runs);
        });

        test("K = 0 gives C = beta * C (beta = 0: zeros, even over NaN)", () => {
            const M = 4,
                N = 3;
            const c0 = Float32Array.from({length: M * N}, (_, i) => i - 5);
            const C = DeviceBuffer.from("f32", c0);
            const dummy = DeviceBuffer.zeros("f32", 1);
            ops.gemm(false, false, M, N, 0, 1, dummy.ptr, 1, "f32", dummy.ptr, N, "f32", 2, C.ptr, N, "f32");
            assert.deepEqual(
                Array.from(C.toHost() as Float32Array),
                Array.from(c0, (v) => 2 * v)
            );
            const Cn = DeviceBuffer.from("f32", new Float32Array(M * N).fill(NaN));
            ops.gemm(false, false, M, N, 0, 1, dummy.ptr, 1, "f32", dummy.ptr, N, "f32", 0, Cn.ptr, N, "f32");
            assert.deepEqual(Array.from(Cn.toHost() as Float32Array), new Array(M * N).fill(0));
            C.free();
            Cn.free();
            dummy.free();
        });

        test("strided batched (shared A with stride 0, padded strides)", () => {
            for (const [dtypeAB, dtypeC] of [
                ["f32", "f32"],
                ["bf16", "f32"],
                ["bf16", "bf16"]
            ] as [GemmDtype, GemmDtype][]) {
                const rng = new Rng(99);
                const batch = 3,
                    M = 5,
                    N = 7,
                    K = 9;
                const strideB = K * N + 2,
                    strideC = M * N + 3;
                const a = roundTo(
                    Float32Array.from({length: M * K}, () => rng.next() * 2 - 1),
                    dtypeAB
                );
                const b = roundTo(
                    Float32Array.from({length: batch * strideB}, () => rng.next() * 2 - 1),
                    dtypeAB
                );
                const c = roundTo(
                    Float32Array.from({length: batch * strideC}, () => rng.next() * 2 - 1),
                    dtypeC
                );
                const dA = upload(a, dtypeAB),
                    dB = upload(b, dtypeAB),
                    dC = upload(c, dtypeC);
                ops.gemmStridedBatched(
                    false,
                    false,
                    M,
                    N,
                    K,
                    1.5,
                    dA.ptr,
                    K,
                    0,
                    dtypeAB,
                    dB.ptr,
                    N,
                    strideB,
                    dtypeAB,
                    0.5,
                    dC.ptr,
                    N,
                    strideC,
                    dtypeC,
                    batch
                );
                const got = download(dC);
                for (let z = 0; z < batch; z++) {
                    const ref = c.slice(z * strideC, z * strideC + M * N);
                    cpu().sgemm(false, false, M, N, K, 1.5, a, K, b.subarray(z * strideB), N, 0.5, ref, N);
                    for (let i = 0; i < M * N; i++) {
                        const g = got[z * strideC + i];
                        const tol = 1e-5 * Math.abs(ref[i]) + (dtypeC === "bf16" ? 2 ** -8 * Math.abs(ref[i]) : 0) + 1e-5;
                        assert.ok(
                            Math.abs(g - ref[i]) <= tol,
                            `${dtypeAB}->${dtypeC} batch ${z} element ${i}: ${g} vs ${ref[i]}`
                        );
                    }
                    // the gap between two C matrices is untouched
                    for (let i = M * N; i < strideC && z * strideC + i < got.length; i++)
                        assert.equal(got[z * strideC + i], c[z * strideC + i], `gap element ${i} of batch ${z} changed`);
                }
                dA.free();
                dB.free();
                dC.free();
            }
        });

        test("argument errors throw with a clear message", () => {
            const buf = DeviceBuffer.zeros("f32", 64);
            assert.throws(
                () => ops.gemm(false, false, 4, 4, 4, 1, buf.ptr, 4, "bf16", buf.ptr, 4, "f32", 0, buf.ptr, 4, "f32"),
                /same dtype/
            );
            assert.throws(
                () => ops.gemm(false, false, 4, 4, 4, 1, buf.ptr, 4, "f32", buf.ptr, 4, "f32", 0, buf.ptr, 4, "bf16"),
                /C must be f32 or the input dtype/
            );
            assert.throws(
                () => ops.gemm(false, false, 4, 4, 4, 1, buf.ptr, 3, "f32", buf.ptr, 4, "f32", 0, buf.ptr, 4, "f32"),
                /leading dimensions/
            );
            assert.throws(
                () => ops.gemm(false, false, 4, 4, 4, 1, buf.ptr, 4, "f64" as GemmDtype, buf.ptr, 4, "f32", 0, buf.ptr, 4, "f32"),
                /dtype/
            );
            buf.free();
        });
    });

    describe("gemm throughput (printed, not asserted)", () => {
        test("4096^3 bf16 and 2048^3 f32", () => {
            const addon = cuda();
            const run = (n: number, dtypeAB: GemmDtype, dtypeC: GemmDtype, iters: number) => {
                const rng = new Rng(5);
                const vals = Float32Array.from({length: n * n}, () => rng.next() - 0.5);
                const A = upload(roundTo(vals, dtypeAB), dtypeAB);
                const B = upload(roundTo(vals, dtypeAB), dtypeAB);
                const C = DeviceBuffer.zeros(dtypeC as DeviceDtype, n * n);
                const call = () => ops.gemm(false, true, n, n, n, 1, A.ptr, n, dtypeAB, B.ptr, n, dtypeAB, 0, C.ptr, n, dtypeC);
                for (let i = 0; i < 3; i++) call();
                addon.synchronize();
                const t0 = performance.now();
                for (let i = 0; i < iters; i++) call();
                addon.synchronize();
                const ms = (performance.now() - t0) / iters;
                console.log(
                    `gemm ${n}^3 ${dtypeAB}->${dtypeC} (x @ W^T): ${ms.toFixed(3)} ms, ` +
                        `${((2 * n ** 3) / ms / 1e9).toFixed(1)} TFLOP/s`
                );
                A.free();
                B.free();
                C.free();
            };
            run(4096, "bf16", "bf16", 20);
            run(4096, "bf16", "f32", 20);
            run(2048, "f32", "f32", 10);
        });
    });
}
