// ops.cpp: the elementwise and row-wise CPU ops: dtype conversion, embedding, RMSNorm, RoPE, the gated MLP
// activation (SwiGLU, GELU-tanh), soft-capping and softmax cross-entropy, forward and backward. fp32 compute; each
// loop is threaded with parallel_for and written so the compiler vectorizes it (omp simd on reductions), but for the
// expf loops, vectorized by hand with glibc's expf (below).
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include "../include/qlora_float.h"
#include "../include/qlora_act.h"
#include "../include/qlora_dropout.h"
#include "../include/qlora_ops.h"
#include "parallel.h"
#include "vexp.h"

using qlora::parallel_for;

// ------------------------------------------------------------------
// expf eight lanes at a time, bit for bit the expf of glibc 2.27+ (e_expf.c from ARM's optimized-routines, in
// the FMA build that x86-64 glibc runs on every CPU these ops need): the argument in double, 2^(k/32) from a
// 32-entry table, a cubic polynomial, one rounding to float. The table and constants are glibc's
// (__exp2f_data); lanes with |x| >= 80 (overflow, underflow, inf, NaN) call expf itself. It replaced scalar
// expf in the loops below, which spent most of their time in it; it is used only when a check at first use
// finds it equal to this process's expf (a libm with another algorithm keeps the scalar loops, and with them
// the same results as before).

namespace {

alignas(64) const uint64_t kExp2Table[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b,
    0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715, 0x3feef1a7373aa9cb,
    0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d, 0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540};

inline __m256d f64_bits(uint64_t bits) { return _mm256_castsi256_pd(_mm256_set1_epi64x((long long)bits)); }

// exp of four doubles (floats widened), before the final rounding to float; the operations of glibc's
// __expf_fma in its order, each fused multiply-add where it fuses one
inline __m256d exp_f64x4(__m256d xd) {
    const __m256d inv_ln2_n = f64_bits(0x40471547652b82fe), shift = f64_bits(0x4338000000000000);
    const __m256d kd_shifted = _mm256_fmadd_pd(inv_ln2_n, xd, shift);
    const __m256i ki = _mm256_castpd_si256(kd_shifted);
    const __m256d kd = _mm256_sub_pd(kd_shifted, shift);
    const __m256d r = _mm256_fmsub_pd(inv_ln2_n, xd, kd);
    __m256i t = _mm256_i64gather_epi64((const long long*)kExp2Table, _mm256_and_si256(ki, _mm256_set1_epi64x(31)), 8);
    t = _mm256_add_epi64(t, _mm256_slli_epi64(ki, 47));
    const __m256d z = _mm256_fmadd_pd(r, f64_bits(0x3ebc6af84b912394), f64_bits(0x3f2ebfce50fac4f3));
    const __m256d r2 = _mm256_mul_pd(r, r);
    __m256d y = _mm256_fmadd_pd(r, f64_bits(0x3f962e42ff0c52d6), _mm256_set1_pd(1.0));
    y = _mm256_fmadd_pd(z, r2, y);
    return _mm256_mul_pd(y, _mm256_castsi256_pd(t));
}

// glibc's slow path: the lanes whose top 12 bits of |x| are at or above those of 80 take expf itself
inline __m256 expf_slow_lanes(__m256 x, __m256 y) {
    const __m256i magnitude = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff));
    const int slow =
        _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x429fffff))));
    if (slow) {
        alignas(32) float xs[8], ys[8];
        _mm256_store_ps(xs, x);
        _mm256_store_ps(ys, y);
        for (int i = 0; i < 8; i++)
            if (slow >> i & 1) ys[i] = expf(xs[i]);
        y = _mm256_load_ps(ys);
    }
    return y;
}

inline __m256 exp_f32x8(__m256 x) {
    const __m256 y = _mm256_set_m128(_mm256_cvtpd_ps(exp_f64x4(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)))),
                                     _mm256_cvtpd_ps(exp_f64x4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)))));
    return expf_slow_lanes(x, y);
}

// The same with AVX-512, where the CPU has it (QLORA_NO_AVX512=1 turns it off, as for the sgemm): the eight floats
// widened to one vector of eight doubles and the table read by two permutes instead of two gathers; the same
// operations in the same order, so the same bits, at about twice the rate (cross-entropy backward 512 x 16384:
// 6.8 -> 3.3 ms on one thread).
#define QLORA_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))

