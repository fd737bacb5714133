// Data-parallel pieces that need no second process: torchrun's variables, the --nproc_per_node flag, the bucket
// plan, the rank slices of the loader, and the TCP collective with every rank in this process.
import {test} from "node:test";
import assert from "node:assert/strict";
import {distContextFromEnv, envOf, SINGLE_PROCESS} from "../src/parallel/context.js";
import {takeNprocFlag, freePort} from "../src/parallel/launch.js";
import {BucketedAllReduce, planBuckets} from "../src/parallel/buckets.js";
import {broadcastJson, checkSameOnEveryRank, shardedSums, SoloCollective} from "../src/parallel/collective.js";
import {TcpCollective} from "../src/parallel/tcp.js";
import {DataLoader} from "../src/data/loader.js";
import {QloraError} from "../src/errors.js";
import {Rng} from "../src/backend/rng.js";

const ENV = {RANK: "1", WORLD_SIZE: "3", LOCAL_RANK: "1", LOCAL_WORLD_SIZE: "3", MASTER_ADDR: "10.0.0.2", MASTER_PORT: "29501"};

test("torchrun's variables: a rank's context, defaults, and one-line errors naming the variable", () => {
    assert.deepEqual(distContextFromEnv({}), SINGLE_PROCESS);
    assert.deepEqual(distContextFromEnv({WORLD_SIZE: "1", RANK: "garbage"}), SINGLE_PROCESS, "WORLD_SIZE 1 reads nothing else");
    const ctx = distContextFromEnv(ENV);
    assert.deepEqual(ctx, {rank: 1, worldSize: 3, localRank: 1, localWorldSize: 3, masterAddr: "10.0.0.2", masterPort: 29501});
    assert.deepEqual(distContextFromEnv(envOf(ctx)), ctx, "envOf round-trips");
    // one machine: LOCAL_RANK defaults to RANK; several: it must be given
    assert.equal(distContextFromEnv({WORLD_SIZE: "2", RANK: "1"}).localRank, 1);
    assert.equal(distContextFromEnv({WORLD_SIZE: "2", RANK: "1"}).masterPort, 29500);
    const bad: [Record<string, string>, RegExp][] = [
        [{...ENV, RANK: "3"}, /^RANK="3" must be a whole number from 0 to 2/],
        [{...ENV, RANK: "-1"}, /^RANK="-1" must be/],
        [{...ENV, WORLD_SIZE: "two"}, /^WORLD_SIZE="two" must be a whole number/],
        [{...ENV, WORLD_SIZE: "0"}, /^WORLD_SIZE="0"/],
        [{WORLD_SIZE: "2"}, /^RANK is not set; a data-parallel run \(WORLD_SIZE > 1\) needs it/],
        [{WORLD_SIZE: "4", RANK: "3", LOCAL_WORLD_SIZE: "2"}, /^LOCAL_RANK is not set/],
        [{...ENV, LOCAL_RANK: "3"}, /^LOCAL_RANK="3" must be a whole number from 0 to 2/],
        [{...ENV, MASTER_PORT: "70000"}, /^MASTER_PORT="70000" must be a whole number from 1 to 65535/],
        [{...ENV, MASTER_ADDR: "a b"}, /^MASTER_ADDR="a b" must be a host name/]
    ];
    for (const [env, message] of bad)
        assert.throws(
            () => distContextFromEnv(env),
            (err: Error) => err instanceof QloraError && message.test(err.message) && !err.message.includes("\n"),
            JSON.stringify(env)
        );
});

