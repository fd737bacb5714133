// norm.cu: RMSNorm forward/backward and the fused residual add + RMSNorm forward (kernels.h).
//
// One block per row. The vectorized kernels keep the row in registers (K 16-byte vectors a thread, at most 256
// threads), so the row is read from device memory once; rows that are not 16-byte aligned (C % 8 != 0) or longer
// than the register budget take the scalar kernels, which read the row twice. fp32 sums; rstd as the CPU computes
// it (1 / sqrt(ss / C + eps), IEEE division and square root).
#include <limits.h>
#include "kernels.h"
#include "kernel_utils.cuh"

using namespace qk;

namespace {

constexpr int kMaxThreads = 256;
constexpr int kScalarThreads = 256;

__device__ __forceinline__ float rstd_of(float ss, int64_t C, float eps) {
    return ieee::div(1.0f, ieee::sqrt(ieee::add(ieee::div(ss, (float)C), eps)));
}

__device__ __forceinline__ uint4 ld(const uint16_t* p, int64_t j) { return reinterpret_cast<const uint4*>(p)[j]; }
__device__ __forceinline__ void st(uint16_t* p, int64_t j, uint4 v) { reinterpret_cast<uint4*>(p)[j] = v; }

// ------------------------------------------------------------------
// forward

// RESIDUAL: h = bf16(x + y) is written and normalized; otherwise x is normalized (h, y unused)
template <int K, bool RESIDUAL>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_forward_vec(uint16_t* h, uint16_t* out, float* rstd, const uint16_t* x, const uint16_t* y,
                        const uint16_t* weight, int64_t N, int64_t C, float eps) {
    __shared__ float scratch[32];
    const int64_t nvec = C / 8;
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        const int64_t row = n * C;
        uint4 raw[K];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int64_t j = threadIdx.x + (int64_t)k * blockDim.x;
            if (j < nvec) {
                float f[8];
                if (RESIDUAL) {
                    float b[8];
                    unpack_bf16x8(ld(x + row, j), f);
                    unpack_bf16x8(ld(y + row, j), b);
#pragma unroll
                    for (int i = 0; i < 8; i++) f[i] = ieee::add(f[i], b[i]);
                    raw[k] = pack_bf16x8(f);
                    st(h + row, j, raw[k]);
                    unpack_bf16x8(raw[k], f);  // normalize the bf16 residual stream that the backward reads
                } else {
                    raw[k] = ld(x + row, j);
                    unpack_bf16x8(raw[k], f);
                }
#pragma unroll
                for (int i = 0; i < 8; i++) ss += f[i] * f[i];
            }
        }
        ss = block_sum(ss, scratch);
        const float r = rstd_of(ss, C, eps);
        if (rstd && threadIdx.x == 0) rstd[n] = r;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int64_t j = threadIdx.x + (int64_t)k * blockDim.x;
            if (j < nvec) {
                float f[8], w[8];
                unpack_bf16x8(raw[k], f);
                unpack_bf16x8(ld(weight, j), w);
#pragma unroll
                for (int i = 0; i < 8; i++) f[i] = w[i] * (f[i] * r);
                st(out + row, j, pack_bf16x8(f));
            }
        }
    }
}

template <bool RESIDUAL>
__global__ void __launch_bounds__(kScalarThreads)
    rmsnorm_forward_scalar(uint16_t* h, uint16_t* out, float* rstd, const uint16_t* x, const uint16_t* y,
                           const uint16_t* weight, int64_t N, int64_t C, float eps) {
    __shared__ float scratch[32];
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        const int64_t row = n * C;
        float ss = 0.0f;
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
            float v;
            if (RESIDUAL) {
                const uint16_t hv = f32_to_bf16(ieee::add(bf16_to_f32(x[row + c]), bf16_to_f32(y[row + c])));
                h[row + c] = hv;
                v = bf16_to_f32(hv);
            } else {
                v = bf16_to_f32(x[row + c]);
            }
            ss += v * v;
        }
        ss = block_sum(ss, scratch);
        const float r = rstd_of(ss, C, eps);
        if (rstd && threadIdx.x == 0) rstd[n] = r;
        const uint16_t* src = RESIDUAL ? h : x;  // each thread re-reads the elements it wrote itself
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
            out[row + c] = f32_to_bf16(bf16_to_f32(weight[c]) * (bf16_to_f32(src[row + c]) * r));
    }
}

// vectors a thread holds: the smallest K in {1, 2, 4, 8, 16} with ceil(nvec / K) <= 256 threads
int pick_k(int64_t nvec) {
    for (int k = 1; k <= 16; k *= 2)
        if ((nvec + k - 1) / k <= kMaxThreads) return k;
    return 0;
}

