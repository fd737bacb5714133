// threads.cpp: the worker-thread count shared by every CPU op, and the pool of worker threads behind
// parallel_for (parallel.h).
//
// Claiming. The chunks of a job are split into one contiguous home range per thread (the caller's first), as
// OpenMP's static schedule would give them, so that threads touch memory far apart. Each range is one 64-bit
// word, generation (32 bits) | first unclaimed chunk (16) | end (16): its owner claims chunks from the front,
// and a thread whose own range is empty steals from the back of the others'. A claim is a compare-and-swap on
// the word as read, so it succeeds only while that word is current: a worker that read a range of a job that
// has since finished (another generation, or nothing left) fails and reads again; it never runs a chunk of a
// finished job. The job's function and context are read after a successful claim, and cannot change until
// that chunk is counted done.
//
// Completion. The caller returns when `done` reaches the chunk count: the region ends when the work is done,
// not when every worker has checked in, so a worker that a busy machine has descheduled costs nothing unless it
// holds a chunk; its range is run by the others.
//
// Waiting. Workers spin briefly for the next job (a training step runs regions back to back), then sleep on a
// futex, so an idle qlora leaves the cores to other processes; the caller likewise spins, then sleeps until the
// worker that finishes the last chunk wakes it. No lock is taken on the way: a worker descheduled anywhere (even
// on its way to sleep) can never hold up the caller.
#include <stdlib.h>
#include <atomic>
#include <chrono>
#include <climits>
#include <thread>
#include <vector>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <condition_variable>
#include <mutex>
#endif
#include "../include/qlora_ops.h"
#include "parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QLORA_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define QLORA_PAUSE() __asm__ __volatile__("yield")
#else
#define QLORA_PAUSE() ((void)0)
#endif

