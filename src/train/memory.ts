// memory.ts: the one place memory is measured (training log, metrics, report, benchmarks, the API's gpuMemory()).
// Peaks are high-water marks kept by the OS and by the CUDA allocator, never samples: a buffer allocated and freed
// between two logs counts.
import {cudaAvailability, cudaMemoryStats} from "../backend/cuda.js";

export interface HostMemory {
    /** the process's resident set now */
    rssBytes: number;
    /**
     * the most the resident set has ever been: getrusage's ru_maxrss, which Linux keeps as the high-water mark of
     * every page the process maps (V8's heap, array buffers, the native addons' own allocations alike)
     */
    peakRssBytes: number;
}

/** qlora's CUDA caching allocator (one per process, on the GPU it computes on) */
export interface AllocatorMemory {
    /** bytes handed out and not freed (torch.cuda.memory_allocated) */
    allocatedBytes: number;
    /** bytes held from the driver: allocated + cached (torch.cuda.memory_reserved) */
    reservedBytes: number;
    /** highest allocatedBytes so far (torch.cuda.max_memory_allocated) */
    peakAllocatedBytes: number;
    peakReservedBytes: number;
    /** paged optimizer states: unified memory outside the allocator (as bitsandbytes' are outside torch's), resident on the GPU unless evicted */
    pagedBytes: number;
    /** pinned host memory of offloaded activations (gradient_checkpointing_offload) */
    pinnedHostBytes: number;
}

export interface MemoryReport {
    device: "cpu" | "cuda";
    host: HostMemory;
    /** null on a CPU run: measuring would start CUDA */
    gpu: AllocatorMemory | null;
    /** the device's figures the training log shows: the allocator's on the GPU, the resident set on the CPU */
    kind: "gpu" | "rss";
    current: number;
    peak: number;
}

export function hostMemory(): HostMemory {
    return {rssBytes: process.memoryUsage.rss(), peakRssBytes: process.resourceUsage().maxRSS * 1024};
}

function allocatorMemory(): AllocatorMemory {
    const s = cudaMemoryStats();
    return {
        allocatedBytes: s.allocated,
        reservedBytes: s.reserved,
        peakAllocatedBytes: s.peakAllocated,
        peakReservedBytes: s.peakReserved,
        pagedBytes: s.pagedBytes ?? 0,
        pinnedHostBytes: s.pinnedHostBytes ?? 0
    };
}

/** the memory of a process computing on `device` */
export function memoryReport(device: "cpu" | "cuda"): MemoryReport {
    const host = hostMemory();
    if (device === "cpu") return {device, host, gpu: null, kind: "rss", current: host.rssBytes, peak: host.peakRssBytes};
    const gpu = allocatorMemory();
    return {device, host, gpu, kind: "gpu", current: gpu.allocatedBytes, peak: gpu.peakAllocatedBytes};
}

export interface GpuMemory {
    /** false when no GPU is usable; `reason` says why */
    available: boolean;
    reason: string | null;
    /** every GPU the driver shows, with its memory (free: what the driver reports now, other processes included) */
    devices: {index: number; name: string; totalBytes: number; freeBytes: number | null}[];
    /** qlora's allocator (null when no GPU is usable) */
    allocator: AllocatorMemory | null;
}

/** the seed's print_gpu_memory as data: works without a GPU (available false, with the reason) */
export function gpuMemory(): GpuMemory {
    const a = cudaAvailability();
    const devices = (a.info?.devices ?? []).map((d) => ({
        index: d.index,
        name: d.name,
        totalBytes: d.totalBytes,
        freeBytes: d.freeBytes ?? null
    }));
    if (!a.usable) return {available: false, reason: a.reason, devices, allocator: null};
    return {available: true, reason: null, devices, allocator: allocatorMemory()};
}

const gib = (bytes: number) => `${(bytes / 2 ** 30).toFixed(2)} GiB`;

/** gpuMemory() as lines of text, in GiB */
export function formatGpuMemory(m: GpuMemory): string[] {
    if (!m.available) return [`no usable GPU: ${m.reason}`];
    const lines = m.devices.map(
        (d) =>
            `GPU ${d.index} (${d.name}): ${gib(d.totalBytes)} total` + (d.freeBytes === null ? "" : `, ${gib(d.freeBytes)} free`)
    );
    const s = m.allocator!;
    lines.push(
        `qlora allocator: ${gib(s.allocatedBytes)} allocated, ${gib(s.reservedBytes)} reserved (cached), ` +
            `peak ${gib(s.peakAllocatedBytes)} allocated, ${gib(s.peakReservedBytes)} reserved` +
            (s.pagedBytes > 0 ? `; paged optimizer states ${gib(s.pagedBytes)}` : "") +
            (s.pinnedHostBytes > 0 ? `; offloaded activations ${gib(s.pinnedHostBytes)} pinned host memory` : "")
    );
    return lines;
}

/** prints gpuMemory() (the seed's print_gpu_memory) and returns it */
export function printGpuMemory(print: (line: string) => void = console.log): GpuMemory {
    const m = gpuMemory();
    for (const line of formatGpuMemory(m)) print(line);
    return m;
}

/** a report's peaks in one line: "1.21 GiB (max RSS)", or the GPU allocator's peak and the host's */
export function formatPeakMemory(r: MemoryReport): string {
    const host = `${gib(r.host.peakRssBytes)} host (max RSS)`;
    if (!r.gpu) return host;
    const paged = r.gpu.pagedBytes > 0 ? ` + ${gib(r.gpu.pagedBytes)} paged optimizer states` : "";
    return `${gib(r.gpu.peakAllocatedBytes)} GPU (allocator peak)${paged}, ${host}`;
}
