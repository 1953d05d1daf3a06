#!/usr/bin/env python
"""Hostile-input run: what a new user with real, messy data and impatient fingers does to
``run.py`` and ``post_training.py`` (link loops, reruns into used folders, concurrent runs,
tampered files, signals, 16-bit images, FIFOs, unreadable folders, absurd numbers, edited
model files, a full disk, immutable files, ...). Every case builds tiny inputs in a
temporary folder (16x16 images, 3 classes, a 1-block model trained once and reused), runs
the command lines as subprocesses with a timeout and checks:

- no ``Traceback`` anywhere, no hang (a timeout is a failure);
- user errors: exit code 2 and exactly one line on stderr, naming what is wrong;
- data safety: files that must not change keep their SHA-256, no ``*.tmp`` leftovers,
  sample counts as on disk (the run's own "train N, val M images" line, config.json) and
  every label that of the class folder the file really is in (listed through the library).

Run it from the repository root with the project's environment, when nothing heavy runs
beside it (about 10 minutes on a 2-core machine, two cases at a time)::

    .venv/bin/python tools/hostile_inputs.py
    .venv/bin/python tools/hostile_inputs.py --list             # names, issue items, checks
    .venv/bin/python tools/hostile_inputs.py --only 'links_*'   # one case or a pattern
    .venv/bin/python tools/hostile_inputs.py --keep             # keep the temporary folders

Cases needing root (a tiny tmpfs for a full disk, ``chattr +i``) or, as root,
``setpriv`` able to drop CAP_DAC_OVERRIDE (permission bits) are SKIPPED with the reason
where those are unavailable. Prints one line per case and a summary; exit code 1 when a
case fails. Uses the standard library and the project's environment (numpy, Pillow, torch).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TIMEOUT_S = 120  # one command; a case exceeding it "hangs"
LOCK_NAME = ".bvvit.lock"
CLASSES = ("a", "b", "c")
TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "16", "--depth", "1", "--num-heads", "2"]
TRAIN = ["--epochs", "1", "--batch-size", "4", *TINY, "--no-progress"]
MODEL_TRAIN = ["--epochs", "2", "--batch-size", "4", *TINY, "--no-progress", "--seed", "0"]
# The big folder's runs: randomness in data (light augmentation) and model (drop-path).
SIGNAL_TRAIN = ["--epochs", "2", "--batch-size", "4", *TINY, "--no-progress", "--seed", "3",
                "--augment", "light", "--drop-path-rate", "0.1"]
QUANT = ["--bits", "8", "--baseline", "none", "--calib-size", "8", "--analysis", "none",
         "--no-progress", "--latency-runs", "1"]
COUNTS = re.compile(r"train (\d+), val (\d+) images")


# --- outcomes ----------------------------------------------------------------------------

class CaseFailure(Exception):
    """The product did not meet the case's expectation (the message says how)."""


class CaseSkipped(Exception):
    """The case cannot run on this machine (the message says why)."""


@dataclass
class Result:
    """A finished command."""

    argv: list[str]
    cwd: str
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def shown(self) -> str:
        """The command, its exit code and the tails of its output, for a failure report."""
        command = " ".join(_quoted(arg) for arg in self.argv)
        return (f"$ (cd {_quoted(self.cwd)} && {command})\n  exit {self.returncode}"
                f"{' (TIMED OUT)' if self.timed_out else ''} after {self.seconds:.1f} s\n"
                f"  stdout tail: {_tail(self.stdout)}\n  stderr tail: {_tail(self.stderr)}")


def _quoted(text: str) -> str:
    return text if re.fullmatch(r"[\w@%+=:,./-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return ("\n    " + "\n    ".join(kept)) if kept else "(empty)"


class Process:
    """A command running in its own process group, its output collected line by line."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]):
        self.argv, self.cwd, self.started = argv, cwd, time.monotonic()
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      errors="replace", start_new_session=True)
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                        for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines[name].append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, fragment: str, timeout: float = TIMEOUT_S, stream: str = "stdout") -> bool:
        """True once a line of ``stream`` holds ``fragment``; False if the process ended
        or ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(fragment in line for line in self.lines[stream]):
                if self.popen.poll() is not None and not any(r.is_alive() for r in self.readers):
                    return False
                if time.monotonic() > deadline:
                    return False
                self.changed.wait(0.1)
        return True

    def send(self, signum: int, group: bool = False) -> None:
        """``signum`` to the process (``kill PID``) or its whole group (Ctrl-C in a terminal)."""
        try:
            if group:
                os.killpg(self.popen.pid, signum)
            else:
                self.popen.send_signal(signum)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = TIMEOUT_S) -> Result:
        """Wait for the end; past ``timeout`` the whole group is killed and marked timed out."""
        timed_out = False
        try:
            self.popen.wait(timeout=max(0.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.send(signal.SIGKILL, group=True)
            self.popen.wait()
        for reader in self.readers:
            reader.join(10)
        # DataLoader workers and the like must not outlive the case.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return Result(self.argv, str(self.cwd), self.popen.returncode, "".join(self.lines["stdout"]),
                      "".join(self.lines["stderr"]), time.monotonic() - self.started, timed_out)


# --- file helpers --------------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_state(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``folder`` (links as their
    target, other special files as their kind; never opened); lock files left out."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(folder).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                state[rel] = "link -> " + os.readlink(path)
            elif stat.S_ISREG(mode) and name != LOCK_NAME:
                state[rel] = sha256(path)
            elif not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
                state[rel] = "special"
    return state


def state_difference(before: dict[str, str], after: dict[str, str], allow_new: bool = False) -> str:
    """'' when ``after`` keeps ``before`` (and adds nothing, unless ``allow_new``)."""
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    lost = sorted(k for k in before if k not in after)
    added = [] if allow_new else sorted(k for k in after if k not in before)
    parts = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
             for what, names in (("changed", changed), ("missing", lost), ("new", added)) if names]
    return "; ".join(parts)


def temporary_leftovers(folder: Path) -> list[str]:
    if not os.path.exists(folder):  # Path.exists raises for a name too long
        return []
    return [str(Path(d) / f) for d, _, files in os.walk(folder) for f in files if f.endswith(".tmp")]


def make_image_folder(root: Path, per_class: int = 4, val_per_class: Optional[int] = None,
                      classes: Sequence[str] = CLASSES, seed: int = 0, size: int = 16,
                      splits: Sequence[str] = ("train", "val")) -> Path:
    """``root/{train,val}/<class>/<i>.png``: 8-bit grayscale, each class a bright band in its
    own place, so a few steps learn something."""
    rng = np.random.default_rng(seed)
    for split in splits:
        count = per_class if split == "train" or val_per_class is None else val_per_class
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(class_pixels(rng, index, len(classes), size)).save(folder / f"{i}.png")
    return root


def class_pixels(rng: np.random.Generator, index: int, num_classes: int, size: int = 16) -> np.ndarray:
    base = np.zeros((size, size), dtype=np.float32)
    band = size // num_classes
    base[:, index * band:(index + 1) * band] = 200
    return np.clip(base + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)