test("--nproc_per_node is taken out of the arguments in both spellings; bad values are refused", () => {
    assert.deepEqual(takeNprocFlag(["cfg.yaml", "--nproc_per_node", "3", "--r", "8"]), {
        nproc: 3,
        rest: ["cfg.yaml", "--r", "8"]
    });
    assert.deepEqual(takeNprocFlag(["--nproc-per-node=2"]), {nproc: 2, rest: []});
    assert.deepEqual(takeNprocFlag(["--r", "8"]), {nproc: null, rest: ["--r", "8"]});
    for (const args of [["--nproc_per_node"], ["--nproc_per_node", "0"], ["--nproc_per_node=x"]])
        assert.throws(() => takeNprocFlag(args), /--nproc_per_node .*expected the number of worker processes/);
});

test("bucket plan: reversed tensor order, a 1 MiB first bucket, then buckets closed once they reach the cap (torch's rule)", () => {
    const MiB = 2 ** 20 / 4; // elements of fp32 in a MiB
    const tensors = [
        {name: "a", numel: MiB / 2},
        {name: "b", numel: 30 * MiB},
        {name: "c", numel: 10 * MiB},
        {name: "d", numel: 10 * MiB},
        {name: "e", numel: MiB / 4},
        {name: "f", numel: MiB}
    ];
    const plan = planBuckets(tensors);
    assert.deepEqual(
        plan.map((b) => b.tensors),
        [[5], [4, 3, 2, 1], [0]]
    );
    assert.deepEqual(
        plan.map((b) => b.numel),
        [MiB, 50.25 * MiB, MiB / 2]
    );
    // every tensor in exactly one bucket
    assert.deepEqual(plan.flatMap((b) => b.tensors).sort(), [0, 1, 2, 3, 4, 5]);
    // a smaller cap: more buckets; the first bucket is never above the cap
    assert.deepEqual(
        planBuckets(tensors, {capBytes: 4 * 2 ** 20, firstBucketBytes: 8 * 2 ** 20}).map((b) => b.tensors),
        [[5, 4, 3], [2], [1], [0]]
    );
});

function rowsOf(lengths: number[]) {
    return lengths.map((n, i) => ({inputIds: new Int32Array(n).fill(i + 1), labels: new Int32Array(n).fill(i + 1)}));
}

test("sharding: each rank a disjoint consecutive slice of the 1-process global micro-batch, padded to its longest", () => {
    const rows = rowsOf([3, 9, 4, 5, 7, 2, 6, 8, 3, 5, 4]); // 11 rows
    const opts = {padTokenId: 0, seed: 7};
    const W = 3,
        per = 2;
    const single = new DataLoader(rows, {...opts, batchSize: per * W});
    const ranks = [...Array(W).keys()].map((r) => ({r, loader: new DataLoader(rows, {...opts, batchSize: per * W})}));
    for (let i = 0; i < 5; i++) {
        const whole = single.next();
        const parts = ranks.map(({r, loader}) => loader.nextShard(r, W, true));
        assert.deepEqual(
            parts.flatMap((p) => p.rows),
            whole.rows,
            `batch ${i}: the slices make the global batch`
        );
        parts.forEach((p, r) => {
            assert.equal(p.firstRow, r * per);
            assert.equal(p.globalRows, whole.rows.length);
            if (p.rows.length === 0) assert.equal(p.batch, null);
            else {
                assert.equal(p.batch!.T, whole.batch.T, "padded to the global batch's longest row");
                // the rank's rows are the global batch's rows [r * per, ...)
                const T = whole.batch.T;
                assert.deepEqual(
                    [...p.batch!.inputIds],
                    [...whole.batch.inputIds.subarray(r * per * T, (r * per + p.rows.length) * T)]
                );
            }
        });
    }
    // epoch 0 is 2 batches (6 + 5 rows): its last batch leaves rank 2 one row; the slices never overlap
    const epochEnd = new DataLoader(rows, {...opts, batchSize: 6});
    epochEnd.next();
    const last = [0, 1, 2].map((r) => {
        const l = new DataLoader(rows, {...opts, batchSize: 6});
        l.next();
        return l.nextShard(r, 3, false).rows.length;
    });
    assert.deepEqual(last, [2, 2, 1]);
    // without padToGlobal a rank pads to its own longest row only
    const own = new DataLoader(rows, {...opts, batchSize: 6}).nextShard(0, 3, false);
    assert.equal(own.batch!.T, Math.max(...own.rows.map((i) => rows[i].inputIds.length)));
    assert.throws(() => new DataLoader(rows, {...opts, batchSize: 5}).nextShard(0, 2, false), /nextShard/);
});

