// bench_matmul.cpp: standalone benchmark of qlora_cpu_sgemm on the model shapes (no Node needed).
//
//   g++ -O3 -fopenmp -mavx2 -mfma -mf16c -Inative/include native/cpu/bench_matmul.cpp native/cpu/matmul.cpp
//       native/cpu/threads.cpp -o /tmp/bench_matmul && /tmp/bench_matmul [threads] [filter]
//
// Prints GFLOP/s (best of several reps after a warm-up) for each (label, M, N, K, transA, transB).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>
#include <vector>

#include "qlora_ops.h"

struct Shape {
    const char* label;
    int64_t M, N, K;
    int ta, tb;
};

static const Shape kShapes[] = {
    {"tiny q_proj", 128, 256, 256, 0, 1},       {"tiny k_proj", 128, 128, 256, 0, 1},
    {"tiny gate", 128, 768, 256, 0, 1},         {"tiny down", 128, 256, 768, 0, 1},
    {"tiny lm_head", 128, 16384, 256, 0, 1},    {"tiny q_proj", 512, 256, 256, 0, 1},
    {"tiny gate", 512, 768, 256, 0, 1},         {"tiny down", 512, 256, 768, 0, 1},
    {"tiny lm_head", 512, 16384, 256, 0, 1},    {"tiny dX lm_head", 512, 256, 16384, 0, 0},
    {"tiny dW lm_head", 16384, 256, 512, 1, 0}, {"tiny dX gate", 512, 256, 768, 0, 0},
    {"tiny dW gate", 768, 256, 512, 1, 0},      {"0.5B q_proj", 512, 896, 896, 0, 1},
    {"0.5B k_proj", 512, 128, 896, 0, 1},       {"0.5B gate", 512, 4864, 896, 0, 1},
    {"0.5B down", 512, 896, 4864, 0, 1},        {"0.5B dX gate", 512, 896, 4864, 0, 0},
    {"0.5B dW gate", 4864, 896, 512, 1, 0},     {"0.5B dX down", 512, 4864, 896, 0, 0},
    {"0.5B dW down", 896, 4864, 512, 1, 0},     {"0.5B lm_head", 128, 151936, 896, 0, 1},
    {"gen q_proj", 1, 896, 896, 0, 1},          {"gen gate", 1, 4864, 896, 0, 1},
    {"gen gate M=4", 4, 4864, 896, 0, 1},       {"gen down M=8", 8, 896, 4864, 0, 1},
    {"square 2048", 2048, 2048, 2048, 0, 0},    {"mid M=12", 12, 4864, 896, 0, 1},
    {"mid M=16", 16, 4864, 896, 0, 1},          {"mid M=32", 32, 4864, 896, 0, 1},
    {"mid M=64", 64, 4864, 896, 0, 1},          {"mid0 M=16", 16, 4864, 896, 0, 0},
    {"mid0 M=32", 32, 4864, 896, 0, 0},         {"gen0 M=1", 1, 4864, 896, 0, 0},
    {"gen0 M=8", 8, 4864, 896, 0, 0},           {"gen0 M=8 ta", 8, 4864, 896, 1, 0},
    {"gen M=8 ta", 8, 4864, 896, 1, 1},         {"xlm tb0", 128, 16384, 896, 0, 0},
    {"xlm tb1", 128, 16384, 896, 0, 1},         {"xlm ta1", 128, 16384, 896, 1, 1},
    {"xlm512 tb1", 512, 16384, 896, 0, 1},
};

int main(int argc, char** argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    const char* filter = argc > 2 ? argv[2] : nullptr;
    if (threads > 0) qlora_cpu_set_num_threads(threads);
    printf("threads %d\n", qlora_cpu_get_num_threads());
    for (const Shape& s : kShapes) {
        if (filter && !strstr(s.label, filter)) continue;
        const int64_t a_n = s.M * s.K, b_n = s.K * s.N, c_n = s.M * s.N;
        std::vector<float> A(a_n), B(b_n), C(c_n);
        for (int64_t i = 0; i < a_n; i++) A[i] = (float)((i * 7 % 13) - 6) * 0.01f;
        for (int64_t i = 0; i < b_n; i++) B[i] = (float)((i * 5 % 11) - 5) * 0.01f;
        const int64_t lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
        auto run = [&] {
            qlora_cpu_sgemm(s.ta, s.tb, s.M, s.N, s.K, 1.0f, A.data(), lda, B.data(), ldb, 0.0f, C.data(), s.N);
        };
        run();
        run();
        double best = 1e30, total = 0;
        int reps = 0;
        while (reps < 3 || (total < 0.3 && reps < 200)) {
            auto t0 = std::chrono::steady_clock::now();
            run();
            double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            best = dt < best ? dt : best;
            total += dt;
            reps++;
        }
        printf("%-18s %6lld %6lld %6lld  %d%d  %8.1f GFLOP/s  (%.3f ms)\n", s.label, (long long)s.M, (long long)s.N,
               (long long)s.K, s.ta, s.tb, 2.0 * s.M * s.N * s.K / best / 1e9, best * 1e3);
    }
    return 0;
}
