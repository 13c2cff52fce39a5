"""Durable files: atomic writes and checksums (no pickle anywhere)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


class HoReNFileError(ValueError):
    """A saved horen-fast file is missing, truncated, corrupted, of another version or shape."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash at any point leaves the previous file at ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tensor_checksum(tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    """sha256 over the metadata (canonical JSON) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` and JSON ``metadata`` (with a checksum) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    meta = dict(metadata)
    meta["checksum"] = tensor_checksum(tensors, metadata)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, tmp, metadata={"horen_fast": json.dumps(meta, sort_keys=True)})


def load_tensors(path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by save_tensors; verify its checksum. ``kind`` names what is expected
    (stored in the metadata as "kind"). Raises HoReNFileError naming the file and the problem."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise HoReNFileError(path, f"no such file (expected a {kind} saved by horen-fast)")
    size = path.stat().st_size
    if size < 8:
        raise HoReNFileError(path, f"file is truncated ({size} bytes), not a {kind} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("horen_fast")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except HoReNFileError:
        raise
    except Exception as exc:  # safetensors raises several types for bad headers and short files
        raise HoReNFileError(path, f"not a readable safetensors file (truncated or corrupted?): {exc}") from None
    if raw is None:
        raise HoReNFileError(path, f"safetensors file without horen-fast metadata; not a {kind} file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HoReNFileError(path, f"metadata is not valid JSON ({exc})") from None
    if meta.get("kind") != kind:
        raise HoReNFileError(path, f"holds a {meta.get('kind')!r}, expected a {kind!r}")
    stored = meta.pop("checksum", None)
    if stored != tensor_checksum(tensors, meta):
        raise HoReNFileError(path, "checksum mismatch: the file is corrupted (its contents changed "
                                   "after it was written)")
    return tensors, meta
