// Each native op is written by hand three times: the C ABI (native/include, native/cuda headers), the N-API
// registration with its argument unpacking (native/addon/*.cpp) and the TS mirror (src/backend/native-types.ts,
// native-*-types.ts, cuda-*-types.ts). These tests check from the sources that the three agree: the same function
// names per addon, the same argument counts, every C function the addons name declared in a header.
import {test} from "node:test";
import assert from "node:assert/strict";
import {nativeOpMismatches, readNativeOpSources, registeredFunctions, tsDeclarations} from "./helpers/native-ops.js";
import {REPO_ROOT} from "./helpers/paths.js";

const tree = readNativeOpSources(REPO_ROOT);

/** the argument counts the scan found for one registered function, as "min-max" */
function counts(addon: string, name: string): string {
    const f = registeredFunctions(tree).find((r) => r.addon === addon && r.name === name);
    assert.ok(f, `${addon}.${name} registered`);
    return `${f.minArgs}-${f.maxArgs}`;
}

test("the addons' registrations, the TS mirrors and the C headers agree", () => {
    assert.deepEqual(nativeOpMismatches(tree), []);
});

test("the scan sees every registration form and follows the argument helpers", () => {
    const registered = registeredFunctions(tree);
    assert.ok(registered.filter((r) => r.addon === "cpu").length >= 38, "CPU functions");
    assert.ok(registered.filter((r) => r.addon === "cuda").length >= 57, "CUDA functions");
    assert.deepEqual(
        registered.filter((r) => r.maxArgs === null),
        []
    );
    assert.equal(tsDeclarations(tree).length, registered.length);
    // fn("sgemm", Sgemm): literal indices
    assert.equal(counts("cpu", "sgemm"), "13-13");
    // CONVERT(Bf16ToF32, ...): a binding defined by a macro
    assert.equal(counts("cpu", "bf16ToF32"), "3-3");
    // attn_dims(info, 7, d) reads first .. first + 7, then an optional window
    assert.equal(counts("cpu", "attentionForward"), "15-16");
    // add("quantize4bitBf16", Quantize4bit<uint16_t, ...>): a template bound through a lambda
    assert.equal(counts("cpu", "quantize4bitBf16"), "6-6");
    // device_ptrs(info, 0, 11, ...) and sizes(info, 11, ...): loops over first + i; window_arg: an optional window
    assert.equal(counts("cuda", "attentionBackward"), "19-20");
    // Rope<...>(info, "ropeForward") with has_arg(info, 8) and has_arg(info, 9): optional trailing arguments
    assert.equal(counts("cuda", "ropeForward"), "8-10");
    // info.Length() > 2 && ...: optional byte offset
    assert.equal(counts("cuda", "upload"), "2-3");
    assert.equal(counts("cuda", "deviceInfo"), "0-0");
});

test("a changed TS mirror or a C++ binding that stops checking info.Length() is reported", () => {
    const files = new Map(tree);
    const cpuTypes = files.get("src/backend/native-types.ts")!;
    const withoutLdc = cpuTypes.replace(/(C: Float32Array),\s*ldc: number\s*\)/, "$1)");
    assert.notEqual(withoutLdc, cpuTypes);
    files.set("src/backend/native-types.ts", withoutLdc);
    const kernels = files.get("native/addon/cuda_kernels.cpp")!;
    const strictStride = kernels.replace("has_arg(info, 8) ? int_arg(info, 8) : H * D", "int_arg(info, 8)");
    assert.notEqual(strictStride, kernels);
    files.set("native/addon/cuda_kernels.cpp", strictStride);
    assert.deepEqual(nativeOpMismatches(files), [
        "cpu.sgemm: C++ reads 13 arguments, TS declares 12 (native/addon/addon_cpu.cpp Sgemm; src/backend/native-types.ts CpuAddon)",
        "cuda.ropeBackward: C++ requires 9 arguments (no info.Length() check below that), TS makes 8 required (native/addon/cuda_kernels.cpp RopeBackward; src/backend/cuda-kernels-types.ts CudaKernelOps)",
        "cuda.ropeForward: C++ requires 9 arguments (no info.Length() check below that), TS makes 8 required (native/addon/cuda_kernels.cpp RopeForward; src/backend/cuda-kernels-types.ts CudaKernelOps)"
    ]);
});

