"""The grid of each attention-softmax quantizer, chosen per model by calibration error
(``softmax.method = "auto"``, the ``vit`` recipe's default).

Which grid suits attention probabilities depends on the model and the width: at 17 tokens
and 4 bits a log-sqrt2 grid beats log2, and at 197 tokens (many small probabilities) the
answer differs block by block. So after calibration every softmax quantizer tries every
candidate grid on the calibration images and keeps the one with the lowest relative error
of what the probabilities are used for::

    error(grid) = |Q_grid(P) v - P v|^2 / |P v|^2       summed over images, heads, tokens

with ``P`` the softmax of the (quantized) scores and ``v`` the quantized values it
multiplies. Candidates: ``uniform`` (the calibrated qparams) and the log grids with k = 1, 2,
4, 8 and 16 levels per octave (``log2``, ``log-sqrt2``, ``log-2^(1/4)``, ...;
:class:`bvvit.quant.log2.LogQParams`, scale = the largest observed probability). A finer
log grid has a smaller relative rounding error but spans fewer octaves with the same
2^bits - 1 levels, so which k wins depends on the bits and on how small the probabilities
that matter get: at 6 bits and 197 tokens k = 4 cut the held-out logit error of the model
by a third (docs/BENCHMARKS.md section 8).

Below 8 bits the ``vit`` recipes rescale each quantized row to sum to 1 (``softmax_renorm``,
:class:`~bvvit.quant.modules.QuantSoftmax`), and the candidates' errors are measured on the
rescaled rows. Whether to rescale is not chosen per block by this error: that choice kept
the rounded rows in some blocks of the 197-token model and raised its held-out W3A3 logit
error, where rescaling every block lowered it (docs/BENCHMARKS.md section 8).

From 8 bits the candidates are uniform grids only: 8 bits is what the integer runtimes run,
and their attention (ONNX Runtime's int8 ``attn @ v``) takes uniform uint8 probabilities, so
a log grid there could not be exported. What is chosen instead is the uniform grid's range:
the calibrated (MSE) scale times 2^(-j/4), j = -2 .. 12. At 197 tokens the calibrated range
is too wide where attention is peaked (held-out W8A8 logit KL 0.0005 -> 0.0003). Cost: two
forward passes over ``max_images`` images below 8 bits, one from 8 bits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from bvvit.quant.hooks import run_with_hooks
from bvvit.quant.log2 import STEPS_PER_OCTAVE, LogQParams
from bvvit.quant.modules import ActQuantizer, QuantSoftmax, renormalize_rows

def log_grid_name(steps_per_octave: int) -> str:
    """``log2``, ``log-sqrt2``, then ``log-2^(1/k)``: the grid's base, 2^(1/k)."""
    return {1: "log2", 2: "log-sqrt2"}.get(steps_per_octave, f"log-2^(1/{steps_per_octave})")


# name -> steps per octave (None: uniform)
SOFTMAX_GRIDS: dict[str, int | None] = {"uniform": None, **{log_grid_name(k): k for k in STEPS_PER_OCTAVE}}
CHOICE_IMAGES = 64  # calibration images the choice is measured on
UNIFORM_ONLY_BITS = 8  # from this many bits only uniform grids: what integer runtimes run (and export)
UNIFORM_RANGES = tuple(range(-2, 13))  # ... of scale 2^(-j/4) x the calibrated one (j = 0: it)
# candidate name -> factor of the calibrated scale ("uniform" is the calibrated grid itself)
UNIFORM_FACTORS = {("uniform" if j == 0 else f"uniform@{j}"): 2.0 ** (-j / 4) for j in UNIFORM_RANGES}


def candidate_qparams(quantizer: ActQuantizer, p_max: Optional[float]) -> dict[str, Any]:
    """{candidate: qparams} for one softmax quantizer. Below :data:`UNIFORM_ONLY_BITS` bits:
    every grid of :data:`SOFTMAX_GRIDS` (uniform with its calibrated range; the log grids'
    top level ``p_max``). From it: uniform grids only, with the calibrated scale times
    2^(-j/4) for j in :data:`UNIFORM_RANGES` (``uniform@j``; the zero point kept), since no
    integer runtime runs a log grid (``p_max`` is not used and may be None)."""
    if quantizer.bits < UNIFORM_ONLY_BITS:
        return {grid: grid_qparams(quantizer, grid, p_max) for grid in SOFTMAX_GRIDS}
    qp = quantizer.qparams
    return {key: qp if key == "uniform" else dataclasses.replace(qp, scale=qp.scale * factor)
            for key, factor in UNIFORM_FACTORS.items()}


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
    the quantizer's spec then names the method it uses). The candidates are those of
    :func:`candidate_qparams`. Returns {softmax module name: {"choice": the grid (``uniform``,
    ``log2``, ...), "candidate": the candidate kept (``uniform@3`` from 8 bits), "errors":
    {candidate: relative error}}}, with "scale_factor" (of the calibrated scale) for a uniform one.
    Where the softmax renormalizes its rows (``QuantSoftmax.renormalize``) each candidate's
    error is that of its renormalized rows: what the module computes.

    Two passes over those images: the first finds each softmax's largest probability (the
    log grids' top level; skipped when every softmax has 8 or more bits, so no log grid is
    tried), the second sums every grid's error block by block as the images run, so only one
    block's probabilities are held at a time (ViT-B/16, 64 images: 0.12 GB per block instead
    of 1.4 GB for all twelve)."""
    pairs = _softmax_pairs(qmodel)
    log_grids = any(module.output_quantizer.bits < UNIFORM_ONLY_BITS for _, module, _ in pairs)
    p_max = probability_maxima(qmodel, loader, max_images, device) if log_grids else {}
    candidates = {name: candidate_qparams(module.output_quantizer, p_max.get(name)) for name, module, _ in pairs}
    errors = {name: dict.fromkeys(candidates[name], 0.0) for name, _, _ in pairs}
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
        renormalize = modules[softmax].renormalize
        for grid, qparams in candidates[softmax].items():
            quantized = qparams.fake_quantize(p)
            if renormalize:  # the error of what the module computes
                quantized = renormalize_rows(quantized)
            errors[softmax][grid] += float((quantized @ v - pv).pow(2).sum())

    run_with_hooks(qmodel, loader, list(modules), record, device, max_images=max_images)
    chosen: dict[str, dict[str, Any]] = {}
    for name, module, _ in pairs:
        relative = {grid: error / max(reference[name], 1e-30) for grid, error in errors[name].items()}
        best = min(relative, key=relative.__getitem__)
        module.output_quantizer.set_qparams(candidates[name][best])
        uniform = best in UNIFORM_FACTORS
        chosen[name] = {"choice": "uniform" if uniform else best, "candidate": best, "errors": relative}
        if uniform:
            chosen[name]["scale_factor"] = UNIFORM_FACTORS[best]
    return chosen


def grid_summary(chosen: dict[str, dict[str, Any]]) -> str:
    """One word for the summary: the grid every block chose, or ``mixed (log2 x4, uniform x2)``."""
    counts: dict[str, int] = {}
    for record in chosen.values():
        counts[record["choice"]] = counts.get(record["choice"], 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed (" + ", ".join(f"{grid} x{n}" for grid, n in sorted(counts.items())) + ")"


__all__ = ["SOFTMAX_GRIDS", "log_grid_name", "UNIFORM_ONLY_BITS", "UNIFORM_RANGES", "UNIFORM_FACTORS",
           "candidate_qparams", "CHOICE_IMAGES", "probability_maxima", "grid_qparams", "choose_softmax_grids",
           "grid_summary"]
