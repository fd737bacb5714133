// qlora_bnb.h: bitsandbytes' 8-bit dynamic quantization, written once for the CPU ops and the CUDA kernels:
// the dynamic map (create_dynamic_map), the searches that quantize a value to a code of a sorted 256-entry map
// (quantize_2D of the 8-bit optimizers, dQuantize of quantize_blockwise) and the nested absmax of double
// quantization (docs: SPEC-quant.md §4-§6, §9). C++ only; the arithmetic is qlora_float.h's, so host and device
// give the same bits, which are bnb's.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "qlora_float.h"

namespace qlora {
namespace bnb {

// ------------------------------------------------------------------
// dynamic map (host only: the device gets the map from the host)

// torch.linspace(start, end, steps) in float32 on the CPU: step = (end - start) / (steps - 1); the first half
// start + step*i, the second half end - step*(steps - 1 - i), each a fused multiply-add
inline void linspace_f32(float* out, float start, float end, int steps) {
    float step = (end - start) / (float)(steps - 1);
    int halfway = steps / 2;
    for (int i = 0; i < steps; i++)
        out[i] = i < halfway ? fmaf(step, (float)i, start) : fmaf(-step, (float)(steps - 1 - i), end);
}

// bnb create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): 7 decades of means of linspace(0.1, 1)
// scaled by 10^(i-6) (the scale rounded to float32, then a float32 product), plus 0 and 1, sorted. out[256]
inline void create_dynamic_map(float* out, bool is_signed) {
    float data[256];
    int k = 0;
    float boundaries[130];
    for (int i = 0; i < 7; i++) {
        int fraction_items = is_signed ? (1 << i) + 1 : (1 << (i + 1)) + 1;
        linspace_f32(boundaries, 0.1f, 1.0f, fraction_items);
        float scale = (float)pow(10.0, (double)(i - 6));
        for (int j = 0; j + 1 < fraction_items; j++) {
            float mean = (boundaries[j] + boundaries[j + 1]) / 2.0f;
            data[k++] = scale * mean;
            if (is_signed) data[k++] = -scale * mean;
        }
    }
    data[k++] = 0.0f;
    data[k++] = 1.0f;
    while (k < 256) data[k++] = 0.0f;  // not reached for 8 bits: the map has exactly 256 entries
    // insertion sort (256 entries, once per optimizer)
    for (int i = 1; i < 256; i++) {
        float x = data[i];
        int j = i - 1;
        while (j >= 0 && data[j] > x) {
            data[j + 1] = data[j];
            j--;
        }
        data[j + 1] = x;
    }
    memcpy(out, data, sizeof(data));
}

// ------------------------------------------------------------------
// quantizing to the nearest code of a sorted 256-entry map

namespace detail {
// bnb's search: a 7-step binary search from index 127, then a comparison with the midpoint to the neighbour on
// the side x lies. Equal to "nearest entry" except at exact midpoints: ties go to the lower index above the
// pivot and to the pivot below it. A NaN (0/0 in an all-zero block) compares false everywhere and walks down to
// index 0, on the CPU as on the GPU.
// `lower`/`upper` start as the map's assumed ends (SIGNED: [-1, 1], else [0, 1]); ENDS_FROM_MAP re-reads them
// from code[0]/code[255] when the search never moved off an end (dQuantize does, quantize_2D does not).
template <bool SIGNED, bool ENDS_FROM_MAP>
QLORA_HD QLORA_INLINE uint8_t search(const float* code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = SIGNED ? -1.0f : 0.0f, upper = 1.0f;
    float val = code[127];
    QLORA_UNROLL
    for (int i = 64; i > 0; i >>= 1) {
        if (ieee::gt(x, val)) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (ENDS_FROM_MAP) {
        if (upper_pivot == 255) upper = code[upper_pivot];
        if (lower_pivot == 0) lower = code[lower_pivot];
    }
    if (ieee::gt(x, val)) {
        const float midpoint = ieee::mul(ieee::add(upper, val), 0.5f);
        return (uint8_t)(ieee::gt(x, midpoint) ? upper_pivot : pivot);
    }
    const float midpoint = ieee::mul(ieee::add(lower, val), 0.5f);
    return (uint8_t)(ieee::lt(x, midpoint) ? lower_pivot : pivot);
}
}  // namespace detail

// bnb's quantize_2D<SIGNED> (the 8-bit optimizers' state codes): SIGNED for the signed map of the first moment
template <bool SIGNED>
QLORA_HD QLORA_INLINE uint8_t quantize_2d(const float* code, float x) {
    return detail::search<SIGNED, false>(code, x);
}

// bnb's dQuantize<0> (quantize_blockwise, the codes of double quantization)
QLORA_HD QLORA_INLINE uint8_t dquantize(const float* code, float x) { return detail::search<true, true>(code, x); }

// ------------------------------------------------------------------
// double quantization

// the absmax of a 4-bit block from its 8-bit code: fl32(fl32(nested_code[q] * nested_absmax[j]) + offset),
// code_value = nested_code[q], nested_scale = nested_absmax[j]
QLORA_HD QLORA_INLINE float nested_block_absmax(float code_value, float nested_scale, float offset) {
    return ieee::add(ieee::mul(code_value, nested_scale), offset);
}

}  // namespace bnb
}  // namespace qlora
