// rope.cu: rotary position embedding, rotate-half layout, forward and backward (kernels.h).
//
// One block per token: the block computes cos/sin of the token's D/2 angles into shared memory once, then rotates
// every head. The angle is the f32 product pos * inv_freq[i] (what transformers computes) and its cos/sin are
// evaluated in double and rounded to float: --use_fast_math would turn cosf/sinf into __cosf/__sinf, whose error
// grows with the argument (positions reach 1e5 radians), while the double functions are untouched by it and give
// the correctly rounded float nearly always, i.e. the CPU's cosf/sinf to within an ulp.
#include <limits.h>
#include "kernels.h"
#include "kernel_utils.cuh"

using namespace qk;

namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxHalf = 1024;

template <bool VEC>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(uint16_t* out, const uint16_t* inp, const int32_t* pos, const float* inv_freq, float scaling,
                float sign, int64_t N, int64_t H, int64_t D, int64_t stride) {
    extern __shared__ float table[];  // cos[half], sin[half] (sin carries the sign of the direction)
    const int half = (int)(D / 2);
    float* cs = table;
    float* sn = table + half;
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        __syncthreads();  // the previous token's table is no longer read
        const float p = (float)pos[n];
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const float angle = ieee::mul(p, inv_freq[i]);
            double s, c;
            sincos((double)angle, &s, &c);
            cs[i] = ieee::mul((float)c, scaling);
            sn[i] = ieee::mul(ieee::mul(sign, (float)s), scaling);
        }
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
                float a[8], b[8], ya[8], yb[8];
                unpack_bf16x8(*reinterpret_cast<const uint4*>(x + base), a);
                unpack_bf16x8(*reinterpret_cast<const uint4*>(x + base + half), b);
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const float c = cs[i0 + k], s = sn[i0 + k];
                    ya[k] = a[k] * c - b[k] * s;
                    yb[k] = b[k] * c + a[k] * s;
                }
                *reinterpret_cast<uint4*>(y + base) = pack_bf16x8(ya);
                *reinterpret_cast<uint4*>(y + base + half) = pack_bf16x8(yb);
            }
        } else {
            const int total = (int)H * half;
            for (int q = threadIdx.x; q < total; q += blockDim.x) {
                const int h = q / half;
                const int i = q - h * half;
                const int64_t base = (int64_t)h * D + i;
                const float a = bf16_to_f32(x[base]), b = bf16_to_f32(x[base + half]);
                const float c = cs[i], s = sn[i];
                y[base] = f32_to_bf16(a * c - b * s);
                y[base + half] = f32_to_bf16(b * c + a * s);
            }
        }
    }
}

cudaError_t launch(uint16_t* out, const uint16_t* inp, const int32_t* pos, const float* inv_freq, float scaling,
                   float sign, int64_t N, int64_t H, int64_t D, int64_t stride, cudaStream_t stream) {
    if (N < 0 || H < 0 || D < 0 || D % 2 != 0 || D / 2 > kMaxHalf || H * D > INT_MAX) return cudaErrorInvalidValue;
    if (stride <= 0) stride = H * D;
    if (stride < H * D) return cudaErrorInvalidValue;
    if (N == 0 || H == 0 || D == 0) return cudaSuccess;
    const int64_t half = D / 2;
    const bool vec = half % 8 == 0 && stride % 8 == 0 && aligned16(out) && aligned16(inp);
    const unsigned grid = (unsigned)(N < INT_MAX ? N : INT_MAX);
    const size_t smem = (size_t)(2 * half) * sizeof(float);
    if (vec)
        rope_kernel<true><<<grid, kThreads, smem, stream>>>(out, inp, pos, inv_freq, scaling, sign, N, H, D, stride);
    else
        rope_kernel<false><<<grid, kThreads, smem, stream>>>(out, inp, pos, inv_freq, scaling, sign, N, H, D, stride);
    return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t qlora_cuda_rope_forward(uint16_t* out, const uint16_t* inp, const int32_t* pos,
                                               const float* inv_freq, float attention_scaling, int64_t N, int64_t H,
                                               int64_t D, int64_t row_stride, cudaStream_t stream) {
    return launch(out, inp, pos, inv_freq, attention_scaling, 1.0f, N, H, D, row_stride, stream);
}

extern "C" cudaError_t qlora_cuda_rope_backward(uint16_t* dinp, const uint16_t* dout, const int32_t* pos,
                                                const float* inv_freq, float attention_scaling, int64_t N, int64_t H,
                                                int64_t D, int64_t row_stride, cudaStream_t stream) {
    // the rotation is orthogonal (times a scale): its transpose is the rotation by -angle
    return launch(dinp, dout, pos, inv_freq, attention_scaling, -1.0f, N, H, D, row_stride, stream);
}
