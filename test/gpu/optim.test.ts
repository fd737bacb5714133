// optim.test.ts: the device optimizer (native/cuda/optim.h) against the CPU optimizer ops (native/cpu/optim.cpp,
// through loadOptimOps()) on seeded random parameters and gradients (GPU machine only: npm run test:gpu).
//
// Both sides run the same arithmetic with the same roundings (host-computed scalars, explicit IEEE operations on
// the device), so after 3 steps the results should be identical. The checks allow a little less than that:
//   - 8-bit state codes: the number of differing codes is printed; at most 0.1% may differ. A code can only flip
//     when m/absmax or v/absmax lands within an ulp of a quantization midpoint and the two sides' values differ
//     by that ulp, which identical arithmetic rules out; the allowance keeps a 1-ulp slip from failing the run
//     while the printed count still shows it.
//   - parameters and fp32 states: max |gpu - cpu| / |cpu| <= 1e-6 (the number of non-identical values is printed).
//   - absmax scales: the same 1e-6.
// Then: the grad-norm reduction against the CPU's double sums, on-device clipping against clipGradNorm, paged
// (unified-memory) states against ordinary device memory, and a timing table (printed only).
import {after, describe, test} from "node:test";
import assert from "node:assert/strict";
import {cudaAvailability, DeviceBuffer, type DeviceDtype} from "../../src/backend/cuda.js";
import {loadOptimOps} from "../../src/backend/native-optim-types.js";
import {cudaKernelOps, type CudaKernelOps} from "../../src/backend/cuda-kernels-types.js";
import {optimizerDynamicMaps} from "../../src/optim/adamw.js";
import {clipGradNorm} from "../../src/optim/clip.js";
import {Prng, randn32 as randn} from "../helpers/prng.js";
import {timeIt} from "../helpers/gpu-timing.js";

/** max |got - ref| / |ref| over finite values (0 where both are equal; NaN must match NaN) and the count of
 *  values that are not bit-identical */
function compareF32(got: Float32Array, ref: Float32Array): {maxRel: number; differing: number} {
    assert.equal(got.length, ref.length);
    const gb = new Uint32Array(got.buffer, got.byteOffset, got.length);
    const rb = new Uint32Array(ref.buffer, ref.byteOffset, ref.length);
    let maxRel = 0,
        differing = 0;
    for (let i = 0; i < ref.length; i++) {
        if (gb[i] === rb[i]) continue;
        differing++;
        if (Number.isNaN(ref[i]) || Number.isNaN(got[i])) {
            if (!(Number.isNaN(ref[i]) && Number.isNaN(got[i]))) maxRel = Infinity;
            continue;
        }
        const e = ref[i] === got[i] ? 0 : Math.abs(got[i] - ref[i]) / Math.abs(ref[i]);
        if (!(e <= maxRel)) maxRel = e;
    }
    return {maxRel, differing};
}

function checkF32(what: string, got: Float32Array, ref: Float32Array, tol = 1e-6): void {
    const {maxRel, differing} = compareF32(got, ref);
    const ok = maxRel <= tol;
    console.log(
        `${ok ? "OK    " : "NOT OK"} ${what}: ${differing} of ${ref.length} not bit-identical, ` +
            `maxRel ${maxRel === 0 ? "0" : maxRel.toExponential(2)} (tol ${tol.toExponential(0)})`
    );
    assert.ok(ok, `${what}: max relative error ${maxRel} > ${tol}`);
}

function checkCodes(what: string, got: Uint8Array, ref: Uint8Array): void {
    let differing = 0;
    for (let i = 0; i < ref.length; i++) if (got[i] !== ref[i]) differing++;
    const allowed = Math.floor(ref.length * 1e-3);
    const ok = differing <= allowed;
    console.log(`${ok ? "OK    " : "NOT OK"} ${what}: ${differing} of ${ref.length} codes differ (allowed ${allowed})`);
    assert.ok(ok, `${what}: ${differing} state codes differ from the CPU's (more than 0.1%)`);
}

const live: DeviceBuffer[] = [];

function upload(dtype: DeviceDtype, data: Float32Array | Uint8Array): DeviceBuffer {
    const b = DeviceBuffer.from(dtype, data);
    live.push(b);
    return b;
}

function download<T extends Float32Array | Uint8Array>(k: CudaKernelOps, out: T, ptr: number): T {
    k.download(out, ptr);
    return out;
}

