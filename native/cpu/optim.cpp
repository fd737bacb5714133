// optim.cpp: AdamW steps (torch, bitsandbytes 32-bit and 8-bit blockwise), bnb's dynamic 8-bit maps and the
// reductions of gradient clipping (header: qlora_optim.h; docs: SPEC-quant.md §4, §9).
//
// Reproducibility over speed: every rounding of the reference is spelled out. The build compiles with
// -mfma under gnu++17, where GCC would contract a*b+c into an FMA wherever it likes; contraction is switched
// off for this file and the fused operations of the references (nvcc fuses bnb's kernels; torch's vectorized
// lerp uses fmadd) are written as explicit fmaf. With that, the 8-bit states (codes and scales) and the
// 32-bit states equal bnb's CUDA results bit for bit on the golden fixture; parameters differ from bnb's only
// through its fast-math bias correction (__powf), a relative error of about 3e-5 of each update.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <float.h>
#include <math.h>
#include <string.h>
#include <vector>
#include "../include/qlora_optim.h"
#include "parallel.h"

using qlora::parallel_for;

namespace {

// elements per parallel chunk of the elementwise steps
constexpr int64_t kGrain = 16384;

inline bool is_finite(float x) { return isfinite(x); }

// bnb's quantize_2D<SIGNED> (csrc kernels): a 7-step binary search from index 127, then a comparison with the
// midpoint to the neighbour on the side x lies. Equal to "nearest entry" except at exact midpoints; a NaN
// (0/0 in an all-zero block) walks down to index 0, as on the GPU.
template <bool SIGNED>
inline uint8_t quantize_2d(const float* code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = SIGNED ? -1.0f : 0.0f, upper = 1.0f;
    float val = code[127];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (x > val) {
        float midpoint = (upper + val) * 0.5f;
        return (uint8_t)(x > midpoint ? upper_pivot : pivot);
    }
    float midpoint = (lower + val) * 0.5f;
    return (uint8_t)(x < midpoint ? lower_pivot : pivot);
}

// torch.linspace(start, end, steps) in float32 on the CPU: step = (end - start) / (steps - 1); the first half
// start + step*i, the second half end - step*(steps - 1 - i), each a fused multiply-add
void linspace_f32(float* out, float start, float end, int steps) {
    float step = (end - start) / (float)(steps - 1);
    int halfway = steps / 2;
    for (int i = 0; i < steps; i++)
        out[i] = i < halfway ? fmaf(step, (float)i, start) : fmaf(-step, (float)(steps - 1 - i), end);
}

}  // namespace

// ------------------------------------------------------------------
// dynamic map

extern "C" void qlora_cpu_optim_dynamic_map(float* out, int is_signed) {
    // bnb create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): 7 decades of means of linspace(0.1, 1)
    // scaled by 10^(i-6) (the scale rounded to float32, then a float32 product), plus 0 and 1, sorted
    float data[256];
    int k = 0;
    float boundaries[130];
    for (int i = 0; i < 7; i++) {
        int fraction_items = is_signed ? (1 << i) + 1 : (1 << (i + 1)) + 1;
        linspace_f32(boundaries, 0.1f, 1.0f, fraction_items);
        float scale = (float)pow(10.0, (double)(i - 6));
        for (int j = 0; j + 1 < fraction_items; j++) {
            float mean = (boundaries[j] + boundaries[j + 1]) / 2.0f;
            data[k++] = scale * mean;
            if (is_signed) data[k++] = -scale * mean;
        }
    }
    data[k++] = 0.0f;
    data[k++] = 1.0f;
    while (k < 256) data[k++] = 0.0f;  // not reached for 8 bits: the map has exactly 256 entries
    // insertion sort (256 entries, once per optimizer)
    for (int i = 1; i < 256; i++) {
        float x = data[i];
        int j = i - 1;
        while (j >= 0 && data[j] > x) {
            data[j + 1] = data[j];
            j--;
        }
        data[j + 1] = x;
    }
    memcpy(out, data, sizeof(data));
}

// ------------------------------------------------------------------
// torch AdamW

extern "C" void qlora_cpu_adamw_torch_step(float* param, float* exp_avg, float* exp_avg_sq, const float* grad,
                                           double lr, double beta1, double beta2, double eps,
                                           double weight_decay, int64_t step, int64_t n) {
    const double bc1 = 1.0 - pow(beta1, (double)step);
    const double bc2 = 1.0 - pow(beta2, (double)step);
    const float decay = (float)(1.0 - lr * weight_decay);
    const float w1 = (float)(1.0 - beta1);
    const float b2 = (float)beta2;
    const float w2 = (float)(1.0 - beta2);
    const float neg_step_size = (float)(-(lr / bc1));
    const float bc2_sqrt = (float)pow(bc2, 0.5);
    const float epsf = (float)eps;
    const bool decays = weight_decay != 0.0;
    parallel_for(n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            float p = param[i], g = grad[i], m = exp_avg[i], v = exp_avg_sq[i];
            if (decays) p = p * decay;
            m = fmaf(w1, g - m, m);
            v = v * b2;
            v = v + (w2 * g) * g;
            float denom = sqrtf(v) / bc2_sqrt + epsf;
            p = p + (neg_step_size * m) / denom;
            param[i] = p;
            exp_avg[i] = m;
            exp_avg_sq[i] = v;
        }
    });
}

