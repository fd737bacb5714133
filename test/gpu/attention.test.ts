// Flash attention on the GPU (native/cuda/attention.cu) against the CPU op (the reference): forward (out, lse)
// and backward (dq, dk, dv) on head dims 64 and 128, grouped-query and plain heads, partial tiles, a padding mask
// with right- and left-padded rows and a fully masked row, packed segments, a KV cache (q_offset > 0, T < S), and
// a long sequence; then a timing table (no assertions on time). Runs only on a machine with a usable GPU
// (npm run test:gpu).
//
// Inputs are random normals rounded to bf16; the CPU runs in f32 on exactly those bf16 values, so the only
// differences are the GPU's own roundings: P and dS are rounded to bf16 before their tensor-core products, and out,
// dq, dk, dv are stored as bf16 (each a relative error of at most 2^-9, about 2e-3, random in sign, so sums of
// many terms stay near that); the backward also takes D_i from the bf16 out. The expected relative L2 error is
// therefore a few 1e-3 (a lane-level emulation of the kernels with these roundings gave 2-3e-3 relative L2 and
// <= 4.3e-3 max abs / max |ref|): we require relative L2 <= 1e-2, max abs error <= 3e-2 of the tensor's largest
// |value| (+1e-4), lse within 2e-3 (it is f32 throughout), and exact zeros / -inf for queries that see no key.
import {test, describe} from "node:test";
import assert from "node:assert/strict";
import {cpu} from "../../src/backend/cpu.js";
import {cuda, cudaAvailability, DeviceBuffer} from "../../src/backend/cuda.js";
import {cudaAttentionOps} from "../../src/backend/cuda-attention-types.js";
import {Rng} from "../../src/backend/rng.js";

const availability = cudaAvailability();

