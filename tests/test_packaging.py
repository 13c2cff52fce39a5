"""Packaging: one version, the data files the code reads are package data, the sdist holds what
the build and the tests need, `horen-fast --version`. The full check (wheel built from the sdist,
installed in a fresh virtual environment, used from outside the source tree) is
bench/check_install.py; the slow test at the end runs it when HOREN_FAST_INSTALL_CHECK=1."""
import fnmatch
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import horen_fast
from horen_fast.synthetic import FIT_FILE, ActivationModel

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "horen_fast"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILT = ("__pycache__", ".egg-info", ".pytest_cache", ".hypothesis")


def _files(folder: Path):
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.endswith(BUILT) for part in p.parts) and p.suffix not in (".so", ".pyc"):
            yield p


def test_the_version_lives_in_one_place():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "horen_fast.__version__"}
    assert importlib.metadata.version("horen-fast") == horen_fast.__version__
    setup_py = (ROOT / "setup.py").read_text()
    assert horen_fast.__version__ not in setup_py and "version=" not in setup_py


def test_every_data_file_of_the_package_is_package_data():
    """Files under horen_fast/ that are not Python must match [tool.setuptools.package-data], or an
    installed wheel would lack them (the fitted activation model once fell back silently)."""
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["horen_fast"]
    data = [p.relative_to(PACKAGE).as_posix() for p in _files(PACKAGE) if p.suffix != ".py"]
    assert "resources/smollm2_zsre_activations.safetensors" in data
    missing = [d for d in data if not any(fnmatch.fnmatch(d, g) for g in globs)]
    assert missing == [], f"add these to [tool.setuptools.package-data]: {missing}"
    assert FIT_FILE.is_file() and FIT_FILE.is_relative_to(PACKAGE)
    assert ActivationModel.load().source.startswith("fitted")


def test_a_missing_fit_is_an_error_not_a_stand_in(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fitted activation model at .*anisotropic"):
        ActivationModel.load(tmp_path / "absent.safetensors")


def test_license_and_extras():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("faiss-cpu") for r in extras["faiss"])
    assert extras["plot"] == ["matplotlib"]
    assert any(r.startswith("triton") for r in extras["gpu"])
    assert any(r.startswith("gguf") for r in extras["demo"])


def test_version_command():
    proc = subprocess.run([sys.executable, "-m", "horen_fast", "--version"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"horen-fast {horen_fast.__version__} (torch ")
    backends = proc.stdout.split("retrieval backends: ")[1].rstrip(")\n").split(", ")
    assert "torch" in backends


def test_sdist_holds_the_sources_and_what_the_tests_import(tmp_path):
    """The sdist must rebuild the package (every C++ source and header, the Triton kernels, the
    package data) and run its tests (their helpers and data files too)."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = ["LICENSE", "README.md", "pyproject.toml", "setup.py"]
    for folder in ("horen_fast", "kernels", "csrc", "tests"):
        wanted += [p.relative_to(ROOT).as_posix() for p in _files(ROOT / folder)]
    missing = sorted(w for w in wanted if w not in names)
    assert missing == [], f"the sdist lacks {missing} (MANIFEST.in)"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HOREN_FAST_INSTALL_CHECK") != "1",
                    reason="builds and installs the wheel in a fresh venv (minutes): HOREN_FAST_INSTALL_CHECK=1")
def test_installed_wheel_works_outside_the_source_tree():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "check_install.py")], capture_output=True,
                          text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check_install: all steps passed" in proc.stdout
