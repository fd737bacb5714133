// threads.cpp: the worker-thread count shared by every CPU op.
#include <stdlib.h>
#include <thread>
#include "../include/qlora_ops.h"
#include "parallel.h"

namespace qlora {
static int g_num_threads = 0;

int num_threads() {
    if (g_num_threads <= 0) {
        const char* env = getenv("QLORA_NUM_THREADS");
        int n = env ? atoi(env) : 0;
        if (n <= 0) n = (int)std::thread::hardware_concurrency();
        g_num_threads = n > 0 ? n : 1;
    }
    return g_num_threads;
}
}  // namespace qlora

extern "C" void qlora_cpu_set_num_threads(int n) { qlora::g_num_threads = n; }
extern "C" int qlora_cpu_get_num_threads(void) { return qlora::num_threads(); }
