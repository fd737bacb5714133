// test_pool.cpp: the worker pool behind parallel_for (threads.cpp) on its own, with its workers stopped and
// started by signals the way a busy machine deschedules threads. Run by test/cpu-pool.test.ts:
//
//   c++ -O2 -std=c++17 -pthread -Inative/include native/cpu/test_pool.cpp native/cpu/threads.cpp -o /tmp/test_pool
//   /tmp/test_pool
//
// Prints one line per check and exits 0 when every check passes. Linux only (it signals single threads).
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "qlora_ops.h"
#include "parallel.h"

static int g_failures = 0;
static void check(bool ok, const char* what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) g_failures++;
}

static pid_t tid() { return (pid_t)syscall(SYS_gettid); }

// the pool's workers: every thread of the process but those listed
static std::vector<pid_t> other_threads(const std::vector<pid_t>& mine) {
    std::vector<pid_t> out;
    DIR* d = opendir("/proc/self/task");
    while (dirent* e = readdir(d)) {
        pid_t t = (pid_t)atoi(e->d_name);
        bool listed = false;
        for (pid_t m : mine) listed |= m == t;
        if (t > 0 && !listed) out.push_back(t);
    }
    closedir(d);
    return out;
}

static void signal_thread(pid_t t, int sig) { syscall(SYS_tgkill, getpid(), t, sig); }

// SIGUSR1 parks the receiving thread until g_release (a descheduled thread); SIGUSR2 stalls it for a random
// few hundred microseconds, wherever it is (between reading the job word and claiming, inside a chunk, ...)
static std::atomic<int> g_parked{0};
static std::atomic<bool> g_release{false};
static void park(int) {
    g_parked++;
    timespec ts{0, 100000};
    while (!g_release.load()) nanosleep(&ts, nullptr);
    g_parked--;
}
static void stall(int) {
    timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    timespec ts{0, (now.tv_nsec / 1000 % 300) * 1000};
    nanosleep(&ts, nullptr);
}

// a region of `chunks` chunks that counts the runs of each chunk and the chunks run on the calling thread
struct Region {
    std::vector<std::atomic<int>> runs;
    std::atomic<int> on_caller{0}, stale{0};
    pid_t caller;
    explicit Region(int64_t chunks) : runs((size_t)chunks), caller(tid()) {}
};

static std::atomic<uint64_t> g_current{0};

// runs one region (id: a number no other region uses); returns whether every chunk ran exactly once
static bool run_region(Region& r, uint64_t id) {
    g_current.store(id);
    const int64_t chunks = (int64_t)r.runs.size();
    // grain 1 and max_chunks = chunks: exactly one index per chunk
    qlora::parallel_for(
        chunks, 1,
        [&](int64_t b, int64_t e) {
            for (int64_t c = b; c < e; c++) {
                // a chunk of a finished region would see another region's id (and a dangling Region)
                if (g_current.load() != id) r.stale++;
                r.runs[(size_t)c]++;
                if (tid() == r.caller) r.on_caller++;
            }
        },
        chunks);
    bool once = r.stale.load() == 0;
    for (auto& n : r.runs) once &= n.load() == 1;
    return once;
}

