// matmul.cpp: single-precision GEMM for the CPU backend (qlora_cpu_sgemm).
//
// Design (BLIS / GotoBLAS style):
//   * op(A) and op(B) are packed into contiguous, zero-padded micro-panels, which turns all four transpose
//     cases and any strides into the same layout: A panels hold MR rows per k (k-major), B panels NR
//     columns per k. Packing a transposed source uses 8x8 AVX2 in-register transposes.
//   * cache blocking: a KC x NC block of B (L2) and an MC x KC block of A; the inner loops keep one
//     MR x KC A micro-panel in L1 while streaming the B micro-panels, and a register-blocked micro-kernel
//     accumulates an MR x NR tile of C in registers (AVX-512: MR x 32, AVX2+FMA: 6 x 16).
//   * threading (qlora::parallel_for only): C is cut into a tm x tn grid, one cell per thread, the grid
//     chosen by a cost model (compute with tile padding + packing), so that 2 threads both work for
//     M = 128 and for M = 2048; each thread packs into its own thread-local buffers.
//   * skinny M (M <= 8, token generation): no packing of W; y = x W^T runs as row dot products
//     (transB = 1) or as broadcast-x / vector-B updates (transB = 0), threaded across N.
//   * the AVX-512 kernels are compiled with target attributes and chosen at run time
//     (__builtin_cpu_supports), so the library still runs on AVX2-only machines; QLORA_NO_AVX512=1
//     (read once) forces the AVX2 kernels. Non-x86 builds get a plain scalar path.
//
// Contract: as cblas_sgemm(CblasRowMajor, ...); beta == 0 means C is write-only (NaNs in C are not
// propagated); alpha == 0 or K == 0 only scales C by beta.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "../include/qlora_ops.h"
#include "parallel.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define QLORA_X86 1
#include <immintrin.h>
#define QLORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define QLORA_X86 0
#endif

#if defined(__GNUC__)
#define QLORA_RESTRICT __restrict__
#define QLORA_UNROLL _Pragma("GCC unroll 32")
#else
#define QLORA_RESTRICT
#define QLORA_UNROLL
#endif

