// elementwise.cu: conversions, fill, scale, add, axpy, cast-add, the gated MLP activation, soft-capping and the KV
// cache write (kernels.h).
//
// One grid-stride kernel template: each op processes W elements per 16-byte access (`vec`) when every pointer
// is 16-byte aligned, and one element at a time (`one`) for the tail or for unaligned pointers.
#include "kernels.h"
#include "kernel_utils.cuh"
#include "kv_cache_row.cuh"
#include "../include/qlora_act.h"

using namespace qk;

namespace {

constexpr int kThreads = 256;

template <class Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(Op op, int64_t nvec, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (int64_t i = tid; i < nvec; i += stride) op.vec(i);
    for (int64_t i = nvec * Op::W + tid; i < n; i += stride) op.one(i);
}

template <class Op>
cudaError_t launch(const Op& op, int64_t n, bool aligned, cudaStream_t stream) {
    if (n < 0) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    const int64_t nvec = aligned ? n / Op::W : 0;
    const int64_t tail = n - nvec * Op::W;
    elementwise_kernel<<<grid_for(nvec > tail ? nvec : tail, kThreads), kThreads, 0, stream>>>(op, nvec, n);
    return cudaGetLastError();
}

__device__ __forceinline__ float4 load4(const float* p, int64_t i) { return reinterpret_cast<const float4*>(p)[i]; }
__device__ __forceinline__ void store4(float* p, int64_t i, float4 v) { reinterpret_cast<float4*>(p)[i] = v; }
__device__ __forceinline__ uint4 load8(const uint16_t* p, int64_t i) { return reinterpret_cast<const uint4*>(p)[i]; }
__device__ __forceinline__ void store8(uint16_t* p, int64_t i, uint4 v) { reinterpret_cast<uint4*>(p)[i] = v; }

// 8 floats starting at element 8*i of a 16-byte aligned f32 buffer
__device__ __forceinline__ void load_f32x8(const float* p, int64_t i, float f[8]) {
    const float4 a = load4(p, 2 * i), b = load4(p, 2 * i + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
__device__ __forceinline__ void store_f32x8(float* p, int64_t i, const float f[8]) {
    store4(p, 2 * i, make_float4(f[0], f[1], f[2], f[3]));
    store4(p, 2 * i + 1, make_float4(f[4], f[5], f[6], f[7]));
}

// ------------------------------------------------------------------
// conversions

struct Bf16ToF32 {
    static constexpr int W = 8;
    float* out;
    const uint16_t* inp;
    __device__ void vec(int64_t i) const {
        float f[8];
        unpack_bf16x8(load8(inp, i), f);
        store_f32x8(out, i, f);
    }
    __device__ void one(int64_t i) const { out[i] = bf16_to_f32(inp[i]); }
};

struct F16ToF32 {
    static constexpr int W = 8;
    float* out;
    const uint16_t* inp;
    __device__ void vec(int64_t i) const {
        const uint4 u = load8(inp, i);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
        float f[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            f[2 * k] = f16_to_f32((uint16_t)(w[k] & 0xffffu));
            f[2 * k + 1] = f16_to_f32((uint16_t)(w[k] >> 16));
        }
        store_f32x8(out, i, f);
    }
    __device__ void one(int64_t i) const { out[i] = f16_to_f32(inp[i]); }
};

struct F32ToBf16 {
    static constexpr int W = 8;
    uint16_t* out;
    const float* inp;
    __device__ void vec(int64_t i) const {
        float f[8];
        load_f32x8(inp, i, f);
        store8(out, i, pack_bf16x8(f));
    }
    __device__ void one(int64_t i) const { out[i] = f32_to_bf16(inp[i]); }
};

struct F32ToF16 {
    static constexpr int W = 8;
    uint16_t* out;
    const float* inp;
    __device__ void vec(int64_t i) const {
        float f[8];
        load_f32x8(inp, i, f);
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = (uint32_t)f32_to_f16(f[2 * k]) | ((uint32_t)f32_to_f16(f[2 * k + 1]) << 16);
        store8(out, i, make_uint4(w[0], w[1], w[2], w[3]));
    }
    __device__ void one(int64_t i) const { out[i] = f32_to_f16(inp[i]); }
};

// ------------------------------------------------------------------
// fill, scale, add, axpy, cast-add

struct FillF32 {
    static constexpr int W = 4;
    float* x;
    float value;
    __device__ void vec(int64_t i) const { store4(x, i, make_float4(value, value, value, value)); }
    __device__ void one(int64_t i) const { x[i] = value; }
};

struct FillBf16 {
    static constexpr int W = 8;
    uint16_t* x;
    uint16_t value;
    __device__ void vec(int64_t i) const {
        const uint32_t w = (uint32_t)value | ((uint32_t)value << 16);
        store8(x, i, make_uint4(w, w, w, w));
    }
    __device__ void one(int64_t i) const { x[i] = value; }
};

struct ScaleF32 {
    static constexpr int W = 4;
    float* x;
    float s;
    __device__ void vec(int64_t i) const {
        float4 v = load4(x, i);
        v.x = ieee::mul(v.x, s), v.y = ieee::mul(v.y, s), v.z = ieee::mul(v.z, s), v.w = ieee::mul(v.w, s);
        store4(x, i, v);
    }
    __device__ void one(int64_t i) const { x[i] = ieee::mul(x[i], s); }
};

struct ScaleBf16 {
    static constexpr int W = 8;
    uint16_t* x;
    float s;
    __device__ void vec(int64_t i) const {
        float f[8];
        unpack_bf16x8(load8(x, i), f);
#pragma unroll
        for (int k = 0; k < 8; k++) f[k] = ieee::mul(f[k], s);
        store8(x, i, pack_bf16x8(f));
    }
    __device__ void one(int64_t i) const { x[i] = f32_to_bf16(ieee::mul(bf16_to_f32(x[i]), s)); }
};

struct AddF32 {
    static constexpr int W = 4;
    float* y;
    const float* x;
    __device__ void vec(int64_t i) const {
        float4 a = load4(y, i);
        const float4 b = load4(x, i);
        a.x = ieee::add(a.x, b.x), a.y = ieee::add(a.y, b.y), a.z = ieee::add(a.z, b.z), a.w = ieee::add(a.w, b.w);
        store4(y, i, a);
    }
    __device__ void one(int64_t i) const { y[i] = ieee::add(y[i], x[i]); }
};

struct AddBf16 {
    static constexpr int W = 8;
    uint16_t* y;
    const uint16_t* x;
    __device__ void vec(int64_t i) const {
        float a[8], b[8];
        unpack_bf16x8(load8(y, i), a);
        unpack_bf16x8(load8(x, i), b);
#pragma unroll
        for (int k = 0; k < 8; k++) a[k] = ieee::add(a[k], b[k]);
        store8(y, i, pack_bf16x8(a));
    }
    __device__ void one(int64_t i) const { y[i] = f32_to_bf16(ieee::add(bf16_to_f32(y[i]), bf16_to_f32(x[i]))); }
};

struct AxpyF32 {
    static constexpr int W = 4;
    float* y;
    const float* x;
    float alpha;
    __device__ void vec(int64_t i) const {
        float4 a = load4(y, i);
        const float4 b = load4(x, i);
        a.x = ieee::fma(alpha, b.x, a.x), a.y = ieee::fma(alpha, b.y, a.y);
        a.z = ieee::fma(alpha, b.z, a.z), a.w = ieee::fma(alpha, b.w, a.w);
        store4(y, i, a);
    }
    __device__ void one(int64_t i) const { y[i] = ieee::fma(alpha, x[i], y[i]); }
};

struct CastAddBf16F32 {
    static constexpr int W = 8;
    float* y;
    const uint16_t* x;
    float alpha;
    __device__ void vec(int64_t i) const {
        float a[8], b[8];
        load_f32x8(y, i, a);
        unpack_bf16x8(load8(x, i), b);
#pragma unroll
        for (int k = 0; k < 8; k++) a[k] = ieee::fma(alpha, b[k], a[k]);
        store_f32x8(y, i, a);
    }
    __device__ void one(int64_t i) const { y[i] = ieee::fma(alpha, bf16_to_f32(x[i]), y[i]); }
};

// ------------------------------------------------------------------
// logit soft-capping: native/include/qlora_act.h's function

struct SoftcapBf16 {
    static constexpr int W = 8;
    uint16_t* x;
    float cap;
    __device__ void vec(int64_t i) const {
        float a[8];
        unpack_bf16x8(load8(x, i), a);
#pragma unroll
        for (int k = 0; k < 8; k++) a[k] = qlora_act::softcap(a[k], cap);
        store8(x, i, pack_bf16x8(a));
    }
    __device__ void one(int64_t i) const { x[i] = f32_to_bf16(qlora_act::softcap(bf16_to_f32(x[i]), cap)); }
};

struct SoftcapF32 {
    static constexpr int W = 1;
    float* x;
    float cap;
    __device__ void vec(int64_t i) const { one(i); }
    __device__ void one(int64_t i) const { x[i] = qlora_act::softcap(x[i], cap); }
};

// ------------------------------------------------------------------
// the gated MLP's activation, out = act(gate) * up: native/include/qlora_act.h's, one kernel per qlora_gated_act

template <int Act>
struct GatedActForward {
    static constexpr int W = 8;
    uint16_t* out;
    const uint16_t* gate;
    const uint16_t* up;
    __device__ void vec(int64_t i) const {
        float g[8], u[8];
        unpack_bf16x8(load8(gate, i), g);
        unpack_bf16x8(load8(up, i), u);
#pragma unroll
        for (int k = 0; k < 8; k++) g[k] = qlora_act::gated_forward<Act>(g[k], u[k]);
        store8(out, i, pack_bf16x8(g));
    }
    __device__ void one(int64_t i) const {
        out[i] = f32_to_bf16(qlora_act::gated_forward<Act>(bf16_to_f32(gate[i]), bf16_to_f32(up[i])));
    }
};

template <int Act>
struct GatedActBackward {
    static constexpr int W = 8;
    uint16_t* dgate;
    uint16_t* dup;
    const uint16_t* dout;
    const uint16_t* gate;
    const uint16_t* up;
    __device__ void vec(int64_t i) const {
        float d[8], g[8], u[8], dg[8], du[8];
        unpack_bf16x8(load8(dout, i), d);
        unpack_bf16x8(load8(gate, i), g);
        unpack_bf16x8(load8(up, i), u);
#pragma unroll
        for (int k = 0; k < 8; k++) qlora_act::gated_backward<Act>(d[k], g[k], u[k], dg[k], du[k]);
        store8(dgate, i, pack_bf16x8(dg));
        store8(dup, i, pack_bf16x8(du));
    }
    __device__ void one(int64_t i) const {
        float dg, du;
        qlora_act::gated_backward<Act>(bf16_to_f32(dout[i]), bf16_to_f32(gate[i]), bf16_to_f32(up[i]), dg, du);
        dgate[i] = f32_to_bf16(dg);
        dup[i] = f32_to_bf16(du);
    }
};

}  // namespace

// ------------------------------------------------------------------
// launchers

extern "C" cudaError_t qlora_cuda_bf16_to_f32(float* out, const uint16_t* inp, int64_t n, cudaStream_t stream) {
    return launch(Bf16ToF32{out, inp}, n, aligned16(out) && aligned16(inp), stream);
}

extern "C" cudaError_t qlora_cuda_f16_to_f32(float* out, const uint16_t* inp, int64_t n, cudaStream_t stream) {
    return launch(F16ToF32{out, inp}, n, aligned16(out) && aligned16(inp), stream);
}

extern "C" cudaError_t qlora_cuda_f32_to_bf16(uint16_t* out, const float* inp, int64_t n, cudaStream_t stream) {
    return launch(F32ToBf16{out, inp}, n, aligned16(out) && aligned16(inp), stream);
}

extern "C" cudaError_t qlora_cuda_f32_to_f16(uint16_t* out, const float* inp, int64_t n, cudaStream_t stream) {
    return launch(F32ToF16{out, inp}, n, aligned16(out) && aligned16(inp), stream);
}

extern "C" cudaError_t qlora_cuda_fill_f32(float* x, float value, int64_t n, cudaStream_t stream) {
    return launch(FillF32{x, value}, n, aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_fill_bf16(uint16_t* x, float value, int64_t n, cudaStream_t stream) {
    // the fill value rounded on the host, by the device's f32_to_bf16
    return launch(FillBf16{x, f32_to_bf16(value)}, n, aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_scale_f32(float* x, float s, int64_t n, cudaStream_t stream) {
    return launch(ScaleF32{x, s}, n, aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_scale_bf16(uint16_t* x, float s, int64_t n, cudaStream_t stream) {
    return launch(ScaleBf16{x, s}, n, aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_add_f32(float* y, const float* x, int64_t n, cudaStream_t stream) {
    return launch(AddF32{y, x}, n, aligned16(y) && aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_add_bf16(uint16_t* y, const uint16_t* x, int64_t n, cudaStream_t stream) {
    return launch(AddBf16{y, x}, n, aligned16(y) && aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_axpy_f32(float* y, float alpha, const float* x, int64_t n, cudaStream_t stream) {
    return launch(AxpyF32{y, x, alpha}, n, aligned16(y) && aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_cast_add_bf16_f32(float* y, const uint16_t* x, float alpha, int64_t n,
                                                    cudaStream_t stream) {
    return launch(CastAddBf16F32{y, x, alpha}, n, aligned16(y) && aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_gated_act_forward(uint16_t* out, const uint16_t* gate, const uint16_t* up, int64_t n,
                                                    int act, cudaStream_t stream) {
    const bool aligned = aligned16(out) && aligned16(gate) && aligned16(up);
    switch (act) {
        case QLORA_ACT_SILU:
            return launch(GatedActForward<QLORA_ACT_SILU>{out, gate, up}, n, aligned, stream);
        case QLORA_ACT_GELU_TANH:
            return launch(GatedActForward<QLORA_ACT_GELU_TANH>{out, gate, up}, n, aligned, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

extern "C" cudaError_t qlora_cuda_gated_act_backward(uint16_t* dgate, uint16_t* dup, const uint16_t* dout,
                                                     const uint16_t* gate, const uint16_t* up, int64_t n, int act,
                                                     cudaStream_t stream) {
    const bool aligned = aligned16(dgate) && aligned16(dup) && aligned16(dout) && aligned16(gate) && aligned16(up);
    switch (act) {
        case QLORA_ACT_SILU:
            return launch(GatedActBackward<QLORA_ACT_SILU>{dgate, dup, dout, gate, up}, n, aligned, stream);
        case QLORA_ACT_GELU_TANH:
            return launch(GatedActBackward<QLORA_ACT_GELU_TANH>{dgate, dup, dout, gate, up}, n, aligned, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

extern "C" cudaError_t qlora_cuda_softcap_bf16(uint16_t* x, float cap, int64_t n, cudaStream_t stream) {
    if (!(cap > 0.0f)) return cudaErrorInvalidValue;
    return launch(SoftcapBf16{x, cap}, n, aligned16(x), stream);
}

extern "C" cudaError_t qlora_cuda_softcap_f32(float* x, float cap, int64_t n, cudaStream_t stream) {
    if (!(cap > 0.0f)) return cudaErrorInvalidValue;
    return launch(SoftcapF32{x, cap}, n, true, stream);
}

// ------------------------------------------------------------------
// KV cache: row b's T new positions go to positions pasts[b] .. pasts[b] + T - 1 of its cache row, read from
// device memory so that a captured decoding step (CUDA graph) replays at any lengths. Paged: position j of row b
// is row j % block of block table[b * table_stride + j / block] of the cache.

namespace {

__global__ void __launch_bounds__(kThreads)
    cache_write_kernel(uint16_t* cache, const uint16_t* x, const int32_t* pasts, const int32_t* table,
                       int64_t table_stride, int64_t block, int T, int64_t capacity, int64_t row_elems, bool vec) {
    const int b = blockIdx.x / T, t = blockIdx.x % T;
    const int64_t at = qk::kv_cache_row(pasts, table, table_stride, block, capacity, b, t);
    if (at < 0) return;
    uint16_t* dst = cache + at * row_elems;
    const uint16_t* src = x + ((int64_t)b * T + t) * row_elems;
    if (vec) {
        for (int64_t i = threadIdx.x; i < row_elems / 8; i += blockDim.x) store8(dst, i, load8(src, i));
    } else {
        for (int64_t i = threadIdx.x; i < row_elems; i += blockDim.x) dst[i] = src[i];
    }
}

}  // namespace

extern "C" cudaError_t qlora_cuda_cache_write(uint16_t* cache, const uint16_t* x, const int32_t* pasts,
                                              const int32_t* table, int64_t table_stride, int64_t block, int64_t B,
                                              int64_t T, int64_t capacity, int64_t row_elems, cudaStream_t stream) {
    if (B < 0 || T < 0 || capacity < 0 || row_elems < 0 || B * T > INT32_MAX) return cudaErrorInvalidValue;
    if (table && (block < 1 || table_stride < 1 || capacity > table_stride * block)) return cudaErrorInvalidValue;
    if (B == 0 || T == 0 || row_elems == 0) return cudaSuccess;
    const bool vec = row_elems % 8 == 0 && aligned16(cache) && aligned16(x);
    cache_write_kernel<<<(unsigned)(B * T), kThreads, 0, stream>>>(cache, x, pasts, table, table_stride, block, (int)T,
                                                                   capacity, row_elems, vec);
    return cudaGetLastError();
}

// ------------------------------------------------------------------
// column blocks of row-major matrices: one strided 2-D copy (a memcpy node when a decoding step is recorded)

extern "C" cudaError_t qlora_cuda_copy_columns(uint16_t* dst, int64_t dst_cols, int64_t dst_offset, const uint16_t* src,
                                               int64_t src_cols, int64_t src_offset, int64_t M, int64_t n,
                                               cudaStream_t stream) {
    if (M < 0 || n < 0 || dst_offset < 0 || src_offset < 0 || dst_offset + n > dst_cols || src_offset + n > src_cols)
        return cudaErrorInvalidValue;
    if (M == 0 || n == 0) return cudaSuccess;
    const size_t elem = sizeof(uint16_t);
    return cudaMemcpy2DAsync(dst + dst_offset, (size_t)dst_cols * elem, src + src_offset, (size_t)src_cols * elem,
                             (size_t)n * elem, (size_t)M, cudaMemcpyDeviceToDevice, stream);
}
