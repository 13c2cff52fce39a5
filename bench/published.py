"""The published HoReN retrieval, written literally (the baseline of every benchmark here).

It lives in the package as ``horen_fast.published`` so that ``horen-fast bench`` can time it on
any machine; this module keeps the benchmarks' import path.
"""
from horen_fast.published import published_retrieve

__all__ = ["published_retrieve"]
