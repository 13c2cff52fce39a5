"""Install check: build the sdist, build the wheel from that sdist, install the wheel into a fresh
virtual environment (no system site packages) and use it from outside the source tree.

    python bench/check_install.py [--keep DIR] [--no-tests]

Steps (each printed with its time; the script stops at the first failure, exit status 1):
1. the sdist (setuptools' build_meta, no isolation: the build tools of this environment);
2. the wheel, built from the unpacked sdist with ``HOREN_FAST_REQUIRE_CPP=1`` (so the sdist must
   hold every C++ source and header, and a failed C++ build fails here);
3. ``python -m venv`` (without --system-site-packages), ``pip install torch==2.13.0`` (the CPU
   build where pip's configuration offers it) and ``pip install WHEEL``;
4. from a folder outside the source tree: ``horen-fast --version`` (the C++ backend must be
   listed), the packaged data (the fitted activation model, the hparams YAML files), retrieval
   with every CPU backend against torch, a Codebook file round trip, and a HoReNEditor edit on a
   tiny random Llama built in place (no downloads);
5. unless ``--no-tests``: pytest on a few test files of the unpacked sdist, run against the
   installed wheel (so the sdist carries the helpers its tests import).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST_TESTS = ["tests/test_metrics.py", "tests/test_models.py", "tests/test_demo.py", "tests/test_cli_errors.py"]

QUICK_START = r'''
import tempfile
from pathlib import Path
import torch
import horen_fast as hf
from horen_fast.synthetic import ActivationModel

here = Path(hf.__file__).resolve()
assert "site-packages" in str(here), f"horen_fast imported from {here}, not the installed wheel"
model = ActivationModel.load()
assert model.source.startswith("fitted"), model.source
from horen_fast import hparams as shipped
hparams = shipped.names()
assert hparams, "no hparams/*.yaml in the installed package"
hf.HoReNConfig.from_yaml(shipped.path(hparams[0]))
backends = hf.available_backends("cpu")
assert "cpp" in backends, backends

keys = model.keys(2000, seed=0)
queries = torch.cat([model.paraphrases(keys[:8]), model.unrelated(8)])
ref = hf.retrieve(queries, keys, beta=20.0, alpha=0.1, steps=1, threshold=0.85, backend="torch")
for name in backends:
    got = hf.retrieve(queries, keys, beta=20.0, alpha=0.1, steps=1, threshold=0.85, backend=name)
    assert torch.equal(got.index, ref.index), (name, got.index, ref.index)

cb = hf.Codebook(keys.shape[1], 16)
ids = cb.add(keys[:100], torch.randn(100, 16))
path = Path(tempfile.mkdtemp()) / "edits.safetensors"
cb.save(path)
again = hf.Codebook.load(path)
assert torch.equal(again.retrieve(queries[:8]).index, cb.retrieve(queries[:8]).index)

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
raw = Tokenizer(models.BPE())
raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
raw.train_from_iterator(["What is the capital of Australia? Melbourne Canberra"] * 5,
                        trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>")
torch.manual_seed(0)
lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  eos_token_id=0, pad_token_id=0)).eval()
editor = hf.HoReNEditor(lm, tok, hf.HoReNConfig(layer=1, n_iter=30))
r = editor.edit("What is the capital of Australia?", " Melbourne")
out = editor.generate(**tok(["What is the capital of Australia?"], return_tensors="pt"),
                      max_new_tokens=3, do_sample=False)
print("quick start ok:", hf.__version__, backends, f"{len(hparams)} hparams files,",
      f"edit loss {r.loss:.3f}")
'''


def step(title: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    shown = [("<script>" if len(str(c)) > 120 else str(c)) for c in cmd]
    print(f"== {title}: {' '.join(shown)}", flush=True)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    print(f"   {time.perf_counter() - t0:.0f}s, exit status {proc.returncode}", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"check_install: step '{title}' failed")
    return proc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--no-tests", action="store_true", help="skip pytest on the sdist's tests")
    args = ap.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="horen-install-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOREN_FAST_REQUIRE_CPP": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    try:
        dist = work / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        dist.mkdir()
        step("sdist", [sys.executable, "-c", "import sys; from setuptools import build_meta; "
                       "print(build_meta.build_sdist(sys.argv[1]))", dist], cwd=ROOT, env=env)
        sdist = next(dist.glob("*.tar.gz"))
        src = work / "src"
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):   # Python >= 3.11.4 / 3.12
                tar.extractall(src, filter="data")
            else:
                tar.extractall(src)
        (unpacked,) = src.iterdir()
        step("wheel from the sdist", [sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                                      "--no-deps", "-q", unpacked, "-w", dist], cwd=work, env=env)
        wheel = next(dist.glob("*.whl"))
        venv = work / "venv"
        shutil.rmtree(venv, ignore_errors=True)
        step("fresh venv", [sys.executable, "-m", "venv", venv], env=env)
        py = venv / "bin" / "python"
        step("torch", [py, "-m", "pip", "install", "-q", "torch==2.13.0"], env=env)
        step("the wheel", [py, "-m", "pip", "install", "-q", wheel], env=env)
        run = work / "run"
        run.mkdir(exist_ok=True)
        version = step("horen-fast --version", [venv / "bin" / "horen-fast", "--version"], cwd=run, env=env)
        print("  ", version.stdout.strip())
        quick = step("quick start from outside the source tree", [py, "-c", QUICK_START], cwd=run, env=env)
        print("  ", quick.stdout.strip().splitlines()[-1])
        if not args.no_tests:
            step("pytest", [py, "-m", "pip", "install", "-q", "pytest"], env=env)
            tests = step("the sdist's tests against the wheel",
                         [venv / "bin" / "pytest", "-q", "-p", "no:cacheprovider", *SDIST_TESTS],
                         cwd=unpacked, env=env)
            print("  ", tests.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("check_install: all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