namespace {

// ------------------------------------------------------------------------------------------------
// kernel selection

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

int detect_isa() {
#if QLORA_X86
    __builtin_cpu_init();
    const char* env = getenv("QLORA_NO_AVX512");
    bool no512 = env && env[0] && strcmp(env, "0") != 0;
    if (!no512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return ISA_AVX512;
    return ISA_AVX2;
#else
    return ISA_SCALAR;
#endif
}

int isa() {
    static const int v = detect_isa();  // read once
    return v;
}

// ------------------------------------------------------------------------------------------------
// thread-local packing buffers (64-byte aligned, grown on demand, never shrunk)

struct TlsBuf {
    float* p = nullptr;
    size_t cap = 0;
    ~TlsBuf() { free(p); }
    float* get(size_t n) {
        if (n > cap) {
            free(p);
            size_t bytes = ((n * sizeof(float)) + 63) & ~(size_t)63;
            p = (float*)aligned_alloc(64, bytes);
            cap = p ? n : 0;
        }
        return p;
    }
};
thread_local TlsBuf tls_a, tls_b, tls_zero;

[[maybe_unused]] const float* zero_row(int64_t n) {  // n zeros (packing source for rows past the edge)
    size_t want = (size_t)std::max<int64_t>(n, 1024);
    if (tls_zero.cap < want) {
        float* z = tls_zero.get(want);
        memset(z, 0, want * sizeof(float));
    }
    return tls_zero.p;
}

// C[M,N] = beta * C (beta == 0: zero fill, NaNs not propagated)
void scale_c(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
    if (beta == 1.0f) return;
    for (int64_t i = 0; i < M; i++) {
        float* c = C + i * ldc;
        if (beta == 0.0f)
            memset(c, 0, (size_t)N * sizeof(float));
        else
            for (int64_t j = 0; j < N; j++) c[j] *= beta;
    }
}

// ------------------------------------------------------------------------------------------------
// packing: dst[k * W + r] for r < W (zero for r >= rows), k < kc
//   pack_t: source element (r, k) at src[r * ld + k]  (k contiguous: a transpose); `more`: another panel
//   follows (its rows are prefetched)

#if QLORA_X86
static inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                              __m256& r7) {
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
    r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
    r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
    r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
    r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
    r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
    r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
    r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// store the first w (1..8) lanes of v at p
static inline void store_partial(float* p, __m256 v, int w) {
    if (w == 8) {
        _mm256_storeu_ps(p, v);
        return;
    }
    __m128 lo = _mm256_castps256_ps128(v);
    if (w >= 4) {
        _mm_storeu_ps(p, lo);
        p += 4;
        w -= 4;
        lo = _mm256_extractf128_ps(v, 1);
    }
    if (w >= 2) {
        _mm_storel_pi((__m64*)p, lo);
        p += 2;
        w -= 2;
        lo = _mm_movehl_ps(lo, lo);
    }
    if (w) _mm_store_ss(p, lo);
}
#endif

template <int W>
void pack_t(float* QLORA_RESTRICT dst, const float* src, int64_t ld, int rows, int64_t kc, bool more) {
    int64_t k0 = 0;
    (void)more;
#if QLORA_X86
    const float* zero = zero_row(kc);
    for (int g = 0; g < W; g += 8) {
        const float* p[8];
        for (int i = 0; i < 8; i++) {
            int r = g + i;
            p[i] = r < rows ? src + (int64_t)r * ld : zero;
        }
        const int w = std::min(8, W - g);
        // prefetch the next 8 source rows (of this panel, or of the next one when `more`) while
        // transposing these; software prefetch since the row segments are too short for the hardware
        const bool pf = g + 8 < rows || (g + 8 >= W && more);
        const float* pf0 = src + (int64_t)std::min(g + 8, W) * ld;
        for (k0 = 0; k0 + 8 <= kc; k0 += 8) {
            if (pf && (k0 & 15) == 0)
                for (int i = 0; i < 8; i++) _mm_prefetch((const char*)(pf0 + i * ld + k0), _MM_HINT_T0);
            __m256 r0 = _mm256_loadu_ps(p[0] + k0), r1 = _mm256_loadu_ps(p[1] + k0);
            __m256 r2 = _mm256_loadu_ps(p[2] + k0), r3 = _mm256_loadu_ps(p[3] + k0);
            __m256 r4 = _mm256_loadu_ps(p[4] + k0), r5 = _mm256_loadu_ps(p[5] + k0);
            __m256 r6 = _mm256_loadu_ps(p[6] + k0), r7 = _mm256_loadu_ps(p[7] + k0);
            transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
            float* d = dst + k0 * W + g;
            store_partial(d + 0 * W, r0, w);
            store_partial(d + 1 * W, r1, w);
            store_partial(d + 2 * W, r2, w);
            store_partial(d + 3 * W, r3, w);
            store_partial(d + 4 * W, r4, w);
            store_partial(d + 5 * W, r5, w);
            store_partial(d + 6 * W, r6, w);
            store_partial(d + 7 * W, r7, w);
        }
    }
#endif
    for (int64_t k = k0; k < kc; k++) {
        float* d = dst + k * W;
        for (int r = 0; r < W; r++) d[r] = r < rows ? src[(int64_t)r * ld + k] : 0.0f;
    }
}

// pack rows [0, m) x k [0, kc) of op(X) into panels of W rows (op(X) element (r, k) at
// X[r * rs + k * cs]; exactly one of rs, cs is 1). Panel q (rows q*W ...) lands at dst + q * W * kc.
template <int W>
void pack_block(float* dst, const float* X, int64_t rs, int64_t cs, int64_t m, int64_t kc) {
    if (cs == 1) {  // k contiguous: transpose each panel
        for (int64_t r0 = 0; r0 < m; r0 += W) {
            int rows = (int)std::min<int64_t>(W, m - r0);
            pack_t<W>(dst + r0 * kc, X + r0 * rs, rs, rows, kc, r0 + W < m);
        }
        return;
    }
    // rows contiguous (rs == 1): a copy; walk each source row once across all panels
    const int64_t full = m / W * W;
    for (int64_t k = 0; k < kc; k++) {
        const float* s = X + k * cs;
#if QLORA_X86
        _mm_prefetch((const char*)(s + 4 * cs), _MM_HINT_T0);
        _mm_prefetch((const char*)(s + 4 * cs + 16), _MM_HINT_T0);
#endif
        float* d = dst + k * W;
        int64_t r0 = 0;
        for (; r0 < full; r0 += W) {
            float* dd = d + r0 * kc;
            const float* ss = s + r0;
#if QLORA_X86
            int r = 0;
            for (; r + 8 <= W; r += 8) _mm256_storeu_ps(dd + r, _mm256_loadu_ps(ss + r));
            for (; r < W; r++) dd[r] = ss[r];
#else
            for (int r = 0; r < W; r++) dd[r] = ss[r];
#endif
        }
        if (r0 < m) {
            float* dd = d + r0 * kc;
            int r = 0;
            for (; r < m - r0; r++) dd[r] = s[r0 + r];
            for (; r < W; r++) dd[r] = 0.0f;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// micro-kernels: C[m, n] (m <= MR, n <= NR) = alpha * Ap (MR x kc) @ Bp (kc x NR) + beta * C
//   beta == 0: C is not read. Ap: k-major, MR floats per k; Bp: k-major, NR floats per k.

typedef void (*MicroKernel)(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha,
                            float beta, int m, int n);

template <int MR, int NR>
void kernel_scalar(int64_t kc, const float* QLORA_RESTRICT Ap, const float* QLORA_RESTRICT Bp, float* C, int64_t ldc,
                   float alpha, float beta, int m, int n) {
    float acc[MR][NR] = {};
    for (int64_t k = 0; k < kc; k++) {
        const float* a = Ap + k * MR;
        const float* b = Bp + k * NR;
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i][j] += a[i] * b[j];
    }
    for (int i = 0; i < m; i++) {
        float* c = C + i * ldc;
        for (int j = 0; j < n; j++) c[j] = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * c[j];
    }
}

#if QLORA_X86
// AVX2 + FMA: MR x 16 (two ymm per row), 2*MR accumulators
template <int MR>
void kernel_avx2(int64_t kc, const float* QLORA_RESTRICT Ap, const float* QLORA_RESTRICT Bp, float* C, int64_t ldc,
                 float alpha, float beta, int m, int n) {
    constexpr int NR = 16;
    __m256 acc0[MR], acc1[MR];
    QLORA_UNROLL for (int i = 0; i < MR; i++) {
        acc0[i] = _mm256_setzero_ps();
        acc1[i] = _mm256_setzero_ps();
    }
    const float* a = Ap;
    const float* b = Bp;
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
        QLORA_UNROLL for (int i = 0; i < MR; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i);
            acc0[i] = _mm256_fmadd_ps(ai, b0, acc0[i]);
            acc1[i] = _mm256_fmadd_ps(ai, b1, acc1[i]);
        }
        a += MR;
        b += NR;
    }
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    if (m == MR && n == NR) {
        QLORA_UNROLL for (int i = 0; i < MR; i++) {
            float* c = C + i * ldc;
            __m256 r0 = _mm256_mul_ps(acc0[i], va), r1 = _mm256_mul_ps(acc1[i], va);
            if (beta != 0.0f) {
                r0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c), r0);
                r1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c + 8), r1);
            }
            _mm256_storeu_ps(c, r0);
            _mm256_storeu_ps(c + 8, r1);
        }
        return;
    }
    alignas(32) float tile[MR][NR];
    QLORA_UNROLL for (int i = 0; i < MR; i++) {
        _mm256_store_ps(tile[i], _mm256_mul_ps(acc0[i], va));
        _mm256_store_ps(tile[i] + 8, _mm256_mul_ps(acc1[i], va));
    }
    for (int i = 0; i < m; i++) {
        float* c = C + i * ldc;
        if (beta == 0.0f)
            for (int j = 0; j < n; j++) c[j] = tile[i][j];
        else
            for (int j = 0; j < n; j++) c[j] = tile[i][j] + beta * c[j];
    }
}