test("synthetic sources: every kind of disagreement is one line", () => {
    const files = new Map<string, string>([
        [
            "native/addon/napi_util.h",
            `inline int64_t int_arg(const Napi::CallbackInfo& info, size_t i) { return info[i].As<Napi::Number>().Int64Value(); }
             inline bool has_arg(const Napi::CallbackInfo& info, size_t i) { return info.Length() > i && !info[i].IsUndefined(); }`
        ],
        [
            "native/addon/addon_cpu.cpp",
            `#include "../include/qlora_ops.h"
            // reads first, first + 1, ..., first + n - 1
            static bool dims(const Napi::CallbackInfo& info, size_t first, size_t n, int64_t* d) {
                for (size_t i = 0; i < n; i++) d[i] = int_arg(info, first + i);
                return true;
            }
            // add(out, a, b, n): reads 4, TS declares 3
            static Napi::Value Add(const Napi::CallbackInfo& info) {
                int64_t d[2];
                dims(info, 2, 2, d);  // info[99] in a comment is not a read
                qlora_cpu_add(nullptr, nullptr, d[0]);
                return info.Env().Undefined();
            }
            #define UNARY(NAME, FN)                                    \\
                static Napi::Value NAME(const Napi::CallbackInfo& info) { \\
                    FN(int_arg(info, 1));                                  \\
                    return info.Env().Undefined();                         \\
                }
            UNARY(Neg, qlora_cpu_neg)
            UNARY(Abs, qlora_cpu_abs)
            // scale(x, s, n?): the TS may make n optional only where the C++ checks info.Length()
            static Napi::Value Scale(const Napi::CallbackInfo& info) {
                int64_t n = has_arg(info, 2) ? int_arg(info, 2) : 1;
                int64_t s = int_arg(info, 1);
                return info.Env().Undefined();
            }
            static Napi::Value Mul(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), int_arg(info, 2)); }
            static Napi::Value Pick(const Napi::CallbackInfo& info) {
                size_t k = info.Length() - 1;
                return info[k];
            }
            static Napi::Object Init(Napi::Env env, Napi::Object exports) {
                auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
                    exports.Set(name, Napi::Function::New(env, f, name));
                };
                fn("add", Add);
                fn("neg", Neg);
                fn("abs", Abs);
                fn("scale", Scale);
                fn("pick", Pick);
                exports.Set("mul", Napi::Function::New(env, Mul, "multiply"));
                exports.Set("version", Napi::Number::New(env, 1));
                return exports;
            }`
        ],
        [
            "native/addon/cpu_extra.cpp",
            `static Napi::Value Extra(const Napi::CallbackInfo& info) { return info.Env().Undefined(); }
            void register_extra_ops(Napi::Env env, Napi::Object exports) {
                exports.Set("extra", Napi::Function::New(env, Extra, "extra"));
                exports.Set("add", Napi::Function::New(env, Extra, "add"));
            }`
        ],
        ["native/addon/helpers.cpp", "int helper() { return 0; }"],
        [
            "native/include/qlora_ops.h",
            `void qlora_cpu_add(float* y, const float* x, int64_t n);\nvoid qlora_cpu_neg(int64_t n);`
        ],
        [
            "src/backend/native-types.ts",
            `export interface CpuAddon {
                add(out: Float32Array, a: Float32Array, n: number): void;
                neg(n: number): void;
                abs(n: number): void;
                scale(x: Float32Array, s: number, n?: number): void;
                mul: (a: number, b: number, c?: number) => number;
                pick(...values: number[]): number;
                missing(x: number): void;
            }
            export interface Stats { total: number }`
        ],
        ["src/backend/native-extra-types.ts", "export interface ExtraAddon { extra(x: number): void; mul(a: number): number }"]
    ]);
    assert.deepEqual(nativeOpMismatches(files), [
        "cpu.abs: C++ reads 2 arguments, TS declares 1 (native/addon/addon_cpu.cpp Abs; src/backend/native-types.ts CpuAddon)",
        "cpu.add: C++ reads 4 arguments, TS declares 3 (native/addon/addon_cpu.cpp Add; src/backend/native-types.ts CpuAddon)",
        "cpu.add: registered twice (native/addon/addon_cpu.cpp, native/addon/cpu_extra.cpp)",
        "cpu.extra: C++ reads 0 arguments, TS declares 1 (native/addon/cpu_extra.cpp Extra; src/backend/native-extra-types.ts ExtraAddon)",
        "cpu.missing: declared in src/backend/native-types.ts CpuAddon, registered by no C++ (native/addon/addon_cpu.cpp or cpu_*.cpp)",
        "cpu.mul: C++ requires 3 arguments (no info.Length() check below that), TS makes 2 required (native/addon/addon_cpu.cpp Mul; src/backend/native-types.ts CpuAddon)",
        "cpu.mul: TS declares it twice with different parameters (src/backend/native-types.ts CpuAddon, src/backend/native-extra-types.ts ExtraAddon)",
        "cpu.neg: C++ reads 2 arguments, TS declares 1 (native/addon/addon_cpu.cpp Neg; src/backend/native-types.ts CpuAddon)",
        'cpu.pick: cannot tell how many arguments C++ reads: Pick reads index "k" (native/addon/addon_cpu.cpp Pick; src/backend/native-types.ts CpuAddon)',
        'native/addon/addon_cpu.cpp: exports "mul" as a function named "multiply"',
        'native/addon/addon_cpu.cpp: exports.Set("version", ...) sets something the checker does not read',
        "native/addon/cpu_extra.cpp: register_extra_ops is never called from native/addon/addon_cpu.cpp (its functions are not exported)",
        "native/addon/helpers.cpp: belongs to no addon (name it addon_cpu.cpp, cpu_*.cpp, addon_cuda.cpp or cuda_*.cpp)",
        "qlora_cpu_abs: named in native/addon/addon_cpu.cpp, declared in no header under native/include or native/cuda"
    ]);
});
