// test_exp.cpp: the vectorized expf of ops.cpp against this process's expf, bit for bit, and the ops that use it
// (SwiGLU, softmax cross-entropy) against their scalar loops, also where the cross-entropy forward's parallel sum
// lands next to a float midpoint. Run by test/cpu-pool.test.ts, with ops.cpp built as
// CMakeLists.txt builds it:
//
//   c++ -O3 -std=gnu++17 -mavx2 -mfma -mf16c -fno-math-errno -fopenmp-simd -pthread -Inative/include
//       native/cpu/test_exp.cpp native/cpu/ops.cpp native/cpu/threads.cpp -o /tmp/test_exp && /tmp/test_exp [--all]
//
// expf is checked on every 61st float (every float with --all: about a minute), through the cross-entropy
// backward (dlogits = exp(x - lse) * scale with lse = 0 and scale = 1). Exit status 0 when everything passes.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")  // the references below fuse only where written (fmaf)
#endif
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "qlora_act.h"
#include "qlora_ops.h"

namespace qlora {  // ops.cpp
bool expf_vectorized();
int expf_lanes();
void set_expf_lanes(int lanes);
}  // namespace qlora

static int g_failures = 0;
static void check(bool ok, const char* what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) g_failures++;
}

static uint32_t bits(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}
static float from_bits(uint32_t b) {
    float x;
    memcpy(&x, &b, 4);
    return x;
}
// the same bits, or both NaN (the NaN an operation returns when both operands are NaN is the compiler's choice
// of operand order, here and in the op)
static bool same(float a, float b) { return bits(a) == bits(b) || (isnan(a) && isnan(b)); }

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static uint32_t next_u32() {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 32);
}
// gates and logits: mostly moderate, some wide (past the +-80 of expf's slow path), some any float at all
static float test_value(int i) {
    const uint32_t r = next_u32();
    switch (i % 16) {
        case 0:
            return from_bits(r);
        case 1:
            return ((float)(r >> 8) / 16777216.0f - 0.5f) * 300.0f;
        case 2: {
            const float special[] = {INFINITY, -INFINITY, NAN, 0.0f, -0.0f, 1e-40f, 88.72f, -103.5f, 89.0f, -87.4f};
            return special[r % 10];
        }
        default:
            return ((float)(r >> 8) / 16777216.0f - 0.5f) * 24.0f;
    }
}