// AVX-512: MR x (16 * NV), MR * NV accumulators; edges by masked loads/stores
template <int MR, int NV>
QLORA_AVX512 void kernel_avx512(int64_t kc, const float* QLORA_RESTRICT Ap, const float* QLORA_RESTRICT Bp, float* C,
                                int64_t ldc, float alpha, float beta, int m, int n) {
    constexpr int NR = 16 * NV;
    __m512 acc[MR][NV];
    QLORA_UNROLL for (int i = 0; i < MR; i++) QLORA_UNROLL for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    const float* a = Ap;
    const float* b = Bp;
    for (int64_t k = 0; k < kc; k++) {
        __m512 bv[NV];
        QLORA_UNROLL for (int v = 0; v < NV; v++) bv[v] = _mm512_load_ps(b + 16 * v);
        QLORA_UNROLL for (int i = 0; i < MR; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            QLORA_UNROLL for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
        }
        a += MR;
        b += NR;
    }
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    __mmask16 mask[NV];
    QLORA_UNROLL for (int v = 0; v < NV; v++) {
        int rem = n - 16 * v;
        mask[v] = rem >= 16 ? (__mmask16)0xFFFF : rem <= 0 ? (__mmask16)0 : (__mmask16)((1u << rem) - 1);
    }
    if (m == MR && n == NR) {
        QLORA_UNROLL for (int i = 0; i < MR; i++) {
            float* c = C + i * ldc;
            QLORA_UNROLL for (int v = 0; v < NV; v++) {
                __m512 r = _mm512_mul_ps(acc[i][v], va);
                if (beta != 0.0f) r = _mm512_fmadd_ps(vb, _mm512_loadu_ps(c + 16 * v), r);
                _mm512_storeu_ps(c + 16 * v, r);
            }
        }
        return;
    }
    QLORA_UNROLL for (int i = 0; i < MR; i++) {
        if (i >= m) break;
        float* c = C + i * ldc;
        QLORA_UNROLL for (int v = 0; v < NV; v++) {
            __m512 r = _mm512_mul_ps(acc[i][v], va);
            if (beta != 0.0f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask[v], c + 16 * v), r);
            _mm512_mask_storeu_ps(c + 16 * v, mask[v], r);
        }
    }
}
#endif

