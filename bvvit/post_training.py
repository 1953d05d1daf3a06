"""The post-training job behind ``post_training.py``: quantize a trained model at several
bit depths and measure each against the float original.

    load model file -> data (classes checked) -> FP32 evaluation (reference logits)
      -> for each bit depth and recipe: quantize_model (calibrated on TRAINING images)
           -> evaluate vs FP32 -> packed file (real size)
      -> latency of every variant, interleaved in one run
      -> summary.json / summary.csv (+ the report stage draws from them)

Under ``torchrun --nproc_per_node N post_training.py ...`` every evaluation is sharded:
rank r evaluates images r, r+N, ... and the logits are gathered exactly (no image
duplicated or lost), so each rank holds the same full results. Calibration (a few hundred
images) is replicated: every rank computes the same quantized model. Rank 0 alone writes
files, prints, measures latency (the others wait) and runs the analysis; a mixed-precision
allocation is rank 0's, broadcast. Reuse of finished bit depths is single-process only.

The output folder is claimed for the run (bvvit.run_dir): one writer at a time; a folder
holding another model's results (or results without a manifest) is refused unless
``overwrite`` moves it aside; ``manifest.json`` records the model's sha256, the settings and
every file the run wrote or reused, and a finished run removes the files earlier runs of
the folder wrote that it did not. Packed files are reused only when their content hash
matches the one in their result record.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from bvvit import __version__
from bvvit.config import LayerOverride, QuantConfig
from bvvit.data import build_dataset, build_loader, build_transform, calibration_loader, resolve_data
from bvvit.errors import BVViTError, DataError, WriteError
from bvvit.evaluate.analysis import run_analysis
from bvvit.evaluate.classification import collect_logits, evaluate_classifier
from bvvit.evaluate.sensitivity import sensitivity
from bvvit.evaluate.latency import measure_interleaved
from bvvit.distributed import (DistInfo, ShardSampler, barrier, broadcast_from_main, init_distributed,
                               shutdown_distributed)
from bvvit.io import WRITE_ERRNOS, atomic_write_json, atomic_write_text, json_safe, recording_writes, sha256_file
from bvvit.model_file import LoadedModel, load_model_file
from bvvit.quant.modules import act_quantizers, weight_modules
from bvvit.quant.quantize import convert, quantize_model
from bvvit.quant.onnx_runtime import export_and_measure
from bvvit.quant.mixed_precision import allocate_bits, damage_table
from bvvit.quant.recipes import make_quant_config
from bvvit.report import write_report
from bvvit.quant.storage import load_quantized_model, save_float_model, save_quantized_model
from bvvit.run_dir import MANIFEST_NAME, RunManifest, claim_output_dir, read_manifest
from bvvit.system import system_info

DEFAULT_BITS = (4, 6, 8, 10, 12, 16)
SUMMARY_COLUMNS = ["name", "w_bits", "a_bits", "recipe", "top1", "top5", "top1_drop", "agreement",
                   "lost_vs_fp32", "gained_vs_fp32", "drop_p_value", "sqnr_db", "kl_div", "size_bytes",
                   "size_ratio", "latency_ms_b1", "latency_ms_b64", "kernel", "calibration_time_s"]


@dataclass
class PTQJob:
    model_path: str
    output_dir: str
    data_path: Optional[str] = None  # default: what the checkpoint was trained on
    bit_pairs: list[tuple[int, int]] = field(default_factory=lambda: [(b, b) for b in DEFAULT_BITS])
    recipe: str = "vit"
    baseline: Optional[str] = "minmax"  # also run this recipe at each bit depth (None: skip)
    calib_size: int = 1024
    batch_size: int = 256
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    eval_subset: Optional[int] = None
    latency_runs: int = 20
    latency_batches: tuple[int, ...] = (1, 64)
    overrides: list[LayerOverride] = field(default_factory=list)
    switches: dict[str, bool] = field(default_factory=dict)
    float_dtype: str = "fp16"  # dtype of the float parts inside packed files (evaluated as stored)
    analysis: str = "basic"  # none | basic | full (adds per-layer sensitivity)
    num_heads: Optional[int] = None  # for bare timm state dicts (not in the tensor shapes)
    avg_bits: Optional[float] = None  # mixed precision budget: mean weight bits
    max_weight_bytes: Optional[int] = None  # ... or packed weight bytes
    mp_candidates: tuple[int, ...] = (4, 6, 8)
    onnx: bool = True  # export FP32/W8A8 ONNX and measure ONNX Runtime's integer kernels
    overwrite: bool = False  # move a folder holding earlier results aside instead of continuing it


# What marks a folder as holding post_training results (see _claimed_output_dir).
RESULT_MARKERS = (MANIFEST_NAME, "summary.json", "summary.csv", "report.html", "report.md",
                  "analysis.json", "sensitivity.csv", "models", "onnx", "plots")


@dataclass
class Variant:
    name: str
    model: nn.Module
    config: Optional[QuantConfig]
    metrics: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    file: Optional[dict[str, Any]] = None
    logits: Optional[torch.Tensor] = None  # on the evaluation split (not kept for reused variants)


def _check_classes(loaded: LoadedModel, source_classes: list[str], data_desc: str, model_path: str) -> None:
    if list(source_classes) != list(loaded.class_names):
        raise DataError(f"{data_desc} has classes {_short(source_classes)} but {model_path} was trained "
                        f"on {_short(loaded.class_names)}; pass the --data-path it was trained on")


def _short(names: list[str]) -> str:
    return "[" + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") + f"] ({len(names)})"


def run(job: PTQJob) -> dict[str, Any]:
    """Run ``job``; under torchrun (WORLD_SIZE > 1) as one rank of a sharded evaluation."""
    info = init_distributed(torch.device(job.device).type)
    if not info.enabled:
        return _raise_failures(_run_in_claimed_folder(job, info), job)
    # Ranks > 0 compute alongside rank 0 (the evaluations are collective) but write into a
    # private folder that is deleted afterwards, and print nothing.
    scratch = None if info.is_main else Path(tempfile.mkdtemp(prefix=f"bvvit-rank{info.rank}-"))
    try:
        if info.is_main:
            summary = _run_in_claimed_folder(job, info)
        else:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                summary = _run(dataclasses.replace(job, progress=False), info, scratch)
        barrier(info)  # rank 0's files are complete when any rank returns
        return _raise_failures(summary, job)
    finally:  # on an error torchrun stops the other ranks; no barrier to hang in
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        shutdown_distributed()


def _run_in_claimed_folder(job: PTQJob, info: DistInfo) -> dict[str, Any]:
    """:func:`_run` in ``job.output_dir`` claimed for this model: locked, its manifest kept
    up to date, and the files earlier runs left that this one did not make removed."""
    out = Path(job.output_dir)
    digest = _model_digest(job.model_path)
    with _claimed_output_dir(job, out, digest) as manifest:
        with recording_writes(on_write=manifest.note_written) as written:
            summary = _run(job, info, out)
        removed = manifest.finish(written + _variant_files(out, summary), {"data": summary["data"]})
        if removed:
            print(f"removed {len(removed)} file(s) an earlier run left in {out} that this run did "
                  f"not make: {', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''}")
    return summary


def _raise_failures(summary: dict[str, Any], job: PTQJob) -> dict[str, Any]:
    """``summary``, or a one-line WriteError when a part of the run could not be written
    (ONNX on a full disk): the run fails at its end, after every other result is written."""
    failures = summary.get("failures") or []
    if failures:
        raise WriteError(f"{failures[0]}; every other result is written to {job.output_dir} "
                         "(summary.json records the failure): free disk space and rerun (finished "
                         "bit depths are reused)")
    return summary


def _model_digest(model_path: str) -> str:
    """sha256 of the model file (its one-line error when it is not a readable file)."""
    if not Path(model_path).is_file():
        load_model_file(model_path)  # raises the loader's one-line error (missing, a folder, ...)
    return sha256_file(model_path)


@contextlib.contextmanager
def _claimed_output_dir(job: PTQJob, out: Path, digest: str) -> Any:
    """Lock ``out`` and start its manifest for the model with sha256 ``digest``. Earlier
    results of the same model are continued (finished bit depths reused); those of another
    model, or without a manifest, are refused unless ``job.overwrite`` moves them aside."""
    def refusal(folder: Path, found: list[str]) -> Optional[str]:
        previous = read_manifest(folder)
        if previous is None:
            return (f"{folder} holds post_training results ({', '.join(found[:3])}) without a "
                    f"{MANIFEST_NAME}, so they may be another model's; pass --overwrite to move "
                    "them aside or choose another --output-dir")
        model = previous.get("model") or {}
        if model.get("sha256") != digest:
            return (f"{folder} holds the results of another model ({model.get('path')}, sha256 "
                    f"{str(model.get('sha256'))[:12]}) but {job.model_path} has sha256 {digest[:12]}; "
                    "pass --overwrite to move them aside or choose another --output-dir")
        return None

    inputs = [job.model_path, job.data_path or ""]
    with claim_output_dir(out, RESULT_MARKERS, refusal, job.overwrite, inputs):
        identity = {"tool": "post_training.py",
                    "model": {"path": str(Path(job.model_path).resolve()), "sha256": digest}}
        yield RunManifest.begin(out, identity, _settings(job), read_manifest(out))


def _settings(job: PTQJob) -> dict[str, Any]:
    """The job's settings that define its results (for the manifest)."""
    skip = {"model_path", "output_dir", "progress", "overwrite"}
    return json_safe({k: v for k, v in dataclasses.asdict(job).items() if k not in skip})


