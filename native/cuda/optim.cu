// optim.cu: AdamW (torch, bitsandbytes 32-bit, bitsandbytes 8-bit blockwise), the gradient-norm reduction and
// clipping scale, and paged (unified-memory) states (optim.h).
//
// Bit-exactness with native/cpu/optim.cpp: the host computes the per-step scalars with the CPU's expressions (the
// same libm), and the kernels spell every device operation as an ieee:: call (kernel_utils.cuh), in the CPU's
// order, with its explicit fmaf where the CPU has one and nowhere else.
#include <limits.h>
#include <math.h>
#include "optim.h"
#include "kernel_utils.cuh"
#include "runtime.h"

using namespace qk;

namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------
// torch AdamW

struct TorchScalars {
    float decay, w1, b2, w2, neg_step_size, bc2_sqrt, eps;
    bool decays;
};

__device__ __forceinline__ void torch_update(float& p, float& m, float& v, float g, const TorchScalars& c) {
    if (c.decays) p = ieee::mul(p, c.decay);
    m = ieee::fma(c.w1, ieee::sub(g, m), m);                      // exp_avg.lerp_(grad, 1 - beta1)
    v = ieee::mul(v, c.b2);                                       // exp_avg_sq.mul_(beta2)
    v = ieee::add(v, ieee::mul(ieee::mul(c.w2, g), g));           //   .addcmul_(grad, grad, 1 - beta2)
    const float denom = ieee::add(ieee::div(ieee::sqrt(v), c.bc2_sqrt), c.eps);
    p = ieee::add(p, ieee::div(ieee::mul(c.neg_step_size, m), denom));  // addcdiv_
}

