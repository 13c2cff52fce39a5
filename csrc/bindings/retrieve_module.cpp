// horen_fast._C: the fused retrieval kernel (csrc/retrieve) behind a checked boundary. The only
// caller is horen_fast/native.py; every argument is checked here anyway (csrc/common/tensor_args.h),
// so a bad call raises TypeError / ValueError instead of reading or writing out of bounds.
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>

#include "../common/isa.h"
#include "../common/machine.h"
#include "../common/tensor_args.h"
#include "machine_functions.h"
#include "../retrieve/retrieve.h"

namespace py = pybind11;
using horen::args::Call;
using horen::args::Dim;
using horen::args::DType;

static void retrieve_checked(py::handle q_obj, py::handle k_obj, py::handle index_obj, py::handle score_obj,
                             py::handle matched_obj, double beta, double alpha, int64_t steps, double threshold,
                             double eps, const std::string& isa_name, int threads) {
    const Call c("horen_fast._C.retrieve");
    const auto q = c.tensor(q_obj, "queries");
    c.dtype(q, {DType::f32, DType::f64});
    c.shape(q, {{"B", -1}, {"d", -1}});
    c.contiguous(q);
    const int64_t B = q.shape[0], d = q.shape[1];
    c.positive(d, "the width d of queries");
    const auto k = c.tensor(k_obj, "keys");
    c.dtype(k, {DType::f32, DType::bf16, DType::f16, DType::f64});
    c.shape(k, {{"N", -1}, {"d", d}});
    c.rows(k);
    c.positive(k.shape[0], "the number of keys N");
    const bool f64 = q.dtype == DType::f64;
    if (k.dtype == DType::f64 && !f64) c.type_error("float64 keys need float64 queries (the compute dtype)");
    const auto index = c.tensor(index_obj, "out_index");
    c.dtype(index, {DType::i64});
    c.shape(index, {{"B", B}});
    c.contiguous(index);
    const auto score = c.tensor(score_obj, "out_score");
    c.dtype(score, {q.dtype});
    c.shape(score, {{"B", B}});
    c.contiguous(score);
    const auto matched = c.tensor(matched_obj, "out_matched");
    c.dtype(matched, {DType::boolean});
    c.shape(matched, {{"B", B}});
    c.contiguous(matched);
    if (!(std::isfinite(beta) && beta > 0)) c.value_error("beta must be finite and > 0, got " + std::to_string(beta));
    if (!(alpha > 0 && alpha <= 1)) c.value_error("alpha must be in (0, 1], got " + std::to_string(alpha));
    if (std::isnan(threshold)) c.value_error("threshold must be a number, got nan");
    if (!(eps >= 0)) c.value_error("eps must be >= 0, got " + std::to_string(eps));
    c.non_negative(steps, "steps");
    c.positive(threads, "threads");
    const horen::Isa isa = c.isa(isa_name);
    const horen::KeyType key_type = k.dtype == DType::f32    ? horen::K_F32
                                    : k.dtype == DType::f64  ? horen::K_F64
                                    : k.dtype == DType::bf16 ? horen::K_BF16
                                                             : horen::K_F16;
    const horen::Problem p{q.data, k.data, B, k.shape[0], d, k.shape[0] > 1 ? k.stride[0] : d,
                           beta, alpha, threshold, eps, steps, index.ptr<int64_t>(), score.data,
                           matched.ptr<bool>(), threads};
    py::gil_scoped_release release;  // no Python object is touched from here on
    horen::retrieve(p, key_type, f64, isa);
}

PYBIND11_MODULE(_C, m) {
    horen::args::init();
    horen::add_machine_functions(m);
    m.doc() = "horen_fast: the fused HoReN retrieval kernel for CPUs (csrc/retrieve); use horen_fast.native";
    m.def("best_isa", []() { return std::string(horen::isa_name(horen::best_isa())); },
          "The fastest instruction set this CPU supports: 'avx512', 'avx2' or 'scalar'.");
    m.def("isa_supported", [](const std::string& name) {
        horen::Isa isa;
        return horen::parse_isa(name, &isa) && horen::isa_supported(isa);
    }, py::arg("name"), "Whether this CPU runs the kernels of instruction set `name`.");
    m.def("split_speedup", [](const std::string& name) {
        horen::Isa isa;
        if (!horen::parse_isa(name, &isa) || (isa != horen::Isa::avx512bf16 && isa != horen::Isa::amx))
            throw py::value_error("split_speedup: isa must be 'avx512bf16' or 'amx', got '" + name + "'");
        horen::SplitSpeedup s;
        {
            py::gil_scoped_release release;
            s = horen::measure_split_speedup(isa);
        }
        py::dict d;
        d["bfloat16"] = s.bf16_keys;
        d["float32"] = s.f32_keys;
        return d;
    }, py::arg("isa"),
       "Time of a batched pass with float32 FMA scores over its time with the split scores of `isa` "
       "('avx512bf16' or 'amx'), per key dtype (measured now, one L2-resident tile; 0 where the CPU "
       "lacks `isa`).");
    m.def("retrieve", &retrieve_checked, py::arg("queries"), py::arg("keys"), py::arg("out_index"),
          py::arg("out_score"), py::arg("out_matched"), py::arg("beta"), py::arg("alpha"), py::arg("steps"),
          py::arg("threshold"), py::arg("eps"), py::arg("isa"), py::arg("threads"),
          "Retrieval of queries [B, d] (float32/float64, contiguous) against keys [N, d] (float32, "
          "bfloat16, float16 or float64 with float64 queries; contiguous columns, any row stride) into "
          "out_index [B] int64, out_score [B] (the queries' dtype), out_matched [B] bool.");
}
