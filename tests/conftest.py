"""Shared fixtures: tiny models and tiny data, so the whole suite stays fast."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One thread: the machines are small and shared; oversubscribed threads make tiny ops slow.
torch.set_num_threads(1)

from bvvit.config import ModelConfig  # noqa: E402
from bvvit.console import configure_console  # noqa: E402

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HAS_FMNIST = (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists()


@pytest.fixture(autouse=True)
def console() -> None:
    """The console the command lines set up (bvvit.console): INFO lines on stdout, warnings
    and errors on stderr, so tests that call a stage in this process see what a user sees."""
    configure_console(rank=0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                       depth=2, num_heads=2)


@pytest.fixture
def repo_root() -> Path:
    return ROOT
