"""Output folders: one writer at a time, and never two runs' files mixed in one folder.

Both command lines claim their ``--output-dir`` with :func:`claim_output_dir`:

1. a lock: ``fcntl.flock`` on ``OUT/.bvvit.lock`` (the file holds the pid). The kernel
   releases it when the process ends, even after kill -9, so there are no stale locks; a
   second writer is refused in one line naming the pid that holds the folder.
2. a check: the caller says which files mark a previous run (``markers``) and whether such
   a folder may be continued (``refusal`` returns None, e.g. ``--resume auto``) or not (one
   line: what is there and the ways out).
3. ``overwrite``: a folder holding a previous run is renamed as a whole to a sibling
   ``OUT.previous-YYYYmmdd-HHMMSS`` (one atomic rename, never file by file) and the run
   starts in a fresh, empty ``OUT``.
4. leftovers of the atomic writer (``.NAME.XXXXXXXX.tmp`` after a kill -9) are removed,
   under the lock, so nothing else can be writing them.

:class:`RunManifest` (``OUT/manifest.json``) says whose run a folder holds and which files
belong to it, so that a rerun can continue the same run and remove what it no longer makes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from bvvit import __version__
from bvvit.errors import ConfigError, WriteError
from bvvit.io import atomic_write_json, ensure_dir, is_temporary_name, sha256_file

log = logging.getLogger(__name__)

LOCK_NAME = ".bvvit.lock"
TRAINING_MARKERS = ("config.json", "vit_model.pth", "checkpoints", "metrics.csv",
                    "training_curves.png", "tensorboard")
# What refusal(folder, found) gets: the markers present; returns None to allow, else the reason.
Refusal = Callable[[Path, list[str]], Optional[str]]


class FolderLock:
    """An exclusive ``flock`` on ``folder/.bvvit.lock``; :meth:`acquire` refuses in one line."""

    def __init__(self, folder: Path, fd: int):
        self.folder, self.path, self._fd = folder, folder / LOCK_NAME, fd

    @classmethod
    def acquire(cls, folder: Path) -> "FolderLock":
        ensure_dir(folder)
        path = folder / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise WriteError(f"cannot create the lock file {path}: {exc.strerror}; choose a "
                                 "writable --output-dir", exc.errno or 0) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise ConfigError(f"{folder} is in use by another run (pid {holder}); wait for it "
                                  "to finish or choose another --output-dir") from None
            if _same_file(fd, path):
                break
            # The holder we waited for removed or moved this file: lock the current one.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(folder, fd)

    def release(self) -> None:
        """Remove the lock file (only if it is still ours) and unlock."""
        if self._fd < 0:
            return
        self.forget_file()
        os.close(self._fd)
        self._fd = -1

    def forget_file(self) -> None:
        """Unlink the lock file while still holding the lock (before the folder moves)."""
        if _same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def present_markers(folder: Path, markers: Sequence[str]) -> list[str]:
    """The names in ``markers`` that exist directly inside ``folder``."""
    return [name for name in markers if (folder / name).exists()]


def remove_temporary_leftovers(folder: Path) -> list[Path]:
    """Delete the atomic writer's temporary files under ``folder`` (sub-folders included,
    except those another run holds: they have their own lock file). Returns what went."""
    removed = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = [d for d in dirs if not (here / d / LOCK_NAME).exists()]
        for name in files:
            if is_temporary_name(name) and (here / name).is_file():
                (here / name).unlink(missing_ok=True)
                removed.append(here / name)
    return removed


def check_movable(folder: Path, inputs: Sequence[Path | str] = ()) -> None:
    """ConfigError (one line) when moving ``folder`` would take an input of this run with it,
    or a sub-folder another run is writing (post_training's ``OUT/quantization``)."""
    resolved = folder.resolve()
    for item in inputs:
        if item and (resolved == Path(item).resolve() or resolved in Path(item).resolve().parents):
            raise ConfigError(f"--overwrite would move {item}, which this run reads, aside with "
                              f"{folder}; choose another --output-dir")
    for lock_file in resolved.rglob(LOCK_NAME):
        if lock_file.parent != resolved:
            FolderLock.acquire(lock_file.parent).release()


def move_aside(folder: Path, inputs: Sequence[Path | str] = ()) -> Path:
    """Rename ``folder`` to a free sibling ``NAME.previous-YYYYmmdd-HHMMSS[-N]`` in one
    atomic rename; returns the new path. ``inputs`` (files this run reads) must not be
    inside it, nor a sub-folder another run is writing (ConfigError naming its pid)."""
    check_movable(folder, inputs)
    resolved = folder.resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        aside = resolved.with_name(f"{resolved.name}.previous-{stamp}" + (f"-{attempt}" if attempt else ""))
        if aside.exists():
            continue
        try:
            os.rename(resolved, aside)  # never replaces a non-empty folder; atomic on one filesystem
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise WriteError(f"--overwrite cannot move {folder} aside ({exc.strerror}); move or "
                             "delete it yourself, or choose another --output-dir", exc.errno or 0) from None
        return aside
    raise WriteError(f"--overwrite found no free name beside {folder}; clean up its .previous-* siblings")


@contextlib.contextmanager
def claim_output_dir(folder: Path | str, markers: Sequence[str], refusal: Refusal, overwrite: bool,
                     inputs: Sequence[Path | str] = ()) -> Iterator[Path]:
    """Hold ``folder`` for one run (see the module docstring). Yields the folder.

    ``refusal(folder, found)`` is called when markers of a previous run are present and
    ``overwrite`` is off: None lets the run continue there, a string (one line: what is
    there and what to do) refuses with ConfigError. With ``overwrite`` a folder holding
    markers is moved aside (:func:`move_aside`, ``inputs`` protected) and a new one made.
    """
    folder = Path(folder)
    # Through a symlinked --output-dir the real folder is locked, moved aside and made anew,
    # so the link still leads to the new run.
    real = folder.resolve()
    created = not real.exists()
    lock = FolderLock.acquire(real)
    try:
        found = present_markers(real, markers)
        if found and overwrite:
            check_movable(real, inputs)
            lock.forget_file()  # the lock file must not travel with the old run
            aside = move_aside(real, inputs)
            log.info(f"--overwrite: moved the previous run in {folder} to {aside}")
            old, lock = lock, FolderLock.acquire(real)
            old.release()
        elif found:
            reason = refusal(folder, found)
            if reason is not None:
                raise ConfigError(reason)
        removed = remove_temporary_leftovers(real)
        if removed:
            log.info(f"removed {len(removed)} temporary file(s) an interrupted run left in {folder}")
        yield folder
    finally:
        lock.release()
        if created:  # a run refused or failed before writing leaves no empty folder behind
            with contextlib.suppress(OSError):
                real.rmdir()


MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "bvvit-run-manifest"


def read_manifest(folder: Path) -> Optional[dict[str, Any]]:
    """``folder/manifest.json`` as a dict, or None when absent, unreadable or not ours."""
    try:
        record = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == MANIFEST_FORMAT else None


class RunManifest:
    """``OUT/manifest.json``: whose run the folder holds (``identity``, e.g. the model's
    sha256), the settings, and the files that belong to it.

    While a run works, ``complete`` is false and ``pending`` lists every file this run and
    unfinished earlier ones wrote, updated after each write (pass :meth:`note_written` to
    ``bvvit.io.recording_writes``), so even after a kill -9 the list is right. :meth:`finish`
    records what this run wrote or reused (size, sha256) as ``files`` and deletes the files
    earlier runs wrote that this one did not.
    """

    def __init__(self, folder: Path, record: dict[str, Any]):
        self.folder, self.record = folder, record

    @classmethod
    def begin(cls, folder: Path, identity: dict[str, Any], settings: dict[str, Any],
              previous: Optional[dict[str, Any]]) -> "RunManifest":
        """Start the manifest of a run in ``folder``, inheriting ``previous``'s files."""
        carried = set((previous or {}).get("files") or {}) | set((previous or {}).get("pending") or [])
        record = {"format": MANIFEST_FORMAT, "format_version": 1, "bvvit_version": __version__,
                  **identity, "settings": settings, "complete": False,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None,
                  "files": {}, "pending": sorted(carried)}
        # Written with the run's first file: a run that fails before writing anything (a bad
        # model file) leaves the folder as it found it.
        return cls(folder, record)

    def note_written(self, path: Path) -> None:
        """Add ``path`` (if inside the folder) to the pending files, on disk at once."""
        rel = self._relative(path)
        if rel is None or rel == MANIFEST_NAME or rel in self.record["pending"]:
            return
        self.record["pending"].append(rel)
        self._write()

    def finish(self, files: Iterable[Path], extra: dict[str, Any]) -> list[str]:
        """Record ``files`` (this run's, written or reused) with size and sha256, add
        ``extra``, mark complete, and delete the other files earlier runs wrote. Returns the
        deleted paths, relative to the folder."""
        keep = {rel for rel in map(self._relative, files)
                if rel is not None and rel != MANIFEST_NAME and (self.folder / rel).is_file()}
        removed = [rel for rel in sorted(set(self.record["pending"]) - keep) if self._remove(rel)]
        self.record.update(extra)
        self.record.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), pending=[],
                           files={rel: {"size_bytes": (self.folder / rel).stat().st_size,
                                        "sha256": sha256_file(self.folder / rel)}
                                  for rel in sorted(keep)})
        self._write()
        return removed

    def _relative(self, path: Path) -> Optional[str]:
        try:
            return Path(path).resolve().relative_to(self.folder.resolve()).as_posix()
        except ValueError:
            return None

    def _remove(self, rel: str) -> bool:
        """Delete ``folder/rel`` (never outside the folder) and the sub-folders it empties."""
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return False
        target = self.folder / rel
        if not (target.is_file() or target.is_symlink()):
            return False
        target.unlink()
        for parent in target.parents:
            if parent == self.folder or not parent.is_relative_to(self.folder):
                break
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty
        return True

    def _write(self) -> None:
        atomic_write_json(self.folder / MANIFEST_NAME, self.record)