QLORA_AVX512 inline __m512d f64x8_bits(uint64_t bits) {
    return _mm512_castsi512_pd(_mm512_set1_epi64((long long)bits));
}

QLORA_AVX512 inline __m256 exp_f32x8_avx512(__m256 x) {
    const __m512d xd = _mm512_cvtps_pd(x);
    const __m512d inv_ln2_n = f64x8_bits(0x40471547652b82fe), shift = f64x8_bits(0x4338000000000000);
    const __m512d kd_shifted = _mm512_fmadd_pd(inv_ln2_n, xd, shift);
    const __m512i ki = _mm512_castpd_si512(kd_shifted);
    const __m512d kd = _mm512_sub_pd(kd_shifted, shift);
    const __m512d r = _mm512_fmsub_pd(inv_ln2_n, xd, kd);
    // kExp2Table[ki & 31]: entries 0..15 and 16..31 by the low 4 bits, then bit 4 picks
    const __m512i* table = (const __m512i*)kExp2Table;
    const __m512i t_low = _mm512_permutex2var_epi64(_mm512_load_si512(table), ki, _mm512_load_si512(table + 1));
    const __m512i t_high = _mm512_permutex2var_epi64(_mm512_load_si512(table + 2), ki, _mm512_load_si512(table + 3));
    __m512i t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), t_low, t_high);
    t = _mm512_add_epi64(t, _mm512_slli_epi64(ki, 47));
    const __m512d z = _mm512_fmadd_pd(r, f64x8_bits(0x3ebc6af84b912394), f64x8_bits(0x3f2ebfce50fac4f3));
    const __m512d r2 = _mm512_mul_pd(r, r);
    __m512d y = _mm512_fmadd_pd(r, f64x8_bits(0x3f962e42ff0c52d6), _mm512_set1_pd(1.0));
    y = _mm512_fmadd_pd(z, r2, y);
    return expf_slow_lanes(x, _mm512_cvtpd_ps(_mm512_mul_pd(y, _mm512_castsi512_pd(t))));
}

// the expf loops below are templates over their eight-lane expf; their AVX-512 instances are wrapped in functions
// compiled for it (QLORA_AVX512), into which they and ExpAvx512::exp inline
struct ExpAvx2 {
    static inline __m256 exp(__m256 x) { return exp_f32x8(x); }
};
struct ExpAvx512 {
    QLORA_AVX512 static inline __m256 exp(__m256 x) { return exp_f32x8_avx512(x); }
};
#define QLORA_ALWAYS_INLINE inline __attribute__((always_inline))

// whether E::exp gives this process's expf: every 32749th float (all exponents, both signs, inf, NaN) and
// 65536 points of [-104, 89], where expf is neither 0, 1 nor inf
template <class E>
bool same_as_expf() {
    alignas(32) float xs[8], ys[8];
    for (int64_t i = 0; i < (1 << 17) + (1 << 16); i += 8) {
        for (int k = 0; k < 8; k++) {
            const int64_t j = i + k;
            if (j < (1 << 17)) {
                const uint32_t bits = (uint32_t)(j * 32749);
                memcpy(&xs[k], &bits, 4);
            } else {
                xs[k] = -104.0f + 193.0f * (float)(j - (1 << 17)) / 65536.0f;
            }
        }
        _mm256_store_ps(ys, E::exp(_mm256_load_ps(xs)));
        for (int k = 0; k < 8; k++) {
            const float ref = expf(xs[k]);
            if (memcmp(&ref, &ys[k], 4) != 0) return false;
        }
    }
    return true;
}

// the expf loops' lanes: 0 scalar expf (a libm with another expf), 1 exp_f32x8, 2 exp_f32x8_avx512; each is used
// only when a check at first use finds it equal to this process's expf
enum { EXP_SCALAR = 0, EXP_AVX2 = 1, EXP_AVX512 = 2 };

