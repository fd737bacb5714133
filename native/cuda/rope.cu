// rope.cu: rotary position embedding, rotate-half layout, forward and backward (kernels.h).
//
// One block per token: the block computes cos/sin of the token's R/2 angles into shared memory once, then rotates
// every head. Only the first R dimensions of a head rotate (pairs (i, i + R/2)); with R < D (partial rotary, Phi-3)
// the rest pass through, copied when the output is not the input. The angle is the f32 product pos * inv_freq[i] (what
// transformers computes) and its cos/sin are evaluated in double and rounded to float: --use_fast_math would turn
// cosf/sinf into __cosf/__sinf, whose error grows with the argument (positions reach 1e5 radians), while the double
// functions are untouched by it and give the correctly rounded float nearly always, i.e. the CPU's cosf/sinf to within
// an ulp.
#include <limits.h>
#include "kernels.h"
#include "kernel_utils.cuh"
#include "kv_cache_row.cuh"

using namespace qk;

namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxHalf = 1024;

// one token's table: cs[i] = cos(angle_i) * scaling, sn[i] = sign * sin(angle_i) * scaling, angle_i =
// f32(p * inv_freq[i]); the block's threads share the work (the caller syncs before reading)
__device__ __forceinline__ void fill_table(float* cs, float* sn, int half, int32_t position, const float* inv_freq,
                                           float scaling, float sign) {
    const float p = (float)position;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float angle = ieee::mul(p, inv_freq[i]);
        double s, c;
        sincos((double)angle, &s, &c);
        cs[i] = ieee::mul((float)c, scaling);
        sn[i] = ieee::mul(ieee::mul(sign, (float)s), scaling);
    }
}

// rotates the pairs (lo[k], hi[k]) of 8 bf16 values each by the angles of cs[0..8), sn[0..8); every rope kernel
// goes through this (and rotate1) so that the fused one rounds as ropeForward does
__device__ __forceinline__ void rotate8(uint4& lo, uint4& hi, const float* cs, const float* sn) {
    float a[8], b[8], ya[8], yb[8];
    unpack_bf16x8(lo, a);
    unpack_bf16x8(hi, b);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const float c = cs[k], s = sn[k];
        ya[k] = a[k] * c - b[k] * s;
        yb[k] = b[k] * c + a[k] * s;
    }
    lo = pack_bf16x8(ya);
    hi = pack_bf16x8(yb);
}

__device__ __forceinline__ void rotate1(uint16_t& lo, uint16_t& hi, float c, float s) {
    const float a = bf16_to_f32(lo), b = bf16_to_f32(hi);
    lo = f32_to_bf16(a * c - b * s);
    hi = f32_to_bf16(b * c + a * s);
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(uint16_t* out, const uint16_t* inp, const int32_t* pos, const float* inv_freq, float scaling,
                float sign, int64_t N, int64_t H, int64_t D, int64_t R, int64_t stride) {
    extern __shared__ float table[];  // cos[half], sin[half] (sin carries the sign of the direction)
    const int half = (int)(R / 2);
    float* cs = table;
    float* sn = table + half;
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        __syncthreads();  // the previous token's table is no longer read
        fill_table(cs, sn, half, pos[n], inv_freq, scaling, sign);
        __syncthreads();
        const uint16_t* x = inp + n * stride;
        uint16_t* y = out + n * stride;
        if (VEC) {
            const int per_head = half / 8;
            const int total = (int)H * per_head;
            for (int v = threadIdx.x; v < total; v += blockDim.x) {
                const int h = v / per_head;
                const int i0 = (v - h * per_head) * 8;
                const int64_t base = (int64_t)h * D + i0;
                uint4 lo = *reinterpret_cast<const uint4*>(x + base);
                uint4 hi = *reinterpret_cast<const uint4*>(x + base + half);
                rotate8(lo, hi, cs + i0, sn + i0);
                *reinterpret_cast<uint4*>(y + base) = lo;
                *reinterpret_cast<uint4*>(y + base + half) = hi;
            }
        } else {
            const int total = (int)H * half;
            for (int q = threadIdx.x; q < total; q += blockDim.x) {
                const int h = q / half;
                const int i = q - h * half;
                const int64_t base = (int64_t)h * D + i;
                uint16_t lo = x[base], hi = x[base + half];
                rotate1(lo, hi, cs[i], sn[i]);
                y[base] = lo;
                y[base + half] = hi;
            }
        }
        // partial rotary: the dimensions past R are the input's
        const int pass = (int)(D - R);
        if (pass > 0 && y != x)
            for (int q = threadIdx.x; q < (int)H * pass; q += blockDim.x) {
                const int h = q / pass;
                const int64_t j = (int64_t)h * D + R + (q - h * pass);
                y[j] = x[j];
            }
    }
}

