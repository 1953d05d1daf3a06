"""The variants of a PTQ job: the ONE place that builds a variant's QuantConfig from the
job (:func:`variant_config`), and making one variant (quantize, save the packed file,
evaluate against FP32, write its result record) or reusing an earlier run's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from bvvit.evaluate.classification import evaluate_classifier
from bvvit.evaluate.latency import measure_interleaved
from bvvit.model_file import LoadedModel
from bvvit.ptq.cache import load_result, packed_path, save_result
from bvvit.quant.config import LayerOverride, QuantConfig
from bvvit.quant.modules import act_quantizers, weight_modules
from bvvit.quant.quantize import convert, quantize_model
from bvvit.quant.recipes import make_quant_config
from bvvit.quant.storage import round_float_parts, save_quantized_model

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    model: nn.Module
    config: Optional[QuantConfig]
    metrics: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    file: Optional[dict[str, Any]] = None
    logits: Optional[torch.Tensor] = None  # on the evaluation split (not kept for reused variants)


def variant_config(job: Any, recipe: str, w_bits: int, a_bits: int,
                   overrides: Iterable[LayerOverride]) -> QuantConfig:
    """The QuantConfig of ``recipe`` at ``w_bits``/``a_bits`` with ``job``'s calibration
    size, seed and switches, and the per-layer ``overrides`` given (the job's own for its
    variants; none for the one-layer-at-a-time sensitivity)."""
    return make_quant_config(recipe, w_bits, a_bits, calib_size=job.calib_size, seed=job.seed,
                             overrides=list(overrides), **job.switches)


def config_maker(job: Any) -> Callable[[int, list[LayerOverride]], QuantConfig]:
    """``make_config(bits, overrides)``: the job's recipe at ``bits`` for weights and
    activations (what per-layer sensitivity and the analysis quantize with)."""
    return lambda bits, overrides: variant_config(job, job.recipe, bits, bits, overrides)


def variant_name(cfg: QuantConfig, main_recipe: str) -> str:
    """``w4a4`` for the job's recipe, ``w4a4-minmax`` for the baseline."""
    return cfg.name if cfg.recipe == main_recipe else f"{cfg.name}-{cfg.recipe}"


def quantizes_nothing(fp_model: nn.Module, cfg: QuantConfig) -> bool:
    """True when ``cfg`` leaves every layer float (``--override '*=float'``, or every op type
    switched off): such a variant would only repeat the FP32 row."""
    if cfg.linear and cfg.head and cfg.patch_embed and not any(o.keep_float for o in cfg.overrides):
        return False  # the head alone is quantized
    qmodel, _ = convert(fp_model, cfg)
    return not weight_modules(qmodel) and not act_quantizers(qmodel)


def get_variant(out: Path, name: str, cfg: QuantConfig, cache_key: dict[str, Any], fp_model: nn.Module,
                fp_logits: torch.Tensor, loaded: LoadedModel, calib_loader: Iterable, val_loader: Iterable,
                job: Any, reuse: bool = True) -> Variant:
    """Variant ``name``: an earlier run's (``reuse``, same key) or made now."""
    if reuse:
        found = load_result(out, name, cfg, cache_key)
        if found is not None:
            qmodel, stored = found
            return Variant(name, qmodel, cfg, stored["metrics"], stored["report"], stored["file"])
    return make_variant(out, name, cfg, cache_key, fp_model, fp_logits, loaded, calib_loader,
                        val_loader, job)


def make_variant(out: Path, name: str, cfg: QuantConfig, cache_key: dict[str, Any],
                 fp_model: nn.Module, fp_logits: torch.Tensor, loaded: LoadedModel,
                 calib_loader: Iterable, val_loader: Iterable, job: Any) -> Variant:
    """Quantize ``fp_model`` per ``cfg``, round its float parts to the packed file's dtype,
    write the file, evaluate the model (exactly what the file holds) against the FP32 logits
    and write its result record."""
    start = time.perf_counter()
    qmodel, report = quantize_model(fp_model, cfg, calib_loader, job.device, job.progress)
    for warning in report.warnings:
        log.warning(f"WARNING [{name}]: {warning}")
    round_float_parts(qmodel, job.float_dtype)  # evaluated as stored (--float-dtype fp16)
    file_info = save_quantized_model(packed_path(out, name), qmodel, cfg,
                                     loaded, report, float_dtype=job.float_dtype)
    metrics, logits = evaluate_classifier(qmodel, val_loader, loaded.class_names,
                                          reference_logits=fp_logits, device=job.device,
                                          class_indices=loaded.class_indices,
                                          progress=job.progress)
    variant = Variant(name, qmodel, cfg, metrics, report.to_dict(), file_info, logits)
    save_result(out, name, cache_key, cfg, metrics, variant.report, file_info)
    log.info(f"{name}: top-1 {metrics['top1']:.2f}% (drop {metrics['top1_drop']:+.2f}), "
             f"agreement {metrics['agreement']:.2f}%, SQNR {metrics['sqnr_db']:.1f} dB, "
             f"file {file_info['size_bytes'] / 1024:.1f} KiB, calibration "
             f"{report.calibration_time_s:.1f}s ({time.perf_counter() - start:.1f}s total)")
    return variant


def measure_latency(variants: list[Variant], loaded: LoadedModel, job: Any) -> dict[str, dict[int, Any]]:
    """Median/p90 per variant and batch size, all variants interleaved in one run."""
    c = loaded.config
    inputs = {b: torch.randn(b, c.in_chans, c.img_size, c.img_size) for b in job.latency_batches}
    fns = {v.name: v.model for v in variants}
    kinds = {v.name: "float" if v.config is None else "simulated" for v in variants}
    results = measure_interleaved(fns, inputs, warmup=3, runs=job.latency_runs, kinds=kinds)
    table: dict[str, dict[int, Any]] = {}
    for r in results:
        table.setdefault(r.name, {})[r.batch_size] = r.to_dict()
    return table


__all__ = ["Variant", "variant_config", "config_maker", "variant_name", "quantizes_nothing", "get_variant", "make_variant",
           "measure_latency"]
