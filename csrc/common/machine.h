// The machine the kernels run on, as their tile sizes and thread counts need it, detected once at
// first use (no constants tuned on one CPU):
//   * caches: /sys/devices/system/cpu/cpu0/cache (Linux), else sysconf(_SC_LEVEL*_CACHE_SIZE), else
//     cpuid (leaf 4, or 0x8000001D on AMD), else 1 MiB of L2; the L2 of one core is its size divided
//     by the logical CPUs sharing it;
//   * tile_bytes, the keys the retrieval kernel scores and then sums per tile of one query: a
//     quarter of one core's L2 (the tile is read twice, and the next tile is prefetched beside it:
//     the two take half of the L2, the rest holds the query, the sums and the other streams). Half
//     of the L2 was right on a Zen 5 EPYC (1 MiB L2) and 1.4x slower than a quarter on a Sapphire
//     Rapids Xeon (2 MiB L2; bench/RESULTS.md 2026-12-02); the batched loops take twice it;
//   * work_per_thread, the multiply-adds that pay for one more OpenMP thread, given for 16-lane
//     (AVX-512 float32) arithmetic and scaled by the lanes of the instruction set in use: measured
//     at first use as 4 x (the time to start and join a parallel region whose workers have gone
//     to sleep, median of 9) x (the multiply-add rate of one core on an L1-resident dot product,
//     AVX2 when present, at 16 lanes), between 64K and 4M (the constant used before);
//   * long_work, the multiply-adds of a pass that lasts about 2 ms on one core: shorter passes are
//     the ones a descheduled worker can slow down many times over (csrc/common/threads.h).
// Both can be overridden for experiments (horen_fast.native.set_tuning); call that while no
// kernel runs.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>
#include <chrono>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"

#if HOREN_X86 && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace horen {

struct Machine {
    int64_t l1d_bytes = 0, l2_bytes = 0, l3_bytes = 0;  // L1 data and L2 of one core, L3 (0: unknown)
    int cpus = 1;                                       // logical CPUs online
    std::string cache_source = "default";               // sysfs | sysconf | cpuid | default
    int64_t tile_bytes = 0;                             // a quarter of l2_bytes
    int64_t work_per_thread = 0;                        // multiply-adds at 16 lanes
    int64_t measured_work_per_thread = 0;               // what was measured (set_tuning restores it)
    int64_t long_work = 0;                              // multiply-adds of a ~2 ms pass, at 16 lanes
    double fork_join_ns = 0;                            // a parallel region over sleeping workers
    double mac_rate = 0;                                // one core's multiply-adds per second, 16 lanes
};

namespace machine_detail {

constexpr int64_t DEFAULT_L2 = 1 << 20;
constexpr int64_t MIN_WORK_PER_THREAD = int64_t(64) << 10, MAX_WORK_PER_THREAD = int64_t(4) << 20;

inline double median_of(std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
}

// seconds to start and join a parallel region of ``threads`` threads whose workers sleep (the
// caller slept 1 ms before each), median of 9
inline double fork_join_seconds(int threads) {
#ifdef _OPENMP
    if (threads < 2) return 0;
    std::vector<double> t;
    for (int i = 0; i < 11; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        const auto a = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads)
        { __asm__ __volatile__("" ::: "memory"); }
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
        if (i >= 2) t.push_back(dt);
    }
    return median_of(t);
#else
    (void)threads;
    return 0;
#endif
}

#if HOREN_X86 && defined(__GNUC__)
HOREN_AVX2_FN inline float dot_avx2(const float* a, const float* b, int n) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int i = 0; i + 64 <= n; i += 64)
        for (int j = 0; j < 8; ++j)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), _mm256_loadu_ps(b + i + 8 * j), acc[j]);
    alignas(32) float out[8];
    for (int j = 1; j < 8; ++j) acc[0] = _mm256_add_ps(acc[0], acc[j]);
    _mm256_store_ps(out, acc[0]);
    return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}
#endif

inline float dot_plain(const float* a, const float* b, int n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
    return acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
}

// one core's multiply-adds per second on an L1-resident dot product, as 16-lane arithmetic would
// do them (the AVX2 rate x 2, or the plain loop's x 4), median of 5
inline double mac_rate_16_lanes() {
    constexpr int n = 4096, reps = 64;
    std::vector<float> a(n), b(n);
    for (int i = 0; i < n; ++i) a[i] = 1e-3f * static_cast<float>(i % 7), b[i] = 1e-3f * static_cast<float>(i % 5);
#if HOREN_X86 && defined(__GNUC__)
    const bool avx2 = isa_supported(Isa::avx2);
#else
    const bool avx2 = false;
#endif
    std::vector<double> t;
    volatile float sink = 0;
    for (int k = 0; k < 6; ++k) {
        const auto s = std::chrono::steady_clock::now();
        float acc = 0;
        for (int r = 0; r < reps; ++r) {
#if HOREN_X86 && defined(__GNUC__)
            acc += avx2 ? dot_avx2(a.data(), b.data(), n) : dot_plain(a.data(), b.data(), n);
#else
            acc += dot_plain(a.data(), b.data(), n);
#endif
            a[r % n] += acc * 1e-30f;  // the loop depends on its result: not hoisted
        }
        sink = acc;
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
        if (k > 0) t.push_back(dt);
    }
    (void)sink;
    const double rate = double(n) * reps / std::max(median_of(t), 1e-9);
    return avx2 ? 2 * rate : 4 * rate;  // AVX2 (8 lanes) -> 16; the plain loop: SSE2's 4 lanes -> 16
}

