// The machine description (csrc/common/machine.h) as both extensions expose it: machine() reads
// it, set_tuning() overrides the tile size and the work per thread (0: back to the detected value).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "../common/machine.h"
#include "../common/threads.h"

namespace horen {

inline void add_machine_functions(pybind11::module_& m) {
    namespace py = pybind11;
    machine();  // detect at import, not inside the first (timed) kernel call
    m.def("machine", []() {
        const Machine& mc = machine();
        py::dict d;
        d["l1d_bytes"] = mc.l1d_bytes;
        d["l2_bytes"] = mc.l2_bytes;
        d["l3_bytes"] = mc.l3_bytes;
        d["cpus"] = mc.cpus;
        d["cache_source"] = mc.cache_source;
        d["tile_bytes"] = mc.tile_bytes;
        d["work_per_thread"] = mc.work_per_thread;
        d["measured_work_per_thread"] = mc.measured_work_per_thread;
        d["long_work"] = mc.long_work;
        d["fork_join_ns"] = mc.fork_join_ns;
        d["mac_rate"] = mc.mac_rate;
        d["threads_late"] = threads_late();
        return d;
    }, "The detected caches and the tuning derived from them (csrc/common/machine.h).");
    m.def("set_tuning", [](int64_t tile_bytes, int64_t work_per_thread) {
        if (tile_bytes < 0 || work_per_thread < 0)
            throw py::value_error("set_tuning: tile_bytes and work_per_thread must be >= 0 (0: the detected "
                                  "value), got " + std::to_string(tile_bytes) + " and " +
                                  std::to_string(work_per_thread));
        const Machine detected = machine_detail::detect();
        Machine& mc = machine();
        mc.tile_bytes = tile_bytes > 0 ? tile_bytes : detected.tile_bytes;
        mc.work_per_thread = work_per_thread > 0 ? work_per_thread : mc.measured_work_per_thread;
    }, py::arg("tile_bytes"), py::arg("work_per_thread"),
       "Override the tile size (bytes of keys) and the multiply-adds per thread at 16 lanes; 0 restores "
       "the detected value. For experiments: call it while no kernel runs.");
}

}  // namespace horen