def flip_tensor_bytes(path: Path, count: int = 64) -> str:
    """Invert ``count`` bytes inside the largest tensor of a .safetensors file (same size,
    valid header: what a bit flip or a careless edit does). Returns the tensor's name."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    name, info = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda item: item[1]["data_offsets"][1] - item[1]["data_offsets"][0])
    start, end = (8 + header_len + offset for offset in info["data_offsets"])
    for i in range(start, min(end, start + count)):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    return name


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """A small valid PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    Image.new("L", (8, 8)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = raw[16:29]
    ihdr[0:8] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[16:29] = ihdr
    raw[29:33] = zlib.crc32(b"IHDR" + bytes(ihdr)).to_bytes(4, "big")
    path.write_bytes(bytes(raw))


def summary_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def load_torch(path: Path) -> dict[str, Any]:
    import torch
    return torch.load(path, weights_only=True)


def save_torch(payload: dict[str, Any], path: Path) -> None:
    import torch
    torch.save(payload, path)


def differing_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two model files' state dicts."""
    import torch
    first, second = load_torch(a)["state_dict"], load_torch(b)["state_dict"]
    return sorted(k for k in set(first) | set(second)
                  if k not in first or k not in second or not torch.equal(first[k], second[k]))


# Run in a subprocess with the project's library (a hang or crash stays out of this process).
LABELS_SNIPPET = """
import json, os, sys
from bvvit.data import build_dataset, resolve_data
source = resolve_data(sys.argv[1])
splits = {name: build_dataset(source, name) for name in ("train", "val")}
print(json.dumps({"classes": list(splits["train"].class_names),
                  **{name: [[os.path.realpath(p), int(l)] for p, l in ds.samples]
                     for name, ds in splits.items()}}))
"""
LOAD_PACKED_SNIPPET = """
import sys
from bvvit.errors import BVViTError
from bvvit.quant import load_quantized_model
try:
    load_quantized_model(sys.argv[1])
except BVViTError as exc:
    print("REFUSED:", exc)
    sys.exit(3)
print("LOADED")
"""


# --- a case's context --------------------------------------------------------------------

class Context:
    """What a case works with: its temporary folder, the shared inputs, command runners and
    checks. Every command is checked for hangs and tracebacks as it ends; registered data
    folders are compared before/after and output folders searched for ``*.tmp`` at the end."""

    def __init__(self, tmp: Path, shared: "Shared"):
        self.tmp, self.shared = tmp, shared
        self.guards: list[tuple[Path, dict[str, str], bool]] = []
        self.output_dirs: list[Path] = []
        self.cleanups: list[Callable[[], None]] = []
        self.notes: list[str] = []

    # running
    def env(self, extra: Optional[dict[str, str]] = None, library: bool = False) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}
        env.pop("PYTHONPATH", None)
        if library:
            env["PYTHONPATH"] = str(ROOT)
        return env

    def start(self, script: str, *args: str, cwd: Optional[Path] = None, prefix: Sequence[str] = (),
              env: Optional[dict[str, str]] = None) -> Process:
        return Process([*prefix, PYTHON, str(ROOT / script), *map(str, args)], cwd or self.tmp,
                       self.env(env))

    def finish(self, process: Process, timeout: float = TIMEOUT_S) -> Result:
        result = process.finish(timeout)
        if result.timed_out:
            raise CaseFailure(f"hang: no exit within {timeout:.0f} s\n{result.shown()}")
        if "Traceback" in result.output:
            raise CaseFailure(f"traceback in the output\n{result.shown()}")
        return result

    def wait_for(self, process: Process, fragment: str, timeout: float = TIMEOUT_S) -> None:
        """Until ``fragment`` is on ``process``'s stdout; a failure if it ends or times out first."""
        if not process.wait_for(fragment, timeout):
            raise CaseFailure(f"{fragment!r} never appeared on stdout\n{self.finish(process).shown()}")

    def run(self, script: str, *args: Any, cwd: Optional[Path] = None, prefix: Sequence[str] = (),
            env: Optional[dict[str, str]] = None, timeout: float = TIMEOUT_S) -> Result:
        return self.finish(self.start(script, *map(str, args), cwd=cwd, prefix=prefix, env=env), timeout)

    def train(self, data: Path, out: Path, *extra: Any, **kwargs: Any) -> Result:
        """run.py on ``data`` into ``out`` with the tiny model for one epoch (``extra`` wins)."""
        self.output_dirs.append(out)
        return self.run("run.py", "--data-path", data, "--output-dir", out, *TRAIN, *extra, **kwargs)

    def quantize(self, model: Path, out: Path, *extra: Any, **kwargs: Any) -> Result:
        """post_training.py of ``model`` into ``out`` at 8 bits, no baseline, no report."""
        self.output_dirs.append(out)
        return self.run("post_training.py", "--model-path", model, "--output-dir", out, *QUANT, *extra,
                        **kwargs)

    def library(self, snippet: str, *args: Any, timeout: float = TIMEOUT_S) -> Result:
        """``python -c snippet args`` with the project importable (as a library user)."""
        process = Process([PYTHON, "-c", snippet, *map(str, args)], self.tmp, self.env(library=True))
        return self.finish(process, timeout)

    # inputs
    def data(self, name: str = "d", **kwargs: Any) -> Path:
        """A fresh small image folder (3 classes x 4 images per split) in this case's folder."""
        return make_image_folder(self.tmp / name, **kwargs)

    def copy(self, source: Path, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(source, target, symlinks=True)
        return target

    def guard(self, folder: Path, allow_new: bool = False) -> None:
        """``folder`` must end the case as it is now (new files allowed with ``allow_new``)."""
        self.guards.append((folder, tree_state(folder), allow_new))

    def unchanged(self, folder: Path, before: dict[str, str], allow_new: bool = False) -> None:
        difference = state_difference(before, tree_state(folder), allow_new)
        self.check(not difference, f"{folder} changed: {difference}")

    # checks
    def check(self, condition: Any, message: str, result: Optional[Result] = None) -> None:
        if not condition:
            raise CaseFailure(message + (f"\n{result.shown()}" if result else ""))

    def expect_ok(self, result: Result, *fragments: str) -> None:
        self.check(result.returncode == 0, "expected exit code 0", result)
        for fragment in fragments:
            self.check(fragment in result.output, f"expected {fragment!r} in the output", result)

    def expect_user_error(self, result: Result, *fragments: str, code: int = 2) -> str:
        """Exit ``code``, exactly one line on stderr holding every fragment; returns it."""
        lines = result.stderr_lines()
        self.check(result.returncode == code, f"expected exit code {code}", result)
        self.check(len(lines) == 1, f"expected one line on stderr, got {len(lines)}", result)
        for fragment in fragments:
            self.check(fragment.lower() in lines[0].lower(), f"expected {fragment!r} in the error line",
                       result)
        return lines[0]

    def expect_ok_or_user_error(self, result: Result) -> bool:
        """Either outcome is fine; True when the command succeeded."""
        if result.returncode == 0:
            self.notes.append("accepted")
            return True
        line = self.expect_user_error(result)
        self.notes.append(f"refused: {line[:220]}")
        return False

    def expect_counts(self, result: Result, train: int, val: int) -> None:
        found = COUNTS.search(result.stdout)
        self.check(found, "no 'train N, val M images' line", result)
        self.check((int(found[1]), int(found[2])) == (train, val),
                   f"expected train {train}, val {val} images, the run says {found[0]}", result)

    def expect_labels(self, data: Path, train: int, val: int) -> None:
        """Through the library: every sample's real file lies in the real folder of the class
        (of the training split's class list) it is labelled, and no file counts twice."""
        result = self.library(LABELS_SNIPPET, data)
        self.check(result.returncode == 0, "the library could not list the data", result)
        listing = json.loads(result.stdout.strip().splitlines()[-1])
        classes = listing["classes"]
        for split, expected in (("train", train), ("val", val)):
            samples = listing[split]
            reals = [real for real, _ in samples]
            self.check(len(samples) == expected, f"{split}: {len(samples)} samples, expected {expected}")
            self.check(len(set(reals)) == len(reals), f"{split}: a file counted twice")
            for real, label in samples:
                home = os.path.realpath(data / split / classes[label])
                self.check(real.startswith(home + os.sep),
                           f"{split}: {real} labelled {classes[label]!r} but not under {home}")

    def expect_clean(self, folder: Path) -> None:
        leftovers = temporary_leftovers(folder)
        self.check(not leftovers, f"temporary files left: {leftovers[:3]}")

    def close(self) -> None:
        """The checks every case ends with; runs the cleanups whatever happens."""
        try:
            for folder, before, allow_new in self.guards:
                self.unchanged(folder, before, allow_new)
            for folder in self.output_dirs:
                self.expect_clean(folder)
        finally:
            for cleanup in reversed(self.cleanups):
                try:
                    cleanup()
                except Exception as exc:  # noqa: BLE001 - a cleanup must not hide the verdict
                    print(f"    (cleanup failed: {exc})")


# --- inputs shared by the cases (built once, on first use) --------------------------------

class Shared:
    """The small data folder, a bigger one, a trained tiny model, another model, their
    8-bit quantization and a run interrupted mid-epoch: built on first use, then copied by
    the cases that change them. A build that fails fails every case that needs it."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, Any] = {}
        self.lock = threading.RLock()  # cases run in parallel; each input is built once

    def _get(self, name: str, ctx: Context, build: Callable[[Context, Path], Path]) -> Path:
        with self.lock:
            if name not in self.built:
                try:
                    self.built[name] = build(ctx, self.root / name)
                except CaseFailure as failure:
                    self.built[name] = CaseFailure(f"building the shared {name!r} failed: {failure}")
        if isinstance(self.built[name], CaseFailure):
            raise self.built[name]
        return self.built[name]

    def data(self, ctx: Context) -> Path:
        return self._get("data", ctx, lambda c, path: make_image_folder(path))

    def big(self, ctx: Context) -> Path:
        """3 classes x 60 training images: 45 steps an epoch at batch 4, time to interrupt."""
        return self._get("big", ctx, lambda c, path: make_image_folder(path, per_class=60, val_per_class=4))

    def model(self, ctx: Context) -> Path:
        """A finished 2-epoch run on the small folder (MODEL_TRAIN)."""
        return self._get("model", ctx, lambda c, path: self._train(c, path, "--seed", "0"))

    def other_model(self, ctx: Context) -> Path:
        """Another model of the same shape (seed 1)."""
        return self._get("other_model", ctx, lambda c, path: self._train(c, path, "--seed", "1"))

    def _train(self, ctx: Context, out: Path, *extra: str) -> Path:
        result = ctx.run("run.py", "--data-path", self.data(ctx), "--output-dir", out, *MODEL_TRAIN, *extra)
        ctx.expect_ok(result)
        return out

    def quantized(self, ctx: Context) -> Path:
        """post_training of ``model`` at 8 bits (QUANT) into its own folder."""
        def build(c: Context, path: Path) -> Path:
            result = c.run("post_training.py", "--model-path", self.model(c) / "vit_model.pth",
                           "--output-dir", path, *QUANT)
            c.expect_ok(result)
            return path
        return self._get("quantized", ctx, build)

    def interrupted(self, ctx: Context) -> Path:
        """A SIGNAL_TRAIN run on the big folder stopped by SIGTERM early in epoch 2."""
        def build(c: Context, path: Path) -> Path:
            process = c.start("run.py", "--data-path", self.big(c), "--output-dir", path, *SIGNAL_TRAIN)
            c.wait_for(process, "epoch 1/2")
            process.send(signal.SIGTERM)
            result = c.finish(process)
            c.check(result.returncode == 143, "expected exit 143 after SIGTERM", result)
            return path
        return self._get("interrupted", ctx, build)


# --- machine abilities ---------------------------------------------------------------------

_PROBES: dict[str, Any] = {}
_PROBES_LOCK = threading.Lock()


def unprivileged_prefix(scratch: Path) -> list[str]:
    """A command prefix under which permission bits apply (none needed when not root; for
    root, setpriv without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH); CaseSkipped if impossible."""
    with _PROBES_LOCK:
        if "setpriv" not in _PROBES:
            _PROBES["setpriv"] = _probe_setpriv(scratch)
    if isinstance(_PROBES["setpriv"], str):
        raise CaseSkipped(_PROBES["setpriv"])
    return _PROBES["setpriv"]


def _probe_setpriv(scratch: Path) -> list[str] | str:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return "root without setpriv: permission bits cannot be tested"
    caps = "-dac_override,-dac_read_search"
    prefix = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]
    locked = scratch / "setpriv-probe"
    locked.mkdir(mode=0)
    try:
        probe = subprocess.run([*prefix, PYTHON, "-c", "import os, sys; os.listdir(sys.argv[1])", str(locked)],
                               capture_output=True, text=True, timeout=60)
    finally:
        locked.rmdir()
    return prefix if "PermissionError" in probe.stderr else "setpriv cannot drop CAP_DAC_OVERRIDE here"


def chmod_for_case(ctx: Context, path: Path, mode: int) -> None:
    """chmod ``path`` for the case; restored (0o755) when the case ends."""
    path.chmod(mode)
    ctx.cleanups.append(lambda: path.chmod(0o755))


def immutable_for_case(ctx: Context, path: Path) -> None:
    """``chattr +i path`` for the case (removed at its end); CaseSkipped if unsupported."""
    chattr = shutil.which("chattr")
    if chattr is None or os.geteuid() != 0:
        raise CaseSkipped("chattr +i needs root and e2fsprogs")
    done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise CaseSkipped(f"chattr +i failed here: {done.stderr.strip()}")
    ctx.cleanups.append(lambda: subprocess.run([chattr, "-i", str(path)], capture_output=True))


def tmpfs_for_case(ctx: Context, folder: Path, size: str) -> Path:
    """A tmpfs of ``size`` mounted at ``folder`` for the case; CaseSkipped if mount fails."""
    folder.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise CaseSkipped(f"cannot mount a tmpfs for a full disk: {done.stderr.strip() or 'not root'}")
    ctx.cleanups.append(lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True))
    return folder


def fill_to_free(folder: Path, free_bytes: int) -> None:
    """Write a filler file in ``folder`` so that about ``free_bytes`` stay free there."""
    info = os.statvfs(folder)
    available = info.f_bavail * info.f_frsize
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, available - free_bytes))


# --- the cases -----------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    item: str  # the issue item it covers ("1".."11", or "more")
    checks: str
    run: Callable[[Context], None]


CASES: dict[str, Case] = {}


def case(item: str, checks: str) -> Callable[[Callable[[Context], None]], Callable[[Context], None]]:
    def register(function: Callable[[Context], None]) -> Callable[[Context], None]:
        CASES[function.__name__] = Case(function.__name__, item, checks, function)
        return function
    return register


def add_case(name: str, item: str, checks: str, function: Callable[[Context], None]) -> None:
    CASES[name] = Case(name, item, checks, function)


# 1. links ---------------------------------------------------------------------------------

def _linked_folder_case(make_links: Callable[[Path], None], said: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        data = ctx.data()
        make_links(data)
        ctx.guard(data)
        result = ctx.train(data, ctx.tmp / "out")
        ctx.expect_ok(result, said)
        ctx.expect_counts(result, 12, 12)
        ctx.expect_labels(data, 12, 12)
    return run


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


LINK_CASES = {
    "links_loop_up": ("train/a/up -> ..", lambda d: _link(d / "train/a/up", ".."), "loop"),
    "links_loop_data_root": ("train/b/top -> ../..", lambda d: _link(d / "train/b/top", "../.."), "loop"),
    "links_loop_self": ("train/c/deep/self -> .", lambda d: _link(d / "train/c/deep/self", "."), "loop"),
    "links_file_into_other_class": ("train/a/x.png -> ../b/0.png",
                                    lambda d: _link(d / "train/a/x.png", "../b/0.png"), "another class"),
    "links_folder_into_other_class": ("train/a/bb -> ../b", lambda d: _link(d / "train/a/bb", "../b"),
                                      "another class"),
    "links_same_image_twice": ("train/a/dup1.png, dup2.png -> 0.png",
                               lambda d: (_link(d / "train/a/dup1.png", "0.png"),
                                          _link(d / "train/a/dup2.png", "0.png")), "already listed"),
    "links_broken": ("train/a/gone.png -> nowhere, train/b/moved -> /nonexistent",
                     lambda d: (_link(d / "train/a/gone.png", "nowhere.png"),
                                _link(d / "train/b/moved", "/nonexistent/disk")), "pointing nowhere"),
}
for _name, (_what, _make, _said) in LINK_CASES.items():
    add_case(_name, "1", f"{_what}: exit 0, said ({_said!r}), train 12/val 12, labels by real folder, "
             "data unchanged", _linked_folder_case(_make, _said))


@case("1", "train/c -> a (class folder linked to another class): one-line error, data unchanged")
def links_class_folder_is_another_class(ctx: Context) -> None:
    data = ctx.data()
    shutil.rmtree(data / "train" / "c")
    (data / "train" / "c").symlink_to("a")
    ctx.guard(data)
    ctx.expect_user_error(ctx.train(data, ctx.tmp / "out"), "train/c")


@case("1", "class folder a is a link to another disk: exit 0, counts 12/12, labels")
def links_class_folder_on_other_disk(ctx: Context) -> None:
    data = ctx.data()
    shutil.move(data / "train" / "a", ctx.tmp / "disk_a")
    (data / "train" / "a").symlink_to(ctx.tmp / "disk_a")
    ctx.guard(data)
    result = ctx.train(data, ctx.tmp / "out")
    ctx.expect_ok(result)
    ctx.expect_counts(result, 12, 12)
    ctx.expect_labels(data, 12, 12)


@case("1", "val/b -> ../train/b (train images leak into val): exit 0, the leak said, labels")
def links_val_class_is_train_class(ctx: Context) -> None:
    data = ctx.data()
    shutil.rmtree(data / "val" / "b")
    (data / "val" / "b").symlink_to("../train/b")
    ctx.guard(data)
    result = ctx.train(data, ctx.tmp / "out")
    ctx.expect_ok(result, "val/")
    ctx.expect_counts(result, 12, 12)
    ctx.expect_labels(data, 12, 12)


# 2. reruns and concurrent runs ------------------------------------------------------------

@case("2", "run.py into a finished run's folder: one-line refusal, every file unchanged")
def rerun_into_finished_run(ctx: Context) -> None:
    run_dir = ctx.copy(ctx.shared.model(ctx), "run")
    ctx.guard(run_dir)
    result = ctx.train(ctx.shared.data(ctx), run_dir, "--lr", "0.002")
    ctx.expect_user_error(result, str(run_dir), "--resume auto", "--overwrite")


@case("2", "--overwrite: old run moved aside whole (same hashes), new run with the new --lr")
def rerun_overwrite_moves_aside_whole(ctx: Context) -> None:
    run_dir = ctx.copy(ctx.shared.model(ctx), "run")
    before = tree_state(run_dir)
    result = ctx.train(ctx.shared.data(ctx), run_dir, "--lr", "0.002", "--overwrite")
    ctx.expect_ok(result)
    asides = sorted(ctx.tmp.glob("run.previous-*"))
    ctx.check(len(asides) == 1, f"expected one run.previous-* folder, found {asides}", result)
    ctx.unchanged(asides[0], before)
    ctx.check(json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 0.002,
              "the new config.json does not record --lr 0.002")


def _second_training_while_the_first_is_suspended(ctx: Context, *second_flags: str) -> None:
    """A run suspended with Ctrl-Z after epoch 1 (still holding its folder), a second run
    into the same folder (refused: in use, naming the pid), then the first resumed with
    SIGCONT: it ends fine, its folder holds only its own config and weights."""
    data, out = ctx.shared.data(ctx), ctx.tmp / "out"
    ctx.output_dirs.append(out)
    first = ctx.start("run.py", "--data-path", data, "--output-dir", out, *TRAIN, "--epochs", "30")
    ctx.wait_for(first, "epoch 1/30")
    # Ctrl-Z; SIGSTOP because the kernel discards SIGTSTP in this orphaned process group
    first.send(signal.SIGSTOP, group=True)
    try:
        second = ctx.train(data, out, "--lr", "0.005", "--epochs", "2", *second_flags)
    finally:
        first.send(signal.SIGCONT, group=True)
    ctx.expect_user_error(second, "in use", f"pid {first.pid}")
    ctx.expect_ok(ctx.finish(first))
    ctx.check(not list(ctx.tmp.glob("out.previous-*")), "the running run's folder was moved aside")
    recorded = json.loads((out / "config.json").read_text())["train"]
    checkpoint = load_torch(out / "checkpoints" / "last.pth")
    ctx.check(recorded["lr"] == 0.001 and recorded["epochs"] == 30, f"config.json mixed: {recorded}")
    ctx.check(checkpoint["train_config"]["lr"] == 0.001 and checkpoint["epoch"] == 30,
              "the checkpoint is not the first run's")


@case("2", "run.py into a folder whose run is suspended (Ctrl-Z): refused 'in use' naming its pid; "
           "config and weights both from the first")
def concurrent_training_runs(ctx: Context) -> None:
    _second_training_while_the_first_is_suspended(ctx)


@case("2", "run.py --overwrite of a folder whose run is suspended (Ctrl-Z): refused 'in use', the "
           "running run's folder not moved")
def concurrent_training_overwrite(ctx: Context) -> None:
    _second_training_while_the_first_is_suspended(ctx, "--overwrite")


@case("2", "--overwrite of a folder that holds the --data-path: refused in one line, nothing moved")
def overwrite_would_move_the_data(ctx: Context) -> None:
    project = ctx.copy(ctx.shared.model(ctx), "project")
    make_image_folder(project / "d")
    ctx.guard(project)
    result = ctx.train(project / "d", project, "--overwrite")
    ctx.expect_user_error(result, "--overwrite")
    ctx.check(not list(ctx.tmp.glob("project.previous-*")), "the folder was moved anyway")


@case("2", "--overwrite through a symlinked --output-dir: old run kept whole somewhere, new run "
           "readable through the link (or one-line refusal, nothing changed)")
def overwrite_through_symlinked_output_dir(ctx: Context) -> None:
    real = ctx.copy(ctx.shared.model(ctx), "real")
    link = ctx.tmp / "link"
    link.symlink_to(real)
    before = tree_state(real)
    result = ctx.train(ctx.shared.data(ctx), link, "--overwrite", "--lr", "0.002")
    if not ctx.expect_ok_or_user_error(result):
        difference = state_difference(before, tree_state(real)) if real.exists() else "moved away"
        ctx.check(not difference, f"refused, but {real} changed ({difference}); folders now: "
                  f"{sorted(p.name for p in ctx.tmp.iterdir())}", result)
        return
    kept = [p for p in ctx.tmp.iterdir() if p.is_dir() and not p.is_symlink()
            and not state_difference(before, tree_state(p))]
    ctx.check(kept, "the old run is nowhere whole any more", result)
    ctx.check(json.loads((link / "config.json").read_text())["train"]["lr"] == 0.002,
              "the new run is not behind the link", result)


@case("2", "--pretrained-path OUT/vit_model.pth with --overwrite of OUT: the old model kept "
           "byte for byte (refused, or moved aside whole)")
def overwrite_with_pretrained_from_the_same_folder(ctx: Context) -> None:
    run_dir = ctx.copy(ctx.shared.model(ctx), "run")
    before = tree_state(run_dir)
    result = ctx.train(ctx.shared.data(ctx), run_dir, "--overwrite", "--pretrained-path",
                       run_dir / "vit_model.pth")
    if not ctx.expect_ok_or_user_error(result):
        ctx.unchanged(run_dir, before)
        return
    asides = sorted(ctx.tmp.glob("run.previous-*"))
    ctx.check(len(asides) == 1, "old run not moved aside whole", result)
    ctx.unchanged(asides[0], before)


@case("2", "--output-dir DATA/runs/r1 (runs kept beside train/ val/): a later run still sees "
           "train 12, val 12")
def output_dir_inside_the_data_folder(ctx: Context) -> None:
    data = ctx.data()
    ctx.guard(data, allow_new=True)
    ctx.expect_ok(ctx.train(data, data / "runs" / "r1"))
    later = ctx.train(data, ctx.tmp / "r2")
    ctx.expect_ok(later)
    ctx.expect_counts(later, 12, 12)


@case("2", "--output-dir DATA/train/out (inside a split): refused, or a later run still has 3 "
           "classes and train 12 (outputs never become a class or images)")
def output_dir_inside_the_train_split(ctx: Context) -> None:
    data = ctx.data()
    ctx.guard(data, allow_new=True)
    first = ctx.train(data, data / "train" / "out")
    if not ctx.expect_ok_or_user_error(first):
        return
    later = ctx.train(data, ctx.tmp / "r2")
    ctx.check(later.returncode == 0 and "3 classes" in later.stdout,
              "the first run's outputs changed the data of the next run", later)
    ctx.expect_counts(later, 12, 12)


@case("2", "post_training of another model into a folder of results: one-line refusal, folder unchanged")
def quantize_other_model_into_used_folder(ctx: Context) -> None:
    q = ctx.copy(ctx.shared.quantized(ctx), "q")
    ctx.guard(q)
    result = ctx.quantize(ctx.shared.other_model(ctx) / "vit_model.pth", q)
    ctx.expect_user_error(result, str(q), "--overwrite")


@case("2", "post_training --overwrite with another model: old results aside whole, new folder "
           "holds exactly the manifest's files, manifest names the new model")
def quantize_other_model_overwrite(ctx: Context) -> None:
    q = ctx.copy(ctx.shared.quantized(ctx), "q")
    before = tree_state(q)
    model = ctx.shared.other_model(ctx) / "vit_model.pth"
    result = ctx.quantize(model, q, "--overwrite")
    ctx.expect_ok(result)
    asides = sorted(ctx.tmp.glob("q.previous-*"))
    ctx.check(len(asides) == 1, f"expected one q.previous-*, found {asides}", result)
    ctx.unchanged(asides[0], before)
    _expect_manifest_is_the_folder(ctx, q, model)


def _expect_manifest_is_the_folder(ctx: Context, q: Path, model: Path) -> None:
    manifest = json.loads((q / "manifest.json").read_text())
    on_disk = {k: v for k, v in tree_state(q).items() if k != "manifest.json"}
    listed = {rel: info["sha256"] for rel, info in manifest["files"].items()}
    ctx.check(manifest["complete"], "manifest not complete")
    ctx.check(on_disk == listed, f"folder and manifest differ: {state_difference(listed, on_disk)}")
    ctx.check(manifest["model"]["sha256"] == sha256(model), "manifest names another model")


@case("2", "post_training --bits 8 6, then --bits 8 in the same folder: the w6a6 files removed "
           "(said), folder == manifest")
def quantize_rerun_removes_what_it_no_longer_makes(ctx: Context) -> None:
    model, q = ctx.shared.model(ctx) / "vit_model.pth", ctx.tmp / "q"
    ctx.expect_ok(ctx.quantize(model, q, "--bits", "8", "6"))
    result = ctx.quantize(model, q)
    ctx.expect_ok(result, "removed")
    ctx.check(not [p for p in q.rglob("*w6a6*")], "w6a6 files still there")
    ctx.check([r["name"] for r in summary_rows(q)].count("w6a6") == 0, "w6a6 row still in summary.csv")
    _expect_manifest_is_the_folder(ctx, q, model)


@case("2", "post_training --overwrite into a folder whose run is suspended (Ctrl-Z): refused 'in use' "
           "naming its pid, not moved; the first ends fine")
def concurrent_quantization_runs(ctx: Context) -> None:
    model, q = ctx.shared.model(ctx) / "vit_model.pth", ctx.tmp / "q"
    ctx.output_dirs.append(q)
    first = ctx.start("post_training.py", "--model-path", model, "--output-dir", q, *QUANT)
    ctx.wait_for(first, "fp32:")
    first.send(signal.SIGSTOP, group=True)  # suspended (Ctrl-Z), still holding the folder
    try:
        second = ctx.quantize(model, q, "--overwrite")
    finally:
        first.send(signal.SIGCONT, group=True)
    ctx.expect_user_error(second, "in use", f"pid {first.pid}")
    ctx.expect_ok(ctx.finish(first))
    ctx.check(not list(ctx.tmp.glob("q.previous-*")), "the running run's folder was moved aside")


@case("2", "post_training --output-dir = the training folder: training files unchanged and the "
           "run still resumable (or one-line refusal)")
def quantize_into_the_training_folder(ctx: Context) -> None:
    run_dir = ctx.copy(ctx.shared.model(ctx), "run")
    ctx.guard(run_dir, allow_new=True)
    result = ctx.quantize(run_dir / "vit_model.pth", run_dir)
    if not ctx.expect_ok_or_user_error(result):
        return
    ctx.expect_ok(ctx.quantize(run_dir / "vit_model.pth", run_dir, "--bits", "6"))
    ctx.expect_ok(ctx.run("run.py", "--data-path", ctx.shared.data(ctx), "--output-dir", run_dir,
                          *MODEL_TRAIN, "--resume", "auto"))


@case("2", "post_training --output-dir = the training folder --overwrite: never moves the model "
           "it reads (one-line refusal, or training files unchanged)")
def quantize_into_the_training_folder_overwrite(ctx: Context) -> None:
    run_dir = ctx.copy(ctx.shared.model(ctx), "run")
    ctx.guard(run_dir, allow_new=True)
    ctx.expect_ok_or_user_error(ctx.quantize(run_dir / "vit_model.pth", run_dir, "--overwrite"))


@case("2", "post_training into a folder with a hand-made summary.csv (no manifest): one-line "
           "refusal, folder unchanged")
def quantize_into_folder_of_unknown_results(ctx: Context) -> None:
    q = ctx.tmp / "q"
    q.mkdir()
    (q / "summary.csv").write_text("name,top1\nfp32,99.0\n")
    ctx.guard(q)
    ctx.expect_user_error(ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", q), "--overwrite")


@case("2", "model file replaced by another model, post_training rerun into its folder: refused, "
           "or nothing reused")
def quantize_rerun_after_the_model_changed(ctx: Context) -> None:
    run_dir = ctx.copy(ctx.shared.model(ctx), "run")
    q = run_dir / "quantization"
    ctx.expect_ok(ctx.quantize(run_dir / "vit_model.pth", q))
    shutil.copy(ctx.shared.other_model(ctx) / "vit_model.pth", run_dir / "vit_model.pth")
    before = tree_state(q)
    result = ctx.quantize(run_dir / "vit_model.pth", q)
    if ctx.expect_ok_or_user_error(result):
        ctx.check("reusing" not in result.stdout, "results of the old model reused", result)
    else:
        ctx.unchanged(q, before)


# 3. tampered packed files -----------------------------------------------------------------

def _tampered_copy(ctx: Context) -> tuple[Path, Path, str]:
    q = ctx.copy(ctx.shared.quantized(ctx), "q")
    top1 = next(r["top1"] for r in summary_rows(q) if r["name"] == "w8a8")
    return q, q / "models" / "vit_w8a8.safetensors", top1


def _expect_recomputed(ctx: Context, q: Path, top1: str) -> None:
    result = ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", q)
    ctx.expect_ok(result)
    ctx.check("w8a8: reusing" not in result.stdout, "the damaged file was reused", result)
    ctx.check("w8a8: not reusing" in result.stdout, "the recomputation was not said", result)
    now = next(r["top1"] for r in summary_rows(q) if r["name"] == "w8a8")
    ctx.check(now == top1, f"w8a8 top-1 {now} after recomputing, {top1} before the damage", result)
    loaded = ctx.library(LOAD_PACKED_SNIPPET, q / "models" / "vit_w8a8.safetensors")
    ctx.check(loaded.returncode == 0, "the rewritten packed file does not load", loaded)


@case("3", "64 bytes of vit_w8a8.safetensors flipped (same size), rerun: not reused (said), "
           "top-1 as before the damage, file loads again")
def tampered_packed_file_rerun(ctx: Context) -> None:
    q, packed, top1 = _tampered_copy(ctx)
    flip_tensor_bytes(packed)
    _expect_recomputed(ctx, q, top1)


@case("3", "load_quantized_model of a flipped packed file: refused in one line naming the file")
def tampered_packed_file_load(ctx: Context) -> None:
    _, packed, _ = _tampered_copy(ctx)
    flip_tensor_bytes(packed)
    result = ctx.library(LOAD_PACKED_SNIPPET, packed)
    ctx.check(result.returncode == 3, "a modified packed file loaded", result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    ctx.check(len(lines) == 1 and str(packed) in lines[0], "the refusal does not name the file", result)


@case("3", "packed file truncated to half, rerun: recomputed (said), top-1 as before")
def truncated_packed_file_rerun(ctx: Context) -> None:
    q, packed, top1 = _tampered_copy(ctx)
    packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    _expect_recomputed(ctx, q, top1)


@case("3", "result record vit_w8a8.result.json is garbage, rerun: recomputed (said), top-1 as before")
def garbage_result_record_rerun(ctx: Context) -> None:
    q, _, top1 = _tampered_copy(ctx)
    (q / "models" / "vit_w8a8.result.json").write_text("{")
    _expect_recomputed(ctx, q, top1)


# 4. resume with workers -------------------------------------------------------------------

def _interrupt_and_resume(ctx: Context, signum: int, group: bool, code: int) -> None:
    big = ctx.shared.big(ctx)
    reference, out = ctx.tmp / "reference", ctx.tmp / "stopped"
    ctx.output_dirs += [reference, out]
    ctx.expect_ok(ctx.run("run.py", "--data-path", big, "--output-dir", reference, *SIGNAL_TRAIN,
                          "--workers", "0"))
    process = ctx.start("run.py", "--data-path", big, "--output-dir", out, *SIGNAL_TRAIN, "--workers", "2")
    ctx.wait_for(process, "epoch 1/2")
    process.send(signum, group=group)
    stopped = ctx.finish(process)
    ctx.check(stopped.returncode == code, f"expected exit {code} after the signal", stopped)
    ctx.check(len(stopped.stderr_lines()) <= 1, "more than one line on stderr", stopped)
    resumed = ctx.run("run.py", "--data-path", big, "--output-dir", out, *SIGNAL_TRAIN, "--workers", "2",
                      "--resume", "auto")
    ctx.expect_ok(resumed)
    where = re.search(r"\d+ steps into epoch \d+|epoch \d+/2", resumed.stdout)
    ctx.notes.append(f"resumed at {where[0] if where else '?'}")
    differing = differing_weights(reference / "vit_model.pth", out / "vit_model.pth")
    ctx.check(not differing, f"weights differ from the uninterrupted run: {differing[:4]}", resumed)


@case("4", "--workers 2, SIGTERM (kill PID) in epoch 2, --resume auto --workers 2: exit 143, same "
           "weights as an uninterrupted --workers 0 run")
def resume_workers2_after_sigterm_is_exact(ctx: Context) -> None:
    _interrupt_and_resume(ctx, signal.SIGTERM, group=False, code=143)


@case("4", "--workers 2, Ctrl-C (SIGINT to the whole process group, workers too) in epoch 2, "
           "--resume auto: exit 130, no worker traceback, same weights")
def resume_workers2_after_ctrl_c_is_exact(ctx: Context) -> None:
    _interrupt_and_resume(ctx, signal.SIGINT, group=True, code=130)


@case("4", "kill -9 of the process group in epoch 2, --resume auto: finishes, leftovers cleaned, "
           "same weights as uninterrupted")
def resume_after_kill_9(ctx: Context) -> None:
    big = ctx.shared.big(ctx)
    out, reference = ctx.tmp / "killed", ctx.tmp / "reference"
    ctx.output_dirs += [out, reference]
    ctx.expect_ok(ctx.run("run.py", "--data-path", big, "--output-dir", reference, *SIGNAL_TRAIN))
    process = ctx.start("run.py", "--data-path", big, "--output-dir", out, *SIGNAL_TRAIN)
    ctx.wait_for(process, "epoch 1/2")
    process.send(signal.SIGKILL, group=True)
    process.finish()
    resumed = ctx.run("run.py", "--data-path", big, "--output-dir", out, *SIGNAL_TRAIN, "--resume", "auto")
    ctx.expect_ok(resumed)
    differing = differing_weights(reference / "vit_model.pth", out / "vit_model.pth")
    ctx.check(not differing, f"weights differ from the uninterrupted run: {differing[:4]}", resumed)


# 5. 16-bit and float images -----------------------------------------------------------------

@case("5", "the same pixels as 8-bit PNG vs 16-bit PNG/TIFF, float TIFF in [0,1] and a dark 16-bit "
           "image (max <= 255): identical trained weights")
def deep_images_scaled_by_their_range(ctx: Context) -> None:
    rng = np.random.default_rng(7)
    eight, deep = ctx.tmp / "eight", ctx.tmp / "deep"
    for split in ("train", "val"):
        for index, name in enumerate(CLASSES):
            for folder in (eight, deep):
                (folder / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = class_pixels(rng, index, len(CLASSES))
                if name == "c" and i == 0:  # dark 16-bit: values <= 60 are 0 in 8 bits
                    Image.fromarray(np.zeros((16, 16), np.uint8)).save(eight / split / name / f"{i}.png")
                    dark = rng.integers(0, 61, (16, 16)).astype(np.uint16)
                    Image.fromarray(dark).save(deep / split / name / f"{i}.png")
                    continue
                Image.fromarray(pixels).save(eight / split / name / f"{i}.png")
                if name == "a":
                    Image.fromarray(pixels.astype(np.uint16) * 257).save(deep / split / name / f"{i}.png")
                elif name == "b":
                    Image.fromarray(pixels.astype(np.float32) / 255).save(deep / split / name / f"{i}.tif")
                else:
                    Image.fromarray(pixels.astype(np.uint16) * 257).save(deep / split / name / f"{i}.tif")
    for folder in (eight, deep):
        ctx.guard(folder)
        result = ctx.train(folder, ctx.tmp / f"out_{folder.name}", "--augment", "none", "--epochs", "2")
        ctx.expect_ok(result)
        ctx.expect_counts(result, 12, 12)
    differing = differing_weights(ctx.tmp / "out_eight" / "vit_model.pth", ctx.tmp / "out_deep" / "vit_model.pth")
    ctx.check(not differing, f"deep images train differently from their 8-bit twins: {differing[:4]}")


# 6. files that are not regular files ----------------------------------------------------------

def _special_files_case(make: Callable[[Context, Path], list[Path]]) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        data = ctx.data()
        specials = make(ctx, data)
        ctx.guard(data)
        process = ctx.start("run.py", "--data-path", data, "--output-dir", ctx.tmp / "out", *TRAIN)
        ctx.output_dirs.append(ctx.tmp / "out")
        try:
            result = ctx.finish(process, timeout=90)
        finally:
            for fifo in specials:  # release a reader blocked on a FIFO, should it be one
                if fifo.is_fifo():
                    try:
                        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    except OSError:
                        pass
        ctx.expect_ok(result, "not a regular file")
        ctx.expect_counts(result, 12, 12)
    return run


def _make_fifos(ctx: Context, data: Path) -> list[Path]:
    fifos = [data / "train" / "a" / "-first.png", data / "val" / "b" / "x.jpg"]
    for fifo in fifos:
        os.mkfifo(fifo)
    return fifos


def _make_device_links(ctx: Context, data: Path) -> list[Path]:
    (data / "train" / "a" / "zero.png").symlink_to("/dev/zero")
    (data / "train" / "b" / "random.jpg").symlink_to("/dev/urandom")
    return []


def _make_socket(ctx: Context, data: Path) -> list[Path]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(data / "train" / "c" / "s.png"))
    ctx.cleanups.append(listener.close)
    return []


add_case("fifo_named_png", "6", "FIFOs train/a/-first.png and val/b/x.jpg: no hang, ignored and said, "
         "counts 12/12", _special_files_case(_make_fifos))
add_case("device_links_named_png", "6", "train/a/zero.png -> /dev/zero, random.jpg -> /dev/urandom: no "
         "hang, ignored and said, counts 12/12", _special_files_case(_make_device_links))
add_case("socket_named_png", "6", "a Unix socket train/c/s.png: ignored and said, counts 12/12",
         _special_files_case(_make_socket))


# 7. workers -----------------------------------------------------------------------------------

@case("7", "--workers 1000: capped at the usable CPUs with a warning, config.json records the cap")
def workers_1000(ctx: Context) -> None:
    out = ctx.tmp / "out"
    result = ctx.train(ctx.shared.data(ctx), out, "--workers", "1000", timeout=90)
    ctx.expect_ok(result, "--workers 1000")
    cpus = len(os.sched_getaffinity(0))
    recorded = json.loads((out / "config.json").read_text())["train"]["workers"]
    ctx.check(recorded == cpus, f"config.json records workers {recorded}, expected {cpus}")


# 8. permissions ---------------------------------------------------------------------------------

def _unreadable_case(locked: str, fragments: Callable[[Path], Sequence[str]]) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        prefix = unprivileged_prefix(ctx.tmp)
        data = ctx.data()
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(_mkdirs(data / "train" / "a" / "nested") / "n.png")
        ctx.guard(data)
        path = data / locked
        chmod_for_case(ctx, path, 0)
        try:
            result = ctx.train(data, ctx.tmp / "out", prefix=prefix)
        finally:
            path.chmod(0o755)
        ctx.expect_user_error(result, *fragments(path))
    return run


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


for _name, _locked in (("unreadable_subfolder", "train/a/nested"), ("unreadable_class_folder", "train/b"),
                       ("unreadable_val", "val"), ("unreadable_data_root", ".")):
    add_case(_name, "8", f"chmod 0 {_locked} (setpriv drops root's bypass): one line naming it, "
             "'Permission denied'",
             _unreadable_case(_locked, lambda path: (str(path).rstrip("/."), "Permission denied")))
add_case("unreadable_image", "8", "chmod 0 train/a/0.png: one line naming the file",
         _unreadable_case("train/a/0.png", lambda path: (str(path),)))


@case("8", "post_training of a model file chmod 0: one line naming it")
def unreadable_model_file(ctx: Context) -> None:
    prefix = unprivileged_prefix(ctx.tmp)
    run_dir = ctx.copy(ctx.shared.model(ctx), "run")
    chmod_for_case(ctx, run_dir / "vit_model.pth", 0)
    result = ctx.quantize(run_dir / "vit_model.pth", ctx.tmp / "q", prefix=prefix)
    ctx.expect_user_error(result, "vit_model.pth")


@case("8", "--output-dir under a read-only folder: one line naming it")
def unwritable_output_parent(ctx: Context) -> None:
    prefix = unprivileged_prefix(ctx.tmp)
    parent = _mkdirs(ctx.tmp / "readonly")
    chmod_for_case(ctx, parent, 0o555)
    result = ctx.train(ctx.shared.data(ctx), parent / "out", prefix=prefix)
    ctx.expect_user_error(result, str(parent / "out"))


# 9. numbers -----------------------------------------------------------------------------------

TRAIN_FLAG_ERRORS = {
    "lr_nan": (["--lr", "nan"], "--lr"),
    "lr_inf": (["--lr", "inf"], "--lr"),
    "lr_negative": (["--lr", "-0.001"], "--lr"),
    "warmup_nan": (["--warmup-epochs", "nan"], "--warmup-epochs"),
    "warmup_inf": (["--warmup-epochs", "inf"], "--warmup-epochs"),
    "mlp_ratio_nan": (["--mlp-ratio", "nan"], "--mlp-ratio"),
    "mlp_ratio_inf": (["--mlp-ratio", "inf"], "--mlp-ratio"),
    "mlp_ratio_0.001": (["--mlp-ratio", "0.001"], "--mlp-ratio"),
    "img_size_7000": (["--img-size", "7000"], "--img-size"),
    "min_lr_above_lr": (["--min-lr", "0.1"], "--min-lr"),
    "drop_rate_1.5": (["--drop-rate", "1.5"], "--drop-rate"),
    "drop_path_nan": (["--drop-path-rate", "nan"], "--drop-path-rate"),
    "label_smoothing_2": (["--label-smoothing", "2"], "--label-smoothing"),
    "weight_decay_nan": (["--weight-decay", "nan"], "--weight-decay"),
    "clip_grad_nan": (["--clip-grad", "nan"], "--clip-grad"),
    "epochs_0": (["--epochs", "0"], "--epochs"),
    "workers_negative": (["--workers", "-3"], "--workers"),
    "embed_dim_not_divisible": (["--embed-dim", "16", "--num-heads", "3"], "--num-heads"),
}


def _train_flag_error(flags: list[str], fragment: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        out = ctx.tmp / "out"
        ctx.expect_user_error(ctx.train(ctx.shared.data(ctx), out, *flags), fragment)
        ctx.check(not out.exists(), f"{out} was created by a refused run")
    return run


for _name, (_flags, _fragment) in TRAIN_FLAG_ERRORS.items():
    add_case(f"train_flag_{_name}", "9", f"run.py {' '.join(_flags)}: one line naming {_fragment}, "
             "no output folder left", _train_flag_error(_flags, _fragment))


QUANT_FLAG_ERRORS = {
    "bits_1": (["--bits", "1"], "bits"),
    "calib_size_0": (["--calib-size", "0"], "--calib-size"),
    "avg_bits_nan": (["--avg-bits", "nan"], "--avg-bits"),
    "eval_subset_0": (["--eval-subset", "0"], "--eval-subset"),
    "latency_runs_negative": (["--latency-runs", "-1"], "--latency-runs"),
    "batch_size_0": (["--batch-size", "0"], "--batch-size"),
    "w_bits_a_bits_unpaired": (["--w-bits", "4", "8", "--a-bits", "8", "4", "6"], "--a-bits"),
    "override_garbage": (["--override", "blocks.0"], "--override"),
    "override_bits_99": (["--override", "head=99"], "99"),
}


def _quant_flag_error(flags: list[str], fragment: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        out = ctx.tmp / "q"
        ctx.expect_user_error(ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", out, *flags), fragment)
        ctx.check(not out.exists(), f"{out} was created by a refused run")
    return run


for _name, (_flags, _fragment) in QUANT_FLAG_ERRORS.items():
    add_case(f"quant_flag_{_name}", "9", f"post_training {' '.join(_flags)}: one line naming {_fragment}, "
             "no output folder left", _quant_flag_error(_flags, _fragment))


@case("9", "--lr 1e6: one line naming epoch and step and suggesting a lower --lr; exit 2; any "
           "checkpoint left is finite")
def lr_1e6_diverges_in_one_line(ctx: Context) -> None:
    out = ctx.tmp / "out"
    result = ctx.train(ctx.shared.data(ctx), out, "--lr", "1e6", "--epochs", "3", "--clip-grad", "0")
    line = ctx.expect_user_error(result, "--lr", "epoch")
    ctx.check("step" in line, "the line does not name the step", result)
    import torch
    for path in [out / "vit_model.pth", *sorted(out.glob("checkpoints/*.pth"))]:
        if path.exists():
            weights = load_torch(path)["state_dict"]
            ctx.check(all(torch.isfinite(t).all() for t in weights.values()), f"{path} holds NaN/inf weights")


@case("9", "--seed 99999999999999999999 and --batch-size 100000000: exit 0 or one line, no hang")
def absurd_seed_and_batch_size(ctx: Context) -> None:
    data = ctx.shared.data(ctx)
    ctx.expect_ok_or_user_error(ctx.train(data, ctx.tmp / "o1", "--seed", "99999999999999999999"))
    ctx.expect_ok_or_user_error(ctx.train(data, ctx.tmp / "o2", "--batch-size", "100000000", timeout=90))


# 10. model files that contradict themselves -----------------------------------------------------

def _edited_model_case(edit: Callable[[dict[str, Any]], None], fragment: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        model = ctx.copy(ctx.shared.model(ctx), "run") / "vit_model.pth"
        payload = load_torch(model)
        edit(payload)
        save_torch(payload, model)
        ctx.expect_user_error(ctx.quantize(model, ctx.tmp / "q"), fragment)
    return run


def _set(*keys_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *keys, last, value = keys_and_value

    def edit(payload: dict[str, Any]) -> None:
        for key in keys:
            payload = payload[key]
        payload[last] = value
    return edit


MODEL_EDITS = {
    "model_config_img_size_32": (_set("model_config", "img_size", 32), "img_size"),
    "model_preprocessing_img_size_0": (_set("preprocessing", "img_size", 0), "img_size"),
    "model_preprocessing_in_chans_3": (_set("preprocessing", "in_chans", 3), "in_chans"),
    "model_num_heads_3": (_set("model_config", "num_heads", 3), "num_heads"),
    "model_newer_format_version": (_set("format_version", 99), "format_version"),
    "model_missing_head_weight": (lambda p: p["state_dict"].pop("head.weight"), "head.weight"),
    "model_class_names_too_few": (_set("class_names", ["a", "b"]), "class"),
}
for _name, (_edit, _fragment) in MODEL_EDITS.items():
    add_case(_name, "10", f"vit_model.pth edited ({_name.split('_', 1)[1]}): post_training refuses in one "
             f"line naming {_fragment}", _edited_model_case(_edit, _fragment))


@case("10", "vit_model.pth with NaN weights: post_training exit 0 or one line, no traceback")
def model_with_nan_weights(ctx: Context) -> None:
    model = ctx.copy(ctx.shared.model(ctx), "run") / "vit_model.pth"
    payload = load_torch(model)
    for tensor in payload["state_dict"].values():
        tensor.fill_(float("nan"))
    save_torch(payload, model)
    ctx.expect_ok_or_user_error(ctx.quantize(model, ctx.tmp / "q"))


@case("10", "--model-path: a missing file, an empty file, a folder, a training checkpoint: one line "
           "each (or the checkpoint accepted)")
def model_path_not_a_model_file(ctx: Context) -> None:
    empty = ctx.tmp / "empty.pth"
    empty.write_bytes(b"")
    ctx.expect_user_error(ctx.quantize(ctx.tmp / "missing.pth", ctx.tmp / "q0"), "missing.pth")
    ctx.expect_user_error(ctx.quantize(empty, ctx.tmp / "q1"), str(empty))
    ctx.expect_user_error(ctx.quantize(ctx.shared.model(ctx), ctx.tmp / "q2"), str(ctx.shared.model(ctx)))
    ctx.expect_ok_or_user_error(ctx.quantize(ctx.shared.model(ctx) / "checkpoints" / "last.pth", ctx.tmp / "q3"))


@case("10", "--resume auto with last.pth and last.prev.pth of format_version 99: one line, files unchanged")
def checkpoint_from_a_newer_version(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.interrupted(ctx), "run")
    for name in ("last.pth", "last.prev.pth"):
        path = out / "checkpoints" / name
        if path.exists():
            payload = load_torch(path)
            payload["format_version"] = 99
            save_torch(payload, path)
    ctx.guard(out)
    result = ctx.run("run.py", "--data-path", ctx.shared.big(ctx), "--output-dir", out, *SIGNAL_TRAIN,
                     "--resume", "auto")
    ctx.expect_user_error(result, "format_version")


@case("10", "last.pth random bytes: --resume auto falls back to last.prev.pth (said) and finishes")
def resume_with_corrupt_last_uses_backup(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.interrupted(ctx), "run")
    (out / "checkpoints" / "last.pth").write_bytes(os.urandom(5000))
    result = ctx.run("run.py", "--data-path", ctx.shared.big(ctx), "--output-dir", out, *SIGNAL_TRAIN,
                     "--resume", "auto")
    ctx.expect_ok(result, "last.pth")
    ctx.check(load_torch(out / "vit_model.pth")["metrics"]["epochs"] == 2, "the model is not of epoch 2")


@case("10", "last.pth and last.prev.pth both random bytes: one line, exit 2")
def resume_with_every_checkpoint_corrupt(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.interrupted(ctx), "run")
    for name in ("last.pth", "last.prev.pth"):
        (out / "checkpoints" / name).write_bytes(os.urandom(5000))
    ctx.guard(out)
    result = ctx.run("run.py", "--data-path", ctx.shared.big(ctx), "--output-dir", out, *SIGNAL_TRAIN,
                     "--resume", "auto")
    ctx.expect_user_error(result, "last")


# 11. resume settings, signals in post_training, full disk, immutable files, paths, rows ---------

@case("11", "--resume auto --lr 0.01 on an interrupted run: one line listing '--lr ... -> 0.01', files unchanged")
def resume_with_another_lr(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.interrupted(ctx), "run")
    ctx.guard(out)
    result = ctx.run("run.py", "--data-path", ctx.shared.big(ctx), "--output-dir", out, *SIGNAL_TRAIN,
                     "--resume", "auto", "--lr", "0.01")
    ctx.expect_user_error(result, "--lr", "-> 0.01")


@case("11", "--resume auto --epochs 3 on a finished 2-epoch run: one line naming --epochs, files unchanged")
def resume_with_more_epochs(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.model(ctx), "run")
    ctx.guard(out)
    result = ctx.run("run.py", "--data-path", ctx.shared.data(ctx), "--output-dir", out, *MODEL_TRAIN,
                     "--epochs", "3", "--resume", "auto")
    ctx.expect_user_error(result, "--epochs")


@case("11", "--resume auto (with --workers 2) on a finished run: exit 0; vit_model.pth, checkpoints, "
           "metrics.csv unchanged")
def resume_auto_on_finished_run(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.model(ctx), "run")
    kept = {name: sha256(out / name) for name in ("vit_model.pth", "checkpoints/last.pth",
                                                   "checkpoints/best.pth", "metrics.csv")}
    result = ctx.run("run.py", "--data-path", ctx.shared.data(ctx), "--output-dir", out, *MODEL_TRAIN,
                     "--resume", "auto", "--workers", "2")
    ctx.expect_ok(result)
    changed = [name for name, digest in kept.items() if sha256(out / name) != digest]
    ctx.check(not changed, f"a finished run's files were rewritten: {changed}", result)


@case("11", "--resume auto into an empty new folder: a fresh run (exit 0, counts) or one line")
def resume_auto_with_nothing_to_resume(ctx: Context) -> None:
    result = ctx.train(ctx.shared.data(ctx), ctx.tmp / "new", "--resume", "auto")
    if ctx.expect_ok_or_user_error(result):
        ctx.expect_counts(result, 12, 12)


@case("11", "--resume OTHER/checkpoints/last.pth --output-dir NEW: the other run unchanged")
def resume_from_another_runs_checkpoint(ctx: Context) -> None:
    other = ctx.copy(ctx.shared.interrupted(ctx), "other")
    ctx.guard(other)
    result = ctx.run("run.py", "--data-path", ctx.shared.big(ctx), "--output-dir", ctx.tmp / "new",
                     *SIGNAL_TRAIN, "--resume", other / "checkpoints" / "last.pth")
    ctx.output_dirs.append(ctx.tmp / "new")
    ctx.expect_ok_or_user_error(result)


def _signal_quantization(ctx: Context, signum: int, times: int, code: int) -> None:
    model, q = ctx.shared.model(ctx) / "vit_model.pth", ctx.tmp / "q"
    ctx.output_dirs.append(q)
    process = ctx.start("post_training.py", "--model-path", model, "--output-dir", q, *QUANT,
                        "--bits", "8", "6", "--latency-runs", "300")
    ctx.wait_for(process, "fp32:")
    for _ in range(times):
        process.send(signum, group=True)
        time.sleep(0.2)
    stopped = ctx.finish(process, timeout=60)
    ctx.check(stopped.returncode in (code, 128 - code), f"expected exit {code}", stopped)
    ctx.check(len(stopped.stderr_lines()) == 1, "expected one line on stderr", stopped)
    ctx.expect_clean(q)
    ctx.expect_ok(ctx.quantize(model, q))


@case("11", "SIGTERM (kill PID) during post_training: exit 143, one line, no *.tmp; a rerun finishes")
def quantization_sigterm(ctx: Context) -> None:
    _signal_quantization(ctx, signal.SIGTERM, 1, 143)


@case("11", "Ctrl-C twice (process group) during post_training: exit 130, one line, no *.tmp; a rerun finishes")
def quantization_ctrl_c_twice(ctx: Context) -> None:
    _signal_quantization(ctx, signal.SIGINT, 2, 130)


@case("11", "Ctrl-C twice during training: exit 130, at most one line, checkpoint loadable, "
           "--resume auto finishes")
def training_ctrl_c_twice(ctx: Context) -> None:
    data, out = ctx.shared.data(ctx), ctx.tmp / "out"
    ctx.output_dirs.append(out)
    process = ctx.start("run.py", "--data-path", data, "--output-dir", out, *TRAIN, "--epochs", "40")
    ctx.wait_for(process, "epoch 2/40")
    process.send(signal.SIGINT, group=True)
    process.wait_for("SIGINT received", timeout=10)
    process.send(signal.SIGINT, group=True)
    stopped = ctx.finish(process, timeout=30)
    ctx.check(stopped.returncode in (130, -2), "expected exit 130", stopped)
    ctx.check(len(stopped.stderr_lines()) <= 1, "more than one line on stderr", stopped)
    load_torch(out / "checkpoints" / "last.pth")
    ctx.expect_clean(out)
    ctx.expect_ok(ctx.run("run.py", "--data-path", data, "--output-dir", out, *TRAIN, "--epochs", "40",
                          "--resume", "auto"))


@case("11", "training into a 96 KiB tmpfs: exit 2, one line 'No space left', no *.tmp, any "
           "checkpoint there loads")
def full_disk_during_training(ctx: Context) -> None:
    disk = tmpfs_for_case(ctx, ctx.tmp / "disk", "96k")
    result = ctx.train(ctx.shared.data(ctx), disk / "out", "--epochs", "3")
    ctx.expect_user_error(result, "No space left")
    for path in (disk / "out").rglob("*.pth"):
        load_torch(path)


@case("11", "post_training into a tmpfs with room for all but the ONNX files (a 64-wide model: "
           "ONNX files > the room): exit 2, one line about the space, the other results written, "
           "no *.tmp")
def full_disk_during_onnx_export(ctx: Context) -> None:
    wide, reference = ctx.tmp / "wide", ctx.tmp / "reference"
    ctx.expect_ok(ctx.run("run.py", "--data-path", ctx.shared.data(ctx), "--output-dir", wide, *TRAIN,
                          "--embed-dim", "64", "--depth", "2"))
    model = wide / "vit_model.pth"
    ctx.expect_ok(ctx.quantize(model, reference))
    files = json.loads((reference / "manifest.json").read_text())["files"]
    pages = lambda size: -(-size // 4096) * 4096  # noqa: E731 - tmpfs counts whole pages
    room = sum(pages(info["size_bytes"]) for rel, info in files.items() if not rel.startswith("onnx/"))
    smallest_onnx = min(info["size_bytes"] for rel, info in files.items() if rel.startswith("onnx/"))
    margin = 64 * 1024  # the manifest and summaries rewritten through temporary files, folders
    ctx.check(smallest_onnx > margin, f"the ONNX files ({smallest_onnx} bytes) would fit the margin")
    disk = tmpfs_for_case(ctx, ctx.tmp / "disk", "4m")
    fill_to_free(disk, room + margin)
    result = ctx.quantize(model, disk / "q")
    line = ctx.expect_user_error(result, "space")
    ctx.check("skipped: no space left" in result.stdout, "the ONNX skip is not said", result)
    ctx.notes.append(f"error: {line[:100]}")
    ctx.check((disk / "q" / "summary.csv").exists(), "summary.csv not written", result)
    failures = json.loads((disk / "q" / "summary.json").read_text()).get("failures")
    ctx.check(failures, "summary.json records no failure", result)


@case("11", "checkpoints/last.pth immutable (chattr +i), --resume auto: one line, last.pth unchanged, "
           "no *.tmp; once mutable, resume finishes")
def immutable_last_checkpoint(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.interrupted(ctx), "run")
    last = out / "checkpoints" / "last.pth"
    digest = sha256(last)
    immutable_for_case(ctx, last)
    args = ("--data-path", ctx.shared.big(ctx), "--output-dir", out, *SIGNAL_TRAIN, "--resume", "auto")
    ctx.expect_user_error(ctx.run("run.py", *args), "last")
    ctx.check(sha256(last) == digest, "last.pth changed")
    ctx.expect_clean(out)
    subprocess.run(["chattr", "-i", str(last)], check=True)
    ctx.expect_ok(ctx.run("run.py", *args))


@case("11", "output folder of an interrupted run immutable (chattr +i): --resume auto one line, "
           "folder unchanged")
def immutable_output_folder(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.interrupted(ctx), "run")
    ctx.guard(out)
    immutable_for_case(ctx, out)
    result = ctx.run("run.py", "--data-path", ctx.shared.big(ctx), "--output-dir", out, *SIGNAL_TRAIN,
                     "--resume", "auto")
    ctx.expect_user_error(result, str(out))


@case("11", "vit_model.pth immutable: --resume auto exit 0 untouched; post_training exit 0; "
           "--overwrite keeps the old run whole")
def immutable_model_file(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.model(ctx), "run")
    immutable_for_case(ctx, out / "vit_model.pth")
    before = tree_state(out)
    data = ctx.shared.data(ctx)
    ctx.expect_ok(ctx.run("run.py", "--data-path", data, "--output-dir", out, *MODEL_TRAIN, "--resume", "auto"))
    ctx.expect_ok(ctx.quantize(out / "vit_model.pth", ctx.tmp / "q"))
    result = ctx.train(data, out, "--overwrite")
    if ctx.expect_ok_or_user_error(result):
        asides = sorted(ctx.tmp.glob("run.previous-*"))
        ctx.check(len(asides) == 1, "old run not moved aside", result)
        ctx.unchanged(asides[0], before, allow_new=True)


@case("11", "trained with a relative --data-path, quantized from another directory: exit 0, "
           "config.json holds the absolute path")
def relative_data_path_from_another_directory(ctx: Context) -> None:
    work = _mkdirs(ctx.tmp / "work")
    make_image_folder(work / "mydata")
    ctx.output_dirs.append(work / "out")
    ctx.expect_ok(ctx.run("run.py", "--data-path", "mydata", "--output-dir", "out", *TRAIN, cwd=work))
    recorded = json.loads((work / "out" / "config.json").read_text())["train"]["data_path"]
    ctx.check(recorded == str((work / "mydata").resolve()), f"config.json data_path is {recorded!r}")
    elsewhere = _mkdirs(ctx.tmp / "elsewhere")
    ctx.expect_ok(ctx.quantize(work / "out" / "vit_model.pth", elsewhere / "q", cwd=elsewhere))


@case("11", "data folder moved after training: post_training names the stored path in one line; "
           "--data-path NEW works")
def data_moved_after_training(ctx: Context) -> None:
    data = ctx.data("d1")
    ctx.expect_ok(ctx.train(data, ctx.tmp / "out"))
    data.rename(ctx.tmp / "d2")
    model = ctx.tmp / "out" / "vit_model.pth"
    ctx.expect_user_error(ctx.quantize(model, ctx.tmp / "q"), str(data))
    ctx.expect_ok(ctx.quantize(model, ctx.tmp / "q2", "--data-path", ctx.tmp / "d2"))


@case("11", "--override '*=float': a warning, no quantized row (no w8a8 pretending)")
def override_everything_float(ctx: Context) -> None:
    q = ctx.tmp / "q"
    result = ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", q, "--override", "*=float")
    ctx.expect_ok(result, "nothing would be quantized")
    names = [r["name"] for r in summary_rows(q)]
    ctx.check("w8a8" not in names, f"summary.csv rows: {names}", result)


@case("11", "--bits 8 8: one w8a8 row")
def repeated_bits_run_once(ctx: Context) -> None:
    q = ctx.tmp / "q"
    ctx.expect_ok(ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", q, "--bits", "8", "8"))
    names = [r["name"] for r in summary_rows(q)]
    ctx.check(names.count("w8a8") == 1, f"summary.csv rows: {names}")


# more: what else a new user's data looks like ----------------------------------------------------

def _bad_image_case(write: Callable[[Path], None]) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        data = ctx.data()
        bad = data / "train" / "b" / "bad.png"
        write(bad)
        ctx.guard(data)
        # batch 1: every image is read in the epoch (a full last batch would drop one at random)
        ctx.expect_user_error(ctx.train(data, ctx.tmp / "out", "--batch-size", "1"), str(bad))
    return run


add_case("image_0_bytes", "more", "a 0-byte train/b/bad.png: one line naming it",
         _bad_image_case(lambda p: p.write_bytes(b"")))
def _truncated_png(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


add_case("image_truncated", "more", "a noise PNG cut in half (pixel data missing): one line naming it",
         _bad_image_case(_truncated_png))
add_case("image_text_named_png", "more", "a text file named bad.png: one line naming it",
         _bad_image_case(lambda p: p.write_text("not an image\n")))
add_case("image_decompression_bomb", "more", "a PNG whose header claims 20000x20000: one line naming it, "
         "no memory blow-up", _bad_image_case(lambda p: png_claiming_size(p, 20000, 20000)))


@case("more", "--data-path is a file: one line")
def data_path_is_a_file(ctx: Context) -> None:
    path = ctx.tmp / "data.zip"
    path.write_bytes(b"PK\x03\x04")
    ctx.expect_user_error(ctx.train(path, ctx.tmp / "out"), str(path))


@case("more", "--data-path '' (an unset variable quoted): one line, not a silent switch to another data set")
def data_path_empty_string(ctx: Context) -> None:
    result = ctx.train("", ctx.tmp / "out", "--train-subset", "8", "--val-subset", "8")
    ctx.expect_user_error(result, "--data-path")


@case("more", "spaces and non-ASCII in the data path, class names and output path: train and "
           "quantize, counts, class names kept")
def unicode_and_spaces_in_paths(ctx: Context) -> None:
    classes = ("café latte", "日本", "a b")
    data = make_image_folder(ctx.tmp / "my data ñ", classes=classes)
    ctx.guard(data)
    out = ctx.tmp / "out put é"
    result = ctx.train(data, out)
    ctx.expect_ok(result)
    ctx.expect_counts(result, 12, 12)
    stored = load_torch(out / "vit_model.pth")["class_names"]
    ctx.check(stored == sorted(classes), f"class names stored as {stored}")
    ctx.expect_ok(ctx.quantize(out / "vit_model.pth", out / "quantization"))


@case("more", "val/ lacks class c: one line, or val labels follow the training classes")
def val_missing_a_class(ctx: Context) -> None:
    data = ctx.data()
    shutil.rmtree(data / "val" / "c")
    ctx.guard(data)
    if ctx.expect_ok_or_user_error(ctx.train(data, ctx.tmp / "out")):
        ctx.expect_labels(data, 12, 8)


@case("more", "val/ has an extra class d: one line naming it")
def val_with_an_extra_class(ctx: Context) -> None:
    data = ctx.data()
    make_image_folder(ctx.tmp / "extra", classes=("d",), splits=("val",))
    shutil.move(ctx.tmp / "extra" / "val" / "d", data / "val" / "d")
    ctx.guard(data)
    ctx.expect_user_error(ctx.train(data, ctx.tmp / "out"), "d")


@case("more", "test/ instead of val/: exit 0, counts")
def test_split_instead_of_val(ctx: Context) -> None:
    data = make_image_folder(ctx.tmp / "d", splits=("train", "test"))
    ctx.guard(data)
    result = ctx.train(data, ctx.tmp / "out")
    ctx.expect_ok(result)
    ctx.expect_counts(result, 12, 12)


@case("more", "only train/ (no val/ or test/): one line")
def only_a_train_split(ctx: Context) -> None:
    data = make_image_folder(ctx.tmp / "d", splits=("train",))
    ctx.expect_user_error(ctx.train(data, ctx.tmp / "out"), "val")


@case("more", ".DS_Store, Thumbs.db, ._0.png, .ipynb_checkpoints/ and notes.txt among the images: "
           "exit 0, 3 classes, counts 12/12, labels")
def junk_files_from_other_systems(ctx: Context) -> None:
    data = ctx.data()
    for split in ("train", "val"):
        (data / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        _mkdirs(data / split / ".ipynb_checkpoints")
        Image.new("L", (16, 16)).save(data / split / ".ipynb_checkpoints" / "x.png")
        for name in CLASSES:
            (data / split / name / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
            (data / split / name / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
            (data / split / name / "notes.txt").write_text("n")
    ctx.guard(data)
    result = ctx.train(data, ctx.tmp / "out")
    ctx.expect_ok(result, "3 classes")
    ctx.expect_counts(result, 12, 12)
    ctx.expect_labels(data, 12, 12)


@case("more", "__MACOSX/ (from unzipping) beside the class folders: one line naming it, or ignored "
           "with 3 classes")
def macosx_folder_from_a_zip(ctx: Context) -> None:
    data = ctx.data()
    for split in ("train", "val"):
        junk = _mkdirs(data / split / "__MACOSX" / "a")
        (junk / "._0.png").write_bytes(b"\0\5\26\7")
    ctx.guard(data)
    result = ctx.train(data, ctx.tmp / "out")
    if ctx.expect_ok_or_user_error(result):
        ctx.check("3 classes" in result.stdout, "__MACOSX became a class", result)
    else:
        ctx.check("__MACOSX" in result.stderr, "the error does not name __MACOSX", result)


@case("more", "upper-case extensions, RGBA, palette, CMYK JPEG, 1-bit, LA, odd sizes: exit 0, all counted")
def mixed_modes_and_extensions(ctx: Context) -> None:
    data = ctx.data()
    folder = data / "train" / "a"
    Image.new("RGBA", (20, 12), (9, 9, 9, 100)).save(folder / "rgba.PNG")
    Image.new("P", (16, 16), 3).save(folder / "palette.GIF")
    Image.new("CMYK", (16, 16), (1, 2, 3, 4)).save(folder / "cmyk.JPEG")
    Image.new("1", (7, 31), 1).save(folder / "bits.bmp")
    Image.new("LA", (40, 40), (5, 200)).save(folder / "la.png")
    ctx.guard(data)
    result = ctx.train(data, ctx.tmp / "out")
    ctx.expect_ok(result)
    ctx.expect_counts(result, 17, 12)


@case("more", "--output-dir is an existing file: one line, the file unchanged")
def output_dir_is_a_file(ctx: Context) -> None:
    path = ctx.tmp / "out"
    path.write_text("my notes\n")
    ctx.guard(ctx.tmp, allow_new=True)
    ctx.expect_user_error(ctx.train(ctx.shared.data(ctx), path), str(path))
    ctx.expect_user_error(ctx.train(ctx.shared.data(ctx), path / "sub"), str(path))


LONG_NAME = "lr0.001_bs128_" * 22  # 308 characters: a run named after its settings


def _long_name_case(command: Callable[[Context, Path], Result]) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        ctx.expect_user_error(command(ctx, ctx.tmp / LONG_NAME), LONG_NAME[:28])
    return run


LONG_NAME_CASES = {
    "long_name_run_output_dir": ("run.py --output-dir", lambda ctx, long: ctx.train(ctx.shared.data(ctx), long)),
    "long_name_run_data_path": ("run.py --data-path", lambda ctx, long: ctx.train(long, ctx.tmp / "o")),
    "long_name_quant_model_path": ("post_training --model-path",
                                   lambda ctx, long: ctx.quantize(long, ctx.tmp / "q")),
    "long_name_quant_output_dir": ("post_training --output-dir",
                                   lambda ctx, long: ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", long)),
}
for _name, (_what, _command) in LONG_NAME_CASES.items():
    add_case(_name, "more", f"{_what} with a 308-character file name (a run named after its settings): "
             "one line", _long_name_case(_command))


def _fifo(path: Path, ctx: Context) -> Path:
    """A FIFO at ``path``; opened for writing at the case's end to release a blocked reader."""
    os.mkfifo(path)

    def release() -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    ctx.cleanups.append(release)
    return path


@case("more", "post_training --model-path a FIFO (as <(...) gives): one line or no hang within 45 s")
def model_path_is_a_fifo(ctx: Context) -> None:
    fifo = _fifo(ctx.tmp / "model.pth", ctx)
    ctx.expect_user_error(ctx.quantize(fifo, ctx.tmp / "q", timeout=45), str(fifo))


@case("more", "run.py --pretrained-path /dev/zero and --resume a FIFO: one line each, no hang within 45 s")
def pretrained_and_resume_not_regular_files(ctx: Context) -> None:
    data = ctx.shared.data(ctx)
    ctx.expect_user_error(ctx.train(data, ctx.tmp / "o1", "--pretrained-path", "/dev/zero", timeout=45),
                          "/dev/zero")
    fifo = _fifo(ctx.tmp / "last.pth", ctx)
    ctx.expect_user_error(ctx.train(data, ctx.tmp / "o2", "--resume", fifo, timeout=45), str(fifo))


@case("more", "an image deleted while training runs (a sync still going): one line naming it, exit 2, "
              "last.pth loads, --resume auto after restoring it finishes")
def image_deleted_during_training(ctx: Context) -> None:
    data, out = ctx.data(), ctx.tmp / "out"
    ctx.output_dirs.append(out)
    victim = data / "train" / "b" / "2.png"
    process = ctx.start("run.py", "--data-path", data, "--output-dir", out, *TRAIN, "--epochs", "40")
    ctx.wait_for(process, "epoch 2/40")
    saved = victim.read_bytes()
    victim.unlink()
    result = ctx.finish(process)
    ctx.expect_user_error(result, str(victim))
    load_torch(out / "checkpoints" / "last.pth")
    victim.write_bytes(saved)
    ctx.expect_ok(ctx.run("run.py", "--data-path", data, "--output-dir", out, *TRAIN, "--epochs", "40",
                          "--resume", "auto"))


@case("more", "a corrupt image read by --workers 2: one line naming it (no worker traceback)")
def corrupt_image_with_workers(ctx: Context) -> None:
    data = ctx.data()
    bad = data / "train" / "c" / "bad.png"
    _truncated_png(bad)
    ctx.guard(data)
    ctx.expect_user_error(ctx.train(data, ctx.tmp / "out", "--workers", "2", "--batch-size", "1"), str(bad))


@case("more", "--resume with a model file (vit_model.pth) or a packed .safetensors, --pretrained-path "
              "a packed file: one line each (or accepted)")
def wrong_kind_of_file_for_resume_and_pretrained(ctx: Context) -> None:
    data, model = ctx.shared.data(ctx), ctx.shared.model(ctx) / "vit_model.pth"
    packed = ctx.shared.quantized(ctx) / "models" / "vit_w8a8.safetensors"
    ctx.expect_ok_or_user_error(ctx.train(data, ctx.tmp / "o1", "--resume", model))
    ctx.expect_user_error(ctx.train(data, ctx.tmp / "o2", "--resume", packed), str(packed))
    ctx.expect_user_error(ctx.train(data, ctx.tmp / "o3", "--pretrained-path", packed), str(packed))


@case("more", "resume naming the same data by a relative path from another directory: accepted (paths "
              "compared resolved)")
def resume_with_the_data_by_another_path(ctx: Context) -> None:
    out = ctx.copy(ctx.shared.interrupted(ctx), "run")
    big = ctx.shared.big(ctx)
    ctx.output_dirs.append(out)
    result = ctx.run("run.py", "--data-path", Path("..") / big.name, "--output-dir", out, *SIGNAL_TRAIN,
                     "--resume", "auto", cwd=ctx.shared.root / "model")
    ctx.expect_ok(result)


@case("more", "post_training --eval-subset 1 --calib-size 1 --batch-size 1: exit 0 or one line")
def quantize_with_one_image(ctx: Context) -> None:
    ctx.expect_ok_or_user_error(ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", ctx.tmp / "q",
                                             "--eval-subset", "1", "--calib-size", "1", "--batch-size", "1"))


