"""The grid of each attention-softmax quantizer, chosen per model by calibration error
(``softmax.method = "auto"``, the ``vit`` recipe's default).

Which grid suits attention probabilities depends on the model and the width: at 17 tokens
and 4 bits a log-sqrt2 grid beats log2, at 8 bits a uniform grid beats both, and at 197
tokens (many small probabilities) the answer differs block by block. So after calibration
every softmax quantizer tries the three grids on the calibration images and keeps the one
with the lowest relative error of what the probabilities are used for::

    error(grid) = |Q_grid(P) v - P v|^2 / |P v|^2       summed over images, heads, tokens

with ``P`` the softmax of the (quantized) scores and ``v`` the quantized values it
multiplies. Candidates: ``uniform`` (the calibrated qparams), ``log2`` and ``log-sqrt2``
(:class:`bvvit.quant.log2.LogQParams` with 1 or 2 steps per octave, scale = the largest
observed probability). Cost: one forward pass over ``max_images`` images.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from bvvit.quant.log2 import LogQParams
from bvvit.quant.modules import ActQuantizer, QuantSoftmax

SOFTMAX_GRIDS = {"uniform": None, "log2": 1, "log-sqrt2": 2}  # name -> steps per octave (None: uniform)
CHOICE_IMAGES = 64  # calibration images the choice is measured on


@torch.no_grad()
def attention_samples(qmodel: nn.Module, loader: Iterable, max_images: int,
                      device: torch.device | str = "cpu") -> dict[str, list[tuple[Tensor, Tensor]]]:
    """{softmax module name: [(probabilities P, the quantized v they multiply), one per batch]}
    over the first ``max_images`` images of ``loader``. P is the float softmax of the scores
    the quantized softmax receives."""
    samples: dict[str, list[tuple[Tensor, Tensor]]] = {}
    pending: dict[str, Tensor] = {}
    handles = []
    for name, module in qmodel.named_modules():
        if not isinstance(module, QuantSoftmax):
            continue
        matmul = qmodel.get_submodule(name.rsplit(".", 1)[0] + ".matmul_av")

        def keep_p(mod: nn.Module, inputs: tuple, output: Tensor, name: str = name) -> None:
            pending[name] = inputs[0].softmax(dim=mod.dim)

        def keep_v(mod: nn.Module, inputs: tuple, output: Tensor, name: str = name) -> None:
            quantizer = getattr(mod, "quantizer_b", None)
            v = inputs[1] if quantizer is None else quantizer(inputs[1])
            samples.setdefault(name, []).append((pending.pop(name), v))

        handles += [module.register_forward_hook(keep_p), matmul.register_forward_hook(keep_v)]
    try:
        seen = 0
        for images, _ in loader:
            if seen >= max_images:
                break
            images = images[:max_images - seen].to(device)
            qmodel(images)
            seen += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return samples


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
    {"choice": grid, "errors": {grid: relative error}}}."""
    chosen: dict[str, dict[str, Any]] = {}
    for name, pairs in attention_samples(qmodel, loader, max_images, device).items():
        quantizer = qmodel.get_submodule(name).output_quantizer
        p_max = max(float(p.max()) for p, _ in pairs)
        reference = sum(float((p @ v).pow(2).sum()) for p, v in pairs)
        errors = {}
        for grid in SOFTMAX_GRIDS:
            qparams = grid_qparams(quantizer, grid, p_max)
            errors[grid] = sum(float((qparams.fake_quantize(p) @ v - p @ v).pow(2).sum())
                               for p, v in pairs) / max(reference, 1e-30)
        best = min(errors, key=errors.__getitem__)
        quantizer.set_qparams(grid_qparams(quantizer, best, p_max))
        chosen[name] = {"choice": best, "errors": errors}
    return chosen


def grid_summary(chosen: dict[str, dict[str, Any]]) -> str:
    """One word for the summary: the grid every block chose, or ``mixed (log2 x4, uniform x2)``."""
    counts: dict[str, int] = {}
    for record in chosen.values():
        counts[record["choice"]] = counts.get(record["choice"], 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed (" + ", ".join(f"{grid} x{n}" for grid, n in sorted(counts.items())) + ")"


__all__ = ["SOFTMAX_GRIDS", "CHOICE_IMAGES", "attention_samples", "grid_qparams", "choose_softmax_grids",
           "grid_summary"]
