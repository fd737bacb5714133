// kernel_utils.cuh: device helpers of the kernels (kernels.h) and the optimizer (optim.h): bf16 conversion with
// the CPU backend's rounding, 16-byte vector packing, warp/block reductions, IEEE float operations that
// --use_fast_math cannot rewrite, and launch sizing.
//
// The CUDA sources build with --use_fast_math (CMakeLists.txt): plain `a / b`, `sqrtf`, `expf`, `sinf` become
// approximations, subnormals flush to zero and `a * b + c` contracts into an FMA. Where a result must equal the
// CPU's bit for bit (the optimizer states, the residual adds), the kernels call the `ieee::` operations, which
// are inline PTX without `.ftz`: the compiler can neither fuse nor approximate them. Those operations and the
// bf16 conversions are written once for the CPU and the GPU in qlora_float.h; they are brought in here.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include "common.cuh"
#include "qlora_float.h"

namespace qk {

// ------------------------------------------------------------------
// bf16 / f16 <-> f32

// bf16: round to nearest even; NaN stays a quiet NaN with its sign and top payload bits (as the CPU backend does)
using ::qlora::bf16_to_f32;
using ::qlora::f32_to_bf16;

__device__ __forceinline__ float f16_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t f32_to_f16(float f) { return __half_as_ushort(__float2half_rn(f)); }

// 8 bf16 values in a 16-byte vector
__device__ __forceinline__ void unpack_bf16x8(const uint4& u, float f[8]) {
    f[0] = __uint_as_float(u.x << 16);
    f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16);
    f[3] = __uint_as_float(u.y & 0xffff0000u);
    f[4] = __uint_as_float(u.z << 16);
    f[5] = __uint_as_float(u.z & 0xffff0000u);
    f[6] = __uint_as_float(u.w << 16);
    f[7] = __uint_as_float(u.w & 0xffff0000u);
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)f32_to_bf16(lo) | ((uint32_t)f32_to_bf16(hi) << 16);
}

__device__ __forceinline__ uint4 pack_bf16x8(const float f[8]) {
    uint4 u;
    u.x = pack_bf16x2(f[0], f[1]);
    u.y = pack_bf16x2(f[2], f[3]);
    u.z = pack_bf16x2(f[4], f[5]);
    u.w = pack_bf16x2(f[6], f[7]);
    return u;
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }

// IEEE single-precision operations, round to nearest even, subnormals kept (no .ftz), never contracted
namespace ieee = ::qlora::ieee;

// ------------------------------------------------------------------
// reductions (blockDim.x a multiple of 32; every thread of the block must call them)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = ieee::max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// the block's sum, returned to every thread; `scratch` holds 32 values (reusable right after the call)
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : (T)0;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -FLT_MAX;
    return warp_max(v);
}

// ------------------------------------------------------------------
// launch sizing

// multiprocessors of the current device (cached per device)
inline int num_sms() {
    static int cached[64] = {0};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
    if (cached[dev] == 0) {
        int n = 0;
        if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 1;
        cached[dev] = n;
    }
    return cached[dev];
}

inline int round_up_warp(int64_t threads) { return (int)(((threads + 31) / 32) * 32); }

// a grid-stride grid: enough blocks for `work` items, at most `per_sm` blocks a multiprocessor
inline int grid_for(int64_t work, int threads, int per_sm = 16) {
    int64_t blocks = (work + threads - 1) / threads;
    const int64_t cap = (int64_t)num_sms() * per_sm;
    if (blocks > cap) blocks = cap;
    return blocks < 1 ? 1 : (int)blocks;
}

}  // namespace qk