async function group(W: number): Promise<TcpCollective[]> {
    const port = await freePort("127.0.0.1");
    return Promise.all(
        [...Array(W).keys()].map((rank) =>
            TcpCollective.connect(
                {rank, worldSize: W, localRank: rank, localWorldSize: W, masterAddr: "127.0.0.1", masterPort: port},
                {connectTimeoutMs: 10_000}
            )
        )
    );
}

test("shardedSums: items split over the ranks (i on rank i mod W), sums in item order: one process's bits", async () => {
    const n = 11;
    const rng = new Rng(7);
    // values of very different sizes, so that another summation order would change the bits
    const values = Array.from({length: n}, () => [(rng.next() - 0.5) * 10 ** Math.floor(rng.next() * 12 - 6), rng.int(1000)]);
    const solo: number[] = [0, 0];
    for (const v of values) for (let k = 0; k < 2; k++) solo[k] += v[k];
    for (const W of [2, 3]) {
        const ranks = await group(W);
        const computed = ranks.map(() => [] as number[]);
        const results = await Promise.all(
            ranks.map((c) =>
                shardedSums(c, values.keys(), 2, (item, index) => {
                    assert.equal(item, index);
                    computed[c.rank].push(index);
                    return values[index];
                })
            )
        );
        for (const r of results) assert.deepEqual(r, solo);
        computed.forEach((items, rank) =>
            assert.deepEqual(
                items,
                [...Array(n).keys()].filter((i) => i % W === rank)
            )
        );
        await Promise.all(ranks.map((c) => c.close()));
    }
    assert.deepEqual(await shardedSums(new SoloCollective(), values.keys(), 2, (i) => values[i]), solo);
});

test("TCP collective: fp32 sums in rank order, the same bits on every rank and every run; broadcast; JSON", async () => {
    const W = 3,
        n = 10_000;
    const inputs = [...Array(W).keys()].map((r) => {
        const rng = new Rng(100 + r);
        return Float32Array.from({length: n}, () => (rng.next() - 0.5) * 10 ** Math.floor(rng.next() * 8 - 4));
    });
    // the reference: ((r0 + r1) + r2) rounded to fp32 after each addition
    const expected = new Float32Array(n);
    for (let i = 0; i < n; i++) expected[i] = Math.fround(Math.fround(inputs[0][i] + inputs[1][i]) + inputs[2][i]);
    for (let run = 0; run < 2; run++) {
        const ranks = await group(W);
        const bufs = inputs.map((x) => x.slice());
        await Promise.all(ranks.map((c, r) => c.allReduceSum(bufs[r])));
        for (const b of bufs) assert.deepEqual(new Uint32Array(b.buffer), new Uint32Array(expected.buffer));
        // float64 counts, a broadcast from a rank other than 0, JSON from rank 0, a barrier
        const counts = ranks.map((c) => new Float64Array([c.rank + 0.5, 2 ** 40]));
        await Promise.all(ranks.map((c, r) => c.allReduceSum(counts[r])));
        for (const c of counts) assert.deepEqual([...c], [4.5, 3 * 2 ** 40]);
        const bytes = ranks.map((c) => Uint8Array.from([c.rank, 7, 7]));
        await Promise.all(ranks.map((c, r) => c.broadcast(bytes[r], 2)));
        for (const b of bytes) assert.deepEqual([...b], [2, 7, 7]);
        const got = await Promise.all(ranks.map((c) => broadcastJson(c, {rank: c.rank, text: "é"})));
        assert.deepEqual(
            got,
            [0, 0, 0].map(() => ({rank: 0, text: "é"}))
        );
        await Promise.all(ranks.map((c) => c.barrier()));
        await Promise.all(ranks.map((c) => c.close()));
    }
});