namespace qlora {
static std::atomic<int> g_num_threads{0};

int num_threads() {
    int n = g_num_threads.load(std::memory_order_relaxed);
    if (n <= 0) {
        const char* env = getenv("QLORA_NUM_THREADS");
        n = env ? atoi(env) : 0;
        if (n <= 0) n = (int)std::thread::hardware_concurrency();
        if (n <= 0) n = 1;
        g_num_threads.store(n, std::memory_order_relaxed);
    }
    return n;
}

namespace {

constexpr uint64_t kMaxChunks = 0xffff;
inline uint64_t range_word(uint32_t gen, uint64_t begin, uint64_t end) {
    return (uint64_t)gen << 32 | begin << 16 | end;
}
inline uint64_t range_begin(uint64_t w) { return (w >> 16) & kMaxChunks; }
inline uint64_t range_end(uint64_t w) { return w & kMaxChunks; }

// how long a thread spins for work (a worker) or for the last chunk (the caller) before it sleeps: longer than
// most gaps between the regions of a training step (waking a sleeping worker costs tens of microseconds, more
// on a virtual machine), short enough that an idle qlora soon leaves the cores. Measured on tiny-qwen2's step:
// no spin 300 ms, 30 us to 1 ms 245-265 ms.
constexpr std::chrono::microseconds kSpin(300);

// spins until done() or about kSpin has passed; returns done(). It yields every few microseconds, so that on a
// busy core the thread it waits for, or a neighbour, runs instead.
template <class Done>
bool spin_until(Done done) {
    const auto start = std::chrono::steady_clock::now();
    for (uint32_t i = 1;; i++) {
        if (done()) return true;
        QLORA_PAUSE();
        if (i % 256 == 0) {
            if (std::chrono::steady_clock::now() - start > kSpin) return done();
            std::this_thread::yield();
        }
    }
}

// sleep while *word == expected (or until woken; callers re-check), and wake up to n sleepers of word
#ifdef __linux__
void wait_word(std::atomic<uint32_t>* word, uint32_t expected) {
    syscall(SYS_futex, (uint32_t*)word, FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void wake_word(std::atomic<uint32_t>* word, int n) {
    syscall(SYS_futex, (uint32_t*)word, FUTEX_WAKE_PRIVATE, n, nullptr, nullptr, 0);
}
#else
// elsewhere a condition variable; the waker takes no lock (a descheduled sleeper must not hold it up), so a wake
// may be missed, and a sleeper re-checks every 200 microseconds
std::mutex g_sleep_mutex;
std::condition_variable g_sleep_cv;
void wait_word(std::atomic<uint32_t>* word, uint32_t expected) {
    std::unique_lock<std::mutex> lock(g_sleep_mutex);
    if (word->load() == expected) g_sleep_cv.wait_for(lock, std::chrono::microseconds(200));
}
void wake_word(std::atomic<uint32_t>*, int) { g_sleep_cv.notify_all(); }
#endif

class Pool {
  public:
    void run(int64_t chunks, void (*body)(void*, int64_t), void* ctx) {
        bool idle = false;
        if (chunks > (int64_t)kMaxChunks || !busy_.compare_exchange_strong(idle, true, std::memory_order_acquire)) {
            // nested in a chunk, or another thread's job is running: this thread alone, same chunks
            for (int64_t c = 0; c < chunks; c++) body(ctx, c);
            return;
        }
        const int workers = num_threads() - 1;
        if (workers + 1 != (int)slots_.size()) resize(workers);
        if (threads_.empty()) {
            for (int64_t c = 0; c < chunks; c++) body(ctx, c);
            busy_.store(false, std::memory_order_release);
            return;
        }
        body_ = body;
        ctx_ = ctx;
        chunks_ = (uint32_t)chunks;
        done_.store(0, std::memory_order_relaxed);
        const uint32_t gen = gen_.load(std::memory_order_relaxed) + 1;
        const int64_t slots = (int64_t)slots_.size();
        for (int64_t i = 0; i < slots; i++)
            slots_[i].range.store(range_word(gen, chunks * i / slots, chunks * (i + 1) / slots),
                                  std::memory_order_release);
        gen_.store(gen, std::memory_order_seq_cst);
        // wake sleeping workers, no more than there are chunks for besides the caller's
        const int sleepers = sleepers_.load(std::memory_order_seq_cst);
        if (sleepers > 0) wake_word(&gen_, (int)std::min<int64_t>(sleepers, chunks - 1));
        work(0);
        if (!spin_until([&] { return done_.load(std::memory_order_acquire) == (uint32_t)chunks; })) {
            caller_waiting_.store(true, std::memory_order_seq_cst);
            for (uint32_t d; (d = done_.load(std::memory_order_seq_cst)) != (uint32_t)chunks;) wait_word(&done_, d);
            caller_waiting_.store(false, std::memory_order_relaxed);
        }
        busy_.store(false, std::memory_order_release);
    }

  private:
    // one chunk of the current job for thread `self` (0: the caller): the front of its own range, else the back
    // of another's; false when every chunk is taken
    bool claim(size_t self, int64_t* chunk) {
        const size_t slots = slots_.size();
        for (size_t k = 0; k < slots; k++) {
            const size_t s = (self + k) % slots;
            std::atomic<uint64_t>& range = slots_[s].range;
            uint64_t w = range.load(std::memory_order_acquire);
            while (range_begin(w) < range_end(w)) {
                // w is reloaded by a failed exchange
                const bool own = k == 0;
                const uint64_t next = own ? w + (1 << 16) : w - 1;
                if (range.compare_exchange_weak(w, next, std::memory_order_acq_rel, std::memory_order_acquire)) {
                    *chunk = (int64_t)(own ? range_begin(w) : range_end(w) - 1);
                    return true;
                }
            }
        }
        return false;
    }

    // runs chunks of the current job until none is left unclaimed
    void work(size_t self) {
        for (int64_t c; claim(self, &c);) {
            const uint32_t chunks = chunks_;  // read while this chunk keeps the job from ending
            body_(ctx_, c);
            if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == chunks &&
                caller_waiting_.load(std::memory_order_seq_cst))
                wake_word(&done_, 1);
        }
    }

    void worker_main(size_t self, uint32_t seen) {
        for (;;) {
            const uint32_t gen = gen_.load(std::memory_order_acquire);
            if (stop_.load(std::memory_order_relaxed)) return;
            if (gen != seen) {
                seen = gen;
                work(self);
                continue;
            }
            if (spin_until([&] {
                    return gen_.load(std::memory_order_acquire) != seen || stop_.load(std::memory_order_relaxed);
                }))
                continue;
            sleepers_.fetch_add(1, std::memory_order_seq_cst);
            if (!stop_.load(std::memory_order_seq_cst) && gen_.load(std::memory_order_seq_cst) == seen)
                wait_word(&gen_, seen);
            sleepers_.fetch_sub(1, std::memory_order_relaxed);
        }
    }

    // only while busy_ is held, so no job is running
    void resize(int workers) {
        if (!threads_.empty()) {
            stop_.store(true, std::memory_order_seq_cst);
            gen_.fetch_add(1, std::memory_order_seq_cst);
            wake_word(&gen_, INT_MAX);
            for (std::thread& t : threads_) t.join();
            threads_.clear();
            stop_.store(false, std::memory_order_relaxed);
        }
        // a range per thread; the range of a worker that could not be started is run by the others
        slots_ = std::vector<Slot>((size_t)workers + 1);
        const uint32_t seen = gen_.load(std::memory_order_relaxed);
        for (int i = 0; i < workers; i++) {
            try {
                threads_.emplace_back([this, i, seen] { worker_main((size_t)i + 1, seen); });
            } catch (...) {
                break;  // no more threads to be had
            }
        }
    }

    struct alignas(64) Slot {  // a cache line each: threads claim from their own range without contention
        std::atomic<uint64_t> range{0};
    };
    std::vector<Slot> slots_;
    std::atomic<uint32_t> done_{0};
    // the job: written before its ranges are published, read after a claim (which keeps the job from ending)
    void (*body_)(void*, int64_t) = nullptr;
    void* ctx_ = nullptr;
    uint32_t chunks_ = 0;
    std::atomic<bool> busy_{false};
    std::atomic<bool> stop_{false};
    std::atomic<int> sleepers_{0};
    std::atomic<bool> caller_waiting_{false};
    std::atomic<uint32_t> gen_{0};  // the current job's generation: what sleeping workers wait on
    std::vector<std::thread> threads_;
};

// never destroyed: its workers may still be asleep in it when the process exits
Pool& pool() {
    static Pool* p = new Pool();
    return *p;
}

}  // namespace

void run_chunks(int64_t chunks, void (*body)(void*, int64_t), void* ctx) { pool().run(chunks, body, ctx); }

}  // namespace qlora

extern "C" void qlora_cpu_set_num_threads(int n) { qlora::g_num_threads.store(n, std::memory_order_relaxed); }
extern "C" int qlora_cpu_get_num_threads(void) { return qlora::num_threads(); }
