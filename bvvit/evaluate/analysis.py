"""What quantization does inside the model: activation and weight statistics against the
quantization grids, per-tensor SQNR across bit depths, and (``--analysis full``) per-layer
sensitivity (:mod:`bvvit.evaluate.sensitivity`).

Every function returns JSON-safe data (:func:`bvvit.io.json_safe`: ``inf`` becomes ``"inf"``);
nothing here draws (:mod:`bvvit.report.plots` does).

This module holds :func:`run_analysis`, the analysis stage, and re-exports the pieces from
where they live: :mod:`bvvit.evaluate.tensor_taps` (tensor names, float reference and
twins, hooks), :mod:`bvvit.evaluate.activation_stats` (grids, activation and weight
statistics) and :mod:`bvvit.evaluate.layer_sqnr` (per-tensor SQNR).

Levels (``--analysis``): ``none`` runs nothing; ``basic`` (default) adds activation and
weight statistics and per-tensor SQNR on ``max_batches`` evaluation batches (seconds);
``full`` also ranks layers by sensitivity (minutes; see :func:`sensitivity`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

# Also re-exported: the tests and other callers import these from here.
from bvvit.evaluate.activation_stats import (activation_statistics, default_weight_layers, grid_range,
                                             weight_layer_names, weight_statistics)
from bvvit.evaluate.layer_sqnr import per_layer_sqnr
from bvvit.evaluate.sensitivity import overrides_cli, sensitivity, suggest_overrides
from bvvit.evaluate.tensor_taps import (GROUPS, float_reference, float_twin, quantizer_ids, take_batches,
                                        tensor_group)
from bvvit.io import json_safe

ANALYSIS_LEVELS = ("none", "basic", "full")


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
    result["activations"] = activation_statistics(fp_model, qmodels, eval_loader, max_batches, progress=progress)
    timing["activations"] = time.perf_counter() - start
    start = time.perf_counter()
    result["weights"] = weight_statistics(fp_model, qmodels)
    result["sqnr"] = per_layer_sqnr(fp_model, qmodels, eval_loader, max_batches, progress=progress)
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