// ------------------------------------------------------------------------------------------------
// the blocked driver for one thread's sub-problem C[m, n] (all pointers already offset)

struct Config {
    int MR, NR;
    int64_t MC, KC, NC;
    MicroKernel kernel;
    void (*pack_a)(float*, const float*, int64_t, int64_t, int64_t, int64_t);
    void (*pack_b)(float*, const float*, int64_t, int64_t, int64_t, int64_t);
};

struct Problem {
    int64_t M, N, K;
    float alpha, beta;
    const float* A;
    int64_t a_rs, a_cs;  // op(A)(i, k) = A[i * a_rs + k * a_cs]
    const float* B;
    int64_t b_rs, b_cs;  // op(B)(k, j) = B[j * b_rs + k * b_cs]  (b "rows" are the columns of op(B))
    float* C;
    int64_t ldc;
};

void gemm_block(const Config& cf, const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    const int MR = cf.MR, NR = cf.NR;
    const int64_t K = p.K;
    const int64_t KC = std::min<int64_t>(cf.KC, K);
    const int64_t MCmax = std::min<int64_t>(cf.MC, (m1 - m0 + MR - 1) / MR * MR);
    const int64_t NCmax = std::min<int64_t>(cf.NC, (n1 - n0 + NR - 1) / NR * NR);
    float* Bp = tls_b.get((size_t)(NCmax * KC) + 64);
    float* Ap = tls_a.get((size_t)(MCmax * KC) + 64);
    if (!Ap || !Bp) abort();
    for (int64_t jc = n0; jc < n1; jc += cf.NC) {
        const int64_t nc = std::min<int64_t>(cf.NC, n1 - jc);
        for (int64_t pc = 0; pc < K; pc += KC) {
            const int64_t kc = std::min<int64_t>(KC, K - pc);
            const float beta = pc == 0 ? p.beta : 1.0f;
            cf.pack_b(Bp, p.B + jc * p.b_rs + pc * p.b_cs, p.b_rs, p.b_cs, nc, kc);
            for (int64_t ic = m0; ic < m1; ic += cf.MC) {
                const int64_t mc = std::min<int64_t>(cf.MC, m1 - ic);
                cf.pack_a(Ap, p.A + ic * p.a_rs + pc * p.a_cs, p.a_rs, p.a_cs, mc, kc);
                for (int64_t ir = 0; ir < mc; ir += MR) {
                    const int mr = (int)std::min<int64_t>(MR, mc - ir);
                    const float* a = Ap + ir * kc;
                    float* crow = p.C + (ic + ir) * p.ldc + jc;
                    for (int64_t jr = 0; jr < nc; jr += NR) {
                        const int nr = (int)std::min<int64_t>(NR, nc - jr);
                        cf.kernel(kc, a, Bp + jr * kc, crow + jr, p.ldc, p.alpha, beta, mr, nr);
                    }
                }
            }
        }
    }
}

// choose a tm x tn grid of threads over C (tm * tn = nt) by a cost model: per-thread compute on padded
// tiles plus packing (A is re-packed for every NC block of the thread's columns)
void choose_grid(const Config& cf, int64_t M, int64_t N, int nt, int* tm_out, int* tn_out) {
    const int64_t pm = (M + cf.MR - 1) / cf.MR, pn = (N + cf.NR - 1) / cf.NR;
    double best = 1e300;
    int btm = 1, btn = nt;
    for (int tm = 1; tm <= nt; tm++) {
        if (nt % tm) continue;
        int tn = nt / tm;
        if (tm > pm || tn > pn) continue;
        double mt = (double)((pm + tm - 1) / tm * cf.MR), ntc = (double)((pn + tn - 1) / tn * cf.NR);
        double nblk = (double)((int64_t)(ntc + cf.NC - 1) / cf.NC);
        double cost = mt * ntc + 8.0 * (mt * nblk + ntc);
        if (cost < best) {
            best = cost;
            btm = tm;
            btn = tn;
        }
    }
    *tm_out = btm;
    *tn_out = btn;
}

