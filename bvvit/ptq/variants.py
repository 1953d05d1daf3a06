"""The variants of a PTQ job: the ONE place that builds a variant's QuantConfig from the
job (:func:`variant_config`), and making one variant (quantize, save the packed file,
evaluate against FP32, write its result record) or reusing an earlier run's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator, Mapping
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
from bvvit.quant.quantize import SharedFloatStatistics
from bvvit.quant.storage import load_quantized_model, round_float_parts, save_quantized_model

log = logging.getLogger(__name__)


HELD_MODELS_BYTES = 512 << 20  # quantized models kept in memory; the others are reloaded from their files


@dataclass
class Variant:
    """One row of the job: its model, config, metrics, quantization report and file.

    The model is held in memory while the job's quantized models fit in
    :data:`HELD_MODELS_BYTES` (always for the demo model); beyond that it is released after
    its evaluation (:meth:`release`) and :attr:`model` reloads it from its packed file
    (the file holds exactly what was evaluated) whenever a later stage needs it."""

    name: str
    held_model: Optional[nn.Module]
    config: Optional[QuantConfig]
    metrics: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    file: Optional[dict[str, Any]] = None
    logits: Optional[torch.Tensor] = None  # on the evaluation split (not kept for reused variants)
    path: Optional[Path] = None  # the packed file the model can be reloaded from
    device: str = "cpu"
    memory_bytes: int = 0  # parameters and buffers of the model in memory

    def __post_init__(self) -> None:
        if self.held_model is not None and not self.memory_bytes:
            self.memory_bytes = model_bytes(self.held_model)

    @property
    def model(self) -> nn.Module:
        """The model: the one held, or a fresh load of the packed file (not kept)."""
        if self.held_model is not None:
            return self.held_model
        if self.path is None:
            raise RuntimeError(f"variant {self.name} has neither a model in memory nor a file")
        return load_quantized_model(self.path)[0].to(self.device).eval()

    def release(self) -> None:
        """Drop the model from memory when it can be reloaded from its file."""
        if self.path is not None:
            self.held_model = None


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def hold_within_budget(variants: list["Variant"], budget: Optional[int] = None) -> None:
    """Release the newest quantized variant's model when the quantized models held would
    exceed ``budget`` bytes (default :data:`HELD_MODELS_BYTES`; the FP32 model is the job's
    own and always held)."""
    budget = HELD_MODELS_BYTES if budget is None else budget
    held = [v for v in variants if v.config is not None and v.held_model is not None]
    if held and sum(v.memory_bytes for v in held) > budget:
        held[-1].release()


class VariantModels(Mapping):
    """``{variant name: model}`` of the quantized variants for the analysis, loading each
    released model when asked for it and keeping only the last one loaded."""

    def __init__(self, variants: list["Variant"]):
        self._variants = {v.name: v for v in variants if v.config is not None}
        self._last: tuple[Optional[str], Optional[nn.Module]] = (None, None)

    def __getitem__(self, name: str) -> nn.Module:
        variant = self._variants[name]
        if variant.held_model is not None:
            return variant.held_model
        if self._last[0] != name:
            self._last = (None, None)  # free the previous one before loading
            self._last = (name, variant.model)
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._variants)

    def __len__(self) -> int:
        return len(self._variants)


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
                job: Any, reuse: bool = True, shared: Optional[SharedFloatStatistics] = None) -> Variant:
    """Variant ``name``: an earlier run's (``reuse``, same key) or made now (``shared``: the
    float statistics of the job's earlier variants, :class:`SharedFloatStatistics`)."""
    if reuse:
        found = load_result(out, name, cfg, cache_key)
        if found is not None:
            qmodel, stored = found
            return Variant(name, qmodel.to(job.device), cfg, stored["metrics"], stored["report"], stored["file"],
                           path=packed_path(out, name), device=str(job.device))
    return make_variant(out, name, cfg, cache_key, fp_model, fp_logits, loaded, calib_loader,
                        val_loader, job, shared)


