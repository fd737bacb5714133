// check.cpp: validity checks on weights as they are read (NaN / Inf counts), at memory speed.
#include <algorithm>
#include <atomic>
#include <string.h>
#include "../include/qlora_ops.h"
#include "parallel.h"

using qlora::parallel_for;

// With the sign bit cleared, a float's bits compare like its magnitude: exactly the exponent mask is an
// infinity, anything above it a NaN. Weights are almost always finite, so each block first takes the largest
// magnitude (an unsigned max, which vectorizes to one instruction per register) and counts only when that max
// says a NaN or an infinity is there.
template <typename Bits, Bits MAGNITUDE>
static inline Bits largest_magnitude(const Bits* data, int64_t n) {
    Bits largest = 0;
    for (int64_t i = 0; i < n; i++) largest = std::max<Bits>(largest, data[i] & MAGNITUDE);
    return largest;
}

template <typename Bits, Bits MAGNITUDE, Bits EXPONENT>
static void count_nonfinite_bits(const Bits* data, int64_t n, int64_t* nan_count, int64_t* inf_count) {
    constexpr int64_t BLOCK = 1 << 14;
    std::atomic<int64_t> nans{0}, infs{0};
    // one core scans warm memory at memory speed: threads only pay off on large tensors, so small ones run inline
    parallel_for(n, 1 << 24, [&](int64_t begin, int64_t end) {
        int64_t chunk_nans = 0, chunk_infs = 0;
        for (int64_t b = begin; b < end; b += BLOCK) {
            int64_t e = std::min(end, b + BLOCK);
            if (largest_magnitude<Bits, MAGNITUDE>(data + b, e - b) < EXPONENT) continue;
            for (int64_t i = b; i < e; i++) {
                Bits magnitude = data[i] & MAGNITUDE;
                chunk_nans += magnitude > EXPONENT;
                chunk_infs += magnitude == EXPONENT;
            }
        }
        nans += chunk_nans;
        infs += chunk_infs;
    });
    *nan_count = nans.load();
    *inf_count = infs.load();
}

extern "C" void qlora_cpu_count_nonfinite(int dtype, const void* data, int64_t n, int64_t* nan_count,
                                          int64_t* inf_count) {
    *nan_count = 0;
    *inf_count = 0;
    if (n <= 0) return;
    switch (dtype) {
        case QLORA_DTYPE_F32:
            count_nonfinite_bits<uint32_t, 0x7fffffffu, 0x7f800000u>((const uint32_t*)data, n, nan_count, inf_count);
            break;
        case QLORA_DTYPE_BF16:
            count_nonfinite_bits<uint16_t, 0x7fff, 0x7f80>((const uint16_t*)data, n, nan_count, inf_count);
            break;
        case QLORA_DTYPE_F16:
            count_nonfinite_bits<uint16_t, 0x7fff, 0x7c00>((const uint16_t*)data, n, nan_count, inf_count);
            break;
        default:
            break;
    }
}
