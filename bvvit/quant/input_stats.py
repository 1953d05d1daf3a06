"""What the recipe needs to know about the inputs of a float model's layers, from ONE pass
over the calibration images: per-channel (min, max) (LayerNorm reparameterization) and
second moments (GPTQ Hessians).

The second moments are kept centred on the first batch's channel means ``c``:

    A = sum (x - c)(x - c)^T,   s = sum (x - c),   n rows,

so that the Hessian of any per-channel affine change of the input, ``x' = (x - d) / r``,
follows from them without another pass (``e = c - d``):

    sum x' x'^T = R^-1 (A + s e^T + e s^T + n e e^T) R^-1.

That is what lets one float pass serve both the reparameterization (which chooses ``r``
and ``d`` from the ranges) and GPTQ on the reparameterized model. Centring also keeps the
float32 products of a row sample accurate when channel means are large.

At most about ``max_rows`` rows (images x tokens) per layer enter the moments: when the
loader holds more (a ViT-B/16 at 1,024 images has 201,728 rows per layer, and x^T x of its
fc2 input would cost ~4 TFLOP in float64 per layer), each batch contributes a seeded
uniform subset of its rows in proportion, its products taken in float32 (the sample's
error dwarfs their rounding) and summed in float64. Fewer rows than ``max_rows`` are all
used, in float64. The ranges always see every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from bvvit.quant.hooks import run_with_hooks

MAX_HESSIAN_ROWS = 1 << 15  # input rows per layer that enter the second moments


@dataclass
class InputMoments:
    """Centred second moments of one layer's input rows (see the module docstring)."""

    center: torch.Tensor  # (C,) the first batch's channel means, in the products' dtype
    gram: torch.Tensor  # (C, C) float64: sum of (x - c)(x - c)^T
    total: torch.Tensor  # (C,) float64: sum of (x - c)
    rows: int = 0

    @classmethod
    def start(cls, x: torch.Tensor) -> "InputMoments":
        channels = x.shape[1]
        return cls(x.mean(0), torch.zeros(channels, channels, dtype=torch.float64, device=x.device),
                   torch.zeros(channels, dtype=torch.float64, device=x.device))

    def add(self, x: torch.Tensor) -> None:
        """Add rows ``x`` (rows, C): float32 products for a sample, float64 for exact sums."""
        centred = x.to(self.center.dtype) - self.center
        self.gram += (centred.T @ centred).double()
        self.total += centred.sum(0, dtype=torch.float64)
        self.rows += x.shape[0]

    def hessian(self, shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """GPTQ's ``2/n sum x'x'^T`` (float64) for ``x' = (x - shift) / scale`` (identity
        when None). Consumes the moments: ``gram`` becomes the result (no second
        (C, C) buffer; ViT-B/16's fc2 input has 3,072 channels)."""
        e = self.center.double() - (shift.double() if shift is not None else 0.0)
        h = self.gram
        h.add_(torch.outer(self.total, e)).add_(torch.outer(e, self.total)).add_(torch.outer(e, e), alpha=self.rows)
        if scale is not None:
            inverse = 1.0 / scale.double()
            h.mul_(inverse.unsqueeze(0)).mul_(inverse.unsqueeze(1))
        h.mul_(2.0 / self.rows)
        self.gram = torch.empty(0, dtype=torch.float64)
        return h


@dataclass
class InputStatistics:
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    moments: dict[str, InputMoments] = field(default_factory=dict)


@torch.no_grad()
def input_statistics(model: nn.Module, loader: Iterable, range_names: Iterable[str] = (),
                     moment_names: Iterable[str] = (), device: torch.device | str = "cpu",
                     max_rows: int = MAX_HESSIAN_ROWS, seed: int = 0, progress: bool = False,
                     desc: str = "float statistics") -> InputStatistics:
    """Per-channel input ranges of ``range_names`` and input moments of ``moment_names``
    (named modules of ``model``) from one pass over ``loader``."""
    range_names, moment_names = set(range_names), set(moment_names)
    stats = InputStatistics()
    num_images = len(getattr(loader, "dataset", ())) or None
    generator = torch.Generator().manual_seed(seed)

    def record(name: str, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach()
        tokens = x.shape[1] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1])
        if name in range_names:
            flat = x.float()
            lo, hi = flat.min(dim=0).values, flat.max(dim=0).values
            if name in stats.ranges:
                old_lo, old_hi = stats.ranges[name]
                lo, hi = torch.minimum(old_lo, lo), torch.maximum(old_hi, hi)
            stats.ranges[name] = (lo, hi)
        if name in moment_names:
            if num_images is not None and num_images * tokens > max_rows:
                keep = max(1, math.ceil(x.shape[0] * max_rows / (num_images * tokens)))
                rows = torch.randperm(x.shape[0], generator=generator)[:keep].sort().values
                x = x[rows.to(x.device)].float()
            else:
                x = x.double()  # every row, exact in float64
            if name not in stats.moments:
                stats.moments[name] = InputMoments.start(x)
            stats.moments[name].add(x)

    names = [name for name, _ in model.named_modules() if name in range_names | moment_names]
    run_with_hooks(model, loader, names, record, device, progress, desc=desc)
    return stats


def linear_names(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` of ``model`` (the layers GPTQ may round)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
