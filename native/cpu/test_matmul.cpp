// test_matmul.cpp: standalone correctness test for qlora_cpu_sgemm against a double-precision reference.
//
//   g++ -O2 -fopenmp -mavx2 -mfma -mf16c -Inative/include native/cpu/test_matmul.cpp native/cpu/matmul.cpp
//       native/cpu/threads.cpp -o /tmp/test_matmul && /tmp/test_matmul
//
// Runs every case on 1 and 2+ threads; the process re-executes itself with QLORA_NO_AVX512=1 (the
// kernel choice is read once per process) so that both the AVX-512 and the AVX2 kernels are tested on an
// AVX-512 machine. Exit status 0 when everything passes.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "qlora_ops.h"

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static float frand() {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

struct Case {
    int ta, tb;
    int64_t M, N, K;
    float alpha, beta;
    int64_t pad_a, pad_b, pad_c;  // extra leading-dimension padding
};

static int g_fail = 0, g_count = 0;

static void run_case(const Case& c, int threads) {
    const int64_t M = c.M, N = c.N, K = c.K;
    // stored shapes: A is [M, lda] (or [K, lda] when transposed); B is [K, ldb] (or [N, ldb])
    const int64_t a_rows = c.ta ? K : M, a_cols = c.ta ? M : K;
    const int64_t b_rows = c.tb ? N : K, b_cols = c.tb ? K : N;
    const int64_t lda = a_cols + c.pad_a, ldb = b_cols + c.pad_b, ldc = N + c.pad_c;
    std::vector<float> A((size_t)(a_rows * lda + 1)), B((size_t)(b_rows * ldb + 1)), C((size_t)(M * ldc + 1));
    for (auto& x : A) x = frand();
    for (auto& x : B) x = frand();
    const bool nan_c = c.beta == 0.0f;
    for (auto& x : C) x = nan_c ? NAN : frand();
    std::vector<float> C0 = C;
    const float sentinel = 12345.0f;
    // padding columns of C must be left untouched
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = N; j < ldc; j++) C[i * ldc + j] = C0[i * ldc + j] = sentinel;
    C.back() = C0.back() = sentinel;

    qlora_cpu_set_num_threads(threads);
    qlora_cpu_sgemm(c.ta, c.tb, M, N, K, c.alpha, A.data(), lda, B.data(), ldb, c.beta, C.data(), ldc);

    double max_err = 0.0;
    bool ok = true;
    for (int64_t i = 0; i < M && ok; i++) {
        for (int64_t j = 0; j < N; j++) {
            double s = 0.0, sa = 0.0;
            for (int64_t k = 0; k < K; k++) {
                double a = c.ta ? A[k * lda + i] : A[i * lda + k];
                double b = c.tb ? B[j * ldb + k] : B[k * ldb + j];
                s += a * b;
                sa += fabs(a * b);
            }
            double ref = c.alpha * s + (c.beta == 0.0f ? 0.0 : c.beta * (double)C0[i * ldc + j]);
            double scale = fabs(c.alpha) * sa + fabs(c.beta == 0.0f ? 0.0 : c.beta * (double)C0[i * ldc + j]) + 1e-30;
            double got = C[i * ldc + j];
            double err = fabs(got - ref) / scale;
            if (!(err <= 1e-5 * sqrt((double)K + 1.0))) {  // also catches NaN
                fprintf(stderr, "  mismatch at (%lld,%lld): got %.9g want %.9g (rel err %.3g)\n", (long long)i,
                        (long long)j, got, ref, err);
                ok = false;
                break;
            }
            if (err > max_err) max_err = err;
        }
        for (int64_t j = N; j < ldc; j++)
            if (C[i * ldc + j] != sentinel) {
                fprintf(stderr, "  padding of C overwritten at (%lld,%lld)\n", (long long)i, (long long)j);
                ok = false;
                break;
            }
    }
    if (C.back() != sentinel) ok = false;
    g_count++;
    if (!ok) {
        g_fail++;
        fprintf(stderr, "FAIL ta=%d tb=%d M=%lld N=%lld K=%lld alpha=%g beta=%g pads=%lld,%lld,%lld threads=%d\n", c.ta,
                c.tb, (long long)M, (long long)N, (long long)K, c.alpha, c.beta, (long long)c.pad_a, (long long)c.pad_b,
                (long long)c.pad_c, threads);
    }
}

int main(int argc, char** argv) {
    const char* no512 = getenv("QLORA_NO_AVX512");
    const bool child = argc > 1 && strcmp(argv[1], "--child") == 0;
    printf("[%s kernels] ", no512 && strcmp(no512, "0") ? "AVX2 (QLORA_NO_AVX512)" : "default");
    fflush(stdout);

    const int64_t sizes[][3] = {
        {1, 1, 1},      {7, 13, 5},    {37, 129, 300}, {130, 67, 1000}, {1, 300, 77},  {3, 70, 33},
        {8, 97, 260},   {9, 50, 17},   {6, 16, 8},     {12, 32, 256},   {13, 33, 257}, {64, 128, 64},
        {200, 40, 600}, {5, 2000, 40}, {2, 7, 1300},   {300, 300, 3},
    };
    const float ab[][2] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.5f, -0.75f}, {-2.0f, 0.0f}};
    int hw = qlora_cpu_get_num_threads();
    int threads_list[2] = {1, hw > 1 ? hw : 2};
    for (const auto& s : sizes) {
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (const auto& x : ab)
                    for (int pad = 0; pad < 2; pad++)
                        for (int t : threads_list) {
                            Case c = {ta, tb, s[0], s[1], s[2], x[0], x[1], pad ? 3 : 0, pad ? 5 : 0, pad ? 7 : 0};
                            run_case(c, t);
                        }
    }
    // a few larger shapes exercising several cache blocks (KC, MC, NC) and the thread grid
    const int64_t big[][3] = {{1100, 70, 600}, {65, 1500, 530}, {128, 256, 256}, {512, 130, 300}};
    for (const auto& s : big)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++) {
                Case c = {ta, tb, s[0], s[1], s[2], 1.0f, (ta ^ tb) ? 1.0f : 0.0f, 1, 2, 3};
                run_case(c, threads_list[1]);
            }
    // alpha == 0 and K == 0: C = beta * C
    {
        Case c = {0, 1, 9, 11, 0, 1.0f, 0.5f, 0, 0, 0};
        run_case(c, 2);
        Case d = {1, 0, 9, 11, 7, 0.0f, 0.0f, 0, 0, 0};
        run_case(d, 2);
    }
    printf("%d/%d cases passed\n", g_count - g_fail, g_count);
    fflush(stdout);

    int rc = g_fail ? 1 : 0;
    if (!child && !(no512 && strcmp(no512, "0"))) {
        // re-run this binary with the AVX2 kernels forced
        std::string cmd = "QLORA_NO_AVX512=1 \"" + std::string(argv[0]) + "\" --child";
        int r = system(cmd.c_str());
        if (r != 0) rc = 1;
    }
    if (!child) printf(rc ? "FAILED\n" : "ALL OK\n");
    return rc;
}