int detect_exp_lanes() {
    if (!same_as_expf<ExpAvx2>()) return EXP_SCALAR;
    __builtin_cpu_init();
    const char* env = getenv("QLORA_NO_AVX512");
    const bool no512 = env && env[0] && strcmp(env, "0") != 0;
    if (no512 || !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512bw"))
        return EXP_AVX2;
    return same_as_expf<ExpAvx512>() ? EXP_AVX512 : EXP_AVX2;
}

int detected_exp_lanes() {
    static const int lanes = detect_exp_lanes();
    return lanes;
}

// the detected lanes while -1; set_expf_lanes (tests) picks others
std::atomic<int> g_exp_lanes{-1};

int exp_lanes() {
    const int forced = g_exp_lanes.load(std::memory_order_relaxed);
    return forced >= 0 ? forced : detected_exp_lanes();
}

bool vector_expf() { return exp_lanes() != EXP_SCALAR; }

template <class E>
QLORA_ALWAYS_INLINE void expf_x8(float* x, int64_t n) {
    for (int64_t i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, E::exp(_mm256_loadu_ps(x + i)));
}
QLORA_AVX512 void expf_x8_avx512(float* x, int64_t n) { expf_x8<ExpAvx512>(x, n); }

}  // namespace

namespace qlora {
// for native/cpu/test_exp.cpp: whether the loops below run the vectorized expf
bool expf_vectorized() { return vector_expf(); }
// for native/cpu/test_exp.cpp: the lanes the loops use (0 scalar, 1 AVX2, 2 AVX-512), and a way to test each
int expf_lanes() { return exp_lanes(); }
void set_expf_lanes(int lanes) {
    g_exp_lanes.store(std::max(0, std::min(lanes, detected_exp_lanes())), std::memory_order_relaxed);
}

void expf_inplace(float* x, int64_t n) {
    const int lanes = exp_lanes();
    if (lanes == EXP_AVX512)
        expf_x8_avx512(x, n);
    else if (lanes == EXP_AVX2)
        expf_x8<ExpAvx2>(x, n);
    for (int64_t i = lanes == EXP_SCALAR ? 0 : n - n % 8; i < n; i++) x[i] = expf(x[i]);
}
}  // namespace qlora

namespace {

// s + e in order, with s the first operand of the instruction: the operand whose NaN x86 returns when both are
// NaN (a plain `s += e` leaves that order to the compiler)
inline double add_f64(double s, float e) { return _mm_cvtsd_f64(_mm_add_sd(_mm_set_sd(s), _mm_set_sd((double)e))); }

}  // namespace

// ------------------------------------------------------------------
// dtype conversion

using qlora::bf16_to_f32;
using qlora::f32_to_bf16;

extern "C" void qlora_cpu_bf16_to_f32(float* out, const uint16_t* inp, int64_t n) {
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) out[i] = bf16_to_f32(inp[i]);
    });
}

extern "C" void qlora_cpu_f32_to_bf16(uint16_t* out, const float* inp, int64_t n) {
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) out[i] = f32_to_bf16(inp[i]);
    });
}

extern "C" void qlora_cpu_f16_to_f32(float* out, const uint16_t* inp, int64_t n) {
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
        int64_t i = b;
        for (; i + 8 <= e; i += 8) {
            __m128i h = _mm_loadu_si128((const __m128i*)(inp + i));
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
        }
        for (; i < e; i++) out[i] = _cvtsh_ss(inp[i]);
    });
}

extern "C" void qlora_cpu_f32_to_f16(uint16_t* out, const float* inp, int64_t n) {
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
        int64_t i = b;
        for (; i + 8 <= e; i += 8) {
            __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(inp + i), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i*)(out + i), h);
        }
        for (; i < e; i++) out[i] = _cvtss_sh(inp[i], _MM_FROUND_TO_NEAREST_INT);
    });
}

// ------------------------------------------------------------------
// elementwise

extern "C" void qlora_cpu_add_inplace(float* y, const float* x, int64_t n) {
    parallel_for(n, 1 << 15, [&](int64_t b, int64_t e) {
#pragma omp simd
        for (int64_t i = b; i < e; i++) y[i] += x[i];
    });
}