template <bool RESIDUAL>
cudaError_t launch_forward(uint16_t* h, uint16_t* out, float* rstd, const uint16_t* x, const uint16_t* y,
                           const uint16_t* weight, int64_t N, int64_t C, float eps, cudaStream_t stream) {
    if (N < 0 || C < 0) return cudaErrorInvalidValue;
    if (N == 0 || C == 0) return cudaSuccess;
    const unsigned grid = (unsigned)(N < INT_MAX ? N : INT_MAX);
    bool aligned = C % 8 == 0 && aligned16(out) && aligned16(x) && aligned16(weight);
    if (RESIDUAL) aligned = aligned && aligned16(h) && aligned16(y);
    const int64_t nvec = C / 8;
    const int K = aligned ? pick_k(nvec) : 0;
    if (K == 0) {
        rmsnorm_forward_scalar<RESIDUAL><<<grid, kScalarThreads, 0, stream>>>(h, out, rstd, x, y, weight, N, C, eps);
        return cudaGetLastError();
    }
    const int threads = round_up_warp((nvec + K - 1) / K);
    switch (K) {
        case 1:
            rmsnorm_forward_vec<1, RESIDUAL><<<grid, threads, 0, stream>>>(h, out, rstd, x, y, weight, N, C, eps);
            break;
        case 2:
            rmsnorm_forward_vec<2, RESIDUAL><<<grid, threads, 0, stream>>>(h, out, rstd, x, y, weight, N, C, eps);
            break;
        case 4:
            rmsnorm_forward_vec<4, RESIDUAL><<<grid, threads, 0, stream>>>(h, out, rstd, x, y, weight, N, C, eps);
            break;
        case 8:
            rmsnorm_forward_vec<8, RESIDUAL><<<grid, threads, 0, stream>>>(h, out, rstd, x, y, weight, N, C, eps);
            break;
        default:
            rmsnorm_forward_vec<16, RESIDUAL><<<grid, threads, 0, stream>>>(h, out, rstd, x, y, weight, N, C, eps);
            break;
    }
    return cudaGetLastError();
}

// ------------------------------------------------------------------
// backward
//   dx = r * w * g - x * k,  k = r^3 / C * sum_j(w_j g_j x_j);   dw += g * x * r
// A thread owns the same columns in every row, so with dweight the grid is capped and each thread sums its
// columns' dweight over the rows it visits in registers, then adds them with one atomic per column per block.

template <int K>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_backward_vec(uint16_t* dinp, float* dweight, const uint16_t* dout, const uint16_t* inp,
                         const uint16_t* weight, const float* rstd, int64_t N, int64_t C, bool accumulate) {
    __shared__ float scratch[32];
    const int64_t nvec = C / 8;
    float w[K][8], dw[K][8];
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int64_t j = threadIdx.x + (int64_t)k * blockDim.x;
        if (j < nvec) unpack_bf16x8(ld(weight, j), w[k]);
#pragma unroll
        for (int i = 0; i < 8; i++) dw[k][i] = 0.0f;
    }
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        const int64_t row = n * C;
        const float r = rstd[n];
        uint4 graw[K], xraw[K];
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int64_t j = threadIdx.x + (int64_t)k * blockDim.x;
            if (j < nvec) {
                graw[k] = ld(dout + row, j);
                xraw[k] = ld(inp + row, j);
                float g[8], x[8];
                unpack_bf16x8(graw[k], g);
                unpack_bf16x8(xraw[k], x);
#pragma unroll
                for (int i = 0; i < 8; i++) dot += w[k][i] * g[i] * x[i];
            }
        }
        dot = block_sum(dot, scratch);
        const float kk = dot * r * r * r / (float)C;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int64_t j = threadIdx.x + (int64_t)k * blockDim.x;
            if (j < nvec) {
                float g[8], x[8], d[8];
                unpack_bf16x8(graw[k], g);
                unpack_bf16x8(xraw[k], x);
#pragma unroll
                for (int i = 0; i < 8; i++) d[i] = r * w[k][i] * g[i] - x[i] * kk;
                if (accumulate) {
                    float old[8];
                    unpack_bf16x8(ld(dinp + row, j), old);
#pragma unroll
                    for (int i = 0; i < 8; i++) d[i] = ieee::add(old[i], d[i]);
                }
                st(dinp + row, j, pack_bf16x8(d));
                if (dweight) {
#pragma unroll
                    for (int i = 0; i < 8; i++) dw[k][i] += g[i] * x[i] * r;
                }
            }
        }
    }
    if (dweight) {
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int64_t j = threadIdx.x + (int64_t)k * blockDim.x;
            if (j < nvec) {
#pragma unroll
                for (int i = 0; i < 8; i++) atomicAdd(dweight + 8 * j + i, dw[k][i]);
            }
        }
    }
}

