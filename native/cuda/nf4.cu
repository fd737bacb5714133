// nf4.cu: NF4/FP4 dequantization (bitsandbytes layout) to f32/bf16/f16, and quantization of bf16 values (at the
// end of the file), bit-identical to the CPU reference.
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
#include <stdlib.h>
#include <string.h>
#include "common.cuh"
#include "gemm.h"
#include "nf4.h"
#include "qlora_bnb.h"
#include "qlora_float.h"
#include "qlora_nf4.h"
#include "runtime.h"

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

// ---- the tensor-core kernel: bf16/f16 x, K % 32 == 0, blocksize >= 32; one launch computes 1..4 parts (the
// projections of one x: q, k and v, or gate and up), the parts' blocks concatenated in the grid.
//
// A warp computes a 16 x 8 tile of y^T (16 rows n of W, the M <= 8 rows of x padded to 8) with mma.m16n8k16
// (fp32 accumulators). Lane (g, t) = (lane / 4, lane % 4) loads per k-step one 16-byte unit (32 weights, one
// bnb block or half of one) of rows n0 + g and n0 + g + 8: the four lanes t of a row read 64 consecutive bytes,
// a warp 1 KB (16 rows x 128 k). The sum over k does not care which k the mma calls which, so each lane feeds
// its own weights: in mma j of a word, the fragment columns (2t, 2t+1 | 2t+8, 2t+9) are the word's
// k = 4j + (0, 1 | 2, 3), for the weights (A) as for x (B, 8 bytes of row m = g, read through L1).
//
// K is split into G slices per tile (slice j takes the k-steps j, j + G, j + 2G, ...): `ws` warps of a block
// (1, 2, 4 or 8; the block then holds 8 / ws tiles) times `bs` blocks (bs > 1 only with ws = 8, for parts with
// few tiles). Each warp keeps DEPTH k-steps of weight and scale loads in flight (a ring: step i is decoded,
// then its registers take the loads of step i + DEPTH); its first loads go out before the code tables are
// filled. The slices of a tile are added in a fixed order: the warps of a block through shared memory, then
// (bs > 1) the blocks' fp32 partials in a workspace, by the last block of the tile to arrive (a __threadfence
// and an atomic counter that it resets to 0), partial 0 first. Every part's plan (ws, bs) depends only on its
// own N and K and the GPU, so a part gives the same bits alone or in a group, in every run.
// The LoRA term is one more mma chain over j < r (zero-padded to 16) with its own accumulators, split over
// the slices the same way: y = acc + scale * lora, rounded once.
// Shared memory: the code table (16 floats, or PAIR: 256 float2 (code[hi], code[lo]) indexed by a whole
// byte), the 256 nested codes, the split-K partial tiles (8 KB).

constexpr int MMA_WARPS = 8;
constexpr int MMA_THREADS = MMA_WARPS * 32;
// per part: the most tiles that may be split across blocks (the counters are a static array)
constexpr int64_t MAX_SPLIT_TILES = 1024;
// the arrival counters of the tiles split across blocks: part p uses [p * MAX_SPLIT_TILES, ...); zero between
// launches (the last block of a tile resets its counter)
__device__ unsigned int g_split_counters[QLORA_GEMV_4BIT_MAX_PARTS * MAX_SPLIT_TILES];

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

// the float at byte offset `off` of a shared table
__device__ __forceinline__ float table_at(const float* s_table, uint32_t off) {
    return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(s_table) + off);
}

template <int XT>
__device__ __forceinline__ uint32_t pack_x(float first, float second) {
    return XT == QLORA_CUDA_BF16 ? pack_bf16x2(first, second) : pack_f16x2(first, second);
}

// byte b of the planes hi = (w >> 2) & 0x3c3c3c3c, lo = (w << 2) & 0x3c3c3c3c (4 x the high / low nibble of each
// byte of the word w, i.e. byte offsets into the 16-entry code table): the two weights of byte b of w (the first
// in the high nibble), decoded and rounded to XT, packed with the first in the low half
template <int XT>
__device__ __forceinline__ uint32_t decode_pair(uint32_t hi, uint32_t lo, int b, float scale, const float* s_code) {
    const float first = mul(table_at(s_code, __byte_perm(hi, 0, 0x4440 | b)), scale);
    const float second = mul(table_at(s_code, __byte_perm(lo, 0, 0x4440 | b)), scale);
    return pack_x<XT>(first, second);
}

// PAIR: the two weights of the byte whose offset (8 x byte) into the 256-entry pair table is `off`
template <int XT>
__device__ __forceinline__ uint32_t decode_pair_table(uint32_t off, float scale, const float* s_pair) {
    const float2 c = *reinterpret_cast<const float2*>(reinterpret_cast<const char*>(s_pair) + off);
    return pack_x<XT>(mul(c.x, scale), mul(c.y, scale));
}

// 8 k of a unit: word wl of row n0 + g, wh of row n0 + g + 8 (scales sl, sh), x pairs (k 0-1, 2-3, 4-5, 6-7)
template <int XT, bool PAIR>
__device__ __forceinline__ void mma_word(float (&c)[4], uint32_t wl, uint32_t wh, float sl, float sh, uint4 xq,
                                         const float* s_table) {
    if (PAIR) {
        // 8 x byte b of the word: one LDS.64 per pair of weights
        const uint32_t l0 = (wl << 3) & 0x7f8u, l1 = (wl >> 5) & 0x7f8u, l2 = (wl >> 13) & 0x7f8u,
                       l3 = (wl >> 21) & 0x7f8u;
        const uint32_t h0 = (wh << 3) & 0x7f8u, h1 = (wh >> 5) & 0x7f8u, h2 = (wh >> 13) & 0x7f8u,
                       h3 = (wh >> 21) & 0x7f8u;
        mma16816<XT>(c, decode_pair_table<XT>(l0, sl, s_table), decode_pair_table<XT>(h0, sh, s_table),
                     decode_pair_table<XT>(l1, sl, s_table), decode_pair_table<XT>(h1, sh, s_table), xq.x, xq.y);
        mma16816<XT>(c, decode_pair_table<XT>(l2, sl, s_table), decode_pair_table<XT>(h2, sh, s_table),
                     decode_pair_table<XT>(l3, sl, s_table), decode_pair_table<XT>(h3, sh, s_table), xq.z, xq.w);
    } else {
        const uint32_t l_hi = (wl >> 2) & 0x3c3c3c3cu, l_lo = (wl << 2) & 0x3c3c3c3cu;
        const uint32_t h_hi = (wh >> 2) & 0x3c3c3c3cu, h_lo = (wh << 2) & 0x3c3c3c3cu;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            // bytes 2j (k 4j, 4j + 1) and 2j + 1 (k 4j + 2, 4j + 3)
            mma16816<XT>(c, decode_pair<XT>(l_hi, l_lo, 2 * j, sl, s_table),
                         decode_pair<XT>(h_hi, h_lo, 2 * j, sh, s_table),
                         decode_pair<XT>(l_hi, l_lo, 2 * j + 1, sl, s_table),
                         decode_pair<XT>(h_hi, h_lo, 2 * j + 1, sh, s_table), j ? xq.z : xq.x, j ? xq.w : xq.y);
        }
    }
}