def make_variant(out: Path, name: str, cfg: QuantConfig, cache_key: dict[str, Any],
                 fp_model: nn.Module, fp_logits: torch.Tensor, loaded: LoadedModel,
                 calib_loader: Iterable, val_loader: Iterable, job: Any,
                 shared: Optional[SharedFloatStatistics] = None) -> Variant:
    """Quantize ``fp_model`` per ``cfg``, round its float parts to the packed file's dtype,
    write the file, evaluate the model (exactly what the file holds) against the FP32 logits
    and write its result record."""
    start = time.perf_counter()
    qmodel, report = quantize_model(fp_model, cfg, calib_loader, job.device, job.progress, shared=shared)
    for warning in report.warnings:
        log.warning(f"WARNING [{name}]: {warning}")
    round_float_parts(qmodel, job.float_dtype)  # evaluated as stored (--float-dtype fp16)
    step = time.perf_counter()
    file_info = save_quantized_model(packed_path(out, name), qmodel, cfg,
                                     loaded, report, float_dtype=job.float_dtype)
    report.timings["save_s"] = time.perf_counter() - step
    step = time.perf_counter()
    metrics, logits = evaluate_classifier(qmodel, val_loader, loaded.class_names,
                                          reference_logits=fp_logits, device=job.device,
                                          class_indices=loaded.class_indices,
                                          progress=job.progress)
    report.timings["evaluate_s"] = time.perf_counter() - step
    report.timings["total_s"] = time.perf_counter() - start
    variant = Variant(name, qmodel, cfg, metrics, report.to_dict(), file_info, logits,
                      path=packed_path(out, name), device=str(job.device))
    save_result(out, name, cache_key, cfg, metrics, variant.report, file_info)
    log.info(f"{name}: top-1 {metrics['top1']:.2f}% (drop {metrics['top1_drop']:+.2f}), "
             f"agreement {metrics['agreement']:.2f}%, SQNR {metrics['sqnr_db']:.1f} dB, "
             f"file {file_info['size_bytes'] / 1024:.1f} KiB, calibration "
             f"{report.calibration_time_s:.1f}s ({time.perf_counter() - start:.1f}s total)")
    return variant


def measure_latency(variants: list[Variant], loaded: LoadedModel, job: Any,
                    budget: Optional[int] = None) -> dict[str, dict[int, Any]]:
    """Median/p90 per variant and batch size, interleaved in one run: all variants at once
    when their models fit in ``budget`` bytes (default :data:`HELD_MODELS_BYTES`: the demo
    model), else in groups that do (released models are reloaded group by group)."""
    budget = HELD_MODELS_BYTES if budget is None else budget
    c = loaded.config
    inputs = {b: torch.randn(b, c.in_chans, c.img_size, c.img_size) for b in job.latency_batches}
    table: dict[str, dict[int, Any]] = {}
    for group in _groups_within(variants, budget):
        fns = {v.name: v.model for v in group}
        kinds = {v.name: "float" if v.config is None else "simulated" for v in group}
        for r in measure_interleaved(fns, inputs, warmup=3, runs=job.latency_runs, kinds=kinds):
            table.setdefault(r.name, {})[r.batch_size] = r.to_dict()
        del fns
    return table


def _groups_within(variants: list[Variant], budget: int) -> list[list[Variant]]:
    """Consecutive groups of ``variants`` whose models take at most ``budget`` bytes (one
    variant per group at least)."""
    groups: list[list[Variant]] = [[]]
    used = 0
    for v in variants:
        if groups[-1] and used + v.memory_bytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(v)
        used += v.memory_bytes
    return groups


__all__ = ["Variant", "HELD_MODELS_BYTES", "model_bytes", "hold_within_budget", "VariantModels", "variant_config", "config_maker", "variant_name", "quantizes_nothing", "get_variant", "make_variant",
           "measure_latency"]
