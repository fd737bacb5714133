// cpu_check.cpp: bindings of the weight checks (qlora_cpu_count_nonfinite in native/include/qlora_ops.h).
// Mirrored by hand in src/backend/native-check-types.ts.
#include "../include/qlora_ops.h"
#include "cpu_bindings.h"
#include "napi_util.h"

using namespace qlora_napi;

// countNonfinite(data, dtype, n) -> {nan, inf}; data is a Float32Array for dtype 0 (f32), a Uint16Array of
// bits for 1 (bf16) and 2 (f16)
static Napi::Value CountNonfinite(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t dtype = int_arg(info, 1), n = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    if (n < 0) {
        Napi::RangeError::New(env, "countNonfinite: n must be >= 0").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    const void* data = nullptr;
    if (dtype == QLORA_DTYPE_F32)
        data = array_arg<float>(info, 0, n);
    else if (dtype == QLORA_DTYPE_BF16 || dtype == QLORA_DTYPE_F16)
        data = array_arg<uint16_t>(info, 0, n);
    else {
        Napi::RangeError::New(env, "countNonfinite: dtype must be 0 (f32), 1 (bf16) or 2 (f16)")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    QLORA_CHECK_ARGS(env);
    int64_t nans = 0, infs = 0;
    qlora_cpu_count_nonfinite((int)dtype, data, n, &nans, &infs);
    Napi::Object result = Napi::Object::New(env);
    result.Set("nan", Napi::Number::New(env, (double)nans));
    result.Set("inf", Napi::Number::New(env, (double)infs));
    return result;
}

void register_check_ops(Napi::Env env, Napi::Object exports) {
    exports.Set("countNonfinite", Napi::Function::New(env, CountNonfinite, "countNonfinite"));
}
