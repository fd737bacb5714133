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
#include <vector>
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

extern "C" void qlora_cpu_adamw_bnb8_step(float* param, uint8_t* state1, uint8_t* state2, float* absmax1,
                                          float* absmax2, const float* grad, const float* qmap1, const float* qmap2,
                                          float lr, float beta1, float beta2, float eps, float weight_decay,
                                          int64_t step, int64_t blocksize, int64_t n) {
    if (n <= 0 || blocksize <= 0) return;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const adamw::BnbScalars scalars = adamw::bnb_scalars(lr, beta1, beta2, eps, weight_decay, step);
    // a block's update is its own (absmax, 8-bit codes), so any split gives the same bits; a LoRA tensor has a few
    // dozen blocks, and kGrain / blocksize would run each on one thread (bench:train-cpu, tiny-qwen2: 37 -> 20 ms a
    // step)
    const int64_t grain = std::max<int64_t>(1, kBlockwiseGrain / blocksize);
    parallel_for(nblocks, grain, [&](int64_t block_begin, int64_t block_end) {
        const adamw::BnbScalars c = scalars;
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
                if (ieee::is_finite(g))
                    adamw::bnb8_moments(m, v, g, qmap1[state1[i]], old_absmax1, qmap2[state2[i]], old_absmax2, c);
                ms[j] = m;
                vs[j] = v;
                new_absmax1 = ieee::max(new_absmax1, ieee::abs(m));
                new_absmax2 = ieee::max(new_absmax2, ieee::abs(v));
            }
            if (len < blocksize) adamw::bnb8_pad_absmax(new_absmax1, new_absmax2, qmap1[128], old_absmax1, c);
            absmax1[b] = new_absmax1;
            absmax2[b] = new_absmax2;
            for (int64_t j = 0; j < len; j++) {
                const int64_t i = base + j;
                const float m = ms[j], v = vs[j];
                if (ieee::is_finite(grad[i])) param[i] = adamw::bnb8_param(param[i], m, v, c);
                adamw::bnb8_codes(state1[i], state2[i], m, v, new_absmax1, new_absmax2, qmap1, qmap2);
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
