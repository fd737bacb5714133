// optim.cpp: AdamW steps (torch, bitsandbytes 32-bit and 8-bit blockwise), bnb's dynamic 8-bit maps and the
// reductions of gradient clipping (header: qlora_optim.h; docs: SPEC-quant.md §4, §9). The arithmetic of the
// steps and the maps is shared with the CUDA kernels (qlora_adamw.h, qlora_bnb.h); this file runs it over the
// CPU's threads.
//
// Reproducibility over speed: every rounding of the reference is spelled out. The build compiles with
// -mfma under gnu++17, where GCC would contract a*b+c into an FMA wherever it likes; contraction is switched
// off for this file (before the includes, so it covers the shared headers' host code) and the fused operations
// of the references (nvcc fuses bnb's kernels; torch's vectorized lerp uses fmadd) are written as explicit
// ieee::fma. With that, the 8-bit states (codes and scales) and the 32-bit states equal bnb's CUDA results bit
// for bit on the golden fixture; parameters differ from bnb's only through its fast-math bias correction
// (__powf), a relative error of about 3e-5 of each update.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <float.h>
#include <math.h>
#include <string.h>
#include <algorithm>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include "../include/qlora_adamw.h"
#include "../include/qlora_bnb.h"
#include "../include/qlora_optim.h"
#include "parallel.h"

using qlora::parallel_for;
namespace adamw = qlora::adamw;
namespace ieee = qlora::ieee;

namespace {

// elements per parallel chunk of the elementwise steps
constexpr int64_t kGrain = 16384;
// elements per parallel chunk of the blockwise 8-bit step (each element costs more: quantization of both states)
constexpr int64_t kBlockwiseGrain = 1024;

// an elementwise step (torch, bnb 32-bit) over the threads: update(p, m, v, g, scalars) for every element (a
// lambda, so that the call inlines into the vectorized loop)
template <class Scalars, class Update>
void elementwise_step(float* param, float* state1, float* state2, const float* grad, const Scalars& scalars,
                      Update update, int64_t n) {
    parallel_for(n, kGrain, [&](int64_t begin, int64_t end) {
        const Scalars c = scalars;  // a local copy: the stores below cannot alias it, so the loop vectorizes
        for (int64_t i = begin; i < end; i++) {
            float p = param[i], m = state1[i], v = state2[i];
            update(p, m, v, grad[i], c);
            param[i] = p;
            state1[i] = m;
            state2[i] = v;
        }
    });
}

}  // namespace

// ------------------------------------------------------------------
// dynamic map

extern "C" void qlora_cpu_optim_dynamic_map(float* out, int is_signed) {
    qlora::bnb::create_dynamic_map(out, is_signed != 0);
}

// ------------------------------------------------------------------
// torch AdamW and bitsandbytes 32-bit AdamW

extern "C" void qlora_cpu_adamw_torch_step(float* param, float* exp_avg, float* exp_avg_sq, const float* grad,
                                           double lr, double beta1, double beta2, double eps, double weight_decay,
                                           int64_t step, int64_t n) {
    const auto update = [](float& p, float& m, float& v, float g, const adamw::TorchScalars& c) {
        adamw::torch_update(p, m, v, g, c);
    };
    elementwise_step(param, exp_avg, exp_avg_sq, grad, adamw::torch_scalars(lr, beta1, beta2, eps, weight_decay, step),
                     update, n);
}

extern "C" void qlora_cpu_adamw_bnb32_step(float* param, float* state1, float* state2, const float* grad, float lr,
                                           float beta1, float beta2, float eps, float weight_decay, int64_t step,
                                           int64_t n) {
    const auto update = [](float& p, float& m, float& v, float g, const adamw::BnbScalars& c) {
        adamw::bnb32_update(p, m, v, g, c);
    };
    elementwise_step(param, state1, state2, grad, adamw::bnb_scalars(lr, beta1, beta2, eps, weight_decay, step), update,
                     n);
}

