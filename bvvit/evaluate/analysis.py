"""What quantization does inside the model: activation and weight statistics against the
quantization grids, per-tensor SQNR across bit depths, and (``--analysis full``) per-layer
sensitivity (:mod:`bvvit.evaluate.sensitivity`).

Every function returns JSON-safe data (:func:`json_safe`: ``inf`` becomes ``"inf"``);
nothing here draws (:mod:`bvvit.report.plots` does).

Tensors are named ``"<module>:<kind>"``: the module a quantizer sits on and the quantizer's
kind, e.g. ``blocks.0.attn.qkv:linear_input``, ``blocks.0.attn.matmul_qk:q``,
``blocks.0.attn.softmax:softmax``, ``blocks.0.residual2:residual``, ``patch_embed.proj:image``.
The float tensors come from a copy of the FP model on its explicit attention path, hooked
at the same places where :func:`bvvit.quant.quantize.convert` puts quantizers, so every
tensor (the residual stream too) is seen even when a variant leaves it float. A variant
whose LayerNorms were reparameterized (``reparam_layernorm``, exact in float) is compared
with its "float twin": the FP model with the same change folded in (:func:`float_twin`),
so its qkv/fc1/head inputs are compared in the coordinates its quantizers work in.

Levels (``--analysis``): ``none`` runs nothing; ``basic`` (default) adds activation and
weight statistics and per-tensor SQNR on ``max_batches`` evaluation batches (seconds);
``full`` also ranks layers by sensitivity (minutes; see :func:`sensitivity`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from bvvit.evaluate.classification import json_safe, sqnr_db
from bvvit.evaluate.sensitivity import overrides_cli, sensitivity, suggest_overrides
from bvvit.model import Add, MatMul, Softmax
from bvvit.quant.log2 import LogQParams
from bvvit.quant.modules import ActQuantizer, QuantConv2d, QuantLinear, act_quantizers
from bvvit.quant.reparam import fold_channel_affine, norm_linear_pairs

ANALYSIS_LEVELS = ("none", "basic", "full")
DEFAULT_BINS = 120
PERCENTILES = (0.01, 0.1, 1.0, 50.0, 99.0, 99.9, 99.99)

# Tensor groups, in the order a report shows them.
GROUPS = {
    "image": "image / patch input",
    "post_layernorm": "post-LayerNorm (qkv, fc1, head inputs)",
    "qkv": "attention q, k, v",
    "softmax": "softmax output (attention probabilities)",
    "attn_out": "attention output (proj input)",
    "post_gelu": "post-GELU (fc2 input)",
    "residual": "residual stream (Add outputs)",
}


def tensor_group(layer: str, kind: str) -> str:
    """The :data:`GROUPS` key of tensor ``layer:kind``."""
    if kind in ("q", "k", "v"):
        return "qkv"
    if kind in ("image", "softmax", "residual"):
        return kind
    leaf = layer.rsplit(".", 1)[-1]
    if leaf == "fc2":
        return "post_gelu"
    if leaf == "proj" and ".attn." in f".{layer}":
        return "attn_out"
    return "post_layernorm"  # qkv, fc1 and head read LayerNorm outputs


def _tensor_info(tensor_id: str) -> dict[str, str]:
    layer, _, kind = tensor_id.rpartition(":")
    return {"id": tensor_id, "layer": layer, "kind": kind, "group": tensor_group(layer, kind)}


# ------------------------------------------------------------------ hooks and inputs

def float_reference(fp_model: nn.Module) -> nn.Module:
    """A copy of the FP model on the explicit attention path (the input is untouched)."""
    reference = copy.deepcopy(fp_model).eval()
    if hasattr(reference, "set_fused_attn"):
        reference.set_fused_attn(False)
    return reference


def float_twin(fp_model: nn.Module, qmodel: nn.Module, reference: Optional[nn.Module] = None
               ) -> tuple[nn.Module, set[str]]:
    """The float model a variant's tensors are compared with, and the Linear layers whose
    inputs differ from the plain FP model's.

    ``reference`` (:func:`float_reference`) when ``qmodel`` carries no LayerNorm
    reparameterization; otherwise a copy with the same per-channel change ``y = r y' + d``
    folded in (r and d recovered from the two LayerNorms' affines), which equals the FP
    model in float and matches the variant's quantizer inputs.
    """
    reference = reference if reference is not None else float_reference(fp_model)
    if not hasattr(reference, "blocks"):
        return reference, set()
    changed: list[tuple[str, str]] = []
    for norm_name, linear_name in norm_linear_pairs(reference):
        fp_norm, q_norm = reference.get_submodule(norm_name), _get(qmodel, norm_name)
        if not isinstance(q_norm, nn.LayerNorm) or q_norm.weight is None:
            continue
        if not (torch.equal(fp_norm.weight, q_norm.weight.to(fp_norm.weight.device)) and
                torch.equal(fp_norm.bias, q_norm.bias.to(fp_norm.bias.device))):
            changed.append((norm_name, linear_name))
    if not changed:
        return reference, set()
    twin = copy.deepcopy(reference)
    with torch.no_grad():
        for norm_name, linear_name in changed:
            norm, q_norm = twin.get_submodule(norm_name), qmodel.get_submodule(norm_name)
            gamma = q_norm.weight.detach().to(norm.weight)
            r = torch.where(gamma != 0, norm.weight / gamma, torch.ones_like(gamma))
            d = norm.bias - r * q_norm.bias.detach().to(norm.bias)
            fold_channel_affine(norm, twin.get_submodule(linear_name), r, d)
    return twin, {linear for _, linear in changed}


def _twins(fp_model: nn.Module, variants: Mapping[str, nn.Module], reference: nn.Module
           ) -> dict[str, tuple[nn.Module, set[str]]]:
    """:func:`float_twin` of every variant; variants with the same LayerNorms share one."""
    out: dict[str, tuple[nn.Module, set[str]]] = {}
    seen: dict[str, tuple[nn.Module, set[str]]] = {}
    for name, model in variants.items():
        digest = hashlib.sha1()
        for norm_name, _ in norm_linear_pairs(reference) if hasattr(reference, "blocks") else []:
            norm = _get(model, norm_name)
            if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
                digest.update(norm.weight.detach().cpu().numpy().tobytes())
                digest.update(norm.bias.detach().cpu().numpy().tobytes())
        key = digest.hexdigest()
        if key not in seen:
            seen[key] = float_twin(fp_model, model, reference)
        out[name] = seen[key]
    return out


def _tap_points(model: nn.Module) -> Iterator[tuple[str, nn.Module, Optional[int], str]]:
    """(module name, module, input index or None for the output, kind): where
    :func:`~bvvit.quant.quantize.convert` places quantizers, on the float model."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module, 0, "linear_input"
        elif isinstance(module, nn.Conv2d):
            yield name, module, 0, "image"
        elif isinstance(module, MatMul):
            if name.endswith("matmul_qk"):
                yield name, module, 0, "q"
                yield name, module, 1, "k"  # seen as k^T, like the quantizer sees it
            else:  # attn @ v: the probabilities are the softmax output
                yield name, module, 1, "v"
        elif isinstance(module, Softmax):
            yield name, module, None, "softmax"
        elif isinstance(module, Add):
            yield name, module, None, "residual"


@contextmanager
def _float_hooks(model: nn.Module, record: Callable[[str, torch.Tensor], None],
                 layers: Optional[set[str]] = None) -> Iterator[None]:
    """Call ``record(tensor id, tensor)`` at every tap point (of ``layers`` only, if given)."""
    handles = []
    for name, module, index, kind in _tap_points(model):
        if layers is not None and name not in layers:
            continue
        tensor_id = f"{name}:{kind}"
        if index is None:
            handles.append(module.register_forward_hook(
                lambda _m, _args, out, tid=tensor_id: record(tid, out)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, tid=tensor_id, i=index: record(tid, args[i])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def quantizer_ids(qmodel: nn.Module) -> list[tuple[str, ActQuantizer]]:
    """(tensor id, quantizer) for every activation quantizer of ``qmodel``."""
    return [(f"{name.rsplit('.', 1)[0]}:{q.kind}", q) for name, q in act_quantizers(qmodel)]


@contextmanager
def _quantizer_hooks(qmodel: nn.Module, record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    handles = [q.register_forward_hook(lambda _m, _args, out, tid=tid: record(tid, out))
               for tid, q in quantizer_ids(qmodel)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def take_batches(loader: Iterable, max_batches: Optional[int]) -> list[torch.Tensor]:
    """The images of the first ``max_batches`` batches (all when None)."""
    images = []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        images.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
    if not images:
        raise ValueError("the loader yielded no images to analyse")
    return images


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _as_dict(qmodels: Any) -> dict[str, nn.Module]:
    if qmodels is None:
        return {}
    if isinstance(qmodels, nn.Module):
        return {"quantized": qmodels}
    return dict(qmodels)


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
                          sample_size: int = 1 << 18) -> dict[str, Any]:
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
    variants = _as_dict(qmodel)
    reference = float_reference(fp_model)
    device = _device(reference)
    images = take_batches(loader, max_batches)
    generator = torch.Generator().manual_seed(0)
    per_batch = max(1, sample_size // len(images))
    running: dict[str, _Running] = {}

    def first_pass(tid: str, x: torch.Tensor) -> None:
        running.setdefault(tid, _Running(per_batch, generator)).update(x)

    with _float_hooks(reference, first_pass):
        for batch in images:
            reference(batch.to(device))

    ranges = {name: {tid: grid_range(q.qparams) for tid, q in quantizer_ids(model) if q.qparams is not None}
              for name, model in variants.items()}
    twins = _twins(fp_model, variants, reference)
    edges = {tid: _edges(r.min, r.max, bins) for tid, r in running.items()}
    counts = {tid: torch.zeros(bins, dtype=torch.float64) for tid in running}
    clipped = {tid: {name: 0 for name in variants if tid in ranges[name]} for tid in running}

    def second_pass(tid: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        lo, hi = edges[tid][0], edges[tid][-1]
        counts[tid] += torch.histc(flat.clamp(lo, hi), bins, lo, hi).double()
        for name in clipped[tid]:
            if _layer_of(tid) not in twins[name][1]:
                clipped[tid][name] += _count_clipped(flat, ranges[name][tid])

    def twin_pass(names: list[str]) -> Callable[[str, torch.Tensor], None]:
        def count(tid: str, x: torch.Tensor) -> None:
            flat = x.detach().reshape(-1).float().cpu()
            for name in names:
                if tid in clipped and name in clipped[tid]:
                    clipped[tid][name] += _count_clipped(flat, ranges[name][tid])
        return count

    with _float_hooks(reference, second_pass):
        for batch in images:
            reference(batch.to(device))
    for twin, layers, names in _distinct_twins(twins):
        with _float_hooks(twin, twin_pass(names), layers):
            for batch in images:
                twin(batch.to(device))

    tensors = []
    for tid, r in running.items():  # insertion order = execution order
        sample = torch.cat(r.samples)
        mean = r.total / r.count
        quantiles = torch.quantile(sample.double(), torch.tensor(PERCENTILES, dtype=torch.float64) / 100)
        entry = {**_tensor_info(tid), "count": r.count, "min": r.min, "max": r.max, "mean": mean,
                 "std": max(0.0, r.total_sq / r.count - mean * mean) ** 0.5,
                 "abs_max": max(abs(r.min), abs(r.max)),
                 "percentiles": {_pct_key(p): float(v) for p, v in zip(PERCENTILES, quantiles)},
                 "histogram": {"edges": edges[tid], "counts": [int(c) for c in counts[tid]]},
                 "quant": {}}
        for name, n_clipped in clipped[tid].items():
            entry["quant"][name] = {**ranges[name][tid], "clipped_fraction": n_clipped / r.count}
            if _layer_of(tid) in twins[name][1]:
                entry["quant"][name]["reparameterized"] = True
        tensors.append(entry)
    return json_safe({"images": sum(int(b.shape[0]) for b in images), "bins": bins,
                      "sample_size": sample_size, "groups": GROUPS, "tensors": tensors})


def _layer_of(tensor_id: str) -> str:
    return tensor_id.rpartition(":")[0]


def _distinct_twins(twins: dict[str, tuple[nn.Module, set[str]]]
                    ) -> list[tuple[nn.Module, set[str], list[str]]]:
    """(twin, its reparameterized layers, the variants sharing it) for twins that differ
    from the plain reference."""
    groups: dict[int, tuple[nn.Module, set[str], list[str]]] = {}
    for name, (twin, layers) in twins.items():
        if layers:
            groups.setdefault(id(twin), (twin, layers, []))[2].append(name)
    return list(groups.values())


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

    SQNR and clipping are against each variant's float twin (:func:`float_twin`); a
    reparameterized layer is marked ``"reparameterized": true`` (its grid is not in the
    histogram's coordinates).

    Returns ``{"bins", "layers": [{"layer", "shape", "min", "max", "std", "histogram",
    "quant": {variant: {"bits", "lo", "hi", "lo_median", "hi_median", "step",
    "granularity", "levels"?, "sqnr_db", "clipped_fraction", "reparameterized"?}}}]}``.
    """
    variants = _as_dict(qmodels)
    layers = default_weight_layers(fp_model) if layers is None else layers
    twins = _twins(fp_model, variants, float_reference(fp_model))
    out = []
    for layer in layers:
        weight = fp_model.get_submodule(layer).weight.detach().float().cpu()
        flat = weight.reshape(-1)
        lo, hi = float(flat.min()), float(flat.max())
        edges = _edges(lo, hi, bins)
        counts = torch.histc(flat, bins, edges[0], edges[-1])
        entry = {"layer": layer, "shape": list(weight.shape), "min": lo, "max": hi,
                 "std": float(flat.std()) if flat.numel() > 1 else 0.0,
                 "histogram": {"edges": edges, "counts": [int(c) for c in counts]}, "quant": {}}
        for name, model in variants.items():
            module = _get(model, layer)
            if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_qparams is not None:
                twin, reparameterized = twins[name]
                float_weight = twin.get_submodule(layer).weight.detach().float().cpu()
                grid = grid_range(module.weight_qparams)
                matrix = float_weight.reshape(float_weight.shape[0], -1)
                ch_lo, ch_hi = _saturation_limits(module.weight_qparams, matrix.shape[0])
                outside = ((matrix < ch_lo) | (matrix > ch_hi)).sum()
                entry["quant"][name] = {**grid, "sqnr_db": sqnr_db(float_weight, module.weight.detach().cpu()),
                                        "clipped_fraction": float(outside) / flat.numel()}
                if layer in reparameterized:
                    entry["quant"][name]["reparameterized"] = True
        out.append(entry)
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


def _get(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# ------------------------------------------------------------------ per-tensor SQNR

@torch.inference_mode()
def per_layer_sqnr(fp_model: nn.Module, qmodels: Mapping[str, nn.Module], loader: Iterable,
                   max_batches: Optional[int] = 4) -> dict[str, Any]:
    """SQNR (dB) of every quantized tensor against the float model's same tensor.

    For each variant, the tensor at each quantizer's OUTPUT (so it carries the error
    accumulated upstream, as the variant really runs) is compared with the float model's
    tensor at that place (its float twin's, :func:`float_twin`, for reparameterized
    variants), summed over the first ``max_batches`` batches:
    ``10 log10(sum ref^2 / sum (ref - q)^2)``. Weight SQNR of every weight layer is added.

    Returns ``{"images", "variants": [names], "tensors": [{"id", "layer", "kind", "group"}]
    (execution order), "sqnr_db": {variant: [dB or None (float there), ...]},
    "weights": {"layers": [...], "sqnr_db": {variant: [...]}}}``.
    """
    variants = _as_dict(qmodels)
    reference = float_reference(fp_model)
    twins = _twins(fp_model, variants, reference)
    device = _device(reference)
    images = take_batches(loader, max_batches)
    order: list[str] = []
    sums = {name: {} for name in variants}  # variant -> tid -> [signal, noise]

    for batch in images:
        batch = batch.to(device)
        float_tensors: dict[str, torch.Tensor] = {}
        twin_tensors: dict[int, dict[str, torch.Tensor]] = {}

        def keep(tid: str, x: torch.Tensor, store: dict[str, torch.Tensor] = float_tensors) -> None:
            store.setdefault(tid, x.detach())

        with _float_hooks(reference, keep):
            reference(batch)
        for twin, layers, _ in _distinct_twins(twins):
            store = twin_tensors.setdefault(id(twin), {})
            with _float_hooks(twin, lambda tid, x, store=store: keep(tid, x, store), layers):
                twin(batch)
        for tid in float_tensors:
            if tid not in order:
                order.append(tid)
        for name, model in variants.items():
            twin, layers = twins[name]

            def compare(tid: str, out: torch.Tensor, name: str = name, layers: set[str] = layers,
                        twin: nn.Module = twin) -> None:
                if _layer_of(tid) in layers:
                    ref = twin_tensors[id(twin)].get(tid)
                else:
                    ref = float_tensors.get(tid)
                if ref is None or ref.shape != out.shape:
                    return
                ref64 = ref.double()
                acc = sums[name].setdefault(tid, [0.0, 0.0])
                acc[0] += float((ref64 ** 2).sum())
                acc[1] += float(((ref64 - out.detach().to(ref.device).double()) ** 2).sum())

            with _quantizer_hooks(model, compare):
                model(batch.to(_device(model)))

    table = {name: [_sqnr_from(sums[name].get(tid)) for tid in order] for name in variants}
    weight_layers = weight_layer_names(fp_model)
    weight_table = {}
    for name, model in variants.items():
        row = []
        for layer in weight_layers:
            module = _get(model, layer)
            if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_qparams is not None:
                row.append(sqnr_db(twins[name][0].get_submodule(layer).weight.detach().cpu(),
                                   module.weight.detach().cpu()))
            else:
                row.append(None)
        weight_table[name] = row
    return json_safe({"images": sum(int(b.shape[0]) for b in images), "variants": list(variants),
                      "tensors": [_tensor_info(tid) for tid in order], "sqnr_db": table,
                      "weights": {"layers": weight_layers, "sqnr_db": weight_table}})


def _sqnr_from(acc: Optional[list[float]]) -> Optional[float]:
    if acc is None:
        return None
    signal, noise = acc
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise, dtype=torch.float64)).item()


# ------------------------------------------------------------------ the analysis stage

def run_analysis(level: str, fp_model: nn.Module, qmodels: Mapping[str, nn.Module],
                 calib_loader: Optional[Iterable], eval_loader: Iterable,
                 reference_logits: Optional[torch.Tensor] = None,
                 make_config: Optional[Callable[[int, list], Any]] = None, *,
                 analysis_images: int = 256, max_batches: Optional[int] = None,
                 sensitivity_bits: tuple[int, ...] = (4, 6),
                 sensitivity_images: int = 1000, progress: bool = False) -> dict[str, Any]:
    """The analysis behind the report, at ``level`` none | basic | full.

    ``qmodels``: ``{variant name: quantized model}`` as in summary.json. ``basic`` uses the
    first batches of ``eval_loader`` holding ``analysis_images`` images (or exactly
    ``max_batches`` batches when given); ``full`` also runs
    :func:`~bvvit.evaluate.sensitivity.sensitivity` (needs ``calib_loader`` and
    ``make_config(bits, overrides) -> QuantConfig``) on the first ``sensitivity_images``
    evaluation images.

    Returns ``{"level", "settings", "timing_s", "activations"?, "weights"?, "sqnr"?,
    "sensitivity"?: {"rows", "suggested_overrides", "cli", "bits", "images"}}``.
    """
    if level not in ANALYSIS_LEVELS:
        raise ValueError(f"analysis level must be one of {', '.join(ANALYSIS_LEVELS)}, got {level!r}")
    if level == "full" and (make_config is None or calib_loader is None):
        raise ValueError("analysis 'full' needs make_config and calib_loader for sensitivity")
    if max_batches is None:
        batch_size = getattr(eval_loader, "batch_size", None) or 64
        max_batches = max(1, math.ceil(analysis_images / batch_size))
    result: dict[str, Any] = {"level": level, "timing_s": {}, "settings": {}}
    if level == "none":
        return result
    result["settings"]["max_batches"] = max_batches
    timing = result["timing_s"]
    start = time.perf_counter()
    result["activations"] = activation_statistics(fp_model, qmodels, eval_loader, max_batches)
    timing["activations"] = time.perf_counter() - start
    start = time.perf_counter()
    result["weights"] = weight_statistics(fp_model, qmodels)
    result["sqnr"] = per_layer_sqnr(fp_model, qmodels, eval_loader, max_batches)
    timing["sqnr"] = time.perf_counter() - start
    if level == "full":
        start = time.perf_counter()
        rows = sensitivity(fp_model, make_config, calib_loader, eval_loader, bits=sensitivity_bits,
                           reference_logits=reference_logits, max_images=sensitivity_images,
                           progress=progress)
        suggested = suggest_overrides(rows)
        result["sensitivity"] = {"rows": rows, "suggested_overrides": suggested,
                                 "cli": overrides_cli(suggested), "bits": list(sensitivity_bits),
                                 "images": rows[0]["images"] if rows else 0}
        timing["sensitivity"] = time.perf_counter() - start
        result["settings"].update({"sensitivity_bits": list(sensitivity_bits),
                                   "sensitivity_images": sensitivity_images})
    return json_safe(result)


__all__ = ["ANALYSIS_LEVELS", "GROUPS", "activation_statistics", "weight_statistics",
           "per_layer_sqnr", "run_analysis", "grid_range", "tensor_group", "quantizer_ids",
           "float_reference", "take_batches", "default_weight_layers"]
