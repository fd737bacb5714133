// nf4.cu: NF4/FP4 dequantization (bitsandbytes layout) to f32/bf16/f16, bit-identical to the CPU reference.
//
// Exactness: the CPU computes every product and sum in f32 on its own (fp-contract off) and keeps subnormals.
// This file is built with --use_fast_math (-ftz=true, -fmad=true), so the arithmetic that must match is the
// CPU's own code (qlora_bnb.h, qlora_float.h), whose device operations are inline PTX: mul.rn.f32 / add.rn.f32
// without .ftz are never fused into an FMA nor flushed. bf16/f16 results come from cvt.rn.{bf16,f16}{,x2}.f32
// (round to nearest even, subnormal results kept), the same rounding as the CPU's; only the NaN payload can
// differ (NaN needs a NaN scale, which a valid state never has).
//
// Memory-bound: per 8 elements a thread reads one 32-bit word of codes and writes 16 bytes (bf16/f16) or 32
// bytes (f32), so both the loads and the stores are fully coalesced across a warp; each thread handles UNROLL
// such units with all loads issued before the first use.
#include <stdint.h>
#include "common.cuh"
#include "gemm.h"
#include "nf4.h"
#include "qlora_bnb.h"
#include "qlora_float.h"

namespace {

using qlora::bnb::nested_block_absmax;
using qlora::ieee::mul;

constexpr int THREADS = 256;
constexpr int UNROLL = 4;

// two f32 -> packed bf16x2 / f16x2, `lo` in the low half (the lower address)
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ uint16_t to_bf16(float x) {
    uint16_t d;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(x));
    return d;
}

__device__ __forceinline__ uint16_t to_f16(float x) {
    uint16_t d;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(d) : "f"(x));
    return d;
}

template <bool NESTED>
__device__ __forceinline__ float block_scale(int64_t b, const float* absmax, const uint8_t* absmax_q,
                                             const float* nested_absmax, const float* s_nested, float offset,
                                             int nested_shift) {
    if (NESTED)
        return nested_block_absmax(s_nested[__ldg(absmax_q + b)], __ldg(nested_absmax + (b >> nested_shift)), offset);
    return __ldg(absmax + b);
}

// units of 8 elements: unit u covers elements [8u, 8u + 8), its codes are the 32-bit word u of `packed`.
// blocksize = 1 << block_shift >= 8, so a unit never straddles two blocks.
template <int OUT, bool NESTED>
__global__ void __launch_bounds__(THREADS)
    dequant4bit_units(void* __restrict__ out, const uint32_t* __restrict__ packed, const float* __restrict__ absmax,
                      const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                      const float* __restrict__ nested_code, float offset, const float* __restrict__ code,
                      int block_shift, int nested_shift, int64_t units) {
    __shared__ float s_code[16];
    __shared__ float s_nested[NESTED ? 256 : 1];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    if (NESTED) s_nested[threadIdx.x] = nested_code[threadIdx.x];  // THREADS == 256
    __syncthreads();

    const int64_t first = (int64_t)blockIdx.x * (THREADS * UNROLL) + threadIdx.x;
    uint32_t w[UNROLL];
    float scale[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; j++) {
        const int64_t u = first + (int64_t)j * THREADS;
        w[j] = 0;
        scale[j] = 0.0f;
        if (u < units) {
            w[j] = __ldg(packed + u);
            scale[j] = block_scale<NESTED>((u << 3) >> block_shift, absmax, absmax_q, nested_absmax, s_nested, offset,
                                           nested_shift);
        }
    }
#pragma unroll
    for (int j = 0; j < UNROLL; j++) {
        const int64_t u = first + (int64_t)j * THREADS;
        if (u >= units) break;
        // byte k of the word holds elements 2k (high nibble) and 2k + 1 (low nibble)
        float v[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = mul(s_code[(w[j] >> (8 * k + 4)) & 15u], scale[j]);
            v[2 * k + 1] = mul(s_code[(w[j] >> (8 * k)) & 15u], scale[j]);
        }
        if (OUT == QLORA_CUDA_F32) {
            float4* o = reinterpret_cast<float4*>(out) + 2 * u;
            o[0] = make_float4(v[0], v[1], v[2], v[3]);
            o[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else if (OUT == QLORA_CUDA_BF16) {
            reinterpret_cast<uint4*>(out)[u] = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]),
                                                          pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
        } else {
            reinterpret_cast<uint4*>(out)[u] = make_uint4(pack_f16x2(v[0], v[1]), pack_f16x2(v[2], v[3]),
                                                          pack_f16x2(v[4], v[5]), pack_f16x2(v[6], v[7]));
        }
    }
}