// ------------------------------------------------------------------
// bitsandbytes 8-bit blockwise AdamW
//
// With AVX2, eight elements a vector: each operation of the scalar code (qlora_adamw.h, qlora_bnb.h) is the
// same IEEE operation on eight lanes (mul, add, div, sqrt, fma; max with fmaxf's NaN rule; ordered comparisons),
// so the bits are the scalar code's. bnb's search for a state's code is the part that cost: as scalar code its
// seven data-dependent branches per code mispredict about half the time (35-75 ns a parameter for its two
// codes). Here it walks the same seven steps with the comparisons as masks, reading the entries of the first five
// steps from registers and the last two from the map, for four vectors at once (the steps of one vector form a
// chain). The rest of a block that fills no whole vectors (all of it without AVX2) takes the scalar code. Checked
// against the scalar search on all 2^32 floats (both dynamic maps, and maps that stop short of the ends).

namespace {

// a block's moments before its new absmax is known, kept for the second pass; larger blocks allocate
constexpr int64_t kStackBlock = 4096;

#if defined(__AVX2__) && defined(__FMA__)

// vectors of 8 elements the second pass handles together: four independent searches per map
constexpr int kSearchVectors = 4;

// bnb's search (qlora::bnb::detail::search<SIGNED, false>) visits after k steps the pivot (128 >> k) - 1 +
// a * (256 >> k), where a holds the k outcomes (1: x > the pivot's entry) as binary digits. The entries of steps
// 1..5 (2..32 of them) as tables for _mm256_permutevar8x32_ps, which reads the low 3 bits of a; step 4 picks one
// of two tables by bit 3, step 5 one of four by bits 3 and 4.
struct SearchTables {
    __m256 step1, step2, step3, step4[2], step5[4];
    float first;
};

inline __m256 step_table(const float* code, int k, int first_a) {
    alignas(32) float t[8];
    for (int i = 0; i < 8; i++) {
        const int a = first_a + (i & ((1 << k) - 1));  // steps 1..3 repeat their 2, 4 entries
        t[i] = code[(128 >> k) - 1 + a * (256 >> k)];
    }
    return _mm256_load_ps(t);
}

inline SearchTables search_tables(const float* code) {
    SearchTables t;
    t.step1 = step_table(code, 1, 0);
    t.step2 = step_table(code, 2, 0);
    t.step3 = step_table(code, 3, 0);
    for (int h = 0; h < 2; h++) t.step4[h] = step_table(code, 4, 8 * h);
    for (int h = 0; h < 4; h++) t.step5[h] = step_table(code, 5, 8 * h);
    t.first = code[127];
    return t;
}

// a lane's bit b of an int32 as the sign bit, the selector of blendv
inline __m256 bit_as_sign(__m256i a, int b) {
    return _mm256_castsi256_ps(_mm256_sll_epi32(a, _mm_cvtsi32_si128(31 - b)));
}

// bnb's quantize_2D<SIGNED> (the search of qlora_bnb.h with the assumed ends [-1 or 0, 1]) of N vectors x:
// codes[u] = the codes, entries[u] = code[codes[u]] (for the sign fix)
template <bool SIGNED, int N>
inline void quantize_2d_x8(const float* code, const SearchTables& tables, const __m256* x, __m256i* codes,
                           __m256* entries) {
    __m256i a[N];
    __m256 val[N];
    for (int u = 0; u < N; u++) {
        a[u] = _mm256_setzero_si256();
        val[u] = _mm256_set1_ps(tables.first);
    }
    for (int k = 1; k <= 7; k++) {
        for (int u = 0; u < N; u++) {
            // step k: x > val goes up (a gets a 1 digit), else down; then the entry of the new pivot
            const __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(x[u], val[u], _CMP_GT_OQ));
            const __m256i au = a[u] = _mm256_sub_epi32(_mm256_slli_epi32(a[u], 1), gt);
            if (k == 1) {
                val[u] = _mm256_permutevar8x32_ps(tables.step1, au);
            } else if (k == 2) {
                val[u] = _mm256_permutevar8x32_ps(tables.step2, au);
            } else if (k == 3) {
                val[u] = _mm256_permutevar8x32_ps(tables.step3, au);
            } else if (k == 4) {
                val[u] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tables.step4[0], au),
                                          _mm256_permutevar8x32_ps(tables.step4[1], au), bit_as_sign(au, 3));
            } else if (k == 5) {
                const __m256 bit3 = bit_as_sign(au, 3);
                const __m256 low = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tables.step5[0], au),
                                                    _mm256_permutevar8x32_ps(tables.step5[1], au), bit3);
                const __m256 high = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tables.step5[2], au),
                                                     _mm256_permutevar8x32_ps(tables.step5[3], au), bit3);
                val[u] = _mm256_blendv_ps(low, high, bit_as_sign(au, 4));
            } else if (k == 6) {
                val[u] = _mm256_i32gather_ps(code + 1, _mm256_slli_epi32(au, 1), 8);  // code[1 + 4a]
            } else {
                val[u] = _mm256_i32gather_ps(code, au, 8);  // code[2a]: the last pivot p = 2a
            }
        }
    }
    const __m256 half = _mm256_set1_ps(0.5f);
    for (int u = 0; u < N; u++) {
        // The search's last pivots below and above p (lower_pivot, upper_pivot) are p's neighbours in the order of
        // the pivots' tree, p - 1 and p + 1, but at the ends, where the search kept its start: lower_pivot 0 with
        // the assumed lower end at p = 0, upper_pivot 255 with the assumed upper end 1 at p = 254.
        const __m256i at_first = _mm256_cmpeq_epi32(a[u], _mm256_setzero_si256());
        const __m256i at_last = _mm256_cmpeq_epi32(a[u], _mm256_set1_epi32(127));
        const __m256 above = _mm256_i32gather_ps(code + 1, a[u], 8);  // code[p + 1]
        // code[p - 1]; code[p] at p = 0 (not read out of the map)
        const __m256 below = _mm256_mask_i32gather_ps(
            val[u], code - 1, a[u], _mm256_castsi256_ps(_mm256_cmpgt_epi32(a[u], _mm256_setzero_si256())), 8);
        const __m256 upper = _mm256_blendv_ps(above, _mm256_set1_ps(1.0f), _mm256_castsi256_ps(at_last));
        const __m256 lower =
            _mm256_blendv_ps(below, _mm256_set1_ps(SIGNED ? -1.0f : 0.0f), _mm256_castsi256_ps(at_first));
        // x > val: upper_pivot if x > the midpoint to upper, else p; otherwise lower_pivot if x < the midpoint to
        // lower, else p
        const __m256 gt = _mm256_cmp_ps(x[u], val[u], _CMP_GT_OQ);
        const __m256 to_upper =
            _mm256_and_ps(gt, _mm256_cmp_ps(x[u], _mm256_mul_ps(_mm256_add_ps(upper, val[u]), half), _CMP_GT_OQ));
        const __m256 to_lower =
            _mm256_andnot_ps(gt, _mm256_cmp_ps(x[u], _mm256_mul_ps(_mm256_add_ps(lower, val[u]), half), _CMP_LT_OQ));
        entries[u] = _mm256_blendv_ps(_mm256_blendv_ps(val[u], above, to_upper), below, to_lower);
        // p + 1 where to_upper, p - 1 where to_lower (p itself at p = 0): the masks are -1
        const __m256i p = _mm256_add_epi32(a[u], a[u]);
        codes[u] = _mm256_add_epi32(_mm256_sub_epi32(p, _mm256_castps_si256(to_upper)),
                                    _mm256_andnot_si256(at_first, _mm256_castps_si256(to_lower)));
    }
}

