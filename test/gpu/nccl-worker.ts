// nccl-worker.ts: one rank of test/gpu/nccl.test.ts (RANK, WORLD_SIZE, MASTER_PORT set by the test): joins NCCL
// through the TCP bootstrap, all-reduces a float32 buffer of rank-dependent values on its GPU, prints the result.
import {distContextFromEnv} from "../../src/parallel/context.js";
import {TcpCollective} from "../../src/parallel/tcp.js";
import {NcclCollective} from "../../src/parallel/nccl.js";
import {DeviceBuffer} from "../../src/backend/cuda.js";

const ctx = distContextFromEnv();
const tcp = await TcpCollective.connect(ctx, {connectTimeoutMs: 60_000});
const nccl = await NcclCollective.connect(ctx, tcp);
const n = 1 << 20;
const host = Float32Array.from({length: n}, (_, i) => (ctx.rank + 1) * ((i % 1000) - 500) * 1e-3);
const buf = DeviceBuffer.from("f32", host);
nccl.allReduceSum(buf.ptr, n);
const out = buf.toHost() as Float32Array;
// the same sum over TCP, for comparison
await tcp.allReduceSum(host);
let maxDiff = 0;
for (let i = 0; i < n; i++) maxDiff = Math.max(maxDiff, Math.abs(out[i] - host[i]));
console.log(JSON.stringify({rank: ctx.rank, first: Array.from(out.subarray(0, 3)), maxDiff}));
nccl.close();
await tcp.close();
