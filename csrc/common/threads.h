// How many OpenMP threads a pass gets: as many as asked for, but each must have enough work to
// pay for waking it. The minimum work per thread is a property of the machine (see machine.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "machine.h"

namespace horen {

// threads for ``work`` multiply-adds, at most ``requested`` (>= 1) and at most ``cap``
inline int threads_for_work(int64_t work, int requested, int64_t cap = INT64_MAX) {
    const int64_t per_thread = machine().min_work_per_thread;
    const int64_t useful = std::max<int64_t>(1, work / per_thread);
    const int64_t t = std::min<int64_t>({static_cast<int64_t>(std::max(requested, 1)), useful, std::max<int64_t>(cap, 1)});
    return static_cast<int>(std::max<int64_t>(1, t));
}

}  // namespace horen