def _variant_files(out: Path, summary: dict[str, Any]) -> list[Path]:
    """The packed file and result record of every quantized variant in ``summary`` (written
    or reused by this run)."""
    names = [name for name, v in summary["variants"].items() if v.get("quant_config")]
    return [path for name in names for path in (_packed_path(out, name), _result_path(out, name))]


def _stored_data_path(loaded: LoadedModel, model_path: str) -> str:
    """The data set the model was trained on, as its file records it: the absolute folder
    run.py resolved (``root``) when it exists, else the ``data_path`` given then. A stored
    path that does not exist here is one line naming it (the user never passed it)."""
    stored = loaded.data.get("data_path") or "fashion-mnist"
    if str(stored).strip().lower() == "fashion-mnist":
        return stored
    root = loaded.data.get("root")
    candidates = [str(c) for c in (root if root and Path(root).is_absolute() else None, stored) if c]
    for candidate in candidates:
        if Path(candidate).expanduser().exists():
            return candidate
    where = " or ".join(dict.fromkeys(candidates))
    raise DataError(f"the data set stored in {model_path} ({where}) does not exist here; pass "
                    "--data-path with the folder the model was trained on")


def _quantizes_nothing(fp_model: nn.Module, cfg: QuantConfig) -> bool:
    """True when ``cfg`` leaves every layer float (``--override '*=float'``, or every op type
    switched off): such a variant would only repeat the FP32 row."""
    if cfg.linear and cfg.head and cfg.patch_embed and not any(o.keep_float for o in cfg.overrides):
        return False  # the head alone is quantized
    qmodel, _ = convert(fp_model, cfg)
    return not weight_modules(qmodel) and not act_quantizers(qmodel)


