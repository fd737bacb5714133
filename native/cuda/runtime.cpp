// runtime.cpp: the stream and the caching allocator of the CUDA backend.
//
// Sizes are rounded up to 512 bytes below 1 MiB and to 2 MiB above, and freed blocks wait in a free list per
// rounded size (as PyTorch's caching allocator does, minus block splitting). Frees are stream-ordered on the one
// stream, so a block can be reused as soon as it is freed.
//
// CUDA graphs: the buffers a captured graph uses must keep their addresses for as long as it may be replayed. While
// a capture runs, allocations come from (and frees return to) a private pool, as PyTorch's graph pools do: the
// pool's blocks are reused within captures (graphs replay one at a time on the one stream) but are never handed
// to uncaptured work while a graph exists; once the last graph is destroyed they go back to the cache.
#include "runtime.h"
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace qlora_cuda {

static cudaStream_t g_stream = nullptr;
static std::mutex g_mutex;
static std::map<size_t, std::vector<void*>> g_free;  // rounded size -> cached blocks
static std::unordered_map<void*, size_t> g_live;     // block -> rounded size
static MemoryStats g_stats = {0, 0, 0, 0, 0};
static bool g_capturing = false;
static int g_graphs = 0;                                  // instantiated graphs not yet destroyed
static std::map<size_t, std::vector<void*>> g_pool_free;  // the graph pool's free blocks
static std::unordered_map<void*, bool> g_pool_blocks;     // blocks owned by the graph pool

cudaStream_t stream() {
    if (!g_stream) cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking);
    return g_stream;
}

static size_t round_size(size_t bytes) {
    if (bytes == 0) bytes = 1;
    const size_t small = 512, large = 2u << 20;
    return bytes < (1u << 20) ? (bytes + small - 1) / small * small : (bytes + large - 1) / large * large;
}

static void release_pool_locked();

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
    auto pooled = g_capturing ? g_pool_free.find(size) : g_pool_free.end();
    auto it = g_free.find(size);
    if (pooled != g_pool_free.end() && !pooled->second.empty()) {
        p = pooled->second.back();
        pooled->second.pop_back();
    } else if (it != g_free.end() && !it->second.empty()) {
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
    if (g_capturing) g_pool_blocks[p] = true;
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
    auto pooled = g_pool_blocks.find(ptr);
    if (pooled != g_pool_blocks.end() && (g_graphs > 0 || g_capturing)) {
        g_pool_free[it->second].push_back(ptr);
    } else {
        if (pooled != g_pool_blocks.end()) g_pool_blocks.erase(pooled);
        g_free[it->second].push_back(ptr);
    }
    g_live.erase(it);
}

// the pool's free blocks back to the cache once no graph can replay them (blocks still held are returned when freed)
static void release_pool_locked() {
    if (g_graphs > 0 || g_capturing) return;
    for (auto& kv : g_pool_free) {
        for (void* p : kv.second) {
            g_pool_blocks.erase(p);
            g_free[kv.first].push_back(p);
        }
    }
    g_pool_free.clear();
}

cudaError_t graph_capture_begin() {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_capturing) return cudaErrorIllegalState;
    // relaxed: the allocator may call cudaMalloc while the stream captures
    cudaError_t e = cudaStreamBeginCapture(stream(), cudaStreamCaptureModeRelaxed);
    if (e == cudaSuccess) g_capturing = true;
    return e;
}

cudaError_t graph_capture_end(cudaGraphExec_t* exec) {
    cudaGraph_t graph = nullptr;
    cudaError_t e = cudaStreamEndCapture(stream(), &graph);
    *exec = nullptr;
    if (e == cudaSuccess) e = cudaGraphInstantiate(exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    std::lock_guard<std::mutex> lock(g_mutex);
    g_capturing = false;
    if (e == cudaSuccess) {
        g_graphs++;
    } else {
        cudaGetLastError();  // a failed capture leaves no sticky error behind
        *exec = nullptr;
        release_pool_locked();
    }
    return e;
}

cudaError_t graph_launch(cudaGraphExec_t exec) { return cudaGraphLaunch(exec, stream()); }

void graph_destroy(cudaGraphExec_t exec) {
    if (!exec) return;
    // a replay still queued may use the pool: wait before its blocks can be handed out again
    cudaStreamSynchronize(stream());
    cudaGraphExecDestroy(exec);
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_graphs > 0) g_graphs--;
    release_pool_locked();
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

namespace {
std::vector<cudaEvent_t> g_marks;  // events of the current profile, in order; reused after a read
size_t g_marks_used = 0;

void CUDART_CB sleep_callback(void* us) { std::this_thread::sleep_for(std::chrono::microseconds((intptr_t)us)); }
}  // namespace

cudaError_t profile_hold(int64_t us) {
    if (us < 0 || us > 10'000'000) return cudaErrorInvalidValue;
    return cudaLaunchHostFunc(stream(), sleep_callback, reinterpret_cast<void*>((intptr_t)us));
}

cudaError_t profile_mark() {
    if (g_marks_used == g_marks.size()) {
        cudaEvent_t e;
        cudaError_t err = cudaEventCreate(&e);
        if (err != cudaSuccess) return err;
        g_marks.push_back(e);
    }
    return cudaEventRecord(g_marks[g_marks_used++], stream());
}

cudaError_t profile_read(std::vector<double>* elapsed_ms) {
    elapsed_ms->clear();
    cudaError_t err = cudaStreamSynchronize(stream());
    for (size_t i = 1; err == cudaSuccess && i < g_marks_used; i++) {
        float ms = 0.0f;
        err = cudaEventElapsedTime(&ms, g_marks[i - 1], g_marks[i]);
        elapsed_ms->push_back(ms);
    }
    g_marks_used = 0;
    return err;
}

}  // namespace qlora_cuda