extern "C" void qlora_cpu_add_bias(float* out, const float* inp, const float* bias, int64_t N, int64_t C) {
    parallel_for(N, (1 << 15) / (C + 1) + 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = inp + n * C;
            float* y = out + n * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) y[c] = x[c] + bias[c];
        }
    });
}

// ------------------------------------------------------------------
// embedding

extern "C" int64_t qlora_cpu_embedding_forward(float* out, const int32_t* ids, const float* table, int64_t N, int64_t V,
                                               int64_t C) {
    for (int64_t n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V) return -1 - n;
    parallel_for(N, (1 << 14) / (C + 1) + 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) memcpy(out + n * C, table + (int64_t)ids[n] * C, C * sizeof(float));
    });
    return 0;
}

extern "C" void qlora_cpu_embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t N,
                                             int64_t C) {
    // threads own column ranges, so rows that repeat an id never race
    parallel_for(C, 64, [&](int64_t cb, int64_t ce) {
        for (int64_t n = 0; n < N; n++) {
            float* d = dtable + (int64_t)ids[n] * C;
            const float* g = dout + n * C;
#pragma omp simd
            for (int64_t c = cb; c < ce; c++) d[c] += g[c];
        }
    });
}

// ------------------------------------------------------------------
// RMSNorm

extern "C" void qlora_cpu_rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                                          int64_t C, float eps) {
    parallel_for(N, (1 << 14) / (C + 1) + 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = inp + n * C;
            float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
            for (int64_t c = 0; c < C; c++) ss += x[c] * x[c];
            float r = 1.0f / sqrtf(ss / (float)C + eps);
            if (rstd) rstd[n] = r;
            float* y = out + n * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) y[c] = weight[c] * (x[c] * r);
        }
    });
}

extern "C" void qlora_cpu_rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                                           const float* weight, const float* rstd, int64_t N, int64_t C) {
    // y = w * x * r, r = (mean(x^2) + eps)^-1/2
    // dx = r * w * g - x * r^3 / C * sum_j(w_j g_j x_j);  dw += g * x * r
    parallel_for(N, (1 << 14) / (C + 1) + 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = inp + n * C;
            const float* g = dout + n * C;
            float r = rstd[n];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < C; c++) dot += weight[c] * g[c] * x[c];
            float k = dot * r * r * r / (float)C;
            float* dx = dinp + n * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) dx[c] = r * weight[c] * g[c] - x[c] * k;
        }
    });
    if (dweight) {
        // column-parallel so threads never write the same dweight element
        parallel_for(C, 64, [&](int64_t cb, int64_t ce) {
            for (int64_t n = 0; n < N; n++) {
                const float* x = inp + n * C;
                const float* g = dout + n * C;
                float r = rstd[n];
#pragma omp simd
                for (int64_t c = cb; c < ce; c++) dweight[c] += g[c] * x[c] * r;
            }
        });
    }
}

// ------------------------------------------------------------------
// RoPE (rotate_half)

// the first R dimensions of each head rotate (pairs (i, i + R/2)); the others pass through (partial rotary)
static void rope_apply(float* out, const float* inp, const int32_t* pos, const float* inv_freq, float scaling,
                       int64_t N, int64_t H, int64_t D, int64_t R, float sign) {
    int64_t half = R / 2;
    parallel_for(N, 8, [&](int64_t b, int64_t e) {
        float cs[512], sn[512];  // D <= 1024
        for (int64_t n = b; n < e; n++) {
            float p = (float)pos[n];
            for (int64_t i = 0; i < half; i++) {
                // f32 angle as transformers computes it (inv_freq @ position_ids in float32)
                float angle = p * inv_freq[i];
                cs[i] = cosf(angle) * scaling;
                sn[i] = sign * sinf(angle) * scaling;
            }
            for (int64_t h = 0; h < H; h++) {
                const float* x = inp + (n * H + h) * D;
                float* y = out + (n * H + h) * D;
                for (int64_t i = 0; i < half; i++) {
                    float x0 = x[i], x1 = x[i + half];
                    y[i] = x0 * cs[i] - x1 * sn[i];
                    y[i + half] = x1 * cs[i] + x0 * sn[i];
                }
                if (y != x)
                    for (int64_t i = R; i < D; i++) y[i] = x[i];
            }
        }
    });
}