// any blocksize, any alignment: one element per thread (grid-stride), elements [begin, n)
template <int OUT>
__global__ void dequant4bit_elements(void* __restrict__ out, const uint8_t* __restrict__ packed,
                                     const float* __restrict__ absmax, const uint8_t* __restrict__ absmax_q,
                                     const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,
                                     float offset, const float* __restrict__ code, int64_t blocksize,
                                     int64_t nested_blocksize, int64_t begin, int64_t n) {
    for (int64_t i = begin + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = i / blocksize;
        float scale;
        if (absmax_q)
            scale = nested_block_absmax(__ldg(nested_code + absmax_q[b]), __ldg(nested_absmax + b / nested_blocksize),
                                        offset);
        else
            scale = __ldg(absmax + b);
        const uint8_t byte = __ldg(packed + (i >> 1));
        const float v = mul(__ldg(code + ((i & 1) ? (byte & 15) : (byte >> 4))), scale);
        if (OUT == QLORA_CUDA_F32)
            reinterpret_cast<float*>(out)[i] = v;
        else if (OUT == QLORA_CUDA_BF16)
            reinterpret_cast<uint16_t*>(out)[i] = to_bf16(v);
        else
            reinterpret_cast<uint16_t*>(out)[i] = to_f16(v);
    }
}

int log2_exact(int64_t x) {
    if (x <= 0 || (x & (x - 1)) != 0) return -1;
    int s = 0;
    while ((int64_t(1) << s) < x) s++;
    return s;
}

template <int OUT>
cudaError_t launch_elements(void* out, const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                            const float* nested_absmax, const float* nested_code, float offset, const float* code,
                            int64_t blocksize, int64_t nested_blocksize, int64_t begin, int64_t n,
                            cudaStream_t stream) {
    const int64_t count = n - begin;
    if (count <= 0) return cudaSuccess;
    int64_t blocks = CEIL_DIV(count, (int64_t)THREADS);
    if (blocks > 65536) blocks = 65536;
    dequant4bit_elements<OUT><<<(unsigned)blocks, THREADS, 0, stream>>>(
        out, packed, absmax, absmax_q, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, begin, n);
    return cudaGetLastError();
}

template <int OUT>
cudaError_t dequantize(void* out, const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                       const float* nested_absmax, const float* nested_code, float offset, const float* code,
                       int64_t blocksize, int64_t nested_blocksize, int64_t n, cudaStream_t stream) {
    const int block_shift = log2_exact(blocksize);
    const int nested_shift = absmax_q ? log2_exact(nested_blocksize) : 0;
    const bool fast = block_shift >= 3 && nested_shift >= 0 && (reinterpret_cast<uintptr_t>(packed) & 3) == 0 &&
                      (reinterpret_cast<uintptr_t>(out) & 15) == 0;
    int64_t done = 0;
    if (fast) {
        const int64_t units = n / 8;
        if (units > 0) {
            const int64_t blocks = CEIL_DIV(units, (int64_t)(THREADS * UNROLL));
            if (blocks > INT32_MAX) return cudaErrorInvalidValue;
            const uint32_t* p32 = reinterpret_cast<const uint32_t*>(packed);
            if (absmax_q)
                dequant4bit_units<OUT, true>
                    <<<(unsigned)blocks, THREADS, 0, stream>>>(out, p32, absmax, absmax_q, nested_absmax, nested_code,
                                                               offset, code, block_shift, nested_shift, units);
            else
                dequant4bit_units<OUT, false>
                    <<<(unsigned)blocks, THREADS, 0, stream>>>(out, p32, absmax, absmax_q, nested_absmax, nested_code,
                                                               offset, code, block_shift, nested_shift, units);
            QLORA_CUDA_TRY(cudaGetLastError());
        }
        done = units * 8;
    }
    // the tail (n % 8 elements), or everything when the fast path does not apply
    return launch_elements<OUT>(out, packed, absmax, absmax_q, nested_absmax, nested_code, offset, code, blocksize,
                                nested_blocksize, done, n, stream);
}

// ------------------------------------------------------------------
// fused dequantization + GEMV for a few rows (generation): y[M, N] = x[M, K] @ W^T, W[N, K] 4-bit.
// One warp per output column n (a row of W): lane l takes units l, l + 32, ... of the row (8 weights a unit,
// one 32-bit word of codes, fully coalesced across the warp), decodes them exactly as dequantize4bit does
// (rounded to x's dtype, as bnb dequantizes to the compute dtype before its GEMM) and accumulates the M dot
// products in fp32; a warp shuffle reduction finishes them.

constexpr int GEMV_WARPS = 8;

