"""Calibration observers: explicit statistics, then qparams.

An observer never acts on its own: the caller feeds tensors with :meth:`Observer.update`
(no grad, accumulates) and asks for :meth:`Observer.compute_qparams` once calibration is
over.  Statistics follow the observer's granularity (see :mod:`bvvit.quant.primitives`):

* ``PerTensor()``: one range for everything seen.
* ``PerChannel(axis)``: one range per index of ``axis``, every other dim reduced, so
  ``PerChannel(axis=-1)`` gives per-channel ranges of (B, N, C) activations whatever B
  and N are, and ``PerChannel(axis=0)`` per-output-channel ranges of a weight.
* ``PerGroup(g, axis)``: every other dim is kept (torchao's block semantics): one range
  per row and group of a weight; a shape change raises ValueError.  With
  ``reduce_other_dims=True`` the other dims are reduced as for ``PerChannel``: one range
  per channel group of (B, N, C) activations, shared by all tokens and batches.

``make_observer("minmax" | "ema_minmax" | "percentile" | "mse", **kwargs)`` builds one
by name.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from bvvit.quant.primitives import (
    Granularity,
    PerTensor,
    QParams,
    choose_qparams,
    qrange,
    reduce_minmax,
    to_rows,
)

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "OBSERVERS",
    "make_observer",
]


class Observer:
    """Base class: ``update(x)`` accumulates statistics, ``compute_qparams(bits)`` reads them.

    Subclasses implement ``_update(x)`` (``x`` is detached float32, non-empty),
    ``_minmax()`` (the range to quantize, shaped like :func:`reduce_minmax` output) and
    ``reset()``.
    """

    def __init__(
        self, granularity: Granularity = PerTensor(), symmetric: bool = False, reduce_other_dims: bool = False
    ) -> None:
        self.granularity = granularity
        self.symmetric = symmetric
        self.reduce_other_dims = reduce_other_dims  # PerGroup only; see the module docstring
        self.num_batches = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything observed."""
        self.num_batches = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Accumulate statistics of ``x`` (any shape the granularity accepts)."""
        if x.numel() == 0:
            return
        self._update(x.detach().to(torch.float32))
        self.num_batches += 1

    def compute_qparams(self, bits: int) -> QParams:
        """Qparams for ``bits`` from what was observed so far."""
        qrange(bits, self.symmetric)  # validate before any work
        if self.num_batches == 0:
            raise RuntimeError(f"{type(self).__name__}.compute_qparams called before any update()")
        min_val, max_val = self._minmax(bits)
        scale, zero_point = choose_qparams(min_val, max_val, bits, self.symmetric)
        return QParams(scale, zero_point, bits, self.symmetric, self.granularity)

    def _update(self, x: Tensor) -> None:
        raise NotImplementedError

    def _minmax(self, bits: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_shape(self, old: Optional[Tensor], new: Tensor) -> None:
        if old is not None and old.shape != new.shape:
            raise ValueError(
                f"{type(self).__name__} with {self.granularity} got statistics of shape "
                f"{tuple(new.shape)} after {tuple(old.shape)}; the observed tensors must agree"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(granularity={self.granularity}, symmetric={self.symmetric})"


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything seen."""

    def reset(self) -> None:
        super().reset()
        self.min_val: Optional[Tensor] = None
        self.max_val: Optional[Tensor] = None

    def _update(self, x: Tensor) -> None:
        cur_min, cur_max = reduce_minmax(x, self.granularity, self.reduce_other_dims)
        self._check_shape(self.min_val, cur_min)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = cur_min, cur_max
        else:
            self.min_val = torch.minimum(self.min_val, cur_min)
            self.max_val = torch.maximum(self.max_val, cur_max)

    def _minmax(self, bits: int) -> tuple[Tensor, Tensor]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min / max (torch's formula).

    The first batch sets the range; later ones move it by
    ``averaging_constant * (batch_value - running_value)``.
    """

    def __init__(
        self,
        granularity: Granularity = PerTensor(),
        symmetric: bool = False,
        averaging_constant: float = 0.01,
        reduce_other_dims: bool = False,
    ) -> None:
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant
        super().__init__(granularity, symmetric, reduce_other_dims)

    def _update(self, x: Tensor) -> None:
        cur_min, cur_max = reduce_minmax(x, self.granularity, self.reduce_other_dims)
        self._check_shape(self.min_val, cur_min)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = cur_min, cur_max
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (cur_min - self.min_val)
            self.max_val = self.max_val + c * (cur_max - self.max_val)


def _row_quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row quantile of (R, M) ``rows`` with linear interpolation (as ``torch.quantile``).

    Uses ``topk`` for tails and ``kthvalue`` otherwise, so it has no size limit
    (``torch.quantile`` refuses inputs above 2^24 elements).
    """
    m = rows.shape[1]
    pos = q * (m - 1)
    lo = min(int(math.floor(pos)), m - 1)
    hi = min(lo + 1, m - 1)
    frac = pos - lo
    need_top, need_bottom = m - lo, hi + 1  # how many values topk must return
    if min(need_top, need_bottom) <= max(1024, m // 16):
        if need_top <= need_bottom:  # descending order: rank r sits at m - 1 - r
            top = torch.topk(rows, need_top, dim=1, largest=True, sorted=True).values
            v_lo, v_hi = top[:, m - 1 - lo], top[:, m - 1 - hi]
        else:
            bottom = torch.topk(rows, need_bottom, dim=1, largest=False, sorted=True).values
            v_lo, v_hi = bottom[:, lo], bottom[:, hi]
    else:
        v_lo = torch.kthvalue(rows, lo + 1, dim=1).values
        v_hi = v_lo if hi == lo else torch.kthvalue(rows, hi + 1, dim=1).values
    return torch.lerp(v_lo, v_hi, frac)


class PercentileObserver(Observer):
    """Per-batch percentile range, averaged over batches.

    Asymmetric: the ``(100 - p)``-th and ``p``-th percentiles of the values; symmetric:
    the ``p``-th percentile of ``|x|`` as ``(-a, a)``.  Exact for any tensor size.
    """

    def __init__(
        self,
        granularity: Granularity = PerTensor(),
        symmetric: bool = False,
        percentile: float = 99.99,
        reduce_other_dims: bool = False,
    ) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        super().__init__(granularity, symmetric, reduce_other_dims)

    def reset(self) -> None:
        super().reset()
        self.min_sum: Optional[Tensor] = None
        self.max_sum: Optional[Tensor] = None

    def _update(self, x: Tensor) -> None:
        rows, stat_shape = to_rows(x, self.granularity, self.reduce_other_dims)
        q = self.percentile / 100.0
        if self.symmetric:
            cur_max = _row_quantile(rows.abs(), q).reshape(stat_shape)
            cur_min = -cur_max
        else:
            cur_min = _row_quantile(rows, 1.0 - q).reshape(stat_shape)
            cur_max = _row_quantile(rows, q).reshape(stat_shape)
        self._check_shape(self.min_sum, cur_min)
        if self.min_sum is None or self.max_sum is None:
            self.min_sum, self.max_sum = cur_min, cur_max
        else:
            self.min_sum = self.min_sum + cur_min
            self.max_sum = self.max_sum + cur_max

    def _minmax(self, bits: int) -> tuple[Tensor, Tensor]:
        assert self.min_sum is not None and self.max_sum is not None
        return self.min_sum / self.num_batches, self.max_sum / self.num_batches


class MSEObserver(Observer):
    """OMSE: the clipping range ``alpha * (min, max)`` that minimises ``sum |x - fq(x)|^p``.

    Candidates are ``alpha = k / num_candidates`` for ``k = num_candidates .. 1``
    (ties keep the widest range, so the result is never worse than min-max on the kept
    data), searched at the bits asked for in :meth:`compute_qparams`, for every row
    (channel / group) at once.  The min/max are exact over everything seen; the error
    is measured on a deterministic reservoir sample of at most
    ``min(max_samples_per_row, max_total_samples // rows)`` values per row (weights of
    usual sizes are kept whole).
    """

    def __init__(
        self,
        granularity: Granularity = PerTensor(),
        symmetric: bool = False,
        num_candidates: int = 100,
        p: float = 2.0,
        max_samples_per_row: int = 2**18,
        max_total_samples: int = 2**24,
        seed: int = 0,
        reduce_other_dims: bool = False,
    ) -> None:
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.num_candidates = num_candidates
        self.p = p
        self.max_samples_per_row = max_samples_per_row
        self.max_total_samples = max_total_samples
        self.seed = seed
        super().__init__(granularity, symmetric, reduce_other_dims)

    def reset(self) -> None:
        super().reset()
        self.min_val: Optional[Tensor] = None
        self.max_val: Optional[Tensor] = None
        self.reservoir: Optional[Tensor] = None  # (R, <= capacity)
        self.num_seen = 0  # values seen per row
        self._generator = torch.Generator().manual_seed(self.seed)

    def _update(self, x: Tensor) -> None:
        cur_min, cur_max = reduce_minmax(x, self.granularity, self.reduce_other_dims)
        self._check_shape(self.min_val, cur_min)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = cur_min, cur_max
        else:
            self.min_val = torch.minimum(self.min_val, cur_min)
            self.max_val = torch.maximum(self.max_val, cur_max)
        rows, _ = to_rows(x, self.granularity, self.reduce_other_dims)
        self._add_to_reservoir(rows)

    def _add_to_reservoir(self, rows: Tensor) -> None:
        """Keep a uniform sample of at most ``capacity`` values per row, at a cost that
        grows with the capacity, not with the values seen (no random number per value).

        While everything seen fits, everything is kept. Afterwards each batch is merged
        with the kept sample in proportion to how many values each stands for: a uniform
        draw of ``capacity * m / (seen + m)`` of the batch's ``m`` columns and a uniform
        draw of the rest from the kept sample (stratified by batch; all rows share the
        column choices). Draws come from the observer's seeded generator.
        """
        num_rows, m = rows.shape
        capacity = max(1, min(self.max_samples_per_row, self.max_total_samples // num_rows))
        if self.reservoir is None:
            self.reservoir = rows.new_empty(num_rows, 0)
        kept = self.reservoir.shape[1]
        if self.num_seen == kept and kept + m <= capacity:
            self.reservoir = torch.cat([self.reservoir, rows], dim=1)
        else:
            total = self.num_seen + m
            take_new = min(m, max(1, round(capacity * m / total)))
            take_old = min(kept, capacity - take_new)
            old_cols = _sample_columns(kept, take_old, self._generator).to(rows.device)
            new_cols = _sample_columns(m, take_new, self._generator).to(rows.device)
            self.reservoir = torch.cat([self.reservoir[:, old_cols], rows[:, new_cols]], dim=1)
        self.num_seen += m

    def _minmax(self, bits: int) -> tuple[Tensor, Tensor]:
        """The best ``alpha`` per row, searched on row chunks that stay in the CPU cache
        (rows are independent) with in-place temporaries: the same arithmetic as
        ``|x - fake_quantize(x)|^p`` summed in float64."""
        assert self.min_val is not None and self.max_val is not None and self.reservoir is not None
        data = self.reservoir  # (R, S)
        row_min = self.min_val.reshape(-1, 1)
        row_max = self.max_val.reshape(-1, 1)
        alphas = torch.ones_like(row_min)
        rows_per_chunk = max(1, _SEARCH_CHUNK_VALUES // max(1, data.shape[1]))
        for start in range(0, data.shape[0], rows_per_chunk):
            end = start + rows_per_chunk
            alphas[start:end] = self._best_alpha(data[start:end], row_min[start:end], row_max[start:end], bits)
        shape = self.min_val.shape
        return (alphas * row_min).reshape(shape), (alphas * row_max).reshape(shape)

    def _best_alpha(self, data: Tensor, row_min: Tensor, row_max: Tensor, bits: int) -> Tensor:
        """(rows, 1) clipping factor with the least error for each row of ``data``."""
        qmin, qmax = qrange(bits, self.symmetric)
        best_err = torch.full((data.shape[0], 1), math.inf, dtype=torch.float64, device=data.device)
        best_alpha = torch.ones_like(row_min)
        work = torch.empty_like(data)
        for k in range(self.num_candidates, 0, -1):
            alpha = torch.tensor(k / self.num_candidates, dtype=torch.float32, device=data.device)
            scale, zero_point = choose_qparams(alpha * row_min, alpha * row_max, bits, self.symmetric)
            zp = zero_point.to(torch.float32)
            # fake_quantize(data) - data: round(x * (1 / scale)) + zp, clamp, - zp, * scale
            torch.mul(data, 1.0 / scale, out=work)
            work.round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale).sub_(data)
            powered = work.mul_(work) if self.p == 2.0 else work.abs_().pow_(self.p)
            err = powered.sum(dim=1, keepdim=True, dtype=torch.float64)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_alpha = torch.where(better, alpha, best_alpha)
        return best_alpha


_SEARCH_CHUNK_VALUES = 1 << 16  # values per row chunk of the MSE search (fits in L2 cache)


def _sample_columns(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` column indices drawn uniformly from ``range(n)``: without replacement (a
    permutation) when ``n <= 8 k``; with replacement above that (duplicates are rare, about
    ``k / 2n`` of the draws, and a permutation of a 30M-value tensor is what this avoids)."""
    if k >= n:
        return torch.arange(n)
    if n <= 8 * k:
        return torch.randperm(n, generator=generator)[:k]
    return torch.randint(n, (k,), generator=generator)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema_minmax": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, **kwargs: Any) -> Observer:
    """Build an observer by name: ``minmax``, ``ema_minmax``, ``percentile`` or ``mse``."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; valid: {', '.join(sorted(OBSERVERS))}") from None
    return cls(**kwargs)
