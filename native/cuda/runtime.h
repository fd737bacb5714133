// runtime.h: the CUDA backend's process-wide state: the stream every kernel runs on and the caching device
// allocator (size-class free lists, so a training step reuses its buffers without cudaMalloc/cudaFree).
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>
#include <vector>

namespace qlora_cuda {

// the stream all ops are queued on (created on first use)
cudaStream_t stream();

struct MemoryStats {
    size_t allocated;       // bytes handed out and not freed
    size_t reserved;        // bytes held from cudaMalloc (allocated + cached)
    size_t peak_allocated;  // highest `allocated` since the last reset
    size_t peak_reserved;
    size_t num_allocs;  // cudaMalloc calls
};

// a device buffer of at least `bytes` (rounded up to a size class); nullptr with `err` set on failure.
// When cudaMalloc fails, the cache is emptied and the allocation retried once.
void* device_alloc(size_t bytes, cudaError_t* err);
// returns a buffer to the cache (it stays reserved)
void device_free(void* ptr);
// gives every cached, unused buffer back to the driver
void empty_cache();
MemoryStats memory_stats();

// CUDA graphs of work queued on stream(). Between begin and end, the stream records instead of running, and
// device_alloc/device_free use the graph pool (runtime.cpp): buffers a graph touches keep their addresses until
// the last graph is destroyed. end instantiates the graph (exec is null on failure; the capture is over either way).
cudaError_t graph_capture_begin();
cudaError_t graph_capture_end(cudaGraphExec_t* exec);
cudaError_t graph_launch(cudaGraphExec_t exec);
// waits for queued work, destroys the graph and, with the last one, gives its pool back to the cache
void graph_destroy(cudaGraphExec_t exec);
void reset_peak_stats();

// Profiling (benchmarks): profile_hold makes the stream wait `us` microseconds (a host callback that sleeps), so
// that the work queued behind it runs back to back whatever the host's pace; profile_mark records a timing event
// on the stream; profile_read waits for the stream and gives the milliseconds between consecutive marks since
// the last read (marks - 1 values), then forgets the marks.
cudaError_t profile_hold(int64_t us);
cudaError_t profile_mark();
cudaError_t profile_read(std::vector<double>* elapsed_ms);

// Offloaded activations (offload.cpp): copies between device buffers and pinned host slots on a second stream.
// host_offload: after the work queued so far, copies `bytes` at src into a slot; returns the slot (-1 with err set)
int host_offload(const void* src, size_t bytes, cudaError_t* err);
// the stream waits for the slot's copy to host: call before src is freed or written
cudaError_t host_fence(int slot);
// after the work queued so far, copies the slot back into dst (the slot's bytes)
cudaError_t host_prefetch(int slot, void* dst);
// the stream waits for the copy back; the slot is free for the next offload of its size
cudaError_t host_restore(int slot);
// host_resident_alloc: pinned host memory mapped into the device's address space (kernels read it over PCIe):
// frozen tables a step reads a few rows of (the input embedding) live there instead of in device memory.
// Returns null with err set; the address is the same on the host and the device (unified addressing)
void* host_resident_alloc(size_t bytes, cudaError_t* err);
void host_resident_free(void* p);
// pinned bytes held by the slots (in use or idle) and by host-resident buffers
size_t host_pinned_bytes();
// gives the idle slots' pinned memory back (emptyCache)
void host_slots_free();

}  // namespace qlora_cuda
