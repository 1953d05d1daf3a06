"""The model file (``vit_model.pth``): what ``run.py`` leaves and ``post_training.py`` takes.

A plain dict, loadable with ``torch.load(..., weights_only=True)``::

    {"format_version": 1, "kind": "bvvit-model",
     "model_config": {...}, "class_names": [...], "preprocessing": {...},
     "data": {"data_path": ..., "kind": ...}, "metrics": {...}, "state_dict": {...}}

Loading also accepts a bare timm/DeiT state dict when the model config is given.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from bvvit.config import ModelConfig, Preprocessing
from bvvit.errors import BVViTError, CheckpointError, ConfigError
from bvvit.io import atomic_torch_save, load_torch_file
from bvvit.formats import Converted, convert, read_checkpoint
from bvvit.model import VisionTransformer

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
    source_format: str = "bvvit"  # bvvit | timm | hf | torchvision
    notes: list[str] = field(default_factory=list)  # assumptions made loading it, one line each
    # The head outputs of the evaluation data's classes, in the data's order, when the data
    # has only some of them (set by the PTQ job's inputs; None: the data's classes are the head's).
    class_indices: Optional[tuple[int, ...]] = None


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
    _load_exactly(model, payload["state_dict"], source)
    model.eval()
    pre = _stored_preprocessing(payload, config, source)
    class_names = list(payload.get("class_names") or [str(i) for i in range(config.num_classes)])
    if len(class_names) != config.num_classes:
        raise CheckpointError(f"{source} lists {len(class_names)} class names for a "
                              f"{config.num_classes}-class head")
    return LoadedModel(model, config, class_names, pre, dict(payload.get("data", {})),
                       dict(payload.get("metrics", {})))


def _load_exactly(model: VisionTransformer, state: Any, source: str) -> None:
    """Load a BV-ViT file's weights with no adaptation (no pos_embed resizing, no renames):
    every tensor must be there with the shape the stored model config builds, so an edited
    config is caught here, not as a wrong answer or a crash later."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: state_dict is a {type(state).__name__}, not a dict of tensors")
    expected = model.state_dict()
    config = model.config
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    for keys, verb in ((missing, "lacks"), (unexpected, "has unexpected")):
        if keys:
            raise CheckpointError(f"{source}: state_dict {verb} {', '.join(keys[:3])}"
                                  f"{' ...' if len(keys) > 3 else ''} for its model_config "
                                  f"({_fields_text(keys[0], config)}); the config and the weights "
                                  "disagree (an edited or corrupt file)")
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: state_dict['{key}'] is {shape}, its model_config "
                                  f"({_fields_text(key, config)}) needs {list(tensor.shape)}; the "
                                  "config and the weights disagree (an edited or corrupt file)")
    model.load_state_dict(state, strict=True)


def _fields_text(key: str, config: ModelConfig) -> str:
    """The model-config fields that decide the tensor ``key``, with their stored values."""
    if key == "pos_embed":
        names = ("img_size", "patch_size", "embed_dim")
    elif key.startswith("patch_embed."):
        names = ("embed_dim", "in_chans", "patch_size")
    elif key.startswith("head."):
        names = ("num_classes", "embed_dim")
    elif ".mlp." in key:
        names = ("embed_dim", "mlp_ratio")
    elif key.endswith("qkv.bias"):
        names = ("qkv_bias",)
    elif key.startswith("blocks."):
        names = ("depth", "embed_dim")
    else:
        names = ("embed_dim",)
    return ", ".join(f"{name} {getattr(config, name)}" for name in names)


