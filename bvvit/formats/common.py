"""What every checkpoint format returns (:class:`Converted`) and the helpers they share.

A format module maps ONE source's checkpoint to our model: a state dict with timm's names
(the names of :class:`bvvit.model.VisionTransformer`), the :class:`ModelConfig` that builds
the matching model, the :class:`Preprocessing` the source evaluates with, and its class
names. Adaptation happens there and only there (timm's ``checkpoint_filter_fn`` idea).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from bvvit.config import ModelConfig, Preprocessing
from bvvit.errors import BVViTError, CheckpointError
from bvvit.io import load_torch_file

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Head counts of the standard ViTs whose head width is not 64 (ViT-H: 1280 / 16 = 80).
NUM_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


@dataclass
class Converted:
    """A foreign checkpoint in our terms."""

    state_dict: dict[str, torch.Tensor]  # timm names, the shapes VisionTransformer(config) has
    config: ModelConfig
    preprocessing: Preprocessing
    class_names: list[str]  # [] when the checkpoint names no classes
    format: str  # "timm", "hf" or "torchvision"
    notes: list[str] = field(default_factory=list)  # assumptions to tell the user, one line each


def read_weights(path: str | os.PathLike, what: str = "model file") -> dict[str, Any]:
    """The dict stored in a ``.safetensors`` file or a ``torch.save`` file (.pth/.bin/.pt)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_torch_file(path, what=what)
    if not path.is_file():
        load_torch_file(path, what=what)  # its one-line error: missing, a folder, ...
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} {path} is not a readable safetensors file ({first[:160]}); "
                              "it may be truncated or corrupt") from None


def unwrap_state_dict(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict inside a training checkpoint (``model``/``state_dict``/``model_state``),
    without DistributedDataParallel's ``module.`` prefix."""
    for wrapper in ("state_dict", "model", "model_state"):
        if isinstance(payload.get(wrapper), Mapping):
            payload = payload[wrapper]
            break
    if payload and all(isinstance(k, str) and k.startswith("module.") for k in payload):
        return {k[len("module."):]: v for k, v in payload.items()}
    return dict(payload)


def read_json(path: Path, source: str) -> dict[str, Any]:
    """A JSON object file (CheckpointError naming ``source`` when it is not one)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: {path.name} is not readable JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: {path.name} holds a {type(data).__name__}, not a JSON object")
    return data


def unsupported(source: str, what: str, hint: str = "") -> CheckpointError:
    """The one-line refusal of a checkpoint feature the model does not have."""
    return CheckpointError(f"{source}: {what} is not supported" + (f"; {hint}" if hint else ""))


def num_heads_for(embed_dim: int, num_heads: Optional[int], notes: list[str]) -> int:
    """``num_heads`` when given (--num-heads), else the standard ViT count for this width
    (64 dimensions per head; ViT-H and larger: 16 heads): the weights do not say."""
    if num_heads is not None:
        return num_heads
    heads = NUM_HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64))
    notes.append(f"attention heads: {heads} assumed for width {embed_dim} (the weights do not "
                 "store it); pass --num-heads if the model has another count")
    return heads


def square_grid(patch_tokens: int, source: str) -> int:
    """The side of a square grid of ``patch_tokens`` positions."""
    grid = math.isqrt(max(patch_tokens, 0))
    if grid * grid != patch_tokens or grid == 0:
        raise unsupported(source, f"a positional embedding of {patch_tokens} patch positions (not a "
                          "square grid)", "only square images with square patches are")
    return grid


def mlp_ratio_for(embed_dim: int, hidden: int, source: str) -> float:
    """The ``mlp_ratio`` whose ``int(embed_dim * ratio)`` is ``hidden`` (as ModelConfig builds)."""
    ratio = hidden / embed_dim
    if int(embed_dim * ratio) != hidden:
        raise unsupported(source, f"an MLP width of {hidden} for embedding {embed_dim}")
    return ratio


def build_config(source: str, **fields: Any) -> ModelConfig:
    """``ModelConfig(**fields)`` with its refusal as a CheckpointError naming ``source``."""
    try:
        return ModelConfig(**fields)
    except BVViTError as exc:
        raise CheckpointError(f"{source}: the checkpoint describes a model BV-ViT cannot build ({exc})") from None


def imagenet_preprocessing(img_size: int, in_chans: int, interpolation: str, crop_pct: float,
                           crop_mode: str = "center", mean: tuple[float, ...] = IMAGENET_MEAN,
                           std: tuple[float, ...] = IMAGENET_STD) -> Preprocessing:
    """Preprocessing with ImageNet statistics (averaged to one channel for grayscale)."""
    if in_chans == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return Preprocessing(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                         img_size=img_size, in_chans=in_chans, interpolation=interpolation,
                         crop_pct=crop_pct, crop_mode=crop_mode)