def _run(job: PTQJob, info: DistInfo, out: Path) -> dict[str, Any]:
    device = torch.device(job.device)
    loaded = load_model_file(job.model_path, num_heads=job.num_heads)
    if loaded.data.get("kind") == "timm-state-dict":
        if not job.data_path:
            raise DataError(f"{job.model_path} is a bare timm state dict: pass --data-path (an "
                            "ImageNet-style folder whose class folders match its head)")
        source = resolve_data(job.data_path)
        if source.num_classes != loaded.config.num_classes:
            raise DataError(f"{source.describe()} has {source.num_classes} classes but the head of "
                            f"{job.model_path} has {loaded.config.num_classes}")
        loaded.class_names = list(source.class_names)
        print(f"timm state dict: inferred ViT depth {loaded.config.depth}, dim "
              f"{loaded.config.embed_dim}, {loaded.config.num_heads} heads, patch "
              f"{loaded.config.patch_size}, {loaded.config.img_size}px; ImageNet normalisation")
    else:
        source = resolve_data(job.data_path or _stored_data_path(loaded, job.model_path))
    _check_classes(loaded, list(source.class_names), source.describe(), job.model_path)
    if source.in_chans != loaded.config.in_chans:
        raise DataError(f"{source.describe()} has {source.in_chans}-channel images but the model "
                        f"expects {loaded.config.in_chans}; pass the --data-path it was trained on")
    pre = loaded.preprocessing
    val_set = build_dataset(source, "val", build_transform(pre, train=False), subset=job.eval_subset)
    if info.enabled and len(val_set) < info.world_size:
        raise DataError(f"{len(val_set)} evaluation images cannot be shared by {info.world_size} "
                        "processes; run with fewer processes or more images")
    val_loader = build_loader(val_set, job.batch_size, shuffle=False, sampler=ShardSampler(
        len(val_set), info, gather=True) if info.enabled else None)
    # Work only one rank does (sensitivity for mixed precision, analysis) sees every image in
    # dataset order, not one shard: the same images as a one-process run.
    local_loader = build_loader(val_set, job.batch_size, shuffle=False) if info.enabled else val_loader
    calib_loader, calib_indices = calibration_loader(source, pre, job.calib_size, job.seed,
                                                     batch_size=min(64, job.batch_size))
    torch.manual_seed(job.seed)
    print(f"model: {job.model_path} (ViT {loaded.config.depth}x{loaded.config.embed_dim}, "
          f"patch {loaded.config.patch_size}); data: {source.describe()}; "
          f"evaluating on {len(val_set)} images, calibrating on {len(calib_indices)} training images")

    fp_model = loaded.model.to(device).eval()
    fp_metrics, fp_logits = evaluate_classifier(fp_model, val_loader, loaded.class_names,
                                                device=device, progress=job.progress)
    fp_file = save_float_model(out / "models" / "vit_fp32.safetensors", fp_model)
    fp_bytes = fp_file["size_bytes"]
    fp_metrics.update({"top1_drop": 0.0, "agreement": 100.0, "lost_vs_reference": 0,
                       "gained_vs_reference": 0, "drop_p_value": 1.0, "sqnr_db": math.inf, "kl_div": 0.0})
    variants = [Variant("fp32", fp_model, None, fp_metrics, file=fp_file)]
    print(f"fp32: top-1 {fp_metrics['top1']:.2f}%  top-5 {fp_metrics['top5']:.2f}%")

    cache_key = _cache_base(job, source.describe(), calib_indices, len(val_set))
    recipes = [job.recipe] + ([job.baseline] if job.baseline and job.baseline != job.recipe else [])
    skipped: list[str] = []
    for w_bits, a_bits in dict.fromkeys(job.bit_pairs):  # each pair once, in the order given
        for recipe in recipes:
            cfg = make_quant_config(recipe, w_bits, a_bits, calib_size=job.calib_size, seed=job.seed,
                                    overrides=list(job.overrides), **job.switches)
            name = cfg.name if recipe == job.recipe else f"{cfg.name}-{recipe}"
            if _quantizes_nothing(fp_model, cfg):
                skipped.append(name)
                continue
            reused = None if info.enabled else _reuse_variant(out, name, cfg, cache_key)
            variants.append(reused or _make_variant(out, name, cfg, cache_key, fp_model, fp_logits,
                                                    loaded, calib_loader, val_loader, job))
    if skipped:
        print(f"WARNING: nothing would be quantized (--override ...=float and the --no-* switches "
              f"keep every layer float): skipped {', '.join(skipped)} and what needs them (their "
              "rows would only repeat fp32)")

    def make_config(bits: int, overrides: list) -> QuantConfig:
        return make_quant_config(job.recipe, bits, bits, calib_size=job.calib_size, seed=job.seed,
                                 overrides=list(overrides), **job.switches)

    mixed = None
    if (job.avg_bits is not None or job.max_weight_bytes is not None) and not skipped:
        mixed, variant = _mixed_precision(job, make_config, fp_model, fp_logits, loaded, calib_loader,
                                          val_loader, local_loader, out, cache_key, info)
        variants.append(variant)

    onnx_result = _onnx_int8(variants, fp_logits, val_loader, loaded, out, job, info) \
        if job.onnx and not skipped else None

    # timed by rank 0 alone while the others wait, so no rank steals its cores
    latency = _measure_latency(variants, loaded, job) if info.is_main else {}
    summary = _summary(job, loaded, source.describe(), calib_indices, variants, latency, fp_bytes)
    if skipped:
        summary["skipped_variants"] = {name: "nothing quantized: every layer kept float" for name in skipped}
    if mixed is not None:
        summary["mixed_precision"] = json_safe(mixed)
    if onnx_result is not None and onnx_result.get("failed"):
        summary["onnx"] = onnx_result
        summary["failures"] = [f"ONNX export failed: {onnx_result['error']}"]
    elif onnx_result is not None:
        summary["onnx"] = json_safe(onnx_result)
        summary["rows"] += onnx_rows(onnx_result, fp_metrics["top1"], fp_bytes)
    write_summary(out, summary)
    print(format_table(summary["rows"]))
    print(f"wrote {out / 'summary.json'} and {out / 'summary.csv'}")
    if job.analysis != "none" and info.is_main:
        start = time.perf_counter()
        qmodels = {v.name: v.model for v in variants if v.config is not None}
        analysis = run_analysis(job.analysis, fp_model, qmodels, calib_loader, local_loader, fp_logits,
                                make_config, progress=job.progress)
        report_path = write_report(out, summary, analysis)
        print(f"analysis '{job.analysis}' took {time.perf_counter() - start:.1f}s; "
              f"report: {report_path}")
        suggested = (analysis.get("sensitivity") or {}).get("cli")
        if suggested:
            print(f"most sensitive layers; to keep them at 8 bits add: {suggested}")
    return summary