if (!availability.usable) {
    test("cuda attention", {skip: availability.reason ?? "CUDA is not usable"}, () => {});
} else {
    const ops = cudaAttentionOps();

    const REL_L2_TOL = 1e-2;
    const MAX_ABS_FRAC = 3e-2;
    /** floor of the max-abs tolerance, for tensors whose reference is (near) zero, e.g. dq when a query sees one key:
     * there dS = P (dP - D_i) is exactly 0 on the CPU and fp32 summation-order noise (~1e-6) on the GPU */
    const ABS_FLOOR = 1e-4;
    const LSE_ABS_TOL = 2e-3;

    /** n standard normals (Box-Muller), rounded to bf16: the bits and their f32 values */
    function randomBf16(rng: Rng, n: number): {bits: Uint16Array; values: Float32Array} {
        const x = new Float32Array(n);
        for (let i = 0; i < n; i += 2) {
            const u = 1 - rng.next(),
                w = rng.next();
            const r = Math.sqrt(-2 * Math.log(u));
            x[i] = r * Math.cos(2 * Math.PI * w);
            if (i + 1 < n) x[i + 1] = r * Math.sin(2 * Math.PI * w);
        }
        const bits = new Uint16Array(n);
        cpu().f32ToBf16(bits, x, n);
        const values = new Float32Array(n);
        cpu().bf16ToF32(values, bits, n);
        return {bits, values};
    }

    function downloadBf16(buf: DeviceBuffer): Float32Array {
        const bits = buf.toHost() as Uint16Array;
        const out = new Float32Array(bits.length);
        cpu().bf16ToF32(out, bits, bits.length);
        return out;
    }

    /** a bf16 (or f32) device buffer filled with NaN bits (0xFFFF...), so that every element must be written */
    function garbage(dtype: "bf16" | "f32", n: number): DeviceBuffer {
        const b = DeviceBuffer.alloc(dtype, n);
        cuda().memset(b.ptr, 0xff, b.bytes);
        return b;
    }

    function maxAbs(x: Float32Array): number {
        let m = 0;
        for (const v of x) if (Number.isFinite(v)) m = Math.max(m, Math.abs(v));
        return m;
    }

    /**
     * relative L2 error and max abs error of got against ref (non-finite reference values must match exactly);
     * prints one line and asserts relL2 <= relTol and max abs <= absTol
     */
    function compare(label: string, got: Float32Array, ref: Float32Array, relTol: number, absTol: number): void {
        assert.equal(got.length, ref.length, `${label}: length`);
        let num = 0,
            den = 0,
            worst = 0,
            worstAt = -1;
        for (let i = 0; i < ref.length; i++) {
            const r = ref[i],
                g = got[i];
            if (!Number.isFinite(r) || !Number.isFinite(g)) {
                assert.ok(Object.is(r, g), `${label}: element ${i} is ${g}, expected ${r}`);
                continue;
            }
            const d = g - r;
            num += d * d;
            den += r * r;
            if (Math.abs(d) > worst) {
                worst = Math.abs(d);
                worstAt = i;
            }
        }
        const rel = den > 0 ? Math.sqrt(num / den) : Math.sqrt(num);
        console.log(
            `  ${label.padEnd(44)} relL2 ${rel.toExponential(2)}  maxAbs ${worst.toExponential(2)}` +
                ` (tol ${absTol.toExponential(2)})`
        );
        assert.ok(rel <= relTol, `${label}: relative L2 error ${rel} > ${relTol}`);
        assert.ok(
            worst <= absTol,
            `${label}: max abs error ${worst} at ${worstAt} (got ${got[worstAt]}, ` + `expected ${ref[worstAt]}) > ${absTol}`
        );
    }

    interface Case {
        name: string;
        B: number;
        T: number;
        S: number;
        Hq: number;
        Hkv: number;
        D: number;
        qOffset?: number;
        keyValid?: Uint8Array;
        seg?: Int32Array;
        seed?: number;
        /** also run the forward with lse = null and check that out is unchanged */
        nullLse?: boolean;
    }

    function runCase(c: Case): void {
        const {B, T, S, Hq, Hkv, D} = c;
        const qOffset = c.qOffset ?? 0;
        const scale = 1 / Math.sqrt(D);
        const rng = new Rng(c.seed ?? 1234);
        const nq = B * T * Hq * D,
            nkv = B * S * Hkv * D,
            nl = B * Hq * T;
        const q = randomBf16(rng, nq),
            k = randomBf16(rng, nkv),
            v = randomBf16(rng, nkv);
        const dout = randomBf16(rng, nq);
        const kv = c.keyValid ?? null,
            seg = c.seg ?? null;

        // CPU reference on the bf16 values
        const outRef = new Float32Array(nq),
            lseRef = new Float32Array(nl);
        cpu().attentionForward(outRef, lseRef, q.values, k.values, v.values, kv, seg, B, T, S, Hq, Hkv, D, qOffset, scale);
        const dqRef = new Float32Array(nq),
            dkRef = new Float32Array(nkv),
            dvRef = new Float32Array(nkv);
        cpu().attentionBackward(
            dqRef,
            dkRef,
            dvRef,
            dout.values,
            q.values,
            k.values,
            v.values,
            outRef,
            lseRef,
            kv,
            seg,
            B,
            T,
            S,
            Hq,
            Hkv,
            D,
            qOffset,
            scale
        );

        const bufs: DeviceBuffer[] = [];
        const keep = (b: DeviceBuffer): DeviceBuffer => {
            bufs.push(b);
            return b;
        };
        try {
            const dQ = keep(DeviceBuffer.from("bf16", q.bits)),
                dK = keep(DeviceBuffer.from("bf16", k.bits));
            const dV = keep(DeviceBuffer.from("bf16", v.bits)),
                dDout = keep(DeviceBuffer.from("bf16", dout.bits));
            const dKv = kv ? keep(DeviceBuffer.from("u8", kv)) : null;
            const dSeg = seg ? keep(DeviceBuffer.from("i32", seg)) : null;
            const dOut = keep(garbage("bf16", nq)),
                dLse = keep(garbage("f32", nl));

            ops.attentionForward(
                dOut.ptr,
                dLse.ptr,
                dQ.ptr,
                dK.ptr,
                dV.ptr,
                dKv?.ptr ?? 0,
                dSeg?.ptr ?? null,
                B,
                T,
                S,
                Hq,
                Hkv,
                D,
                qOffset,
                scale
            );
            const out = downloadBf16(dOut),
                lse = dLse.toHost() as Float32Array;
            compare(`${c.name}: out`, out, outRef, REL_L2_TOL, MAX_ABS_FRAC * maxAbs(outRef) + ABS_FLOOR);
            compare(`${c.name}: lse`, lse, lseRef, 1e-3, LSE_ABS_TOL);

            // queries that see no key: out rows exactly zero (lse -inf was checked exactly above)
            let masked = 0;
            for (let b = 0; b < B; b++) {
                for (let h = 0; h < Hq; h++) {
                    for (let t = 0; t < T; t++) {
                        if (lseRef[(b * Hq + h) * T + t] !== -Infinity) continue;
                        masked++;
                        const row = ((b * T + t) * Hq + h) * D;
                        for (let d = 0; d < D; d++)
                            assert.ok(
                                Object.is(out[row + d], 0),
                                `${c.name}: fully masked row b=${b} h=${h} t=${t} ` + `has out[${d}] = ${out[row + d]}`
                            );
                    }
                }
            }
            if (masked > 0) console.log(`  ${c.name}: ${masked} fully masked query rows are zero with lse = -inf`);

            if (c.nullLse) {
                const dOut2 = keep(garbage("bf16", nq));
                ops.attentionForward(
                    dOut2.ptr,
                    null,
                    dQ.ptr,
                    dK.ptr,
                    dV.ptr,
                    dKv?.ptr ?? null,
                    dSeg?.ptr ?? 0,
                    B,
                    T,
                    S,
                    Hq,
                    Hkv,
                    D,
                    qOffset,
                    scale
                );
                assert.deepEqual(dOut2.toHost(), dOut.toHost(), `${c.name}: out with lse = null differs`);
            }

            const dDq = keep(garbage("bf16", nq)),
                dDk = keep(garbage("bf16", nkv)),
                dDv = keep(garbage("bf16", nkv));
            ops.attentionBackward(
                dDq.ptr,
                dDk.ptr,
                dDv.ptr,
                dDout.ptr,
                dQ.ptr,
                dK.ptr,
                dV.ptr,
                dOut.ptr,
                dLse.ptr,
                dKv?.ptr ?? 0,
                dSeg?.ptr ?? 0,
                B,
                T,
                S,
                Hq,
                Hkv,
                D,
                qOffset,
                scale
            );
            const dq = downloadBf16(dDq),
                dk = downloadBf16(dDk),
                dv = downloadBf16(dDv);
            compare(`${c.name}: dq`, dq, dqRef, REL_L2_TOL, MAX_ABS_FRAC * maxAbs(dqRef) + ABS_FLOOR);
            compare(`${c.name}: dk`, dk, dkRef, REL_L2_TOL, MAX_ABS_FRAC * maxAbs(dkRef) + ABS_FLOOR);
            compare(`${c.name}: dv`, dv, dvRef, REL_L2_TOL, MAX_ABS_FRAC * maxAbs(dvRef) + ABS_FLOOR);
        } finally {
            for (const b of bufs) b.free();
        }
    }

    /** key_valid[B,S] from each row's list of [start, end) valid ranges */
    function keyValidOf(B: number, S: number, ranges: [number, number][][]): Uint8Array {
        const kv = new Uint8Array(B * S);
        for (let b = 0; b < B; b++) for (const [s, e] of ranges[b]) kv.fill(1, b * S + s, b * S + e);
        return kv;
    }

    /** seg[B,S] from each row's segment lengths (ids 0, 1, ...; positions past the last segment get -1) */
    function segOf(B: number, S: number, lengths: number[][]): Int32Array {
        const seg = new Int32Array(B * S).fill(-1);
        for (let b = 0; b < B; b++) {
            let pos = 0;
            lengths[b].forEach((len, id) => {
                seg.fill(id, b * S + pos, b * S + pos + len);
                pos += len;
            });
        }
        return seg;
    }

    describe("cuda attention vs cpu (bf16 inputs)", () => {
        const cases: Case[] = [
            {name: "gqa D=64 T=S=128", B: 2, T: 128, S: 128, Hq: 4, Hkv: 2, D: 64, nullLse: true},
            {name: "gqa D=128 T=S=128", B: 2, T: 128, S: 128, Hq: 4, Hkv: 2, D: 128, nullLse: true},
            {name: "partial tiles D=64 T=S=200", B: 2, T: 200, S: 200, Hq: 4, Hkv: 2, D: 64},
            {name: "partial tiles D=128 T=S=200", B: 2, T: 200, S: 200, Hq: 4, Hkv: 2, D: 128},
            {name: "Hq=Hkv D=64 T=S=130", B: 2, T: 130, S: 130, Hq: 3, Hkv: 3, D: 64},
            {name: "Hq=Hkv D=128 T=S=70", B: 1, T: 70, S: 70, Hq: 2, Hkv: 2, D: 128},
            {name: "tiny T=S=1", B: 2, T: 1, S: 1, Hq: 2, Hkv: 1, D: 64},
            {name: "G=7 D=128 T=S=96", B: 1, T: 96, S: 96, Hq: 14, Hkv: 2, D: 128}
        ];
        // padding: row 0 full, row 1 right-padded (100 valid), row 2 left-padded (first 20 invalid: its first
        // 20 queries see nothing), row 3 fully masked
        for (const D of [64, 128]) {
            const B = 4,
                S = 150;
            cases.push({
                name: `padding mask D=${D} T=S=150`,
                B,
                T: S,
                S,
                Hq: 4,
                Hkv: 2,
                D,
                seed: 7,
                keyValid: keyValidOf(B, S, [[[0, S]], [[0, 100]], [[20, S]], []])
            });
        }
        // packed segments: row 0 three segments; row 1 a one-token segment, two more, then 25 padded positions
        // (seg -1, key_valid 0: fully masked queries)
        for (const D of [64, 128]) {
            const B = 2,
                S = 256;
            cases.push({
                name: `packed segments D=${D} T=S=256`,
                B,
                T: S,
                S,
                Hq: 4,
                Hkv: 1,
                D,
                seed: 11,
                seg: segOf(B, S, [
                    [50, 70, 136],
                    [1, 100, 130]
                ]),
                keyValid: keyValidOf(B, S, [[[0, S]], [[0, 231]]])
            });
        }
        // KV cache: T queries at the end of S = 300 keys, and 5 queries in the middle (later keys causally hidden)
        cases.push({name: "kv cache T=1 S=300 q_offset=299", B: 2, T: 1, S: 300, Hq: 8, Hkv: 2, D: 128, qOffset: 299});
        cases.push({name: "kv cache T=5 S=300 q_offset=295", B: 2, T: 5, S: 300, Hq: 8, Hkv: 2, D: 128, qOffset: 295});
        cases.push({name: "kv cache T=5 S=300 q_offset=295 D=64", B: 2, T: 5, S: 300, Hq: 8, Hkv: 2, D: 64, qOffset: 295});
        cases.push({name: "kv cache T=5 S=300 q_offset=100", B: 1, T: 5, S: 300, Hq: 4, Hkv: 4, D: 64, qOffset: 100});
        cases.push({
            name: "kv cache + segments T=5 S=300",
            B: 1,
            T: 5,
            S: 300,
            Hq: 4,
            Hkv: 2,
            D: 128,
            qOffset: 295,
            seg: segOf(1, 300, [[150, 148, 2]])
        });
        cases.push({name: "long 1x2048 Hq=32 Hkv=8 D=128", B: 1, T: 2048, S: 2048, Hq: 32, Hkv: 8, D: 128, seed: 99});

        for (const c of cases) test(c.name, () => runCase(c));

        test("argument errors", () => {
            const buf = DeviceBuffer.alloc("bf16", 4096);
            const lse = DeviceBuffer.alloc("f32", 64);
            const seg = DeviceBuffer.from("i32", new Int32Array(64));
            try {
                assert.equal(ops.attentionSupportsHeadDim(64), true);
                assert.equal(ops.attentionSupportsHeadDim(96), false);
                assert.throws(
                    () => ops.attentionForward(buf.ptr, lse.ptr, buf.ptr, buf.ptr, buf.ptr, 0, 0, 1, 4, 4, 1, 1, 96, 0, 1),
                    /head dims 64 and 128/
                );
                assert.throws(
                    () => ops.attentionForward(buf.ptr, lse.ptr, buf.ptr, buf.ptr, buf.ptr, 0, 0, 1, 4, 4, 3, 2, 64, 0, 1),
                    /multiple of Hkv/
                );
                assert.throws(
                    () => ops.attentionForward(buf.ptr, lse.ptr, buf.ptr, buf.ptr, buf.ptr, 0, seg.ptr, 1, 4, 8, 1, 1, 64, 5, 1),
                    /q_offset \+ T <= S/
                );
                assert.throws(
                    () => ops.attentionForward(buf.ptr + 2, lse.ptr, buf.ptr, buf.ptr, buf.ptr, 0, 0, 1, 4, 4, 1, 1, 64, 0, 1),
                    /16-byte aligned/
                );
                assert.throws(
                    () =>
                        ops.attentionBackward(
                            buf.ptr,
                            buf.ptr,
                            buf.ptr,
                            buf.ptr,
                            buf.ptr,
                            buf.ptr,
                            buf.ptr,
                            buf.ptr,
                            0,
                            0,
                            0,
                            1,
                            4,
                            4,
                            1,
                            1,
                            64,
                            0,
                            1
                        ),
                    /null device buffer/
                );
            } finally {
                buf.free();
                lse.free();
                seg.free();
            }
        });
    });

    describe("cuda attention timing", () => {
        test("forward / backward throughput (causal, bf16)", () => {
            const shapes = [
                {name: "Qwen2-7B", B: 4, T: 512, Hq: 28, Hkv: 4, D: 128},
                {name: "Qwen2-0.5B-like", B: 4, T: 512, Hq: 14, Hkv: 2, D: 64},
                {name: "long", B: 1, T: 2048, Hq: 32, Hkv: 8, D: 128}
            ];
            const rows: string[] = [];
            for (const s of shapes) {
                const {B, T, Hq, Hkv, D} = s;
                const S = T;
                const rng = new Rng(5);
                const nq = B * T * Hq * D,
                    nkv = B * S * Hkv * D;
                const input = (n: number) => DeviceBuffer.from("bf16", randomBf16(rng, n).bits);
                const bufs = [
                    input(nq),
                    input(nkv),
                    input(nkv),
                    input(nq),
                    DeviceBuffer.alloc("bf16", nq),
                    DeviceBuffer.alloc("f32", B * Hq * T),
                    DeviceBuffer.alloc("bf16", nq),
                    DeviceBuffer.alloc("bf16", nkv),
                    DeviceBuffer.alloc("bf16", nkv)
                ];
                const [q, k, v, dout, out, lse, dq, dk, dv] = bufs;
                try {
                    const scale = 1 / Math.sqrt(D);
                    const fwd = () =>
                        ops.attentionForward(out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, 0, 0, B, T, S, Hq, Hkv, D, 0, scale);
                    const bwd = () =>
                        ops.attentionBackward(
                            dq.ptr,
                            dk.ptr,
                            dv.ptr,
                            dout.ptr,
                            q.ptr,
                            k.ptr,
                            v.ptr,
                            out.ptr,
                            lse.ptr,
                            0,
                            0,
                            B,
                            T,
                            S,
                            Hq,
                            Hkv,
                            D,
                            0,
                            scale
                        );
                    const time = (fn: () => void, iters: number): number => {
                        for (let i = 0; i < 3; i++) fn();
                        cuda().synchronize();
                        const t0 = performance.now();
                        for (let i = 0; i < iters; i++) fn();
                        cuda().synchronize();
                        return (performance.now() - t0) / iters;
                    };
                    const fwdMs = time(fwd, 20);
                    const bwdMs = time(bwd, 20);
                    // causal: T(T+1)/2 (query, key) pairs per head; forward 2 matmuls (4 D flops a pair), backward
                    // 5 (2.5x the forward: the FlashAttention convention, recomputing S not counted)
                    const fwdFlops = 4 * B * Hq * D * ((T * (T + 1)) / 2);
                    const bwdFlops = 2.5 * fwdFlops;
                    const cell = (ms: number, flops: number) =>
                        `${ms.toFixed(3).padStart(7)} ms ${(flops / ms / 1e9).toFixed(1).padStart(6)} TFLOP/s`;
                    rows.push(
                        `  ${s.name.padEnd(16)} B=${B} T=${T} Hq=${Hq} Hkv=${Hkv} D=${D}`.padEnd(60) +
                            `fwd ${cell(fwdMs, fwdFlops)}   bwd ${cell(bwdMs, bwdFlops)}`
                    );
                } finally {
                    for (const b of bufs) b.free();
                }
            }
            console.log("cuda attention timing (mean of 20 after 3 warm-ups):\n" + rows.join("\n"));
        });
    });
}
