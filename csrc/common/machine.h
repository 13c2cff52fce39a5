// The machine the kernels run on, as their tile sizes and thread counts need it, detected once at
// first use (no constants tuned on one CPU):
//   * caches: /sys/devices/system/cpu/cpu0/cache (Linux), else sysconf(_SC_LEVEL*_CACHE_SIZE), else
//     cpuid (leaf 4, or 0x8000001D on AMD), else 1 MiB of L2; the L2 of one core is its size divided
//     by the logical CPUs sharing it;
//   * tile_bytes, the keys the retrieval kernel scores and then sums per tile: half of one core's
//     L2 (the tile is read twice, and the next tile is prefetched beside it: the prefetch distance
//     is one tile, so it follows the tile);
//   * work_per_thread, the multiply-adds that pay for waking one more OpenMP thread, given for
//     16-lane (AVX-512 float32) arithmetic and scaled by the lanes of the instruction set in use:
//     waking a thread costs about the same time everywhere, and the work done in that time grows
//     with the vector width (4M at 16 lanes: about the time a sleeping thread takes to wake). Less
//     is faster only on an idle machine: at N = 1K, d = 1536, B = 1 (Zen 5, keys in L3) 1M gave two
//     threads, 96 us instead of 140 us with the second core free, but 7 ms with it busy (the end of
//     an OpenMP region waits for a descheduled worker).
// Both can be overridden for experiments (horen_fast.native.set_tuning); call that while no
// kernel runs.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>
#include <thread>

#include "isa.h"

#if HOREN_X86 && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace horen {

struct Machine {
    int64_t l1d_bytes = 0, l2_bytes = 0, l3_bytes = 0;  // L1 data and L2 of one core, L3 (0: unknown)
    int cpus = 1;                                       // logical CPUs online
    std::string cache_source = "default";               // sysfs | sysconf | cpuid | default
    int64_t tile_bytes = 0;                             // half of l2_bytes
    int64_t work_per_thread = 0;                        // multiply-adds at 16 lanes
};

namespace machine_detail {

constexpr int64_t DEFAULT_L2 = 1 << 20;
constexpr int64_t WORK_PER_THREAD_16_LANES = int64_t(4) << 20;

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
    m.tile_bytes = m.l2_bytes / 2;
    m.work_per_thread = WORK_PER_THREAD_16_LANES;
    return m;
}

}  // namespace machine_detail

inline Machine& machine() {
    static Machine m = machine_detail::detect();
    return m;
}

// float32 lanes of a vector register
inline int64_t lanes(Isa isa) { return is_avx512(isa) ? 16 : isa == Isa::avx2 ? 8 : 1; }

// multiply-adds that pay for waking one more thread with this instruction set
inline int64_t min_work_per_thread(Isa isa) {
    return std::max<int64_t>(1, machine().work_per_thread * lanes(isa) / 16);
}

}  // namespace horen