static void run_checks(bool all) {
    // expf: dlogits of one row of V values with lse 0, scale 1 and the target the last value (not compared)
    {
        const int64_t V = (1 << 20) + 1;
        const uint64_t stride = all ? 1 : 61, total = (1ull << 32) / stride + 1;
        std::vector<float> x((size_t)V), d((size_t)V);
        const float lse = 0.0f;
        const int32_t target = (int32_t)(V - 1);
        uint64_t mismatches = 0, checked = 0;
        for (uint64_t i0 = 0; i0 < total; i0 += V - 1) {
            const int64_t n = (int64_t)std::min<uint64_t>(V - 1, total - i0);
            for (int64_t v = 0; v < n; v++) x[(size_t)v] = from_bits((uint32_t)((i0 + (uint64_t)v) * stride));
            for (int64_t v = n; v < V; v++) x[(size_t)v] = 0.0f;
            qlora_cpu_cross_entropy_backward(d.data(), x.data(), &lse, &target, 1.0f, 1, V);
            for (int64_t v = 0; v < n; v++) {
                const float ref = expf(x[(size_t)v]);
                if (bits(ref) != bits(d[(size_t)v]) && mismatches++ < 5)
                    printf("     expf(%a) = %a, vectorized %a\n", x[(size_t)v], ref, d[(size_t)v]);
            }
            checked += (uint64_t)n;
        }
        printf("     (%llu floats)\n", (unsigned long long)checked);
        check(mismatches == 0, all ? "expf: every float, bit for bit" : "expf: every 61st float, bit for bit");
    }

    // SwiGLU forward and backward against the scalar loops (GCC fuses 1 + g (1 - s) into one fma there)
    {
        bool ok = true;
        for (int64_t n : {1, 7, 8, 9, 31, 1000, 65537}) {
            std::vector<float> g((size_t)n), u((size_t)n), dout((size_t)n), out((size_t)n), dg((size_t)n),
                du((size_t)n);
            for (int64_t i = 0; i < n; i++) {
                g[(size_t)i] = test_value((int)i);
                u[(size_t)i] = test_value((int)i + 3);
                dout[(size_t)i] = test_value((int)i + 5);
            }
            qlora_cpu_gated_act_forward(out.data(), g.data(), u.data(), n, QLORA_ACT_SILU);
            qlora_cpu_gated_act_backward(dg.data(), du.data(), dout.data(), g.data(), u.data(), n, QLORA_ACT_SILU);
            for (int64_t i = 0; i < n; i++) {
                const float gi = g[(size_t)i], ui = u[(size_t)i], d = dout[(size_t)i];
                const float s = 1.0f / (1.0f + expf(-gi));
                ok &= same(out[(size_t)i], gi / (1.0f + expf(-gi)) * ui);
                ok &= same(du[(size_t)i], d * gi * s);
                ok &= same(dg[(size_t)i], d * ui * s * fmaf(gi, 1.0f - s, 1.0f));
            }
        }
        check(ok, "SwiGLU forward and backward: the scalar loops' values");
    }

    // cross-entropy forward and backward against the scalar loops, with rows whose maximum is +-0 or -inf
    {
        bool ok = true;
        for (auto shape : {std::pair<int64_t, int64_t>{3, 5}, {5, 17}, {9, 1000}, {6, 16389}}) {
            const int64_t N = shape.first, V = shape.second;
            std::vector<float> x((size_t)(N * V)), loss((size_t)N), lse((size_t)N), d((size_t)(N * V));
            std::vector<int32_t> t((size_t)N);
            for (int64_t i = 0; i < N * V; i++) x[(size_t)i] = test_value((int)i);
            for (int64_t v = 0; v < V; v++) x[(size_t)(V + v)] = v % 3 == 0 ? -0.0f : -1.0f - (float)v;  // row 1: -0
            if (V > 5) x[(size_t)(V + 5)] = 0.0f;
            for (int64_t v = 0; v < V; v++) x[(size_t)(2 * V + v)] = -INFINITY;  // row 2
            for (int64_t n = 0; n < N; n++) t[(size_t)n] = n % 4 == 3 ? -100 : (int32_t)(next_u32() % V);
            const int64_t count = qlora_cpu_cross_entropy_forward(loss.data(), lse.data(), x.data(), t.data(), N, V);
            qlora_cpu_cross_entropy_backward(d.data(), x.data(), lse.data(), t.data(), 0.37f, N, V);
            int64_t ref_count = 0;
            for (int64_t n = 0; n < N; n++) {
                const float* xr = x.data() + n * V;
                float m = -INFINITY;
                for (int64_t v = 0; v < V; v++) m = xr[v] > m ? xr[v] : m;
                double s = 0.0;
                for (int64_t v = 0; v < V; v++) s += expf(xr[v] - m);
                const float l = m + (float)log(s);
                const int32_t tn = t[(size_t)n];
                const bool valid = tn >= 0 && tn < V;
                ref_count += valid;
                ok &= same(lse[(size_t)n], l) && same(loss[(size_t)n], valid ? l - xr[tn] : 0.0f);
                for (int64_t v = 0; v < V; v++) {
                    float ref = valid ? expf(xr[v] - l) * 0.37f : 0.0f;
                    if (valid && v == tn) ref -= 0.37f;
                    ok &= same(d[(size_t)(n * V + v)], ref);
                }
            }
            ok &= count == ref_count;
        }
        check(ok, "cross-entropy forward and backward: the scalar loops' values");
    }

    // The forward takes l from a sum in parallel when the sequential loop's sum must round to the same l (ops.cpp
    // lse_from_parallel_sum). Rows whose log-sum lies next to a float midpoint test that margin: one logit is set
    // so that log(s) of the sequential sum comes within ~1e-12 of a midpoint between two floats, where the two
    // sums round to different floats unless the op falls back to the loop.
    {
        bool ok = true;
        int near = 0;
        const int64_t V = 16384 + 5;
        std::vector<float> x((size_t)V);
        for (int row = 0; row < 300 && ok; row++) {
            for (int64_t v = 0; v < V; v++) x[(size_t)v] = ((float)(next_u32() >> 8) / 16777216.0f - 0.5f) * 16.0f;
            const int64_t j = 1 + (int64_t)(next_u32() % (uint32_t)(V - 1));
            x[0] = 8.5f;  // the maximum
            const float m = 8.5f;
            double rest = 0.0;
            for (int64_t v = 0; v < V; v++)
                if (v != j) rest += expf(x[(size_t)v] - m);
            // the float midpoint next above log(rest): the term of x[j] brings log(s) onto it
            const float f = (float)log(rest);
            double mid = ((double)f + (double)nextafterf(f, INFINITY)) / 2.0;
            if (mid <= log(rest))
                mid = ((double)nextafterf(f, INFINITY) + (double)nextafterf(nextafterf(f, INFINITY), INFINITY)) / 2.0;
            const double term = exp(mid) - rest;
            if (!(term > 1e-30 && term < 0.5)) continue;
            // the float x[j] whose sequential sum puts log(s) closest to the midpoint
            float best = m + logf((float)term), xj = best;
            double best_gap = INFINITY;
            for (int k = 0; k < 8; k++) xj = nextafterf(xj, -INFINITY);
            for (int k = 0; k < 16; k++, xj = nextafterf(xj, INFINITY)) {
                x[(size_t)j] = xj;
                double s = 0.0;
                for (int64_t v = 0; v < V; v++) s += expf(x[(size_t)v] - m);
                const double gap = fabs(log(s) - mid);
                if (gap < best_gap) best_gap = gap, best = xj;
            }
            x[(size_t)j] = best;
            near += best_gap < 4e-12;
            double s = 0.0;
            for (int64_t v = 0; v < V; v++) s += expf(x[(size_t)v] - m);
            const float l = m + (float)log(s);
            float loss, lse;
            const int32_t target = 0;
            qlora_cpu_cross_entropy_forward(&loss, &lse, x.data(), &target, 1, V);
            ok &= same(lse, l) && same(loss, l - x[0]);
        }
        printf("     (%d of 300 rows within 4e-12 of a midpoint)\n", near);
        check(ok && near >= 100, "cross-entropy forward next to float midpoints: the scalar loop's values");
    }
}

int main(int argc, char** argv) {
    const bool all = argc > 1 && strcmp(argv[1], "--all") == 0;
    qlora_cpu_set_num_threads(2);
    // false when this libm's expf is another algorithm: the ops then keep the scalar loops (checked below all the
    // same); test/cpu-pool.test.ts expects it on glibc 2.27+
    printf("     (vectorized expf in use: %s)\n", qlora::expf_vectorized() ? "yes" : "no");
    // every vector expf this CPU runs: AVX-512 where the ops use it, and AVX2
    const char* names[] = {"scalar", "AVX2", "AVX-512"};
    const int detected = qlora::expf_lanes();
    for (int lanes = detected; lanes >= std::min(detected, 1); lanes--) {
        qlora::set_expf_lanes(lanes);
        printf("     (expf lanes: %s)\n", names[lanes]);
        run_checks(all);
    }

    printf("%s\n", g_failures ? "FAILED" : "ALL OK");
    return g_failures ? 1 : 0;
}
