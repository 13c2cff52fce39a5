// horen_fast._sketch: the key sketch's CPU passes and pair_dots (csrc/sketch) behind a checked
// boundary. The only caller is horen_fast/native.py; every argument is checked here anyway
// (csrc/common/tensor_args.h), so a bad call raises TypeError / ValueError, never reads out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>

#include "../common/isa.h"
#include "../common/tensor_args.h"
#include "machine_functions.h"
#include "../sketch/sketch.h"

namespace py = pybind11;
using horen::args::Call;
using horen::args::Dim;
using horen::args::DType;
using horen::args::Tensor;

namespace {

Tensor f32(const Call& c, py::handle obj, const char* name, std::initializer_list<Dim> dims) {
    Tensor t = c.tensor(obj, name);
    c.dtype(t, {DType::f32});
    c.shape(t, dims);
    c.contiguous(t);
    return t;
}

// the rows and the query parts shared by scan and rescue; B, rc, rf, L from the arguments
struct Common {
    Tensor qc, qf, perp_c, perp, rows_c, rows_f, e_first, e_c, e, alive, excl;
    int64_t B = 0, rc = 0, rf = 0, L = 0, K = 0;
};

Common read_common(const Call& c, py::handle qc, py::handle qf, py::handle perp_c, py::handle perp,
                   py::handle rows_c, py::handle rows_f, py::handle e_first, const char* e_first_name,
                   py::handle e_c, py::handle e, py::handle alive, py::handle excl) {
    Common m;
    m.qc = c.tensor(qc, "qc");
    c.dtype(m.qc, {DType::f32});
    c.shape(m.qc, {{"B", -1}, {"rc", -1}});
    c.contiguous(m.qc);
    m.B = m.qc.shape[0];
    m.rc = m.qc.shape[1];
    m.qf = c.tensor(qf, "qf");
    c.dtype(m.qf, {DType::f32});
    c.shape(m.qf, {{"B", m.B}, {"rf", -1}});
    c.contiguous(m.qf);
    m.rf = m.qf.shape[1];
    m.perp_c = f32(c, perp_c, "perp_c", {{"B", m.B}});
    m.perp = f32(c, perp, "perp", {{"B", m.B}});
    m.rows_c = c.tensor(rows_c, "rows_c");
    c.dtype(m.rows_c, {DType::bf16});
    c.shape(m.rows_c, {{"L", -1}, {"rc", m.rc}});
    c.contiguous(m.rows_c);
    m.L = m.rows_c.shape[0];
    m.rows_f = c.tensor(rows_f, "rows_f");
    c.dtype(m.rows_f, {DType::bf16});
    c.shape(m.rows_f, {{"L", m.L}, {"rf", m.rf}});
    c.contiguous(m.rows_f);
    m.e_first = f32(c, e_first, e_first_name, {{"L", m.L}});
    m.e_c = f32(c, e_c, "e_c", {{"L", m.L}});
    m.e = f32(c, e, "e", {{"L", m.L}});
    m.alive = c.tensor(alive, "alive");
    c.dtype(m.alive, {DType::boolean, DType::u8});
    c.shape(m.alive, {{"L", m.L}});
    c.contiguous(m.alive);
    m.excl = c.tensor(excl, "excl");
    c.dtype(m.excl, {DType::i64});
    c.shape(m.excl, {{"B", m.B}, {"K", -1}});
    c.contiguous(m.excl);
    m.K = m.excl.shape[1];
    const int64_t* x = m.excl.ptr<const int64_t>();
    for (int64_t b = 0; b < m.B; ++b)
        for (int64_t j = 1; j < m.K; ++j)
            if (x[b * m.K + j] < x[b * m.K + j - 1])
                c.value_error("excl must be sorted ascending in each row (row " + std::to_string(b) +
                              " is not); pass excl.sort(dim=1).values");
    return m;
}

horen::sketch::Args make_args(const Common& m, int64_t rt, float beta, float slack, horen::Isa isa) {
    return horen::sketch::Args{m.qc.ptr<const float>(), m.qf.ptr<const float>(), nullptr, m.perp_c.ptr<const float>(),
                               m.perp.ptr<const float>(), nullptr, m.rows_c.ptr<const uint16_t>(),
                               m.rows_f.ptr<const uint16_t>(), m.e_first.ptr<const float>(), m.e_c.ptr<const float>(),
                               m.e.ptr<const float>(), m.alive.ptr<const uint8_t>(), m.excl.ptr<const int64_t>(),
                               nullptr, m.B, rt, m.rc, m.rf, m.L, m.K, 0, beta, slack, isa};
}

void check_rank(const Call& c, int64_t rt, int64_t rc, const char* name) {
    if (rt < 0 || rt > rc)
        c.value_error(std::string(name) + " must be in [0, rc=" + std::to_string(rc) + "], got " + std::to_string(rt));
}

void scan_checked(py::handle qc, py::handle qf, py::handle perp_c, py::handle perp, py::handle cvar,
                  py::handle rows_c, py::handle rows_f, py::handle e_t, py::handle e_c, py::handle e,
                  py::handle alive, py::handle excl, int64_t rt, int64_t nearest, float beta, float slack,
                  const std::string& isa_name, int threads, py::handle out_max, py::handle out_z,
                  py::handle out_y, py::handle out_v, py::handle near, py::handle near_u) {
    const Call c("horen_fast._sketch.scan");
    const Common m = read_common(c, qc, qf, perp_c, perp, rows_c, rows_f, e_t, "e_t", e_c, e, alive, excl);
    const Tensor cv = f32(c, cvar, "cvar", {{"B", m.B}});
    check_rank(c, rt, m.rc, "rt");
    c.non_negative(nearest, "nearest");
    c.positive(threads, "threads");
    if (!std::isfinite(beta)) c.value_error("beta must be finite");
    const Tensor mx = f32(c, out_max, "out_max", {{"B", m.B}});
    const Tensor z = f32(c, out_z, "out_z", {{"B", m.B}});
    const Tensor y = f32(c, out_y, "out_y", {{"B", m.B}, {"rt", rt}});
    const Tensor v = f32(c, out_v, "out_v", {{"B", m.B}});
    const Tensor nu = f32(c, near_u, "near_u", {{"B", m.B}, {"nearest", nearest}});
    Tensor nr = c.tensor(near, "near");
    c.dtype(nr, {DType::i64});
    c.shape(nr, {{"B", m.B}, {"nearest", nearest}});
    c.contiguous(nr);
    horen::sketch::Args a = make_args(m, rt, beta, slack, c.isa(isa_name));
    a.cvar = cv.ptr<const float>();
    a.k2 = nearest;
    const horen::sketch::ScanOut out{mx.ptr<float>(), z.ptr<float>(), y.ptr<float>(), v.ptr<float>(),
                                     nr.ptr<int64_t>(), nu.ptr<float>()};
    py::gil_scoped_release release;  // no Python object is touched from here on
    horen::sketch::scan(a, threads, out);
}

py::tuple rescue_checked(py::handle qc, py::handle qf, py::handle perp_s, py::handle perp_c, py::handle perp,
                         py::handle rows_c, py::handle rows_f, py::handle e_s, py::handle e_c, py::handle e,
                         py::handle alive, py::handle excl, py::handle floor, int64_t rs, float slack,
                         const std::string& isa_name, int threads) {
    const Call c("horen_fast._sketch.rescue");
    const Common m = read_common(c, qc, qf, perp_c, perp, rows_c, rows_f, e_s, "e_s", e_c, e, alive, excl);
    const Tensor ps = f32(c, perp_s, "perp_s", {{"B", m.B}});
    const Tensor fl = f32(c, floor, "floor", {{"B", m.B}});
    check_rank(c, rs, m.rc, "rs");
    c.positive(threads, "threads");
    horen::sketch::Args a = make_args(m, rs, 0.f, slack, c.isa(isa_name));
    a.perp_t = ps.ptr<const float>();
    std::vector<std::pair<int64_t, int64_t>> found;
    {
        py::gil_scoped_release release;
        found = horen::sketch::rescue(a, fl.ptr<const float>(), threads);
    }
    const auto n = static_cast<py::ssize_t>(found.size());
    py::array_t<int64_t> rows_out(n), labels_out(n);
    int64_t* ro = rows_out.mutable_data();
    int64_t* lo = labels_out.mutable_data();
    for (auto& [b, i] : found) {
        *ro++ = b;
        *lo++ = i;
    }
    return py::make_tuple(rows_out, labels_out);
}

void pair_dots_checked(py::handle keys, py::handle q, py::handle rows, py::handle slots, py::handle out,
                       const std::string& isa_name, int threads) {
    const Call c("horen_fast._sketch.pair_dots");
    Tensor k = c.tensor(keys, "keys");
    c.dtype(k, {DType::f32});
    c.shape(k, {{"S", -1}, {"d", -1}});
    c.rows(k);
    const int64_t S = k.shape[0], d = k.shape[1];
    Tensor qq = c.tensor(q, "q");
    c.dtype(qq, {DType::f32});
    c.shape(qq, {{"B", -1}, {"d", d}});
    c.contiguous(qq);
    Tensor r = c.tensor(rows, "rows");
    c.shape(r, {{"n", -1}});
    const int64_t n = r.shape[0];
    c.indices_in(r, 0, qq.shape[0], "rows of q");
    Tensor s = c.tensor(slots, "slots");
    c.shape(s, {{"n", n}});
    c.indices_in(s, 0, S, "rows of keys");
    const Tensor o = f32(c, out, "out", {{"n", n}});
    c.positive(threads, "threads");
    const horen::Isa isa = c.isa(isa_name);
    const int64_t stride = S > 1 ? k.stride[0] : d;
    py::gil_scoped_release release;
    horen::sketch::pair_dots(k.ptr<const float>(), stride, qq.ptr<const float>(), d, r.ptr<const int64_t>(),
                             s.ptr<const int64_t>(), n, o.ptr<float>(), threads, isa);
}

}  // namespace

