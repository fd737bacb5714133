// cpu_quant.cpp: bindings of the NF4/FP4 and 8-bit blockwise quantization ops.
#include "cpu_bindings.h"

void register_quant_ops(Napi::Env env, Napi::Object exports) {
    (void)env;
    (void)exports;
}
