"""The post-training job behind ``post_training.py``: quantize a trained model at several
bit depths and measure each against the float original.

    load model file -> data (classes checked) -> FP32 evaluation (reference logits)
      -> for each bit depth and recipe: quantize_model (calibrated on TRAINING images)
           -> packed file (real size) -> evaluate vs FP32
      -> mixed precision (optional) -> ONNX Runtime int8 (optional)
      -> latency of every variant, interleaved in one run
      -> summary.json / summary.csv (+ the analysis and the report drawn from them)

Under ``torchrun --nproc_per_node N post_training.py ...`` every evaluation is sharded:
rank r evaluates images r, r+N, ... and the logits are gathered exactly (no image
duplicated or lost), so each rank holds the same full results. Calibration (a few hundred
images) is replicated: every rank computes the same quantized model. Rank 0 alone writes
files, prints, measures latency (the others wait) and runs the analysis; a mixed-precision
allocation is rank 0's, broadcast. Reuse of finished bit depths is single-process only.

The output folder is claimed for the run (:mod:`bvvit.ptq.output_dir`); packed files are
reused only when their content hash matches the one in their result record
(:mod:`bvvit.ptq.cache`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from bvvit.data import build_dataset, build_loader, build_transform
from bvvit.distributed import DistInfo, ShardSampler, barrier, init_distributed, shutdown_distributed
from bvvit.errors import DataError, WriteError
from bvvit.evaluate.analysis import run_analysis
from bvvit.evaluate.classification import evaluate_classifier
from bvvit.io import json_safe
from bvvit.ptq.cache import cache_base
from bvvit.ptq.calibration import DISTANCE_IMAGES, build_calibration_set, capture_head_features
from bvvit.ptq.calibration import describe as describe_calibration
from bvvit.ptq.classes import HeadLabels
from bvvit.ptq.inputs import load_inputs
from bvvit.ptq.mixed import mixed_precision_variant
from bvvit.ptq.onnx import onnx_int8
from bvvit.ptq.output_dir import run_in_claimed_folder
from bvvit.ptq.summary import build_summary, format_table, onnx_rows, write_summary
from bvvit.ptq.variants import (Variant, VariantModels, config_maker, get_variant, hold_within_budget,
                                measure_latency, quantizes_nothing, variant_config, variant_name)
from bvvit.quant.config import DEFAULT_BITS, DEFAULT_CALIB_SIZE, LayerOverride
from bvvit.quant.quantize import SharedFloatStatistics
from bvvit.quant.recipes import DEFAULT_RECIPE
from bvvit.quant.storage import save_float_model
from bvvit.report import write_report
from bvvit.system import release_freed_memory

log = logging.getLogger(__name__)

@dataclass
class PTQJob:
    model_path: str
    output_dir: str
    data_path: Optional[str] = None  # default: what the checkpoint was trained on
    bit_pairs: list[tuple[int, int]] = field(default_factory=lambda: [(b, b) for b in DEFAULT_BITS])
    recipe: str = DEFAULT_RECIPE
    baseline: Optional[str] = "minmax"  # also run this recipe at each bit depth (None: skip)
    calib_size: int = DEFAULT_CALIB_SIZE
    calib_data: str = "train"  # train | synthetic (data-free); bvvit/ptq/calibration.py
    calib_path: Optional[str] = None  # calibrate on the images of this folder instead
    batch_size: int = 256
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    eval_subset: Optional[int] = None
    latency_runs: int = 20
    latency_batches: tuple[int, ...] = (1, 64)
    overrides: list[LayerOverride] = field(default_factory=list)
    switches: dict[str, Any] = field(default_factory=dict)
    float_dtype: str = "fp16"  # dtype of the float parts inside packed files (evaluated as stored)
    analysis: str = "basic"  # none | basic | full (adds per-layer sensitivity)
    num_heads: Optional[int] = None  # for timm/torchvision state dicts (not in the tensor shapes)
    model_format: str = "auto"  # bvvit | timm | hf | torchvision (bvvit.formats), auto: detected
    preprocessing: tuple[str, ...] = ()  # KEY=VALUE changes of the checkpoint's eval transform
    avg_bits: Optional[float] = None  # mixed precision budget: mean weight bits
    max_weight_bytes: Optional[int] = None  # ... or packed weight bytes
    mp_candidates: tuple[int, ...] = (4, 6, 8)
    onnx: bool = True  # export FP32/W8A8 ONNX and measure ONNX Runtime's integer kernels
    runtimes: tuple[str, ...] = ()  # deploy runtimes measured (ptq.onnx.RUNTIMES); empty: every installed one
    overwrite: bool = False  # move a folder holding earlier results aside instead of continuing it


def run(job: PTQJob) -> dict[str, Any]:
    """Run ``job``; under torchrun (WORLD_SIZE > 1) as one rank of a sharded evaluation."""
    info = init_distributed(torch.device(job.device).type)
    if not info.enabled:
        return _raise_failures(run_in_claimed_folder(job, lambda out: _run(job, info, out)), job)
    # Ranks > 0 compute alongside rank 0 (the evaluations are collective) but write into a
    # private folder that is deleted afterwards (and the console is rank 0's: bvvit.console).
    scratch = None if info.is_main else Path(tempfile.mkdtemp(prefix=f"bvvit-rank{info.rank}-"))
    try:
        if info.is_main:
            summary = run_in_claimed_folder(job, lambda out: _run(job, info, out))
        else:
            summary = _run(dataclasses.replace(job, progress=False), info, scratch)
        barrier(info)  # rank 0's files are complete when any rank returns
        return _raise_failures(summary, job)
    finally:  # on an error torchrun stops the other ranks; no barrier to hang in
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        shutdown_distributed()


def _raise_failures(summary: dict[str, Any], job: PTQJob) -> dict[str, Any]:
    """``summary``, or a one-line WriteError when a part of the run could not be written
    (ONNX on a full disk): the run fails at its end, after every other result is written."""
    failures = summary.get("failures") or []
    if failures:
        raise WriteError(f"{failures[0]}; every other result is written to {job.output_dir} "
                         "(summary.json records the failure): free disk space and rerun (finished "
                         "bit depths are reused)")
    return summary


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall seconds of the ``with`` body to ``timings[name]``; then return the memory
    the stage freed to the system, so the next stage's peak does not stack on it."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        release_freed_memory()


def _run(job: PTQJob, info: DistInfo, out: Path) -> dict[str, Any]:
    device = torch.device(job.device)
    timings: dict[str, float] = {}  # wall seconds per stage of the job (summary.json "timings")
    with _stage(timings, "load_inputs_s"):
        loaded, source = load_inputs(job.model_path, job.data_path, job.num_heads, job.model_format,
                                     job.preprocessing)
    pre = loaded.preprocessing
    val_set = build_dataset(source, "val", build_transform(pre, train=False), subset=job.eval_subset)
    if loaded.class_indices is not None:  # a partial data set: labels are the head's outputs
        val_set = HeadLabels(val_set, loaded.class_indices)
    if info.enabled and len(val_set) < info.world_size:
        raise DataError(f"{len(val_set)} evaluation images cannot be shared by {info.world_size} "
                        "processes; run with fewer processes or more images")
    val_loader = build_loader(val_set, job.batch_size, shuffle=False, sampler=ShardSampler(
        len(val_set), info, gather=True) if info.enabled else None)
    # Work only one rank does (sensitivity for mixed precision, analysis) sees every image in
    # dataset order, not one shard: the same images as a one-process run.
    local_loader = build_loader(val_set, job.batch_size, shuffle=False) if info.enabled else val_loader
    fp_model = loaded.model.to(device).eval()
    log.info(f"model: {job.model_path} (ViT {loaded.config.depth}x{loaded.config.embed_dim}, "
             f"patch {loaded.config.patch_size}); data: {source.describe()}; evaluating on {len(val_set)} images")

    # The FP32 evaluation also yields the evaluation images' head features that the
    # calibration set's distance needs (unsharded runs: one pass over them instead of two;
    # a shard's images are not the first ones, so sharded runs capture nothing).
    with _stage(timings, "fp32_evaluation_s"), \
            capture_head_features(fp_model, limit=0 if info.enabled else DISTANCE_IMAGES) as eval_rows:
        fp_metrics, fp_logits = evaluate_classifier(fp_model, val_loader, loaded.class_names,
                                                    class_indices=loaded.class_indices,
                                                    device=device, progress=job.progress)
    with _stage(timings, "calibration_set_s"):
        calib = build_calibration_set(job, source, pre, fp_model, val_set, device,
                                      eval_features=torch.cat(eval_rows) if eval_rows else None)
    calib_loader = calib.loader
    torch.manual_seed(job.seed)
    log.info(describe_calibration(calib.record))
    with _stage(timings, "save_fp32_s"):
        fp_file = save_float_model(out / "models" / "vit_fp32.safetensors", fp_model)
    fp_bytes = fp_file["size_bytes"]
    fp_metrics.update({"top1_drop": 0.0, "agreement": 100.0, "lost_vs_fp32": 0,
                       "gained_vs_fp32": 0, "drop_p_value": 1.0, "sqnr_db": math.inf, "kl_div": 0.0})
    variants = [Variant("fp32", fp_model, None, fp_metrics, file=fp_file)]
    log.info(f"fp32: top-1 {fp_metrics['top1']:.2f}%  top-5 {fp_metrics['top5']:.2f}%")

    cache_key = cache_base(job.model_path, source.describe(), calib.identity, len(val_set), job.float_dtype)
    if job.preprocessing:  # results depend on the transform, changed by the flag
        cache_key["preprocessing"] = pre.to_dict()
    recipes = [job.recipe] + ([job.baseline] if job.baseline and job.baseline != job.recipe else [])
    skipped: list[str] = []
    shared = SharedFloatStatistics()  # float statistics computed once for every bit depth
    with _stage(timings, "variants_s"):
        for w_bits, a_bits in dict.fromkeys(job.bit_pairs):  # each pair once, in the order given
            for recipe in recipes:
                cfg = variant_config(job, recipe, w_bits, a_bits, job.overrides)
                name = variant_name(cfg, job.recipe)
                if quantizes_nothing(fp_model, cfg):
                    skipped.append(name)
                    continue
                variants.append(get_variant(out, name, cfg, cache_key, fp_model, fp_logits, loaded,
                                            calib_loader, val_loader, job, reuse=not info.enabled, shared=shared))
                hold_within_budget(variants)  # 224-px models: reloaded from their files when needed
                release_freed_memory()  # what the variant's calibration freed (ViT-B/16: ~2 GB)
    shared.clear()
    if skipped:
        log.warning(f"WARNING: nothing would be quantized (--override ...=float and the --no-* switches "
                    f"keep every layer float): skipped {', '.join(skipped)} and what needs them (their "
                    "rows would only repeat fp32)")

    mixed = None
    if (job.avg_bits is not None or job.max_weight_bytes is not None) and not skipped:
        with _stage(timings, "mixed_precision_s"):
            mixed, variant = mixed_precision_variant(job, fp_model, fp_logits, loaded, calib_loader, val_loader,
                                                     local_loader, out, cache_key, info)
        variants.append(variant)
        hold_within_budget(variants)

    with _stage(timings, "onnx_s"):
        onnx_result = onnx_int8(variants, fp_logits, val_loader, loaded, out, job, info) \
            if job.onnx and not skipped else None

    # timed by rank 0 alone while the others wait, so no rank steals its cores
    with _stage(timings, "latency_s"):
        latency = measure_latency(variants, loaded, job) if info.is_main else {}
    summary = build_summary(job, loaded, source.describe(), calib.record, variants, latency, fp_bytes)
    if skipped:
        summary["skipped_variants"] = {name: "nothing quantized: every layer kept float" for name in skipped}
    if mixed is not None:
        summary["mixed_precision"] = json_safe(mixed)
    if onnx_result is not None and onnx_result.get("failed"):
        summary["onnx"] = onnx_result
        summary["failures"] = [f"ONNX export failed: {onnx_result['error']}"]
    elif onnx_result is not None:
        summary["onnx"] = json_safe(onnx_result)
        summary["rows"] += onnx_rows(onnx_result, fp_metrics["top1"], fp_bytes, job.latency_batches)
    summary["timings"] = _timings(timings, variants)
    write_summary(out, summary)
    log.info(format_table(summary["rows"], job.latency_batches))
    log.info(f"wrote {out / 'summary.json'} and {out / 'summary.csv'}")
    if job.analysis != "none" and info.is_main:
        with _stage(timings, "analysis_s"):
            analysis = run_analysis(job.analysis, fp_model, VariantModels(variants), calib_loader, local_loader,
                                    fp_logits, config_maker(job), progress=job.progress)
        with _stage(timings, "report_s"):
            report_path = write_report(out, summary, analysis)
        summary["timings"] = _timings(timings, variants)
        write_summary(out, summary)  # again, with the analysis and report times
        log.info(f"analysis '{job.analysis}' took {timings['analysis_s'] + timings['report_s']:.1f}s; "
                 f"report: {report_path}")
        suggested = (analysis.get("sensitivity") or {}).get("cli")
        if suggested:
            log.info(f"most sensitive layers; to keep them at 8 bits add: {suggested}")
    log.info("stage times: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in summary["timings"]["stages"].items()))
    return summary


def _timings(stages: dict[str, float], variants: list[Variant]) -> dict[str, Any]:
    """summary.json's ``timings``: wall seconds per job stage and, per variant, per step of
    its quantization (``reparam_s``, ``gptq_s``, ``calibrate_s``, ...), save and evaluation."""
    return json_safe({"stages": {k: round(v, 3) for k, v in stages.items()},
                      "variants": {v.name: {k: round(x, 3) if isinstance(x, float) else x
                                            for k, x in (v.report.get("timings") or {}).items()}
                                   for v in variants if v.config is not None}})


__all__ = ["PTQJob", "run"]