extern "C" void qlora_cpu_rope_forward(float* out, const float* inp, const int32_t* pos, const float* inv_freq,
                                       float attention_scaling, int64_t N, int64_t H, int64_t D, int64_t R) {
    rope_apply(out, inp, pos, inv_freq, attention_scaling, N, H, D, R, 1.0f);
}

extern "C" void qlora_cpu_rope_backward(float* dinp, const float* dout, const int32_t* pos, const float* inv_freq,
                                        float attention_scaling, int64_t N, int64_t H, int64_t D, int64_t R) {
    // the rotation is orthogonal (times a scale): its transpose is the rotation by -angle; the pass-through
    // dimensions' gradient is the identity
    rope_apply(dinp, dout, pos, inv_freq, attention_scaling, N, H, D, R, -1.0f);
}

// ------------------------------------------------------------------
// dropout (the same masks as the CUDA kernels: native/include/qlora_dropout.h)

extern "C" void qlora_cpu_dropout_mask(float* mask, uint64_t seed, float p, int64_t n, int64_t first) {
    const float scale = 1.0f / (1.0f - p);
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) mask[i] = qlora_dropout_keep(seed, (uint64_t)(first + i), p) ? scale : 0.0f;
    });
}

// ------------------------------------------------------------------
// the gated MLP's activation: out = act(gate) * up, act one of qlora_act.h's (SwiGLU's silu, Gemma's gelu_tanh)

namespace {

// silu eight lanes at a time with the vectorized expf, the scalar loop's operations in its order: from b while
// eight elements are left before e; returns the first element it left
template <class E>
QLORA_ALWAYS_INLINE int64_t silu_forward_x8(float* out, const float* gate, const float* up, int64_t b, int64_t e) {
    int64_t i = b;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= e; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 sig = _mm256_add_ps(one, E::exp(_mm256_xor_ps(g, sign)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
    return i;
}

template <class E>
QLORA_ALWAYS_INLINE int64_t silu_backward_x8(float* dgate, float* dup, const float* dout, const float* gate,
                                             const float* up, int64_t b, int64_t e) {
    int64_t i = b;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= e; i += 8) {
        // 1 + g (1 - s) is the fused multiply-add GCC makes of the scalar loop's
        const __m256 g = _mm256_loadu_ps(gate + i), d = _mm256_loadu_ps(dout + i), u = _mm256_loadu_ps(up + i);
        const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, E::exp(_mm256_xor_ps(g, sign))));
        _mm256_storeu_ps(dup + i, _mm256_mul_ps(_mm256_mul_ps(d, g), s));
        const __m256 dus = _mm256_mul_ps(_mm256_mul_ps(d, u), s);
        _mm256_storeu_ps(dgate + i, _mm256_mul_ps(dus, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one)));
    }
    return i;
}

QLORA_AVX512 int64_t silu_forward_x8_avx512(float* out, const float* gate, const float* up, int64_t b, int64_t e) {
    return silu_forward_x8<ExpAvx512>(out, gate, up, b, e);
}

QLORA_AVX512 int64_t silu_backward_x8_avx512(float* dgate, float* dup, const float* dout, const float* gate,
                                             const float* up, int64_t b, int64_t e) {
    return silu_backward_x8<ExpAvx512>(dgate, dup, dout, gate, up, b, e);
}

template <int Act>
void gated_act_forward(float* out, const float* gate, const float* up, int64_t n) {
    const int lanes = Act == QLORA_ACT_SILU ? exp_lanes() : EXP_SCALAR;
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        int64_t i = lanes == EXP_AVX512 ? silu_forward_x8_avx512(out, gate, up, b, e)
                    : lanes == EXP_AVX2 ? silu_forward_x8<ExpAvx2>(out, gate, up, b, e)
                                        : b;
        for (; i < e; i++) out[i] = qlora_act::gated_forward<Act>(gate[i], up[i]);
    });
}

template <int Act>
void gated_act_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t n) {
    const int lanes = Act == QLORA_ACT_SILU ? exp_lanes() : EXP_SCALAR;
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        int64_t i = lanes == EXP_AVX512 ? silu_backward_x8_avx512(dgate, dup, dout, gate, up, b, e)
                    : lanes == EXP_AVX2 ? silu_backward_x8<ExpAvx2>(dgate, dup, dout, gate, up, b, e)
                                        : b;
        for (; i < e; i++) qlora_act::gated_backward<Act>(dout[i], gate[i], up[i], dgate[i], dup[i]);
    });
}

}  // namespace

