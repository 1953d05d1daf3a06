"""The model file (``vit_model.pth``): what ``run.py`` leaves and ``post_training.py`` takes.

A plain dict, loadable with ``torch.load(..., weights_only=True)``::

    {"format_version": 1, "kind": "bvvit-model",
     "model_config": {...}, "class_names": [...], "preprocessing": {...},
     "data": {"data_path": ..., "kind": ...}, "metrics": {...}, "state_dict": {...}}

Loading also accepts a bare timm/DeiT state dict when the model config is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from bvvit.config import ModelConfig, Preprocessing
from bvvit.errors import BVViTError, CheckpointError
from bvvit.io import atomic_torch_save, load_torch_file
from bvvit.model import VisionTransformer, load_pretrained

FORMAT_VERSION = 1
MODEL_KIND = "bvvit-model"


@dataclass
class LoadedModel:
    model: VisionTransformer
    config: ModelConfig
    class_names: list[str]
    preprocessing: Preprocessing
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def model_payload(model: VisionTransformer, class_names: list[str], preprocessing: Preprocessing,
                  data: Optional[dict[str, Any]] = None,
                  metrics: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    # Unwrap DDP / torch.compile wrappers so keys are plain timm names.
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return {
        "format_version": FORMAT_VERSION,
        "kind": MODEL_KIND,
        "model_config": inner.config.to_dict(),
        "class_names": list(class_names),
        "preprocessing": preprocessing.to_dict(),
        "data": dict(data or {}),
        "metrics": dict(metrics or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()},
    }


def save_model_file(path: str | os.PathLike, model: VisionTransformer, class_names: list[str],
                    preprocessing: Preprocessing, data: Optional[dict[str, Any]] = None,
                    metrics: Optional[dict[str, Any]] = None) -> None:
    atomic_torch_save(model_payload(model, class_names, preprocessing, data, metrics), path)


def model_from_payload(payload: dict[str, Any], source: str) -> LoadedModel:
    """Rebuild the float model from a model-file or training-checkpoint dict."""
    version = payload.get("format_version")
    if version is None or "model_config" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{source} is not a BV-ViT model file (no format_version/model_config); "
                              "pass the vit_model.pth written by run.py")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{source} has format_version {version}, newer than this BV-ViT "
                              f"understands ({FORMAT_VERSION}); upgrade bvvit")
    try:
        config = ModelConfig.from_dict(payload["model_config"])
    except (TypeError, BVViTError) as exc:
        raise CheckpointError(f"{source} has an invalid model config: {exc}") from None
    model = VisionTransformer(config)
    try:
        load_pretrained(model, payload["state_dict"], strict_head=True)
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0].strip("'\"")
        raise CheckpointError(f"{source}: weights do not fit the stored model config ({first[:200]})") from None
    model.eval()
    pre = Preprocessing.from_dict(payload.get("preprocessing", {})) if payload.get("preprocessing") \
        else Preprocessing(img_size=config.img_size, in_chans=config.in_chans)
    class_names = list(payload.get("class_names") or [str(i) for i in range(config.num_classes)])
    if len(class_names) != config.num_classes:
        raise CheckpointError(f"{source} lists {len(class_names)} class names for a "
                              f"{config.num_classes}-class head")
    return LoadedModel(model, config, class_names, pre, dict(payload.get("data", {})),
                       dict(payload.get("metrics", {})))


def load_model_file(path: str | os.PathLike) -> LoadedModel:
    """Load ``vit_model.pth`` (or a training checkpoint ``last.pth``/``best.pth``)."""
    payload = load_torch_file(path, what="model file")
    return model_from_payload(payload, str(path))


def state_dict_of(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights inside a model file, a training checkpoint or a bare state dict."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(payload.get(key), dict):
            return payload[key]
    return payload
