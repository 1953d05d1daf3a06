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
from bvvit.errors import BVViTError, CheckpointError, ConfigError
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


def load_model_file(path: str | os.PathLike, num_heads: Optional[int] = None) -> LoadedModel:
    """Load ``vit_model.pth`` (or a training checkpoint ``last.pth``/``best.pth``), or a bare
    timm/DeiT ViT state dict (its config is inferred from the tensor shapes; the head count
    is not in the shapes: ``num_heads`` or the timm convention of 64 dimensions per head)."""
    payload = load_torch_file(path, what="model file")
    if "format_version" not in payload and _looks_like_timm_vit(state_dict_of(payload)):
        loaded = model_from_timm_state_dict(state_dict_of(payload), str(path), num_heads)
    else:
        loaded = model_from_payload(payload, str(path))
    _require_finite(loaded.model, str(path))
    return loaded


def _require_finite(model: torch.nn.Module, source: str) -> None:
    """CheckpointError (one line) when a weight holds NaN or inf: every number computed from
    such a model (its accuracy, calibration ranges) would be meaningless."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}); "
                              "the training diverged or the file is corrupt: use an earlier checkpoint")


def _looks_like_timm_vit(state: dict[str, Any]) -> bool:
    return all(isinstance(state.get(k), torch.Tensor)
               for k in ("cls_token", "pos_embed", "patch_embed.proj.weight"))


# Preprocessing timm uses for ViT/DeiT on ImageNet.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def infer_timm_config(state: dict[str, torch.Tensor], num_heads: Optional[int] = None) -> ModelConfig:
    """A ModelConfig matching a timm VisionTransformer state dict (class-token ViT/DeiT)."""
    proj = state["patch_embed.proj.weight"]  # (D, C, P, P)
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    tokens = state["pos_embed"].shape[1] - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise CheckpointError(f"pos_embed has {tokens} patch positions (not a square grid); only "
                              "class-token ViTs without register/distillation tokens are supported")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    head = state.get("head.weight")
    if head is None:
        raise CheckpointError("the state dict has no classifier head (head.weight)")
    heads = num_heads or max(1, embed_dim // 64)
    return ModelConfig(img_size=grid * patch, patch_size=patch, in_chans=in_chans,
                       num_classes=head.shape[0], embed_dim=embed_dim, depth=depth, num_heads=heads,
                       mlp_ratio=hidden / embed_dim, qkv_bias="blocks.0.attn.qkv.bias" in state)


def model_from_timm_state_dict(state: dict[str, torch.Tensor], source: str,
                               num_heads: Optional[int] = None) -> LoadedModel:
    try:
        config = infer_timm_config(state, num_heads)
    except (KeyError, ValueError, IndexError, BVViTError) as exc:
        raise CheckpointError(f"{source}: cannot infer a ViT config from the state dict ({exc})") from None
    model = VisionTransformer(config)
    try:
        load_pretrained(model, state, strict_head=True)
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0].strip("'\"")
        raise CheckpointError(f"{source}: not a timm ViT/DeiT state dict ({first[:200]})") from None
    model.eval()
    rgb = config.in_chans == 3
    pre = Preprocessing(mean=IMAGENET_MEAN if rgb else (0.5,), std=IMAGENET_STD if rgb else (0.5,),
                        img_size=config.img_size, in_chans=config.in_chans,
                        interpolation="bicubic" if rgb else "bilinear",
                        crop_pct=0.875 if config.img_size > 64 else 1.0)
    # Class names are unknown: post_training takes them from the data folder.
    return LoadedModel(model, config, [], pre, {"kind": "timm-state-dict"}, {})


def state_dict_of(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights inside a model file, a training checkpoint or a bare state dict."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(payload.get(key), dict):
            return payload[key]
    return payload