extern "C" void qlora_cpu_gated_act_forward(float* out, const float* gate, const float* up, int64_t n, int act) {
    if (act == QLORA_ACT_GELU_TANH)
        gated_act_forward<QLORA_ACT_GELU_TANH>(out, gate, up, n);
    else
        gated_act_forward<QLORA_ACT_SILU>(out, gate, up, n);
}

extern "C" void qlora_cpu_gated_act_backward(float* dgate, float* dup, const float* dout, const float* gate,
                                             const float* up, int64_t n, int act) {
    if (act == QLORA_ACT_GELU_TANH)
        gated_act_backward<QLORA_ACT_GELU_TANH>(dgate, dup, dout, gate, up, n);
    else
        gated_act_backward<QLORA_ACT_SILU>(dgate, dup, dout, gate, up, n);
}

// ------------------------------------------------------------------
// logit soft-capping (Gemma's final_logit_softcapping)

extern "C" void qlora_cpu_softcap_forward(float* x, int64_t n, float cap) {
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) x[i] = qlora_act::softcap(x[i], cap);
    });
}

extern "C" void qlora_cpu_softcap_backward(float* dx, const float* y, int64_t n, float cap) {
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) dx[i] *= qlora_act::softcap_grad(y[i], cap);
    });
}

// ------------------------------------------------------------------
// softmax cross-entropy

namespace {

// The loss's l = m + (float)log(s), s the row's sum of expf(x - m) added in double one term after the other (the
// scalar loop of qlora_cpu_cross_entropy_forward): a chain of V dependent additions, most of the forward's time.
// Added in any other order, a sum of V terms >= 0 is within gamma(V - 1) = (V - 1) u / (1 - (V - 1) u) of the exact
// sum (u = 2^-53), the sequential one too; so the sequential s lies within delta = 2 gamma / (1 - gamma) of a
// parallel sum s' (relatively), and its log_c within delta (1 + delta) + log_c's error (< 1 ulp in glibc; 4 allowed)
// of log_c(s'). Float rounding and m + f are monotone: where both ends of that interval give the same l, it is
// the sequential loop's l; elsewhere it returns false and the caller runs the loop (none of 300,000 random rows
// at V = 16384 and 37984; test_exp.cpp makes such rows on purpose). Non-finite sums (NaN, inf logits) return false
// too.
// the row's sum of expf(x - m) in four double accumulators of four lanes: the terms to the last multiple of 16
template <class E>
QLORA_ALWAYS_INLINE double exp_sum_x16(const float* x, int64_t V, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t v = 0; v + 16 <= V; v += 16) {
        const __m256 e0 = E::exp(_mm256_sub_ps(_mm256_loadu_ps(x + v), mv));
        const __m256 e1 = E::exp(_mm256_sub_ps(_mm256_loadu_ps(x + v + 8), mv));
        acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(e0)));
        acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(e0, 1)));
        acc2 = _mm256_add_pd(acc2, _mm256_cvtps_pd(_mm256_castps256_ps128(e1)));
        acc3 = _mm256_add_pd(acc3, _mm256_cvtps_pd(_mm256_extractf128_ps(e1, 1)));
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(acc0, acc1), _mm256_add_pd(acc2, acc3)));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

QLORA_AVX512 double exp_sum_x16_avx512(const float* x, int64_t V, float m) { return exp_sum_x16<ExpAvx512>(x, V, m); }

bool lse_from_parallel_sum(const float* x, int64_t V, float m, float* l_out) {
    double s = exp_lanes() == EXP_AVX512 ? exp_sum_x16_avx512(x, V, m) : exp_sum_x16<ExpAvx2>(x, V, m);
    for (int64_t v = V - V % 16; v < V; v++) s += (double)expf(x[v] - m);
    if (!(s >= 0.0 && s <= 1e300)) return false;
    const double k = (double)(V - 1) * 0x1p-53;
    const double gamma = k / (1.0 - k), delta = 2.0 * gamma / (1.0 - gamma);
    const double L = log(s);
    const double E = delta * (1.0 + 2.0 * delta) + (fabs(L) + delta) * 0x1p-50 + 1e-300;
    const float lo = m + (float)(L - E), hi = m + (float)(L + E);
    if (memcmp(&lo, &hi, 4) != 0) return false;
    *l_out = lo;
    return true;
}

}  // namespace