void gemm_packed(const Config& cf0, const Problem& p) {
    Config cf = cf0;
    cf.MC = std::max<int64_t>(cf.MR, cf.MC / cf.MR * cf.MR);
    cf.NC = std::max<int64_t>(cf.NR, cf.NC / cf.NR * cf.NR);
    const double flops = 2.0 * (double)p.M * (double)p.N * (double)p.K;
    int nt = qlora::num_threads();
    // at least ~0.5 MFLOP per thread, else the fork/join costs more than it saves
    int64_t by_work = (int64_t)(flops / 5e5);
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, by_work));
    const int64_t pm = (p.M + cf.MR - 1) / cf.MR, pn = (p.N + cf.NR - 1) / cf.NR;
    nt = (int)std::min<int64_t>(nt, pm * pn);
    if (nt <= 1) {
        gemm_block(cf, p, 0, p.M, 0, p.N);
        return;
    }
    int tm, tn;
    choose_grid(cf, p.M, p.N, nt, &tm, &tn);
    const int cells = tm * tn;
    qlora::parallel_for(cells, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; c++) {
            int64_t im = c / tn, in = c % tn;
            int64_t m0 = std::min(p.M, pm * im / tm * cf.MR), m1 = std::min(p.M, pm * (im + 1) / tm * cf.MR);
            int64_t n0 = std::min(p.N, pn * in / tn * cf.NR), n1 = std::min(p.N, pn * (in + 1) / tn * cf.NR);
            if (m0 < m1 && n0 < n1) gemm_block(cf, p, m0, m1, n0, n1);
        }
    });
}

// ------------------------------------------------------------------------------------------------
// skinny M (few rows of op(A), e.g. token generation): no packing of B

#if QLORA_X86
QLORA_AVX512 static inline float hsum512(__m512 v) {
    // masked forms with an explicit source: GCC 12's unmasked ones trip -Wuninitialized (_mm512_undefined_ps)
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, 0xEE));
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, 0xB1));
    v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, 0xFFFF, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, 0xFFFF, v, 0xB1));
    return _mm512_cvtss_f32(v);
}

// transB = 1: C[MB, nw] (+)= alpha * X[MB, K] . W[nw, K]^T, X rows contiguous (ldx), W rows (ldw)
template <int MB, int NW>
QLORA_AVX512 void skinny_dot_avx512(int64_t K, const float* X, int64_t ldx, const float* W, int64_t ldw, float* C,
                                    int64_t ldc, float alpha, float beta) {
    __m512 acc[MB][NW];
    QLORA_UNROLL for (int i = 0; i < MB; i++) QLORA_UNROLL for (int w = 0; w < NW; w++) acc[i][w] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[NW];
        QLORA_UNROLL for (int w = 0; w < NW; w++) wv[w] = _mm512_loadu_ps(W + w * ldw + k);
        QLORA_UNROLL for (int i = 0; i < MB; i++) {
            __m512 x = _mm512_loadu_ps(X + i * ldx + k);
            QLORA_UNROLL for (int w = 0; w < NW; w++) acc[i][w] = _mm512_fmadd_ps(x, wv[w], acc[i][w]);
        }
    }
    if (k < K) {
        __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[NW];
        QLORA_UNROLL for (int w = 0; w < NW; w++) wv[w] = _mm512_maskz_loadu_ps(mk, W + w * ldw + k);
        QLORA_UNROLL for (int i = 0; i < MB; i++) {
            __m512 x = _mm512_maskz_loadu_ps(mk, X + i * ldx + k);
            QLORA_UNROLL for (int w = 0; w < NW; w++) acc[i][w] = _mm512_fmadd_ps(x, wv[w], acc[i][w]);
        }
    }
    QLORA_UNROLL for (int i = 0; i < MB; i++) {
        float* c = C + i * ldc;
        QLORA_UNROLL for (int w = 0; w < NW; w++) {
            float s = alpha * hsum512(acc[i][w]);
            c[w] = beta == 0.0f ? s : s + beta * c[w];
        }
    }
}

