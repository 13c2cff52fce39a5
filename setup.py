"""Build script: packages horen_fast (with kernels/ shipped as horen_fast.kernels) and compiles
the C++ CPU kernels in csrc/ with pybind11: horen_fast._C (csrc/retrieve, the fused retrieval) and
horen_fast._sketch (csrc/sketch, the prefilter's sketch passes and pair_dots). No torch headers
are needed at build time: the bindings (csrc/bindings) read and check the tensors through the
Python API (csrc/common/tensor_args.h). horen_fast/native.py is their only importer.

A failed C++ build fails the install, so that it is seen (pip hides the warnings of a build that
succeeds). HOREN_FAST_REQUIRE_CPP=0 installs without the kernels instead: horen_fast then uses
the torch backend and says why (dispatch reasons) when a C++ kernel is asked for.
"""
import glob
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
        if os.environ.get("HOREN_FAST_REQUIRE_CPP", "1") != "0":
            raise RuntimeError(f"horen_fast: the C++ kernels did not build ({exc}). Install a C++17 "
                               f"compiler with OpenMP (e.g. g++), or set HOREN_FAST_REQUIRE_CPP=0 to "
                               f"install without them (the torch backend is then used)") from exc
        print(f"WARNING: horen_fast C++ kernel not built ({exc}); the torch backend will be used.",
              file=sys.stderr)


RETRIEVE_SOURCES = ["csrc/retrieve/kernel.cpp", "csrc/bindings/retrieve_module.cpp"]
SKETCH_SOURCES = ["csrc/sketch/kernels.cpp", "csrc/bindings/sketch_module.cpp"]
HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True))  # a changed header rebuilds the modules

ext_modules = []
if Pybind11Extension is not None and all(os.path.exists(p) for p in RETRIEVE_SOURCES + SKETCH_SOURCES):
    ParallelCompile("NPY_NUM_BUILD_JOBS", default=2).install()
    ext_modules.append(
        Pybind11Extension(
            "horen_fast._C",
            RETRIEVE_SOURCES,
            depends=HEADERS,
            extra_compile_args=["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )
    ext_modules.append(
        Pybind11Extension(
            "horen_fast._sketch",
            SKETCH_SOURCES,
            depends=HEADERS,
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )

if not ext_modules and os.environ.get("HOREN_FAST_REQUIRE_CPP", "1") != "0":
    missing = [p for p in RETRIEVE_SOURCES + SKETCH_SOURCES if not os.path.exists(p)]
    raise RuntimeError("horen_fast: the C++ kernels cannot be built: "
                       + (f"missing sources {missing}" if missing else "pybind11 is not installed")
                       + "; set HOREN_FAST_REQUIRE_CPP=0 to install without them")

setup(
    packages=["horen_fast", "horen_fast.backends", "horen_fast.hparams", "horen_fast.kernels"],
    package_dir={"horen_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
