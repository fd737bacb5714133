// cross_entropy.cu: softmax cross-entropy over chunks of bf16 logits, forward, backward in place, and both fused
// (kernels.h).
//
// One block per row (V up to a few 100k). Each thread keeps an online (max, sum of exp) pair over its elements,
// 8 at a time from 16-byte loads; the pairs are merged across the block. Rows need not be 16-byte aligned: the
// first elements up to the alignment boundary and the tail are read one by one. exp is __expf (fast math) on
// x - max, so its relative error stays near 2 ulp where the terms matter; log(sum) is taken in double, as the CPU
// does. Sums and products are spelled as __fadd_rn / __fmaf_rn / __fmul_rn so that the forward, the backward and
// the fused kernel round identically (the fused result equals forward + backward bit for bit).
#include <limits.h>
#include "kernels.h"
#include "kernel_utils.cuh"
#include "../include/qlora_act.h"

using namespace qk;

namespace {

constexpr int kMaxThreads = 512;

// elements of a row before its first 16-byte boundary (the row starts at p)
__device__ __forceinline__ int64_t head_of(const void* p, int64_t len) {
    const int64_t h = (int64_t)(((16u - ((uintptr_t)p & 15u)) & 15u) >> 1);
    return h < len ? h : len;
}

constexpr int kUnroll = 4;  // 16-byte loads a thread has in flight

// calls f1(i) for single elements and f8(i, u) for the 8 elements from i (16-byte aligned, loaded into u), each
// element once; the vector loop issues kUnroll loads before it uses them
template <class F1, class F8>
__device__ __forceinline__ void walk_row(const uint16_t* x, int64_t len, int64_t head, F1&& f1, F8&& f8) {
    const int64_t nvec = (len - head) >> 3;
    const int64_t tail = head + (nvec << 3);
    const uint4* xv = reinterpret_cast<const uint4*>(x + head);
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) f1(i);
    const int64_t step = blockDim.x;
    int64_t j = threadIdx.x;
    for (; j + (kUnroll - 1) * step < nvec; j += kUnroll * step) {
        uint4 u[kUnroll];
#pragma unroll
        for (int q = 0; q < kUnroll; q++) u[q] = xv[j + q * step];
#pragma unroll
        for (int q = 0; q < kUnroll; q++) f8(head + ((j + q * step) << 3), u[q]);
    }
    for (; j < nvec; j += step) f8(head + (j << 3), xv[j]);
    for (int64_t i = tail + threadIdx.x; i < len; i += blockDim.x) f1(i);
}

// merges (m2, s2) into (m, s): s is the sum of exp(x - m) over the elements seen. Symmetric in its two operands
// (a sum of two products), so both lanes of a butterfly step get the same bits.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float M = fmaxf(m, m2);
    if (M == -INFINITY) return;  // both empty (or all -inf)
    s = __fadd_rn(__fmul_rn(s, __expf(m - M)), __fmul_rn(s2, __expf(m2 - M)));
    m = M;
}

__device__ __forceinline__ void block_merge(float& m, float& s, float* sm, float* ss) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
    __syncthreads();
    if (lane == 0) sm[warp] = m, ss[warp] = s;
    __syncthreads();
    m = lane < nwarps ? sm[lane] : -INFINITY;
    s = lane < nwarps ? ss[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
    // every thread of the block must use the same lse (the fused kernel writes gradients with each thread's copy)
    m = __shfl_sync(0xffffffffu, m, 0);
    s = __shfl_sync(0xffffffffu, s, 0);
}

// adds the values f[0..K) to the running (m, s) with one rescale (branch-free; all -inf stays (-inf, 0))
template <int K>
__device__ __forceinline__ void accumulate(float& m, float& s, const float* f) {
    float mx = m;
#pragma unroll
    for (int k = 0; k < K; k++) mx = fmaxf(mx, f[k]);
    const float ref = mx == -INFINITY ? 0.0f : mx;
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) add = __fadd_rn(add, __expf(f[k] - ref));
    s = __fmaf_rn(s, __expf(m - ref), add);
    m = mx;
}

// log-sum-exp of a row, returned to every thread of the block
__device__ __forceinline__ float row_lse(const uint16_t* x, int64_t V, float* sm, float* ss) {
    float m = -INFINITY, s = 0.0f;
    walk_row(
        x, V, head_of(x, V),
        [&](int64_t i) {
            const float v = bf16_to_f32(x[i]);
            accumulate<1>(m, s, &v);
        },
        [&](int64_t, const uint4& u) {
            float f[8];
            unpack_bf16x8(u, f);
            accumulate<8>(m, s, f);
        });
    block_merge(m, s, sm, ss);
    return m + (float)log((double)s);
}