@case("more", "post_training --avg-bits 5 on a 1-block model: exit 0 or one line")
def mixed_precision_on_a_tiny_model(ctx: Context) -> None:
    ctx.expect_ok_or_user_error(ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", ctx.tmp / "q",
                                             "--avg-bits", "5", "--no-onnx"))


@case("2", "post_training --output-dir DATA/train/q with the report's PNG plots: refused, or a later "
           "training run still sees 3 classes, train 12")
def quantize_output_inside_the_train_split(ctx: Context) -> None:
    data = ctx.data()
    model = ctx.tmp / "run"
    ctx.guard(data, allow_new=True)
    ctx.expect_ok(ctx.run("run.py", "--data-path", data, "--output-dir", model, *TRAIN))
    first = ctx.run("post_training.py", "--model-path", model / "vit_model.pth", "--output-dir",
                    data / "train" / "q", "--bits", "8", "--baseline", "none", "--calib-size", "8",
                    "--no-progress", "--latency-runs", "1", "--no-onnx")
    ctx.output_dirs.append(data / "train" / "q")
    if not ctx.expect_ok_or_user_error(first):
        return
    later = ctx.train(data, ctx.tmp / "r2")
    ctx.check(later.returncode == 0 and "3 classes" in later.stdout,
              "post_training's outputs changed the data of the next run", later)
    ctx.expect_counts(later, 12, 12)