// elements j, j + 1 of row `row` of a [rows, r] x_dtype (16-bit) matrix, zero past r, packed (j in the low half)
__device__ __forceinline__ uint32_t lora_pair(const uint16_t* p, int64_t row, int j, int r) {
    const uint16_t* q = p + row * r;
    const uint32_t lo = j < r ? __ldg(q + j) : 0u, hi = j + 1 < r ? __ldg(q + j + 1) : 0u;
    return lo | hi << 16;
}

// one part of a launch, as the kernel sees it
struct MmaPart {
    void* y;
    const uint4* packed;
    const float* absmax;
    const uint8_t* absmax_q;
    const float* nested_absmax;
    const float* nested_code;
    const float* code;
    const uint16_t* lora_xa;
    const uint16_t* lora_b;
    const uint16_t* bias;  // [N] in x's dtype, or null
    float* partials;       // bs > 1: [tiles][bs][8][32] fp32, the blocks' partial tiles (acc then lora)
    int64_t N, tiles;
    int64_t block_begin;  // the part's first block in the grid
    float offset, lora_scale;
    int lora_r, block_shift, nested_shift;
    int ws_log2;  // warps per tile in a block: 1 << ws_log2
    int bs;       // blocks per tile
    bool y_f32, nested;
};

struct MmaLaunch {
    MmaPart part[QLORA_GEMV_4BIT_MAX_PARTS];
    const uint16_t* x;
    int64_t K;
    int M, nparts;
};

// the kernel's inner loop: the 16-float code table (LDS), the 256-entry pair table (PAIR) or the register
// table with per-block scaling (LUT, below)
enum MmaKind { KIND_LDS, KIND_PAIR, KIND_LUT };

// where a warp's tile and K slice lie, for the block `blk` (counted from the part's first) of part `d`
struct MmaTile {
    int64_t tile, n0;
    int64_t row_lo, row_hi;  // rows n0 + g and n0 + g + 8, clamped to N - 1
    int slice, G, b, g, t;
    bool active;  // warp-uniform: the block's last tiles may lie past N
    bool has_x;   // fragment column g is row g of x (zero past M)
};

__device__ __forceinline__ MmaTile mma_tile(const MmaLaunch& L, const MmaPart& d, int64_t blk) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    MmaTile T;
    T.g = lane >> 2;
    T.t = lane & 3;
    const int ws = 1 << d.ws_log2;
    T.G = ws * d.bs;
    T.b = 0;
    if (d.bs == 1) {
        T.tile = blk * (MMA_WARPS >> d.ws_log2) + (warp >> d.ws_log2);
        T.slice = warp & (ws - 1);
    } else {
        T.tile = blk / d.bs;
        T.b = (int)(blk - T.tile * d.bs);
        T.slice = T.b * MMA_WARPS + warp;
    }
    T.n0 = T.tile * 16;
    T.active = T.tile < d.tiles;
    // rows past N read row N - 1 (in bounds; their results are not stored)
    T.row_lo = min(T.n0 + T.g, d.N - 1);
    T.row_hi = min(T.n0 + T.g + 8, d.N - 1);
    T.has_x = T.g < L.M;
    return T;
}

// The LoRA chain, then the slices of the tile added in order (the warps of a block through shared memory,
// then the blocks through the workspace), then y = acc + scale * lora (+ bias), rounded once.
template <int XT>
__device__ __forceinline__ void mma_finish(const MmaLaunch& L, const MmaPart& d, int p, const MmaTile& T,
                                           float (&acc)[4], float (*s_part)[8][32]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = T.g, t = T.t;
    const int ws = 1 << d.ws_log2, bs = d.bs;
    const int64_t N = d.N, tile = T.tile;
    const int M = L.M;
    float lora[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (T.active) {
        // LoRA: k-step s of 16 j's, same fragment scheme (columns 2t, 2t+1 | 2t+8, 2t+9 = j 4t + (0, 1 | 2, 3))
        const int r = d.lora_r;
        for (int s = T.slice; s < (r + 15) >> 4; s += T.G) {
            const int j = s * 16 + 4 * t;
            const uint32_t b0 = T.has_x ? lora_pair(d.lora_xa, g, j, r) : 0u;
            const uint32_t b1 = T.has_x ? lora_pair(d.lora_xa, g, j + 2, r) : 0u;
            mma16816<XT>(lora, lora_pair(d.lora_b, T.row_lo, j, r), lora_pair(d.lora_b, T.row_hi, j, r),
                         lora_pair(d.lora_b, T.row_lo, j + 2, r), lora_pair(d.lora_b, T.row_hi, j + 2, r), b0, b1);
        }
    }
    if (ws > 1) {
        // the warps of a tile are consecutive; the first adds the others' tiles in order
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s_part[warp][i][lane] = acc[i];
            s_part[warp][4 + i][lane] = lora[i];
        }
        __syncthreads();
        if ((warp & (ws - 1)) != 0) return;
        for (int w = 1; w < ws; w++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                acc[i] += s_part[warp + w][i][lane];
                lora[i] += s_part[warp + w][4 + i][lane];
            }
        }
    }
    if (bs > 1) {
        // warp 0 holds the block's partial tile; the last block of the tile to arrive adds all of them in order
        float* mine = d.partials + (tile * bs + T.b) * 256;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __stcg(mine + i * 32 + lane, acc[i]);
            __stcg(mine + (4 + i) * 32 + lane, lora[i]);
        }
        __threadfence();
        __syncwarp();
        unsigned int* counter = g_split_counters + p * MAX_SPLIT_TILES + tile;
        unsigned int arrived = 0;
        if (lane == 0) arrived = atomicAdd(counter, 1u);
        arrived = __shfl_sync(0xffffffffu, arrived, 0);
        if (arrived != (unsigned)(bs - 1)) return;
        __threadfence();
        const float* all = d.partials + tile * bs * 256;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            acc[i] = __ldcg(all + i * 32 + lane);
            lora[i] = __ldcg(all + (4 + i) * 32 + lane);
        }
        for (int k = 1; k < bs; k++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                acc[i] += __ldcg(all + k * 256 + i * 32 + lane);
                lora[i] += __ldcg(all + k * 256 + (4 + i) * 32 + lane);
            }
        }
        if (lane == 0) *counter = 0;  // every block of the tile has arrived: ready for the next launch
    }
    if (!T.active) return;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        // accumulator i: row n0 + g (+ 8 for i >= 2) of W, row 2t + (i & 1) of x
        const int m = 2 * t + (i & 1);
        const int64_t n = T.n0 + g + (i >= 2 ? 8 : 0);
        if (m < M && n < N) {
            float v = d.lora_r > 0 ? fmaf(d.lora_scale, lora[i], acc[i]) : acc[i];
            if (d.bias) v += load_f32<XT>(d.bias, n);
            store_y<XT>(d.y, d.y_f32, m * N + n, v);
        }
    }
}

