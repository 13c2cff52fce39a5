"""The one dispatch point (horen_fast/dispatch.py): declared support, forced refusals with every
reason, auto-selection with one warning, and the real retrieve backends behind it."""
import os
import warnings

import pytest
import torch

from horen_fast import dispatch, retrieve
from horen_fast.dispatch import NotSupportedError
from horen_fast.retrieval import available_backends, check_params

PARAMS = check_params(20.0, 0.1, 1, 0.85, 1e-5)


def _op(name):
    """A fresh op per test: fast (GPU-only, refuses float64 and odd widths), cpu (CPU only), plain."""
    op = f"test_{name}"

    def fast_reasons(x):
        why = []
        if x.device.type != "cuda":
            why.append(f"x is on {x.device}, fast needs CUDA")
        if x.dtype == torch.float64:
            why.append("x is float64, fast computes in float32")
        if x.shape[-1] % 2:
            why.append(f"width {x.shape[-1]} is odd, fast needs an even width")
        return why

    dispatch.register(op, "plain", lambda x: [], lambda x: "plain")
    dispatch.register(op, "fast", fast_reasons, lambda x: "fast", priority=20)
    dispatch.register(op, "cpu", lambda x: [] if x.device.type == "cpu" else [f"x is on {x.device}"],
                      lambda x: "cpu", priority=10)
    return op


