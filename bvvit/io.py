"""Safe file I/O shared by every stage: atomic writes and weights-only checkpoint loading.

Writes go to a temporary file in the destination folder (``.NAME.XXXXXXXX.tmp``), are
flushed to disk, then renamed into place, so a crash never leaves a half-written file under
the real name (a kill -9 may leave the temporary file: :func:`is_temporary_name` tells
them apart, and :mod:`bvvit.run_dir` removes them when a run claims its folder).
:func:`recording_writes` collects the paths written meanwhile (a run's manifest).
Loading uses ``torch.load(..., weights_only=True)``: a checkpoint can carry tensors,
numbers, strings, lists and dicts, never code. :func:`json_safe` makes results (with their
infinite SQNRs, numpy scalars and tensors) writable as strict JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from bvvit.errors import BVViTError, CheckpointError, WriteError


_UMASK = os.umask(0)
os.umask(_UMASK)
# tempfile.mkstemp's names: PREFIX + 8 characters of [a-z0-9_] + SUFFIX
_TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# EPERM: an immutable (chattr +i) target; EISDIR: a folder in the way of the file
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EPERM,
                errno.EISDIR)
_recorders: list[tuple[list[Path], Optional[Callable[[Path], None]]]] = []


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is a temporary name of :func:`atomic_path` (``.NAME.XXXXXXXX.tmp``)."""
    return bool(_TEMPORARY_NAME.match(name))


@contextlib.contextmanager
def recording_writes(on_write: Optional[Callable[[Path], None]] = None) -> Iterator[list[Path]]:
    """Yield a list that collects the path of every file :func:`atomic_path` completes
    while the block runs (nested blocks each get every write); ``on_write(path)`` is also
    called after each one (its own writes are recorded and reported too)."""
    entry: tuple[list[Path], Optional[Callable[[Path], None]]] = ([], on_write)
    _recorders.append(entry)
    try:
        yield entry[0]
    finally:
        _recorders[:] = [e for e in _recorders if e is not entry]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (no copy of the whole file in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) if exc.errno in WRITE_ERRNOS else exc from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # make the bytes durable before the rename
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; artefacts are ordinary files
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in WRITE_ERRNOS:
            raise _write_error(path, exc) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for written, on_write in list(_recorders):
        written.append(path)
        if on_write is not None:
            on_write(path)


def _write_error(path: Path, exc: OSError) -> WriteError:
    fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space",
           errno.EIO: "check the disk"}.get(exc.errno or 0, "fix its permissions")
    return WriteError(f"cannot write {path}: {exc.strerror or exc}; the previous version "
                      f"(if any) is intact — {fix} or choose another folder", exc.errno or 0)


def ensure_dir(folder: Path) -> None:
    """Create ``folder`` (and its parents); one-line BVViTError when that is impossible."""
    if folder.exists() and not folder.is_dir():
        raise BVViTError(f"{folder} exists and is not a folder; choose another --output-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BVViTError(f"cannot create folder {folder}: {exc.strerror}; "
                         "choose a writable --output-dir") from None
    if not os.access(folder, os.W_OK):
        raise BVViTError(f"folder {folder} is not writable; choose a writable --output-dir")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    Non-finite floats become ``"inf"``, ``"-inf"`` or ``"nan"``; numpy scalars and arrays,
    torch tensors, tuples and dataclasses become plain Python lists, numbers and dicts.
    """
    if isinstance(obj, dict):
        return {str(key): json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        if math.isnan(obj):
            return "nan"
        return "inf" if obj > 0 else "-inf"
    return obj


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Load a ``.pth`` file with ``weights_only=True``; every failure is one clear line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file; pass the .pth file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes); it was not written completely")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "not a PyTorch file"
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it contains Python objects that are not allowed (refusing to run code from a checkpoint)"
        raise CheckpointError(f"{what} {path} cannot be loaded safely: {reason}; "
                              "re-save it as a plain state dict") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError,
            AttributeError, ImportError, IndexError, KeyError, TypeError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} {path} is not a readable PyTorch file ({first[:160]}); "
                              "it may be truncated or corrupt") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj

