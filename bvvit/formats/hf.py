"""Hugging Face ``transformers`` folders: ``ViTForImageClassification`` and DeiT's
``DeiTForImageClassificationWithTeacher`` / ``DeiTForImageClassification``
(``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, ``preprocessor_config.json``).

Architecture from config.json: width, depth, heads, MLP width, ``layer_norm_eps`` (1e-12 in
HF: the model takes eps from the config), ``hidden_act``, ``qkv_bias``, image and patch
size, and the class names from ``id2label``. The separate query/key/value Linears become our
fused ``qkv`` (their weights stacked: exact). Preprocessing from preprocessor_config.json:
``size``/``do_resize`` (HF resizes both sides: our ``crop_mode`` "squash"), ``do_center_crop``
and ``crop_size``, ``resample``, ``image_mean``/``image_std``.

Weight names: the files ``save_pretrained`` writes (and the hub holds) use the original
names (``vit.encoder.layer.N.attention.attention.query``); transformers 5 renames them in
memory (``vit.layers.N.attention.q_proj``). Both are read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from bvvit.config import Preprocessing
from bvvit.errors import CheckpointError
from bvvit.formats.common import (Converted, build_config, mlp_ratio_for, read_json, read_weights,
                                  unsupported)

FORMAT = "hf"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Architectures by config.json "architectures": (prefix of the weights, the heads' names).
ARCHITECTURES = {
    "ViTForImageClassification": ("vit", ("classifier",)),
    "DeiTForImageClassificationWithTeacher": ("deit", ("cls_classifier", "distillation_classifier")),
    "DeiTForImageClassification": ("deit", ("classifier",)),
}
# HF hidden_act -> ModelConfig.activation (the tanh forms differ from each other by ~1e-7).
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}
# PIL resample codes -> our interpolation (1 LANCZOS, 4 BOX, 5 HAMMING have no tensor resize).
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# The image processors' class defaults (ViTImageProcessor, DeiTImageProcessor), for a folder
# without preprocessor_config.json: ViT resizes to the model's size, DeiT to 256/224 of it.
def _processor_defaults(model_type: str, img_size: int) -> dict[str, Any]:
    if model_type == "deit":
        return {"size": {"height": img_size * 256 // 224, "width": img_size * 256 // 224},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": img_size, "width": img_size},
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return {"size": {"height": img_size, "width": img_size}, "resample": 2,
            "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


# (HF name after the prefix, our name); {i} is the block index. Original names first.
_BLOCK_RENAMES = (
    (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    # transformers 5 in-memory names
    (r"layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"layers\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
    (r"layers\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"layers\.(\d+)\.attention\.(q|k|v)_proj\.", r"blocks.\1.attn.\2."),
)
_EMBEDDING_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_QKV = {"query": "q", "key": "k", "value": "v"}


def is_hf_folder(config: Mapping[str, Any]) -> bool:
    """Whether a folder's ``config.json`` is a transformers config (it has ``model_type``)."""
    return isinstance(config.get("model_type"), str)


