import os
import sys

# numpy (the oracle, and the Triton interpreter's tl.dot) on one OpenBLAS thread: on a shared
# 2-core machine its threads otherwise spin against torch's and slow the interpreter ~100x.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Triton kernels run on the CPU through Triton's interpreter when no GPU is present. The variable
# is read when kernels are defined, so it is set before anything imports them.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))
# the repository root, last: the tests of bench/ scripts import bench.gpu_check; horen_fast itself
# still comes from where it is installed (site-packages or the editable install)
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models run faster on one torch thread (and do not stall on a busy 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_report_header(config):
    import horen_fast
    return f"horen_fast backends on cpu: {horen_fast.available_backends('cpu')}"