static double process_cpu_ms() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main() {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    alarm(60);  // a region that never completes fails the test instead of hanging it
    signal(SIGUSR1, park);
    signal(SIGUSR2, stall);
    const std::vector<pid_t> main_only{tid()};
    uint64_t id = 1;

    qlora_cpu_set_num_threads(4);
    {
        Region r(8);
        check(run_region(r, id++), "a region of 8 chunks on 4 threads runs every chunk once");
    }
    std::vector<pid_t> workers = other_threads(main_only);
    check(workers.size() == 3, "4 threads: the caller and 3 workers");

    // every worker parked: regions complete on the caller alone, at once
    g_release = false;
    for (pid_t w : workers) signal_thread(w, SIGUSR1);
    while (g_parked.load() < (int)workers.size()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    {
        bool all_once = true, all_caller = true;
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 200; i++) {
            Region r(64);
            all_once &= run_region(r, id++);
            all_caller &= r.on_caller.load() == 64;
        }
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        check(all_once, "workers parked: 200 regions of 64 chunks, every chunk once");
        check(all_caller, "workers parked: the caller ran every chunk");
        // a region that waited for a parked worker would wait until it is released (never, here)
        printf("     (200 regions in %.1f ms)\n", ms);
    }
    g_release = true;
    while (g_parked.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));

    // released workers take part again, and never run a chunk of an earlier region
    {
        bool all_once = true, worker_ran = false;
        auto t0 = std::chrono::steady_clock::now();
        while (!worker_ran && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10)) {
            Region r(64);
            all_once &= run_region(r, id++);
            worker_ran |= r.on_caller.load() < 64;
        }
        check(all_once, "workers released: every chunk once");
        check(worker_ran, "workers released: a worker runs chunks again");
    }

    // workers stalled at random points while 3000 regions of 2..64 chunks run
    {
        std::atomic<bool> stop{false};
        std::thread chaos([&] {
            unsigned seed = 1;
            while (!stop.load()) {
                signal_thread(workers[rand_r(&seed) % workers.size()], SIGUSR2);
                std::this_thread::sleep_for(std::chrono::microseconds(50 + rand_r(&seed) % 200));
            }
        });
        bool all_once = true;
        for (int i = 0; i < 3000; i++) {
            Region r(2 + i % 63);
            all_once &= run_region(r, id++);
        }
        stop = true;
        chaos.join();
        check(all_once, "workers stalled at random: 3000 regions, every chunk once, none of a finished region");
    }

    // a parallel_for inside a chunk runs inline on that thread
    {
        std::atomic<int64_t> sum{0};
        qlora::parallel_for(
            16, 1,
            [&](int64_t b, int64_t e) {
                for (int64_t c = b; c < e; c++)
                    qlora::parallel_for(100, 1, [&](int64_t ib, int64_t ie) {
                        for (int64_t i = ib; i < ie; i++) sum += c * 100 + i;
                    });
            },
            16);
        check(sum.load() == 1600 * 1599 / 2, "nested parallel_for: every index once");
    }

    // two threads running regions at once: one gets the pool, the other runs its chunks itself
    {
        std::atomic<bool> ok{true};
        auto loop = [&] {
            for (int i = 0; i < 500; i++) {
                Region r(2 + i % 31);
                qlora::parallel_for((int64_t)r.runs.size(), 1,
                                    [&](int64_t b, int64_t e) {
                                        for (int64_t c = b; c < e; c++) r.runs[(size_t)c]++;
                                    },
                                    (int64_t)r.runs.size());
                for (auto& k : r.runs) ok = ok.load() && k.load() == 1;
            }
        };
        std::thread other(loop);
        loop();
        other.join();
        check(ok.load(), "two callers at once: every chunk once");
    }

    // an idle pool sleeps: after the spin, workers use no CPU
    {
        Region r(8);
        run_region(r, id++);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        double c0 = process_cpu_ms();
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        double used = process_cpu_ms() - c0;
        printf("     (idle 300 ms: %.2f ms of CPU)\n", used);
        check(used < 30, "idle: the workers sleep (under 30 ms of CPU in 300 ms)");
    }

    // the thread count changes between regions
    {
        bool all_once = true;
        size_t counts[3];
        const int sizes[3] = {2, 6, 3};
        for (int k = 0; k < 3; k++) {
            qlora_cpu_set_num_threads(sizes[k]);
            for (int i = 0; i < 50; i++) {
                Region r(40);
                all_once &= run_region(r, id++);
            }
            counts[k] = other_threads(main_only).size();
        }
        check(all_once, "thread count 2, 6, 3: every chunk once");
        check(counts[0] == 1 && counts[1] == 5 && counts[2] == 2, "thread count 2, 6, 3: 1, 5 and 2 workers");
    }

    printf("%s\n", g_failures ? "FAILED" : "ALL OK");
    return g_failures ? 1 : 0;
}