// RoPE of a token's q and k heads and its cache write, one block per token n = b * T + t: q [N, Hq, D] and k
// [N, Hkv, D] rotated in place (their first R dimensions of each head), the rotated k row and the v row [N, Hkv, D]
// stored at the token's cache row (kv_cache_row; none: the rotations only). The work items of a token (8 pairs or 1
// pair of a q or k head, 8 or 1 pass-through values of a k head, 8 or 1 values of v) are spread over the block as
// one range, so that a decoding step's few tokens keep every thread busy.
template <bool VEC>
__global__ void __launch_bounds__(kThreads)
    rope_cache_write_kernel(uint16_t* q, uint16_t* k, uint16_t* cache_k, uint16_t* cache_v, const uint16_t* v,
                            const int32_t* pos, const float* inv_freq, float scaling, const int32_t* pasts,
                            const int32_t* table, int64_t table_stride, int64_t block, int T, int64_t capacity, int Hq,
                            int Hkv, int D, int R) {
    extern __shared__ float angles[];  // cos[half], sin[half]
    const int half = R / 2;
    float* cs = angles;
    float* sn = angles + half;
    const int64_t n = blockIdx.x;
    fill_table(cs, sn, half, pos[n], inv_freq, scaling, 1.0f);
    const int64_t row = kv_cache_row(pasts, table, table_stride, block, capacity, (int)(n / T), (int)(n % T));
    const int64_t kv_elems = (int64_t)Hkv * D;
    uint16_t* qn = q + n * Hq * D;
    uint16_t* kn = k + n * kv_elems;
    const uint16_t* vn = v + n * kv_elems;
    uint16_t* ck = row >= 0 ? cache_k + row * kv_elems : nullptr;
    uint16_t* cv = row >= 0 ? cache_v + row * kv_elems : nullptr;
    __syncthreads();
    const int width = VEC ? 8 : 1;      // values per work item
    const int per_head = half / width;  // rotation items per head
    const int pass_per_head = (D - R) / width;
    const int nq = Hq * per_head, nqk = nq + Hkv * per_head;
    const int npass = ck ? Hkv * pass_per_head : 0;  // k's unrotated dimensions go to the cache as they are
    const int total = nqk + npass + (cv ? (int)(kv_elems / width) : 0);
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        if (i < nqk) {
            const bool is_k = i >= nq;
            const int j = is_k ? i - nq : i;
            const int h = j / per_head;
            const int i0 = (j - h * per_head) * width;
            const int64_t base = (int64_t)h * D + i0;
            uint16_t* x = (is_k ? kn : qn) + base;
            uint16_t* c = is_k ? ck : nullptr;
            if (VEC) {
                uint4 lo = *reinterpret_cast<const uint4*>(x);
                uint4 hi = *reinterpret_cast<const uint4*>(x + half);
                rotate8(lo, hi, cs + i0, sn + i0);
                *reinterpret_cast<uint4*>(x) = lo;
                *reinterpret_cast<uint4*>(x + half) = hi;
                if (c) {
                    *reinterpret_cast<uint4*>(c + base) = lo;
                    *reinterpret_cast<uint4*>(c + base + half) = hi;
                }
            } else {
                uint16_t lo = x[0], hi = x[half];
                rotate1(lo, hi, cs[i0], sn[i0]);
                x[0] = lo;
                x[half] = hi;
                if (c) {
                    c[base] = lo;
                    c[base + half] = hi;
                }
            }
        } else if (i < nqk + npass) {
            const int j = i - nqk;
            const int h = j / pass_per_head;
            const int64_t at = (int64_t)h * D + R + (int64_t)(j - h * pass_per_head) * width;
            if (VEC)
                *reinterpret_cast<uint4*>(ck + at) = *reinterpret_cast<const uint4*>(kn + at);
            else
                ck[at] = kn[at];
        } else {
            const int64_t j = (int64_t)(i - nqk - npass) * width;
            if (VEC)
                *reinterpret_cast<uint4*>(cv + j) = *reinterpret_cast<const uint4*>(vn + j);
            else
                cv[j] = vn[j];
        }
    }
}