def is_main_process() -> bool:
    """True unless this is a rank > 0 of a torchrun job (only rank 0 writes outputs)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def claim_training_dir(folder: Path | str, resume: Optional[str], overwrite: bool,
                       inputs: Sequence[Path | str] = ()) -> Iterator[Path]:
    """:func:`claim_output_dir` for run.py: a folder holding another training run is refused
    unless this run resumes it (``--resume auto`` or a checkpoint inside it) or overwrites."""
    folder = Path(folder)
    if resume and overwrite:
        raise ConfigError("--overwrite starts a new run and --resume continues one; pass one of them")

    def refusal(where: Path, found: list[str]) -> Optional[str]:
        if resume == "auto" or (resume and where.resolve() in Path(resume).resolve().parents):
            return None
        return (f"{where} holds another training run ({', '.join(found)}); continue it with "
                "--resume auto, write to a new --output-dir, or pass --overwrite to move it aside")

    if not is_main_process():
        yield folder
        return
    with claim_output_dir(folder, TRAINING_MARKERS, refusal, overwrite, inputs) as claimed:
        yield claimed


__all__ = ["claim_output_dir", "claim_training_dir", "FolderLock", "move_aside",
           "remove_temporary_leftovers", "present_markers", "is_main_process", "RunManifest",
           "read_manifest", "LOCK_NAME", "MANIFEST_NAME", "TRAINING_MARKERS"]