def _onnx_int8(variants: list[Variant], fp_logits: torch.Tensor, val_loader: Any, loaded: LoadedModel,
               out: Path, job: PTQJob, info: DistInfo) -> Optional[dict[str, Any]]:
    """Real integer inference: ONNX FP32 and W8A8 (our scales as Q/DQ) in ONNX Runtime,
    evaluated and timed beside PyTorch FP32; 4-bit weight-only when ORT can run it."""
    by_name = {v.name: v for v in variants}
    w8a8 = by_name.get("w8a8")
    if w8a8 is None:
        print("ONNX int8: skipped (no w8a8 variant in this run; add 8 to --bits)")
        return None
    start = time.perf_counter()
    sim_logits = w8a8.logits if w8a8.logits is not None else collect_logits(w8a8.model, val_loader)[0]
    w4 = by_name.get("w4a4") or next((v for v in variants if v.config and v.config.w_bits == 4
                                      and v.config.recipe == job.recipe), None)
    try:
        result = export_and_measure(variants[0].model, w8a8.model, val_loader, out,
                                    loaded.preprocessing, loaded.class_names, fp_logits, sim_logits,
                                    latency_runs=job.latency_runs,
                                    batch_sizes=job.latency_batches,
                                    qmodel_w4=w4.model if w4 else None,
                                    measure_latency=info.is_main)
    except (BVViTError, OSError) as exc:
        failure = _write_failure(exc)
        if failure is None and not isinstance(exc, BVViTError):
            raise
        print(f"ONNX int8: skipped: {failure or exc}" + (f" ({exc})" if failure else ""))
        # a full disk is a failure of the run (reported at its end), not a limitation of the model
        return {"failed": True, "error": failure, "detail": str(exc)} if failure else None
    acc = result["accuracy"]
    print(f"ONNX Runtime: fp32 top-1 {acc['ort_fp32']['top1']:.2f}%, int8 W8A8 top-1 "
          f"{acc['ort_w8a8']['top1']:.2f}% (simulated {acc['pytorch_w8a8_sim']['top1']:.2f}%)"
          + (f", fused attention {acc['ort_w8a8_fused']['top1']:.2f}%" if "ort_w8a8_fused" in acc else "")
          + f", integer ops in the optimized graph: {result['checks'].get('w8a8_integer_ops')} "
          f"({time.perf_counter() - start:.1f}s)")
    if result["w8a8_fused"]["error"]:
        print(f"ONNX fused attention: not exported ({result['w8a8_fused']['error']})")
    return result