// the low byte of each of eight int32 lanes, stored to out[0..8)
inline void store_low_bytes(uint8_t* out, __m256i v) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1,
                                          -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i b = _mm256_shuffle_epi8(v, pick);
    const uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(b));
    const uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(b, 1));
    memcpy(out, &lo, 4);
    memcpy(out + 4, &hi, 4);
}

// qmap[codes[0..8)]
inline __m256 decode8(const float* qmap, const uint8_t* codes) {
    uint64_t bytes;
    memcpy(&bytes, codes, 8);
    return _mm256_i32gather_ps(qmap, _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes)), 4);
}

// all ones where g is finite, else zero
inline __m256 finite8(__m256 g) {
    const __m256 abs_g = _mm256_and_ps(g, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    return _mm256_cmp_ps(abs_g, _mm256_set1_ps(INFINITY), _CMP_LT_OQ);
}

#endif

// one block of len elements (bnb's kernel for one block): the moments, the new absmax, the parameters, the codes
void bnb8_block(float* param, uint8_t* state1, uint8_t* state2, float* absmax1, float* absmax2, const float* grad,
                const float* qmap1, const float* qmap2, const adamw::BnbScalars& c, int64_t blocksize, int64_t len,
                float* ms, float* vs) {
    const float old_absmax1 = *absmax1, old_absmax2 = *absmax2;
    float new_absmax1 = -FLT_MAX, new_absmax2 = -FLT_MAX;
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    {
        const __m256 beta1 = _mm256_set1_ps(c.beta1), beta2 = _mm256_set1_ps(c.beta2);
        const __m256 w1 = _mm256_set1_ps(c.one_minus_beta1), w2 = _mm256_set1_ps(c.one_minus_beta2);
        const __m256 scale1 = _mm256_set1_ps(old_absmax1), scale2 = _mm256_set1_ps(old_absmax2);
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 max1 = _mm256_set1_ps(-FLT_MAX), max2 = max1;
        for (; j + 8 <= len; j += 8) {
            const __m256 g = _mm256_loadu_ps(grad + j);
            const __m256 finite = finite8(g);
            // bnb8_moments, then 0 where g is not finite
            __m256 v = _mm256_mul_ps(decode8(qmap2, state2 + j), scale2);
            v = _mm256_fmadd_ps(_mm256_mul_ps(w2, g), g, _mm256_mul_ps(v, beta2));
            __m256 m = _mm256_mul_ps(decode8(qmap1, state1 + j), scale1);
            m = _mm256_fmadd_ps(w1, g, _mm256_mul_ps(m, beta1));
            m = _mm256_and_ps(m, finite);
            v = _mm256_and_ps(v, finite);
            _mm256_storeu_ps(ms + j, m);
            _mm256_storeu_ps(vs + j, v);
            // fmaxf(max, |m|): max_ps gives its second operand where either is NaN, and max is never NaN
            max1 = _mm256_max_ps(_mm256_and_ps(m, magnitude), max1);
            max2 = _mm256_max_ps(_mm256_and_ps(v, magnitude), max2);
        }
        alignas(32) float lanes1[8], lanes2[8];
        _mm256_store_ps(lanes1, max1);
        _mm256_store_ps(lanes2, max2);
        for (int k = 0; k < 8; k++) {
            new_absmax1 = ieee::max(new_absmax1, lanes1[k]);
            new_absmax2 = ieee::max(new_absmax2, lanes2[k]);
        }
    }
#endif
    for (; j < len; j++) {
        const float g = grad[j];
        float m = 0.0f, v = 0.0f;
        if (ieee::is_finite(g))
            adamw::bnb8_moments(m, v, g, qmap1[state1[j]], old_absmax1, qmap2[state2[j]], old_absmax2, c);
        ms[j] = m;
        vs[j] = v;
        new_absmax1 = ieee::max(new_absmax1, ieee::abs(m));
        new_absmax2 = ieee::max(new_absmax2, ieee::abs(v));
    }
    if (len < blocksize) adamw::bnb8_pad_absmax(new_absmax1, new_absmax2, qmap1[128], old_absmax1, c);
    *absmax1 = new_absmax1;
    *absmax2 = new_absmax2;

    j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    {
        constexpr int N = kSearchVectors;
        const __m256 step_size = _mm256_set1_ps(c.step_size), c2 = _mm256_set1_ps(c.correction2);
        const __m256 eps = _mm256_set1_ps(c.eps), decay = _mm256_set1_ps(c.decay);
        const __m256 scale1 = _mm256_set1_ps(new_absmax1), scale2 = _mm256_set1_ps(new_absmax2);
        const SearchTables tables1 = search_tables(qmap1), tables2 = search_tables(qmap2);
        for (; j + 8 * N <= len; j += 8 * N) {
            __m256 m[N], x1[N], x2[N], entries1[N], entries2[N];
            __m256i codes1[N], codes2[N];
            for (int u = 0; u < N; u++) {
                const int64_t i = j + 8 * u;
                m[u] = _mm256_loadu_ps(ms + i);
                const __m256 v = _mm256_loadu_ps(vs + i);
                // bnb8_param, kept only where g is finite
                const __m256 p = _mm256_loadu_ps(param + i);
                __m256 updated =
                    _mm256_fmadd_ps(step_size, _mm256_div_ps(m[u], _mm256_fmadd_ps(c2, eps, _mm256_sqrt_ps(v))), p);
                if (c.decays) updated = _mm256_mul_ps(updated, decay);
                _mm256_storeu_ps(param + i, _mm256_blendv_ps(p, updated, finite8(_mm256_loadu_ps(grad + i))));
                x1[u] = _mm256_div_ps(m[u], scale1);
                x2[u] = _mm256_div_ps(v, scale2);
            }
            // bnb8_codes
            quantize_2d_x8<true, N>(qmap1, tables1, x1, codes1, entries1);
            quantize_2d_x8<false, N>(qmap2, tables2, x2, codes2, entries2);
            for (int u = 0; u < N; u++) {
                // the sign fix: where the entry's sign is not m's, one code towards m (up where m > 0, else down;
                // the code wraps as the scalar uint8_t does)
                const __m256i sign_differs = _mm256_srai_epi32(
                    _mm256_xor_si256(_mm256_castps_si256(entries1[u]), _mm256_castps_si256(m[u])), 31);
                const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(m[u], _mm256_setzero_ps(), _CMP_GT_OQ));
                const __m256i step = _mm256_or_si256(_mm256_and_si256(up, _mm256_set1_epi32(1)),
                                                     _mm256_andnot_si256(up, _mm256_set1_epi32(-1)));
                store_low_bytes(state1 + j + 8 * u, _mm256_add_epi32(codes1[u], _mm256_and_si256(sign_differs, step)));
                store_low_bytes(state2 + j + 8 * u, codes2[u]);
            }
        }
    }
#endif
    for (; j < len; j++) {
        const float m = ms[j], v = vs[j];
        if (ieee::is_finite(grad[j])) param[j] = adamw::bnb8_param(param[j], m, v, c);
        adamw::bnb8_codes(state1[j], state2[j], m, v, new_absmax1, new_absmax2, qmap1, qmap2);
    }
}

}  // namespace