__global__ void __launch_bounds__(kThreads) adamw_torch_kernel(float* param, float* exp_avg, float* exp_avg_sq,
                                                               const float* grad, TorchScalars c, int64_t nvec,
                                                               int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (int64_t i = tid; i < nvec; i += stride) {
        float4 p = reinterpret_cast<float4*>(param)[i], m = reinterpret_cast<float4*>(exp_avg)[i];
        float4 v = reinterpret_cast<float4*>(exp_avg_sq)[i];
        const float4 g = reinterpret_cast<const float4*>(grad)[i];
        torch_update(p.x, m.x, v.x, g.x, c);
        torch_update(p.y, m.y, v.y, g.y, c);
        torch_update(p.z, m.z, v.z, g.z, c);
        torch_update(p.w, m.w, v.w, g.w, c);
        reinterpret_cast<float4*>(param)[i] = p;
        reinterpret_cast<float4*>(exp_avg)[i] = m;
        reinterpret_cast<float4*>(exp_avg_sq)[i] = v;
    }
    for (int64_t i = nvec * 4 + tid; i < n; i += stride) {
        float p = param[i], m = exp_avg[i], v = exp_avg_sq[i];
        torch_update(p, m, v, grad[i], c);
        param[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}

// ------------------------------------------------------------------
// bitsandbytes 32-bit AdamW

struct Bnb32Scalars {
    float step_size, correction2, eps, beta1, beta2, one_minus_beta1, one_minus_beta2, decay;
    bool decays;
};

__device__ __forceinline__ void bnb32_update(float& p, float& m, float& v, float g, const Bnb32Scalars& c) {
    m = ieee::fma(m, c.beta1, ieee::mul(c.one_minus_beta1, g));
    v = ieee::fma(v, c.beta2, ieee::mul(c.one_minus_beta2, ieee::mul(g, g)));
    p = ieee::fma(c.step_size, ieee::div(m, ieee::fma(c.eps, c.correction2, ieee::sqrt(v))), p);
    if (c.decays) p = ieee::mul(p, c.decay);
}

__global__ void __launch_bounds__(kThreads) adamw_bnb32_kernel(float* param, float* state1, float* state2,
                                                               const float* grad, Bnb32Scalars c, int64_t nvec,
                                                               int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (int64_t i = tid; i < nvec; i += stride) {
        float4 p = reinterpret_cast<float4*>(param)[i], m = reinterpret_cast<float4*>(state1)[i];
        float4 v = reinterpret_cast<float4*>(state2)[i];
        const float4 g = reinterpret_cast<const float4*>(grad)[i];
        bnb32_update(p.x, m.x, v.x, g.x, c);
        bnb32_update(p.y, m.y, v.y, g.y, c);
        bnb32_update(p.z, m.z, v.z, g.z, c);
        bnb32_update(p.w, m.w, v.w, g.w, c);
        reinterpret_cast<float4*>(param)[i] = p;
        reinterpret_cast<float4*>(state1)[i] = m;
        reinterpret_cast<float4*>(state2)[i] = v;
    }
    for (int64_t i = nvec * 4 + tid; i < n; i += stride) {
        float p = param[i], m = state1[i], v = state2[i];
        bnb32_update(p, m, v, grad[i], c);
        param[i] = p;
        state1[i] = m;
        state2[i] = v;
    }
}

// ------------------------------------------------------------------
// bitsandbytes 8-bit blockwise AdamW

constexpr int kMaxPerThread = 8;  // elements of a quantization block per thread: blocksize <= 8 * 256

struct Bnb8Scalars {
    float step_size, correction2, eps, beta1, beta2, one_minus_beta1, one_minus_beta2, decay;
    bool decays;
};

// bnb's quantize_2D<SIGNED>: a 7-step binary search from index 127, then the midpoint to the neighbour on the side
// x lies (see native/cpu/optim.cpp); a NaN walks down to index 0
template <bool SIGNED>
__device__ __forceinline__ uint8_t quantize_2d(const float* code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = SIGNED ? -1.0f : 0.0f, upper = 1.0f;
    float val = code[127];
#pragma unroll
    for (int i = 64; i > 0; i >>= 1) {
        if (ieee::gt(x, val)) {
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
    if (ieee::gt(x, val)) {
        const float midpoint = ieee::mul(ieee::add(upper, val), 0.5f);
        return (uint8_t)(ieee::gt(x, midpoint) ? upper_pivot : pivot);
    }
    const float midpoint = ieee::mul(ieee::add(lower, val), 0.5f);
    return (uint8_t)(ieee::lt(x, midpoint) ? lower_pivot : pivot);
}

// the block-wide maxima of a and b, returned to every thread
__device__ __forceinline__ void block_max2(float& a, float& b, float* ra, float* rb) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    a = warp_max(a);
    b = warp_max(b);
    __syncthreads();  // the previous block's maxima are no longer read
    if (lane == 0) ra[warp] = a, rb[warp] = b;
    __syncthreads();
    a = warp_max(lane < nwarps ? ra[lane] : -FLT_MAX);
    b = warp_max(lane < nwarps ? rb[lane] : -FLT_MAX);
}

// grid-stride over quantization blocks; element j of a block is handled by thread j % blockDim.x (coalesced),
// PER elements a thread (blocksize <= PER * blockDim.x)
template <int PER>
__global__ void __launch_bounds__(kThreads) adamw_bnb8_kernel(float* param, uint8_t* state1, uint8_t* state2,
                                                              float* absmax1, float* absmax2, const float* grad,
                                                              const float* qmap1, const float* qmap2,
                                                              Bnb8Scalars c, int64_t blocksize, int64_t n,
                                                              int64_t nblocks) {
    __shared__ float q1[256], q2[256];
    __shared__ float red1[32], red2[32];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        q1[i] = qmap1[i];
        q2[i] = qmap2[i];
    }
    __syncthreads();
    for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const int64_t base = b * blocksize;
        const int64_t len = blocksize < n - base ? blocksize : n - base;
        const float old_absmax1 = absmax1[b], old_absmax2 = absmax2[b];
        float ms[PER], vs[PER], gs[PER], ps[PER];
        float amax1 = -FLT_MAX, amax2 = -FLT_MAX;
#pragma unroll
        for (int k = 0; k < PER; k++) {
            ms[k] = 0.0f, vs[k] = 0.0f, gs[k] = 0.0f, ps[k] = 0.0f;
            const int64_t j = (int64_t)k * blockDim.x + threadIdx.x;
            if (j < len) {
                const int64_t i = base + j;
                const float g = grad[i];
                gs[k] = g;
                ps[k] = param[i];  // loaded early: more loads in flight before the block-wide max
                if (ieee::is_finite(g)) {
                    float v = ieee::mul(q2[state2[i]], old_absmax2);
                    vs[k] = ieee::fma(ieee::mul(c.one_minus_beta2, g), g, ieee::mul(v, c.beta2));
                    float m = ieee::mul(q1[state1[i]], old_absmax1);
                    ms[k] = ieee::fma(c.one_minus_beta1, g, ieee::mul(m, c.beta1));
                }
                amax1 = ieee::max(amax1, ieee::abs(ms[k]));
                amax2 = ieee::max(amax2, ieee::abs(vs[k]));
            }
        }
        if (len < blocksize && threadIdx.x == 0) {
            // bnb pads the last block with g = 0 and codes 128 / 0; the padding's m joins the new absmax
            const float pad_m = ieee::mul(ieee::mul(q1[128], old_absmax1), c.beta1);
            amax1 = ieee::max(amax1, ieee::abs(pad_m));
            amax2 = ieee::max(amax2, 0.0f);
        }
        block_max2(amax1, amax2, red1, red2);  // (also orders every read of the old absmax before the write below)
        if (threadIdx.x == 0) {
            absmax1[b] = amax1;
            absmax2[b] = amax2;
        }
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const int64_t j = (int64_t)k * blockDim.x + threadIdx.x;
            if (j < len) {
                const int64_t i = base + j;
                const float m = ms[k], v = vs[k];
                if (ieee::is_finite(gs[k])) {
                    float p = ieee::fma(c.step_size, ieee::div(m, ieee::fma(c.correction2, c.eps, ieee::sqrt(v))),
                                        ps[k]);
                    if (c.decays) p = ieee::mul(p, c.decay);
                    param[i] = p;
                }
                uint8_t c1 = quantize_2d<true>(q1, ieee::div(m, amax1));
                const uint8_t c2 = quantize_2d<false>(q2, ieee::div(v, amax2));
                // keep the sign of m: a small negative m that rounds to +0.0 (index 127) is stored as 126
                if (ieee::sign_bit(q1[c1]) != ieee::sign_bit(m)) c1 = (uint8_t)(ieee::gt(m, 0.0f) ? c1 + 1 : c1 - 1);
                state1[i] = c1;
                state2[i] = c2;
            }
        }
    }
}

