// qlora_float.h: float32 arithmetic that must give the same bits on the CPU and the GPU, written once for both:
// the IEEE single-precision operations (round to nearest even, subnormals kept, never contracted) and the
// bf16 <-> f32 conversions. Included by the CPU ops (g++) and the CUDA sources (nvcc); C++ only.
//
// On the device the sources build with --use_fast_math (CMakeLists.txt): plain `a / b`, `sqrtf` become
// approximations, subnormals flush to zero and `a * b + c` contracts into an FMA. So each device operation here is
// inline PTX without `.ftz`, which the compiler can neither fuse nor approximate. On the host the same
// operations are the plain operators and libm calls: the CPU files that use them switch contraction off
// (`#pragma GCC optimize("fp-contract=off")` before their includes) and write the fused operations of the
// references as explicit ieee::fma, so that host and device evaluate the same expression tree.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

// QLORA_HD: callable from host and device code under nvcc, a plain function elsewhere
#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__
#define QLORA_INLINE __forceinline__
#else
#define QLORA_HD
#define QLORA_INLINE inline
#endif

// a loop the device compiler should unroll (the host compiler decides on its own)
#if defined(__CUDA_ARCH__)
#define QLORA_UNROLL _Pragma("unroll")
#else
#define QLORA_UNROLL
#endif

namespace qlora {

QLORA_HD QLORA_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

QLORA_HD QLORA_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

// ------------------------------------------------------------------
// IEEE single-precision operations, round to nearest even, subnormals kept (no .ftz), never contracted

namespace ieee {

QLORA_HD QLORA_INLINE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return a * b;
#endif
}
QLORA_HD QLORA_INLINE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return a + b;
#endif
}
QLORA_HD QLORA_INLINE float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return a - b;
#endif
}
QLORA_HD QLORA_INLINE float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
    return r;
#else
    return fmaf(a, b, c);
#endif
}
QLORA_HD QLORA_INLINE float div(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return a / b;
#endif
}
QLORA_HD QLORA_INLINE float sqrt(float a) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
#else
    return sqrtf(a);
#endif
}
// fmaxf semantics: the other operand when one is NaN
QLORA_HD QLORA_INLINE float max(float a, float b) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return fmaxf(a, b);
#endif
}
QLORA_HD QLORA_INLINE float abs(float a) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(__float_as_uint(a) & 0x7fffffffu);
#else
    return fabsf(a);
#endif
}
// ordered comparisons without flushing subnormal operands (false when either is NaN)
QLORA_HD QLORA_INLINE bool gt(float a, float b) {
#if defined(__CUDA_ARCH__)
    uint32_t r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
    return r != 0;
#else
    return a > b;
#endif
}
QLORA_HD QLORA_INLINE bool lt(float a, float b) { return gt(b, a); }
QLORA_HD QLORA_INLINE bool is_finite(float a) {
#if defined(__CUDA_ARCH__)
    return (__float_as_uint(a) & 0x7f800000u) != 0x7f800000u;
#else
    return isfinite(a);
#endif
}
QLORA_HD QLORA_INLINE bool sign_bit(float a) {
#if defined(__CUDA_ARCH__)
    return (__float_as_uint(a) >> 31) != 0;
#else
    return signbit(a);
#endif
}

}  // namespace ieee

// ------------------------------------------------------------------
// bf16 <-> f32

QLORA_HD QLORA_INLINE float bf16_to_f32(uint16_t h) { return bits_float((uint32_t)h << 16); }

// round to nearest even; NaN stays a quiet NaN with its sign and top payload bits
QLORA_HD QLORA_INLINE uint16_t f32_to_bf16(float f) {
    const uint32_t b = float_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// f rounded to the nearest bf16 (ties to even), as f32; a NaN is returned as it is (payload and all)
QLORA_HD QLORA_INLINE float round_bf16(float f) {
    const uint32_t b = float_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return f;
    return bf16_to_f32(f32_to_bf16(f));
}

}  // namespace qlora