extern "C" void qlora_cpu_adamw_bnb8_step(float* param, uint8_t* state1, uint8_t* state2, float* absmax1,
                                          float* absmax2, const float* grad, const float* qmap1, const float* qmap2,
                                          float lr, float beta1, float beta2, float eps, float weight_decay,
                                          int64_t step, int64_t blocksize, int64_t n) {
    if (n <= 0 || blocksize <= 0) return;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const adamw::BnbScalars scalars = adamw::bnb_scalars(lr, beta1, beta2, eps, weight_decay, step);
    // a block's update is its own (absmax, 8-bit codes), so any split gives the same bits
    const int64_t grain = std::max<int64_t>(1, kBlockwiseGrain / blocksize);
    parallel_for(nblocks, grain, [&](int64_t block_begin, int64_t block_end) {
        const adamw::BnbScalars c = scalars;
        alignas(32) float stack_ms[kStackBlock], stack_vs[kStackBlock];
        std::vector<float> heap_ms, heap_vs;
        float *ms = stack_ms, *vs = stack_vs;
        if (blocksize > kStackBlock) {
            heap_ms.resize((size_t)blocksize);
            heap_vs.resize((size_t)blocksize);
            ms = heap_ms.data();
            vs = heap_vs.data();
        }
        for (int64_t b = block_begin; b < block_end; b++) {
            const int64_t base = b * blocksize;
            bnb8_block(param + base, state1 + base, state2 + base, absmax1 + b, absmax2 + b, grad + base, qmap1, qmap2,
                       c, blocksize, std::min(blocksize, n - base), ms, vs);
        }
    });
}

// ------------------------------------------------------------------
// clipping

extern "C" double qlora_cpu_optim_sum_squares(const float* x, int64_t n) {
    // fixed chunks summed in order, so the result does not depend on the number of threads
    constexpr int64_t kChunk = 1 << 16;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    if (chunks <= 0) return 0.0;
    std::vector<double> partial((size_t)chunks);
    parallel_for(chunks, 1, [&](int64_t c_begin, int64_t c_end) {
        for (int64_t c = c_begin; c < c_end; c++) {
            const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
            double s = 0.0;
            for (int64_t i = begin; i < end; i++) s += (double)x[i] * (double)x[i];
            partial[(size_t)c] = s;
        }
    });
    double total = 0.0;
    for (double s : partial) total += s;
    return total;
}

extern "C" void qlora_cpu_optim_scale(float* x, float s, int64_t n) {
    parallel_for(n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) x[i] = x[i] * s;
    });
}
