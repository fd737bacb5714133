// cuda_gemm.cpp: bindings of the CUDA gemm ops.
#include "cuda_bindings.h"

void register_cuda_gemm(Napi::Env env, Napi::Object exports) {
    (void)env;
    (void)exports;
}
