// common.cuh: error checking and launch helpers shared by the CUDA kernels.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#define CEIL_DIV(a, b) (((a) + (b)-1) / (b))

// kernels report errors through the return code of their launcher; the addon turns them into JS errors
#define QLORA_CUDA_TRY(call)                    \
    do {                                        \
        cudaError_t err__ = (call);             \
        if (err__ != cudaSuccess) return err__; \
    } while (0)
