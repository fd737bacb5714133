// cpu_bindings.h: each op family binds its own functions into the CPU addon's exports (one file each:
// native/addon/cpu_<family>.cpp), so adding a family touches no other binding file.
#pragma once
#include <napi.h>

void register_quant_ops(Napi::Env env, Napi::Object exports);  // cpu_quant.cpp
void register_optim_ops(Napi::Env env, Napi::Object exports);  // cpu_optim.cpp
void register_gguf_ops(Napi::Env env, Napi::Object exports);   // cpu_gguf.cpp
void register_check_ops(Napi::Env env, Napi::Object exports);  // cpu_check.cpp
