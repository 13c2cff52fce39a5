// How many OpenMP threads a pass gets: as many as asked for (torch.get_num_threads()), at most one
// per logical CPU, each with enough work to pay for starting it (csrc/common/machine.h:
// min_work_per_thread, measured by instruction set), and, for short passes, only while the
// workers have been arriving on time.
//
// The late-worker guard: when the other CPUs are busy (another process, or another OpenMP runtime's
// threads spinning), a worker can be descheduled for a scheduler slice, and the join of a 100 us
// pass then waits milliseconds. A parallel pass reports how long its join waited for the last
// worker after the first one finished (note_join); a wait longer than 4 times the work of that
// first thread and than 0.5 ms (a slice, not the jitter of a wake-up) marks the workers late for a window (100 ms, doubled on each late pass
// in a row up to 6.4 s, back to 100 ms after a pass on time). While they are late, passes shorter
// than machine().long_work (about 2 ms on one core) run on one thread. The thread count changes
// no result: the kernels split their work into a fixed number of parts (parts_for) whatever
// the number of threads that run them.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#include "isa.h"
#include "machine.h"

namespace horen {

inline int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

namespace thread_detail {
inline std::atomic<int64_t> late_until{0};     // steady-clock ns
inline std::atomic<int64_t> window_ns{100000000};
constexpr int64_t MIN_WINDOW = 100000000, MAX_WINDOW = 6400000000;
}  // namespace thread_detail

inline bool threads_late() { return now_ns() < thread_detail::late_until.load(std::memory_order_relaxed); }

// A parallel pass began at ``start``, its first thread finished its share at ``first_done`` and
// the join returned at ``end`` (steady-clock ns).
inline void note_join(int64_t start, int64_t first_done, int64_t end) {
    using namespace thread_detail;
    const int64_t share = std::max<int64_t>(first_done - start, 0), wait = end - first_done;
    if (wait > std::max<int64_t>(500000, 4 * share)) {
        const int64_t w = window_ns.load(std::memory_order_relaxed);
        late_until.store(end + w, std::memory_order_relaxed);
        window_ns.store(std::min(2 * w, MAX_WINDOW), std::memory_order_relaxed);
    } else {
        window_ns.store(MIN_WINDOW, std::memory_order_relaxed);
    }
}

// Times a parallel region for note_join: each of its threads calls thread_done() once, when it has
// finished its share (the last part it took).
class JoinClock {
public:
    explicit JoinClock(int threads) : on_(threads > 1), start_(on_ ? now_ns() : 0) {}
    void thread_done() {
        if (!on_) return;
        const int64_t t = now_ns();
        int64_t cur = first_.load(std::memory_order_relaxed);
        while (t < cur && !first_.compare_exchange_weak(cur, t, std::memory_order_relaxed)) {
        }
    }
    void joined() {
        if (on_) note_join(start_, first_.load(std::memory_order_relaxed), now_ns());
    }

private:
    bool on_;
    int64_t start_;
    std::atomic<int64_t> first_{INT64_MAX};
};

// the parts a pass splits into: at most ``requested`` (>= 1), the CPUs and ``cap``
inline int parts_for(int requested, int64_t cap = INT64_MAX) {
    const int64_t asked = std::min<int64_t>(std::max(requested, 1), machine().cpus);
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(asked, std::max<int64_t>(cap, 1))));
}

// threads for ``work`` multiply-adds with instruction set ``isa``: at most ``requested`` (>= 1),
// the CPUs and ``cap``; one for a short pass while the workers are late
inline int threads_for_work(int64_t work, int requested, Isa isa, int64_t cap = INT64_MAX) {
    const int64_t useful = std::max<int64_t>(1, work / min_work_per_thread(isa));
    const int64_t t = std::min<int64_t>(parts_for(requested, cap), useful);
    if (t > 1 && threads_late() && work < machine().long_work * lanes(isa) / 16) return 1;
    return static_cast<int>(std::max<int64_t>(1, t));
}

}  // namespace horen