def _write_failure(exc: BaseException) -> Optional[str]:
    """"no space left on device" (or the like) when ``exc`` is a failed write, else None."""
    code = exc.errno if isinstance(exc, (WriteError, OSError)) else None
    if code not in WRITE_ERRNOS:
        return None
    return "no space left on device" if code in (errno.ENOSPC, errno.EDQUOT) else \
        f"cannot write ({os.strerror(code).lower()})"


def onnx_rows(result: dict[str, Any], fp_top1: float, fp_bytes: int) -> list[dict[str, Any]]:
    """summary.csv rows for the ONNX Runtime variants (real kernels)."""
    names = {"fp32": ("onnx-fp32", 32, 32, "onnxruntime-float", "ort_fp32"),
             "w8a8": ("onnx-w8a8", 8, 8, "onnxruntime-int8", "ort_w8a8"),
             "w8a8_fused": ("onnx-w8a8-fused-attention", 8, 8, "onnxruntime-int8-qattention",
                            "ort_w8a8_fused"),
             "w4": ("onnx-w4", 4, 32, "onnxruntime-int4-weight-only", "ort_w4")}
    latency = {(r["name"], r["batch_size"]): r["median_ms"] for r in result.get("latency", [])}
    rows = []
    for key, (name, w_bits, a_bits, kernel, acc_key) in names.items():
        if key not in result.get("files", {}) or acc_key not in result.get("accuracy", {}):
            continue
        acc = result["accuracy"][acc_key]
        size = result["size_bytes"].get(key)
        rows.append({"name": name, "w_bits": w_bits, "a_bits": a_bits, "recipe": "onnx",
                     "top1": round(acc["top1"], 4), "top5": None,
                     "top1_drop": round(fp_top1 - acc["top1"], 4),
                     "agreement": round(acc.get("agreement_with_fp32", float("nan")), 4),
                     "lost_vs_fp32": acc.get("lost_vs_fp32"), "gained_vs_fp32": acc.get("gained_vs_fp32"),
                     "drop_p_value": _p(acc.get("drop_p_value")),
                     "sqnr_db": acc.get("sqnr_db_vs_sim"), "kl_div": None, "size_bytes": size,
                     "size_ratio": round(size / fp_bytes, 4) if size else None,
                     "latency_ms_b1": latency.get((acc_key, 1)), "latency_ms_b64": latency.get((acc_key, 64)),
                     "kernel": kernel, "calibration_time_s": 0.0})
    return rows


