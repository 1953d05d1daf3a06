"""The grid of each attention-softmax quantizer, chosen per model by calibration error
(``softmax.method = "auto"``, the ``vit`` recipe's default).

Which grid suits attention probabilities depends on the model and the width: at 17 tokens
and 4 bits a log-sqrt2 grid beats log2, at 8 bits a uniform grid beats both, and at 197
tokens (many small probabilities) the answer differs block by block. So after calibration
every softmax quantizer tries every grid on the calibration images and keeps the one with
the lowest relative error of what the probabilities are used for::

    error(grid) = |Q_grid(P) v - P v|^2 / |P v|^2       summed over images, heads, tokens

with ``P`` the softmax of the (quantized) scores and ``v`` the quantized values it
multiplies. Candidates: ``uniform`` (the calibrated qparams) and the log grids with k = 1, 2,
4, 8 and 16 levels per octave (``log2``, ``log-sqrt2``, ``log-2^(1/4)``, ...;
:class:`bvvit.quant.log2.LogQParams`, scale = the largest observed probability). A finer
log grid has a smaller relative rounding error but spans fewer octaves with the same
2^bits - 1 levels, so which k wins depends on the bits and on how small the probabilities
that matter get: at 6 and 8 bits and 197 tokens k = 4 and 16 cut the held-out logit error of
the model by a third and by three quarters (docs/BENCHMARKS.md section 8). Cost: two forward
passes over ``max_images`` images.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from bvvit.quant.hooks import run_with_hooks
from bvvit.quant.log2 import STEPS_PER_OCTAVE, LogQParams
from bvvit.quant.modules import ActQuantizer, QuantSoftmax

def log_grid_name(steps_per_octave: int) -> str:
    """``log2``, ``log-sqrt2``, then ``log-2^(1/k)``: the grid's base, 2^(1/k)."""
    return {1: "log2", 2: "log-sqrt2"}.get(steps_per_octave, f"log-2^(1/{steps_per_octave})")


# name -> steps per octave (None: uniform)
SOFTMAX_GRIDS: dict[str, int | None] = {"uniform": None, **{log_grid_name(k): k for k in STEPS_PER_OCTAVE}}
CHOICE_IMAGES = 64  # calibration images the choice is measured on


def _softmax_pairs(qmodel: nn.Module) -> list[tuple[str, QuantSoftmax, str]]:
    """(name, attention softmax, name of the ``attn @ v`` matmul that reads it) per block."""
    return [(name, module, name.rsplit(".", 1)[0] + ".matmul_av")
            for name, module in qmodel.named_modules() if isinstance(module, QuantSoftmax)]


@torch.no_grad()
def probability_maxima(qmodel: nn.Module, loader: Iterable, max_images: int,
                       device: torch.device | str = "cpu") -> dict[str, float]:
    """{softmax module name: the largest probability P it outputs} over the first
    ``max_images`` images (P: the float softmax of the scores the quantized softmax receives)."""
    softmaxes = {name: softmax for name, softmax, _ in _softmax_pairs(qmodel)}
    maxima: dict[str, float] = {}

    def record(name: str, inputs: tuple, output: Tensor) -> None:
        p_max = float(inputs[0].softmax(dim=softmaxes[name].dim).max())
        maxima[name] = max(maxima.get(name, 0.0), p_max)

    run_with_hooks(qmodel, loader, list(softmaxes), record, device, max_images=max_images)
    return maxima


def grid_qparams(quantizer: ActQuantizer, grid: str, p_max: float) -> Any:
    """The qparams of ``grid`` for ``quantizer``: its calibrated uniform ones, or a log grid
    whose largest level is ``p_max``."""
    steps = SOFTMAX_GRIDS[grid]
    if steps is None:
        return quantizer.qparams
    return LogQParams(torch.tensor(p_max, dtype=torch.float32), quantizer.bits, steps)


@torch.no_grad()
def choose_softmax_grids(qmodel: nn.Module, loader: Iterable, max_images: int = CHOICE_IMAGES,
                         device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Give every calibrated attention-softmax quantizer of ``qmodel`` the grid with the
    lowest relative ``attn @ v`` error on ``loader``'s first ``max_images`` images (in place;
    the quantizer's spec then names the method it uses). Returns {softmax module name:
    {"choice": grid, "errors": {grid: relative error}}}.

    Two passes over those images: the first finds each softmax's largest probability (the
    log grids' top level), the second sums every grid's error block by block as the images
    run, so only one block's probabilities are held at a time (ViT-B/16, 64 images: 0.12 GB
    per block instead of 1.4 GB for all twelve)."""
    pairs = _softmax_pairs(qmodel)
    p_max = probability_maxima(qmodel, loader, max_images, device)
    candidates = {name: {grid: grid_qparams(module.output_quantizer, grid, p_max[name]) for grid in SOFTMAX_GRIDS}
                  for name, module, _ in pairs}
    errors = {name: dict.fromkeys(SOFTMAX_GRIDS, 0.0) for name, _, _ in pairs}
    reference = dict.fromkeys(errors, 0.0)
    softmax_of = {matmul: name for name, _, matmul in pairs}
    modules = {name: qmodel.get_submodule(name) for pair in pairs for name in (pair[0], pair[2])}
    pending: dict[str, Tensor] = {}

    def record(name: str, inputs: tuple, output: Tensor) -> None:
        if name not in softmax_of:  # a softmax: keep its probabilities until attn @ v reads them
            pending[name] = inputs[0].softmax(dim=modules[name].dim)
            return
        softmax = softmax_of[name]
        quantizer = getattr(modules[name], "quantizer_b", None)
        v = inputs[1] if quantizer is None else quantizer(inputs[1])
        p = pending.pop(softmax)
        pv = p @ v
        reference[softmax] += float(pv.pow(2).sum())
        for grid, qparams in candidates[softmax].items():
            errors[softmax][grid] += float((qparams.fake_quantize(p) @ v - pv).pow(2).sum())

    run_with_hooks(qmodel, loader, list(modules), record, device, max_images=max_images)
    chosen: dict[str, dict[str, Any]] = {}
    for name, module, _ in pairs:
        relative = {grid: error / max(reference[name], 1e-30) for grid, error in errors[name].items()}
        best = min(relative, key=relative.__getitem__)
        module.output_quantizer.set_qparams(candidates[name][best])
        chosen[name] = {"choice": best, "errors": relative}
    return chosen


def grid_summary(chosen: dict[str, dict[str, Any]]) -> str:
    """One word for the summary: the grid every block chose, or ``mixed (log2 x4, uniform x2)``."""
    counts: dict[str, int] = {}
    for record in chosen.values():
        counts[record["choice"]] = counts.get(record["choice"], 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed (" + ", ".join(f"{grid} x{n}" for grid, n in sorted(counts.items())) + ")"


__all__ = ["SOFTMAX_GRIDS", "log_grid_name", "CHOICE_IMAGES", "probability_maxima", "grid_qparams", "choose_softmax_grids",
           "grid_summary"]
