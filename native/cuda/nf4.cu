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
// fused dequantization + GEMV for a few rows (generation): y[M, N] = x[M, K] @ W^T (+ lora_scale * xa @ B^T),
// W[N, K] 4-bit. Each weight is decoded exactly as dequantize4bit does, then rounded to x's dtype (bnb
// dequantizes to the compute dtype before its GEMM); products and sums are fp32, y is rounded once at the end.

// element i of an x_dtype array as f32 (the LoRA operands)
template <int XT>
__device__ __forceinline__ float load_f32(const void* p, int64_t i) {
    if (XT == QLORA_CUDA_F32) return __ldg(reinterpret_cast<const float*>(p) + i);
    const unsigned short h = __ldg(reinterpret_cast<const unsigned short*>(p) + i);
    if (XT == QLORA_CUDA_BF16) return __uint_as_float((uint32_t)h << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

template <int XT>
__device__ __forceinline__ void store_y(void* y, bool y_f32, int64_t i, float v) {
    if (y_f32 || XT == QLORA_CUDA_F32)
        reinterpret_cast<float*>(y)[i] = v;
    else if (XT == QLORA_CUDA_BF16)
        reinterpret_cast<uint16_t*>(y)[i] = to_bf16(v);
    else
        reinterpret_cast<uint16_t*>(y)[i] = to_f16(v);
}

// ---- the CUDA-core kernel: any K % 8 == 0, blocksize >= 8, f32 x
// One warp per output column n (a row of W): lane l takes units l, l + 32, ... of the row (8 weights a unit,
// one 32-bit word of codes, fully coalesced across the warp) and accumulates the M dot products in fp32; the
// LoRA term sum_j xa[m, j] B[n, j] is spread over the lanes the same way; warp shuffles finish both.

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
                    const float* __restrict__ code, int block_shift, int nested_shift, int64_t N, int64_t K,
                    const void* __restrict__ lora_xa, const void* __restrict__ lora_b, int lora_r, float lora_scale) {
    __shared__ float s_code[16];
    __shared__ float s_nested[NESTED ? 256 : 1];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    if (NESTED) s_nested[threadIdx.x] = nested_code[threadIdx.x];  // GEMV_WARPS * 32 == 256
    __syncthreads();
    const int64_t n = (int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (n >= N) return;
    const int64_t units = K >> 3, unit0 = n * units;
    float acc[MR], lora[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) acc[r] = lora[r] = 0.0f;
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
#pragma unroll 1
    for (int j = lane; j < lora_r; j += 32) {
        const float b = load_f32<XT>(lora_b, n * lora_r + j);
#pragma unroll
        for (int r = 0; r < MR; r++) lora[r] = fmaf(load_f32<XT>(lora_xa, r * lora_r + j), b, lora[r]);
    }
#pragma unroll
    for (int r = 0; r < MR; r++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
            lora[r] += __shfl_xor_sync(0xffffffffu, lora[r], o);
        }
    }
    if (lane < MR) {
        // lane r stores row r (a compile-time index into acc needs the unrolled select)
        float v = acc[0], l = lora[0];
#pragma unroll
        for (int r = 1; r < MR; r++)
            if (lane == r) v = acc[r], l = lora[r];
        store_y<XT>(y, y_f32, (int64_t)lane * N + n, lora_r > 0 ? fmaf(lora_scale, l, v) : v);
    }
}

// ---- the tensor-core kernel: bf16/f16 x, K % 32 == 0, blocksize >= 32
// A warp computes a 16 x 8 tile of y^T (16 rows n of W, the M <= 8 rows of x padded to 8) with
// mma.m16n8k16 (fp32 accumulators). Lane (g, t) = (lane / 4, lane % 4) loads per k-step one 16-byte unit (32
// weights, one bnb block or half of one) of rows n0 + g and n0 + g + 8: the four lanes t of a row read 64
// consecutive bytes, a warp 1 KB (16 rows x 128 k). The sum over k does not care which k the mma calls which, so
// each lane feeds its own weights: in mma j of a unit, the fragment columns (2t, 2t+1 | 2t+8, 2t+9) are the
// unit's k = 4j + (0, 1 | 2, 3), for the weights (A) as for x (B, 8 bytes of row m = g, read through L1).
// The warps of a block split K (`split` of them per 16-row tile, interleaved k-steps, MMA_UNROLL steps of
// loads in flight per warp) and add their tiles through shared memory in a fixed order. The LoRA term is one
// more mma chain over j < r (zero-padded to 16) with its own accumulators: y = acc + scale * lora, rounded once.
// Shared memory: the 16 codes, the 256 nested codes, and the split-K partial tiles (8 KB).

constexpr int MMA_WARPS = 8;
constexpr int MMA_UNROLL = 2;

// c[16 x 8] += a[16 x 16] b[16 x 8], bf16 or f16 operands, f32 accumulators
template <int XT>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
    if (XT == QLORA_CUDA_BF16)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// the code at byte offset `off` (4 * nibble) of the shared table
__device__ __forceinline__ float code_at(const float* s_code, uint32_t off) {
    return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(s_code) + off);
}