cudaError_t launch(uint16_t* out, const uint16_t* inp, const int32_t* pos, const float* inv_freq, float scaling,
                   float sign, int64_t N, int64_t H, int64_t D, int64_t R, int64_t stride, cudaStream_t stream) {
    if (N < 0 || H < 0 || D < 0 || D % 2 != 0 || D / 2 > kMaxHalf || H * D > INT_MAX) return cudaErrorInvalidValue;
    if (R <= 0) R = D;
    if (R % 2 != 0 || R > D) return cudaErrorInvalidValue;
    if (stride <= 0) stride = H * D;
    if (stride < H * D) return cudaErrorInvalidValue;
    if (N == 0 || H == 0 || D == 0) return cudaSuccess;
    const int64_t half = R / 2;
    const bool vec = half % 8 == 0 && D % 8 == 0 && stride % 8 == 0 && aligned16(out) && aligned16(inp);
    const unsigned grid = (unsigned)(N < INT_MAX ? N : INT_MAX);
    const size_t smem = (size_t)(2 * half) * sizeof(float);
    if (vec)
        rope_kernel<true><<<grid, kThreads, smem, stream>>>(out, inp, pos, inv_freq, scaling, sign, N, H, D, R, stride);
    else
        rope_kernel<false>
            <<<grid, kThreads, smem, stream>>>(out, inp, pos, inv_freq, scaling, sign, N, H, D, R, stride);
    return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t qlora_cuda_rope_forward(uint16_t* out, const uint16_t* inp, const int32_t* pos,
                                               const float* inv_freq, float attention_scaling, int64_t N, int64_t H,
                                               int64_t D, int64_t row_stride, int64_t rotary, cudaStream_t stream) {
    return launch(out, inp, pos, inv_freq, attention_scaling, 1.0f, N, H, D, rotary, row_stride, stream);
}

extern "C" cudaError_t qlora_cuda_rope_backward(uint16_t* dinp, const uint16_t* dout, const int32_t* pos,
                                                const float* inv_freq, float attention_scaling, int64_t N, int64_t H,
                                                int64_t D, int64_t row_stride, int64_t rotary, cudaStream_t stream) {
    // the rotation is orthogonal (times a scale): its transpose is the rotation by -angle
    return launch(dinp, dout, pos, inv_freq, attention_scaling, -1.0f, N, H, D, rotary, row_stride, stream);
}

extern "C" cudaError_t qlora_cuda_rope_cache_write(uint16_t* q, uint16_t* k, uint16_t* cache_k, uint16_t* cache_v,
                                                   const uint16_t* v, const int32_t* pos, const float* inv_freq,
                                                   float attention_scaling, const int32_t* pasts, const int32_t* table,
                                                   int64_t table_stride, int64_t block, int64_t B, int64_t T,
                                                   int64_t Hq, int64_t Hkv, int64_t D, int64_t capacity, int64_t rotary,
                                                   cudaStream_t stream) {
    if (B < 0 || T < 0 || Hq < 0 || Hkv < 0 || D < 0 || capacity < 0) return cudaErrorInvalidValue;
    if (D % 2 != 0 || D / 2 > kMaxHalf || (T > 0 && B > INT32_MAX / T)) return cudaErrorInvalidValue;
    if (rotary <= 0) rotary = D;
    if (rotary % 2 != 0 || rotary > D) return cudaErrorInvalidValue;
    // the work items of one token are counted in int
    if ((Hq + Hkv) * D > INT_MAX) return cudaErrorInvalidValue;
    if (table && (block < 1 || table_stride < 1 || capacity > table_stride * block)) return cudaErrorInvalidValue;
    if (B == 0 || T == 0 || D == 0 || Hq + Hkv == 0) return cudaSuccess;
    const int64_t half = rotary / 2;
    const bool vec = half % 8 == 0 && D % 8 == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
                     aligned16(cache_k) && aligned16(cache_v);
    const unsigned grid = (unsigned)(B * T);
    const size_t smem = (size_t)(2 * half) * sizeof(float);
    if (vec)
        rope_cache_write_kernel<true><<<grid, kThreads, smem, stream>>>(
            q, k, cache_k, cache_v, v, pos, inv_freq, attention_scaling, pasts, table, table_stride, block, (int)T,
            capacity, (int)Hq, (int)Hkv, (int)D, (int)rotary);
    else
        rope_cache_write_kernel<false><<<grid, kThreads, smem, stream>>>(
            q, k, cache_k, cache_v, v, pos, inv_freq, attention_scaling, pasts, table, table_stride, block, (int)T,
            capacity, (int)Hq, (int)Hkv, (int)D, (int)rotary);
    return cudaGetLastError();
}