@case("11", "kill -9 of post_training after w8a8 is done, rerun: w8a8 reused, no *.tmp, folder == manifest")
def quantization_kill_9_then_rerun(ctx: Context) -> None:
    model, q = ctx.shared.model(ctx) / "vit_model.pth", ctx.tmp / "q"
    ctx.output_dirs.append(q)
    process = ctx.start("post_training.py", "--model-path", model, "--output-dir", q, *QUANT,
                        "--bits", "8", "6", "--latency-runs", "300")
    ctx.wait_for(process, "w8a8: top-1")
    process.send(signal.SIGKILL, group=True)
    process.finish()
    result = ctx.quantize(model, q, "--bits", "8", "6")
    ctx.expect_ok(result, "w8a8: reusing")
    _expect_manifest_is_the_folder(ctx, q, model)


@case("more", "--device cuda on a machine without CUDA (run.py and post_training): one line each")
def device_cuda_without_cuda(ctx: Context) -> None:
    import torch
    if torch.cuda.is_available():
        raise CaseSkipped("this machine has CUDA")
    ctx.expect_user_error(ctx.train(ctx.shared.data(ctx), ctx.tmp / "out", "--device", "cuda"), "cuda")
    ctx.expect_user_error(ctx.quantize(ctx.shared.model(ctx) / "vit_model.pth", ctx.tmp / "q", "--device",
                                       "cuda"), "cuda")