// byte b of the planes hi = (w >> 2) & 0x3c3c3c3c, lo = (w << 2) & 0x3c3c3c3c (4 x the high / low nibble of each
// byte of the word w, i.e. byte offsets into the code table): the two weights of byte b of w (the first in the
// high nibble), decoded and rounded to XT, packed with the first in the low half
template <int XT>
__device__ __forceinline__ uint32_t decode_pair(uint32_t hi, uint32_t lo, int b, float scale, const float* s_code) {
    const float first = mul(code_at(s_code, __byte_perm(hi, 0, 0x4440 | b)), scale);
    const float second = mul(code_at(s_code, __byte_perm(lo, 0, 0x4440 | b)), scale);
    return XT == QLORA_CUDA_BF16 ? pack_bf16x2(first, second) : pack_f16x2(first, second);
}

// 8 k of a unit: word wl of row n0 + g, wh of row n0 + g + 8 (scales sl, sh), x pairs (k 0-1, 2-3, 4-5, 6-7)
template <int XT>
__device__ __forceinline__ void mma_word(float (&c)[4], uint32_t wl, uint32_t wh, float sl, float sh, uint4 xq,
                                         const float* s_code) {
    const uint32_t l_hi = (wl >> 2) & 0x3c3c3c3cu, l_lo = (wl << 2) & 0x3c3c3c3cu;
    const uint32_t h_hi = (wh >> 2) & 0x3c3c3c3cu, h_lo = (wh << 2) & 0x3c3c3c3cu;
#pragma unroll
    for (int j = 0; j < 2; j++) {
        // bytes 2j (k 4j, 4j + 1) and 2j + 1 (k 4j + 2, 4j + 3)
        mma16816<XT>(c, decode_pair<XT>(l_hi, l_lo, 2 * j, sl, s_code), decode_pair<XT>(h_hi, h_lo, 2 * j, sh, s_code),
                     decode_pair<XT>(l_hi, l_lo, 2 * j + 1, sl, s_code),
                     decode_pair<XT>(h_hi, h_lo, 2 * j + 1, sh, s_code), j ? xq.z : xq.x, j ? xq.w : xq.y);
    }
}

// elements j, j + 1 of row `row` of a [rows, r] x_dtype (16-bit) matrix, zero past r, packed (j in the low half)
__device__ __forceinline__ uint32_t lora_pair(const uint16_t* p, int64_t row, int j, int r) {
    const uint16_t* q = p + row * r;
    const uint32_t lo = j < r ? __ldg(q + j) : 0u, hi = j + 1 < r ? __ldg(q + j + 1) : 0u;
    return lo | hi << 16;
}