// the block `blk` (counted from the part's first) of part `d`, part index p
template <int XT, int DEPTH, bool PAIR, bool NESTED>
__device__ __forceinline__ void mma_part(const MmaLaunch& L, const MmaPart& d, int p, int64_t blk, float* s_table,
                                         float* s_nested, float (*s_part)[8][32]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ws = 1 << d.ws_log2, bs = d.bs, G = ws * bs;
    int64_t tile;
    int slice, b = 0;
    if (bs == 1) {
        tile = blk * (MMA_WARPS >> d.ws_log2) + (warp >> d.ws_log2);
        slice = warp & (ws - 1);
    } else {
        tile = blk / bs;
        b = (int)(blk - tile * bs);
        slice = b * MMA_WARPS + warp;
    }
    const int64_t N = d.N, K = L.K, n0 = tile * 16;
    const bool active = tile < d.tiles;  // warp-uniform: the block's last tiles may lie past N
    // rows past N read row N - 1 (in bounds; their results are not stored)
    const int64_t row_lo = min(n0 + g, N - 1), row_hi = min(n0 + g + 8, N - 1);
    const int64_t units = K >> 5, steps = CEIL_DIV(units, (int64_t)4);
    const uint4* p_lo = d.packed + row_lo * units;
    const uint4* p_hi = d.packed + row_hi * units;
    const int64_t e_lo = row_lo * K, e_hi = row_hi * K;  // the rows' first elements
    const int M = L.M;
    const bool has_x = g < M;  // fragment column g is row g of x (zero past M)
    const uint4* xg = reinterpret_cast<const uint4*>(L.x + (int64_t)(has_x ? g : 0) * K);

    // the ring: slot u holds the weights and scales (or NESTED: the nested absmax and the 8-bit codes) of a step
    uint4 wl[DEPTH], wh[DEPTH];
    float sl[DEPTH], sh[DEPTH];
    uint32_t ql[DEPTH], qh[DEPTH];
    auto load = [&](int u, int64_t step) {
        const int64_t unit = step * 4 + t;
        wl[u] = wh[u] = make_uint4(0, 0, 0, 0);
        sl[u] = sh[u] = 0.0f;
        ql[u] = qh[u] = 0;
        if (active && unit < units) {
            wl[u] = __ldg(p_lo + unit);
            wh[u] = __ldg(p_hi + unit);
            // blocksize >= 32: the unit lies in the block of its first element
            const int64_t bl = (e_lo + unit * 32) >> d.block_shift, bh = (e_hi + unit * 32) >> d.block_shift;
            if (NESTED) {
                ql[u] = __ldg(d.absmax_q + bl);
                qh[u] = __ldg(d.absmax_q + bh);
                sl[u] = __ldg(d.nested_absmax + (bl >> d.nested_shift));
                sh[u] = __ldg(d.nested_absmax + (bh >> d.nested_shift));
            } else {
                sl[u] = __ldg(d.absmax + bl);
                sh[u] = __ldg(d.absmax + bh);
            }
        }
    };
    // the first loads go out before the tables are filled
#pragma unroll
    for (int u = 0; u < DEPTH; u++) load(u, slice + (int64_t)u * G);

    if (PAIR) {
        const int i = threadIdx.x;  // MMA_THREADS == 256 pairs
        reinterpret_cast<float2*>(s_table)[i] = make_float2(__ldg(d.code + (i >> 4)), __ldg(d.code + (i & 15)));
    } else if (threadIdx.x < 16) {
        s_table[threadIdx.x] = __ldg(d.code + threadIdx.x);
    }
    if (NESTED) s_nested[threadIdx.x] = __ldg(d.nested_code + threadIdx.x);
    __syncthreads();

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, lora[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) {
        for (int64_t s0 = slice; s0 < steps; s0 += (int64_t)DEPTH * G) {
#pragma unroll
            for (int u = 0; u < DEPTH; u++) {
                const int64_t step = s0 + (int64_t)u * G;
                if (step >= steps) break;  // warp-uniform
                const int64_t unit = step * 4 + t;
                float scale_lo = sl[u], scale_hi = sh[u];
                if (NESTED) {
                    scale_lo = nested_block_absmax(s_nested[ql[u]], sl[u], d.offset);
                    scale_hi = nested_block_absmax(s_nested[qh[u]], sh[u], d.offset);
                }
                // x[g, 32 unit .. + 32): zero past K (the weights there are finite) and for g >= M
                uint4 xq[4];
                const bool x_ok = has_x && unit < units;
#pragma unroll
                for (int q = 0; q < 4; q++) xq[q] = x_ok ? __ldg(xg + unit * 4 + q) : make_uint4(0, 0, 0, 0);
                mma_word<XT, PAIR>(acc, wl[u].x, wh[u].x, scale_lo, scale_hi, xq[0], s_table);
                mma_word<XT, PAIR>(acc, wl[u].y, wh[u].y, scale_lo, scale_hi, xq[1], s_table);
                mma_word<XT, PAIR>(acc, wl[u].z, wh[u].z, scale_lo, scale_hi, xq[2], s_table);
                mma_word<XT, PAIR>(acc, wl[u].w, wh[u].w, scale_lo, scale_hi, xq[3], s_table);
                // the slot's registers are free: the step DEPTH further on
                load(u, step + (int64_t)DEPTH * G);
            }
        }
        // LoRA: k-step s of 16 j's, same fragment scheme (columns 2t, 2t+1 | 2t+8, 2t+9 = j 4t + (0, 1 | 2, 3))
        const int r = d.lora_r;
        for (int s = slice; s < (r + 15) >> 4; s += G) {
            const int j = s * 16 + 4 * t;
            const uint32_t b0 = has_x ? lora_pair(d.lora_xa, g, j, r) : 0u;
            const uint32_t b1 = has_x ? lora_pair(d.lora_xa, g, j + 2, r) : 0u;
            mma16816<XT>(lora, lora_pair(d.lora_b, row_lo, j, r), lora_pair(d.lora_b, row_hi, j, r),
                         lora_pair(d.lora_b, row_lo, j + 2, r), lora_pair(d.lora_b, row_hi, j + 2, r), b0, b1);
        }
    }
    if (ws > 1) {
        // the warps of a tile are consecutive; the first adds the others' tiles in order
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s_part[warp][i][lane] = acc[i];
            s_part[warp][4 + i][lane] = lora[i];
        }
        __syncthreads();
        if ((warp & (ws - 1)) != 0) return;
        for (int w = 1; w < ws; w++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                acc[i] += s_part[warp + w][i][lane];
                lora[i] += s_part[warp + w][4 + i][lane];
            }
        }
    }
    if (bs > 1) {
        // warp 0 holds the block's partial tile; the last block of the tile to arrive adds all of them in order
        float* mine = d.partials + (tile * bs + b) * 256;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __stcg(mine + i * 32 + lane, acc[i]);
            __stcg(mine + (4 + i) * 32 + lane, lora[i]);
        }
        __threadfence();
        __syncwarp();
        unsigned int* counter = g_split_counters + p * MAX_SPLIT_TILES + tile;
        unsigned int arrived = 0;
        if (lane == 0) arrived = atomicAdd(counter, 1u);
        arrived = __shfl_sync(0xffffffffu, arrived, 0);
        if (arrived != (unsigned)(bs - 1)) return;
        __threadfence();
        const float* all = d.partials + tile * bs * 256;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            acc[i] = __ldcg(all + i * 32 + lane);
            lora[i] = __ldcg(all + (4 + i) * 32 + lane);
        }
        for (int k = 1; k < bs; k++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                acc[i] += __ldcg(all + k * 256 + i * 32 + lane);
                lora[i] += __ldcg(all + k * 256 + (4 + i) * 32 + lane);
            }
        }
        if (lane == 0) *counter = 0;  // every block of the tile has arrived: ready for the next launch
    }
    if (!active) return;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        // accumulator i: row n0 + g (+ 8 for i >= 2) of W, row 2t + (i & 1) of x
        const int m = 2 * t + (i & 1);
        const int64_t n = n0 + g + (i >= 2 ? 8 : 0);
        if (m < M && n < N) {
            float v = d.lora_r > 0 ? fmaf(d.lora_scale, lora[i], acc[i]) : acc[i];
            if (d.bias) v += load_f32<XT>(d.bias, n);
            store_y<XT>(d.y, d.y_f32, m * N + n, v);
        }
    }
}

