"""Build script: packages horen_fast (with kernels/ shipped as horen_fast.kernels) and compiles
the C++ retrieval kernel in csrc/ with pybind11 (no torch headers needed at build time: the kernel
works on raw tensor pointers handed over by horen_fast.backends.cpp).

A failed C++ build does not fail the install: horen_fast then falls back to the torch backend and
warns once. Set HOREN_FAST_REQUIRE_CPP=1 to make a failed build an error instead.
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension, ParallelCompile
except ImportError:  # pragma: no cover - build isolation always brings pybind11
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    def _warn(self, exc):
        if os.environ.get("HOREN_FAST_REQUIRE_CPP") == "1":
            raise exc
        print(f"WARNING: horen_fast C++ kernel not built ({exc}); the torch backend will be used.",
              file=sys.stderr)


ext_modules = []
if Pybind11Extension is not None and os.path.exists("csrc/horen_cpu.cpp") and os.path.exists("csrc/sketch_cpu.cpp"):
    ParallelCompile("NPY_NUM_BUILD_JOBS", default=2).install()
    ext_modules.append(
        Pybind11Extension(
            "horen_fast._C",
            ["csrc/horen_cpu.cpp"],
            extra_compile_args=["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )
    ext_modules.append(
        Pybind11Extension(
            "horen_fast._sketch",
            ["csrc/sketch_cpu.cpp"],
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )

setup(
    packages=["horen_fast", "horen_fast.backends", "horen_fast.kernels"],
    package_dir={"horen_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