__global__ void __launch_bounds__(kScalarThreads)
    rmsnorm_backward_scalar(uint16_t* dinp, float* dweight, const uint16_t* dout, const uint16_t* inp,
                            const uint16_t* weight, const float* rstd, int64_t N, int64_t C, bool accumulate) {
    __shared__ float scratch[32];
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        const int64_t row = n * C;
        const float r = rstd[n];
        float dot = 0.0f;
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
            dot += bf16_to_f32(weight[c]) * bf16_to_f32(dout[row + c]) * bf16_to_f32(inp[row + c]);
        dot = block_sum(dot, scratch);
        const float kk = dot * r * r * r / (float)C;
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
            const float g = bf16_to_f32(dout[row + c]), x = bf16_to_f32(inp[row + c]);
            float d = r * bf16_to_f32(weight[c]) * g - x * kk;
            if (accumulate) d = ieee::add(bf16_to_f32(dinp[row + c]), d);
            dinp[row + c] = f32_to_bf16(d);
            if (dweight) atomicAdd(dweight + c, g * x * r);
        }
    }
}

}  // namespace

extern "C" cudaError_t qlora_cuda_rmsnorm_forward(uint16_t* out, float* rstd, const uint16_t* inp,
                                                  const uint16_t* weight, int64_t N, int64_t C, float eps,
                                                  cudaStream_t stream) {
    return launch_forward<false>(nullptr, out, rstd, inp, nullptr, weight, N, C, eps, stream);
}

extern "C" cudaError_t qlora_cuda_residual_rmsnorm_forward(uint16_t* h, uint16_t* out, float* rstd, const uint16_t* x,
                                                           const uint16_t* y, const uint16_t* weight, int64_t N,
                                                           int64_t C, float eps, cudaStream_t stream) {
    return launch_forward<true>(h, out, rstd, x, y, weight, N, C, eps, stream);
}

template <int K>
static cudaError_t launch_backward_vec(int threads, uint16_t* dinp, float* dweight, const uint16_t* dout,
                                       const uint16_t* inp, const uint16_t* weight, const float* rstd, int64_t N,
                                       int64_t C, bool accumulate, cudaStream_t stream) {
    int64_t grid = N < INT_MAX ? N : INT_MAX;
    if (dweight) {
        // enough blocks to fill the GPU once; each then walks many rows
        int per_sm = 0;
        QLORA_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, rmsnorm_backward_vec<K>, threads, 0));
        const int64_t cap = (int64_t)num_sms() * (per_sm > 0 ? per_sm : 1);
        if (grid > cap) grid = cap;
    }
    rmsnorm_backward_vec<K>
        <<<(unsigned)grid, threads, 0, stream>>>(dinp, dweight, dout, inp, weight, rstd, N, C, accumulate);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_rmsnorm_backward(uint16_t* dinp, float* dweight, const uint16_t* dout,
                                                   const uint16_t* inp, const uint16_t* weight, const float* rstd,
                                                   int64_t N, int64_t C, int accumulate, cudaStream_t stream) {
    if (N < 0 || C < 0) return cudaErrorInvalidValue;
    if (N == 0 || C == 0) return cudaSuccess;
    const bool acc = accumulate != 0;
    const bool aligned = C % 8 == 0 && aligned16(dinp) && aligned16(dout) && aligned16(inp) && aligned16(weight);
    const int64_t nvec = C / 8;
    const int K = aligned ? pick_k(nvec) : 0;
    if (K == 0 || K > 4) {
        const unsigned grid = (unsigned)(N < INT_MAX ? N : INT_MAX);
        rmsnorm_backward_scalar<<<grid, kScalarThreads, 0, stream>>>(dinp, dweight, dout, inp, weight, rstd, N, C, acc);
        return cudaGetLastError();
    }
    const int threads = round_up_warp((nvec + K - 1) / K);
    switch (K) {
        case 1:
            return launch_backward_vec<1>(threads, dinp, dweight, dout, inp, weight, rstd, N, C, acc, stream);
        case 2:
            return launch_backward_vec<2>(threads, dinp, dweight, dout, inp, weight, rstd, N, C, acc, stream);
        default:
            return launch_backward_vec<4>(threads, dinp, dweight, dout, inp, weight, rstd, N, C, acc, stream);
    }
}
