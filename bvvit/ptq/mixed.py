"""The mixed-precision stage of a PTQ job (``--avg-bits`` / ``--max-weight-bytes``):
per-layer sensitivity at the candidate widths, the allocation under the budget
(:mod:`bvvit.quant.mixed_precision`), and that model as one more variant.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from bvvit.distributed import DistInfo, broadcast_from_main
from bvvit.evaluate.sensitivity import sensitivity
from bvvit.model_file import LoadedModel
from bvvit.ptq.variants import Variant, config_maker, get_variant, variant_config
from bvvit.quant.config import LayerOverride
from bvvit.quant.mixed_precision import allocate_bits, damage_table

log = logging.getLogger(__name__)


def mixed_precision_variant(job: Any, fp_model: nn.Module, fp_logits: torch.Tensor, loaded: LoadedModel,
                            calib_loader: Iterable, val_loader: Iterable, local_loader: Iterable, out: Path,
                            cache_key: dict[str, Any], info: DistInfo) -> tuple[dict[str, Any], Variant]:
    """Per-layer widths from sensitivity under the budget, then that model as a variant
    (under torchrun: rank 0's allocation, from the same images as one process, on every rank).
    Returns (the allocation for summary.json, the variant)."""
    start = time.perf_counter()
    candidates = tuple(sorted(set(job.mp_candidates)))
    rows = sensitivity(fp_model, config_maker(job), calib_loader, local_loader, bits=candidates[:-1],
                       reference_logits=fp_logits, progress=job.progress)
    params = {name: module.weight.numel() for name, module in fp_model.named_modules()
              if isinstance(module, (nn.Linear, nn.Conv2d))}
    allocation = broadcast_from_main(allocate_bits(damage_table(rows), params, list(candidates),
                                                   job.avg_bits, job.max_weight_bytes), info)
    base = allocation.base_bits
    overrides = list(job.overrides) + [LayerOverride.parse(o) for o in allocation.overrides()]
    cfg = variant_config(job, job.recipe, base, base, overrides)
    budget = f"avg{job.avg_bits:g}" if job.avg_bits is not None else f"{job.max_weight_bytes}B"
    name = f"mixed-{budget}"
    variant = get_variant(out, name, cfg, cache_key, fp_model, fp_logits, loaded, calib_loader, val_loader,
                          job, reuse=not info.enabled)
    result = {**allocation.to_dict(), "candidates": list(candidates), "variant": name,
              "search_time_s": time.perf_counter() - start}
    log.info(f"{name}: mean weight width {allocation.avg_bits:.2f} bits; layers above {base} bits: "
             f"{', '.join(allocation.overrides()) or 'none'}")
    return result, variant


__all__ = ["mixed_precision_variant"]