// ---- the LUT kind (QLORA_GEMV4BIT_VARIANT=lut): blocksize a power of two >= 64 and K % 64 == 0.
// A k-step is 64 k of each row of the tile, all in one quantization block (a step starts at a multiple of 64
// of the flat weight index). Lane (g, t) loads bytes [8t, 8t + 8) of the step (weights 16t .. 16t + 15, two
// words) of rows n0 + g and n0 + g + 8, and the same 16 k of x row m = g (32 bytes). In mma i (0..3) of a step
// the fragment columns (2t, 2t+1 | 2t+8, 2t+9) are the step's k = 16t + 4i + (0, 1 | 2, 3), for the weights
// (bytes 2i, 2i + 1 of the lane's 8) as for x. The 4 mmas of a step add into zeroed block accumulators that
// join acc once, times the block's scale: y = sum_b s_b sum_{k in b} x_k round(code[q_k]). So a weight is its
// code value rounded to x's dtype, not the scaled weight as in the table kinds (the same relative rounding,
// 2^-9 for bf16), and no weight is multiplied.
// The code -> bf16/f16 lookup runs in registers: lo[j] / hi[j] hold the low / high bytes of the rounded code
// values 4j .. 4j + 3 (entry e in byte e % 4). 4 weights are 16 bits of a word, nibble j giving byte j: PRMT
// with the nibbles' low 3 bits picks among the entries 0..7 and among 8..15, a PRMT in sign-replicate mode
// turns bit 3 of each nibble into a byte mask that chooses between the two (one LOP3), and two PRMTs
// interleave the low and high bytes into the packed pairs. test/gemv-lut-decode.test.ts restates the selector
// constants, emulates PRMT and checks the decode of every 16-bit input against the table.

// prmt(a, b, .): bytes 0, 2 (4, 6) of two packed 16-bit pairs a, b: their low bytes, entry order
constexpr uint32_t LUT_LOW_BYTES = 0x6420u;
constexpr uint32_t LUT_HIGH_BYTES = 0x7531u;
// prmt(w << 4, w, .): 0xff in byte j where bit 3 of nibble j of w is set, 0 elsewhere (sign-replicate mode:
// selector nibble 8 + i copies bit 7 of source byte i), for the nibbles 0..3 and 4..7 of w
constexpr uint32_t LUT_BIT3_NIBBLES_0_3 = 0xD9C8u;
constexpr uint32_t LUT_BIT3_NIBBLES_4_7 = 0xFBEAu;
// prmt(lo, hi, .): the values of nibbles 1 (low half) and 0, and of nibbles 3 and 2 (bnb puts a byte's first
// weight in its high nibble; the mma wants the first in the low half)
constexpr uint32_t LUT_FIRST_PAIR = 0x4051u;
constexpr uint32_t LUT_SECOND_PAIR = 0x6273u;

struct CodeLut {
    uint32_t lo[4], hi[4];
};

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
    return d;
}

// the 16 code values rounded to XT (round to nearest even), split into low and high bytes
template <int XT>
__device__ __forceinline__ CodeLut lut_build(const float* s_code) {
    CodeLut lut;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float4 c = reinterpret_cast<const float4*>(s_code)[j];
        const uint32_t p01 = pack_x<XT>(c.x, c.y), p23 = pack_x<XT>(c.z, c.w);
        lut.lo[j] = prmt(p01, p23, LUT_LOW_BYTES);
        lut.hi[j] = prmt(p01, p23, LUT_HIGH_BYTES);
    }
    return lut;
}

// 4 weights: `sel` holds their nibbles (bits 15..0; PRMT ignores the bits above and, with bit 3 of each
// nibble cleared, copies bytes), `upper` the mask of the nibbles >= 8. first / second: the pairs of the low /
// high byte, packed with the high nibble's weight in the low half
__device__ __forceinline__ void lut_decode4(const CodeLut& lut, uint32_t sel, uint32_t upper, uint32_t& first,
                                            uint32_t& second) {
    const uint32_t lo = (prmt(lut.lo[0], lut.lo[1], sel) & ~upper) | (prmt(lut.lo[2], lut.lo[3], sel) & upper);
    const uint32_t hi = (prmt(lut.hi[0], lut.hi[1], sel) & ~upper) | (prmt(lut.hi[2], lut.hi[3], sel) & upper);
    first = prmt(lo, hi, LUT_FIRST_PAIR);
    second = prmt(lo, hi, LUT_SECOND_PAIR);
}

// the 8 weights of a code word: pair[b] = the two weights of byte b, packed for the mma
__device__ __forceinline__ void lut_word(const CodeLut& lut, uint32_t w, uint32_t (&pair)[4]) {
    const uint32_t sel = w & 0x77777777u, w4 = w << 4;
    lut_decode4(lut, sel, prmt(w4, w, LUT_BIT3_NIBBLES_0_3), pair[0], pair[1]);
    lut_decode4(lut, sel >> 16, prmt(w4, w, LUT_BIT3_NIBBLES_4_7), pair[2], pair[3]);
}

// 8 k of a step: word wl of row n0 + g, wh of row n0 + g + 8, x pairs (k 0-1, 2-3, 4-5, 6-7); c unscaled
template <int XT>
__device__ __forceinline__ void lut_mma_word(float (&c)[4], const CodeLut& lut, uint32_t wl, uint32_t wh, uint4 xq) {
    uint32_t l[4], h[4];
    lut_word(lut, wl, l);
    lut_word(lut, wh, h);
    mma16816<XT>(c, l[0], h[0], l[1], h[1], xq.x, xq.y);
    mma16816<XT>(c, l[2], h[2], l[3], h[3], xq.z, xq.w);
}

// the LUT kind: the block `blk` (counted from the part's first) of part `d`, part index p
template <int XT, int DEPTH, bool NESTED>
__device__ __forceinline__ void mma_part_lut(const MmaLaunch& L, const MmaPart& d, int p, int64_t blk, float* s_code,
                                             float* s_nested, float (*s_part)[8][32]) {
    const MmaTile T = mma_tile(L, d, blk);
    const int t = T.t, slice = T.slice, G = T.G;
    const int64_t K = L.K, steps = K >> 6;
    // 8-byte units: a row has K / 16, a step 4, the lane's is unit 4 step + t
    const uint2* p_lo = reinterpret_cast<const uint2*>(d.packed) + T.row_lo * (K >> 4) + t;
    const uint2* p_hi = reinterpret_cast<const uint2*>(d.packed) + T.row_hi * (K >> 4) + t;
    const int64_t e_lo = T.row_lo * K, e_hi = T.row_hi * K;  // the rows' first elements
    // x row g: 8 uint4 a step, the lane's two at 2t
    const uint4* xg = reinterpret_cast<const uint4*>(L.x + (int64_t)(T.has_x ? T.g : 0) * K) + 2 * t;

    // the ring: slot u holds the weights and scales (or NESTED: the nested absmax and the 8-bit codes) of a step
    uint2 wl[DEPTH], wh[DEPTH];
    float sl[DEPTH], sh[DEPTH];
    uint32_t ql[DEPTH], qh[DEPTH];
    auto load = [&](int u, int64_t step) {
        wl[u] = wh[u] = make_uint2(0, 0);
        sl[u] = sh[u] = 0.0f;
        ql[u] = qh[u] = 0;
        if (T.active && step < steps) {
            wl[u] = __ldg(p_lo + step * 4);
            wh[u] = __ldg(p_hi + step * 4);
            const int64_t bl = (e_lo + step * 64) >> d.block_shift, bh = (e_hi + step * 64) >> d.block_shift;
            if (NESTED) {
                ql[u] = __ldg(d.absmax_q + bl);
                qh[u] = __ldg(d.absmax_q + bh);
                sl[u] = __ldg(d.nested_absmax + (bl >> d.nested_shift));
                sh[u] = __ldg(d.nested_absmax + (bh >> d.nested_shift));
            } else {
                sl[u] = __ldg(d.absmax + bl);
                sh[u] = __ldg(d.absmax + bh);
            }
        }
    };
    // the first loads go out before the tables are filled
#pragma unroll
    for (int u = 0; u < DEPTH; u++) load(u, slice + (int64_t)u * G);

    if (threadIdx.x < 16) s_code[threadIdx.x] = __ldg(d.code + threadIdx.x);
    if (NESTED) s_nested[threadIdx.x] = __ldg(d.nested_code + threadIdx.x);
    __syncthreads();
    const CodeLut lut = lut_build<XT>(s_code);

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (T.active) {
        for (int64_t s0 = slice; s0 < steps; s0 += (int64_t)DEPTH * G) {
#pragma unroll
            for (int u = 0; u < DEPTH; u++) {
                const int64_t step = s0 + (int64_t)u * G;
                if (step >= steps) break;  // warp-uniform
                float scale_lo = sl[u], scale_hi = sh[u];
                if (NESTED) {
                    scale_lo = nested_block_absmax(s_nested[ql[u]], sl[u], d.offset);
                    scale_hi = nested_block_absmax(s_nested[qh[u]], sh[u], d.offset);
                }
                // x[g, 64 step + 16t .. + 16): zero for g >= M
                uint4 x0 = make_uint4(0, 0, 0, 0), x1 = make_uint4(0, 0, 0, 0);
                if (T.has_x) {
                    x0 = __ldg(xg + step * 8);
                    x1 = __ldg(xg + step * 8 + 1);
                }
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                lut_mma_word<XT>(c, lut, wl[u].x, wh[u].x, x0);
                lut_mma_word<XT>(c, lut, wl[u].y, wh[u].y, x1);
                // c[0], c[1]: row n0 + g, c[2], c[3]: row n0 + g + 8
                acc[0] = fmaf(scale_lo, c[0], acc[0]);
                acc[1] = fmaf(scale_lo, c[1], acc[1]);
                acc[2] = fmaf(scale_hi, c[2], acc[2]);
                acc[3] = fmaf(scale_hi, c[3], acc[3]);
                // the slot's registers are free: the step DEPTH further on
                load(u, step + (int64_t)DEPTH * G);
            }
        }
    }
    mma_finish<XT>(L, d, p, T, acc, s_part);
}

