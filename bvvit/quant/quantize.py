"""The one entry point: ``quantize_model(model, QuantConfig, calibration_loader)``.

1. copy the float model (it is never modified) and switch attention to the explicit path;
2. replace modules by their quantized wrappers according to the config's switches and
   per-layer overrides (weights are quantized here, from the weights alone);
3. calibrate: run the calibration images through the model with every activation
   quantizer observing, then freeze the qparams (:func:`calibrate`);
3a. with ``softmax.method = "auto"``, give each softmax quantizer the grid (uniform, or log
   base 2^(1/k) with k = 1, 2, 4, 8, 16; from 8 bits a uniform range) with the lowest
   calibration error (:mod:`bvvit.quant.softmax_grid`);
3b. optionally reconstruct block by block (``cfg.reconstruct``, :mod:`bvvit.quant.reconstruct`):
   learned rounding of the weight codes and learned activation step sizes;
4. return the quantized model and a :class:`QuantReport` (coverage, warnings, timing).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from bvvit.errors import ConfigError
from bvvit.model import HEAD_NAMES, Add, MatMul, Softmax, VisionTransformer
from bvvit.quant.config import GPTQOptions, LayerOverride, QuantConfig, TensorQuantSpec
from bvvit.quant.gptq import gptq_codes, input_hessians
from bvvit.quant.modules import (OBSERVE, ActQuantizer, QuantAdd, QuantConv2d, QuantLinear,
                                 QuantMatMul, QuantSoftmax, act_quantizers)
from bvvit.quant.reconstruct import reconstruct_model
from bvvit.quant.input_stats import input_statistics, linear_names
from bvvit.quant.reparam import range_names, reparameterize_from_ranges
from bvvit.quant.rotation import rotate_model
from bvvit.quant.softmax_grid import UNIFORM_ONLY_BITS, choose_softmax_grids
from bvvit.system import release_freed_memory


@dataclass
class QuantReport:
    """What was quantized, how, and how long calibration took."""

    config: dict[str, Any]
    coverage: list[dict[str, Any]] = field(default_factory=list)  # aggregated table rows
    layers: list[dict[str, Any]] = field(default_factory=list)  # one row per tensor
    warnings: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # technique-specific statistics
    calibration_images: int = 0
    calibration_time_s: float = 0.0
    timings: dict[str, Any] = field(default_factory=dict)  # seconds per step (see quantize_model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _layer_bits(name: str, overrides: list[LayerOverride], used: set[int]) -> Optional[int] | str:
    """The override for ``name``: a bit-width, "float", or None (no override). Last match wins."""
    result: Optional[int] | str = None
    for index, override in enumerate(overrides):
        if fnmatch.fnmatchcase(name, override.pattern):
            used.add(index)
            result = "float" if override.keep_float else override.bits
    return result


def _with_bits(spec: TensorQuantSpec, bits: Optional[int] | str) -> Optional[TensorQuantSpec]:
    if bits == "float":
        return None
    return spec if bits is None else dataclasses.replace(spec, bits=int(bits))


def convert(model: VisionTransformer, cfg: QuantConfig) -> tuple[VisionTransformer, list[str]]:
    """A quantized copy of ``model`` (uncalibrated), plus warnings. The input is untouched."""
    qmodel = copy.deepcopy(model).eval()
    qmodel.set_fused_attn(False)
    used: set[int] = set()
    warnings: list[str] = []
    for name, module in list(qmodel.named_modules()):
        if not name:
            continue
        bits = _layer_bits(name, cfg.overrides, used)
        if isinstance(module, nn.Linear):
            is_head = name in HEAD_NAMES
            enabled = cfg.head if is_head else cfg.linear
            if not enabled or bits == "float":
                continue
            qmodel.set_submodule(name, QuantLinear(module, _with_bits(cfg.weight, bits),
                                                   _with_bits(cfg.activation, bits), "linear_input"))
        elif isinstance(module, nn.Conv2d):
            if not cfg.patch_embed or bits == "float":
                continue
            image_spec = _with_bits(cfg.activation, bits if bits is not None else cfg.image_bits)
            qmodel.set_submodule(name, QuantConv2d(module, _with_bits(cfg.weight, bits), image_spec, "image"))
        elif isinstance(module, MatMul):
            if not cfg.attention_matmul or bits == "float":
                continue
            if name.endswith("matmul_qk"):
                new = QuantMatMul(_with_bits(cfg.activation, bits), _with_bits(cfg.activation, bits),
                                  "q", "k")
            else:  # attn @ v: the probabilities are quantized at the softmax output
                new = QuantMatMul(None, _with_bits(cfg.activation, bits), "attn", "v")
            qmodel.set_submodule(name, new)
        elif isinstance(module, Softmax):
            if cfg.softmax_output and bits != "float":
                spec = _with_bits(cfg.softmax, bits)
                # below 8 bits only: 8-bit attention stays the uniform uint8 that int8 runtimes run
                renormalize = cfg.softmax_renorm and spec.bits < UNIFORM_ONLY_BITS
                qmodel.set_submodule(name, QuantSoftmax(module, spec, renormalize))
        elif isinstance(module, Add):
            if cfg.residual and bits != "float":
                qmodel.set_submodule(name, QuantAdd(_with_bits(cfg.activation, bits)))
    for index, override in enumerate(cfg.overrides):
        if index not in used:
            warnings.append(f"override pattern {override.pattern!r} matched no layer "
                            "(names look like blocks.0.attn.qkv, blocks.*.mlp.fc2, head)")
    return qmodel, warnings


@torch.no_grad()  # not inference_mode: frozen qparams must be usable under autograd later
def calibrate(qmodel: nn.Module, calibration_loader: Iterable, device: torch.device | str = "cpu",
              progress: bool = False) -> tuple[int, float]:
    """Observe activations on the calibration images, then freeze every quantizer.

    Returns (number of images, seconds). Every quantizer observes float inputs (all
    quantizers pass data through while observing).
    """
    quantizers = [q for _, q in act_quantizers(qmodel)]
    start = time.perf_counter()
    for quantizer in quantizers:
        quantizer.start_observing()
    qmodel.eval().to(device)
    seen = 0
    for images, _ in tqdm(calibration_loader, desc="calibrate", disable=not progress, leave=False):
        qmodel(images.to(device))
        seen += images.shape[0]
    if seen == 0:
        raise ConfigError("the calibration loader yielded no images")
    for quantizer in quantizers:
        quantizer.freeze()
    return seen, time.perf_counter() - start


def coverage_table(qmodel: nn.Module) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(aggregated rows: op x tensor x bits x granularity x count, per-tensor rows)."""
    layers: list[dict[str, Any]] = []
    for name, module in qmodel.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            op = "Conv2d" if isinstance(module, QuantConv2d) else "Linear"
            if module.weight_qparams is not None:
                layers.append({"layer": name, "op": op, "tensor": "weight",
                               "bits": module.weight_qparams.bits,
                               "granularity": _granularity_name(module.weight_qparams.granularity),
                               "symmetric": module.weight_qparams.symmetric})
        if isinstance(module, ActQuantizer):
            layer = name.rsplit(".", 1)[0]
            op = type(qmodel.get_submodule(layer)).__name__.replace("Quant", "")
            layers.append({"layer": layer, "op": op, "tensor": module.kind, "bits": module.bits,
                           "granularity": module.spec.granularity,
                           "symmetric": module.spec.symmetric, "observer": module.spec.observer,
                           "method": module.spec.method})
    counts = Counter((r["op"], r["tensor"], r["bits"], r["granularity"]) for r in layers)
    rows = [{"op": op, "tensor": tensor, "bits": bits, "granularity": gran, "count": n}
            for (op, tensor, bits, gran), n in sorted(counts.items(), key=lambda kv: str(kv[0]))]
    return rows, layers


