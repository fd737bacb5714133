// cuda_attention.cpp: bindings of the CUDA attention ops.
#include "cuda_bindings.h"

void register_cuda_attention(Napi::Env env, Napi::Object exports) {
    (void)env;
    (void)exports;
}
