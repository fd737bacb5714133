// optim.cu: AdamW (torch, bitsandbytes 32-bit, bitsandbytes 8-bit blockwise), the gradient-norm reduction and
// clipping scale, and paged (unified-memory) states (optim.h).
//
// Bit-exactness with native/cpu/optim.cpp: both run the same code, qlora_adamw.h (the per-step scalars, computed
// on the host with the same libm, and the updates) and qlora_bnb.h (the 8-bit state codes), whose operations are
// inline PTX on the device (qlora_float.h), so --use_fast_math can neither fuse nor approximate them.
#include <limits.h>
#include <math.h>
#include <mutex>
#include <unordered_map>
#include "optim.h"
#include "kernel_utils.cuh"
#include "qlora_adamw.h"
#include "runtime.h"

using namespace qk;
namespace adamw = qlora::adamw;

namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------
// torch AdamW and bitsandbytes 32-bit AdamW: elementwise, the update of qlora_adamw.h

struct TorchStep {
    adamw::TorchScalars c;
    __device__ __forceinline__ void operator()(float& p, float& m, float& v, float g) const {
        adamw::torch_update(p, m, v, g, c);
    }
};

struct Bnb32Step {
    adamw::BnbScalars c;
    __device__ __forceinline__ void operator()(float& p, float& m, float& v, float g) const {
        adamw::bnb32_update(p, m, v, g, c);
    }
};

// float4 quads [0, nvec) (all four pointers 16-byte aligned), then the elements [4 * nvec, n) one by one
template <class Step>
__global__ void __launch_bounds__(kThreads)
    adamw_elementwise_kernel(float* param, float* state1, float* state2, const float* grad, Step step, int64_t nvec,
                             int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (int64_t i = tid; i < nvec; i += stride) {
        float4 p = reinterpret_cast<float4*>(param)[i], m = reinterpret_cast<float4*>(state1)[i];
        float4 v = reinterpret_cast<float4*>(state2)[i];
        const float4 g = reinterpret_cast<const float4*>(grad)[i];
        step(p.x, m.x, v.x, g.x);
        step(p.y, m.y, v.y, g.y);
        step(p.z, m.z, v.z, g.z);
        step(p.w, m.w, v.w, g.w);
        reinterpret_cast<float4*>(param)[i] = p;
        reinterpret_cast<float4*>(state1)[i] = m;
        reinterpret_cast<float4*>(state2)[i] = v;
    }
    for (int64_t i = nvec * 4 + tid; i < n; i += stride) {
        float p = param[i], m = state1[i], v = state2[i];
        step(p, m, v, grad[i]);
        param[i] = p;
        state1[i] = m;
        state2[i] = v;
    }
}

template <class Step>
cudaError_t launch_elementwise(float* param, float* state1, float* state2, const float* grad, const Step& step,
                               int64_t n, cudaStream_t stream) {
    const bool aligned = aligned16(param) && aligned16(state1) && aligned16(state2) && aligned16(grad);
    const int64_t nvec = aligned ? n / 4 : 0;
    const int64_t work = nvec > n - nvec * 4 ? nvec : n - nvec * 4;
    adamw_elementwise_kernel<Step>
        <<<grid_for(work, kThreads), kThreads, 0, stream>>>(param, state1, state2, grad, step, nvec, n);
    return cudaGetLastError();
}

// ------------------------------------------------------------------
// bitsandbytes 8-bit blockwise AdamW

constexpr int kMaxPerThread = 8;  // elements of a quantization block per thread: blocksize <= 8 * 256

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
__global__ void __launch_bounds__(kThreads)
    adamw_bnb8_kernel(float* param, uint8_t* state1, uint8_t* state2, float* absmax1, float* absmax2, const float* grad,
                      const float* qmap1, const float* qmap2, adamw::BnbScalars c, int64_t blocksize, int64_t n,
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
                if (ieee::is_finite(g))
                    adamw::bnb8_moments(ms[k], vs[k], g, q1[state1[i]], old_absmax1, q2[state2[i]], old_absmax2, c);
                amax1 = ieee::max(amax1, ieee::abs(ms[k]));
                amax2 = ieee::max(amax2, ieee::abs(vs[k]));
            }
        }
        // bnb pads the last block with g = 0 and codes 128 / 0; the padding's m joins the new absmax
        if (len < blocksize && threadIdx.x == 0) adamw::bnb8_pad_absmax(amax1, amax2, q1[128], old_absmax1, c);
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
                if (ieee::is_finite(gs[k])) param[i] = adamw::bnb8_param(ps[k], m, v, c);
                adamw::bnb8_codes(state1[i], state2[i], m, v, amax1, amax2, q1, q2);
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
__global__ void __launch_bounds__(kThreads)
    sum_squares_final_kernel(double* out, const double* partials, int nparts, int accumulate) {
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
    adamw::BnbScalars c;
    int64_t blocksize, n, nblocks;
};