def _mixed_precision(job: PTQJob, make_config: Any, fp_model: nn.Module, fp_logits: torch.Tensor,
                     loaded: LoadedModel, calib_loader: Any, val_loader: Any, local_loader: Any, out: Path,
                     cache_key: dict[str, Any], info: DistInfo) -> tuple[dict[str, Any], Variant]:
    """Per-layer widths from sensitivity under the budget, then that model as a variant
    (under torchrun: rank 0's allocation, from the same images as one process, on every rank)."""
    start = time.perf_counter()
    candidates = tuple(sorted(set(job.mp_candidates)))
    rows = sensitivity(fp_model, make_config, calib_loader, local_loader, bits=candidates[:-1],
                       reference_logits=fp_logits, progress=job.progress)
    params = {name: module.weight.numel() for name, module in fp_model.named_modules()
              if isinstance(module, (nn.Linear, nn.Conv2d))}
    allocation = broadcast_from_main(allocate_bits(damage_table(rows), params, list(candidates),
                                                   job.avg_bits, job.max_weight_bytes), info)
    base = allocation.base_bits
    overrides = list(job.overrides) + [LayerOverride.parse(o) for o in allocation.overrides()]
    cfg = make_quant_config(job.recipe, base, base, calib_size=job.calib_size, seed=job.seed,
                            overrides=overrides, **job.switches)
    budget = f"avg{job.avg_bits:g}" if job.avg_bits is not None else f"{job.max_weight_bytes}B"
    name = f"mixed-{budget}"
    reused = None if info.enabled else _reuse_variant(out, name, cfg, cache_key)
    variant = reused or _make_variant(out, name, cfg, cache_key, fp_model, fp_logits, loaded,
                                      calib_loader, val_loader, job)
    result = {**allocation.to_dict(), "candidates": list(candidates), "variant": name,
              "search_time_s": time.perf_counter() - start}
    print(f"{name}: mean weight width {allocation.avg_bits:.2f} bits; layers above {base} bits: "
          f"{', '.join(allocation.overrides()) or 'none'}")
    return result, variant


