// The checked boundary between Python and the CPU kernels. Every binding takes its tensors as
// Python objects and reads them here: a torch.Tensor, strided, on the CPU, no negative strides;
// then the binding states the dtypes, shapes, layouts and index ranges it needs. Any mismatch
// raises TypeError (wrong kind or dtype) or ValueError (shape, layout, range) naming the entry
// point and the argument, before any data is touched. No torch headers: the attributes are read
// through the CPython API (a few hundred nanoseconds a tensor). Call init() once, at module
// import, with the GIL held.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "isa.h"

namespace horen { namespace args {

namespace py = pybind11;

enum class DType : int { f32 = 0, f64, bf16, f16, i64, i32, boolean, u8, other };
constexpr int NUM_DTYPES = static_cast<int>(DType::other);
constexpr int MAX_DIMS = 8;

inline const char* dtype_name(DType t) {
    static const char* names[] = {"torch.float32", "torch.float64", "torch.bfloat16", "torch.float16",
                                  "torch.int64", "torch.int32", "torch.bool", "torch.uint8", "another dtype"};
    return names[static_cast<int>(t)];
}

inline int64_t dtype_size(DType t) {
    static const int64_t sizes[] = {4, 8, 2, 2, 8, 4, 1, 1, 0};
    return sizes[static_cast<int>(t)];
}

// what was read off one tensor argument
struct Tensor {
    const char* name = "";
    char* data = nullptr;
    DType dtype = DType::other;
    int dim = 0;
    int64_t shape[MAX_DIMS] = {0};
    int64_t stride[MAX_DIMS] = {0};  // in elements
    PyObject* dtype_obj = nullptr;   // the torch.dtype (immortal), for messages about other dtypes
    int64_t numel() const {
        int64_t n = 1;
        for (int i = 0; i < dim; ++i) n *= shape[i];
        return n;
    }
    template <class T> T* ptr() const { return reinterpret_cast<T*>(data); }
};

// torch objects and attribute names, looked up once
struct Torch {
    PyObject* tensor_type = nullptr;
    PyObject* dtypes[NUM_DTYPES] = {nullptr};
    PyObject *dtype = nullptr, *is_cpu = nullptr, *shape = nullptr, *stride = nullptr,
             *data_ptr = nullptr;
};

inline Torch*& torch_slot() {
    static Torch* t = nullptr;
    return t;
}

inline void init() {
    if (torch_slot() != nullptr) return;
    py::module_ torch = py::module_::import("torch");
    Torch* t = new Torch();  // kept for the life of the process
    t->tensor_type = py::object(torch.attr("Tensor")).release().ptr();
    const char* names[NUM_DTYPES] = {"float32", "float64", "bfloat16", "float16", "int64", "int32", "bool", "uint8"};
    for (int i = 0; i < NUM_DTYPES; ++i) t->dtypes[i] = py::object(torch.attr(names[i])).release().ptr();
    t->dtype = PyUnicode_InternFromString("dtype");
    t->is_cpu = PyUnicode_InternFromString("is_cpu");
    t->shape = PyUnicode_InternFromString("shape");
    t->stride = PyUnicode_InternFromString("stride");
    t->data_ptr = PyUnicode_InternFromString("data_ptr");
    torch_slot() = t;
}

struct Dim {        // an expected size: label (for the message) and value; value < 0: any size
    const char* label;
    int64_t size;
};

// The checks of one entry point: every error names the function and the argument.
class Call {
public:
    explicit Call(const char* fn) : fn_(fn) {}

    [[noreturn]] void type_error(const std::string& msg) const { throw py::type_error(prefix() + msg); }
    [[noreturn]] void value_error(const std::string& msg) const { throw py::value_error(prefix() + msg); }

