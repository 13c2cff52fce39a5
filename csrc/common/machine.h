// The machine the kernels run on, as the tile sizes and thread counts need it (placeholder
// constants; replaced by run-time detection below).
#pragma once

#include <cstdint>

namespace horen {

struct Machine {
    int64_t l2_bytes = 512 * 1024;          // the share of L2 a tile of keys may fill
    int64_t min_work_per_thread = 4 << 20;  // multiply-adds that pay for waking a thread
};

inline Machine& machine() {
    static Machine m;
    return m;
}

}  // namespace horen
