// offload.cpp: offloaded activations for gradient checkpointing (Unsloth's offloaded checkpointing): block inputs
// go to pinned host memory and come back for the recomputation, on a second stream, so that the copies overlap
// the compute queued on stream() instead of stalling it (a synchronous copy of pageable memory made an offloaded
// step about twice as slow as a checkpointed one).
//
// Ordering, with one event per slot and one for the compute stream:
//   host_offload   copy stream waits for the compute queued so far (src is complete), copies to the slot, records
//                  the slot's event;
//   host_fence     the compute stream waits for that event: work queued after it, and the reuse of src's memory by
//                  the caching allocator (stream-ordered frees), come after the copy;
//   host_prefetch  copy stream waits for the compute queued so far (dst's memory may still be in use), copies the
//                  slot to dst, records the slot's event again;
//   host_restore   the compute stream waits for that event; the slot is free for the next offload of its size.
// Pinned slots are allocated once per size and kept (a training step offloads the same sizes every step):
// cudaHostAlloc is slow, and the host memory they hold is what offloading trades the device memory for.
#include <mutex>
#include <unordered_map>
#include <vector>
#include "runtime.h"

namespace qlora_cuda {

struct HostSlot {
    void* host;
    size_t bytes;
    bool busy;
    cudaEvent_t done;
};

static std::mutex g_offload_mutex;
static std::vector<HostSlot> g_slots;
static cudaStream_t g_copy_stream = nullptr;
static cudaEvent_t g_compute_mark = nullptr;
static size_t g_pinned_bytes = 0;

static cudaError_t ensure_streams() {
    cudaError_t e = cudaSuccess;
    if (!g_copy_stream) e = cudaStreamCreateWithFlags(&g_copy_stream, cudaStreamNonBlocking);
    if (e == cudaSuccess && !g_compute_mark) e = cudaEventCreateWithFlags(&g_compute_mark, cudaEventDisableTiming);
    return e;
}

// the copy stream waits for everything queued on the compute stream so far
static cudaError_t copy_after_compute() {
    cudaError_t e = cudaEventRecord(g_compute_mark, stream());
    return e == cudaSuccess ? cudaStreamWaitEvent(g_copy_stream, g_compute_mark, 0) : e;
}

int host_offload(const void* src, size_t bytes, cudaError_t* err) {
    std::lock_guard<std::mutex> lock(g_offload_mutex);
    *err = ensure_streams();
    if (*err != cudaSuccess) return -1;
    // a slot keeps its index for life (JavaScript holds it); a freed one (host null) is refilled
    int slot = -1, empty = -1;
    for (size_t i = 0; i < g_slots.size() && slot < 0; i++) {
        if (!g_slots[i].host)
            empty = (int)i;
        else if (!g_slots[i].busy && g_slots[i].bytes == bytes)
            slot = (int)i;
    }
    if (slot < 0) {
        HostSlot s = {nullptr, bytes, false, nullptr};
        *err = cudaHostAlloc(&s.host, bytes, cudaHostAllocDefault);
        if (*err == cudaSuccess) *err = cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming);
        if (*err != cudaSuccess) {
            if (s.host) cudaFreeHost(s.host);
            cudaGetLastError();
            return -1;
        }
        g_pinned_bytes += bytes;
        if (empty < 0) {
            g_slots.push_back(s);
            slot = (int)g_slots.size() - 1;
        } else {
            g_slots[empty] = s;
            slot = empty;
        }
    }
    HostSlot& s = g_slots[slot];
    *err = copy_after_compute();
    if (*err == cudaSuccess) *err = cudaMemcpyAsync(s.host, src, bytes, cudaMemcpyDeviceToHost, g_copy_stream);
    if (*err == cudaSuccess) *err = cudaEventRecord(s.done, g_copy_stream);
    if (*err != cudaSuccess) return -1;
    s.busy = true;
    return slot;
}

static HostSlot* busy_slot(int slot) {
    return slot >= 0 && (size_t)slot < g_slots.size() && g_slots[slot].busy ? &g_slots[slot] : nullptr;
}

cudaError_t host_fence(int slot) {
    std::lock_guard<std::mutex> lock(g_offload_mutex);
    HostSlot* s = busy_slot(slot);
    return s ? cudaStreamWaitEvent(stream(), s->done, 0) : cudaErrorInvalidValue;
}

cudaError_t host_prefetch(int slot, void* dst) {
    std::lock_guard<std::mutex> lock(g_offload_mutex);
    HostSlot* s = busy_slot(slot);
    if (!s) return cudaErrorInvalidValue;
    cudaError_t e = copy_after_compute();
    if (e == cudaSuccess) e = cudaMemcpyAsync(dst, s->host, s->bytes, cudaMemcpyHostToDevice, g_copy_stream);
    return e == cudaSuccess ? cudaEventRecord(s->done, g_copy_stream) : e;
}

cudaError_t host_restore(int slot) {
    std::lock_guard<std::mutex> lock(g_offload_mutex);
    HostSlot* s = busy_slot(slot);
    if (!s) return cudaErrorInvalidValue;
    cudaError_t e = cudaStreamWaitEvent(stream(), s->done, 0);
    // the next offload into this slot is queued on the copy stream, after this copy back
    s->busy = false;
    return e;
}

static std::unordered_map<void*, size_t> g_resident;

void* host_resident_alloc(size_t bytes, cudaError_t* err) {
    void* host = nullptr;
    *err = cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    void* dev = nullptr;
    if (*err == cudaSuccess) *err = cudaHostGetDevicePointer(&dev, host, 0);
    // without unified addressing the device would need its own address for the buffer: refused (every GPU the
    // kernels are built for has it, on 64-bit hosts)
    if (*err == cudaSuccess && dev != host) *err = cudaErrorNotSupported;
    if (*err != cudaSuccess) {
        if (host) cudaFreeHost(host);
        cudaGetLastError();
        return nullptr;
    }
    std::lock_guard<std::mutex> lock(g_offload_mutex);
    g_resident[host] = bytes;
    g_pinned_bytes += bytes;
    return host;
}

void host_resident_free(void* p) {
    {
        std::lock_guard<std::mutex> lock(g_offload_mutex);
        auto it = g_resident.find(p);
        if (it == g_resident.end()) return;
        g_pinned_bytes -= it->second;
        g_resident.erase(it);
    }
    // kernels queued before the free may still read it
    cudaStreamSynchronize(stream());
    cudaFreeHost(p);
}

size_t host_pinned_bytes() {
    std::lock_guard<std::mutex> lock(g_offload_mutex);
    return g_pinned_bytes;
}

void host_slots_free() {
    std::lock_guard<std::mutex> lock(g_offload_mutex);
    for (HostSlot& s : g_slots) {
        if (s.busy || !s.host) continue;
        cudaEventSynchronize(s.done);
        cudaFreeHost(s.host);
        cudaEventDestroy(s.done);
        g_pinned_bytes -= s.bytes;
        s = {nullptr, 0, false, nullptr};
    }
}

}  // namespace qlora_cuda