    // read a tensor argument: a strided CPU torch.Tensor with at most MAX_DIMS dims (about 0.6 us)
    Tensor tensor(py::handle obj, const char* name) const {
        const Torch* T = torch_slot();
        Tensor t;
        t.name = name;
        const int is = PyObject_IsInstance(obj.ptr(), T->tensor_type);
        if (is != 1) {
            if (is < 0) PyErr_Clear();
            type_error(std::string(name) + " must be a torch.Tensor, got " + Py_TYPE(obj.ptr())->tp_name);
        }
        // (sparse, mkldnn and nested tensors have no stride(): that raises below)
        py::object cpu = attr(obj, T->is_cpu, name);
        if (cpu.ptr() != Py_True)
            value_error(std::string(name) + " must be on the CPU, got a tensor on " +
                        repr(obj.attr("device")) + "; move it with .cpu()");
        py::object dt = attr(obj, T->dtype, name);
        for (int i = 0; i < NUM_DTYPES; ++i)
            if (dt.ptr() == T->dtypes[i]) t.dtype = static_cast<DType>(i);
        t.dtype_obj = dt.ptr();
        py::object shape = attr(obj, T->shape, name);
        py::object stride = call(obj, T->stride, name);
        if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(stride.ptr()) ||
            PyTuple_GET_SIZE(shape.ptr()) != PyTuple_GET_SIZE(stride.ptr()))
            type_error(std::string(name) + ": shape and stride() are not tuples of one length");
        const Py_ssize_t dim = PyTuple_GET_SIZE(shape.ptr());
        if (dim > MAX_DIMS) value_error(std::string(name) + " has " + std::to_string(dim) + " dimensions; at most 8");
        t.dim = static_cast<int>(dim);
        for (int i = 0; i < t.dim; ++i) {
            t.shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), i));
            t.stride[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(stride.ptr(), i));
            if (PyErr_Occurred()) throw py::error_already_set();
            if (t.stride[i] < 0 && t.shape[i] > 1)
                value_error(std::string(name) + " has a negative stride; pass a tensor with non-negative strides "
                            "(.contiguous())");
        }
        py::object ptr = call(obj, T->data_ptr, name);
        t.data = static_cast<char*>(PyLong_AsVoidPtr(ptr.ptr()));
        if (PyErr_Occurred()) throw py::error_already_set();
        if (t.data == nullptr && t.numel() > 0) value_error(std::string(name) + " has no data (a null data pointer)");
        return t;
    }

    void dtype(const Tensor& t, std::initializer_list<DType> allowed) const {
        for (DType a : allowed)
            if (t.dtype == a) return;
        std::string want;
        for (DType a : allowed) want += std::string(want.empty() ? "" : " or ") + dtype_name(a);
        type_error(std::string(t.name) + " must be " + want + ", got " +
                   (t.dtype == DType::other ? repr(t.dtype_obj) : std::string(dtype_name(t.dtype))));
    }

    void shape(const Tensor& t, std::initializer_list<Dim> dims) const {
        bool ok = t.dim == static_cast<int>(dims.size());
        int i = 0;
        for (const Dim& d : dims) {
            if (ok && d.size >= 0 && t.shape[i] != d.size) ok = false;
            ++i;
        }
        if (ok) return;
        std::string want = "[", got = "[";
        i = 0;
        for (const Dim& d : dims) {
            want += std::string(i ? ", " : "") + d.label + (d.size >= 0 ? "=" + std::to_string(d.size) : "");
            ++i;
        }
        for (int j = 0; j < t.dim; ++j) got += (j ? ", " : "") + std::to_string(t.shape[j]);
        value_error(std::string(t.name) + " must have shape " + want + "], got " + got + "]");
    }

    // every element at its own address, in row-major order (what an output needs)
    void contiguous(const Tensor& t) const {
        int64_t expect = 1;
        for (int i = t.dim - 1; i >= 0; --i) {
            if (t.shape[i] == 0) return;
            if (t.shape[i] > 1 && t.stride[i] != expect)
                value_error(std::string(t.name) + " must be contiguous (strides " + strides(t) +
                            "); pass .contiguous()");
            expect *= t.shape[i];
        }
    }

    // a 2-D tensor whose rows have contiguous columns, any row stride >= 0 (rows may repeat)
    void rows(const Tensor& t) const {
        if (t.dim == 2 && t.shape[1] > 1 && t.stride[1] != 1)
            value_error(std::string(t.name) + " must have contiguous columns (stride(1) == 1, strides " +
                        strides(t) + "); pass .contiguous()");
    }

    // an int64 tensor (contiguous) whose values are all in [lo, hi)
    void indices_in(const Tensor& t, int64_t lo, int64_t hi, const char* what) const {
        dtype(t, {DType::i64});
        contiguous(t);
        const int64_t* v = t.ptr<const int64_t>();
        const int64_t n = t.numel();
        int64_t mn = INT64_MAX, mx = INT64_MIN;
        for (int64_t i = 0; i < n; ++i) {
            mn = v[i] < mn ? v[i] : mn;
            mx = v[i] > mx ? v[i] : mx;
        }
        if (n > 0 && (mn < lo || mx >= hi))
            value_error(std::string(t.name) + " must hold indices in [" + std::to_string(lo) + ", " +
                        std::to_string(hi) + ") (" + what + "), got values from " + std::to_string(mn) + " to " +
                        std::to_string(mx));
    }

    // an instruction set by name (what horen_fast/native.py resolved from HOREN_FAST_CPU_ISA)
    Isa isa(const std::string& name) const {
        Isa isa;
        if (!parse_isa(name, &isa))
            value_error("isa must be auto, avx512, avx512bf16, amx, avx2 or scalar, got '" + name + "'");
        if (!isa_supported(isa))
            value_error("this CPU does not support the " + name + " kernels; use auto or " +
                        isa_name(best_isa()) + " and below");
        return isa;
    }

    void positive(int64_t v, const char* name) const {
        if (v < 1) value_error(std::string(name) + " must be >= 1, got " + std::to_string(v));
    }
    void non_negative(int64_t v, const char* name) const {
        if (v < 0) value_error(std::string(name) + " must be >= 0, got " + std::to_string(v));
    }

private:
    const char* fn_;

    std::string prefix() const { return std::string(fn_) + ": "; }

    static std::string repr(py::handle h) { return py::str(h).cast<std::string>(); }

    static std::string strides(const Tensor& t) {
        std::string s = "(";
        for (int j = 0; j < t.dim; ++j) s += (j ? ", " : "") + std::to_string(t.stride[j]);
        return s + (t.dim == 1 ? ",)" : ")");
    }

    py::object attr(py::handle obj, PyObject* key, const char* name) const {
        PyObject* r = PyObject_GetAttr(obj.ptr(), key);
        if (r == nullptr) fail(name);
        return py::reinterpret_steal<py::object>(r);
    }
    py::object call(py::handle obj, PyObject* key, const char* name) const {
        PyObject* r = PyObject_CallMethodNoArgs(obj.ptr(), key);
        if (r == nullptr) fail(name);
        return py::reinterpret_steal<py::object>(r);
    }
    [[noreturn]] void fail(const char* name) const {
        py::error_already_set e;  // takes the pending Python error
        type_error(std::string(name) + " could not be read as a dense tensor (" + e.what() +
                   "); pass a dense tensor (.to_dense())");
    }
};

}}  // namespace horen::args