def looks_like(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` has transformers ViT/DeiT weight names (a file from such a folder)."""
    return any(k.startswith(("vit.embeddings.", "deit.embeddings.")) for k in state)


def convert_folder(folder: Path, config_json: Mapping[str, Any], source: str,
                   weights: Optional[Mapping[str, Any]] = None) -> Converted:
    """A ViT/DeiT image-classification folder as our model (``weights``: already read from
    a file of it; else its model.safetensors or pytorch_model.bin)."""
    architecture = _architecture(config_json, source)
    prefix, head_names = ARCHITECTURES[architecture]
    if weights is None:
        path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
        if path is None:
            raise CheckpointError(f"{source}: no {' or '.join(WEIGHT_FILES)} next to config.json (a "
                                  "sharded or TensorFlow/Flax checkpoint? re-save it with "
                                  "save_pretrained(..., safe_serialization=True))")
        weights = read_weights(path)
    notes: list[str] = []
    config = _model_config(config_json, head_names, source, notes)
    state = _rename(weights, prefix, head_names, source)
    processor_path = folder / "preprocessor_config.json"
    if processor_path.is_file():
        processor = read_json(processor_path, source)
    else:
        processor = _processor_defaults(prefix, config.img_size)
        notes.append("no preprocessor_config.json: using the "
                     f"{'DeiT' if prefix == 'deit' else 'ViT'}ImageProcessor defaults")
    pre = processor_preprocessing(processor, config.img_size, config.in_chans, source, notes)
    return Converted(state, config, pre, _class_names(config_json, config.num_classes), FORMAT, notes)


# ------------------------------------------------------------------------------ helpers

def _architecture(config_json: Mapping[str, Any], source: str) -> str:
    names = config_json.get("architectures") or []
    known = [name for name in names if name in ARCHITECTURES]
    if not known:
        found = ", ".join(map(str, names)) or f"model_type {config_json.get('model_type')!r}"
        raise unsupported(source, f"the transformers architecture {found}",
                          f"image classifiers ({', '.join(ARCHITECTURES)}) are")
    return known[0]


def _model_config(cfg: Mapping[str, Any], head_names: tuple[str, ...], source: str,
                  notes: list[str]) -> Any:
    def field(name: str, default: Any = None) -> Any:
        value = cfg.get(name, default)
        if value is None:
            raise CheckpointError(f"{source}: config.json has no {name}")
        return value

    image, patch = _side(field("image_size"), "image_size", source), _side(field("patch_size"), "patch_size", source)
    act = field("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise unsupported(source, f"hidden_act {act!r}", f"{', '.join(ACTIVATIONS)} are")
    dim = field("hidden_size")
    num_classes = len(cfg.get("id2label") or {}) or cfg.get("num_labels") or 2
    return build_config(
        source, img_size=image, patch_size=patch, in_chans=field("num_channels", 3),
        num_classes=num_classes, embed_dim=dim, depth=field("num_hidden_layers"),
        num_heads=field("num_attention_heads"),
        mlp_ratio=mlp_ratio_for(dim, field("intermediate_size"), source),
        qkv_bias=bool(cfg.get("qkv_bias", True)), norm_eps=float(field("layer_norm_eps", 1e-12)),
        activation=ACTIVATIONS[act], dist_token=cfg.get("model_type") == "deit",
        head_dist=len(head_names) == 2)


def _side(value: Any, name: str, source: str) -> int:
    """An int size, or a square [h, w] one."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int):
        raise unsupported(source, f"{name} {value!r} in config.json", "square sizes are")
    return value


def _rename(weights: Mapping[str, Any], prefix: str, head_names: tuple[str, ...],
            source: str) -> dict[str, torch.Tensor]:
    """HF names -> timm names; q, k, v stacked into qkv (rows q | k | v, as timm's qkv)."""
    heads = dict(zip(head_names, ("head", "head_dist")))
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        name = _our_name(key, prefix, heads)
        if name is not None:
            out[name] = value
    for block in sorted({k.split(".")[1] for k in out if k.startswith("blocks.")}, key=int):
        for kind in ("weight", "bias"):
            parts = [out.pop(f"blocks.{block}.attn.{p}.{kind}", None) for p in ("q", "k", "v")]
            if all(p is not None for p in parts):
                out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            elif any(p is not None for p in parts):
                raise CheckpointError(f"{source}: block {block} has only some of query/key/value {kind}")
    return out


def _our_name(key: str, prefix: str, heads: Mapping[str, str]) -> Optional[str]:
    """The timm name of HF weight ``key`` (None: not part of the classifier)."""
    for hf_name, ours in heads.items():
        if key.startswith(hf_name + "."):
            return ours + key[len(hf_name):]
    if not key.startswith(prefix + "."):
        return key  # left for strict loading to report
    key = key[len(prefix) + 1:]
    if key in _EMBEDDING_RENAMES:
        return _EMBEDDING_RENAMES[key]
    if key.startswith(("pooler.", "embeddings.mask_token")):
        return None  # ViTModel's pooler and the masked-image-modelling token: unused here
    for pattern, replacement in _BLOCK_RENAMES:
        renamed, count = re.subn("^" + pattern, replacement, key)
        if count:
            for long, short in _QKV.items():
                renamed = renamed.replace(f".attn.{long}.", f".attn.{short}.")
            return renamed
    return prefix + "." + key


def processor_preprocessing(processor: Mapping[str, Any], img_size: int, in_chans: int, source: str,
                   notes: list[str]) -> Preprocessing:
    """preprocessor_config.json as our Preprocessing (resize, crop, resample, mean/std)."""
    if processor.get("do_rescale", True) and abs(float(processor.get("rescale_factor", 1 / 255))
                                                 * 255 - 1) > 1e-6:
        raise unsupported(source, f"rescale_factor {processor.get('rescale_factor')} "
                          "(preprocessor_config.json)", "pixels are scaled by 1/255")
    crop = _size(processor.get("crop_size"), img_size) if processor.get("do_center_crop") else None
    resize, mode = _resize(processor, img_size)
    if crop is not None and crop != img_size:
        raise CheckpointError(f"{source}: preprocessor_config.json crops {crop} pixels but the model "
                              f"takes {img_size}")
    if resize is None or (crop is None and resize != img_size):
        if resize is not None:
            notes.append(f"preprocessor_config.json resizes to {resize} without cropping to the "
                         f"model's {img_size}: resizing to {img_size}")
        resize = img_size
    resample = processor.get("resample", 2)
    interpolation = RESAMPLE.get(resample)
    if interpolation is None:
        notes.append(f"resample {resample} of preprocessor_config.json has no tensor resize here; "
                     "using bicubic")
        interpolation = "bicubic"
    if processor.get("do_normalize", True):
        mean = tuple(float(v) for v in processor.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in processor.get("image_std", (0.5, 0.5, 0.5)))
    else:
        mean, std = (0.0,) * in_chans, (1.0,) * in_chans
    return Preprocessing(mean=mean, std=std, img_size=img_size, in_chans=in_chans,
                         interpolation=interpolation, crop_pct=min(1.0, img_size / resize),
                         crop_mode=mode)


def _resize(processor: Mapping[str, Any], img_size: int) -> tuple[Optional[int], str]:
    """(resize target in pixels or None, crop_mode) of an image processor config."""
    if not processor.get("do_resize", True):
        return None, "center"
    size = processor.get("size", img_size)
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"]), "center"
    return _size(size, img_size), "squash"


def _size(value: Any, default: int) -> int:
    """A square size from ``224``, ``{"height": 224, "width": 224}`` or None."""
    if isinstance(value, dict):
        height, width = value.get("height"), value.get("width")
        if height != width or not isinstance(height, int):
            raise CheckpointError(f"non-square processor size {value}: only square inputs are supported")
        return height
    return int(value) if isinstance(value, int) else default


def _class_names(cfg: Mapping[str, Any], num_classes: int) -> list[str]:
    """``id2label`` in index order; [] when absent or HF's placeholders (LABEL_0, ...)."""
    id2label = cfg.get("id2label") or {}
    names = [id2label.get(str(i), id2label.get(i)) for i in range(num_classes)]
    if any(not isinstance(n, str) for n in names) or names == [f"LABEL_{i}" for i in range(num_classes)]:
        return []
    return [str(n) for n in names]
