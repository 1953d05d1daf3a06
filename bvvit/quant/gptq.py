"""GPTQ-style weight rounding: quantize a Linear's weight one input column at a time and
push each column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian of the layer's reconstruction error ``H = 2 X^T X / n`` (X: the layer's
calibration inputs). Scales and zero points are fixed beforehand (by the weight
observer); GPTQ only chooses the integer codes. Dampening (a fraction of the mean
diagonal added to H) keeps the Cholesky factorisation stable; act-order processes
columns with large Hessian diagonals (important inputs) first.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from bvvit.quant.input_stats import MAX_HESSIAN_ROWS, input_statistics
from bvvit.quant.primitives import PerGroup, QParams


@torch.no_grad()
def input_hessians(model: nn.Module, loader: Iterable, names: list[str],
                   device: torch.device | str = "cpu", max_rows: int = MAX_HESSIAN_ROWS,
                   seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` of each named Linear's input rows over ``loader`` (float64), from
    at most about ``max_rows`` rows per layer (:mod:`bvvit.quant.input_stats`)."""
    stats = input_statistics(model, loader, moment_names=names, device=device, max_rows=max_rows,
                             seed=seed, progress=progress, desc="GPTQ Hessians")
    # each in place of its sums (ViT-B/16: 1.1 GB in all, held once)
    return {name: stats.moments.pop(name).hessian() for name in list(stats.moments)}


def _column_qparams(qp: QParams, column: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of one input column, shaped (out,)."""
    if isinstance(qp.granularity, PerGroup):
        g = column // qp.granularity.group_size
        return qp.scale[:, g, 0], qp.zero_point[:, g, 0]
    scale = qp.scale.reshape(-1) if qp.scale.dim() else qp.scale.expand(1)
    zp = qp.zero_point.reshape(-1) if qp.zero_point.dim() else qp.zero_point.expand(1)
    return scale, zp


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, qp: QParams, damp: float = 0.01,
               block_size: int = 128, act_order: bool = True) -> torch.Tensor:
    """Integer codes (int32, ``weight``'s (out, in) shape) chosen by GPTQ."""
    W = weight.detach().double().clone()  # (out, in)
    H = hessian.double().clone()  # (in, in)
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=H.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype, device=H.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:  # fall back to more dampening
        H += 0.1 * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype, device=H.device)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W, dtype=torch.int32)
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        W1 = W[:, start:end].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        for i in range(end - start):
            column = int(perm[start + i])
            scale, zp = _column_qparams(qp, column)
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale.double()) + zp.double(), qp.qmin, qp.qmax)
            codes[:, start + i] = q.to(torch.int32)
            dequant = (q - zp.double()) * scale.double()
            err = (w - dequant) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    inverse = torch.argsort(perm)
    return codes[:, inverse]
