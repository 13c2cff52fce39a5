// How many OpenMP threads a pass gets: as many as asked for (torch.get_num_threads()), at most one
// per logical CPU, and each with enough work to pay for waking it (csrc/common/machine.h:
// min_work_per_thread, by instruction set).
#pragma once

#include <algorithm>
#include <cstdint>

#include "isa.h"
#include "machine.h"

namespace horen {

// threads for ``work`` multiply-adds with instruction set ``isa``: at most ``requested`` (>= 1),
// the CPUs and ``cap``
inline int threads_for_work(int64_t work, int requested, Isa isa, int64_t cap = INT64_MAX) {
    const int64_t useful = std::max<int64_t>(1, work / min_work_per_thread(isa));
    const int64_t asked = std::min<int64_t>(std::max(requested, 1), machine().cpus);
    const int64_t t = std::min<int64_t>({asked, useful, std::max<int64_t>(cap, 1)});
    return static_cast<int>(std::max<int64_t>(1, t));
}

}  // namespace horen