@case("more", "--tensorboard without the tensorboard package: one line before training (or a warning)")
def tensorboard_not_installed(ctx: Context) -> None:
    probe = subprocess.run([PYTHON, "-c", "import tensorboard"], capture_output=True)
    if probe.returncode == 0:
        raise CaseSkipped("tensorboard is installed here")
    result = ctx.train(ctx.shared.data(ctx), ctx.tmp / "out", "--tensorboard")
    if not ctx.expect_ok_or_user_error(result):
        ctx.check("tensorboard" in result.stderr, "the error does not say tensorboard", result)


@case("more", "a single class folder: one line, or a run that says 1 class")
def a_single_class(ctx: Context) -> None:
    data = make_image_folder(ctx.tmp / "d", classes=("only",))
    ctx.guard(data)
    result = ctx.train(data, ctx.tmp / "out")
    if ctx.expect_ok_or_user_error(result):
        ctx.check("1 class" in result.stdout, "the run does not say 1 class", result)


# --- running -------------------------------------------------------------------------------------

def run_case(case_: Case, tmp_root: Path, shared: Shared) -> tuple[str, str, float]:
    """(PASS|FAIL|SKIP, detail, seconds)."""
    tmp = tmp_root / case_.name
    tmp.mkdir()
    ctx = Context(tmp, shared)
    started = time.monotonic()
    status, detail = "PASS", ""
    try:
        try:
            case_.run(ctx)
        finally:
            ctx.close()
    except CaseSkipped as skipped:
        status, detail = "SKIP", str(skipped)
    except CaseFailure as failure:
        status, detail = "FAIL", str(failure)
    except Exception as exc:  # noqa: BLE001 - a bug of this script, reported as such
        status, detail = "FAIL", f"the case itself crashed: {type(exc).__name__}: {exc}"
    if status == "PASS" and ctx.notes:
        detail = "; ".join(ctx.notes)
    return status, detail, time.monotonic() - started


