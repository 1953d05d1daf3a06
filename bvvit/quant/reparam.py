"""Post-LayerNorm reparameterization (the idea of RepQ-ViT), exact in float.

The outputs of ``norm1``/``norm2`` (the inputs of ``qkv``/``fc1``) have a few channels
with ranges tens of times wider than the rest, so one per-tensor scale wastes most of
its levels. Per-channel activation scales would fix that but need per-channel integer
kernels. Instead, a per-channel affine change of variables moves the channel spread
into the LayerNorm's affine and the next Linear's weights, which are quantized per
output channel anyway:

    y  = r * y' + d                   (per channel c: r_c > 0, d_c)
    LN:     gamma' = gamma / r,   beta' = (beta - d) / r          so LN'(x) = y'
    Linear: W' = W * r (columns), b' = b + W @ d                   so W' y' + b' = W y + b

``r`` equalises the channel ranges of y' (``alpha`` = 1: fully, 0: not at all) and ``d``
centres them, so every channel of y' has the same range and inference stays per-tensor.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from bvvit.model import VisionTransformer
from bvvit.quant.input_stats import input_statistics


def norm_linear_pairs(model: VisionTransformer) -> list[tuple[str, tuple[str, ...]]]:
    """(LayerNorm, the Linears that consume its output) for every block and the head(s):
    the final norm feeds ``head`` (and ``head_dist`` of a distilled model)."""
    pairs = []
    for i in range(len(model.blocks)):
        pairs.append((f"blocks.{i}.norm1", (f"blocks.{i}.attn.qkv",)))
        pairs.append((f"blocks.{i}.norm2", (f"blocks.{i}.mlp.fc1",)))
    pairs.append((model.final_norm_name, model.head_names))
    return pairs


def channel_ranges(model: nn.Module, loader: Iterable, names: list[str], device: torch.device | str = "cpu",
                   progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) of each named module's INPUT over ``loader``: what the Linear
    after a LayerNorm sees (a head: only the tokens it reads, pooled)."""
    return input_statistics(model, loader, range_names=names, device=device, progress=progress,
                            desc="LayerNorm ranges").ranges


def range_names(model: VisionTransformer) -> list[str]:
    """The Linears whose input ranges the reparameterization needs."""
    return [name for _, linears in norm_linear_pairs(model) for name in linears]


@torch.no_grad()
def fold_channel_affine(norm: nn.LayerNorm, linears: Sequence[nn.Linear], r: torch.Tensor,
                        d: torch.Tensor) -> None:
    """Apply ``y = r * y' + d`` between ``norm`` and every Linear reading its output, in
    place (exact in float)."""
    for linear in linears:
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
        linear.bias.add_(linear.weight @ d)
        linear.weight.mul_(r.unsqueeze(0))
    norm.weight.div_(r)
    norm.bias.sub_(d).div_(r)


@torch.no_grad()
def reparameterize_layernorms(model: VisionTransformer, loader: Iterable, alpha: float = 1.0,
                              device: torch.device | str = "cpu", progress: bool = False
                              ) -> dict[str, dict[str, float]]:
    """Equalise post-LayerNorm channel ranges of ``model`` in place; returns statistics
    (max/median channel range before and after) per LayerNorm."""
    ranges = channel_ranges(model, loader, range_names(model), device, progress)
    return reparameterize_from_ranges(model, ranges, alpha)[0]


@torch.no_grad()
def reparameterize_from_ranges(model: VisionTransformer, ranges: dict[str, tuple[torch.Tensor, torch.Tensor]],
                               alpha: float = 1.0
                               ) -> tuple[dict[str, dict[str, float]], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`reparameterize_layernorms` from input ranges measured beforehand
    (:func:`channel_ranges` of :func:`range_names`). Returns (statistics per LayerNorm,
    ``(r, d)`` per Linear: its new input is ``(old - d) / r``)."""
    stats, factors = {}, {}
    for norm_name, linear_names in norm_linear_pairs(model):
        lo = torch.stack([ranges[name][0] for name in linear_names]).amin(dim=0)
        hi = torch.stack([ranges[name][1] for name in linear_names]).amax(dim=0)
        width = (hi - lo).clamp(min=1e-6)
        mid = (hi + lo) / 2
        r = (width / width.median()).pow(alpha).clamp(min=1e-3)
        d = mid - r * mid.median()
        fold_channel_affine(model.get_submodule(norm_name),
                            [model.get_submodule(name) for name in linear_names], r, d)
        factors.update({name: (r, d) for name in linear_names})
        after = width / r
        stats[norm_name] = {"max_over_median_before": float(width.max() / width.median()),
                            "max_over_median_after": float(after.max() / after.median())}
    return stats, factors
