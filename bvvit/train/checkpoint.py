"""Training checkpoints: atomic writes, a rolling backup, and exact resume.

``OUT/checkpoints/last.pth`` is written after every epoch; before it is replaced, the
previous one becomes ``last.prev.pth``. The order of renames keeps at least one complete
checkpoint on disk at every instant::

    write last.pth.tmp  ->  rename last.pth -> last.prev.pth  ->  rename tmp -> last.pth

``best.pth`` holds the epoch with the highest validation top-1. Each file is a model file
(see :mod:`bvvit.model_file`) plus optimizer, scheduler, scaler, epoch, RNG states and
history, all loadable with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from bvvit.config import ModelConfig, Preprocessing, TrainConfig
from bvvit.errors import CheckpointError
from bvvit.io import atomic_path, load_torch_file
from bvvit.model import VisionTransformer
from bvvit.model_file import FORMAT_VERSION, model_payload
from bvvit.train.engine import EpochProgress

LAST = "last.pth"
BACKUP = "last.prev.pth"
BEST = "best.pth"


def capture_rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists (so that weights-only loading accepts them)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(obj: Any) -> Any:
    return [_to_lists(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, (tuple, list)) else obj


def training_payload(model: nn.Module, class_names: list[str], pre: Preprocessing,
                     data_info: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                     scaler: Any, epochs_done: int, best_acc: float, history: list[dict[str, Any]],
                     cfg: TrainConfig, progress: Optional[EpochProgress]) -> dict[str, Any]:
    """A training checkpoint: the model file's content plus optimizer, scheduler, scaler,
    RNG states, history and settings; ``progress`` is set for a mid-epoch stop."""
    payload = model_payload(model, class_names, pre, data_info,
                            {"val_acc": history[-1]["val_acc"] if history else None})
    payload.update({
        "kind": "bvvit-training-checkpoint",
        "epoch": epochs_done,  # completed epochs
        "epoch_progress": progress.to_dict() if progress is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": capture_rng_state(),
        "best_val_acc": best_acc,
        "history": list(history),
        "train_config": cfg.to_dict(),
    })
    return payload


def restore_training_state(payload: dict[str, Any], source: str, model: VisionTransformer,
                           optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                           model_cfg: ModelConfig) -> tuple[int, list[dict[str, Any]], float]:
    """Load a checkpoint's states into the run's objects (same architecture only);
    returns (completed epochs, history, best validation top-1)."""
    stored = ModelConfig.from_dict(payload["model_config"])
    stored.fused_attn = model_cfg.fused_attn
    if stored != model_cfg:
        diffs = [f"{k}={getattr(stored, k)} (now {getattr(model_cfg, k)})"
                 for k in model_cfg.to_dict() if getattr(stored, k) != getattr(model_cfg, k)]
        raise CheckpointError(f"checkpoint {source} is of another architecture: "
                              f"{', '.join(diffs[:4])}; resume with the same flags")
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {source} does not fit this run ({first[:200]})") from None
    if "rng" in payload:
        restore_rng_state(payload["rng"])
    return int(payload["epoch"]), list(payload.get("history", [])), float(payload.get("best_val_acc", -1))


def save_checkpoint(folder: str | os.PathLike, payload: dict[str, Any], is_best: bool) -> Path:
    """Write ``last.pth`` (rotating the previous one to the backup) and maybe ``best.pth``."""
    folder = Path(folder)
    last, backup = folder / LAST, folder / BACKUP
    with atomic_path(last) as tmp:
        torch.save(payload, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if last.exists():
            os.replace(last, backup)
        # atomic_path renames tmp -> last.pth when this block exits
    if is_best:
        with atomic_path(folder / BEST) as tmp:
            shutil.copyfile(last, tmp)
    return last


@dataclass
class ResumePoint:
    path: Path
    payload: dict[str, Any]
    fell_back: bool  # True when last.pth was unreadable and the backup was used


def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike) -> Optional[ResumePoint]:
    """Resolve ``--resume PATH|auto``. ``auto`` with no checkpoint yet returns None."""
    if resume != "auto":
        return ResumePoint(Path(resume), _load_training_checkpoint(Path(resume)), False)
    folder = Path(output_dir) / "checkpoints"
    last, backup = folder / LAST, folder / BACKUP
    if not last.exists() and not backup.exists():
        return None
    first_error: Optional[CheckpointError] = None
    for candidate in (last, backup):
        if not candidate.exists():
            continue
        try:
            return ResumePoint(candidate, _load_training_checkpoint(candidate), candidate == backup)
        except CheckpointError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise CheckpointError(f"no usable checkpoint in {folder}: {first_error}")


def _load_training_checkpoint(path: Path) -> dict[str, Any]:
    payload = load_torch_file(path, what="checkpoint")
    if payload.get("format_version") not in range(1, FORMAT_VERSION + 1):
        raise CheckpointError(f"checkpoint {path} has no supported format_version; "
                              "it was not written by run.py")
    for key in ("optimizer", "scheduler", "epoch", "model_config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'; it is a model file, not a "
                                  "training checkpoint (use --pretrained-path to start from it)")
    return payload