def selected(patterns: Sequence[str]) -> list[Case]:
    if not patterns:
        return list(CASES.values())
    chosen = [c for c in CASES.values() if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"hostile_inputs.py: error: no case matches {' '.join(patterns)} (see --list)")
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this case (a shell pattern; repeatable)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--jobs", type=int, default=2,
                        help="cases run at once (default 2: most of a case is starting Python)")
    args = parser.parse_args(argv)
    cases = selected(args.only)
    if args.list:
        for c in cases:
            print(f"{c.name:50s} item {c.item:4s} {c.checks}")
        print(f"{len(cases)} cases")
        return 0
    tmp_root = Path(tempfile.mkdtemp(prefix="bvvit-hostile-"))
    shared = Shared(tmp_root / "_shared")
    shared.root.mkdir()
    verdicts: dict[str, str] = {}
    started = time.monotonic()
    print(f"{len(cases)} cases, {args.jobs} at a time, temporary folder {tmp_root}", flush=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_case, c, tmp_root, shared): c for c in cases}
            for future in as_completed(futures):
                c = futures[future]
                status, detail, seconds = future.result()
                verdicts[c.name] = status
                print(report_line(c, status, detail, seconds), flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp_root}")
        else:
            remove_tree(tmp_root)
    failed = [c.name for c in cases if verdicts.get(c.name) == "FAIL"]
    counts = {status: list(verdicts.values()).count(status) for status in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped of {len(cases)} "
          f"in {time.monotonic() - started:.0f} s" + (f"; failed: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def remove_tree(folder: Path) -> None:
    """Delete ``folder``, immutable files included (an --overwrite may have moved one away
    from the path its case made immutable)."""
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def report_line(c: Case, status: str, detail: str, seconds: float) -> str:
    """``STATUS name [item] checks (s)``, then the detail indented (a failure's command and output)."""
    line = f"{status}  {c.name:46s} [{c.item}] {c.checks}  ({seconds:.1f} s)"
    if detail:
        line += "\n      " + detail.replace("\n", "\n      ")
    return line


if __name__ == "__main__":
    sys.exit(main())
