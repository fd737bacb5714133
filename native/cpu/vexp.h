// vexp.h: expf over arrays for the CPU ops outside ops.cpp (ops.cpp defines it with its eight-lane glibc expf)
#pragma once
#include <stdint.h>

namespace qlora {

// x[i] = expf(x[i]) for i < n, bit for bit this process's expf (eight lanes at a time where ops.cpp's check at first
// use found its vector expf equal to it)
void expf_inplace(float* x, int64_t n);

}  // namespace qlora
