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


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-and-restore
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_orphans(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed writers of ``path`` left beside it (their names
    carry the writer's process id; files of live processes are kept). Returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}."
    for tmp in path.parent.iterdir():
        name = tmp.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                tmp.unlink()
                removed.append(str(tmp))
            except OSError:
                pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash at any point leaves the previous file at ``path`` untouched; the temporary files of
    writers killed earlier are removed first (``remove_orphans``). The file gets the mode a plain
    ``open(path, "w")`` would give it (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
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


def file_sha256(path) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _denied(path: Path) -> str:
    try:
        mode = f"mode {path.stat().st_mode & 0o777:03o}"
    except OSError:
        mode = "a folder above it cannot be searched"
    return f"cannot read it: permission denied ({mode}); chmod u+r {path} or run as its owner"


def check_readable(path) -> None:
    """Raise HoReNFileError (permission denied, with the mode) for a file this process cannot read,
    before any parser reports it as corrupted."""
    path = Path(path)
    try:
        path.stat()
    except PermissionError:
        raise HoReNFileError(path, _denied(path)) from None
    except FileNotFoundError:
        return
    if not os.access(path, os.R_OK):
        raise HoReNFileError(path, _denied(path))


def load_tensors(path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by save_tensors; verify its checksum. ``kind`` names what is expected
    (stored in the metadata as "kind"). Raises HoReNFileError naming the file and the problem."""
    from safetensors import safe_open

    path = Path(path)
    check_readable(path)
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
    except PermissionError:
        raise HoReNFileError(path, _denied(path)) from None
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
