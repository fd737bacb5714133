// cuda_kernels.cpp: bindings of the CUDA kernels ops.
#include "cuda_bindings.h"

void register_cuda_kernels(Napi::Env env, Napi::Object exports) {
    (void)env;
    (void)exports;
}