template <int MB, int NW>
void skinny_dot_avx2(int64_t K, const float* X, int64_t ldx, const float* W, int64_t ldw, float* C, int64_t ldc,
                     float alpha, float beta) {
    __m256 acc[MB][NW];
    QLORA_UNROLL for (int i = 0; i < MB; i++) QLORA_UNROLL for (int w = 0; w < NW; w++) acc[i][w] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[NW];
        QLORA_UNROLL for (int w = 0; w < NW; w++) wv[w] = _mm256_loadu_ps(W + w * ldw + k);
        QLORA_UNROLL for (int i = 0; i < MB; i++) {
            __m256 x = _mm256_loadu_ps(X + i * ldx + k);
            QLORA_UNROLL for (int w = 0; w < NW; w++) acc[i][w] = _mm256_fmadd_ps(x, wv[w], acc[i][w]);
        }
    }
    alignas(32) float t[8];
    QLORA_UNROLL for (int i = 0; i < MB; i++) {
        float* c = C + i * ldc;
        QLORA_UNROLL for (int w = 0; w < NW; w++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[i][w]), _mm256_extractf128_ps(acc[i][w], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            float s = _mm_cvtss_f32(h);
            for (int64_t kk = k; kk < K; kk++) s += X[i * ldx + kk] * W[w * ldw + kk];
            s *= alpha;
            c[w] = beta == 0.0f ? s : s + beta * c[w];
        }
    }
    (void)t;
}

// transB = 0: C[MB, n] (+)= alpha * X @ B[K, n]; X(i, k) at X[i * xs_i + k * xs_k]; vectors along n
template <int MB, int NV>
QLORA_AVX512 void skinny_axpy_avx512(int64_t K, const float* X, int64_t xs_i, int64_t xs_k, const float* B, int64_t ldb,
                                     float* C, int64_t ldc, float alpha, float beta, int n) {
    __m512 acc[MB][NV];
    QLORA_UNROLL for (int i = 0; i < MB; i++) QLORA_UNROLL for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    __mmask16 mask[NV];
    QLORA_UNROLL for (int v = 0; v < NV; v++) {
        int rem = n - 16 * v;
        mask[v] = rem >= 16 ? (__mmask16)0xFFFF : rem <= 0 ? (__mmask16)0 : (__mmask16)((1u << rem) - 1);
    }
    const bool full = n == 16 * NV;
    for (int64_t k = 0; k < K; k++) {
        __m512 bv[NV];
        const float* b = B + k * ldb;
        if (full) {
            QLORA_UNROLL for (int v = 0; v < NV; v++) bv[v] = _mm512_loadu_ps(b + 16 * v);
        } else {
            QLORA_UNROLL for (int v = 0; v < NV; v++) bv[v] = _mm512_maskz_loadu_ps(mask[v], b + 16 * v);
        }
        QLORA_UNROLL for (int i = 0; i < MB; i++) {
            __m512 x = _mm512_set1_ps(X[i * xs_i + k * xs_k]);
            QLORA_UNROLL for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(x, bv[v], acc[i][v]);
        }
    }
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    QLORA_UNROLL for (int i = 0; i < MB; i++) {
        float* c = C + i * ldc;
        QLORA_UNROLL for (int v = 0; v < NV; v++) {
            __m512 r = _mm512_mul_ps(acc[i][v], va);
            if (beta != 0.0f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask[v], c + 16 * v), r);
            _mm512_mask_storeu_ps(c + 16 * v, mask[v], r);
        }
    }
}

template <int MB, int NV>
void skinny_axpy_avx2(int64_t K, const float* X, int64_t xs_i, int64_t xs_k, const float* B, int64_t ldb, float* C,
                      int64_t ldc, float alpha, float beta, int n) {
    constexpr int NR = 8 * NV;
    __m256 acc[MB][NV];
    QLORA_UNROLL for (int i = 0; i < MB; i++) QLORA_UNROLL for (int v = 0; v < NV; v++) acc[i][v] = _mm256_setzero_ps();
    const bool full = n == NR;
    alignas(32) float brow[NR];
    for (int64_t k = 0; k < K; k++) {
        __m256 bv[NV];
        const float* b = B + k * ldb;
        if (!full) {
            for (int j = 0; j < NR; j++) brow[j] = j < n ? b[j] : 0.0f;
            b = brow;
        }
        QLORA_UNROLL for (int v = 0; v < NV; v++) bv[v] = _mm256_loadu_ps(b + 8 * v);
        QLORA_UNROLL for (int i = 0; i < MB; i++) {
            __m256 x = _mm256_set1_ps(X[i * xs_i + k * xs_k]);
            QLORA_UNROLL for (int v = 0; v < NV; v++) acc[i][v] = _mm256_fmadd_ps(x, bv[v], acc[i][v]);
        }
    }
    alignas(32) float tile[NR];
    for (int i = 0; i < MB; i++) {
        float* c = C + i * ldc;
        QLORA_UNROLL for (int v = 0; v < NV; v++) _mm256_store_ps(tile + 8 * v, acc[i][v]);
        for (int j = 0; j < n; j++) c[j] = beta == 0.0f ? alpha * tile[j] : alpha * tile[j] + beta * c[j];
    }
}
#endif

