"""Named bundles of quantization choices.

==========  =====================================  ======================================
recipe      weights                                activations (incl. q, k, v, softmax)
==========  =====================================  ======================================
minmax      per-tensor, symmetric, min-max         per-tensor, asymmetric, min-max
percentile  per-channel, symmetric, min-max        per-tensor, asymmetric, 99.99th pct.
mse         per-channel, symmetric, MSE clipping   per-tensor, asymmetric, MSE clipping
vit         mse + GPTQ rounding                    mse + post-LayerNorm reparameterization;
            (+ reconstruction at <= 4 bits,        softmax grid (uniform or log base 2^(1/k))
            300 steps at <= 3 bits)                chosen per block by calibration error
                                                   (from 8 bits: the uniform grid's range);
                                                   below 8 bits each quantized attention
                                                   row rescaled to sum to 1
vit-recon   vit + block-wise reconstruction at     vit + learned step sizes (LSQ), same
            every width: learned rounding          block-wise reconstruction
            (AdaRound/BRECQ)
==========  =====================================  ======================================

``minmax`` is the naive baseline users compare against; ``vit`` is the default (it beat
``mse`` at every bit depth measured on the demo model, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

from bvvit.errors import ConfigError
from bvvit.quant.config import (GPTQOptions, QuantConfig, ReconstructOptions, ReparamOptions, RotationOptions,
                                TensorQuantSpec, check_bits)


def _minmax(w_bits: int, a_bits: int) -> dict[str, Any]:
    return {
        "weight": TensorQuantSpec(w_bits, symmetric=True, granularity="tensor", observer="minmax"),
        "activation": TensorQuantSpec(a_bits, symmetric=False, observer="minmax"),
        "softmax": TensorQuantSpec(a_bits, symmetric=False, observer="minmax"),
    }


def _percentile(w_bits: int, a_bits: int) -> dict[str, Any]:
    return {
        "weight": TensorQuantSpec(w_bits, symmetric=True, granularity="channel", observer="minmax"),
        "activation": TensorQuantSpec(a_bits, symmetric=False, observer="percentile", percentile=99.99),
        "softmax": TensorQuantSpec(a_bits, symmetric=False, observer="percentile", percentile=99.99),
    }


def _mse(w_bits: int, a_bits: int) -> dict[str, Any]:
    return {
        "weight": TensorQuantSpec(w_bits, symmetric=True, granularity="channel", observer="mse"),
        "activation": TensorQuantSpec(a_bits, symmetric=False, observer="mse"),
        "softmax": TensorQuantSpec(a_bits, symmetric=False, observer="mse"),
    }


IMAGE_BITS = 8  # vit quantizes the image (uint8 data: exact at 8 bits) at max(a_bits, 8)
LOW_BITS = 4  # vit reconstructs block by block when weights or activations have <= this many bits
LONG_RECONSTRUCTION_BITS = 3  # ... with 300 steps per unit instead of 100 at <= this many bits
LONG_RECONSTRUCTION_ITERS = 300


def _vit(w_bits: int, a_bits: int) -> dict[str, Any]:
    """ViT-aware: LayerNorm reparameterization and GPTQ weights on top of mse, and block-wise
    reconstruction when weights or activations have <= 4 bits (there it halves the W4A4 loss
    and cuts W3A3's by 2/3 for ~40 s more calibration; at 6+ bits it bought nothing:
    BENCHMARKS.md section 4). The softmax grid is chosen per block after calibration
    (``method="auto"``, :mod:`bvvit.quant.softmax_grid`): a fixed log2 grid lowered W4A4
    accuracy at 17 tokens, where log-sqrt2 is the better log grid at 4 bits and uniform at
    8; the choice by attn @ v error matched the held-out logit error at W3A3, W4A4 and W8A8.
    The image itself (the patch embedding's input) is quantized at ``max(a_bits, 8)`` bits:
    it is 8-bit data, so 8 bits lose nothing there, while 3-4 bits there cost a quarter of the
    W3A3 logit error (held-out training images, BENCHMARKS.md). From 8 bits the choice is
    among uniform grids only (their range), what integer runtimes run, so the simulated W8A8
    model is the one that is exported. Below 8 bits each quantized row of attention
    probabilities is rescaled to sum to 1 (``softmax_renorm``): held-out W3A3 logit KL -9% on
    the demo model and -6% at 197 tokens, every seed; W4A4 -10% on the demo model, neutral at
    197 tokens. Choosing it per block by the attn @ v error was worse (BENCHMARKS.md section 8)."""
    softmax = TensorQuantSpec(a_bits, symmetric=False, observer="mse", method="auto")
    return {**_mse(w_bits, a_bits), "softmax": softmax, "image_bits": max(a_bits, IMAGE_BITS),
            "softmax_renorm": True, "reparam": ReparamOptions(enabled=True), "gptq": GPTQOptions(enabled=True),
            "reconstruct": _reconstruction(min(w_bits, a_bits))}


def _reconstruction(bits: int) -> ReconstructOptions:
    """Block reconstruction at <= 4 bits; 300 steps per unit at <= 3 bits, where they cut the
    logit KL by a fifth on every seed tried (W3A3, held-out images, BENCHMARKS.md section 8),
    while at 4 bits 300 steps bought nothing over 100.

    Weight step sizes stay fixed (``learn_weight_scale``, ``--learn-weight-scales``, is an
    option): at W3A3 learning them lowered the demo model's held-out KL on all six seeds
    tried but raised the 197-token model's on all three, and did nothing at 4 bits."""
    if bits <= LONG_RECONSTRUCTION_BITS:
        return ReconstructOptions(enabled=True, iters=LONG_RECONSTRUCTION_ITERS)
    return ReconstructOptions(enabled=bits <= LOW_BITS)


def _vit_recon(w_bits: int, a_bits: int) -> dict[str, Any]:
    """``vit`` followed by block-wise reconstruction (bvvit/quant/reconstruct.py): the GPTQ
    codes are refined by learned rounding and the activation step sizes are learned, block
    by block, against the float model's outputs on the calibration images."""
    return {**_vit(w_bits, a_bits), "reconstruct": dataclasses.replace(_reconstruction(min(w_bits, a_bits)),
                                                                        enabled=True)}


RECIPES: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "minmax": _minmax,
    "percentile": _percentile,
    "mse": _mse,
    "vit": _vit,
    "vit-recon": _vit_recon,
}
DEFAULT_RECIPE = "vit"


_OPTIONS = {"reparam": ReparamOptions, "gptq": GPTQOptions, "reconstruct": ReconstructOptions,
            "rotation": RotationOptions}


def make_quant_config(recipe: str = DEFAULT_RECIPE, w_bits: int = 8, a_bits: int = 8,
                      softmax_method: str | None = None, **changes: Any) -> QuantConfig:
    """A :class:`QuantConfig` for ``recipe`` at the given bit-widths; ``changes`` replace its
    fields (``head=False``, ``overrides=[...]``, ``calib_size=...``). A technique's options
    are replaced whole by an options object, or changed in part by a dict:
    ``reconstruct={"enabled": False}`` keeps the recipe's other reconstruction settings.

    ``softmax_method`` ("uniform", "log2", "auto") replaces the recipe's softmax grid."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    bundle = RECIPES[recipe](check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits"))
    if softmax_method is not None:
        bundle["softmax"] = TensorQuantSpec(a_bits, symmetric=False, observer="mse", method=softmax_method)
    for key, value in changes.items():
        if key in _OPTIONS and isinstance(value, Mapping):
            value = dataclasses.replace(bundle.get(key, _OPTIONS[key]()), **value)
        bundle[key] = value
    return QuantConfig(recipe=recipe, **bundle)
