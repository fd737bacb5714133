// cpu_optim.cpp: bindings of the optimizer ops (native/include/qlora_optim.h). Mirrored by hand in
// src/backend/native-optim-types.ts.
#include "../include/qlora_optim.h"
#include "cpu_bindings.h"
#include "napi_util.h"

using namespace qlora_napi;

static bool check_sizes(Napi::Env env, const char* op, int64_t n, int64_t step) {
    if (n < 0 || step < 1) {
        Napi::RangeError::New(env, std::string(op) + ": n must be >= 0 and step >= 1").ThrowAsJavaScriptException();
        return false;
    }
    return true;
}

// adamwTorchStep(param, expAvg, expAvgSq, grad, lr, beta1, beta2, eps, weightDecay, step, n)
static Napi::Value AdamwTorchStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    double lr = num_arg(info, 4), beta1 = num_arg(info, 5), beta2 = num_arg(info, 6), eps = num_arg(info, 7);
    double wd = num_arg(info, 8);
    int64_t step = int_arg(info, 9), n = int_arg(info, 10);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "adamwTorchStep", n, step)) return env.Undefined();
    float* param = array_arg<float>(info, 0, n);
    float* m = array_arg<float>(info, 1, n);
    float* v = array_arg<float>(info, 2, n);
    const float* grad = array_arg<float>(info, 3, n);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_adamw_torch_step(param, m, v, grad, lr, beta1, beta2, eps, wd, step, n);
    return env.Undefined();
}

// adamwBnb32Step(param, state1, state2, grad, lr, beta1, beta2, eps, weightDecay, step, n)
static Napi::Value AdamwBnb32Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float lr = (float)num_arg(info, 4), beta1 = (float)num_arg(info, 5), beta2 = (float)num_arg(info, 6);
    float eps = (float)num_arg(info, 7), wd = (float)num_arg(info, 8);
    int64_t step = int_arg(info, 9), n = int_arg(info, 10);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "adamwBnb32Step", n, step)) return env.Undefined();
    float* param = array_arg<float>(info, 0, n);
    float* s1 = array_arg<float>(info, 1, n);
    float* s2 = array_arg<float>(info, 2, n);
    const float* grad = array_arg<float>(info, 3, n);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_adamw_bnb32_step(param, s1, s2, grad, lr, beta1, beta2, eps, wd, step, n);
    return env.Undefined();
}

// adamwBnb8Step(param, state1, state2, absmax1, absmax2, grad, qmap1, qmap2,
//               lr, beta1, beta2, eps, weightDecay, step, blocksize, n)
static Napi::Value AdamwBnb8Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float lr = (float)num_arg(info, 8), beta1 = (float)num_arg(info, 9), beta2 = (float)num_arg(info, 10);
    float eps = (float)num_arg(info, 11), wd = (float)num_arg(info, 12);
    int64_t step = int_arg(info, 13), blocksize = int_arg(info, 14), n = int_arg(info, 15);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "adamwBnb8Step", n, step)) return env.Undefined();
    if (blocksize < 1) {
        Napi::RangeError::New(env, "adamwBnb8Step: blocksize must be >= 1").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    int64_t nblocks = (n + blocksize - 1) / blocksize;
    float* param = array_arg<float>(info, 0, n);
    uint8_t* s1 = array_arg<uint8_t>(info, 1, n);
    uint8_t* s2 = array_arg<uint8_t>(info, 2, n);
    float* absmax1 = array_arg<float>(info, 3, nblocks);
    float* absmax2 = array_arg<float>(info, 4, nblocks);
    const float* grad = array_arg<float>(info, 5, n);
    const float* qmap1 = array_arg<float>(info, 6, 256);
    const float* qmap2 = array_arg<float>(info, 7, 256);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_adamw_bnb8_step(param, s1, s2, absmax1, absmax2, grad, qmap1, qmap2, lr, beta1, beta2, eps, wd, step,
                              blocksize, n);
    return env.Undefined();
}

// optimDynamicMap(out, signed)
static Napi::Value OptimDynamicMap(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* out = array_arg<float>(info, 0, 256);
    bool is_signed = bool_arg(info, 1);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_optim_dynamic_map(out, is_signed ? 1 : 0);
    return env.Undefined();
}

// optimSumSquares(x, n) -> number (double accumulation)
static Napi::Value OptimSumSquares(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 1);
    QLORA_CHECK_ARGS(env);
    const float* x = array_arg<float>(info, 0, n < 0 ? 0 : n);
    QLORA_CHECK_ARGS(env);
    return Napi::Number::New(env, n > 0 ? qlora_cpu_optim_sum_squares(x, n) : 0.0);
}

// optimScale(x, s, n): x *= s
static Napi::Value OptimScale(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float s = (float)num_arg(info, 1);
    int64_t n = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    float* x = array_arg<float>(info, 0, n < 0 ? 0 : n);
    QLORA_CHECK_ARGS(env);
    if (n > 0) qlora_cpu_optim_scale(x, s, n);
    return env.Undefined();
}

void register_optim_ops(Napi::Env env, Napi::Object exports) {
    auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
        exports.Set(name, Napi::Function::New(env, f, name));
    };
    fn("adamwTorchStep", AdamwTorchStep);
    fn("adamwBnb32Step", AdamwBnb32Step);
    fn("adamwBnb8Step", AdamwBnb8Step);
    fn("optimDynamicMap", OptimDynamicMap);
    fn("optimSumSquares", OptimSumSquares);
    fn("optimScale", OptimScale);
}