constexpr int SKINNY_M = 8;

// per-M dispatch tables (M = 1..8) for the skinny kernels
#if QLORA_X86
typedef void (*DotFn)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, float, float);
typedef void (*AxpyFn)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, float, float,
                       int);

// rows of W per dot call, and zmm/ymm vectors per axpy call, by M (about 24 accumulators)
constexpr int dot_nw(int mb) { return mb == 1 ? 8 : mb == 2 ? 6 : mb <= 4 ? 4 : mb <= 6 ? 3 : 3; }
constexpr int axpy_nv(int mb) { return mb <= 2 ? 6 : mb <= 4 ? 4 : mb <= 6 ? 3 : 3; }

template <int MB>
void skinny_dot_run(bool avx512, int64_t j0, int64_t j1, int64_t K, const float* X, int64_t ldx, const float* W,
                    int64_t ldw, float* C, int64_t ldc, float alpha, float beta) {
    constexpr int NW = dot_nw(MB);
    int64_t j = j0;
    if (avx512) {
        for (; j + NW <= j1; j += NW) skinny_dot_avx512<MB, NW>(K, X, ldx, W + j * ldw, ldw, C + j, ldc, alpha, beta);
        for (; j < j1; j++) skinny_dot_avx512<MB, 1>(K, X, ldx, W + j * ldw, ldw, C + j, ldc, alpha, beta);
    } else {
        for (; j + NW <= j1; j += NW) skinny_dot_avx2<MB, NW>(K, X, ldx, W + j * ldw, ldw, C + j, ldc, alpha, beta);
        for (; j < j1; j++) skinny_dot_avx2<MB, 1>(K, X, ldx, W + j * ldw, ldw, C + j, ldc, alpha, beta);
    }
}

template <int MB>
void skinny_axpy_run(bool avx512, int64_t j0, int64_t j1, int64_t K, const float* X, int64_t xs_i, int64_t xs_k,
                     const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
    constexpr int NV = axpy_nv(MB);
    if (avx512) {
        constexpr int NR = 16 * NV;
        for (int64_t j = j0; j < j1; j += NR)
            skinny_axpy_avx512<MB, NV>(K, X, xs_i, xs_k, B + j, ldb, C + j, ldc, alpha, beta,
                                       (int)std::min<int64_t>(NR, j1 - j));
    } else {
        constexpr int NR = 8 * NV;
        for (int64_t j = j0; j < j1; j += NR)
            skinny_axpy_avx2<MB, NV>(K, X, xs_i, xs_k, B + j, ldb, C + j, ldc, alpha, beta,
                                     (int)std::min<int64_t>(NR, j1 - j));
    }
}