const availability = cudaAvailability();
if (!availability.usable) {
    test("cuda optimizer", {skip: `CUDA is not usable: ${availability.reason}`}, () => {});
} else {
    const k = cudaKernelOps();
    const ops = loadOptimOps();
    const maps = optimizerDynamicMaps();
    after(() => {
        for (const b of live) b.free();
        live.length = 0;
    });

    const sizes = [1, 255, 256, 4096 + 3, 40_000 + 123];
    const lrs = [1e-3, 2e-3, 5e-4];
    const [beta1, beta2, eps] = [0.9, 0.999, 1e-8];

    describe("cuda optimizer", () => {
        test("adamw torch: 3 steps equal the CPU's", () => {
            const rng = new Prng(11);
            for (const n of sizes) {
                for (const wd of [0, 0.01]) {
                    const p = randn(rng, n, 0.05),
                        m = new Float32Array(n),
                        v = new Float32Array(n);
                    const pd = upload("f32", p),
                        md = upload("f32", m),
                        vd = upload("f32", v);
                    for (let s = 1; s <= 3; s++) {
                        const g = randn(rng, n, 10 ** (-1 - s));
                        const gd = upload("f32", g);
                        ops.adamwTorchStep(p, m, v, g, lrs[s - 1], beta1, beta2, eps, wd, s, n);
                        k.adamwTorchStep(pd.ptr, md.ptr, vd.ptr, gd.ptr, lrs[s - 1], beta1, beta2, eps, wd, s, n);
                    }
                    const tag = `adamwTorchStep n=${n} wd=${wd}`;
                    checkF32(`${tag} param`, download(k, new Float32Array(n), pd.ptr), p);
                    checkF32(`${tag} exp_avg`, download(k, new Float32Array(n), md.ptr), m);
                    checkF32(`${tag} exp_avg_sq`, download(k, new Float32Array(n), vd.ptr), v);
                }
            }
        });

        test("adamw bnb 32-bit: 3 steps equal the CPU's", () => {
            const rng = new Prng(12);
            for (const n of sizes) {
                for (const wd of [0, 0.01]) {
                    const p = randn(rng, n, 0.05),
                        s1 = new Float32Array(n),
                        s2 = new Float32Array(n);
                    const pd = upload("f32", p),
                        s1d = upload("f32", s1),
                        s2d = upload("f32", s2);
                    for (let s = 1; s <= 3; s++) {
                        const g = randn(rng, n, 10 ** (-1 - s));
                        const gd = upload("f32", g);
                        ops.adamwBnb32Step(p, s1, s2, g, lrs[s - 1], beta1, beta2, eps, wd, s, n);
                        k.adamwBnb32Step(pd.ptr, s1d.ptr, s2d.ptr, gd.ptr, lrs[s - 1], beta1, beta2, eps, wd, s, n);
                    }
                    const tag = `adamwBnb32Step n=${n} wd=${wd}`;
                    checkF32(`${tag} param`, download(k, new Float32Array(n), pd.ptr), p);
                    checkF32(`${tag} state1`, download(k, new Float32Array(n), s1d.ptr), s1);
                    checkF32(`${tag} state2`, download(k, new Float32Array(n), s2d.ptr), s2);
                }
            }
        });

        /** runs 3 bnb8 steps on the CPU and on the device (states at the given device addresses) */
        function bnb8Run(
            rng: Prng,
            n: number,
            blocksize: number,
            wd: number,
            nonFinite: boolean,
            dev: {param: number; state1: number; state2: number; absmax1: number; absmax2: number},
            between?: (step: number) => void
        ) {
            const nb = Math.ceil(n / blocksize);
            const p = randn(rng, n, 0.05);
            const s1 = new Uint8Array(n),
                s2 = new Uint8Array(n),
                a1 = new Float32Array(nb),
                a2 = new Float32Array(nb);
            k.upload(dev.param, p);
            k.upload(dev.state1, s1);
            k.upload(dev.state2, s2);
            k.upload(dev.absmax1, a1);
            k.upload(dev.absmax2, a2);
            const q1 = upload("f32", maps.signed),
                q2 = upload("f32", maps.unsigned);
            for (let s = 1; s <= 3; s++) {
                const g = randn(rng, n, 10 ** (-1 - s));
                if (nonFinite && n > 10) {
                    g[3] = NaN;
                    g[7] = Infinity;
                    g[n - 1] = -Infinity;
                }
                const gd = upload("f32", g);
                ops.adamwBnb8Step(
                    p,
                    s1,
                    s2,
                    a1,
                    a2,
                    g,
                    maps.signed,
                    maps.unsigned,
                    lrs[s - 1],
                    beta1,
                    beta2,
                    eps,
                    wd,
                    s,
                    blocksize,
                    n
                );
                k.adamwBnb8Step(
                    dev.param,
                    dev.state1,
                    dev.state2,
                    dev.absmax1,
                    dev.absmax2,
                    gd.ptr,
                    q1.ptr,
                    q2.ptr,
                    lrs[s - 1],
                    beta1,
                    beta2,
                    eps,
                    wd,
                    s,
                    blocksize,
                    n
                );
                between?.(s);
            }
            return {p, s1, s2, a1, a2};
        }

        test("adamw bnb 8-bit blockwise: 3 steps, state codes equal the CPU's", () => {
            const rng = new Prng(13);
            const cases: [number, number, number, boolean][] = [
                [1, 256, 0.01, false],
                [255, 256, 0.01, false],
                [256, 256, 0, false],
                [4096 + 3, 256, 0.01, true],
                [40_000 + 123, 256, 0.01, false],
                [1000, 64, 0.01, false],
                [5000, 2048, 0.01, true]
            ];
            for (const [n, blocksize, wd, nonFinite] of cases) {
                const nb = Math.ceil(n / blocksize);
                const bufs = {
                    param: upload("f32", new Float32Array(n)).ptr,
                    state1: upload("u8", new Uint8Array(n)).ptr,
                    state2: upload("u8", new Uint8Array(n)).ptr,
                    absmax1: upload("f32", new Float32Array(nb)).ptr,
                    absmax2: upload("f32", new Float32Array(nb)).ptr
                };
                const ref = bnb8Run(rng, n, blocksize, wd, nonFinite, bufs);
                const tag = `adamwBnb8Step n=${n} blocksize=${blocksize} wd=${wd}` + (nonFinite ? " (non-finite grads)" : "");
                checkCodes(`${tag} state1`, download(k, new Uint8Array(n), bufs.state1), ref.s1);
                checkCodes(`${tag} state2`, download(k, new Uint8Array(n), bufs.state2), ref.s2);
                checkF32(`${tag} absmax1`, download(k, new Float32Array(nb), bufs.absmax1), ref.a1);
                checkF32(`${tag} absmax2`, download(k, new Float32Array(nb), bufs.absmax2), ref.a2);
                checkF32(`${tag} param`, download(k, new Float32Array(n), bufs.param), ref.p);
            }
        });

        test("paged states: the same results through unified memory, prefetched both ways", () => {
            const rng = new Prng(14);
            const n = 100_000 + 17,
                blocksize = 256,
                nb = Math.ceil(n / blocksize);
            const sizes = {param: 4 * n, state1: n, state2: n, absmax1: 4 * nb, absmax2: 4 * nb};
            type Name = keyof typeof sizes;
            const names = Object.keys(sizes) as Name[];
            const paged = Object.fromEntries(names.map((name) => [name, k.allocPagedState(sizes[name])])) as Record<Name, number>;
            try {
                const ref = bnb8Run(rng, n, blocksize, 0.01, false, paged, () => {
                    // evict to the host between steps, page back in before the next one
                    for (const name of names) k.prefetchState(paged[name], sizes[name], false);
                    k.synchronize();
                    for (const name of names) k.prefetchState(paged[name], sizes[name], true);
                });
                checkCodes("paged adamwBnb8Step state1", download(k, new Uint8Array(n), paged.state1), ref.s1);
                checkCodes("paged adamwBnb8Step state2", download(k, new Uint8Array(n), paged.state2), ref.s2);
                checkF32("paged adamwBnb8Step absmax1", download(k, new Float32Array(nb), paged.absmax1), ref.a1);
                checkF32("paged adamwBnb8Step param", download(k, new Float32Array(n), paged.param), ref.p);
            } finally {
                k.synchronize();
                for (const ptr of Object.values(paged)) k.freePagedState(ptr);
            }
        });

        test("grad norm: sum of squares over several buffers, clipping on the device", () => {
            const rng = new Prng(15);
            const lengths = [1, 1000, 65_537, 3, 40_000];
            const grads = lengths.map((n) => randn(rng, n, 0.3));
            // the third buffer starts 4 bytes past an aligned address (the scalar path)
            const devs = grads.map((g, i) => {
                const b = DeviceBuffer.alloc("f32", g.length + 4);
                live.push(b);
                const off = i === 2 ? 4 : 0;
                k.upload(b.ptr, g, off);
                return b.ptr + off;
            });
            const sumPtr = k.alloc(8);
            try {
                const refSum = grads.reduce((s, g) => s + ops.optimSumSquares(g, g.length), 0);
                k.optimSumSquares(sumPtr, devs, lengths);
                const got = new Float64Array(1);
                k.download(got, sumPtr);
                const rel = Math.abs(got[0] - refSum) / refSum;
                console.log(
                    `${rel <= 1e-12 ? "OK    " : "NOT OK"} optimSumSquares: ${got[0]} vs CPU ${refSum} ` +
                        `(rel ${rel.toExponential(2)})`
                );
                assert.ok(rel <= 1e-12);

                // accumulate, and more buffers than one launch takes (64)
                const many = Array.from({length: 70}, (_, i) => i % 5);
                k.optimSumSquares(
                    sumPtr,
                    many.map((i) => devs[i]),
                    many.map((i) => lengths[i]),
                    true
                );
                k.download(got, sumPtr);
                const refMany = refSum + many.reduce((s, i) => s + ops.optimSumSquares(grads[i], lengths[i]), 0);
                assert.ok(Math.abs(got[0] - refMany) / refMany <= 1e-12, `accumulated sum ${got[0]} vs ${refMany}`);

                // clipping: maxNorm below the norm scales every buffer; above it nothing changes
                k.optimSumSquares(sumPtr, devs, lengths);
                for (const factor of [0.5, 2]) {
                    const cpuGrads = grads.map((g) => g.slice());
                    const norm = clipGradNorm(cpuGrads, factor * Math.sqrt(refSum));
                    assert.ok(Math.abs(norm - Math.sqrt(refSum)) <= 1e-9 * norm);
                    const work = grads.map((g) => upload("f32", g).ptr);
                    k.optimClipScale(work, lengths, sumPtr, factor * Math.sqrt(refSum));
                    grads.forEach((_, i) =>
                        checkF32(
                            `optimClipScale maxNorm=${factor}*norm buffer ${i}`,
                            download(k, new Float32Array(lengths[i]), work[i]),
                            cpuGrads[i]
                        )
                    );
                }

                // plain scaling, bit for bit
                const x = grads[2].slice();
                ops.optimScale(x, 0.377, x.length);
                const xd = upload("f32", grads[2]);
                k.optimScale(xd.ptr, 0.377, x.length);
                checkF32("optimScale", download(k, new Float32Array(x.length), xd.ptr), x, 0);
            } finally {
                k.free(sumPtr);
            }
        });

        test("timing (printed only)", () => {
            const n = 40_000_000,
                blocksize = 256,
                nb = Math.ceil(n / blocksize);
            const rows: string[] = [];
            const line = (what: string, bytes: number, sec: number) =>
                rows.push(
                    `  ${what.padEnd(40)} ` +
                        `${(sec * 1e6).toFixed(1).padStart(9)} us ${(bytes / sec / 1e9).toFixed(0).padStart(6)} GB/s`
                );
            const p = DeviceBuffer.alloc("f32", n),
                g = DeviceBuffer.alloc("f32", n);
            const m = DeviceBuffer.alloc("f32", n),
                v = DeviceBuffer.alloc("f32", n);
            const s1 = DeviceBuffer.zeros("u8", n),
                s2 = DeviceBuffer.zeros("u8", n);
            const a1 = DeviceBuffer.zeros("f32", nb),
                a2 = DeviceBuffer.zeros("f32", nb);
            live.push(p, g, m, v, s1, s2, a1, a2);
            const q1 = upload("f32", maps.signed),
                q2 = upload("f32", maps.unsigned);
            k.fillF32(p.ptr, 0.01, n);
            k.fillF32(g.ptr, 1e-3, n);
            k.fillF32(m.ptr, 0, n);
            k.fillF32(v.ptr, 0, n);
            let step = 0;
            // 8-bit: read param, grad, 2 codes; write param, 2 codes (+ the absmax scales)
            line(
                `adamwBnb8Step ${n / 1e6}M params`,
                16 * n + 16 * nb,
                timeIt(k, () =>
                    k.adamwBnb8Step(
                        p.ptr,
                        s1.ptr,
                        s2.ptr,
                        a1.ptr,
                        a2.ptr,
                        g.ptr,
                        q1.ptr,
                        q2.ptr,
                        1e-4,
                        0.9,
                        0.999,
                        1e-8,
                        0.01,
                        ++step,
                        blocksize,
                        n
                    )
                )
            );
            step = 0;
            line(
                `adamwBnb32Step ${n / 1e6}M params`,
                28 * n,
                timeIt(k, () => k.adamwBnb32Step(p.ptr, m.ptr, v.ptr, g.ptr, 1e-4, 0.9, 0.999, 1e-8, 0.01, ++step, n))
            );
            step = 0;
            line(
                `adamwTorchStep ${n / 1e6}M params`,
                28 * n,
                timeIt(k, () => k.adamwTorchStep(p.ptr, m.ptr, v.ptr, g.ptr, 1e-4, 0.9, 0.999, 1e-8, 0.01, ++step, n))
            );
            const sumPtr = k.alloc(8);
            line(
                `optimSumSquares ${n / 1e6}M`,
                4 * n,
                timeIt(k, () => k.optimSumSquares(sumPtr, [g.ptr], [n]))
            );
            k.free(sumPtr);
            console.log(`cuda optimizer timing:\n${rows.join("\n")}`);
        });
    });
}