extern "C" int64_t qlora_cpu_cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets,
                                                   int64_t N, int64_t V) {
    const bool vec = vector_expf();
    parallel_for(N, 1, [&](int64_t b, int64_t e) {
        alignas(32) float ex[8];
        for (int64_t n = b; n < e; n++) {
            const float* x = logits + n * V;
            float m = -INFINITY;
            int64_t v = 0;
            if (vec && V >= 8) {
                // maxps(x, m) keeps m when x is NaN, as the scalar loop does; the maximum of the lanes is the
                // same value, but for its sign when it is zero, which the scalar loop then settles
                __m256 mv = _mm256_set1_ps(-INFINITY);
                for (; v + 8 <= V; v += 8) mv = _mm256_max_ps(_mm256_loadu_ps(x + v), mv);
                _mm256_store_ps(ex, mv);
                for (int k = 0; k < 8; k++) m = ex[k] > m ? ex[k] : m;
                if (m == 0.0f) m = -INFINITY, v = 0;
            }
            for (; v < V; v++) m = x[v] > m ? x[v] : m;
            float l;
            if (!vec || !lse_from_parallel_sum(x, V, m, &l)) {
                double s = 0.0;
                v = 0;
                if (vec) {
                    const __m256 mv = _mm256_set1_ps(m);
                    for (; v + 8 <= V; v += 8) {
                        _mm256_store_ps(ex, exp_f32x8(_mm256_sub_ps(_mm256_loadu_ps(x + v), mv)));
                        for (int k = 0; k < 8; k++) s = add_f64(s, ex[k]);
                    }
                }
                for (; v < V; v++) s = add_f64(s, expf(x[v] - m));
                l = m + (float)log(s);
            }
            if (lse) lse[n] = l;
            int32_t t = targets[n];
            loss[n] = (t >= 0 && t < V) ? l - x[t] : 0.0f;
        }
    });
    int64_t count = 0;
    for (int64_t n = 0; n < N; n++) count += (targets[n] >= 0 && targets[n] < V);
    return count;
}

namespace {

// d[v] = expf(x[v] - l) * scale while eight are left; returns the first element it left
template <class E>
QLORA_ALWAYS_INLINE int64_t softmax_grad_x8(float* d, const float* x, float l, float scale, int64_t V) {
    const __m256 lv = _mm256_set1_ps(l), sv = _mm256_set1_ps(scale);
    int64_t v = 0;
    for (; v + 8 <= V; v += 8)
        _mm256_storeu_ps(d + v, _mm256_mul_ps(E::exp(_mm256_sub_ps(_mm256_loadu_ps(x + v), lv)), sv));
    return v;
}

QLORA_AVX512 int64_t softmax_grad_x8_avx512(float* d, const float* x, float l, float scale, int64_t V) {
    return softmax_grad_x8<ExpAvx512>(d, x, l, scale, V);
}

}  // namespace

extern "C" void qlora_cpu_cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                                                 const int32_t* targets, float dloss_scale, int64_t N, int64_t V) {
    const int lanes = exp_lanes();
    parallel_for(N, 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = logits + n * V;
            float* d = dlogits + n * V;
            int32_t t = targets[n];
            if (t < 0 || t >= V) {
                memset(d, 0, V * sizeof(float));
                continue;
            }
            const float l = lse[n];
            int64_t v = 0;
            if (lanes == EXP_AVX512)
                v = softmax_grad_x8_avx512(d, x, l, dloss_scale, V);
            else if (lanes == EXP_AVX2)
                v = softmax_grad_x8<ExpAvx2>(d, x, l, dloss_scale, V);
            for (; v < V; v++) d[v] = expf(x[v] - l) * dloss_scale;
            d[t] -= dloss_scale;
        }
    });
}