void gemm_skinny(bool avx512, const Problem& p, bool transB, const float* A, int64_t lda, bool transA) {
    const int64_t M = p.M, N = p.N, K = p.K;
    const double flops = 2.0 * (double)M * (double)N * (double)K;
    int nt = qlora::num_threads();
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, (int64_t)(flops / 2e5)));
    if (transB) {
        // X rows must be contiguous along k: copy op(A) when A is transposed (M <= 8 rows: cheap)
        const float* X = A;
        int64_t ldx = lda;
        if (transA) {
            float* xb = tls_a.get((size_t)(M * K) + 16);
            for (int64_t k = 0; k < K; k++)
                for (int64_t i = 0; i < M; i++) xb[i * K + k] = A[k * lda + i];
            X = xb;
            ldx = K;
        }
        const int64_t unit = 24;  // W rows per scheduling unit (a multiple of every NW)
        const int64_t units = (N + unit - 1) / unit;
        auto body = [&](int64_t u0, int64_t u1) {
            int64_t j0 = u0 * unit, j1 = std::min(N, u1 * unit);
            switch (M) {
#define QLORA_CASE(mb)                                                                           \
    case mb:                                                                                     \
        skinny_dot_run<mb>(avx512, j0, j1, K, X, ldx, p.B, p.b_rs, p.C, p.ldc, p.alpha, p.beta); \
        break;
                QLORA_CASE(1)
                QLORA_CASE(2) QLORA_CASE(3) QLORA_CASE(4) QLORA_CASE(5) QLORA_CASE(6) QLORA_CASE(7) QLORA_CASE(8)
#undef QLORA_CASE
            }
        };
        if (nt <= 1)
            body(0, units);
        else
            qlora::parallel_for(units, (units + nt - 1) / nt, body);
    } else {
        const int64_t xs_i = transA ? 1 : lda, xs_k = transA ? lda : 1;
        const int64_t unit = 96;  // columns per scheduling unit (a multiple of every vector block)
        const int64_t units = (N + unit - 1) / unit;
        auto body = [&](int64_t u0, int64_t u1) {
            int64_t j0 = u0 * unit, j1 = std::min(N, u1 * unit);
            switch (M) {
#define QLORA_CASE(mb)                                                                                   \
    case mb:                                                                                             \
        skinny_axpy_run<mb>(avx512, j0, j1, K, A, xs_i, xs_k, p.B, p.b_cs, p.C, p.ldc, p.alpha, p.beta); \
        break;
                QLORA_CASE(1)
                QLORA_CASE(2) QLORA_CASE(3) QLORA_CASE(4) QLORA_CASE(5) QLORA_CASE(6) QLORA_CASE(7) QLORA_CASE(8)
#undef QLORA_CASE
            }
        };
        if (nt <= 1)
            body(0, units);
        else
            qlora::parallel_for(units, (units + nt - 1) / nt, body);
    }
}
#endif

// ------------------------------------------------------------------------------------------------
// configurations

template <int W>
void pack_block_fn(float* dst, const float* X, int64_t rs, int64_t cs, int64_t m, int64_t kc) {
    pack_block<W>(dst, X, rs, cs, m, kc);
}

// AVX-512 tile MR x (16 * NV). Measured on Zen 4 (2 threads, the shapes of bench/matmul.ts): 8 x 32 was the
// best or within noise of the best everywhere; 12x32, 6x64, 8x48 and 14x32 were 0-10% slower.
#ifndef QLORA_SGEMM_MR512
#define QLORA_SGEMM_MR512 8
#endif
#ifndef QLORA_SGEMM_NV512
#define QLORA_SGEMM_NV512 2
#endif

// Blocking: KC = 256 keeps an MR x KC A micro-panel (8 KB) in L1 while the KC x NC block of B (512 KB at
// NC = 512) streams from L2; MC x KC of A (320 KB) fits L2 alongside. KC 192..512, NC 256..1024 and MC
// 128..320 measured within noise of each other.
const Config& config_for(int which) {
#if QLORA_X86
    constexpr int MR = QLORA_SGEMM_MR512, NR = 16 * QLORA_SGEMM_NV512;
    static const Config avx512 = {MR,
                                  NR,
                                  /*MC*/ 320,
                                  /*KC*/ 256,
                                  /*NC*/ 512,
                                  &kernel_avx512<MR, QLORA_SGEMM_NV512>,
                                  &pack_block_fn<MR>,
                                  &pack_block_fn<NR>};
    static const Config avx2 = {
        6, 16, /*MC*/ 240, /*KC*/ 256, /*NC*/ 512, &kernel_avx2<6>, &pack_block_fn<6>, &pack_block_fn<16>};
    if (which == ISA_AVX512) return avx512;
    if (which == ISA_AVX2) return avx2;
#endif
    static const Config scalar = {4, 8, 128, 256, 1024, &kernel_scalar<4, 8>, &pack_block_fn<4>, &pack_block_fn<8>};
    (void)which;
    return scalar;
}

}  // namespace

extern "C" void qlora_cpu_sgemm(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {
        scale_c(M, N, beta, C, ldc);
        return;
    }
    Problem p;
    p.M = M;
    p.N = N;
    p.K = K;
    p.alpha = alpha;
    p.beta = beta;
    p.A = A;
    p.a_rs = transA ? 1 : lda;
    p.a_cs = transA ? lda : 1;
    p.B = B;
    p.b_rs = transB ? ldb : 1;  // op(B)(k, j) = B[j * ldb + k] when transposed, else B[k * ldb + j]
    p.b_cs = transB ? 1 : ldb;
    p.C = C;
    p.ldc = ldc;
    const int which = isa();
#if QLORA_X86
    if (M <= SKINNY_M) {
        gemm_skinny(which == ISA_AVX512, p, transB != 0, A, lda, transA != 0);
        return;
    }
#endif
    gemm_packed(config_for(which), p);
}
