"""Float activation and weight statistics against the quantization grids: the clipping
range and step of a variant's qparams (:func:`grid_range`), histograms, percentiles and
clipped fractions of every tensor a quantizer sees, and histograms and SQNR of selected
weights. Every function returns JSON-safe data (:func:`~bvvit.io.json_safe`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from bvvit.evaluate.tensor_taps import (GROUPS, as_variants, distinct_twins, find_submodule, float_hooks,
                                        float_reference, float_twins, layer_of, model_device, quantizer_ids,
                                        take_batches, tensor_info)
from bvvit.io import json_safe
from bvvit.metrics import sqnr_db
from bvvit.quant.log2 import LogQParams
from bvvit.quant.modules import QuantConv2d, QuantLinear

DEFAULT_BINS = 120
PERCENTILES = (0.01, 0.1, 1.0, 50.0, 99.0, 99.9, 99.99)


# ------------------------------------------------------------------ grids

def grid_range(qparams: Any) -> dict[str, Any]:
    """Clipping range ``[(qmin - zp) * s, (qmax - zp) * s]`` and step of a QParams.

    Per-channel/group qparams give the union of the ranges (``lo``, ``hi``) and the median
    channel's range (``lo_median``, ``hi_median``); ``step`` is the median scale.
    """
    if isinstance(qparams, LogQParams):
        return _log_grid(qparams)
    scale = qparams.scale.detach().float().cpu().reshape(-1)
    zero_point = qparams.zero_point.detach().float().cpu().reshape(-1).expand_as(scale)
    lo = (qparams.qmin - zero_point) * scale
    hi = (qparams.qmax - zero_point) * scale
    step = float(scale.median())
    out = {"bits": int(qparams.bits), "symmetric": bool(qparams.symmetric), "method": "uniform",
           "granularity": "tensor" if scale.numel() == 1 else "channel",
           "lo": float(lo.min()), "hi": float(hi.max()), "step": step,
           "lo_median": float(lo.median()), "hi_median": float(hi.median()),
           # beyond these a value saturates (within half a step of the ends it only rounds)
           "saturate_lo": float(lo.min()) - step / 2, "saturate_hi": float(hi.max()) + step / 2}
    if scale.numel() == 1 and qparams.bits <= 5:  # few enough levels to draw each one
        levels = torch.arange(qparams.qmin, qparams.qmax + 1, dtype=torch.float32)
        out["levels"] = ((levels - zero_point[0]) * scale[0]).tolist()
    return out


def _log_grid(qparams: LogQParams) -> dict[str, Any]:
    """Levels ``scale * 2^(-c/k)`` and zero (see :mod:`bvvit.quant.log2`)."""
    scale, k = float(qparams.scale), qparams.steps_per_octave
    levels = [0.0] + [scale * 2.0 ** (-c / k) for c in range(qparams.zero_code - 1, -1, -1)]
    out = {"bits": int(qparams.bits), "symmetric": False, "method": f"log2 (k={k})", "granularity": "tensor",
           "lo": 0.0, "hi": scale, "step": scale - levels[-2], "lo_median": 0.0, "hi_median": scale,
           "saturate_lo": 0.0, "saturate_hi": scale * 2.0 ** (0.5 / k)}
    if qparams.bits <= 5:
        out["levels"] = levels
    return out


# ------------------------------------------------------------------ activation statistics

class _Running:
    """Exact min/max/mean/std and a bounded random sample of one tensor's values."""

    def __init__(self, sample_per_batch: int, generator: torch.Generator):
        self.count, self.total, self.total_sq = 0, 0.0, 0.0
        self.min, self.max = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []
        self.sample_per_batch = sample_per_batch
        self.generator = generator

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        wide = flat.double()
        self.count += flat.numel()
        self.total += float(wide.sum())
        self.total_sq += float((wide * wide).sum())
        self.min, self.max = min(self.min, float(flat.min())), max(self.max, float(flat.max()))
        if flat.numel() > self.sample_per_batch:
            flat = flat[torch.randint(flat.numel(), (self.sample_per_batch,), generator=self.generator)]
        self.samples.append(flat)


