// runtime.cpp: the stream and the caching allocator of the CUDA backend.
//
// Sizes are rounded up to 512 bytes below 1 MiB and to 2 MiB above, and freed blocks wait in a free list per
// rounded size (as PyTorch's caching allocator does, minus block splitting). Frees are stream-ordered on the one
// stream, so a block can be reused as soon as it is freed.
#include "runtime.h"
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace qlora_cuda {

static cudaStream_t g_stream = nullptr;
static std::mutex g_mutex;
static std::map<size_t, std::vector<void*>> g_free;  // rounded size -> cached blocks
static std::unordered_map<void*, size_t> g_live;     // block -> rounded size
static MemoryStats g_stats = {0, 0, 0, 0, 0};

cudaStream_t stream() {
    if (!g_stream) cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking);
    return g_stream;
}

static size_t round_size(size_t bytes) {
    if (bytes == 0) bytes = 1;
    const size_t small = 512, large = 2u << 20;
    return bytes < (1u << 20) ? (bytes + small - 1) / small * small : (bytes + large - 1) / large * large;
}

static void empty_cache_locked() {
    for (auto& kv : g_free) {
        for (void* p : kv.second) {
            cudaFree(p);
            g_stats.reserved -= kv.first;
        }
    }
    g_free.clear();
}

void* device_alloc(size_t bytes, cudaError_t* err) {
    std::lock_guard<std::mutex> lock(g_mutex);
    size_t size = round_size(bytes);
    *err = cudaSuccess;
    void* p = nullptr;
    auto it = g_free.find(size);
    if (it != g_free.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
    } else {
        cudaError_t e = cudaMalloc(&p, size);
        if (e != cudaSuccess) {
            cudaGetLastError();  // clear the sticky-free error state of the failed malloc
            cudaStreamSynchronize(stream());
            empty_cache_locked();
            e = cudaMalloc(&p, size);
            if (e != cudaSuccess) {
                cudaGetLastError();
                *err = e;
                return nullptr;
            }
        }
        g_stats.reserved += size;
        g_stats.num_allocs++;
        if (g_stats.reserved > g_stats.peak_reserved) g_stats.peak_reserved = g_stats.reserved;
    }
    g_live[p] = size;
    g_stats.allocated += size;
    if (g_stats.allocated > g_stats.peak_allocated) g_stats.peak_allocated = g_stats.allocated;
    return p;
}

void device_free(void* ptr) {
    if (!ptr) return;
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_live.find(ptr);
    if (it == g_live.end()) return;
    g_stats.allocated -= it->second;
    g_free[it->second].push_back(ptr);
    g_live.erase(it);
}

void empty_cache() {
    std::lock_guard<std::mutex> lock(g_mutex);
    cudaStreamSynchronize(stream());
    empty_cache_locked();
}

MemoryStats memory_stats() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_stats;
}

void reset_peak_stats() {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_stats.peak_allocated = g_stats.allocated;
    g_stats.peak_reserved = g_stats.reserved;
}

}  // namespace qlora_cuda