template <int XT>
__device__ __forceinline__ float round_weight(float w) {
    if (XT == QLORA_CUDA_BF16) return __uint_as_float((uint32_t)to_bf16(w) << 16);
    if (XT == QLORA_CUDA_F16) {
        float f;
        asm("{ .reg .b16 h; cvt.rn.f16.f32 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "f"(w));
        return f;
    }
    return w;
}

// 8 consecutive x values (16-byte aligned) as f32
template <int XT>
__device__ __forceinline__ void load_x8(const void* x, int64_t i, float (&v)[8]) {
    if (XT == QLORA_CUDA_F32) {
        const float4* p = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + i);
        const float4 a = __ldg(p), b = __ldg(p + 1);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(x) + i));
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            if (XT == QLORA_CUDA_BF16) {
                v[2 * k] = __uint_as_float(words[k] << 16);
                v[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
            } else {
                float lo, hi;
                asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
                    : "=f"(lo), "=f"(hi)
                    : "r"(words[k]));
                v[2 * k] = lo;
                v[2 * k + 1] = hi;
            }
        }
    }
}

template <int XT, int MR, bool NESTED>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv4bit_kernel(void* __restrict__ y, bool y_f32, const void* __restrict__ x, const uint32_t* __restrict__ packed,
                    const float* __restrict__ absmax, const uint8_t* __restrict__ absmax_q,
                    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,
                    const float* __restrict__ code, int block_shift, int nested_shift, int64_t N, int64_t K) {
    __shared__ float s_code[16];
    __shared__ float s_nested[NESTED ? 256 : 1];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    if (NESTED) s_nested[threadIdx.x] = nested_code[threadIdx.x];  // GEMV_WARPS * 32 == 256
    __syncthreads();
    const int64_t n = (int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (n >= N) return;
    const int64_t units = K >> 3, unit0 = n * units;
    float acc[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) acc[r] = 0.0f;
#pragma unroll 1
    for (int64_t u = lane; u < units; u += 32) {
        const uint32_t w = __ldg(packed + unit0 + u);
        const float scale = block_scale<NESTED>((unit0 + u) << 3 >> block_shift, absmax, absmax_q, nested_absmax,
                                                s_nested, offset, nested_shift);
        float wv[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            wv[2 * k] = round_weight<XT>(mul(s_code[(w >> (8 * k + 4)) & 15u], scale));
            wv[2 * k + 1] = round_weight<XT>(mul(s_code[(w >> (8 * k)) & 15u], scale));
        }
#pragma unroll
        for (int r = 0; r < MR; r++) {
            float xv[8];
            load_x8<XT>(x, r * K + (u << 3), xv);
#pragma unroll
            for (int k = 0; k < 8; k++) acc[r] = fmaf(xv[k], wv[k], acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < MR; r++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
    if (lane < MR) {
        // lane r stores row r (a compile-time index into acc needs the unrolled select)
        float v = acc[0];
#pragma unroll
        for (int r = 1; r < MR; r++)
            if (lane == r) v = acc[r];
        const int64_t idx = (int64_t)lane * N + n;
        if (y_f32)
            reinterpret_cast<float*>(y)[idx] = v;
        else if (XT == QLORA_CUDA_BF16)
            reinterpret_cast<uint16_t*>(y)[idx] = to_bf16(v);
        else if (XT == QLORA_CUDA_F16)
            reinterpret_cast<uint16_t*>(y)[idx] = to_f16(v);
        else
            reinterpret_cast<float*>(y)[idx] = v;
    }
}

template <int XT, int MR>
cudaError_t launch_gemv_m(void* y, bool y_f32, const void* x, const uint32_t* packed, const float* absmax,
                          const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, float offset,
                          const float* code, int block_shift, int nested_shift, int64_t N, int64_t K,
                          cudaStream_t stream) {
    const int64_t blocks = CEIL_DIV(N, (int64_t)GEMV_WARPS);
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    if (absmax_q)
        gemv4bit_kernel<XT, MR, true><<<(unsigned)blocks, GEMV_WARPS * 32, 0, stream>>>(
            y, y_f32, x, packed, absmax, absmax_q, nested_absmax, nested_code, offset, code, block_shift, nested_shift,
            N, K);
    else
        gemv4bit_kernel<XT, MR, false><<<(unsigned)blocks, GEMV_WARPS * 32, 0, stream>>>(
            y, y_f32, x, packed, absmax, absmax_q, nested_absmax, nested_code, offset, code, block_shift, nested_shift,
            N, K);
    return cudaGetLastError();
}

template <int XT>
cudaError_t launch_gemv(int64_t M, void* y, bool y_f32, const void* x, const uint32_t* packed, const float* absmax,
                        const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, float offset,
                        const float* code, int block_shift, int nested_shift, int64_t N, int64_t K,
                        cudaStream_t stream) {
#define QLORA_GEMV_M(MR)                                                                                              \
    case MR:                                                                                                          \
        return launch_gemv_m<XT, MR>(y, y_f32, x, packed, absmax, absmax_q, nested_absmax, nested_code, offset, code, \
                                     block_shift, nested_shift, N, K, stream)
    switch (M) {
        QLORA_GEMV_M(1);
        QLORA_GEMV_M(2);
        QLORA_GEMV_M(3);
        QLORA_GEMV_M(4);
        QLORA_GEMV_M(5);
        QLORA_GEMV_M(6);
        QLORA_GEMV_M(7);
        QLORA_GEMV_M(8);
        default:
            return cudaErrorInvalidValue;
    }
#undef QLORA_GEMV_M
}

}  // namespace

extern "C" cudaError_t qlora_cuda_dequantize_4bit(void* out, int out_dtype, const uint8_t* packed, const float* absmax,
                                                  const uint8_t* absmax_q, const float* nested_absmax,
                                                  const float* nested_code, float offset, const float* code,
                                                  int64_t blocksize, int64_t nested_blocksize, int64_t n,
                                                  cudaStream_t stream) {
    if (n < 0 || blocksize < 1) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    if (!out || !packed || !code) return cudaErrorInvalidValue;
    if (absmax_q ? (!nested_absmax || !nested_code || nested_blocksize < 1) : !absmax) return cudaErrorInvalidValue;
    switch (out_dtype) {
        case QLORA_CUDA_F32:
            return dequantize<QLORA_CUDA_F32>(out, packed, absmax, absmax_q, nested_absmax, nested_code, offset, code,
                                              blocksize, nested_blocksize, n, stream);
        case QLORA_CUDA_BF16:
            return dequantize<QLORA_CUDA_BF16>(out, packed, absmax, absmax_q, nested_absmax, nested_code, offset, code,
                                               blocksize, nested_blocksize, n, stream);
        case QLORA_CUDA_F16:
            return dequantize<QLORA_CUDA_F16>(out, packed, absmax, absmax_q, nested_absmax, nested_code, offset, code,
                                              blocksize, nested_blocksize, n, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

extern "C" cudaError_t qlora_cuda_gemv_4bit(void* y, int y_dtype, const void* x, int x_dtype, const uint8_t* packed,
                                            const float* absmax, const uint8_t* absmax_q, const float* nested_absmax,
                                            const float* nested_code, float offset, const float* code,
                                            int64_t blocksize, int64_t nested_blocksize, int64_t M, int64_t N,
                                            int64_t K, cudaStream_t stream) {
    if (M < 1 || M > QLORA_GEMV_4BIT_MAX_M || N < 0 || K < 0 || !y || !x || !packed || !code)
        return cudaErrorInvalidValue;
    if (absmax_q ? (!nested_absmax || !nested_code) : !absmax) return cudaErrorInvalidValue;
    if (y_dtype != QLORA_CUDA_F32 && y_dtype != x_dtype) return cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    const int block_shift = log2_exact(blocksize);
    const int nested_shift = absmax_q ? log2_exact(nested_blocksize) : 0;
    if (K % 8 != 0 || block_shift < 3 || nested_shift < 0 || (reinterpret_cast<uintptr_t>(packed) & 3) != 0 ||
        (reinterpret_cast<uintptr_t>(x) & 15) != 0)
        return cudaErrorNotSupported;
    if (K == 0) return cudaMemsetAsync(y, 0, (size_t)(M * N) * (y_dtype == QLORA_CUDA_F32 ? 4 : 2), stream);
    const uint32_t* p32 = reinterpret_cast<const uint32_t*>(packed);
    const bool y_f32 = y_dtype == QLORA_CUDA_F32;
    switch (x_dtype) {
        case QLORA_CUDA_F32:
            return launch_gemv<QLORA_CUDA_F32>(M, y, y_f32, x, p32, absmax, absmax_q, nested_absmax, nested_code,
                                               offset, code, block_shift, nested_shift, N, K, stream);
        case QLORA_CUDA_BF16:
            return launch_gemv<QLORA_CUDA_BF16>(M, y, y_f32, x, p32, absmax, absmax_q, nested_absmax, nested_code,
                                                offset, code, block_shift, nested_shift, N, K, stream);
        case QLORA_CUDA_F16:
            return launch_gemv<QLORA_CUDA_F16>(M, y, y_f32, x, p32, absmax, absmax_q, nested_absmax, nested_code,
                                               offset, code, block_shift, nested_shift, N, K, stream);
        default:
            return cudaErrorInvalidValue;
    }
}