PYBIND11_MODULE(_sketch, m) {
    horen::args::init();
    horen::add_machine_functions(m);
    m.doc() = "horen_fast: the key sketch's fused scan and rescue, and pair_dots, on the CPU (csrc/sketch); "
              "use horen_fast.native";
    m.def("best_isa", []() { return std::string(horen::isa_name(horen::best_isa())); });
    m.def("isa_supported", [](const std::string& name) {
        horen::Isa isa;
        return horen::parse_isa(name, &isa) && horen::isa_supported(isa);
    }, py::arg("name"));
    m.def("scan", &scan_checked, py::arg("qc"), py::arg("qf"), py::arg("perp_c"), py::arg("perp"), py::arg("cvar"),
          py::arg("rows_c"), py::arg("rows_f"), py::arg("e_t"), py::arg("e_c"), py::arg("e"), py::arg("alive"),
          py::arg("excl"), py::arg("rt"), py::arg("nearest"), py::arg("beta"), py::arg("slack"), py::arg("isa"),
          py::arg("threads"), py::arg("out_max"), py::arg("out_z"), py::arg("out_y"), py::arg("out_v"),
          py::arg("near"), py::arg("near_u"),
          "The tail (out_max, out_z, out_y, out_v) and the `nearest` near keys (near, near_u) of every query.");
    m.def("rescue", &rescue_checked, py::arg("qc"), py::arg("qf"), py::arg("perp_s"), py::arg("perp_c"),
          py::arg("perp"), py::arg("rows_c"), py::arg("rows_f"), py::arg("e_s"), py::arg("e_c"), py::arg("e"),
          py::arg("alive"), py::arg("excl"), py::arg("floor"), py::arg("rs"), py::arg("slack"), py::arg("isa"),
          py::arg("threads"),
          "(rows, labels) int64 arrays: every pair whose full bound + slack exceeds floor[row].");
    m.def("pair_dots", &pair_dots_checked, py::arg("keys"), py::arg("q"), py::arg("rows"), py::arg("slots"),
          py::arg("out"), py::arg("isa"), py::arg("threads"),
          "out[i] = q[rows[i]] . keys[slots[i]] (float32; keys: contiguous columns, any row stride).");
}