template <int PER>
cudaError_t launch_bnb8(const Bnb8Args& a, int threads, cudaStream_t stream) {
    // a grid that fills the GPU once (each block loads the maps into shared memory once, then walks blocks)
    int per_sm = 0;
    QLORA_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, adamw_bnb8_kernel<PER>, threads, 0));
    int64_t grid = (int64_t)num_sms() * (per_sm > 0 ? per_sm : 1);
    if (grid > a.nblocks) grid = a.nblocks;
    adamw_bnb8_kernel<PER><<<(unsigned)grid, threads, 0, stream>>>(
        a.param, a.state1, a.state2, a.absmax1, a.absmax2, a.grad, a.qmap1, a.qmap2, a.c, a.blocksize, a.n, a.nblocks);
    return cudaGetLastError();
}

}  // namespace

// ------------------------------------------------------------------
// launchers

extern "C" cudaError_t qlora_cuda_adamw_torch_step(float* param, float* exp_avg, float* exp_avg_sq, const float* grad,
                                                   double lr, double beta1, double beta2, double eps,
                                                   double weight_decay, int64_t step, int64_t n, cudaStream_t stream) {
    if (n < 0) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    // the CPU's scalars (qlora_adamw.h, as qlora_cpu_adamw_torch_step)
    const TorchStep update = {adamw::torch_scalars(lr, beta1, beta2, eps, weight_decay, step)};
    return launch_elementwise(param, exp_avg, exp_avg_sq, grad, update, n, stream);
}

extern "C" cudaError_t qlora_cuda_adamw_bnb32_step(float* param, float* state1, float* state2, const float* grad,
                                                   float lr, float beta1, float beta2, float eps, float weight_decay,
                                                   int64_t step, int64_t n, cudaStream_t stream) {
    if (n < 0) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    // qlora_cpu_adamw_bnb32_step's scalars
    const Bnb32Step update = {adamw::bnb_scalars(lr, beta1, beta2, eps, weight_decay, step)};
    return launch_elementwise(param, state1, state2, grad, update, n, stream);
}

extern "C" cudaError_t qlora_cuda_adamw_bnb8_step(float* param, uint8_t* state1, uint8_t* state2, float* absmax1,
                                                  float* absmax2, const float* grad, const float* qmap1,
                                                  const float* qmap2, float lr, float beta1, float beta2, float eps,
                                                  float weight_decay, int64_t step, int64_t blocksize, int64_t n,
                                                  cudaStream_t stream) {
    if (n < 0 || blocksize < 1 || blocksize > (int64_t)kMaxPerThread * kThreads) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    // qlora_cpu_adamw_bnb8_step's scalars
    const adamw::BnbScalars c = adamw::bnb_scalars(lr, beta1, beta2, eps, weight_decay, step);
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int threads = blocksize < kThreads ? round_up_warp(blocksize) : kThreads;
    const int64_t per = (blocksize + threads - 1) / threads;
    const Bnb8Args a = {param, state1, state2, absmax1, absmax2, grad, qmap1, qmap2, c, blocksize, n, nblocks};
    if (per == 1) return launch_bnb8<1>(a, threads, stream);
    if (per == 2) return launch_bnb8<2>(a, threads, stream);
    if (per <= 4) return launch_bnb8<4>(a, threads, stream);
    return launch_bnb8<kMaxPerThread>(a, threads, stream);
}

extern "C" cudaError_t qlora_cuda_optim_sum_squares(double* out, const float* const* ptrs, const int64_t* ns, int count,
                                                    int accumulate, cudaStream_t stream) {
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

// the bytes of paged states held: they are outside the caching allocator, and memoryStats reports them beside it
static std::mutex g_paged_mutex;
static std::unordered_map<void*, size_t> g_paged;
static size_t g_paged_bytes = 0;

extern "C" size_t qlora_cuda_paged_bytes() {
    std::lock_guard<std::mutex> lock(g_paged_mutex);
    return g_paged_bytes;
}

extern "C" cudaError_t qlora_cuda_alloc_paged(void** ptr, size_t bytes) {
    *ptr = nullptr;
    if (bytes == 0) bytes = 1;
    QLORA_CUDA_TRY(cudaMallocManaged(ptr, bytes, cudaMemAttachGlobal));
    {
        std::lock_guard<std::mutex> lock(g_paged_mutex);
        g_paged[*ptr] = bytes;
        g_paged_bytes += bytes;
    }
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

extern "C" cudaError_t qlora_cuda_free_paged(void* ptr) {
    if (!ptr) return cudaSuccess;
    {
        std::lock_guard<std::mutex> lock(g_paged_mutex);
        auto it = g_paged.find(ptr);
        if (it != g_paged.end()) {
            g_paged_bytes -= it->second;
            g_paged.erase(it);
        }
    }
    return cudaFree(ptr);
}

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