// ------------------------------------------------------------------
// bitsandbytes 32-bit AdamW

extern "C" void qlora_cpu_adamw_bnb32_step(float* param, float* state1, float* state2, const float* grad,
                                           float lr, float beta1, float beta2, float eps, float weight_decay,
                                           int64_t step, int64_t n) {
    const float correction1 = 1.0f - powf(beta1, (float)step);
    const float correction2 = sqrtf(1.0f - powf(beta2, (float)step));
    const float step_size = -lr * correction2 / correction1;
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
    const float decay = fmaf(-lr, weight_decay, 1.0f);
    const bool decays = weight_decay > 0.0f;
    parallel_for(n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            float g = grad[i];
            float m = fmaf(state1[i], beta1, one_minus_beta1 * g);
            float v = fmaf(state2[i], beta2, one_minus_beta2 * (g * g));
            float p = fmaf(step_size, m / fmaf(eps, correction2, sqrtf(v)), param[i]);
            if (decays) p = p * decay;
            param[i] = p;
            state1[i] = m;
            state2[i] = v;
        }
    });
}

// ------------------------------------------------------------------
// bitsandbytes 8-bit blockwise AdamW

extern "C" void qlora_cpu_adamw_bnb8_step(float* param, uint8_t* state1, uint8_t* state2, float* absmax1,
                                          float* absmax2, const float* grad, const float* qmap1,
                                          const float* qmap2, float lr, float beta1, float beta2, float eps,
                                          float weight_decay, int64_t step, int64_t blocksize, int64_t n) {
    if (n <= 0 || blocksize <= 0) return;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const float correction1 = 1.0f - powf(beta1, (float)step);
    const float correction2 = sqrtf(1.0f - powf(beta2, (float)step));
    const float step_size = (-lr * correction2) / correction1;
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
    const float decay = fmaf(-lr, weight_decay, 1.0f);
    const bool decays = weight_decay > 0.0f;
    const int64_t grain = std::max<int64_t>(1, kGrain / blocksize);
    parallel_for(nblocks, grain, [&](int64_t block_begin, int64_t block_end) {
        std::vector<float> ms((size_t)blocksize), vs((size_t)blocksize);
        for (int64_t b = block_begin; b < block_end; b++) {
            const int64_t base = b * blocksize;
            const int64_t len = std::min(blocksize, n - base);
            const float old_absmax1 = absmax1[b], old_absmax2 = absmax2[b];
            float new_absmax1 = -FLT_MAX, new_absmax2 = -FLT_MAX;
            for (int64_t j = 0; j < len; j++) {
                const int64_t i = base + j;
                const float g = grad[i];
                float m = 0.0f, v = 0.0f;
                if (is_finite(g)) {
                    v = qmap2[state2[i]] * old_absmax2;
                    v = fmaf(one_minus_beta2 * g, g, v * beta2);
                    m = qmap1[state1[i]] * old_absmax1;
                    m = fmaf(one_minus_beta1, g, m * beta1);
                }
                ms[j] = m;
                vs[j] = v;
                new_absmax1 = fmaxf(new_absmax1, fabsf(m));
                new_absmax2 = fmaxf(new_absmax2, fabsf(v));
            }
            if (len < blocksize) {
                // bnb's kernel pads the last block with g = 0 and codes 128 / 0: the padding's m is
                // qmap1[128]*absmax1*beta1 (5.5e-7 of the old scale) and takes part in the new absmax
                float pad_m = (qmap1[128] * old_absmax1) * beta1;
                new_absmax1 = fmaxf(new_absmax1, fabsf(pad_m));
                new_absmax2 = fmaxf(new_absmax2, 0.0f);
            }
            absmax1[b] = new_absmax1;
            absmax2[b] = new_absmax2;
            for (int64_t j = 0; j < len; j++) {
                const int64_t i = base + j;
                const float m = ms[j], v = vs[j];
                if (is_finite(grad[i])) {
                    float p = fmaf(step_size, m / fmaf(correction2, eps, sqrtf(v)), param[i]);
                    if (decays) p = p * decay;
                    param[i] = p;
                }
                uint8_t c1 = quantize_2d<true>(qmap1, m / new_absmax1);
                uint8_t c2 = quantize_2d<false>(qmap2, v / new_absmax2);
                // keep the sign of m: a small negative m that rounds to +0.0 (index 127) is stored as 126
                if (signbit(qmap1[c1]) != signbit(m)) c1 = (uint8_t)(m > 0.0f ? c1 + 1 : c1 - 1);
                state1[i] = c1;
                state2[i] = c2;
            }
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
