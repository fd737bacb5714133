// cpu_optim.cpp: bindings of the optimizer ops.
#include "cpu_bindings.h"

void register_optim_ops(Napi::Env env, Napi::Object exports) {
    (void)env;
    (void)exports;
}