test("bucketed all-reduce sums every gradient tensor over the ranks", async () => {
    const ranks = await group(2);
    const shapes = [5, 300_000, 7, 3];
    const grads = ranks.map((c) => shapes.map((n, t) => Float32Array.from({length: n}, (_, i) => (c.rank + 1) * (t + i))));
    const reducers = grads.map(
        (g) =>
            new BucketedAllReduce(
                g,
                shapes.map((_, t) => `t${t}`),
                {capBytes: 4 * 1000, firstBucketBytes: 16}
            )
    );
    assert.ok(reducers[0].buckets.length >= 3, "several buckets");
    await Promise.all(ranks.map((c, r) => reducers[r].run(c)));
    for (const g of grads)
        shapes.forEach((_n, t) =>
            assert.deepEqual(
                [...g[t].subarray(0, 3)],
                [0, 1, 2].map((i) => 3 * (t + i))
            )
        );
    await Promise.all(ranks.map((c) => c.close()));
});

test("TCP collective: ranks out of step and a rank that goes away are one-line errors naming the rank", async () => {
    let ranks = await group(2);
    const r0 = ranks[0].allReduceSum(new Float32Array(4)),
        r1 = ranks[1].allReduceSum(new Float32Array(5));
    await assert.rejects(
        r0,
        /rank 0: rank 1 sent all-reduce of 20 bytes where all-reduce of 16 bytes was expected: the ranks run different steps/
    );
    // rank 0 ends on its error: rank 1, waiting for the result, learns it from the closed connection
    await ranks[0].close();
    await assert.rejects(r1, /rank 1: the connection to rank 0 closed: did rank 0 stop\?/);
    await ranks[1].close();

    ranks = await group(3);
    const pending = ranks[0].allReduceSum(new Float32Array(3));
    void ranks[1].allReduceSum(new Float32Array(3)).catch(() => undefined);
    // rank 2 dies: its socket closes
    (ranks[2] as unknown as {peers: {socket: {destroy(): void}}[]}).peers[0].socket.destroy();
    await assert.rejects(pending, /^QloraError: rank 0: the connection to rank 2 closed: did rank 2 stop\?/);
    for (const c of ranks) await c.close().catch(() => undefined);

    // settings that differ: every rank stops, the differing one naming the key
    ranks = await group(2);
    const checks = await Promise.allSettled(
        ranks.map((c) => checkSameOnEveryRank(c, "the training run", {r: 8, lr: c.rank === 0 ? 1 : 2}))
    );
    assert.match(
        (checks[1] as PromiseRejectedResult).reason.message,
        /rank 1: the training run differs from rank 0's at lr \(2 here, 1 on rank 0\)/
    );
    assert.match((checks[0] as PromiseRejectedResult).reason.message, /1 rank\(s\) have the training run that differ/);
    for (const c of ranks) await c.close();
});

test("rank 0's port in use and a rank that never reaches rank 0 are one-line errors", async () => {
    const port = await freePort("127.0.0.1");
    const ctx = (rank: number) => ({
        rank,
        worldSize: 2,
        localRank: rank,
        localWorldSize: 2,
        masterAddr: "127.0.0.1",
        masterPort: port
    });
    await assert.rejects(
        TcpCollective.connect(ctx(1), {connectTimeoutMs: 300}),
        /rank 1: cannot reach rank 0 at 127\.0\.0\.1:\d+ \(MASTER_ADDR:MASTER_PORT\)/
    );
    await assert.rejects(
        TcpCollective.connect(ctx(0), {connectTimeoutMs: 300}),
        /rank 0: rank 1 did not connect to 127\.0\.0\.1:\d+ within 0\.3 s/
    );
});