// DEPTH: k-steps of loads in flight per warp; KIND: the inner loop (MmaKind). A LUT step is half an LDS step, so
// LUT's DEPTH 4 (108 registers, 2 blocks per SM) has as many bytes in flight per warp as LDS's 2.
template <int XT, int DEPTH, int KIND>
__global__ void __launch_bounds__(MMA_THREADS, DEPTH <= 2 ? 3 : 2)
    gemv4bit_mma_kernel(const __grid_constant__ MmaLaunch L) {
    static_assert(XT == QLORA_CUDA_BF16 || XT == QLORA_CUDA_F16, "the mma takes bf16 or f16 operands");
    __shared__ __align__(16) float s_table[KIND == KIND_PAIR ? 512 : 16];
    __shared__ float s_nested[256];
    __shared__ float s_part[MMA_WARPS][8][32];
    int p = 0;
#pragma unroll
    for (int i = 1; i < QLORA_GEMV_4BIT_MAX_PARTS; i++)
        if (i < L.nparts && (int64_t)blockIdx.x >= L.part[i].block_begin) p = i;
    const MmaPart& d = L.part[p];
    const int64_t blk = (int64_t)blockIdx.x - d.block_begin;
    if constexpr (KIND == KIND_LUT) {
        if (d.nested)
            mma_part_lut<XT, DEPTH, true>(L, d, p, blk, s_table, s_nested, s_part);
        else
            mma_part_lut<XT, DEPTH, false>(L, d, p, blk, s_table, s_nested, s_part);
    } else {
        if (d.nested)
            mma_part<XT, DEPTH, KIND == KIND_PAIR, true>(L, d, p, blk, s_table, s_nested, s_part);
        else
            mma_part<XT, DEPTH, KIND == KIND_PAIR, false>(L, d, p, blk, s_table, s_nested, s_part);
    }
}

// ---- launching the tensor-core kernel

// the kernel variant: QLORA_GEMV4BIT_VARIANT = lds2 (default) | lds4 | pair2 | pair4 | lut (= lut4) | lut2 (the
// inner loop, then the k-steps in flight per warp; lut only where lut_takes, the other parts lds2), read once
struct MmaVariant {
    int depth;
    int kind;  // MmaKind
};

MmaVariant mma_variant() {
    static const MmaVariant v = [] {
        const char* s = getenv("QLORA_GEMV4BIT_VARIANT");
        if (s && strcmp(s, "lds4") == 0) return MmaVariant{4, KIND_LDS};
        if (s && strcmp(s, "pair2") == 0) return MmaVariant{2, KIND_PAIR};
        if (s && strcmp(s, "pair4") == 0) return MmaVariant{4, KIND_PAIR};
        if (s && strcmp(s, "lut") == 0) return MmaVariant{4, KIND_LUT};
        if (s && strcmp(s, "lut2") == 0) return MmaVariant{2, KIND_LUT};
        return MmaVariant{2, KIND_LDS};
    }();
    return v;
}

// the GPU's SM count, asked once
int sm_count() {
    static const int sms = [] {
        int dev = 0, n = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) {
            cudaGetLastError();
            n = 132;
        }
        return n;
    }();
    return sms;
}

// how many blocks of a kernel variant fit on one SM at once, asked once
template <int XT, int DEPTH, int KIND>
int mma_blocks_per_sm() {
    static const int occupancy = [] {
        int n = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, gemv4bit_mma_kernel<XT, DEPTH, KIND>, MMA_THREADS, 0) !=
                cudaSuccess ||
            n < 1) {
            cudaGetLastError();
            n = 2;
        }
        return n;
    }();
    return occupancy;
}

struct PartPlan {
    int ws_log2, bs;
    int64_t tiles, blocks;
};

// How a part's K is split (a function of N, its k-steps (K and the kernel kind) and the GPU only). Warps per
// tile: up to 8, each with >= 1 k-step.
// Blocks per tile: when all the tiles times every split that leaves each warp >= 1 k-step fit the GPU at once
// (few tiles: k/v), the most such blocks; otherwise more blocks only where they even out the blocks per SM
// (224 blocks on 132 SMs leave 92 SMs with twice the work of 40; 896 come to 6.8 each), each warp keeping >= 4
// k-steps, and only for parts of at most MAX_SPLIT_TILES tiles.
PartPlan plan_part(int64_t N, int64_t steps, int sms, int blocks_per_sm) {
    PartPlan pl = {0, 1, CEIL_DIV(N, (int64_t)16), 0};
    while (pl.ws_log2 < 3 && (int64_t(2) << pl.ws_log2) <= steps) pl.ws_log2++;
    if (pl.ws_log2 == 3 && pl.tiles <= MAX_SPLIT_TILES) {
        const int64_t fit = (int64_t)sms * blocks_per_sm, most = steps / MMA_WARPS;
        if (pl.tiles * most <= fit) {
            pl.bs = (int)most;
        } else {
            // blocks b over the SMs: the busiest SM has ceil(b / sms) of them, against b / sms on average
            int64_t best = pl.tiles, best_max = CEIL_DIV(best, (int64_t)sms);
            for (int64_t bs = 2; bs <= steps / (4 * MMA_WARPS); bs++) {
                const int64_t b = pl.tiles * bs, b_max = CEIL_DIV(b, (int64_t)sms);
                if (b_max * best < best_max * b) {
                    best = b;
                    best_max = b_max;
                    pl.bs = (int)bs;
                }
            }
        }
    }
    pl.blocks = pl.bs > 1 ? pl.tiles * pl.bs : CEIL_DIV(pl.tiles, (int64_t)(MMA_WARPS >> pl.ws_log2));
    return pl;
}

// one part's checked arguments (x, M and K are the launch's)
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
    const void* bias;  // the tensor-core kernel only (null otherwise)
};

// whether the tensor-core kernel takes the part (x's dtype and alignment are checked by the caller)
bool mma_takes(const GemvArgs& a) {
    return a.K % 32 == 0 && a.block_shift >= 5 && (reinterpret_cast<uintptr_t>(a.packed) & 15) == 0;
}

// whether the LUT kind takes a part the tensor-core kernel takes: a 64-k step must lie inside one block
bool lut_takes(const GemvArgs& a) { return a.K % 64 == 0 && a.block_shift >= 6; }

// a k-step of the kind: 64 k (LUT) or 4 units of 32 k
template <int KIND>
int64_t mma_steps(int64_t K) {
    return KIND == KIND_LUT ? K >> 6 : CEIL_DIV(K >> 5, (int64_t)4);
}

