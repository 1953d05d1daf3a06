"""The settings a training run actually uses, and which of them a resume may change.

:func:`settings_in_use` turns the flags into what the run uses and records (config.json,
checkpoints, vit_model.pth): the data path made absolute (``fashion-mnist`` stays the
symbolic name), ``--workers`` capped at the CPUs this process may use. :func:`check_resume`
refuses to continue a run with settings that would change its numbers (RUN_SETTINGS): the
result would match no run anyone asked for, and config.json would record values the first
part never used. How the same computation is executed or shown (everything else: workers,
device, compile, progress bars, TensorBoard) may differ.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import torch

from bvvit.config import ModelConfig, TrainConfig, flag_name
from bvvit.data.source import FASHION_MNIST
from bvvit.errors import ConfigError

# TrainConfig fields that decide the weights and metrics of a run (the model's own
# hyperparameters are compared separately: a checkpoint of another architecture).
RUN_SETTINGS = ("data_path", "epochs", "batch_size", "lr", "min_lr", "weight_decay",
                "warmup_epochs", "label_smoothing", "clip_grad", "seed", "augment",
                "train_subset", "val_subset", "amp")
# Training memory per parameter: float32 weights, gradients and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup quotas are not seen)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def canonical_data_path(data_path: Optional[str]) -> str:
    """``fashion-mnist`` for the symbolic name, else the absolute, resolved path: a model
    file must find its data from any working directory."""
    if data_path is None or str(data_path).strip().lower() in ("", FASHION_MNIST):
        return FASHION_MNIST
    return str(Path(data_path).expanduser().resolve())


def settings_in_use(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """(the config the run uses and records, warnings to show once)."""
    warnings = []
    workers, cpus = cfg.workers, usable_cpus()
    if workers > cpus:
        warnings.append(f"warning: --workers {workers} is more than the {cpus} CPUs this process "
                        f"may use; using {cpus}")
        workers = cpus
    pretrained = str(Path(cfg.pretrained_path).expanduser().resolve()) if cfg.pretrained_path else None
    return dataclasses.replace(cfg, data_path=canonical_data_path(cfg.data_path), workers=workers,
                               pretrained_path=pretrained), warnings


def check_resume(stored: dict[str, Any], cfg: TrainConfig, checkpoint: str) -> None:
    """ConfigError listing every RUN_SETTINGS value that differs from the checkpoint's
    ``train_config`` (keys it lacks, from older versions, are not compared)."""
    differences = []
    for name in RUN_SETTINGS:
        if name not in stored:
            continue
        old, new = stored[name], getattr(cfg, name)
        if name == "data_path":
            old = canonical_data_path(old)  # older checkpoints stored the path as typed
        if old != new:
            differences.append(f"{flag_name(name)} {_shown(old)} -> {_shown(new)}")
    if differences:
        raise ConfigError(f"cannot resume {checkpoint} with other settings ({', '.join(differences)}): "
                          "the result would match no single run; resume with the run's own flags "
                          "(see its config.json), or start a new run with another --output-dir")


def check_model_fits(model_cfg: ModelConfig, device: torch.device) -> None:
    """ConfigError when training the model cannot fit in the device's memory at all."""
    parameters = model_cfg.estimated_parameters()
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    available = _device_memory(device)
    if available and needed > available:
        raise ConfigError(
            f"the model would have {parameters / 1e6:,.0f}M parameters, {needed / 2 ** 30:,.1f} GiB "
            f"for weights, gradients and AdamW state, more than the {available / 2 ** 30:,.1f} GiB "
            f"of {device.type} memory; lower --embed-dim, --depth or --mlp-ratio")


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0  # unknown: no check


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


__all__ = ["RUN_SETTINGS", "usable_cpus", "canonical_data_path", "settings_in_use",
           "check_resume", "check_model_fits"]
