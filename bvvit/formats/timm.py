"""timm checkpoints: a ViT/DeiT state dict (``.pth``/``.bin``/``.safetensors``), or a folder
written by timm's ``save_for_hf`` / the Hugging Face hub (``config.json`` with
``architecture`` and ``pretrained_cfg``, next to ``model.safetensors`` or
``pytorch_model.bin``).

Our model uses timm's names, so the tensors load as they are; what this module decides is
the architecture the keys imply (class and distillation tokens, ``head_dist``, ``fc_norm``
and average pooling) and refuses, in one line, what the model does not have (register
tokens, layer scale, qk-norm, pre-norm, attention pooling, positional embeddings without
the prefix tokens). A bare state dict does not say how many attention heads the model has
or how it preprocesses: both are assumed (64 dimensions per head; timm's DeiT/ViT ImageNet
defaults) and said so; a timm folder states both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from bvvit.config import INTERPOLATIONS, Preprocessing
from bvvit.errors import CheckpointError
from bvvit.formats.common import (Converted, build_config, imagenet_preprocessing, mlp_ratio_for,
                                  num_heads_for, read_weights, square_grid, unsupported)

FORMAT = "timm"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Keys of timm ViT features the model does not have: (key fragment, what it is, hint).
_UNSUPPORTED_KEYS = (
    ("reg_token", "register tokens (reg_token)", "only class and distillation tokens are"),
    (".ls1.", "layer scale (blocks.N.ls1.gamma, as in DeiT-III)", ""),
    (".gamma_1", "layer scale (blocks.N.gamma_1, as in DeiT-III)", ""),
    (".attn.q_norm.", "qk-normalisation (blocks.N.attn.q_norm)", ""),
    ("norm_pre.", "a LayerNorm before the blocks (norm_pre, CLIP style)", ""),
    ("attn_pool.", "attention pooling (global_pool 'map')", "use a class-token or average-pooled model"),
    ("patch_embed.norm.", "a normalised patch embedding (patch_embed.norm)", ""),
    (".mlp.norm.", "an MLP norm (scale_mlp_norm)", ""),
    (".attn.norm.", "an attention-output norm (scale_attn_norm)", ""),
)


def looks_like(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` has timm ViT keys."""
    return all(isinstance(state.get(k), torch.Tensor) for k in ("patch_embed.proj.weight",)) \
        and any(k.startswith("blocks.0.") for k in state)


def is_timm_folder(config: Mapping[str, Any]) -> bool:
    """Whether a folder's ``config.json`` is timm's (``architecture`` + ``pretrained_cfg``)."""
    return isinstance(config.get("architecture"), str) and "model_type" not in config


def convert_state_dict(state: Mapping[str, Any], source: str, num_heads: Optional[int] = None,
                       model_args: Optional[Mapping[str, Any]] = None) -> Converted:
    """A timm ViT/DeiT state dict as our model; ``model_args`` (a timm folder's) decide what
    the keys cannot (heads, pooling)."""
    args = dict(model_args or {})
    _refuse_unsupported(state, args, source)
    notes: list[str] = []
    proj = _tensor(state, "patch_embed.proj.weight", source, "patch embedding")  # (D, C, P, P)
    fc1 = _tensor(state, "blocks.0.mlp.fc1.weight", source, "transformer blocks")  # (hidden, D)
    head = _tensor(state, "head.weight", source, "classifier head", "a feature extractor "
                   "cannot be evaluated; fine-tune a head on it with run.py first")
    pos = _tensor(state, "pos_embed", source, "positional embedding")
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    class_token, dist_token = "cls_token" in state, "dist_token" in state
    prefix = int(class_token) + int(dist_token)
    grid = _grid(pos.shape[1], prefix, source)
    fc_norm = "fc_norm.weight" in state
    global_pool = str(args.get("global_pool") or ("avg" if fc_norm or not class_token else "token"))
    if global_pool == "avg":
        notes.append("pooling: the mean of the patch tokens (timm's global_pool 'avg')"
                     + (", then fc_norm" if fc_norm else ""))
    heads = args.get("num_heads") if isinstance(args.get("num_heads"), int) else None
    config = build_config(
        source, img_size=grid * patch, patch_size=patch, in_chans=in_chans, num_classes=head.shape[0],
        embed_dim=embed_dim, depth=_depth(state), num_heads=num_heads or heads or num_heads_for(
            embed_dim, None, notes),
        mlp_ratio=mlp_ratio_for(embed_dim, fc1.shape[0], source),
        qkv_bias="blocks.0.attn.qkv.bias" in state, class_token=class_token, dist_token=dist_token,
        head_dist="head_dist.weight" in state, global_pool=global_pool, fc_norm=fc_norm)
    kept = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return Converted(kept, config, _default_preprocessing(config.img_size, in_chans, notes), [],
                     FORMAT, notes)