def _granularity_name(granularity: Any) -> str:
    kind = type(granularity).__name__
    if kind == "PerGroup":
        return f"group:{granularity.group_size}"
    return {"PerTensor": "tensor", "PerChannel": "channel"}.get(kind, kind)


def _missing(cfg: QuantConfig, float_model: nn.Module, qmodel: nn.Module) -> list[str]:
    """Warnings for what the config asked for but the model did not get."""
    warnings = []
    float_linears = [n for n, m in qmodel.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    overridden = {n for n in float_linears if any(
        fnmatch.fnmatchcase(n, o.pattern) and o.keep_float for o in cfg.overrides)}
    for name in float_linears:
        wanted = cfg.head if name in HEAD_NAMES else cfg.patch_embed if name.endswith("proj") and \
            name.startswith("patch_embed") else cfg.linear
        if wanted and name not in overridden:
            warnings.append(f"{name} ({type(qmodel.get_submodule(name)).__name__}) was asked to be "
                            "quantized but is still float")
    return warnings


class SharedFloatStatistics:
    """What the recipe computes from the FLOAT model over the calibration images, which is the
    same at every bit depth: the rotated and/or reparameterized float model (from the
    LayerNorm output ranges) and the GPTQ Hessians of its Linears' inputs.

    A PTQ job passes one object to every :func:`quantize_model` call of a run, so these
    passes over the calibration images run once instead of once per variant. The results
    are bit-identical to computing them per variant (same float model, same images in the
    same order). With both reparameterization and GPTQ, one float pass gives the ranges and
    the Hessians: they are derived for the reparameterized inputs from the centred input
    moments (:mod:`bvvit.quant.input_stats`; ViT-B/16, 1,024 images: one ~250 s pass fewer).
    Holds the statistics of one (model, loader, rotation, reparameterization):
    the float copy and the Hessians (ViT-B/16: 0.34 GB and 1.1 GB), until :meth:`clear`.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget everything (frees the float copy and the Hessians)."""
        self._key: Optional[tuple] = None
        self._work: Optional[VisionTransformer] = None
        self._float_extras: Optional[dict[str, Any]] = None
        self._hessians: dict[str, torch.Tensor] = {}
        self._hessian_key: Optional[tuple] = None
        self._hessians_new = False  # computed by the float pass, not yet handed out

    def _select(self, key: tuple) -> None:
        if key != self._key:
            self.clear()
            self._key = key

    def float_model(self, model: VisionTransformer, loader: Iterable, cfg: QuantConfig,
                    device: torch.device | str, progress: bool) -> tuple[VisionTransformer, dict[str, Any], bool]:
        """(the rotated and/or reparameterized copy of ``model`` per ``cfg``, the statistics
        of those steps, whether it was reused)."""
        self._select((model, loader, cfg.rotation, cfg.reparam, str(device)))
        if self._work is not None and self._float_extras is not None:
            return self._work, self._float_extras, True
        work = copy.deepcopy(model).eval()
        extras: dict[str, Any] = {}
        if cfg.rotation.enabled:
            extras["rotation"] = rotate_model(work, cfg.rotation.seed)
        if cfg.reparam.enabled:
            # one float pass: the ranges the reparameterization needs and, for GPTQ, the input
            # moments of every Linear, from which the reparameterized inputs' Hessians follow
            moment_names = linear_names(work) if cfg.gptq.enabled else []
            stats = input_statistics(work, loader, range_names(work), moment_names, device, seed=cfg.seed,
                                     progress=progress,
                                     desc="LayerNorm ranges + GPTQ Hessians" if moment_names else "LayerNorm ranges")
            extras["reparam"], factors = reparameterize_from_ranges(work, stats.ranges, cfg.reparam.alpha)
            for name in list(stats.moments):  # each Hessian replaces its moments (no second copy)
                r, d = factors.get(name, (None, None))
                self._hessians[name] = stats.moments.pop(name).hessian(shift=d, scale=r)
            if moment_names:
                self._hessian_key, self._hessians_new = (work, loader, str(device), cfg.seed), True
        self._work, self._float_extras = work, extras
        return work, extras, False

    def hessians(self, work: VisionTransformer, loader: Iterable, names: list[str], device: torch.device | str,
                 seed: int, progress: bool) -> tuple[dict[str, torch.Tensor], bool]:
        """(GPTQ Hessians of ``names`` in ``work``, whether they were reused)."""
        key = (work, loader, str(device), seed)
        if key == self._hessian_key and set(names) <= set(self._hessians):
            reused, self._hessians_new = not self._hessians_new, False
            return self._hessians, reused
        if work is not self._work:  # the plain float model (no reparameterization)
            self._select((work, loader, None, str(device)))
        self._hessians = input_hessians(work, loader, names, device, seed=seed, progress=progress)
        self._hessian_key = key
        return self._hessians, False


def prepare(model: VisionTransformer, cfg: QuantConfig, calibration_loader: Optional[Iterable],
            device: torch.device | str = "cpu", shared: Optional[SharedFloatStatistics] = None,
            progress: bool = False, timings: Optional[dict[str, Any]] = None
            ) -> tuple[VisionTransformer, VisionTransformer, list[str], dict[str, Any]]:
    """Everything before calibration: (float model as the quantized one sees it, uncalibrated
    quantized model, warnings, technique statistics).

    The float model is ``model`` itself, or a rotated and/or reparameterized copy (both are
    exact in float, so it computes the same function); GPTQ codes replace rounding when
    the config asks. ``model`` is never modified. The rotation comes first: it folds the
    LayerNorm affines away, so a reparameterization before it would be undone. ``shared``
    reuses the float model of an earlier call with the same model, loader and options, and
    its GPTQ Hessians (:class:`SharedFloatStatistics`); ``timings`` receives the seconds of
    each step.
    """
    if (cfg.reparam.enabled or cfg.gptq.enabled or cfg.reconstruct.enabled) and calibration_loader is None:
        raise ConfigError("LayerNorm reparameterization, GPTQ and reconstruction need calibration data")
    shared = shared if shared is not None else SharedFloatStatistics()
    timings = timings if timings is not None else {}
    work = model
    extras: dict[str, Any] = {}
    start = time.perf_counter()
    if cfg.rotation.enabled or cfg.reparam.enabled:
        work, float_extras, reused = shared.float_model(model, calibration_loader, cfg, device, progress)
        extras.update(float_extras)
        timings["float_model_s"] = time.perf_counter() - start
        timings["float_model_reused"] = reused
    start = time.perf_counter()
    qmodel, warnings = convert(work, cfg)
    timings["convert_s"] = time.perf_counter() - start
    if cfg.gptq.enabled:
        start = time.perf_counter()
        extras["gptq_layers"] = apply_gptq(work, qmodel, calibration_loader, cfg.gptq, device, shared=shared,
                                           seed=cfg.seed, progress=progress, timings=timings)
        timings["gptq_s"] = time.perf_counter() - start
    return work, qmodel, warnings, extras


def quantize_model(model: VisionTransformer, cfg: QuantConfig, calibration_loader: Optional[Iterable],
                   device: torch.device | str = "cpu", progress: bool = False,
                   shared: Optional[SharedFloatStatistics] = None) -> tuple[VisionTransformer, QuantReport]:
    """Quantize a copy of ``model`` per ``cfg`` and calibrate it on ``calibration_loader``.

    Static activation quantization needs calibration data: ``calibration_loader=None``
    with any activation quantizer enabled raises :class:`ConfigError`. ``shared`` carries
    the float statistics from one call to the next (:class:`SharedFloatStatistics`).
    The report's ``timings`` holds the seconds of each step (``float_model_s``: rotation and
    LayerNorm reparameterization, with GPTQ also the pass that gives its Hessians,
    ``convert_s``: weight observers, ``gptq_hessians_s`` (~0 when the float pass gave them),
    ``gptq_s``, ``calibrate_s``, ``softmax_grid_s``, ``reconstruct_s``) and whether the float
    statistics were reused (``*_reused``).
    """
    start = time.perf_counter()
    timings: dict[str, Any] = {}
    work, qmodel, warnings, extras = prepare(model, cfg, calibration_loader, device, shared, progress, timings)
    needs_calibration = bool(act_quantizers(qmodel))
    report = QuantReport(config=cfg.to_dict(), warnings=warnings, extras=extras, timings=timings)
    if needs_calibration:
        if calibration_loader is None:
            raise ConfigError("static activation quantization needs calibration data; "
                              "pass a calibration loader (post_training.py uses --calib-size "
                              "training images)")
        report.calibration_images, timings["calibrate_s"] = calibrate(qmodel, calibration_loader, device, progress)
        release_freed_memory()  # the observers' scratch (ViT-B/16, 64 images: 0.43 GB kept in RSS otherwise)
        if cfg.softmax.method == "auto":
            step = time.perf_counter()
            report.extras["softmax_grids"] = choose_softmax_grids(qmodel, calibration_loader, device=device)
            timings["softmax_grid_s"] = time.perf_counter() - step
            release_freed_memory()
    if cfg.reconstruct.enabled:
        step = time.perf_counter()
        report.extras["reconstruct"] = reconstruct_model(work, qmodel, calibration_loader, cfg.reconstruct,
                                                         device, seed=cfg.seed, progress=progress)
        if "budget_note" in report.extras["reconstruct"]:
            report.warnings.append(report.extras["reconstruct"]["budget_note"])
        timings["reconstruct_s"] = time.perf_counter() - step
    report.calibration_time_s = time.perf_counter() - start
    report.warnings += _missing(cfg, model, qmodel)
    report.coverage, report.layers = coverage_table(qmodel)
    return qmodel.eval(), report


def apply_gptq(float_model: nn.Module, qmodel: nn.Module, loader: Iterable, options: GPTQOptions,
               device: torch.device | str = "cpu", shared: Optional[SharedFloatStatistics] = None,
               seed: int = 0, progress: bool = False, timings: Optional[dict[str, Any]] = None) -> list[str]:
    """Replace round-to-nearest codes of every quantized Linear by GPTQ codes, using the
    float model's inputs to that layer as the Hessian data. Returns the layers changed."""
    names = [n for n, m in qmodel.named_modules()
             if isinstance(m, QuantLinear) and m.weight_qparams is not None]
    shared = shared if shared is not None else SharedFloatStatistics()
    start = time.perf_counter()
    hessians, reused = shared.hessians(float_model, loader, names, device, seed, progress)
    if timings is not None:
        timings["gptq_hessians_s"] = time.perf_counter() - start
        timings["gptq_hessians_reused"] = reused
    for name in tqdm(names, desc="GPTQ", disable=not progress, leave=False):
        module = qmodel.get_submodule(name)
        float_weight = float_model.get_submodule(name).weight
        codes = gptq_codes(float_weight, hessians[name], module.weight_qparams, options.damp,
                           act_order=options.act_order)
        module.weight_codes = codes.to(module.weight_codes.dtype)
        module.refresh_weight()
    return names


def is_observing(qmodel: nn.Module) -> bool:
    return any(q.state == OBSERVE for _, q in act_quantizers(qmodel))
