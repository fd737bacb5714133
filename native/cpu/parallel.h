// parallel.h: the one threading primitive the CPU ops use.
//
// A persistent pool of worker threads (threads.cpp) that claim chunks of a job: the calling thread publishes the
// job, works on chunks itself, and returns as soon as every chunk is done. Each thread starts on a contiguous
// range of chunks of its own (as OpenMP's static schedule) and then takes chunks from the end of the others'. A
// worker that is not running (a busy machine) claims nothing and its range is run by the others, so a region
// never waits a time slice for it; an OpenMP team would, since its end barrier waits for every thread of the
// team. Ops call parallel_for over an index range and choose a grain that gives each chunk enough work; the
// result must not depend on the chunks or on which thread runs them.
#pragma once
#include <stdint.h>
#include <algorithm>
#include <type_traits>

namespace qlora {

int num_threads();

// chunks per thread at most: spare chunks let the threads that are running take over the share of one that
// starts late, and even out chunks of uneven cost
constexpr int64_t kChunksPerThread = 4;

// runs body(ctx, c) for every c in [0, chunks) (at most 65535) over the pool and returns when all have run.
// Chunks run concurrently in any order on any thread; a call from inside a chunk, or while another thread's job
// is running, runs its chunks in order on the calling thread.
void run_chunks(int64_t chunks, void (*body)(void* ctx, int64_t chunk), void* ctx);

// f(begin, end) over [0, n) in at most max_chunks chunks of at least `grain` indices; runs inline when one chunk
// suffices
template <typename F>
inline void parallel_for(int64_t n, int64_t grain, F&& f, int64_t max_chunks = 0) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    const int64_t nt = num_threads();
    if (max_chunks <= 0) max_chunks = nt * kChunksPerThread;
    if (nt == 1) max_chunks = 1;
    max_chunks = std::min<int64_t>(max_chunks, 0xffff);
    const int64_t chunks = std::min<int64_t>(max_chunks, (n + grain - 1) / grain);
    if (chunks <= 1) {
        f((int64_t)0, n);
        return;
    }
    struct Job {
        std::remove_reference_t<F>* f;
        int64_t n, chunks;
    } job{&f, n, chunks};
    run_chunks(
        chunks,
        [](void* ctx, int64_t c) {
            const Job& j = *(const Job*)ctx;
            (*j.f)(j.n * c / j.chunks, j.n * (c + 1) / j.chunks);
        },
        &job);
}

}  // namespace qlora
