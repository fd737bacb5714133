// parallel.h: the one threading primitive the CPU ops use.
//
// OpenMP underneath (as llm.c does): a persistent team of worker threads, so a parallel region costs a few
// microseconds, which matters for the many small ops of a tiny model. Ops call parallel_for over an index
// range and choose a grain that gives each thread enough work.
#pragma once
#include <stdint.h>
#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace qlora {

int num_threads();

// f(begin, end) over [0, n) in chunks of at least `grain` indices; runs inline when one chunk suffices
template <typename F>
inline void parallel_for(int64_t n, int64_t grain, F&& f) {
    if (n <= 0) return;
    int64_t nt = num_threads();
    if (grain < 1) grain = 1;
    int64_t chunks = std::min<int64_t>(nt, (n + grain - 1) / grain);
    if (chunks <= 1) {
        f((int64_t)0, n);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)chunks) schedule(static, 1)
#endif
    for (int64_t c = 0; c < chunks; c++) {
        int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
        f(begin, end);
    }
}

}  // namespace qlora