template <int XT, int DEPTH, int KIND>
cudaError_t launch_mma_variant(const GemvArgs* parts, int nparts, cudaStream_t stream) {
    const int sms = sm_count(), blocks_per_sm = mma_blocks_per_sm<XT, DEPTH, KIND>();
    MmaLaunch L;
    memset(&L, 0, sizeof L);
    L.x = reinterpret_cast<const uint16_t*>(parts[0].x);
    L.K = parts[0].K;
    L.M = (int)parts[0].M;
    int64_t blocks = 0, partial_floats = 0;
    int64_t partial_at[QLORA_GEMV_4BIT_MAX_PARTS];
    for (int i = 0; i < nparts; i++) {
        const GemvArgs& a = parts[i];
        if (a.N == 0) continue;
        const PartPlan pl = plan_part(a.N, mma_steps<KIND>(a.K), sms, blocks_per_sm);
        const int k = L.nparts++;
        MmaPart& d = L.part[k];
        d.y = a.y;
        d.packed = reinterpret_cast<const uint4*>(a.packed);
        d.absmax = a.absmax;
        d.absmax_q = a.absmax_q;
        d.nested_absmax = a.nested_absmax;
        d.nested_code = a.nested_code;
        d.code = a.code;
        d.lora_xa = reinterpret_cast<const uint16_t*>(a.lora_xa);
        d.lora_b = reinterpret_cast<const uint16_t*>(a.lora_b);
        d.bias = reinterpret_cast<const uint16_t*>(a.bias);
        d.N = a.N;
        d.tiles = pl.tiles;
        d.block_begin = blocks;
        d.offset = a.offset;
        d.lora_scale = a.lora_scale;
        d.lora_r = a.lora_r;
        d.block_shift = a.block_shift;
        d.nested_shift = a.nested_shift;
        d.ws_log2 = pl.ws_log2;
        d.bs = pl.bs;
        d.y_f32 = a.y_f32;
        d.nested = a.absmax_q != nullptr;
        blocks += pl.blocks;
        partial_at[k] = partial_floats;
        if (pl.bs > 1) partial_floats += pl.tiles * pl.bs * 256;
    }
    if (L.nparts == 0) return cudaSuccess;
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    // the blocks' partial tiles: stream-ordered like every buffer of the allocator (from the graph pool while
    // a graph is captured), so it can go back to the cache as soon as the kernel is queued
    float* partials = nullptr;
    if (partial_floats > 0) {
        cudaError_t err = cudaSuccess;
        partials = static_cast<float*>(qlora_cuda::device_alloc((size_t)partial_floats * sizeof(float), &err));
        if (!partials) return err;
        for (int k = 0; k < L.nparts; k++)
            if (L.part[k].bs > 1) L.part[k].partials = partials + partial_at[k];
    }
    gemv4bit_mma_kernel<XT, DEPTH, KIND><<<(unsigned)blocks, MMA_THREADS, 0, stream>>>(L);
    const cudaError_t err = cudaGetLastError();
    qlora_cuda::device_free(partials);
    return err;
}

