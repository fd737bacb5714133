// sampling.cu: the next token of each row of logits, chosen on the device (kernels.h qlora_cuda_pick_tokens_f32),
// so that only R token ids cross to the host. The CPU reference is src/backend/sampling.ts; the two compute the
// same integers:
//   s = x / temperature (f32, rounded), weights q = floor(f32(exp(s - max)) * 2^31) (exp in double: --use_fast_math
//   would make expf an approximation), top-k keeps s >= the k-th largest s, top-p keeps q >= the largest cut whose
//   weights reach ceil(top_p * total), and the draw r = floor(u * kept / 2^32) picks the token where the running
//   sum of kept weights in token order passes r. Every sum is of integers, so no order of addition changes it.
// One block of 1024 threads per row. The k-th largest value and the top-p cut are found by a radix select over
// 32-bit keys (four passes of 8 bits, a histogram of counts or of weights in shared memory).
#include <limits.h>
#include <math.h>
#include "kernels.h"
#include "kernel_utils.cuh"

using namespace qk;

namespace {

constexpr int kThreads = 1024;
constexpr int kParams = 5;
typedef unsigned long long u64;

// a float's bits as an unsigned key of the same order
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// the block's sum, returned to every thread (scratch: 32 values)
__device__ __forceinline__ u64 block_sum_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_u64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum_u64(lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0ull);
}

// the first index of the largest finite value, and the number of non-finite values, to every thread
__device__ void row_argmax(const float* row, int64_t V, float& best, int& idx, int& nbad, float* s_best, int* s_idx,
                           int* s_bad) {
    best = -INFINITY;
    idx = INT_MAX;
    nbad = 0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = row[i];
        if (!isfinite(v))
            nbad++;
        else if (v > best) {  // a thread's indices increase: the first of equal values is kept
            best = v;
            idx = (int)i;
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int round = 0; round < 2; round++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_down_sync(0xffffffffu, best, o);
            const int oi = __shfl_down_sync(0xffffffffu, idx, o), ob = __shfl_down_sync(0xffffffffu, nbad, o);
            if (ov > best || (ov == best && oi < idx)) {
                best = ov;
                idx = oi;
            }
            nbad += ob;
        }
        __syncthreads();
        if (round == 0) {
            if (lane == 0) {
                s_best[warp] = best;
                s_idx[warp] = idx;
                s_bad[warp] = nbad;
            }
            __syncthreads();
            best = lane < warps ? s_best[lane] : -INFINITY;
            idx = lane < warps ? s_idx[lane] : INT_MAX;
            nbad = lane < warps ? s_bad[lane] : 0;
        } else {
            if (threadIdx.x == 0) {
                s_best[0] = best;
                s_idx[0] = idx;
                s_bad[0] = nbad;
            }
            __syncthreads();
            best = s_best[0];
            idx = s_idx[0];
            nbad = s_bad[0];
        }
    }
}

struct SelectScratch {
    u64 hist[256];
    u64 need;
    uint32_t prefix;
};

// the largest key t such that the weights of the elements with key >= t add up to at least `need` (<= their total):
// a descending radix select. key(i) and weight(i) (0: not counted) are recomputed each pass.
template <class KeyOf, class WeightOf>
__device__ uint32_t select_desc(int64_t V, KeyOf key_of, WeightOf weight_of, u64 need, SelectScratch& sc) {
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) sc.hist[b] = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
            const u64 w = weight_of(i);
            if (!w) continue;
            const uint32_t k = key_of(i);
            if ((k & mask) == prefix) atomicAdd(&sc.hist[(k >> shift) & 255u], w);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u64 above = 0;
            int b = 255;
            for (; b > 0; b--) {
                if (above + sc.hist[b] >= need) break;
                above += sc.hist[b];
            }
            sc.need = need - above;
            sc.prefix = prefix | ((uint32_t)b << shift);
        }
        __syncthreads();
        need = sc.need;
        prefix = sc.prefix;
        mask |= 255u << shift;
        __syncthreads();
    }
    return prefix;
}

__global__ void repetition_penalty_kernel(float* __restrict__ x, int64_t V, const int32_t* __restrict__ params,
                                          const int32_t* __restrict__ entries, int64_t E) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= E) return;
    const int64_t r = entries[i], t = entries[E + i];
    if (t < 0 || t >= V) return;
    const float p = __int_as_float(params[r * kParams + 4]);
    float* v = x + r * V + t;
    *v = *v < 0.f ? __fmul_rn(*v, p) : __fdiv_rn(*v, p);
}