@torch.inference_mode()
def activation_statistics(fp_model: nn.Module, qmodel: nn.Module | Mapping[str, nn.Module] | None,
                          loader: Iterable, max_batches: Optional[int] = 4, bins: int = DEFAULT_BINS,
                          sample_size: int = 1 << 18, progress: bool = False) -> dict[str, Any]:
    """Histogram and statistics of every float tensor a quantizer sees, with the grids.

    ``qmodel``: one quantized model or ``{variant name: model}``; each variant's clipping
    range, step and clipped fraction is attached to the tensors it quantizes. Two passes
    over the first ``max_batches`` batches: exact min/max (and percentiles from a random
    sample of up to ``sample_size`` values per tensor), then exact ``bins``-bin histograms
    over [min, max] and the fraction of values outside each variant's range.

    A value is clipped when it lies more than half a step outside the grid (closer than
    that, its error is ordinary rounding). For a reparameterized variant the qkv/fc1/head
    inputs are counted on its float twin's tensor (the one its quantizer sees) and marked
    ``"reparameterized": true``: its range is not in the histogram's coordinates.

    Returns ``{"images", "bins", "groups": {key: label}, "tensors": [...]}``; tensors in
    execution order, each ``{"id", "layer", "kind", "group", "count", "min", "max", "mean",
    "std", "abs_max", "percentiles": {"99.9": ...}, "histogram": {"edges", "counts"},
    "quant": {variant: {"bits", "lo", "hi", "step", "granularity", "clipped_fraction", ...}}}``.
    """
    variants = as_variants(qmodel)
    reference = float_reference(fp_model)
    device = model_device(reference)
    images = take_batches(loader, max_batches)
    generator = torch.Generator().manual_seed(0)
    per_batch = max(1, sample_size // len(images))
    running: dict[str, _Running] = {}

    def first_pass(tid: str, x: torch.Tensor) -> None:
        running.setdefault(tid, _Running(per_batch, generator)).update(x)

    with float_hooks(reference, first_pass):
        for batch in tqdm(images, desc="activation statistics 1/3", disable=not progress, leave=False):
            reference(batch.to(device))

    ranges = {name: {tid: grid_range(q.qparams) for tid, q in quantizer_ids(model) if q.qparams is not None}
              for name, model in variants.items()}
    twins = float_twins(fp_model, variants, reference)
    edges = {tid: _edges(r.min, r.max, bins) for tid, r in running.items()}
    counts = {tid: torch.zeros(bins, dtype=torch.float64) for tid in running}
    clipped = {tid: {name: 0 for name in variants if tid in ranges[name]} for tid in running}

    def second_pass(tid: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        lo, hi = edges[tid][0], edges[tid][-1]
        counts[tid] += torch.histc(flat.clamp(lo, hi), bins, lo, hi).double()
        for name in clipped[tid]:
            if layer_of(tid) not in twins[name][1]:
                clipped[tid][name] += _count_clipped(flat, ranges[name][tid])

    def twin_pass(names: list[str]) -> Callable[[str, torch.Tensor], None]:
        def count(tid: str, x: torch.Tensor) -> None:
            flat = x.detach().reshape(-1).float().cpu()
            for name in names:
                if tid in clipped and name in clipped[tid]:
                    clipped[tid][name] += _count_clipped(flat, ranges[name][tid])
        return count

    with float_hooks(reference, second_pass):
        for batch in tqdm(images, desc="activation statistics 2/3", disable=not progress, leave=False):
            reference(batch.to(device))
    for twin, layers, names in distinct_twins(twins):
        with float_hooks(twin, twin_pass(names), layers):
            for batch in tqdm(images, desc="activation statistics 3/3", disable=not progress, leave=False):
                twin(batch.to(device))

    tensors = []
    for tid, r in running.items():  # insertion order = execution order
        sample = torch.cat(r.samples)
        mean = r.total / r.count
        quantiles = torch.quantile(sample.double(), torch.tensor(PERCENTILES, dtype=torch.float64) / 100)
        entry = {**tensor_info(tid), "count": r.count, "min": r.min, "max": r.max, "mean": mean,
                 "std": max(0.0, r.total_sq / r.count - mean * mean) ** 0.5,
                 "abs_max": max(abs(r.min), abs(r.max)),
                 "percentiles": {_pct_key(p): float(v) for p, v in zip(PERCENTILES, quantiles)},
                 "histogram": {"edges": edges[tid], "counts": [int(c) for c in counts[tid]]},
                 "quant": {}}
        for name, n_clipped in clipped[tid].items():
            entry["quant"][name] = {**ranges[name][tid], "clipped_fraction": n_clipped / r.count}
            if layer_of(tid) in twins[name][1]:
                entry["quant"][name]["reparameterized"] = True
        tensors.append(entry)
    return json_safe({"images": sum(int(b.shape[0]) for b in images), "bins": bins,
                      "sample_size": sample_size, "groups": GROUPS, "tensors": tensors})


def _count_clipped(flat: torch.Tensor, grid: dict[str, Any]) -> int:
    return int(((flat < grid["saturate_lo"]) | (flat > grid["saturate_hi"])).sum())


def _edges(lo: float, hi: float, bins: int) -> list[float]:
    if not hi > lo:  # a constant tensor still gets a visible bin
        pad = max(abs(lo) * 1e-3, 1e-6)
        lo, hi = lo - pad, hi + pad
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist()


def _pct_key(p: float) -> str:
    return f"{p:g}"


# ------------------------------------------------------------------ weights

def weight_layer_names(model: nn.Module) -> list[str]:
    """Every Linear/Conv2d (float or quantized wrapper) in registration (= data) order."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d))]


def default_weight_layers(model: nn.Module) -> list[str]:
    """A few representative layers: patch embedding, first and last block, head."""
    names = weight_layer_names(model)
    depth = len(getattr(model, "blocks", []))
    last = depth - 1
    wanted = ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc2",
              f"blocks.{last}.attn.proj", f"blocks.{last}.mlp.fc1", "head"]
    chosen = [name for name in dict.fromkeys(wanted) if name in names]
    return chosen or names[:6]


@torch.inference_mode()
def weight_statistics(fp_model: nn.Module, qmodels: nn.Module | Mapping[str, nn.Module] | None,
                      layers: Optional[list[str]] = None, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Histograms of selected float weights with each variant's grid and weight SQNR.

    SQNR and clipping are against each variant's float twin
    (:func:`~bvvit.evaluate.tensor_taps.float_twin`); a reparameterized layer is marked
    ``"reparameterized": true`` (its grid is not in the histogram's coordinates).

    Returns ``{"bins", "layers": [{"layer", "shape", "min", "max", "std", "histogram",
    "quant": {variant: {"bits", "lo", "hi", "lo_median", "hi_median", "step",
    "granularity", "levels"?, "sqnr_db", "clipped_fraction", "reparameterized"?}}}]}``.
    """
    variants = as_variants(qmodels)
    layers = default_weight_layers(fp_model) if layers is None else layers
    twins = float_twins(fp_model, variants, float_reference(fp_model))
    out = []
    for layer in layers:
        weight = fp_model.get_submodule(layer).weight.detach().float().cpu()
        flat = weight.reshape(-1)
        lo, hi = float(flat.min()), float(flat.max())
        edges = _edges(lo, hi, bins)
        counts = torch.histc(flat, bins, edges[0], edges[-1])
        out.append({"layer": layer, "shape": list(weight.shape), "min": lo, "max": hi,
                    "std": float(flat.std()) if flat.numel() > 1 else 0.0,
                    "histogram": {"edges": edges, "counts": [int(c) for c in counts]}, "quant": {}})
    for name in variants:  # one variant at a time (they may be loaded on demand)
        model = variants[name]
        twin, reparameterized = twins[name]
        for entry in out:
            layer = entry["layer"]
            module = find_submodule(model, layer)
            if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_qparams is not None:
                float_weight = twin.get_submodule(layer).weight.detach().float().cpu()
                grid = grid_range(module.weight_qparams)
                matrix = float_weight.reshape(float_weight.shape[0], -1)
                ch_lo, ch_hi = _saturation_limits(module.weight_qparams, matrix.shape[0])
                outside = ((matrix < ch_lo) | (matrix > ch_hi)).sum()
                entry["quant"][name] = {**grid, "sqnr_db": sqnr_db(float_weight, module.weight.detach().cpu()),
                                        "clipped_fraction": float(outside) / matrix.numel()}
                if layer in reparameterized:
                    entry["quant"][name]["reparameterized"] = True
    return json_safe({"bins": bins, "layers": out})


def _saturation_limits(qparams: Any, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (output channel) limits beyond which values clip (the grid ends plus half a
    step, inside which the error is ordinary rounding), shaped (rows, 1)."""
    scale = qparams.scale.detach().float().cpu()
    zero_point = qparams.zero_point.detach().float().cpu()
    lo = (qparams.qmin - zero_point - 0.5) * scale
    hi = (qparams.qmax - zero_point + 0.5) * scale
    if lo.numel() == 1:
        return lo.reshape(1, 1), hi.reshape(1, 1)
    if lo.numel() == rows:
        return lo.reshape(rows, 1), hi.reshape(rows, 1)
    # per-group: the row's widest group (so clipping is undercounted, never overcounted)
    return lo.reshape(rows, -1).amin(1, keepdim=True), hi.reshape(rows, -1).amax(1, keepdim=True)