inline void measure_threading(Machine& m) {
    m.fork_join_ns = 1e9 * fork_join_seconds(m.cpus);
    m.mac_rate = mac_rate_16_lanes();
    const double w = 4.0 * m.fork_join_ns * 1e-9 * m.mac_rate;
    m.measured_work_per_thread = std::clamp<int64_t>(static_cast<int64_t>(w), MIN_WORK_PER_THREAD, MAX_WORK_PER_THREAD);
    m.work_per_thread = m.measured_work_per_thread;
    m.long_work = std::max<int64_t>(static_cast<int64_t>(2e-3 * m.mac_rate), 16 * m.work_per_thread);
}

inline int64_t parse_size(const std::string& s) {  // "48K", "1024K", "32M", "512"
    if (s.empty()) return 0;
    int64_t v = 0;
    size_t i = 0;
    for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i) v = v * 10 + (s[i] - '0');
    const char unit = i < s.size() ? s[i] : ' ';
    return unit == 'K' ? v << 10 : unit == 'M' ? v << 20 : unit == 'G' ? v << 30 : v;
}

inline int count_cpus(const std::string& list) {  // "0-3,8,10-11" -> 7
    int n = 0;
    size_t i = 0;
    while (i < list.size()) {
        size_t j = list.find(',', i);
        const std::string part = list.substr(i, j == std::string::npos ? std::string::npos : j - i);
        const size_t dash = part.find('-');
        if (!part.empty())
            n += dash == std::string::npos ? 1 : std::stoi(part.substr(dash + 1)) - std::stoi(part.substr(0, dash)) + 1;
        if (j == std::string::npos) break;
        i = j + 1;
    }
    return std::max(n, 1);
}

inline bool from_sysfs(Machine& m) {
    for (int i = 0; i < 16; ++i) {
        const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
        std::ifstream level_f(dir + "level"), type_f(dir + "type"), size_f(dir + "size"), shared_f(dir + "shared_cpu_list");
        if (!level_f || !type_f || !size_f) break;
        int level = 0;
        std::string type, size, shared;
        level_f >> level;
        type_f >> type;
        size_f >> size;
        if (shared_f) shared_f >> shared;
        if (type == "Instruction") continue;
        const int64_t bytes = parse_size(size);
        if (level == 1) m.l1d_bytes = bytes;
        if (level == 2) m.l2_bytes = bytes / (shared.empty() ? 1 : count_cpus(shared));
        if (level == 3) m.l3_bytes = bytes;
    }
    return m.l2_bytes > 0;
}

inline bool from_sysconf(Machine& m) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE),
               l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l2 <= 0) return false;
    m.l1d_bytes = std::max<long>(l1, 0);
    m.l2_bytes = l2;
    m.l3_bytes = std::max<long>(l3, 0);
    return true;
#else
    (void)m;
    return false;
#endif
}

inline bool from_cpuid(Machine& m) {
#if HOREN_X86 && defined(__GNUC__)
    for (unsigned leaf : {4u, 0x8000001Du}) {  // Intel's deterministic cache parameters, AMD's
        if (leaf > 0x80000000u && __get_cpuid_max(0x80000000u, nullptr) < leaf) continue;
        for (unsigned sub = 0; sub < 16; ++sub) {
            unsigned a = 0, b = 0, c = 0, d = 0;
            if (!__get_cpuid_count(leaf, sub, &a, &b, &c, &d)) break;
            const unsigned type = a & 0x1fu, level = (a >> 5) & 0x7u;
            if (type == 0) break;
            if (type == 2) continue;  // instruction cache
            const int64_t bytes = int64_t((b >> 22) + 1) * (((b >> 12) & 0x3ffu) + 1) * ((b & 0xfffu) + 1) * (int64_t(c) + 1);
            const int64_t sharing = ((a >> 14) & 0xfffu) + 1;
            if (level == 1) m.l1d_bytes = bytes;
            if (level == 2) m.l2_bytes = bytes / sharing;
            if (level == 3) m.l3_bytes = bytes;
        }
        if (m.l2_bytes > 0) return true;
    }
#else
    (void)m;
#endif
    return false;
}

inline Machine detect() {
    Machine m;
    if (from_sysfs(m)) m.cache_source = "sysfs";
    else if (from_sysconf(m)) m.cache_source = "sysconf";
    else if (from_cpuid(m)) m.cache_source = "cpuid";
    else m.l2_bytes = DEFAULT_L2;
    m.cpus = std::max(1u, std::thread::hardware_concurrency());
    m.tile_bytes = m.l2_bytes / 4;
    return m;
}

}  // namespace machine_detail

inline Machine& machine() {
    static Machine m = [] {
        Machine d = machine_detail::detect();
        machine_detail::measure_threading(d);
        return d;
    }();
    return m;
}

// float32 lanes of a vector register
inline int64_t lanes(Isa isa) { return is_avx512(isa) ? 16 : isa == Isa::avx2 ? 8 : 1; }

// multiply-adds that pay for waking one more thread with this instruction set
inline int64_t min_work_per_thread(Isa isa) {
    return std::max<int64_t>(1, machine().work_per_thread * lanes(isa) / 16);
}

}  // namespace horen