__global__ void __launch_bounds__(kThreads)
    pick_tokens_kernel(const float* __restrict__ x, int64_t V, const int32_t* __restrict__ params,
                       int32_t* __restrict__ out, int32_t* __restrict__ bad) {
    const float* row = x + (int64_t)blockIdx.x * V;
    const int32_t* p = params + (int64_t)blockIdx.x * kParams;
    const float temperature = __int_as_float(p[0]), top_p = __int_as_float(p[2]);
    const int64_t top_k = p[1];
    const uint32_t u = (uint32_t)p[3];

    __shared__ float s_best[32];
    __shared__ int s_idx[32], s_bad[32];
    __shared__ u64 s_sum[32];
    __shared__ u64 s_scan[kThreads];
    __shared__ SelectScratch sc;

    float best;
    int idx, nbad;
    row_argmax(row, V, best, idx, nbad, s_best, s_idx, s_bad);
    if (temperature == 0.f || nbad > 0) {
        if (threadIdx.x == 0) {
            out[blockIdx.x] = idx == INT_MAX ? 0 : idx;
            if (nbad) atomicAdd(bad, nbad);
        }
        return;
    }
    // division by a positive number keeps the order: the largest scaled value is the argmax's
    const float smax = __fdiv_rn(best, temperature);
    auto scaled = [&](int64_t i) { return __fdiv_rn(row[i], temperature); };

    uint32_t kth = 0;  // every finite key is above 0
    if (top_k > 0 && top_k < V)
        kth = select_desc(
            V, [&](int64_t i) { return order_key(scaled(i)); }, [&](int64_t) { return 1ull; }, (u64)top_k, sc);
    auto weight = [&](int64_t i) -> u64 {
        const float s = scaled(i);
        if (order_key(s) < kth) return 0ull;
        const float w = __double2float_rn(exp((double)__fsub_rn(s, smax)));
        return (u64)__fmul_rn(w, 2147483648.f);  // exact (a power of two); the cast floors
    };

    uint32_t cut = 0;
    if (top_p < 1.f) {
        u64 total = 0;
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) total += weight(i);
        total = block_sum_u64(total, s_sum);
        const u64 need = (u64)ceil((double)top_p * (double)total);
        cut = select_desc(
            V, [&](int64_t i) { return (uint32_t)weight(i); }, weight, need, sc);
    }
    auto kept = [&](int64_t i) -> u64 {
        const u64 w = weight(i);
        return w >= cut ? w : 0ull;
    };

    // each thread owns a contiguous chunk of tokens: the chunks' sums, scanned in order, locate the draw
    const int64_t chunk = (V + blockDim.x - 1) / blockDim.x;
    const int64_t lo = min((int64_t)threadIdx.x * chunk, V), hi = min(lo + chunk, V);
    u64 mine = 0;
    for (int64_t i = lo; i < hi; i++) mine += kept(i);
    s_scan[threadIdx.x] = mine;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {  // inclusive scan (Hillis-Steele)
        const u64 add = threadIdx.x >= o ? s_scan[threadIdx.x - o] : 0ull;
        __syncthreads();
        s_scan[threadIdx.x] += add;
        __syncthreads();
    }
    const u64 total = s_scan[blockDim.x - 1];
    // floor(u * total / 2^32) without overflow: total < 2^53
    const u64 r = (u64)u * (total >> 32) + (((u64)u * (total & 0xffffffffull)) >> 32);
    const u64 before = s_scan[threadIdx.x] - mine;
    if (r >= before && r < before + mine) {
        u64 acc = before;
        for (int64_t i = lo; i < hi; i++) {
            acc += kept(i);
            if (acc > r) {
                out[blockIdx.x] = (int32_t)i;
                return;
            }
        }
    }
}

}  // namespace

extern "C" cudaError_t qlora_cuda_pick_tokens_f32(float* x, int64_t R, int64_t V, const int32_t* params,
                                                  const int32_t* entries, int64_t E, int32_t* out, int32_t* bad,
                                                  cudaStream_t stream) {
    if (R == 0) return cudaSuccess;
    if (R > INT32_MAX || V > INT32_MAX || V < 1 || E < 0) return cudaErrorInvalidValue;
    if (E > 0) {
        repetition_penalty_kernel<<<(unsigned)((E + 255) / 256), 256, 0, stream>>>(x, V, params, entries, E);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    pick_tokens_kernel<<<(unsigned)R, kThreads, 0, stream>>>(x, V, params, out, bad);
    return cudaGetLastError();
}