// d[V] = (exp(x - lse) - onehot(t)) * scale as bf16, or zeros when the target is ignored; d may alias x.
// softcap > 0: x holds soft-capped logits, and the gradient is taken through the cap (times 1 - (x / cap)^2)
__device__ __forceinline__ void write_grad_row(uint16_t* d, const uint16_t* x, int64_t V, int64_t t, bool valid,
                                               float lse, float scale, float softcap) {
    if (!valid) {
        const int64_t head = head_of(d, V), nvec = (V - head) >> 3, tail = head + (nvec << 3);
        for (int64_t i = threadIdx.x; i < head; i += blockDim.x) d[i] = 0;
        for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
            reinterpret_cast<uint4*>(d + head)[j] = make_uint4(0, 0, 0, 0);
        for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) d[i] = 0;
        return;
    }
    auto grad = [&](float v, int64_t i) {
        float g = __fmul_rn(__expf(v - lse), scale);
        if (i == t) g = __fsub_rn(g, scale);
        return softcap > 0.0f ? g * qlora_act::softcap_grad(v, softcap) : g;
    };
    // the vector path needs d and x at the same offset from a 16-byte boundary
    const bool same = (((uintptr_t)d ^ (uintptr_t)x) & 15u) == 0;
    walk_row(
        x, V, same ? head_of(x, V) : V, [&](int64_t i) { d[i] = f32_to_bf16(grad(bf16_to_f32(x[i]), i)); },
        [&](int64_t i, const uint4& u) {
            float f[8];
            unpack_bf16x8(u, f);
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] = grad(f[k], i + k);
            *reinterpret_cast<uint4*>(d + i) = pack_bf16x8(f);
        });
}

// forward (FUSED: then the row's gradient in place)
template <bool FUSED>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_forward_kernel(float* loss, float* lse_out, int32_t* count, uint16_t* logits, const int32_t* targets,
                                 float scale, int64_t N, int64_t V, float softcap) {
    __shared__ float sm[32], ss[32];
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        uint16_t* x = logits + n * V;
        const float lse = row_lse(x, V, sm, ss);
        const int64_t t = targets[n];
        const bool valid = t >= 0 && t < V;
        if (threadIdx.x == 0) {
            if (lse_out) lse_out[n] = lse;
            loss[n] = valid ? lse - bf16_to_f32(x[t]) : 0.0f;
            if (valid && count) atomicAdd(count, 1);
        }
        if (FUSED) {
            __syncthreads();  // x[t] is read before the row is overwritten
            write_grad_row(x, x, V, t, valid, lse, scale, softcap);
        }
    }
}

__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_backward_kernel(uint16_t* dlogits, const uint16_t* logits, const float* lse, const int32_t* targets,
                                  float scale, int64_t N, int64_t V, float softcap) {
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        const int64_t t = targets[n];
        write_grad_row(dlogits + n * V, logits + n * V, V, t, t >= 0 && t < V, lse[n], scale, softcap);
    }
}

int threads_for(int64_t V) { return V >= 16384 ? kMaxThreads : 128; }

}  // namespace

extern "C" cudaError_t qlora_cuda_cross_entropy_forward(float* loss, float* lse, int32_t* count, const uint16_t* logits,
                                                        const int32_t* targets, int64_t N, int64_t V,
                                                        cudaStream_t stream) {
    if (N < 0 || V <= 0) return N == 0 ? cudaSuccess : cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    const unsigned grid = (unsigned)(N < INT_MAX ? N : INT_MAX);
    cross_entropy_forward_kernel<false><<<grid, threads_for(V), 0, stream>>>(
        loss, lse, count, const_cast<uint16_t*>(logits), targets, 0.0f, N, V, 0.0f);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_cross_entropy_backward(uint16_t* dlogits, const uint16_t* logits, const float* lse,
                                                         const int32_t* targets, float dloss_scale, int64_t N,
                                                         int64_t V, float softcap, cudaStream_t stream) {
    if (N < 0 || V <= 0) return N == 0 ? cudaSuccess : cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    const unsigned grid = (unsigned)(N < INT_MAX ? N : INT_MAX);
    cross_entropy_backward_kernel<<<grid, threads_for(V), 0, stream>>>(dlogits, logits, lse, targets, dloss_scale, N, V,
                                                                       softcap);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_cross_entropy_fused(float* loss, float* lse, int32_t* count, uint16_t* logits,
                                                      const int32_t* targets, float dloss_scale, int64_t N, int64_t V,
                                                      float softcap, cudaStream_t stream) {
    if (N < 0 || V <= 0) return N == 0 ? cudaSuccess : cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    const unsigned grid = (unsigned)(N < INT_MAX ? N : INT_MAX);
    cross_entropy_forward_kernel<true>
        <<<grid, threads_for(V), 0, stream>>>(loss, lse, count, logits, targets, dloss_scale, N, V, softcap);
    return cudaGetLastError();
}