def _stored_preprocessing(payload: dict[str, Any], config: ModelConfig, source: str) -> Preprocessing:
    """The file's preprocessing, valid and consistent with its model config."""
    stored = payload.get("preprocessing")
    if not stored:
        return Preprocessing(img_size=config.img_size, in_chans=config.in_chans)
    try:
        if not isinstance(stored, dict):
            raise ConfigError(f"preprocessing is a {type(stored).__name__}, not a dict")
        pre = Preprocessing.from_dict(stored)
    except (TypeError, ValueError, BVViTError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    for name in ("img_size", "in_chans"):
        if getattr(pre, name) != getattr(config, name):
            raise CheckpointError(f"{source}: preprocessing {name} {getattr(pre, name)} disagrees "
                                  f"with model_config {name} {getattr(config, name)}; the file was "
                                  "edited or is corrupt")
    return pre


def model_file_holds(path: str | os.PathLike, payload: dict[str, Any]) -> bool:
    """Whether ``path`` is a readable file holding exactly ``payload`` (tensors compared by
    value: torch.save's bytes differ between two saves of the same content)."""
    try:
        stored = load_torch_file(path, what="model file")
    except CheckpointError:
        return False
    return _same_content(stored, payload)


def _same_content(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_content(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_content(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def load_model_file(path: str | os.PathLike, num_heads: Optional[int] = None,
                    model_format: str = "auto") -> LoadedModel:
    """Load ``vit_model.pth`` (or a training checkpoint ``last.pth``/``best.pth``), or a
    timm, Hugging Face or torchvision checkpoint (file or folder; :mod:`bvvit.formats`).
    ``model_format`` forces the format; ``num_heads`` the head count of state-dict formats
    (their weights do not store it)."""
    checkpoint = read_checkpoint(path, model_format)
    if checkpoint.format == "bvvit":
        loaded = model_from_payload(checkpoint.payload, str(path))
    else:
        loaded = model_from_converted(convert(checkpoint, num_heads), str(path))
    _require_finite(loaded.model, str(path))
    return loaded


def model_from_converted(converted: Converted, source: str) -> LoadedModel:
    """Our float model from a converted foreign checkpoint; every tensor must fit."""
    model = VisionTransformer(converted.config)
    expected = model.state_dict()
    state = converted.state_dict
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} {converted.format} tensor(s) BV-ViT's ViT "
                              f"has no place for ({', '.join(unexpected[:3])}"
                              f"{' ...' if len(unexpected) > 3 else ''}); not a plain ViT/DeiT classifier")
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong:
        key = (missing or wrong)[0]
        found = "missing" if missing else f"{list(state[key].shape)}, expected {list(expected[key].shape)}"
        raise CheckpointError(f"{source}: the {converted.format} checkpoint does not fit the ViT its "
                              f"shapes describe ({key}: {found}); is it a ViT/DeiT classifier?")
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedModel(model, converted.config, converted.class_names, converted.preprocessing,
                       {"kind": f"{converted.format}-checkpoint"}, {}, converted.format,
                       list(converted.notes))


# The ModelConfig fields that describe a checkpoint's architecture beyond its dimensions: a
# model fine-tuned from it (run.py --pretrained-path) takes them from the checkpoint.
ARCHITECTURE_FIELDS = ("qkv_bias", "norm_eps", "activation", "class_token", "dist_token", "head_dist",
                       "global_pool", "fc_norm")


@dataclass
class PretrainedWeights:
    """Weights to start training from (``run.py --pretrained-path``), with timm's names."""

    state_dict: dict[str, torch.Tensor]
    config: Optional[ModelConfig]  # the architecture the checkpoint describes (None: unknown)
    preprocessing: Optional[Preprocessing]  # the transform it was trained with (None: unknown)
    source_format: str

    def architecture_for(self, config: ModelConfig) -> ModelConfig:
        """``config`` (dimensions from the flags) with this checkpoint's architecture fields."""
        if self.config is None:
            return config
        return dataclasses.replace(config, **{name: getattr(self.config, name) for name in ARCHITECTURE_FIELDS})


def read_pretrained(path: str | os.PathLike, model_format: str = "auto",
                    num_heads: Optional[int] = None) -> PretrainedWeights:
    """The weights of any checkpoint :func:`load_model_file` reads (a BV-ViT model file or
    training checkpoint, a timm, Hugging Face or torchvision one), for fine-tuning."""
    checkpoint = read_checkpoint(path, model_format)
    if checkpoint.format == "bvvit":
        stored = checkpoint.payload.get("model_config")
        config = ModelConfig.from_dict(stored) if isinstance(stored, dict) else None
        return PretrainedWeights(state_dict_of(checkpoint.payload), config, None, "bvvit")
    converted = convert(checkpoint, num_heads)
    return PretrainedWeights(converted.state_dict, converted.config, converted.preprocessing,
                             converted.format)


def _require_finite(model: torch.nn.Module, source: str) -> None:
    """CheckpointError (one line) when a weight holds NaN or inf: every number computed from
    such a model (its accuracy, calibration ranges) would be meaningless."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}); "
                              "the training diverged or the file is corrupt: use an earlier checkpoint")


def state_dict_of(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights inside a model file, a training checkpoint or a bare state dict."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(payload.get(key), dict):
            return payload[key]
    return payload