def convert_folder(folder: Path, config_json: Mapping[str, Any], source: str,
                   num_heads: Optional[int] = None) -> Converted:
    """A timm folder: its weights, ``model_args``, ``pretrained_cfg`` and ``label_names``."""
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{source}: a timm folder without {' or '.join(WEIGHT_FILES)}; "
                              "copy the weights next to its config.json")
    args = dict(config_json.get("model_args") or {})
    if config_json.get("global_pool"):
        args.setdefault("global_pool", config_json["global_pool"])
    converted = convert_state_dict(read_weights(weights), source, num_heads, args)
    converted.notes = [n for n in converted.notes if not n.startswith("preprocessing:")]
    cfg = config_json.get("pretrained_cfg") or {}
    converted.preprocessing = _pretrained_cfg_preprocessing(cfg, converted, source)
    converted.class_names = _label_names(config_json.get("label_names"), converted.config.num_classes)
    return converted


# ------------------------------------------------------------------------------ helpers

def _refuse_unsupported(state: Mapping[str, Any], args: Mapping[str, Any], source: str) -> None:
    for fragment, what, hint in _UNSUPPORTED_KEYS:
        if any(fragment in key for key in state):
            raise unsupported(source, what, hint)
    for name, what in (("reg_tokens", "register tokens"), ("no_embed_class", "no_embed_class "
                       "(positional embeddings without the prefix tokens)"), ("init_values", "layer scale"),
                       ("qk_norm", "qk-normalisation"), ("pre_norm", "norm_pre")):
        if args.get(name):
            raise unsupported(source, f"{what} ({name}={args[name]!r} in config.json)")
    if args.get("global_pool") not in (None, "token", "avg"):
        raise unsupported(source, f"global_pool {args['global_pool']!r}", "token and avg are")
    if args.get("act_layer") not in (None, "gelu"):
        raise unsupported(source, f"the activation {args['act_layer']!r}", "GELU is")
    if "blocks.0.attn.proj.bias" not in state and "blocks.0.attn.proj.weight" in state:
        raise unsupported(source, "Linear layers without bias (proj_bias=False)")


def _tensor(state: Mapping[str, Any], key: str, source: str, what: str, hint: str = "") -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: the timm state dict has no {what} ({key})"
                              + (f"; {hint}" if hint else "; is it a timm ViT/DeiT?"))
    return value


def _grid(tokens: int, prefix: int, source: str) -> int:
    """The patch grid of a ``pos_embed`` with ``tokens`` positions and ``prefix`` tokens."""
    side = int(round((tokens - prefix) ** 0.5)) if tokens > prefix else 0
    if side * side != tokens - prefix and prefix and int(round(tokens ** 0.5)) ** 2 == tokens:
        raise unsupported(source, "positional embeddings without the prefix tokens (no_embed_class, "
                          "as in DeiT-III)")
    return square_grid(tokens - prefix, source)


def _depth(state: Mapping[str, Any]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit())


def _default_preprocessing(img_size: int, in_chans: int, notes: list[str]) -> Preprocessing:
    """timm's ImageNet evaluation for DeiT (bicubic, ImageNet mean/std, 87.5% centre crop);
    grayscale and small images as BV-ViT trains them. A state dict does not store it."""
    crop_pct = 0.875 if img_size > 64 else 1.0
    if in_chans == 1:
        return Preprocessing(mean=(0.5,), std=(0.5,), img_size=img_size, in_chans=1,
                             interpolation="bilinear", crop_pct=crop_pct)
    notes.append(f"preprocessing: DeiT's ImageNet recipe assumed (bicubic, crop {crop_pct:g}, ImageNet "
                 "mean/std; a state dict does not store it): pass --preprocessing for another "
                 "(augreg ViTs: mean=0.5,0.5,0.5 std=0.5,0.5,0.5 crop_pct=0.9)")
    return imagenet_preprocessing(img_size, in_chans, "bicubic", crop_pct)


def _pretrained_cfg_preprocessing(cfg: Mapping[str, Any], converted: Converted,
                                  source: str) -> Preprocessing:
    """The evaluation transform of timm's ``pretrained_cfg`` (timm's resolve_data_config)."""
    config = converted.config
    size = cfg.get("input_size") or [config.in_chans, config.img_size, config.img_size]
    if list(size[1:]) != [config.img_size, config.img_size]:
        raise CheckpointError(f"{source}: config.json's input_size {list(size)} disagrees with the "
                              f"weights' {config.img_size}x{config.img_size} positional grid")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        converted.notes.append(f"interpolation {interpolation!r} of config.json is not available; "
                               "using bicubic")
        interpolation = "bicubic"
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode not in ("center", "squash"):
        raise unsupported(source, f"crop_mode {crop_mode!r} (config.json)", "center and squash are")
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    return imagenet_preprocessing(config.img_size, config.in_chans, interpolation,
                                  float(cfg.get("crop_pct", 0.875)), crop_mode,
                                  tuple(mean), tuple(std))


def _label_names(labels: Any, num_classes: int) -> list[str]:
    """timm's ``label_names`` (a list, or a dict index -> name) when it names every class."""
    if isinstance(labels, dict):
        labels = [labels.get(str(i), labels.get(i)) for i in range(num_classes)]
    if isinstance(labels, list) and len(labels) == num_classes and all(isinstance(x, str) for x in labels):
        return list(labels)
    return []
