"""Logarithmic quantization for post-softmax attention probabilities.

Softmax outputs lie in [0, 1] and most of them are small: a uniform 4-bit grid (step
1/15) rounds nearly every probability of a 50-token attention row to 0. A log grid
spends its levels on magnitudes instead (PTQ4ViT / RepQ-ViT use base 2 and base sqrt 2)::

    r    = x / scale                               (scale = calibrated maximum, ~1)
    code = clamp(round(-k * log2(r)), 0, L - 1)    L = 2^bits - 1 non-zero levels
    x'   = scale * 2^(-code / k)                   k = 1 (log2), 2 (log sqrt2), 4, 8, 16
    x'   = 0 where r < (smallest level) / 2        the last code (2^bits - 1) means 0

``k`` is chosen per tensor by calibration MSE (more bits favour finer grids). Codes fit
``bits`` bits exactly. At 8 bits and above a uniform grid has the lower error on softmax
outputs, so the ``vit`` recipe uses the log grid only up to 6 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bvvit.quant.observers import MSEObserver
from bvvit.quant.primitives import PerTensor, QParams

STEPS_PER_OCTAVE = (1, 2, 4, 8, 16)  # log2, log sqrt2, ...: finer grids for more bits


@dataclass(eq=False)
class LogQParams:
    """Qparams of a log-domain quantizer: ``scale`` (0-d float32) and ``k``."""

    scale: Tensor
    bits: int
    steps_per_octave: int = 1
    symmetric: bool = False  # interface parity with QParams
    granularity: Any = PerTensor()

    @property
    def zero_code(self) -> int:
        return 2 ** self.bits - 1

    @property
    def zero_point(self) -> Tensor:  # interface parity; log codes have no zero point
        return torch.zeros((), dtype=torch.int32)

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return self.zero_code

    def quantize(self, x: Tensor) -> Tensor:
        k = self.steps_per_octave
        ratio = (x.float() / self.scale).clamp(min=0.0)
        smallest = 2.0 ** (-(self.zero_code - 1) / k)
        code = torch.round(-k * torch.log2(ratio.clamp(min=1e-30))).clamp(0, self.zero_code - 1)
        code = torch.where(ratio < smallest / 2, torch.full_like(code, self.zero_code), code)
        return code.to(torch.int32)

    def dequantize(self, q: Tensor) -> Tensor:
        value = self.scale * torch.exp2(-q.float() / self.steps_per_octave)
        return torch.where(q == self.zero_code, torch.zeros_like(value), value)

    def fake_quantize(self, x: Tensor) -> Tensor:
        out = self.dequantize(self.quantize(x)).to(x.dtype)
        return x + (out - x).detach()  # straight-through gradient

    def to(self, device: torch.device | str) -> "LogQParams":
        return LogQParams(self.scale.to(device), self.bits, self.steps_per_octave)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "log2", "scale": float(self.scale), "bits": self.bits,
                "steps_per_octave": self.steps_per_octave}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LogQParams":
        return cls(torch.tensor(data["scale"], dtype=torch.float32), int(data["bits"]),
                   int(data["steps_per_octave"]))


def qparams_from_dict(data: dict[str, Any]) -> QParams | LogQParams:
    """Rebuild uniform or log qparams from their ``to_dict()`` form."""
    return LogQParams.from_dict(data) if data.get("type") == "log2" else QParams.from_dict(data)


class Log2Observer(MSEObserver):
    """Keeps a reservoir like the MSE observer; the scale is the maximum, and of the bases
    2^(1/k), k in :data:`STEPS_PER_OCTAVE`, it picks the one with the lowest quantization
    error on the reservoir."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("symmetric", None)
        kwargs["granularity"] = PerTensor()
        super().__init__(symmetric=False, **kwargs)

    def compute_qparams(self, bits: int) -> LogQParams:  # type: ignore[override]
        if self.num_batches == 0 or self.max_val is None or self.reservoir is None:
            raise RuntimeError("Log2Observer.compute_qparams called before any update()")
        scale = torch.clamp(self.max_val.reshape(()).float(), min=1e-8)
        data = self.reservoir.flatten()
        best, best_err = None, math.inf
        for k in STEPS_PER_OCTAVE:
            candidate = LogQParams(scale, bits, k)
            err = float(((candidate.dequantize(candidate.quantize(data)) - data) ** 2).sum())
            if err < best_err:
                best, best_err = candidate, err
        assert best is not None
        return best