// ------------------------------------------------------------------
// gradient norm and clipping

constexpr int kMaxBuffers = 64;  // buffers per launch (the list travels as a kernel parameter, ~1 KiB)

struct BufferList {
    float* ptr[kMaxBuffers];
    int64_t n[kMaxBuffers];
    int count;
};

__global__ void __launch_bounds__(kThreads) sum_squares_partial_kernel(BufferList list, double* partials) {
    __shared__ double scratch[32];
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    double acc = 0.0;
    for (int b = 0; b < list.count; b++) {
        const float* x = list.ptr[b];
        const int64_t n = list.n[b];
        const int64_t nvec = aligned16(x) ? n / 4 : 0;
        for (int64_t i = tid; i < nvec; i += stride) {
            const float4 v = reinterpret_cast<const float4*>(x)[i];
            // a float's square is exact in double, so fusing the add into an fma changes nothing
            acc += (double)v.x * (double)v.x;
            acc += (double)v.y * (double)v.y;
            acc += (double)v.z * (double)v.z;
            acc += (double)v.w * (double)v.w;
        }
        for (int64_t i = nvec * 4 + tid; i < n; i += stride) acc += (double)x[i] * (double)x[i];
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// one block: sums the partials in a fixed order
__global__ void __launch_bounds__(kThreads) sum_squares_final_kernel(double* out, const double* partials,
                                                                     int nparts, int accumulate) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = accumulate ? out[0] + acc : acc;
}

__global__ void __launch_bounds__(kThreads) clip_scale_kernel(BufferList list, const double* sumsq, double max_norm) {
    // torch clip_grad_norm_ as src/optim/clip.ts computes it: Math.fround(maxNorm / Math.fround(Math.fround(norm)
    // + 1e-6)), in double with float roundings
    const double norm = __dsqrt_rn(sumsq[0]);
    const float denom = __double2float_rn(__dadd_rn((double)__double2float_rn(norm), 1e-6));
    const float coef = __double2float_rn(__ddiv_rn(max_norm, (double)denom));
    if (!(coef < 1.0f)) return;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (int b = 0; b < list.count; b++) {
        float* x = list.ptr[b];
        const int64_t n = list.n[b];
        const int64_t nvec = aligned16(x) ? n / 4 : 0;
        for (int64_t i = tid; i < nvec; i += stride) {
            float4 v = reinterpret_cast<float4*>(x)[i];
            v.x = ieee::mul(v.x, coef), v.y = ieee::mul(v.y, coef), v.z = ieee::mul(v.z, coef);
            v.w = ieee::mul(v.w, coef);
            reinterpret_cast<float4*>(x)[i] = v;
        }
        for (int64_t i = nvec * 4 + tid; i < n; i += stride) x[i] = ieee::mul(x[i], coef);
    }
}

__global__ void __launch_bounds__(kThreads) scale_kernel(float* x, float s, int64_t nvec, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (int64_t i = tid; i < nvec; i += stride) {
        float4 v = reinterpret_cast<float4*>(x)[i];
        v.x = ieee::mul(v.x, s), v.y = ieee::mul(v.y, s), v.z = ieee::mul(v.z, s), v.w = ieee::mul(v.w, s);
        reinterpret_cast<float4*>(x)[i] = v;
    }
    for (int64_t i = nvec * 4 + tid; i < n; i += stride) x[i] = ieee::mul(x[i], s);
}

// fills a BufferList with buffers [first, first + count) of the host arrays; false on a bad size
bool make_list(BufferList& list, float* const* ptrs, const int64_t* ns, int first, int count, int64_t& largest) {
    list.count = count;
    for (int b = 0; b < count; b++) {
        if (ns[first + b] < 0) return false;
        list.ptr[b] = ptrs[first + b];
        list.n[b] = ns[first + b];
        if (list.n[b] > largest) largest = list.n[b];
    }
    return true;
}

struct Bnb8Args {
    float* param;
    uint8_t* state1;
    uint8_t* state2;
    float* absmax1;
    float* absmax2;
    const float* grad;
    const float* qmap1;
    const float* qmap2;
    Bnb8Scalars c;
    int64_t blocksize, n, nblocks;
};

template <int PER>
cudaError_t launch_bnb8(const Bnb8Args& a, int threads, cudaStream_t stream) {
    // a grid that fills the GPU once (each block loads the maps into shared memory once, then walks blocks)
    int per_sm = 0;
    QLORA_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, adamw_bnb8_kernel<PER>, threads, 0));
    int64_t grid = (int64_t)num_sms() * (per_sm > 0 ? per_sm : 1);
    if (grid > a.nblocks) grid = a.nblocks;
    adamw_bnb8_kernel<PER><<<(unsigned)grid, threads, 0, stream>>>(a.param, a.state1, a.state2, a.absmax1, a.absmax2,
                                                                   a.grad, a.qmap1, a.qmap2, a.c, a.blocksize, a.n,
                                                                   a.nblocks);
    return cudaGetLastError();
}

}  // namespace

