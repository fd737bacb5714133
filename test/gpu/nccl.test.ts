// NCCL (native/cuda/nccl.cpp through src/parallel/nccl.ts). Without libnccl.so.2: the one-line message that says
// what to install. With 2+ GPUs and NCCL: 2 ranks (test/gpu/nccl-worker.ts) all-reduce a buffer on their GPUs and
// get the TCP collective's sum within fp32 rounding (NCCL's ring sums in another order). Not yet run on a GPU.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawn} from "node:child_process";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {cuda, cudaAvailability} from "../../src/backend/cuda.js";
import type {CudaNcclOps} from "../../src/backend/cuda-nccl-types.js";
import {freePort} from "../../src/parallel/launch.js";

const gpu = cudaAvailability();
const skip = gpu.usable ? false : `no usable GPU: ${gpu.reason}`;

function ncclMissing(): string | null {
    try {
        (cuda() as unknown as CudaNcclOps).ncclVersion();
        return null;
    } catch (err) {
        return (err as Error).message;
    }
}

test("NCCL loads, or its absence is one line saying what to install", {skip}, () => {
    const missing = ncclMissing();
    if (missing) assert.match(missing, /^libnccl\.so\.2 not found: data-parallel training on GPUs needs NCCL/);
    else assert.ok((cuda() as unknown as CudaNcclOps).ncclVersion() >= 20000);
});

const gpus = gpu.info?.devices.length ?? 0;
const twoGpus = skip || gpus < 2 ? `needs 2 GPUs (${gpus} here)` : ncclMissing();

test("2 ranks all-reduce on 2 GPUs through NCCL: the TCP collective's sum", {skip: twoGpus ?? false}, async () => {
    const thisFile = fileURLToPath(import.meta.url);
    const worker = path.join(path.dirname(thisFile), `nccl-worker${path.extname(thisFile)}`);
    const flags = process.execArgv.flatMap((a, i, all) =>
        a.startsWith("--import=") ? [a] : a === "--import" && i + 1 < all.length ? [a, all[i + 1]] : []
    );
    const port = await freePort("127.0.0.1");
    const results = await Promise.all(
        [0, 1].map(
            (rank) =>
                new Promise<{code: number | null; out: string; err: string}>((resolve) => {
                    const env = {...process.env, RANK: String(rank), WORLD_SIZE: "2", MASTER_PORT: String(port)};
                    const child = spawn(process.execPath, [...flags, worker], {env});
                    let out = "",
                        err = "";
                    child.stdout.on("data", (d) => (out += d));
                    child.stderr.on("data", (d) => (err += d));
                    child.on("close", (code) => resolve({code, out, err}));
                })
        )
    );
    for (const r of results) {
        assert.equal(r.code, 0, r.err);
        const rec = JSON.parse(r.out.trim());
        assert.ok(rec.maxDiff <= 1e-6, `rank ${rec.rank}: NCCL vs TCP max diff ${rec.maxDiff}`);
        assert.deepEqual(
            rec.first.map((v: number) => Math.round(v * 1000)),
            [-1500, -1497, -1494]
        );
    }
});