template <int XT>
cudaError_t launch_mma(const GemvArgs* parts, int nparts, cudaStream_t stream) {
    const MmaVariant v = mma_variant();
    if (v.kind == KIND_LUT) {
        // the parts LUT takes in one launch, the others (lds2) in another: a part's kernel, and so its bits,
        // do not depend on the parts beside it
        GemvArgs lut[QLORA_GEMV_4BIT_MAX_PARTS], rest[QLORA_GEMV_4BIT_MAX_PARTS];
        int nlut = 0, nrest = 0;
        for (int i = 0; i < nparts; i++) {
            if (lut_takes(parts[i]))
                lut[nlut++] = parts[i];
            else
                rest[nrest++] = parts[i];
        }
        if (nlut > 0) {
            const cudaError_t err = v.depth == 4 ? launch_mma_variant<XT, 4, KIND_LUT>(lut, nlut, stream)
                                                 : launch_mma_variant<XT, 2, KIND_LUT>(lut, nlut, stream);
            if (err != cudaSuccess) return err;
        }
        return nrest > 0 ? launch_mma_variant<XT, 2, KIND_LDS>(rest, nrest, stream) : cudaSuccess;
    }
    if (v.kind == KIND_PAIR)
        return v.depth == 4 ? launch_mma_variant<XT, 4, KIND_PAIR>(parts, nparts, stream)
                            : launch_mma_variant<XT, 2, KIND_PAIR>(parts, nparts, stream);
    return v.depth == 4 ? launch_mma_variant<XT, 4, KIND_LDS>(parts, nparts, stream)
                        : launch_mma_variant<XT, 2, KIND_LDS>(parts, nparts, stream);
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

// one part on the CUDA cores (any x dtype, K % 8 == 0, blocksize >= 8)
template <int XT>
cudaError_t launch_gemv_warp(const GemvArgs& a, cudaStream_t stream) {
    if (a.N == 0) return cudaSuccess;
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

// checks one part (cudaErrorInvalidValue for bad arguments, cudaErrorNotSupported for layouts neither kernel
// takes) and fills `a`
cudaError_t check_part(const QloraGemv4bitPart& p, const void* x, int x_dtype, int64_t M, int64_t K, GemvArgs* a) {
    if (p.N < 0 || !p.y || !p.packed || !p.code) return cudaErrorInvalidValue;
    if (p.absmax_q ? (!p.nested_absmax || !p.nested_code) : !p.absmax) return cudaErrorInvalidValue;
    if (p.y_dtype != QLORA_CUDA_F32 && p.y_dtype != x_dtype) return cudaErrorInvalidValue;
    if (p.lora_r < 0 || p.lora_r > QLORA_GEMV_4BIT_MAX_LORA_R || (p.lora_r > 0 && (!p.lora_xa || !p.lora_b)))
        return cudaErrorInvalidValue;
    const int block_shift = log2_exact(p.blocksize);
    const int nested_shift = p.absmax_q ? log2_exact(p.nested_blocksize) : 0;
    if (K % 8 != 0 || block_shift < 3 || nested_shift < 0 || (reinterpret_cast<uintptr_t>(p.packed) & 3) != 0 ||
        (reinterpret_cast<uintptr_t>(x) & 15) != 0)
        return cudaErrorNotSupported;
    *a = GemvArgs{p.y,
                  p.y_dtype == QLORA_CUDA_F32,
                  x,
                  p.packed,
                  p.absmax,
                  p.absmax_q,
                  p.nested_absmax,
                  p.nested_code,
                  p.offset,
                  p.code,
                  block_shift,
                  nested_shift,
                  M,
                  p.N,
                  K,
                  p.lora_xa,
                  p.lora_b,
                  (int)p.lora_r,
                  p.lora_scale,
                  p.bias};
    return cudaSuccess;
}

// gemv4bit (one part: either kernel) and gemv4bit_group (all parts in one tensor-core launch)
cudaError_t gemv_parts(const void* x, int x_dtype, int64_t M, int64_t K, const QloraGemv4bitPart* parts, int64_t nparts,
                       bool group, cudaStream_t stream) {
    if (M < 1 || M > QLORA_GEMV_4BIT_MAX_M || K < 0 || !x || !parts || nparts < 1 || nparts > QLORA_GEMV_4BIT_MAX_PARTS)
        return cudaErrorInvalidValue;
    if (x_dtype != QLORA_CUDA_F32 && x_dtype != QLORA_CUDA_BF16 && x_dtype != QLORA_CUDA_F16)
        return cudaErrorInvalidValue;
    GemvArgs a[QLORA_GEMV_4BIT_MAX_PARTS];
    cudaError_t status = cudaSuccess;
    for (int64_t i = 0; i < nparts; i++) {
        const cudaError_t err = check_part(parts[i], x, x_dtype, M, K, &a[i]);
        if (err == cudaErrorInvalidValue) return err;
        if (err != cudaSuccess) status = err;
    }
    if (status != cudaSuccess) return status;
    bool mma = x_dtype != QLORA_CUDA_F32;
    for (int64_t i = 0; i < nparts; i++) mma = mma && mma_takes(a[i]);
    // K == 0 still runs a kernel: y is then the LoRA term alone (or zeros)
    if (mma)
        return x_dtype == QLORA_CUDA_BF16 ? launch_mma<QLORA_CUDA_BF16>(a, (int)nparts, stream)
                                          : launch_mma<QLORA_CUDA_F16>(a, (int)nparts, stream);
    if (group || a[0].bias) return cudaErrorNotSupported;
    switch (x_dtype) {
        case QLORA_CUDA_F32:
            return launch_gemv_warp<QLORA_CUDA_F32>(a[0], stream);
        case QLORA_CUDA_BF16:
            return launch_gemv_warp<QLORA_CUDA_BF16>(a[0], stream);
        default:
            return launch_gemv_warp<QLORA_CUDA_F16>(a[0], stream);
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
    const QloraGemv4bitPart part = {y,           y_dtype, packed, absmax,     absmax_q,         nested_absmax,
                                    nested_code, offset,  code,   blocksize,  nested_blocksize, N,
                                    lora_xa,     lora_b,  lora_r, lora_scale, nullptr};
    return gemv_parts(x, x_dtype, M, K, &part, 1, false, stream);
}

extern "C" cudaError_t qlora_cuda_gemv_4bit_group(const void* x, int x_dtype, int64_t M, int64_t K,
                                                  const QloraGemv4bitPart* parts, int64_t nparts, cudaStream_t stream) {
    return gemv_parts(x, x_dtype, M, K, parts, nparts, true, stream);
}

// ------------------------------------------------------------------
// quantization of bf16 values to NF4/FP4 (kQuantizeBlockwise), bit-identical to the CPU's
// qlora_cpu_quantize_4bit_bf16: the same per-value code (qlora_nf4.h) and the same f32 operations, each an IEEE
// one without .ftz (qlora_float.h), so --use_fast_math changes nothing.

namespace {

constexpr int QUANT_WARPS = 8;

// one warp per block of `bs` values: the block's absmax (a max is exact in any order), then two values a lane into
// one byte, the first in the high nibble; an odd n pads the last byte's low nibble with the code of 0
__global__ void __launch_bounds__(QUANT_WARPS * 32)
    quantize4bit_bf16_kernel(uint8_t* __restrict__ packed, float* __restrict__ absmax, const uint16_t* __restrict__ inp,
                             int quant_type, int64_t bs, int64_t n, int64_t nblocks) {
    const int64_t b = (int64_t)blockIdx.x * QUANT_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (b >= nblocks) return;  // the whole warp: b is the warp's
    const int64_t begin = b * bs, end = begin + bs < n ? begin + bs : n;
    float amax = 0.0f;
    for (int64_t i = begin + lane; i < end; i += 32)
        amax = qlora::ieee::max(amax, qlora::ieee::abs(qlora::bf16_to_f32(inp[i])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = qlora::ieee::max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) absmax[b] = amax;
    const bool zero = qlora::q4::is_zero_absmax(amax);
    const float r = zero ? 0.0f : qlora::ieee::div(1.0f, amax);
    const uint8_t zc = qlora::q4::zero_code(quant_type);
    const int64_t pairs = (end - begin + 1) / 2;
    for (int64_t p = lane; p < pairs; p += 32) {
        const int64_t i = begin + 2 * p;
        uint8_t q0 = zc, q1 = zc;
        if (!zero) {
            const float u0 = qlora::ieee::mul(qlora::bf16_to_f32(inp[i]), r);
            const float u1 = i + 1 < end ? qlora::ieee::mul(qlora::bf16_to_f32(inp[i + 1]), r) : 0.0f;
            q0 = qlora::q4::quantize_4bit_value(u0, quant_type);
            q1 = qlora::q4::quantize_4bit_value(u1, quant_type);
        }
        packed[i >> 1] = (uint8_t)(q0 << 4 | q1);
    }
}

}  // namespace

extern "C" cudaError_t qlora_cuda_quantize_4bit_bf16(uint8_t* packed, float* absmax, const uint16_t* inp,
                                                     int quant_type, int64_t blocksize, int64_t n,
                                                     cudaStream_t stream) {
    if (n < 0 || blocksize < 2 || (blocksize & 1) != 0) return cudaErrorInvalidValue;
    if (quant_type != QLORA_QUANT_NF4 && quant_type != QLORA_QUANT_FP4) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    if (!packed || !absmax || !inp) return cudaErrorInvalidValue;
    const int64_t nblocks = CEIL_DIV(n, blocksize);
    const int64_t grid = CEIL_DIV(nblocks, (int64_t)QUANT_WARPS);
    if (grid > INT32_MAX) return cudaErrorInvalidValue;
    quantize4bit_bf16_kernel<<<(unsigned)grid, QUANT_WARPS * 32, 0, stream>>>(packed, absmax, inp, quant_type,
                                                                              blocksize, n, nblocks);
    return cudaGetLastError();
}