def _make_variant(out: Path, name: str, cfg: QuantConfig, cache_key: dict[str, Any],
                  fp_model: nn.Module, fp_logits: torch.Tensor, loaded: LoadedModel,
                  calib_loader: Any, val_loader: Any, job: PTQJob) -> Variant:
    start = time.perf_counter()
    qmodel, report = quantize_model(fp_model, cfg, calib_loader, job.device, job.progress)
    for warning in report.warnings:
        print(f"WARNING [{name}]: {warning}")
    # Saved first: with --float-dtype fp16 saving rounds the model to what the file holds.
    file_info = save_quantized_model(_packed_path(out, name), qmodel, cfg,
                                     loaded, report, float_dtype=job.float_dtype)
    metrics, logits = evaluate_classifier(qmodel, val_loader, loaded.class_names,
                                     reference_logits=fp_logits, device=job.device,
                                     progress=job.progress)
    variant = Variant(name, qmodel, cfg, metrics, report.to_dict(), file_info, logits)
    atomic_write_json(_result_path(out, name), json_safe({
        "key": _variant_key(cache_key, cfg), "metrics": metrics, "report": variant.report,
        "file": file_info}))
    print(f"{name}: top-1 {metrics['top1']:.2f}% (drop {metrics['top1_drop']:+.2f}), "
          f"agreement {metrics['agreement']:.2f}%, SQNR {metrics['sqnr_db']:.1f} dB, "
          f"file {file_info['size_bytes'] / 1024:.1f} KiB, calibration "
          f"{report.calibration_time_s:.1f}s ({time.perf_counter() - start:.1f}s total)", flush=True)
    return variant


def _result_path(out: Path, name: str) -> Path:
    return out / "models" / f"vit_{name}.result.json"


def _packed_path(out: Path, name: str) -> Path:
    return out / "models" / f"vit_{name}.safetensors"


def _cache_base(job: PTQJob, data_desc: str, calib_indices: list[int], num_eval: int) -> dict[str, Any]:
    """What a finished variant's result depends on besides its QuantConfig."""
    digest = sha256_file(job.model_path)
    return {"model_sha256": digest, "data": data_desc, "calib_indices_sha256": hashlib.sha256(
        json.dumps(calib_indices).encode()).hexdigest(), "num_eval": num_eval,
        "float_dtype": job.float_dtype, "bvvit_version": __version__}


