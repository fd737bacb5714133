// cuda-profile.test.ts: the op-by-op GPU profiler's bookkeeping (src/backend/cuda-profile.ts) on a fake addon whose
// "GPU" is a clock the ops advance: which intervals belong to which op, and that the time across a host wait
// (a training step downloads its loss) and the hold after it is left out.
import assert from "node:assert/strict";
import test from "node:test";
import {formatProfile, profileCuda} from "../src/backend/cuda-profile.js";
import type {CudaAddon} from "../src/backend/native-types.js";

/** a fake addon: ops advance a GPU clock by their cost, holds by their length, waits by what the host waited */
function fakeAddon() {
    let clock = 0;
    let marks: number[] = [];
    const holds: number[] = [];
    const addon = {
        profileHold(us: number) {
            holds.push(us);
            clock += us / 1000;
        },
        profileMark() {
            marks.push(clock);
        },
        profileRead() {
            const out = new Float64Array(Math.max(0, marks.length - 1));
            for (let i = 1; i < marks.length; i++) out[i - 1] = marks[i] - marks[i - 1];
            marks = [];
            return out;
        },
        gemm(..._a: unknown[]) {
            clock += 3; // gemm(dst, x, M, N, K): labelled by its shape
        },
        rmsnormForward() {
            clock += 0.25;
        },
        download() {
            clock += 40; // the host waited for the stream
        },
        alloc() {
            return 1; // not an op: never timed
        },
        memoryStats() {
            return {};
        }
    };
    return {addon, holds};
}

test("profileCuda: each op's GPU time, the interval across a host wait and the re-hold left out", () => {
    const {addon, holds} = fakeAddon();
    const a = addon as unknown as CudaAddon &
        Record<"rmsnormForward" | "gemm" | "alloc" | "download", (...x: unknown[]) => unknown>;
    const {result, profile} = profileCuda(
        () => {
            a.rmsnormForward();
            a.gemm(0, 0, 8, 16, 32);
            a.alloc();
            a.download(); // ends the hold: the next op holds again
            a.rmsnormForward();
            a.gemm(0, 0, 8, 16, 32);
            a.gemm(0, 0, 4, 4, 4);
            return 7;
        },
        {holdUs: 5000, addon: a}
    );
    assert.equal(result, 7);
    assert.deepEqual(holds, [5000, 5000], "held before the first op and again after the download");
    assert.equal(profile.waits, 1);
    assert.deepEqual(
        profile.rows.map((r) => [r.op, r.calls, r.ms]),
        [
            ["gemm 8x16x32", 2, 6],
            ["gemm 4x4x4", 1, 3],
            ["rmsnormForward", 2, 0.5]
        ]
    );
    assert.equal(profile.totalMs, 9.5, "the 40 ms wait and the 5 ms re-hold are not an op's time");
    // the wrappers are gone afterwards
    assert.equal(a.gemm.name, "gemm");
    assert.match(formatProfile(profile, "step"), /^step: 9\.500 ms on the GPU, .* \(1 host waits for the stream inside/);
});