def test_auto_takes_the_highest_priority_that_can_serve():
    op = _op("auto")
    assert dispatch.names(op) == ["fast", "cpu", "plain"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert dispatch.select(op, torch.ones(2, 4))(None) == "cpu"
    said = [str(w.message) for w in seen]
    assert len(said) == 1 and "'fast'" in said[0] and "'cpu'" in said[0] and "needs CUDA" in said[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert dispatch.select(op, torch.ones(2, 4, device="meta"))(None) == "plain"
    assert len(seen) == 2 and "'cpu' cannot serve this call: x is on meta" in str(seen[1].message)


def test_devices_limit_auto_but_not_a_forced_name():
    op = _op("devices")
    dispatch.register(op, "gpu_only", lambda x: [], lambda x: "gpu_only", priority=30, devices=("cuda",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert dispatch.select(op, torch.ones(2, 4, device="meta"), impl="plain")(None) == "plain"
    with pytest.warns(RuntimeWarning, match="'fast' cannot serve"):  # gpu_only is not considered on cpu
        assert dispatch.select(op, torch.ones(2, 4))(None) == "cpu"
    assert dispatch.select(op, torch.ones(2, 4), impl="gpu_only")(None) == "gpu_only"


def test_the_fallback_warning_comes_once_per_reason():
    op = _op("once")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            dispatch.select(op, torch.ones(2, 4))
        dispatch.select(op, torch.ones(2, 3))      # another reason (odd width): warned again, once
        dispatch.select(op, torch.ones(2, 3))
    said = [str(w.message) for w in seen]
    assert len(said) == 2 and "odd" in said[1] and "odd" not in said[0]


def test_forced_implementation_raises_with_every_reason():
    op = _op("forced")
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(NotSupportedError) as err:
        dispatch.select(op, x, impl="fast")
    msg = str(err.value)
    assert "needs CUDA" in msg and "float64" in msg and "odd" in msg and "'fast'" in msg
    assert isinstance(err.value, ValueError)
    assert dispatch.select(op, x, impl="plain")(x) == "plain"
    assert dispatch.reasons_for(op, x) == {
        "fast": ["x is on cpu, fast needs CUDA", "x is float64, fast computes in float32",
                 "width 3 is odd, fast needs an even width"],
        "cpu": [], "plain": []}


def test_unknown_names_and_bad_registrations():
    op = _op("bad")
    with pytest.raises(ValueError, match="unknown test_bad implementation 'nope'.*'fast', 'cpu', 'plain'"):
        dispatch.select(op, torch.ones(1), impl="nope")
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        dispatch.select("no_such_op", torch.ones(1))
    with pytest.raises(ValueError, match="other than 'auto'"):
        dispatch.register(op, "auto", lambda x: [], lambda x: None)
    with pytest.raises(TypeError, match="callables"):
        dispatch.register(op, "x", [], lambda x: None)
    with pytest.raises(TypeError, match="priority"):
        dispatch.register(op, "x", lambda x: [], lambda x: None, priority="high")
    dispatch.register(op, "liar", lambda x: "no", lambda x: None, priority=99)
    with pytest.raises(TypeError, match="list of strings"):
        dispatch.select(op, torch.ones(1))


def test_nothing_can_serve():
    op = "test_nothing"
    dispatch.register(op, "only", lambda x: ["never"], lambda x: None)
    with pytest.raises(NotSupportedError, match="no implementation can serve this call.*only: never"):
        dispatch.select(op, torch.ones(1))


# ---------------------------------------------------------------- the real retrieve backends
def test_torch_serves_everything_and_auto_on_cpu_prefers_cpp():
    backends = available_backends("cpu")
    assert "torch" in backends
    why = dispatch.reasons_for("retrieve", torch.ones(2, 4), torch.ones(3, 4), PARAMS)
    assert why["torch"] == []
    if why.get("cpp") == []:
        assert backends.index("cpp") < backends.index("torch")
        auto = dispatch.select("retrieve", torch.ones(2, 4), torch.ones(3, 4), PARAMS)
        assert auto is dispatch.select("retrieve", torch.ones(2, 4), torch.ones(3, 4), PARAMS, impl="cpp")


def test_cpp_refuses_meta_and_cuda_tensors_with_a_reason():
    available_backends()
    q = torch.ones(2, 4, device="meta")
    with pytest.raises(NotSupportedError, match="cpp") as err:
        retrieve(q, q[:1], backend="cpp")
    assert "meta" in str(err.value)
    why = dispatch.reasons_for("retrieve", q, q, PARAMS)["cpp"]
    assert len(why) >= 2 and all(r in str(err.value) for r in why)  # queries and keys, every reason


def test_a_forced_backend_lists_every_reason_at_once():
    """triton on meta float64 tensors: the device, the queries' dtype and the keys' dtype."""
    available_backends()
    q = torch.ones(2, 4, device="meta", dtype=torch.float64)
    why = dispatch.reasons_for("retrieve", q, q, PARAMS)["triton"]
    assert len(why) >= 3 and any("meta" in r for r in why)
    with pytest.raises(NotSupportedError) as err:
        retrieve(q, q, backend="triton")
    assert all(r in str(err.value) for r in why)
    assert dispatch.reasons_for("retrieve", q, q, PARAMS)["torch"] == []


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the triton backend needs CUDA or TRITON_INTERPRET=1")
def test_triton_refuses_float64_with_a_reason():
    available_backends()
    q = torch.randn(2, 8, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.raises(NotSupportedError, match="float64") as err:
        retrieve(q.to(device), k.to(device), backend="triton")
    assert "queries are float64" in str(err.value) and "keys are float64" in str(err.value)
    assert any("float64" in r for r in dispatch.reasons_for("retrieve", q, k, PARAMS)["triton"])


def test_triton_on_cpu_needs_the_interpreter_and_auto_never_picks_it_on_cpu(monkeypatch):
    available_backends()
    q, k = torch.randn(2, 8), torch.randn(3, 8)
    if dispatch.reasons_for("retrieve", q, k, PARAMS)["triton"] == []:  # under TRITON_INTERPRET=1
        forced = dispatch.select("retrieve", q, k, PARAMS, impl="triton")
        assert dispatch.select("retrieve", q, k, PARAMS) is not forced
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = dispatch.reasons_for("retrieve", q, k, PARAMS)["triton"]
    assert any("TRITON_INTERPRET" in r for r in why)
    with pytest.raises(NotSupportedError, match="TRITON_INTERPRET"):
        retrieve(q, k, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_available_backends_on_a_device_this_machine_lacks():
    assert available_backends("cuda") == []
    assert "torch" in available_backends("meta") and "cpp" not in available_backends("meta")