def _variant_key(base: dict[str, Any], cfg: QuantConfig) -> str:
    text = json.dumps({**base, "quant_config": cfg.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _reuse_variant(out: Path, name: str, cfg: QuantConfig, base: dict[str, Any]) -> Optional[Variant]:
    """A variant finished by an earlier (maybe interrupted) run with the same checkpoint,
    data and config: reload its packed file and stored results instead of recomputing.
    The file must hold exactly the tensors its results were computed from (content hash
    in the result record = hash in the file = hash of its tensors); otherwise it is
    recomputed, and a line says why."""
    result_path = _result_path(out, name)
    model_path = _packed_path(out, name)
    if not result_path.is_file() or not model_path.is_file():
        return None
    try:
        stored = json.loads(result_path.read_text())
        if stored.get("key") != _variant_key(base, cfg):
            return None  # other settings: not this variant's results
        recorded = stored["file"].get("tensors_sha256")
        qmodel, meta = load_quantized_model(model_path)  # checks the file against its own hash
        if recorded is None or meta.get("tensors_sha256") != recorded:
            raise BVViTError(f"{model_path.name} is not the file its results in {result_path.name} "
                             "were computed from (content hashes differ or are missing)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, BVViTError) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{name}: not reusing the earlier result ({reason}); recomputing")
        return None
    print(f"{name}: reusing {model_path.name} and its results from an earlier run "
          f"(same checkpoint, data and config; content hash verified)")
    return Variant(name, qmodel, cfg, stored["metrics"], stored["report"], stored["file"])


def _measure_latency(variants: list[Variant], loaded: LoadedModel, job: PTQJob) -> dict[str, dict[int, Any]]:
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


def _summary(job: PTQJob, loaded: LoadedModel, data_desc: str, calib_indices: list[int],
             variants: list[Variant], latency: dict[str, dict[int, Any]], fp_bytes: int) -> dict[str, Any]:
    rows = []
    for v in variants:
        m = v.metrics
        lat = latency.get(v.name, {})
        size = v.file["size_bytes"] if v.file else None
        rows.append({
            "name": v.name,
            "w_bits": v.config.w_bits if v.config else 32,
            "a_bits": v.config.a_bits if v.config else 32,
            "recipe": v.config.recipe if v.config else "float",
            "top1": round(m["top1"], 4), "top5": round(m["top5"], 4),
            "top1_drop": round(m["top1_drop"], 4), "agreement": round(m["agreement"], 4),
            "lost_vs_fp32": m.get("lost_vs_reference"), "gained_vs_fp32": m.get("gained_vs_reference"),
            "drop_p_value": _p(m.get("drop_p_value")),
            "sqnr_db": m["sqnr_db"], "kl_div": m["kl_div"],
            "size_bytes": size, "size_ratio": round(size / fp_bytes, 4) if size else None,
            "latency_ms_b1": _lat(lat, 1), "latency_ms_b64": _lat(lat, 64),
            "kernel": "float" if v.config is None else "simulated",
            "calibration_time_s": round(v.report.get("calibration_time_s", 0.0), 3),
        })
    return json_safe({
        "bvvit_version": __version__,
        "model_path": str(job.model_path),
        "model_config": loaded.config.to_dict(),
        "class_names": loaded.class_names,
        "data": data_desc,
        "num_eval_images": variants[0].metrics["num_images"],
        "seed": job.seed,
        "calibration": {"size": len(calib_indices), "split": "train", "indices": calib_indices},
        "recipe": job.recipe, "baseline": job.baseline,
        "system": system_info(),
        "rows": rows,
        "variants": {v.name: {"metrics": v.metrics, "quant_config": v.config.to_dict() if v.config else None,
                              "coverage": v.report.get("coverage"), "layers": v.report.get("layers"),
                              "warnings": v.report.get("warnings", []),
                              "calibration_time_s": v.report.get("calibration_time_s"),
                              "file": v.file, "latency": latency.get(v.name)}
                     for v in variants},
        "notes": {
            "kernel": "'simulated' = fake-quant in float (accuracy is exact for the integer model, "
                      "latency is NOT an integer-kernel speed); 'float' = the FP32 model",
            "size_bytes": "bytes of the real .safetensors file under models/ (packed integer "
                          "weights for quantized variants; the float32 state dict for fp32)",
        },
    })


def _p(value: Optional[float]) -> Optional[float]:
    """A p-value to 4 significant digits (tiny ones stay visible, unlike round(p, 4))."""
    return None if value is None else float(f"{value:.4g}")


def _lat(lat: dict[int, Any], batch: int) -> Optional[float]:
    entry = lat.get(batch)
    return round(entry["median_ms"], 4) if entry else None


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(out / "summary.json", summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary["rows"])
    atomic_write_text(out / "summary.csv", buffer.getvalue())


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'name':<16}{'top1':>8}{'drop':>8}{'agree':>8}{'lost/gain':>11}{'p':>6}{'SQNR dB':>9}" \
             f"{'size KiB':>10}{'ratio':>7}{'b1 ms':>8}{'b64 ms':>8}  kernel"
    lines = [header, "-" * len(header)]
    for r in rows:
        sqnr = r["sqnr_db"] if isinstance(r["sqnr_db"], str) else \
            "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        flips = "-" if r.get("lost_vs_fp32") is None else f"{r['lost_vs_fp32']}/{r['gained_vs_fp32']}"
        p = "-" if r.get("drop_p_value") is None else \
            f"{r['drop_p_value']:.2f}" if r["drop_p_value"] >= 0.01 else "<.01"
        lines.append(f"{r['name']:<16}{r['top1']:>8.2f}{r['top1_drop']:>+8.2f}{r['agreement']:>8.2f}"
                     f"{flips:>11}{p:>6}{sqnr:>9}{(r['size_bytes'] or 0) / 1024:>10.1f}{r['size_ratio'] or 0:>7.3f}"
                     f"{r['latency_ms_b1'] or 0:>8.2f}{r['latency_ms_b64'] or 0:>8.2f}  {r['kernel']}")
    return "\n".join(lines)
