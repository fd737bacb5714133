// Memory reports (src/train/memory.ts): the training log's CPU peak is the OS's high-water mark, so a buffer
// allocated and freed between two logs counts (the log-time sampling it replaced missed it); gpuMemory() and
// printGpuMemory() work on a machine without a GPU.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdtempSync, readFileSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {cudaAvailability} from "../src/backend/cuda.js";
import {formatGpuMemory, formatPeakMemory, gpuMemory, memoryReport, printGpuMemory} from "../src/train/memory.js";
import {REPO_ROOT} from "./helpers/paths.js";

const MiB = 2 ** 20;
const SPIKE = 512 * MiB;

// a training run in a fresh process (max RSS is per process): at step 3, between the logs of steps 2 and 4, a
// 512 MiB buffer is filled and freed again
const CHILD = `
const {fineTune} = await import(${JSON.stringify(path.join(REPO_ROOT, "src", "api", "index.ts"))});
const {hostMemory} = await import(${JSON.stringify(path.join(REPO_ROOT, "src", "train", "memory.ts"))});
const logs = [];
let before = null, during = null, after = null;
await fineTune(
    {output_dir: process.argv[1], max_steps: 4, logging_steps: 2, per_device_train_batch_size: 1,
     max_seq_length: 32, eval_strategy: "no", save_strategy: "no", device: "cpu"},
    {
        onStep(step) {
            if (step !== 3) return;
            before = hostMemory();
            let spike = new Float32Array(${SPIKE / 4});
            spike.fill(1);
            during = hostMemory();
            spike = null;
            globalThis.gc();
            after = hostMemory();
        },
        onLog: (rec) => logs.push(rec)
    }
);
console.log(JSON.stringify({before, during, after, logs}));
`;

test("the CPU peak is the OS's high-water mark: a 512 MiB spike between two logs shows in the next log", () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qlora-memory-"));
    try {
        const out = path.join(dir, "run");
        const r = spawnSync(process.execPath, ["--expose-gc", "--import", "tsx", "--input-type=module", "-e", CHILD, out], {
            encoding: "utf8",
            cwd: REPO_ROOT
        });
        assert.equal(r.status, 0, r.stderr);
        const {before, during, after, logs} = JSON.parse(r.stdout.trim().split("\n").pop()!);
        // the buffer was resident, then given back to the OS
        assert.ok(during.rssBytes >= before.rssBytes + 0.95 * SPIKE, JSON.stringify({before, during}));
        assert.ok(after.rssBytes < during.rssBytes - 0.9 * SPIKE, JSON.stringify({during, after}));
        assert.deepEqual(
            logs.map((l: {step: number}) => l.step),
            [2, 4]
        );
        const [first, second] = logs;
        for (const l of logs) {
            assert.equal(l.memory_kind, "rss");
            assert.equal(l.host_peak_memory_bytes, l.peak_memory_bytes);
        }
        // before the spike the peak is below it; after, it holds the spike though the memory was freed
        assert.ok(first.peak_memory_bytes < before.rssBytes + 0.5 * SPIKE, JSON.stringify(first));
        assert.ok(second.peak_memory_bytes >= before.rssBytes + 0.95 * SPIKE, JSON.stringify({before, second}));
        // what the log-time sampling saw (the resident set at each log) misses it
        const sampledPeak = Math.max(...logs.map((l: {memory_bytes: number}) => l.memory_bytes));
        assert.ok(sampledPeak < second.peak_memory_bytes - 0.9 * SPIKE, JSON.stringify(logs));
        // the end record and the report carry the true peak
        const end = readFileSync(path.join(out, "metrics.jsonl"), "utf8")
            .trim()
            .split("\n")
            .map((l) => JSON.parse(l))
            .find((x) => x.type === "end");
        assert.equal(end.memory_kind, "rss");
        assert.ok(end.peak_memory_bytes >= second.peak_memory_bytes, JSON.stringify(end));
        const html = readFileSync(path.join(out, "report.html"), "utf8");
        const shown = html.match(/<th>peak memory<\/th><td>([\d.]+) GiB host \(max RSS\)<\/td>/);
        assert.ok(shown, "the report's peak memory row");
        assert.ok(Math.abs(Number(shown[1]) - end.peak_memory_bytes / 2 ** 30) < 0.01);
    } finally {
        rmSync(dir, {recursive: true, force: true});
    }
});