template <int XT, bool NESTED>
__global__ void __launch_bounds__(MMA_WARPS * 32)
    gemv4bit_mma_kernel(void* __restrict__ y, bool y_f32, const uint16_t* __restrict__ x,
                        const uint4* __restrict__ packed, const float* __restrict__ absmax,
                        const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                        const float* __restrict__ nested_code, float offset, const float* __restrict__ code,
                        int block_shift, int nested_shift, int M, int64_t N, int64_t K, int split,
                        const uint16_t* __restrict__ lora_xa, const uint16_t* __restrict__ lora_b, int lora_r,
                        float lora_scale) {
    static_assert(XT == QLORA_CUDA_BF16 || XT == QLORA_CUDA_F16, "the mma takes bf16 or f16 operands");
    __shared__ float s_code[16];
    __shared__ float s_nested[NESTED ? 256 : 1];
    __shared__ float s_part[MMA_WARPS][8][32];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    if (NESTED) s_nested[threadIdx.x] = nested_code[threadIdx.x];  // MMA_WARPS * 32 == 256
    __syncthreads();

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int sk = warp & (split - 1);  // this warp's share of K (split is a power of two)
    const int64_t n0 = ((int64_t)blockIdx.x * (MMA_WARPS / split) + warp / split) * 16;
    const bool active = n0 < N;  // warp-uniform: the block's last tiles may lie past N
    // rows past N read row N - 1 (in bounds; their results are not stored)
    const int64_t row_lo = min(n0 + g, N - 1), row_hi = min(n0 + g + 8, N - 1);
    const int64_t units = K >> 5, steps = CEIL_DIV(units, (int64_t)4);
    const uint4* p_lo = packed + row_lo * units;
    const uint4* p_hi = packed + row_hi * units;
    const bool has_x = g < M;  // fragment column g is row g of x (zero past M)
    const uint4* xg = reinterpret_cast<const uint4*>(x + (int64_t)(has_x ? g : 0) * K);

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, lora[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) {
        for (int64_t s0 = sk; s0 < steps; s0 += (int64_t)split * MMA_UNROLL) {
            // all the weight and scale loads of MMA_UNROLL steps first, then their use
            uint4 wl[MMA_UNROLL], wh[MMA_UNROLL];
            float sl[MMA_UNROLL], sh[MMA_UNROLL];     // the scales, or (NESTED) the nested absmax
            uint32_t ql[MMA_UNROLL], qh[MMA_UNROLL];  // NESTED: the 8-bit codes of the scales
#pragma unroll
            for (int u = 0; u < MMA_UNROLL; u++) {
                const int64_t unit = (s0 + (int64_t)u * split) * 4 + t;
                wl[u] = wh[u] = make_uint4(0, 0, 0, 0);
                sl[u] = sh[u] = 0.0f;
                ql[u] = qh[u] = 0;
                if (unit < units) {
                    wl[u] = __ldg(p_lo + unit);
                    wh[u] = __ldg(p_hi + unit);
                    // blocksize >= 32: the unit lies in the block of its first element
                    const int64_t bl = ((row_lo * units + unit) << 5) >> block_shift;
                    const int64_t bh = ((row_hi * units + unit) << 5) >> block_shift;
                    if (NESTED) {
                        ql[u] = __ldg(absmax_q + bl);
                        qh[u] = __ldg(absmax_q + bh);
                        sl[u] = __ldg(nested_absmax + (bl >> nested_shift));
                        sh[u] = __ldg(nested_absmax + (bh >> nested_shift));
                    } else {
                        sl[u] = __ldg(absmax + bl);
                        sh[u] = __ldg(absmax + bh);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < MMA_UNROLL; u++) {
                const int64_t step = s0 + (int64_t)u * split;
                if (step >= steps) break;  // warp-uniform
                const int64_t unit = step * 4 + t;
                float scale_lo = sl[u], scale_hi = sh[u];
                if (NESTED) {
                    scale_lo = nested_block_absmax(s_nested[ql[u]], sl[u], offset);
                    scale_hi = nested_block_absmax(s_nested[qh[u]], sh[u], offset);
                }
                // x[g, 32 unit .. + 32): zero past K (the weights there are finite) and for g >= M
                uint4 xq[4];
                const bool x_ok = has_x && unit < units;
#pragma unroll
                for (int q = 0; q < 4; q++) xq[q] = x_ok ? __ldg(xg + unit * 4 + q) : make_uint4(0, 0, 0, 0);
                mma_word<XT>(acc, wl[u].x, wh[u].x, scale_lo, scale_hi, xq[0], s_code);
                mma_word<XT>(acc, wl[u].y, wh[u].y, scale_lo, scale_hi, xq[1], s_code);
                mma_word<XT>(acc, wl[u].z, wh[u].z, scale_lo, scale_hi, xq[2], s_code);
                mma_word<XT>(acc, wl[u].w, wh[u].w, scale_lo, scale_hi, xq[3], s_code);
            }
        }
        // LoRA: k-step s of 16 j's, same fragment scheme (columns 2t, 2t+1 | 2t+8, 2t+9 = j 4t + (0, 1 | 2, 3))
        for (int s = sk; s < (lora_r + 15) >> 4; s += split) {
            const int j = s * 16 + 4 * t;
            const uint32_t b0 = has_x ? lora_pair(lora_xa, g, j, lora_r) : 0u;
            const uint32_t b1 = has_x ? lora_pair(lora_xa, g, j + 2, lora_r) : 0u;
            mma16816<XT>(lora, lora_pair(lora_b, row_lo, j, lora_r), lora_pair(lora_b, row_hi, j, lora_r),
                         lora_pair(lora_b, row_lo, j + 2, lora_r), lora_pair(lora_b, row_hi, j + 2, lora_r), b0, b1);
        }
    }
    if (split > 1) {
        // the warps sk = 0 .. split - 1 of a tile are consecutive; the first adds the others' tiles in order
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s_part[warp][i][lane] = acc[i];
            s_part[warp][4 + i][lane] = lora[i];
        }
        __syncthreads();
        if (sk != 0) return;
        for (int w = 1; w < split; w++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                acc[i] += s_part[warp + w][i][lane];
                lora[i] += s_part[warp + w][4 + i][lane];
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        // accumulator i: row n0 + g (+ 8 for i >= 2) of W, row 2t + (i & 1) of x
        const int m = 2 * t + (i & 1);
        const int64_t n = n0 + g + (i >= 2 ? 8 : 0);
        if (m < M && n < N) store_y<XT>(y, y_f32, m * N + n, lora_r > 0 ? fmaf(lora_scale, lora[i], acc[i]) : acc[i]);
    }
}

struct GemvArgs {
    void* y;
    bool y_f32;
    const void* x;
    const uint8_t* packed;
    const float* absmax;
    const uint8_t* absmax_q;
    const float* nested_absmax;
    const float* nested_code;
    float offset;
    const float* code;
    int block_shift, nested_shift;
    int64_t M, N, K;
    const void* lora_xa;
    const void* lora_b;
    int lora_r;
    float lora_scale;
};

template <int XT, bool NESTED>
cudaError_t launch_gemv_mma(const GemvArgs& a, cudaStream_t stream) {
    // K split over as many warps per tile as keep >= 3 k-steps each (up to the 8 of a block): the most, smallest
    // blocks, so that the last wave of blocks is a small part of the work (a few blocks per SM at 80 registers);
    // fewer tiles per block only costs x reuse through L1 when M > 1
    const int64_t tiles = CEIL_DIV(a.N, (int64_t)16), steps = CEIL_DIV(a.K >> 5, (int64_t)4);
    int split = 1;
    while (split < MMA_WARPS && 6 * split <= steps) split *= 2;
    const int64_t blocks = CEIL_DIV(tiles, (int64_t)(MMA_WARPS / split));
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    gemv4bit_mma_kernel<XT, NESTED><<<(unsigned)blocks, MMA_WARPS * 32, 0, stream>>>(
        a.y, a.y_f32, reinterpret_cast<const uint16_t*>(a.x), reinterpret_cast<const uint4*>(a.packed), a.absmax,
        a.absmax_q, a.nested_absmax, a.nested_code, a.offset, a.code, a.block_shift, a.nested_shift, (int)a.M, a.N, a.K,
        split, reinterpret_cast<const uint16_t*>(a.lora_xa), reinterpret_cast<const uint16_t*>(a.lora_b), a.lora_r,
        a.lora_scale);
    return cudaGetLastError();
}

template <int XT, int MR>
cudaError_t launch_gemv_warp_m(const GemvArgs& a, cudaStream_t stream) {
    const int64_t blocks = CEIL_DIV(a.N, (int64_t)GEMV_WARPS);
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    const uint32_t* p = reinterpret_cast<const uint32_t*>(a.packed);
    if (a.absmax_q)
        gemv4bit_kernel<XT, MR, true><<<(unsigned)blocks, GEMV_WARPS * 32, 0, stream>>>(
            a.y, a.y_f32, a.x, p, a.absmax, a.absmax_q, a.nested_absmax, a.nested_code, a.offset, a.code, a.block_shift,
            a.nested_shift, a.N, a.K, a.lora_xa, a.lora_b, a.lora_r, a.lora_scale);
    else
        gemv4bit_kernel<XT, MR, false><<<(unsigned)blocks, GEMV_WARPS * 32, 0, stream>>>(
            a.y, a.y_f32, a.x, p, a.absmax, a.absmax_q, a.nested_absmax, a.nested_code, a.offset, a.code, a.block_shift,
            a.nested_shift, a.N, a.K, a.lora_xa, a.lora_b, a.lora_r, a.lora_scale);
    return cudaGetLastError();
}

template <int XT>
cudaError_t launch_gemv(const GemvArgs& a, cudaStream_t stream) {
    if constexpr (XT != QLORA_CUDA_F32) {
        if (a.K % 32 == 0 && a.block_shift >= 5 && (reinterpret_cast<uintptr_t>(a.packed) & 15) == 0)
            return a.absmax_q ? launch_gemv_mma<XT, true>(a, stream) : launch_gemv_mma<XT, false>(a, stream);
    }
    switch (a.M) {
        case 1:
            return launch_gemv_warp_m<XT, 1>(a, stream);
        case 2:
            return launch_gemv_warp_m<XT, 2>(a, stream);
        case 3:
            return launch_gemv_warp_m<XT, 3>(a, stream);
        case 4:
            return launch_gemv_warp_m<XT, 4>(a, stream);
        case 5:
            return launch_gemv_warp_m<XT, 5>(a, stream);
        case 6:
            return launch_gemv_warp_m<XT, 6>(a, stream);
        case 7:
            return launch_gemv_warp_m<XT, 7>(a, stream);
        case 8:
            return launch_gemv_warp_m<XT, 8>(a, stream);
        default:
            return cudaErrorInvalidValue;
    }
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
                                            int64_t K, const void* lora_xa, const void* lora_b, int64_t lora_r,
                                            float lora_scale, cudaStream_t stream) {
    if (M < 1 || M > QLORA_GEMV_4BIT_MAX_M || N < 0 || K < 0 || !y || !x || !packed || !code)
        return cudaErrorInvalidValue;
    if (absmax_q ? (!nested_absmax || !nested_code) : !absmax) return cudaErrorInvalidValue;
    if (y_dtype != QLORA_CUDA_F32 && y_dtype != x_dtype) return cudaErrorInvalidValue;
    if (lora_r < 0 || lora_r > QLORA_GEMV_4BIT_MAX_LORA_R || (lora_r > 0 && (!lora_xa || !lora_b)))
        return cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    const int block_shift = log2_exact(blocksize);
    const int nested_shift = absmax_q ? log2_exact(nested_blocksize) : 0;
    if (K % 8 != 0 || block_shift < 3 || nested_shift < 0 || (reinterpret_cast<uintptr_t>(packed) & 3) != 0 ||
        (reinterpret_cast<uintptr_t>(x) & 15) != 0)
        return cudaErrorNotSupported;
    // K == 0 still runs a kernel: y is then the LoRA term alone (or zeros)
    const GemvArgs a = {y,
                        y_dtype == QLORA_CUDA_F32,
                        x,
                        packed,
                        absmax,
                        absmax_q,
                        nested_absmax,
                        nested_code,
                        offset,
                        code,
                        block_shift,
                        nested_shift,
                        M,
                        N,
                        K,
                        lora_xa,
                        lora_b,
                        (int)lora_r,
                        lora_scale};
    switch (x_dtype) {
        case QLORA_CUDA_F32:
            return launch_gemv<QLORA_CUDA_F32>(a, stream);
        case QLORA_CUDA_BF16:
            return launch_gemv<QLORA_CUDA_BF16>(a, stream);
        case QLORA_CUDA_F16:
            return launch_gemv<QLORA_CUDA_F16>(a, stream);
        default:
            return cudaErrorInvalidValue;
    }
}
