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


def pytest_report_header(config):
    import horen_fast
    return f"horen_fast backends on cpu: {horen_fast.available_backends('cpu')}"
