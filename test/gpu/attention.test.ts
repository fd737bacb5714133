// Flash attention on the GPU (native/cuda/attention.cu) against the CPU op (the reference): forward (out, lse)
// and backward (dq, dk, dv) on head dims 64, 96 and 128, grouped-query and plain heads, partial tiles, a padding mask
// with right- and left-padded rows and a fully masked row, packed segments, a KV cache (q_offset > 0, T < S), and
// a long sequence; the decode kernel (T = 1 without lse: per-row offsets, contiguous and paged caches, key_valid,
// deterministic bits, a CUDA graph replayed at other lengths); sliding windows in all of them (keys behind a
// window are NaN and their cache blocks absent, so reading one would show); then timing tables (no assertions on
// time; a sliding window against full attention). Runs only on a machine with a usable GPU (npm run test:gpu).
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
import {cuda, cudaAvailability, CudaGraph, DeviceBuffer} from "../../src/backend/cuda.js";
import {cudaAttentionOps} from "../../src/backend/cuda-attention-types.js";
import {Rng} from "../../src/backend/rng.js";
import {KV_BLOCK} from "../../src/model/graph.js";

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
     * relative L2 error and max abs error of got against ref over elements [from, to) (non-finite reference values
     * must match exactly); asserts relL2 <= relTol and max abs <= absTol
     */
    function checkErrors(
        label: string,
        got: Float32Array,
        ref: Float32Array,
        relTol: number,
        absTol: number,
        from = 0,
        to = ref.length
    ): {rel: number; worst: number} {
        let num = 0,
            den = 0,
            worst = 0,
            worstAt = -1;
        for (let i = from; i < to; i++) {
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
        assert.ok(rel <= relTol, `${label}: relative L2 error ${rel} > ${relTol}`);
        assert.ok(
            worst <= absTol,
            `${label}: max abs error ${worst} at ${worstAt} (got ${got[worstAt]}, ` + `expected ${ref[worstAt]}) > ${absTol}`
        );
        return {rel, worst};
    }

    /** checkErrors over the whole tensor, printing one line */
    function compare(label: string, got: Float32Array, ref: Float32Array, relTol: number, absTol: number): void {
        assert.equal(got.length, ref.length, `${label}: length`);
        const {rel, worst} = checkErrors(label, got, ref, relTol, absTol);
        console.log(
            `  ${label.padEnd(44)} relL2 ${rel.toExponential(2)}  maxAbs ${worst.toExponential(2)}` +
                ` (tol ${absTol.toExponential(2)})`
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
        /** a sliding window (0 or absent: none) */
        window?: number;
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
            seg = c.seg ?? null,
            window = c.window ?? 0;

        // CPU reference on the bf16 values
        const outRef = new Float32Array(nq),
            lseRef = new Float32Array(nl);
        cpu().attentionForward(
            outRef,
            lseRef,
            q.values,
            k.values,
            v.values,
            kv,
            seg,
            B,
            T,
            S,
            Hq,
            Hkv,
            D,
            qOffset,
            scale,
            window
        );
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
            scale,
            window
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
                scale,
                null,
                null,
                0,
                window
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
                    scale,
                    null,
                    null,
                    0,
                    window
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
                scale,
                window
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
            {name: "G=7 D=128 T=S=96", B: 1, T: 96, S: 96, Hq: 14, Hkv: 2, D: 128},
            // Phi-3-mini/medium and Phi-3.5-mini: head_dim 96 (32 heads of a 3072 hidden size)
            {name: "gqa D=96 T=S=128", B: 2, T: 128, S: 128, Hq: 4, Hkv: 2, D: 96, nullLse: true},
            {name: "partial tiles D=96 T=S=200", B: 2, T: 200, S: 200, Hq: 4, Hkv: 2, D: 96}
        ];
        // padding: row 0 full, row 1 right-padded (100 valid), row 2 left-padded (first 20 invalid: its first
        // 20 queries see nothing), row 3 fully masked
        for (const D of [64, 96, 128]) {
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
        for (const D of [64, 96, 128]) {
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
        cases.push({name: "kv cache T=1 S=300 q_offset=299 D=96", B: 2, T: 1, S: 300, Hq: 8, Hkv: 2, D: 96, qOffset: 299});
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
        // sliding windows: inside one key tile, exactly one, across tiles (whole tiles skipped before and after),
        // one key (itself), with padding, packing and a cache
        for (const [D, window] of [
            [64, 5],
            [128, 64],
            [64, 100],
            [128, 129],
            [96, 70],
            [64, 1]
        ])
            cases.push({name: `window ${window} D=${D} T=S=300`, B: 2, T: 300, S: 300, Hq: 4, Hkv: 2, D, window, nullLse: true});
        cases.push({
            name: "window 30 + padding D=128 T=S=150",
            B: 4,
            T: 150,
            S: 150,
            Hq: 4,
            Hkv: 2,
            D: 128,
            seed: 7,
            window: 30,
            // row 2: keys 50..99 hidden, so queries 50..78 see nothing in their window (zeros, lse -inf)
            keyValid: keyValidOf(4, 150, [
                [[0, 150]],
                [[0, 100]],
                [
                    [0, 50],
                    [100, 150]
                ],
                []
            ])
        });
        cases.push({
            name: "window 40 + packed segments D=64 T=S=256",
            B: 2,
            T: 256,
            S: 256,
            Hq: 4,
            Hkv: 1,
            D: 64,
            seed: 11,
            window: 40,
            seg: segOf(2, 256, [
                [50, 70, 136],
                [1, 100, 130]
            ]),
            keyValid: keyValidOf(2, 256, [[[0, 256]], [[0, 231]]])
        });
        cases.push({
            name: "window 70 kv cache T=5 S=300 q_offset=295",
            B: 2,
            T: 5,
            S: 300,
            Hq: 8,
            Hkv: 2,
            D: 128,
            qOffset: 295,
            window: 70
        });
        cases.push({
            name: "window 200 kv cache T=1 S=300 q_offset=299",
            B: 2,
            T: 1,
            S: 300,
            Hq: 8,
            Hkv: 2,
            D: 64,
            qOffset: 299,
            window: 200
        });
        cases.push({
            name: "window 256 long 1x2048 Hq=32 Hkv=8 D=128",
            B: 1,
            T: 2048,
            S: 2048,
            Hq: 32,
            Hkv: 8,
            D: 128,
            seed: 99,
            window: 256
        });

        for (const c of cases) test(c.name, () => runCase(c));

        test("argument errors", () => {
            const buf = DeviceBuffer.alloc("bf16", 4096);
            const lse = DeviceBuffer.alloc("f32", 64);
            const seg = DeviceBuffer.from("i32", new Int32Array(64));
            try {
                assert.equal(ops.attentionSupportsHeadDim(64), true);
                assert.equal(ops.attentionSupportsHeadDim(96), true);
                assert.equal(ops.attentionSupportsHeadDim(80), false);
                assert.throws(
                    () => ops.attentionForward(buf.ptr, lse.ptr, buf.ptr, buf.ptr, buf.ptr, 0, 0, 1, 4, 4, 1, 1, 80, 0, 1),
                    /head dims 64, 96 and 128/
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

    // Decoding steps (T = 1, lse null): the split-KV kernel. Each row's query sits at its own offset (a device
    // array, as in a KV cache), clamped to [0, S], and sees keys 0 .. offset; keys a row cannot see are NaN in the
    // inputs (and their cache blocks absent from the table), so reading them would show in the output.
    interface DecodeCase {
        name: string;
        B: number;
        S: number;
        Hq: number;
        Hkv: number;
        D: number;
        /** each row's q_offset; values past S are clamped to S by the kernel */
        offsets: number[];
        /** key_valid[b, j] = 0 where this is true (no key_valid when absent) */
        masked?: (b: number, j: number) => boolean;
        seed?: number;
        /** a sliding window (0 or absent: none) */
        window?: number;
        /** the shortest offsets a replay runs at (default: offsets): keys behind their windows are absent */
        minOffsets?: number[];
    }

    interface DecodeInputs {
        q: {bits: Uint16Array; values: Float32Array};
        k: {bits: Uint16Array; values: Float32Array};
        v: {bits: Uint16Array; values: Float32Array};
        keyValid: Uint8Array | null;
    }

    /** keys row b's query can see by position when its offset is `offset` */
    const visibleKeys = (S: number, offset: number) => Math.min(S, Math.max(0, offset) + 1);
    /** the first key the window lets it see (the kernel clamps an offset to [0, S]) */
    const firstKey = (S: number, offset: number, window = 0) =>
        window > 0 ? Math.max(0, Math.min(Math.max(offset, 0), S) - window + 1) : 0;

    /** random q, k, v (k and v NaN outside the keys each row sees at c.offsets) and key_valid */
    function decodeInputs(c: DecodeCase): DecodeInputs {
        const {B, S, Hq, Hkv, D} = c;
        const rng = new Rng(c.seed ?? 4321);
        const kvRow = Hkv * D;
        const q = randomBf16(rng, B * Hq * D),
            k = randomBf16(rng, B * S * kvRow),
            v = randomBf16(rng, B * S * kvRow);
        for (let b = 0; b < B; b++) {
            const from = (b * S + visibleKeys(S, c.offsets[b])) * kvRow,
                to = (b + 1) * S * kvRow;
            const before = (b * S + firstKey(S, (c.minOffsets ?? c.offsets)[b], c.window)) * kvRow;
            for (const t of [k, v]) {
                t.bits.fill(0xffff, from, to);
                t.values.fill(Number.NaN, from, to);
                t.bits.fill(0xffff, b * S * kvRow, before);
                t.values.fill(Number.NaN, b * S * kvRow, before);
            }
        }
        let keyValid: Uint8Array | null = null;
        if (c.masked) {
            keyValid = new Uint8Array(B * S);
            for (let b = 0; b < B; b++) for (let j = 0; j < S; j++) keyValid[b * S + j] = c.masked(b, j) ? 0 : 1;
        }
        return {q, k, v, keyValid};
    }

    /** the CPU op row by row, each at its clamped offset */
    function decodeReference(c: DecodeCase, inp: DecodeInputs, offsets: number[]): Float32Array {
        const {B, S, Hq, Hkv, D} = c;
        const qRow = Hq * D,
            kvRow = S * Hkv * D;
        const out = new Float32Array(B * qRow);
        for (let b = 0; b < B; b++) {
            const row = <T extends Float32Array | Uint8Array>(t: T, n: number) => t.subarray(b * n, (b + 1) * n) as T;
            cpu().attentionForward(
                row(out, qRow),
                null,
                row(inp.q.values, qRow),
                row(inp.k.values, kvRow),
                row(inp.v.values, kvRow),
                inp.keyValid ? row(inp.keyValid, S) : null,
                null,
                1,
                1,
                S,
                Hq,
                Hkv,
                D,
                // the kernel clamps an offset to [0, S]; offset S sees the same keys (all S) as S - 1, the most the
                // CPU op takes
                Math.min(Math.max(offsets[b], 0), S - 1),
                1 / Math.sqrt(D),
                c.window ?? 0
            );
        }
        return out;
    }

    /**
     * the inputs on the device, k/v contiguous [B, S, Hkv, D] or as a paged cache: the blocks rows can see (at
     * c.offsets) in shuffled order in a pool whose other blocks are NaN, the table one column wider than needed
     * and -1 past each row's blocks and before its window's (freed, as a KV cache frees them); `call` queues the decode into out at the offsets in a device i32 [B]
     */
    function decodeOnDevice(c: DecodeCase, inp: DecodeInputs, paged: boolean) {
        const {B, S, Hq, Hkv, D} = c;
        const bufs: DeviceBuffer[] = [];
        const keep = (b: DeviceBuffer): DeviceBuffer => {
            bufs.push(b);
            return b;
        };
        let k = inp.k.bits,
            v = inp.v.bits,
            table: DeviceBuffer | null = null,
            stride = 0;
        if (paged) {
            const perRow = Math.ceil(S / KV_BLOCK),
                blocks = B * perRow + 2,
                blockElems = KV_BLOCK * Hkv * D;
            stride = perRow + 1;
            const order = new Rng((c.seed ?? 4321) + 1).shuffle(Array.from({length: blocks}, (_, i) => i));
            const tableHost = new Int32Array(B * stride).fill(-1);
            k = new Uint16Array(blocks * blockElems).fill(0xffff);
            v = new Uint16Array(blocks * blockElems).fill(0xffff);
            for (let b = 0; b < B; b++) {
                const needed = Math.ceil(visibleKeys(S, c.offsets[b]) / KV_BLOCK);
                for (let i = Math.floor(firstKey(S, (c.minOffsets ?? c.offsets)[b], c.window) / KV_BLOCK); i < needed; i++) {
                    const at = order[b * perRow + i];
                    tableHost[b * stride + i] = at;
                    const from = (b * S + i * KV_BLOCK) * Hkv * D,
                        to = (b * S + Math.min(S, (i + 1) * KV_BLOCK)) * Hkv * D;
                    k.set(inp.k.bits.subarray(from, to), at * blockElems);
                    v.set(inp.v.bits.subarray(from, to), at * blockElems);
                }
            }
            table = keep(DeviceBuffer.from("i32", tableHost));
        }
        const dQ = keep(DeviceBuffer.from("bf16", inp.q.bits)),
            dK = keep(DeviceBuffer.from("bf16", k)),
            dV = keep(DeviceBuffer.from("bf16", v));
        const dKv = inp.keyValid ? keep(DeviceBuffer.from("u8", inp.keyValid)) : null;
        const call = (out: DeviceBuffer, dOffsets: DeviceBuffer) =>
            ops.attentionForward(
                out.ptr,
                null,
                dQ.ptr,
                dK.ptr,
                dV.ptr,
                dKv?.ptr ?? null,
                null,
                B,
                1,
                S,
                Hq,
                Hkv,
                D,
                0,
                1 / Math.sqrt(D),
                dOffsets.ptr,
                table?.ptr ?? null,
                stride,
                c.window ?? 0
            );
        return {call, free: () => bufs.forEach((b) => b.free())};
    }

    /**
     * out against the reference row by row (tolerances relative to the row's largest |value|, so a wrong long row
     * with small outputs cannot hide behind short rows); a row that sees no key (all masked) must be exact zeros.
     * Returns the worst relative L2 error and the number of such rows.
     */
    function checkDecodeRows(
        label: string,
        c: DecodeCase,
        inp: DecodeInputs,
        offsets: number[],
        out: Float32Array,
        ref: Float32Array
    ): {worstRel: number; empty: number} {
        const n = c.Hq * c.D;
        let worstRel = 0,
            empty = 0;
        for (let b = 0; b < c.B; b++) {
            const kend = visibleKeys(c.S, offsets[b]);
            let sees = false;
            for (let j = firstKey(c.S, offsets[b], c.window); j < kend && !sees; j++) sees = inp.keyValid?.[b * c.S + j] !== 0;
            if (!sees) {
                empty++;
                for (let i = b * n; i < (b + 1) * n; i++)
                    assert.ok(Object.is(out[i], 0), `${label}: row ${b} sees no key but out[${i}] = ${out[i]}`);
                continue;
            }
            const absTol = MAX_ABS_FRAC * maxAbs(ref.subarray(b * n, (b + 1) * n)) + ABS_FLOOR;
            const {rel} = checkErrors(`${label} row ${b}`, out, ref, REL_L2_TOL, absTol, b * n, (b + 1) * n);
            worstRel = Math.max(worstRel, rel);
        }
        return {worstRel, empty};
    }

    describe("cuda attention decode (T = 1, split-KV) vs cpu", () => {
        const spread = (B: number, max: number) => Array.from({length: B}, (_, b) => Math.round((max * b) / (B - 1)));
        const decodeCases: DecodeCase[] = [
            {name: "28/4 D=128 B=1 S=1", B: 1, S: 1, Hq: 28, Hkv: 4, D: 128, offsets: [0]},
            {
                name: "28/4 D=128 B=3 S=5000 key_valid",
                B: 3,
                S: 5000,
                Hq: 28,
                Hkv: 4,
                D: 128,
                offsets: [4999, 767, 0],
                masked: (b, j) => (b === 0 ? j % 7 === 3 : b === 1 ? j < 300 : false)
            },
            {name: "28/4 D=128 B=1 S=5000", B: 1, S: 5000, Hq: 28, Hkv: 4, D: 128, offsets: [4999]},
            {name: "28/4 D=64 B=17 S=700", B: 17, S: 700, Hq: 28, Hkv: 4, D: 64, offsets: spread(17, 699)},
            {name: "8/8 D=64 B=3 S=65", B: 3, S: 65, Hq: 8, Hkv: 8, D: 64, offsets: [62, 63, 64]},
            {
                name: "8/8 D=128 B=17 S=64 key_valid",
                B: 17,
                S: 64,
                Hq: 8,
                Hkv: 8,
                D: 128,
                offsets: [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 60, 61, 62, 63, 64, 100, 31],
                masked: (b, j) => b === 4 || (b === 9 && j % 2 === 0)
            },
            {name: "16/2 D=128 B=3 S=63", B: 3, S: 63, Hq: 16, Hkv: 2, D: 128, offsets: [62, 31, 0]},
            {
                name: "16/2 D=64 B=17 S=5000 key_valid",
                B: 17,
                S: 5000,
                Hq: 16,
                Hkv: 2,
                D: 64,
                offsets: [4999, 0, 62, 63, 64, 699, 5000, 9999, 127, 128, 1000, 2047, 4095, 3333, 255, 511, 4998],
                // row 3: its first 40 keys hidden; row 5: all but its last 50 (whole chunks see nothing); row 8:
                // everything (zeros); row 10: every third key
                masked: (b, j) => (b === 3 && j < 40) || (b === 5 && j < 650) || b === 8 || (b === 10 && j % 3 === 0)
            },
            {name: "16/2 D=128 B=1 S=700", B: 1, S: 700, Hq: 16, Hkv: 2, D: 128, offsets: [699]},
            {name: "32/32 D=96 B=3 S=700 (Phi-3-mini)", B: 3, S: 700, Hq: 32, Hkv: 32, D: 96, offsets: [699, 300, 5]},
            {name: "20/1 D=64 B=3 S=700 (heads in 2 groups)", B: 3, S: 700, Hq: 20, Hkv: 1, D: 64, offsets: [699, 300, 5]},
            // sliding windows: a row's chunks start at its window's first tile
            {
                name: "window 300 28/4 D=128 B=3 S=5000",
                B: 3,
                S: 5000,
                Hq: 28,
                Hkv: 4,
                D: 128,
                offsets: [4999, 767, 100],
                window: 300
            },
            {
                name: "window 64 16/2 D=64 B=17 S=700 key_valid",
                B: 17,
                S: 700,
                Hq: 16,
                Hkv: 2,
                D: 64,
                offsets: spread(17, 699),
                window: 64,
                // row 4 (offset 175): its last 70 keys hidden, so nothing in its window (zeros); row 9: every other key
                masked: (b, j) => (b === 4 && j > 175 - 70) || (b === 9 && j % 2 === 0)
            },
            {name: "window 1 8/8 D=128 B=3 S=130", B: 3, S: 130, Hq: 8, Hkv: 8, D: 128, offsets: [129, 64, 0], window: 1},
            {
                name: "window 4096 28/4 D=128 B=2 S=5000",
                B: 2,
                S: 5000,
                Hq: 28,
                Hkv: 4,
                D: 128,
                offsets: [4999, 4200],
                window: 4096
            }
        ];

        for (const c of decodeCases) {
            test(c.name, () => {
                const inp = decodeInputs(c);
                const ref = decodeReference(c, inp, c.offsets);
                const dOffsets = DeviceBuffer.from("i32", Int32Array.from(c.offsets));
                const bits: Uint16Array[] = [];
                try {
                    for (const paged of [false, true]) {
                        const layout = paged ? "paged" : "contiguous";
                        const dev = decodeOnDevice(c, inp, paged);
                        const out1 = garbage("bf16", c.B * c.Hq * c.D),
                            out2 = garbage("bf16", c.B * c.Hq * c.D);
                        try {
                            dev.call(out1, dOffsets);
                            dev.call(out2, dOffsets);
                            const first = out1.toHost() as Uint16Array;
                            assert.deepEqual(out2.toHost(), first, `${c.name} ${layout}: two runs differ`);
                            const {worstRel, empty} = checkDecodeRows(
                                `${c.name} ${layout}`,
                                c,
                                inp,
                                c.offsets,
                                downloadBf16(out1),
                                ref
                            );
                            console.log(
                                `  decode ${c.name} ${layout}`.padEnd(56) +
                                    `worst row relL2 ${worstRel.toExponential(2)}` +
                                    (empty > 0 ? `, ${empty} rows with no visible key are zeros` : "")
                            );
                            bits.push(first);
                        } finally {
                            dev.free();
                            out1.free();
                            out2.free();
                        }
                    }
                    // same chunks, same order: the paged cache gives the same bits as the contiguous one
                    assert.deepEqual(bits[1], bits[0], `${c.name}: paged and contiguous outputs differ`);
                } finally {
                    dOffsets.free();
                }
            });
        }

        for (const window of [0, 200])
            test(`captured in a CUDA graph, replayed at other lengths${window ? ` (window ${window})` : ""}`, () => {
                // the grid is fixed at capture; each replay reads the rows' offsets from the device (with a window, the
                // inputs hold NaN behind each row's window at the longest lengths, where no replay may read)
                const lengths = [
                    [699, 64, 0],
                    [10, 699, 300]
                ];
                const c: DecodeCase = {
                    name: `graph 28/4 D=128 B=3 S=700${window ? ` window ${window}` : ""}`,
                    window,
                    B: 3,
                    S: 700,
                    Hq: 28,
                    Hkv: 4,
                    D: 128,
                    offsets: lengths[0].map((x, b) => Math.max(x, lengths[1][b])),
                    minOffsets: lengths[0].map((x, b) => Math.min(x, lengths[1][b])),
                    masked: (b, j) => b === 2 && j % 5 === 1
                };
                const inp = decodeInputs(c);
                const dev = decodeOnDevice(c, inp, true);
                const dOffsets = DeviceBuffer.from("i32", Int32Array.from(lengths[0]));
                const n = c.B * c.Hq * c.D;
                const replayed = garbage("bf16", n),
                    eager = garbage("bf16", n);
                let graph: CudaGraph | null = null;
                try {
                    graph = CudaGraph.capture(() => dev.call(replayed, dOffsets));
                    for (const offsets of lengths) {
                        dOffsets.upload(Int32Array.from(offsets));
                        cuda().memset(replayed.ptr, 0xff, replayed.bytes);
                        graph.launch();
                        const got = replayed.toHost() as Uint16Array;
                        dev.call(eager, dOffsets);
                        assert.deepEqual(eager.toHost(), got, `replay at ${offsets}: differs from a call at the same lengths`);
                        const ref = decodeReference(c, inp, offsets);
                        const {worstRel} = checkDecodeRows(
                            `${c.name} at ${offsets}`,
                            c,
                            inp,
                            offsets,
                            downloadBf16(replayed),
                            ref
                        );
                        console.log(`  decode ${c.name} replayed at ${offsets}: worst row relL2 ${worstRel.toExponential(2)}`);
                    }
                } finally {
                    graph?.destroy();
                    for (const b of [replayed, eager, dOffsets]) b.free();
                    dev.free();
                }
            });
    });

    describe("cuda attention timing", () => {
        test("forward / backward throughput (causal, bf16)", () => {
            // with a sliding window, key tiles outside it are skipped: the time should follow the visible pairs
            const shapes: {name: string; B: number; T: number; Hq: number; Hkv: number; D: number; window?: number}[] = [
                {name: "Qwen2-7B", B: 4, T: 512, Hq: 28, Hkv: 4, D: 128},
                {name: "Qwen2-0.5B-like", B: 4, T: 512, Hq: 14, Hkv: 2, D: 64},
                {name: "long", B: 1, T: 2048, Hq: 32, Hkv: 8, D: 128},
                {name: "8k full", B: 1, T: 8192, Hq: 32, Hkv: 8, D: 128},
                {name: "8k window 1024", B: 1, T: 8192, Hq: 32, Hkv: 8, D: 128, window: 1024},
                {name: "8k window 4096", B: 1, T: 8192, Hq: 32, Hkv: 8, D: 128, window: 4096}
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
                    const window = s.window ?? 0;
                    const fwd = () =>
                        ops.attentionForward(
                            out.ptr,
                            lse.ptr,
                            q.ptr,
                            k.ptr,
                            v.ptr,
                            0,
                            0,
                            B,
                            T,
                            S,
                            Hq,
                            Hkv,
                            D,
                            0,
                            scale,
                            null,
                            null,
                            0,
                            window
                        );
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
                            scale,
                            window
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
                    // causal: T(T+1)/2 (query, key) pairs per head (with a window W: query i sees min(i + 1, W));
                    // forward 2 matmuls (4 D flops a pair), backward 5 (2.5x the forward: the FlashAttention
                    // convention, recomputing S not counted)
                    const W = window > 0 ? Math.min(window, T) : T;
                    const pairs = (W * (W + 1)) / 2 + (T - W) * W;
                    const fwdFlops = 4 * B * Hq * D * pairs;
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

        // Decoding (Qwen2-7B: 28 query heads over 4 kv heads, D 128) from a paged cache of 4096 positions, rows
        // at `len` keys: the split-KV kernel against the general one. The general kernel is reached by passing an
        // lse buffer (the decode kernel is chosen only when lse is null, as in inference; training always passes
        // one), which costs it only B * Hq more f32 stores, so no switch is needed in the library for the
        // comparison. Each is timed as 28 calls (one per layer) recorded in a CUDA graph and replayed, as the
        // decoding step is, so the times are the GPU's, not the host's launch overhead.
        test("decode: split-KV kernel vs the general kernel (Qwen2-7B shape, graph replay)", () => {
            const Hq = 28,
                Hkv = 4,
                D = 128,
                S = 4096,
                layers = 28,
                reps = 20;
            const scale = 1 / Math.sqrt(D);
            const perCallMicros = (call: () => void): number => {
                call();
                cuda().synchronize();
                const graph = CudaGraph.capture(() => {
                    for (let l = 0; l < layers; l++) call();
                });
                try {
                    graph.launch();
                    cuda().synchronize();
                    const t0 = performance.now();
                    for (let r = 0; r < reps; r++) graph.launch();
                    cuda().synchronize();
                    return ((performance.now() - t0) * 1000) / (reps * layers);
                } finally {
                    graph.destroy();
                }
            };
            const rows: string[] = [];
            for (const B of [1, 8, 32]) {
                const perRow = S / KV_BLOCK;
                const table = DeviceBuffer.from(
                    "i32",
                    Int32Array.from({length: B * perRow}, (_, i) => i)
                );
                // values do not change the time: a constant (0x3c3c, about 0.0115) stands for the cache
                const filled = (n: number) => {
                    const b = DeviceBuffer.alloc("bf16", n);
                    cuda().memset(b.ptr, 0x3c, b.bytes);
                    return b;
                };
                const bufs = [
                    table,
                    filled(B * Hq * D),
                    filled(B * perRow * KV_BLOCK * Hkv * D),
                    filled(B * perRow * KV_BLOCK * Hkv * D),
                    DeviceBuffer.alloc("bf16", B * Hq * D),
                    DeviceBuffer.alloc("f32", B * Hq),
                    DeviceBuffer.alloc("i32", B)
                ];
                const [, q, k, v, out, lse, offsets] = bufs;
                try {
                    for (const len of [768, 4096]) {
                        offsets.upload(new Int32Array(B).fill(len - 1));
                        const call = (withLse: boolean) => () =>
                            ops.attentionForward(
                                out.ptr,
                                withLse ? lse.ptr : null,
                                q.ptr,
                                k.ptr,
                                v.ptr,
                                null,
                                null,
                                B,
                                1,
                                S,
                                Hq,
                                Hkv,
                                D,
                                0,
                                scale,
                                offsets.ptr,
                                table.ptr,
                                perRow
                            );
                        const oldUs = perCallMicros(call(true)),
                            newUs = perCallMicros(call(false));
                        rows.push(
                            `  B=${String(B).padStart(2)} len=${String(len).padStart(4)}   general ${oldUs.toFixed(1).padStart(7)} us` +
                                `   split-KV ${newUs.toFixed(1).padStart(6)} us   ${(oldUs / newUs).toFixed(1)}x`
                        );
                    }
                } finally {
                    for (const b of bufs) b.free();
                }
            }
            console.log(
                `cuda attention decode, Qwen2-7B (Hq=${Hq} Hkv=${Hkv} D=${D}), paged cache of ${S}, per call ` +
                    `(${layers} calls per graph, ${reps} replays):\n${rows.join("\n")}`
            );
        });
    });
}
