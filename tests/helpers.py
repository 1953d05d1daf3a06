"""Test helpers: tiny image folders, running the command lines as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, classes=("ant", "bee", "cat"), per_class: int = 8, size: int = 16,
                      mode: str = "L", splits=("train", "val"), seed: int = 0) -> Path:
    """An ImageNet-style folder whose classes are separable (each class has its own
    brightness pattern), so a few training steps learn something."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size), dtype=np.float32)
                band = size // len(classes)
                base[:, index * band:(index + 1) * band] = 200
                pixels = np.clip(base + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L")
                if mode == "RGB":
                    image = image.convert("RGB")
                image.save(folder / f"{i}.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script args`` on the CPU (gloo), one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), str(ROOT / script), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def run_cli(script: str, *args: str, env: dict | None = None, timeout: int = 300,
            prefix: tuple[str, ...] | list[str] = ()) -> subprocess.CompletedProcess:
    """``python script args``; ``prefix`` is a command that wraps it (e.g. setpriv ...)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*prefix, sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT)


# run.py with fault-injecting test hooks (tests/train/hooked_run.py)
HOOKED_RUN = "tests/train/hooked_run.py"

TINY_MODEL_ARGS = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "16", "--depth", "1",
                   "--num-heads", "2"]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, exactly one line on stderr, no traceback, containing ``fragments``."""
    assert result.returncode == 2, (result.stdout[-800:], result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