// ------------------------------------------------------------------
// launchers

extern "C" cudaError_t qlora_cuda_adamw_torch_step(float* param, float* exp_avg, float* exp_avg_sq,
                                                   const float* grad, double lr, double beta1, double beta2,
                                                   double eps, double weight_decay, int64_t step, int64_t n,
                                                   cudaStream_t stream) {
    if (n < 0) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    // the CPU's scalars, expression for expression (qlora_cpu_adamw_torch_step)
    const double bc1 = 1.0 - pow(beta1, (double)step);
    const double bc2 = 1.0 - pow(beta2, (double)step);
    volatile double lr_wd = lr * weight_decay;  // never contracted into an fma with the subtraction
    TorchScalars c;
    c.decay = (float)(1.0 - lr_wd);
    c.w1 = (float)(1.0 - beta1);
    c.b2 = (float)beta2;
    c.w2 = (float)(1.0 - beta2);
    c.neg_step_size = (float)(-(lr / bc1));
    c.bc2_sqrt = (float)pow(bc2, 0.5);
    c.eps = (float)eps;
    c.decays = weight_decay != 0.0;
    const bool aligned = aligned16(param) && aligned16(exp_avg) && aligned16(exp_avg_sq) && aligned16(grad);
    const int64_t nvec = aligned ? n / 4 : 0;
    const int64_t work = nvec > n - nvec * 4 ? nvec : n - nvec * 4;
    adamw_torch_kernel<<<grid_for(work, kThreads), kThreads, 0, stream>>>(param, exp_avg, exp_avg_sq, grad, c, nvec,
                                                                          n);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_adamw_bnb32_step(float* param, float* state1, float* state2, const float* grad,
                                                   float lr, float beta1, float beta2, float eps,
                                                   float weight_decay, int64_t step, int64_t n,
                                                   cudaStream_t stream) {
    if (n < 0) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    // qlora_cpu_adamw_bnb32_step's scalars
    const float correction1 = 1.0f - powf(beta1, (float)step);
    const float correction2 = sqrtf(1.0f - powf(beta2, (float)step));
    Bnb32Scalars c;
    c.step_size = -lr * correction2 / correction1;
    c.correction2 = correction2;
    c.eps = eps;
    c.beta1 = beta1;
    c.beta2 = beta2;
    c.one_minus_beta1 = 1.0f - beta1;
    c.one_minus_beta2 = 1.0f - beta2;
    c.decay = fmaf(-lr, weight_decay, 1.0f);
    c.decays = weight_decay > 0.0f;
    const bool aligned = aligned16(param) && aligned16(state1) && aligned16(state2) && aligned16(grad);
    const int64_t nvec = aligned ? n / 4 : 0;
    const int64_t work = nvec > n - nvec * 4 ? nvec : n - nvec * 4;
    adamw_bnb32_kernel<<<grid_for(work, kThreads), kThreads, 0, stream>>>(param, state1, state2, grad, c, nvec, n);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_adamw_bnb8_step(float* param, uint8_t* state1, uint8_t* state2, float* absmax1,
                                                  float* absmax2, const float* grad, const float* qmap1,
                                                  const float* qmap2, float lr, float beta1, float beta2, float eps,
                                                  float weight_decay, int64_t step, int64_t blocksize, int64_t n,
                                                  cudaStream_t stream) {
    if (n < 0 || blocksize < 1 || blocksize > (int64_t)kMaxPerThread * kThreads) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    // qlora_cpu_adamw_bnb8_step's scalars
    const float correction1 = 1.0f - powf(beta1, (float)step);
    const float correction2 = sqrtf(1.0f - powf(beta2, (float)step));
    Bnb8Scalars c;
    c.step_size = (-lr * correction2) / correction1;
    c.correction2 = correction2;
    c.eps = eps;
    c.beta1 = beta1;
    c.beta2 = beta2;
    c.one_minus_beta1 = 1.0f - beta1;
    c.one_minus_beta2 = 1.0f - beta2;
    c.decay = fmaf(-lr, weight_decay, 1.0f);
    c.decays = weight_decay > 0.0f;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int threads = blocksize < kThreads ? round_up_warp(blocksize) : kThreads;
    const int64_t per = (blocksize + threads - 1) / threads;
    const Bnb8Args a = {param, state1, state2, absmax1, absmax2, grad, qmap1, qmap2, c, blocksize, n, nblocks};
    if (per == 1) return launch_bnb8<1>(a, threads, stream);
    if (per == 2) return launch_bnb8<2>(a, threads, stream);
    if (per <= 4) return launch_bnb8<4>(a, threads, stream);
    return launch_bnb8<kMaxPerThread>(a, threads, stream);
}

extern "C" cudaError_t qlora_cuda_optim_sum_squares(double* out, const float* const* ptrs, const int64_t* ns,
                                                    int count, int accumulate, cudaStream_t stream) {
    if (count < 0) return cudaErrorInvalidValue;
    const int grid = num_sms() * 4;
    cudaError_t err = cudaSuccess;
    double* partials = (double*)qlora_cuda::device_alloc((size_t)grid * sizeof(double), &err);
    if (!partials) return err;
    int first = 0;
    do {  // at least once, so that count == 0 still writes out[0] = 0 (or leaves the accumulated value)
        const int chunk = count - first < kMaxBuffers ? count - first : kMaxBuffers;
        BufferList list;
        int64_t largest = 0;
        if (!make_list(list, const_cast<float* const*>(ptrs), ns, first, chunk, largest)) {
            err = cudaErrorInvalidValue;
            break;
        }
        sum_squares_partial_kernel<<<grid, kThreads, 0, stream>>>(list, partials);
        sum_squares_final_kernel<<<1, kThreads, 0, stream>>>(out, partials, grid, accumulate || first > 0);
        err = cudaGetLastError();
        first += chunk;
    } while (err == cudaSuccess && first < count);
    qlora_cuda::device_free(partials);  // stream-ordered reuse: later work on the stream runs after these kernels
    return err;
}

extern "C" cudaError_t qlora_cuda_optim_clip_scale(float* const* ptrs, const int64_t* ns, int count,
                                                   const double* sumsq, double max_norm, cudaStream_t stream) {
    if (count < 0) return cudaErrorInvalidValue;
    if (!(max_norm > 0.0)) return cudaSuccess;
    for (int first = 0; first < count; first += kMaxBuffers) {
        const int chunk = count - first < kMaxBuffers ? count - first : kMaxBuffers;
        BufferList list;
        int64_t largest = 0;
        if (!make_list(list, ptrs, ns, first, chunk, largest)) return cudaErrorInvalidValue;
        if (largest == 0) continue;
        clip_scale_kernel<<<grid_for((largest + 3) / 4, kThreads), kThreads, 0, stream>>>(list, sumsq, max_norm);
        QLORA_CUDA_TRY(cudaGetLastError());
    }
    return cudaSuccess;
}

extern "C" cudaError_t qlora_cuda_optim_scale(float* x, float s, int64_t n, cudaStream_t stream) {
    if (n < 0) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    const int64_t nvec = aligned16(x) ? n / 4 : 0;
    const int64_t work = nvec > n - nvec * 4 ? nvec : n - nvec * 4;
    scale_kernel<<<grid_for(work, kThreads), kThreads, 0, stream>>>(x, s, nvec, n);
    return cudaGetLastError();
}

// ------------------------------------------------------------------
// paged states

static bool concurrent_managed_access(int* device) {
    int dev = 0, concurrent = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (device) *device = dev;
    if (cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, dev) != cudaSuccess) return false;
    return concurrent != 0;
}

extern "C" cudaError_t qlora_cuda_alloc_paged(void** ptr, size_t bytes) {
    *ptr = nullptr;
    if (bytes == 0) bytes = 1;
    QLORA_CUDA_TRY(cudaMallocManaged(ptr, bytes, cudaMemAttachGlobal));
    int dev = 0;
    if (concurrent_managed_access(&dev)) {
        // best effort: the memory works without the advice
#if CUDART_VERSION >= 13000
        cudaMemLocation loc = {};
        loc.type = cudaMemLocationTypeDevice;
        loc.id = dev;
        if (cudaMemAdvise(*ptr, bytes, cudaMemAdviseSetPreferredLocation, loc) != cudaSuccess) cudaGetLastError();
#else
        if (cudaMemAdvise(*ptr, bytes, cudaMemAdviseSetPreferredLocation, dev) != cudaSuccess) cudaGetLastError();
#endif
    }
    return cudaSuccess;
}

extern "C" cudaError_t qlora_cuda_free_paged(void* ptr) { return ptr ? cudaFree(ptr) : cudaSuccess; }

extern "C" cudaError_t qlora_cuda_prefetch_paged(const void* ptr, size_t bytes, int to_device, cudaStream_t stream) {
    int dev = 0;
    if (!ptr || bytes == 0 || !concurrent_managed_access(&dev)) return cudaSuccess;
#if CUDART_VERSION >= 13000
    cudaMemLocation loc = {};
    loc.type = to_device ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
    loc.id = to_device ? dev : 0;
    return cudaMemPrefetchAsync(ptr, bytes, loc, 0, stream);
#else
    return cudaMemPrefetchAsync(ptr, bytes, to_device ? dev : cudaCpuDeviceId, stream);
#endif
}