test("memoryReport on the CPU: the OS's high-water mark (VmHWM), no GPU figures", () => {
    const m = memoryReport("cpu");
    assert.equal(m.gpu, null);
    assert.equal(m.kind, "rss");
    assert.equal(m.peak, m.host.peakRssBytes);
    assert.ok(m.peak >= m.current && m.current > 10 * MiB, JSON.stringify(m));
    // ru_maxrss in KiB, as /proc/self/status's VmHWM (both the kernel's high-water mark)
    const hwm = Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync("/proc/self/status", "utf8"))![1]) * 1024;
    assert.ok(Math.abs(memoryReport("cpu").peak - hwm) <= 4 * MiB, `${m.peak} vs VmHWM ${hwm}`);
});

test("gpuMemory() and printGpuMemory() say what there is, with or without a GPU", () => {
    const a = cudaAvailability();
    const m = gpuMemory();
    const lines: string[] = [];
    assert.deepEqual(printGpuMemory((l) => lines.push(l)).available, m.available);
    assert.deepEqual(lines, formatGpuMemory(m));
    if (!a.usable) {
        assert.deepEqual(m, {available: false, reason: a.reason, devices: m.devices, allocator: null});
        assert.deepEqual(lines, [`no usable GPU: ${a.reason}`]);
        return;
    }
    assert.equal(m.devices.length, a.info!.devices.length);
    const s = m.allocator!;
    assert.ok(s.reservedBytes >= s.allocatedBytes && s.peakAllocatedBytes >= s.allocatedBytes, JSON.stringify(s));
    assert.equal(lines.length, m.devices.length + 1);
    assert.match(lines[0], /^GPU 0 \(.+\): [\d.]+ GiB total, [\d.]+ GiB free$/);
    assert.match(lines.at(-1)!, /^qlora allocator: [\d.]+ GiB allocated, [\d.]+ GiB reserved \(cached\), peak [\d.]+ GiB/);
});

test("paged optimizer states and pinned offload memory are reported beside the allocator's peak", () => {
    const GiB = 2 ** 30;
    const allocator = {
        allocatedBytes: 1 * GiB,
        reservedBytes: 2 * GiB,
        peakAllocatedBytes: 6.25 * GiB,
        peakReservedBytes: 7 * GiB,
        pagedBytes: 0.5 * GiB,
        pinnedHostBytes: 3 * GiB
    };
    const host = {rssBytes: GiB, peakRssBytes: 1.5 * GiB};
    const r = {device: "cuda", host, gpu: allocator, kind: "gpu", current: GiB, peak: 6.25 * GiB} as const;
    assert.equal(formatPeakMemory(r), "6.25 GiB GPU (allocator peak) + 0.50 GiB paged optimizer states, 1.50 GiB host (max RSS)");
    assert.equal(
        formatPeakMemory({...r, gpu: {...allocator, pagedBytes: 0}}),
        "6.25 GiB GPU (allocator peak), 1.50 GiB host (max RSS)"
    );
    const lines = formatGpuMemory({available: true, reason: null, devices: [], allocator});
    assert.deepEqual(lines, [
        "qlora allocator: 1.00 GiB allocated, 2.00 GiB reserved (cached), peak 6.25 GiB allocated, 7.00 GiB reserved; " +
            "paged optimizer states 0.50 GiB; offloaded activations 3.00 GiB pinned host memory"
    ]);
});
