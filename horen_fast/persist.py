"""A saved editor: one directory, saved and loaded as one unit.

A save writes the config (YAML) and the codebook (safetensors) under fresh names
(``config-<token>.yaml``, ``codebook-<token>.safetensors``), each atomically (temporary file,
fsync, rename), and then ``manifest.json`` (atomically, last) naming both files with their sizes
and sha256. The manifest is the commit point: a save killed at any moment leaves the directory
holding the manifest of either the previous save or this one, and the files it names are there.
After the manifest is in place, files of earlier (or killed) saves are deleted: data files no
manifest names and temporary files. Saves to one directory are serialized with a lock file, and
saved files get the permissions the process umask gives new files.

``load`` reads the manifest and refuses (``HoReNFileError``, naming the file; FileNotFoundError
for a missing directory) a missing or unreadable manifest, a missing file, or a file whose size or
sha256 differs from the manifest's.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path

from ._files import HoReNFileError, check_readable, file_sha256
from .codebook import Codebook
from .config import HoReNConfig

__all__ = ["MANIFEST", "save", "load", "FORMAT"]

MANIFEST = "manifest.json"
FORMAT = "horen_fast.editor"
VERSION = 1
_LOCK = ".horen.lock"
_DATA = re.compile(r"^(config-[0-9a-f]{16}\.yaml|codebook-[0-9a-f]{16}\.safetensors)$")
_TEMP = re.compile(r"^\..*\.tmp$|^\.horen-config-.*\.yaml$|^\.horen-part-[0-9a-f]{16}$")


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path, mode: int) -> dict:
    """fsync ``tmp``, give it ``mode`` and rename it to ``final``; its manifest record."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, final)
    return {"file": final.name, "bytes": final.stat().st_size, "sha256": file_sha256(final)}


@contextmanager
def _locked(folder: Path):
    fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save(path, config: HoReNConfig, codebook: Codebook) -> None:
    """Save ``config`` and ``codebook`` to the directory ``path`` as one unit (module docstring)."""
    folder = Path(os.fspath(path))
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save a HoReN editor to {folder}: it is a file, not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_umask()
    with _locked(folder):
        token = secrets.token_hex(8)
        records = {}
        tmp = folder / f".horen-part-{secrets.token_hex(8)}"
        try:
            config.to_yaml(tmp)
            records["config"] = _commit(tmp, folder / f"config-{token}.yaml", mode)
            codebook.save(tmp)
            records["codebook"] = _commit(tmp, folder / f"codebook-{token}.safetensors", mode)
        finally:
            if tmp.exists():
                tmp.unlink()
        manifest = {"format": FORMAT, "version": VERSION, **records}
        tmp = folder / f".{MANIFEST}.{secrets.token_hex(8)}.tmp"
        try:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            _commit(tmp, folder / MANIFEST, mode)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(folder)
        keep = {records["config"]["file"], records["codebook"]["file"]}
        for name in os.listdir(folder):
            if (name not in keep and _DATA.match(name)) or _TEMP.match(name):
                try:
                    os.unlink(folder / name)
                except FileNotFoundError:
                    pass


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory; not a saved HoReN editor (HoReNEditor.save)")
    if not path.is_file():
        legacy = (folder / "config.yaml").exists() or (folder / "codebook.safetensors").exists()
        hint = (" (config.yaml + codebook.safetensors without a manifest: an older horen-fast's save, whose "
                "two files may come from different saves; load them with HoReNConfig.from_yaml and "
                "Codebook.load and save again)") if legacy else ""
        raise HoReNFileError(path, f"missing: not a saved HoReN editor{hint}")
    check_readable(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HoReNFileError(path, f"not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HoReNFileError(path, f"not a HoReN editor manifest (format {FORMAT!r} expected)")
    if data.get("version") != VERSION:
        raise HoReNFileError(path, f"version {data.get('version')!r} is not supported (this horen-fast "
                                   f"reads version {VERSION})")
    for part in ("config", "codebook"):
        rec = data.get(part)
        if (not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or not _DATA.match(rec["file"])
                or not isinstance(rec.get("bytes"), int) or not isinstance(rec.get("sha256"), str)):
            raise HoReNFileError(path, f"the {part!r} record is missing or malformed")
    return data


def _checked(folder: Path, rec: dict) -> Path:
    path = folder / rec["file"]
    if not path.is_file():
        raise HoReNFileError(path, f"missing (named by {MANIFEST}); the save is incomplete")
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise HoReNFileError(path, f"is {size} bytes, {MANIFEST} says {rec['bytes']} (truncated or "
                                   f"replaced after the save)")
    if file_sha256(path) != rec["sha256"]:
        raise HoReNFileError(path, f"checksum differs from {MANIFEST} (corrupted or replaced after the save)")
    return path


def load(path, device=None) -> tuple[HoReNConfig, Codebook]:
    """(config, codebook) of a directory written by ``save``; see the module docstring."""
    folder = Path(os.fspath(path))
    manifest = _manifest(folder)
    config_path = _checked(folder, manifest["config"])
    codebook_path = _checked(folder, manifest["codebook"])
    try:
        config = HoReNConfig.from_yaml(config_path)
    except ValueError as exc:
        raise HoReNFileError(config_path, str(exc)) from None
    return config, Codebook.load(codebook_path, device=device)

