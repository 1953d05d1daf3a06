"""torchvision ``VisionTransformer`` state dicts (``vit_b_16`` and its siblings, as
``torch.save(model.state_dict())`` or the downloaded ``.pth``).

Names: ``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_N.{ln_1, self_attention.in_proj_*, self_attention.out_proj,
ln_2, mlp.0, mlp.3}`` (``mlp.linear_1``/``linear_2`` in files written before torchvision
0.12), ``encoder.ln``, ``heads.head``. ``nn.MultiheadAttention``'s ``in_proj_weight`` stacks
q, k, v rows as timm's ``qkv`` does, so every tensor is copied as it is.

torchvision's weights do not carry their transform: the ImageNet recipe of ``vit_b_16``
(``IMAGENET1K_V1``: resize 256 bilinear, centre crop 224, ImageNet mean/std) is assumed for
224-pixel models, the SWAG recipe (resize = crop, bicubic) for other sizes, and said so.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from bvvit.errors import CheckpointError
from bvvit.formats.common import (Converted, build_config, imagenet_preprocessing, mlp_ratio_for,
                                  num_heads_for, square_grid, unsupported)

FORMAT = "torchvision"
_LAYER = r"encoder\.layers\.encoder_layer_(\d+)\."
_RENAMES = (
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (_LAYER + r"ln_1\.", r"blocks.\1.norm1."),
    (_LAYER + r"self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (_LAYER + r"self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"ln_2\.", r"blocks.\1.norm2."),
    (_LAYER + r"mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
)


def looks_like(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` has torchvision ViT keys."""
    return "class_token" in state and any(k.startswith("encoder.layers.") for k in state)


def convert_state_dict(state: Mapping[str, Any], source: str, num_heads: Optional[int] = None) -> Converted:
    """A torchvision ViT state dict as our model."""
    if not looks_like(state):
        raise CheckpointError(f"{source}: the torchvision state dict has no class_token / "
                              "encoder.layers.encoder_layer_N (first keys "
                              f"{', '.join(list(state)[:3])}); is it a torchvision VisionTransformer?")
    if any(k.startswith("heads.pre_logits.") for k in state):
        raise unsupported(source, "a pre-logits layer (representation_size: heads.pre_logits)")
    if any(k.startswith("conv_proj.conv_") or k.startswith("conv_proj.conv_last") for k in state):
        raise unsupported(source, "a convolutional stem (conv_stem_configs)", "a patchify conv_proj is")
    out = {_our_name(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    notes: list[str] = []
    for key, what in (("patch_embed.proj.weight", "conv_proj"), ("pos_embed", "encoder.pos_embedding"),
                      ("head.weight", "a classifier head (heads.head)")):
        if key not in out:
            raise CheckpointError(f"{source}: the torchvision state dict has no {what}")
    proj = out["patch_embed.proj.weight"]  # (D, C, P, P)
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    grid = square_grid(out["pos_embed"].shape[1] - 1, source)
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    config = build_config(
        source, img_size=grid * patch, patch_size=patch, in_chans=in_chans,
        num_classes=out["head.weight"].shape[0], embed_dim=embed_dim, depth=depth,
        num_heads=num_heads_for(embed_dim, num_heads, notes),
        mlp_ratio=mlp_ratio_for(embed_dim, out["blocks.0.mlp.fc1.weight"].shape[0], source),
        qkv_bias="blocks.0.attn.qkv.bias" in out)
    if config.img_size == 224:
        pre = imagenet_preprocessing(224, in_chans, "bilinear", 224 / 256)
        recipe = "torchvision's vit_b_16 IMAGENET1K_V1 recipe (resize 256 bilinear, crop 224)"
    else:
        pre = imagenet_preprocessing(config.img_size, in_chans, "bicubic", 1.0)
        recipe = f"torchvision's SWAG recipe (resize {config.img_size} bicubic, no crop margin)"
    notes.append(f"preprocessing: {recipe}, ImageNet mean/std (torchvision files do not store "
                 "it); pass --preprocessing to change it")
    return Converted(out, config, pre, [], FORMAT, notes)


def _our_name(key: str) -> str:
    for pattern, replacement in _RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key  # left for strict loading to report
