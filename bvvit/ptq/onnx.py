"""The ONNX stage of a PTQ job: the FP32 and W8A8 models (and W4 weight-only when ONNX
Runtime can run it) exported with our scales (:mod:`bvvit.quant.export`), evaluated and
timed in ONNX Runtime's real integer kernels (:mod:`bvvit.runtime.onnxruntime`) beside
PyTorch FP32 (:func:`export_and_measure`).
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import onnxruntime as ort
import torch

from bvvit.config import Preprocessing
from bvvit.distributed import DistInfo
from bvvit.errors import BVViTError, WriteError
from bvvit.evaluate.classification import classification_metrics, collect_logits
from bvvit.evaluate.latency import measure_interleaved
from bvvit.io import WRITE_ERRNOS
from bvvit.metrics import agreement, sqnr_db
from bvvit.model_file import LoadedModel
from bvvit.ptq.variants import Variant
from bvvit.quant.export import export_float_onnx, export_qdq_onnx, export_w4_weight_only_onnx
from bvvit.runtime.onnxruntime import integer_op_report, make_session, matmul_nbits_error, numpy_fn, session_fn
from bvvit.system import system_info

log = logging.getLogger(__name__)


def onnx_int8(variants: list[Variant], fp_logits: torch.Tensor, val_loader: Iterable, loaded: LoadedModel,
              out: Path, job: Any, info: DistInfo) -> Optional[dict[str, Any]]:
    """Real integer inference: ONNX FP32 and W8A8 (our scales as Q/DQ) in ONNX Runtime,
    evaluated and timed beside PyTorch FP32; 4-bit weight-only when ORT can run it.

    Returns the measurement (see ``export_and_measure``), None when there is nothing to
    export or the model cannot be exported (said in one line), or ``{"failed": True,
    "error", "detail"}`` when a file could not be written (a full disk: a failure of the run,
    reported at its end)."""
    by_name = {v.name: v for v in variants}
    w8a8 = by_name.get("w8a8")
    if w8a8 is None:
        log.info("ONNX int8: skipped (no w8a8 variant in this run; add 8 to --bits)")
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
        log.info(f"ONNX int8: skipped: {failure or exc}" + (f" ({exc})" if failure else ""))
        # a full disk is a failure of the run (reported at its end), not a limitation of the model
        return {"failed": True, "error": failure, "detail": str(exc)} if failure else None
    acc = result["accuracy"]
    log.info(f"ONNX Runtime: fp32 top-1 {acc['ort_fp32']['top1']:.2f}%, int8 W8A8 top-1 "
             f"{acc['ort_w8a8']['top1']:.2f}% (simulated {acc['pytorch_w8a8_sim']['top1']:.2f}%)"
             + (f", fused attention {acc['ort_w8a8_fused']['top1']:.2f}%" if "ort_w8a8_fused" in acc else "")
             + f", integer ops in the optimized graph: {result['checks'].get('w8a8_integer_ops')} "
             f"({time.perf_counter() - start:.1f}s)")
    if result["w8a8_fused"]["error"]:
        log.info(f"ONNX fused attention: not exported ({result['w8a8_fused']['error']})")
    return result


def _write_failure(exc: BaseException) -> Optional[str]:
    """"no space left on device" (or the like) when ``exc`` is a failed write, else None."""
    code = exc.errno if isinstance(exc, (WriteError, OSError)) else None
    if code not in WRITE_ERRNOS:
        return None
    return "no space left on device" if code in (errno.ENOSPC, errno.EDQUOT) else \
        f"cannot write ({os.strerror(code).lower()})"


def _vs_fp32(logits: torch.Tensor, fp_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Top-1 and the paired comparison with the float model on the same images."""
    m = classification_metrics(logits, labels, reference_logits=fp_logits)
    return {key: m[key] for key in ("top1", "agreement", "lost_vs_fp32", "gained_vs_fp32", "drop_p_value")}


def _batch_of(loader: Iterable, size: int) -> torch.Tensor:
    """``size`` real images from the loader (repeated when it has fewer)."""
    images: list[torch.Tensor] = []
    count = 0
    for batch in loader:
        images.append(batch[0])
        count += batch[0].shape[0]
        if count >= size:
            break
    if not images:
        raise BVViTError("the validation loader yielded no images")
    x = torch.cat(images)
    repeats = -(-size // x.shape[0])
    return x.repeat(repeats, 1, 1, 1)[:size].contiguous().float()


def export_and_measure(fp_model: torch.nn.Module, qmodel_w8a8: torch.nn.Module, val_loader: Iterable,
                       out_dir: str | os.PathLike, preprocessing: Preprocessing | Mapping[str, Any],
                       class_names: Sequence[str], fp_logits: torch.Tensor,
                       sim_w8a8_logits: torch.Tensor, latency_runs: int = 20,
                       batch_sizes: Sequence[int] = (1, 64),
                       qmodel_w4: Optional[torch.nn.Module] = None, warmup: int = 5,
                       threads: Optional[int] = None,
                       max_batches: Optional[int] = None,
                       measure_latency: bool = True) -> dict[str, Any]:
    """Export FP32 / W8A8 (/ W4) ONNX into ``OUT/onnx/``, evaluate and time them.

    ``fp_logits`` / ``sim_w8a8_logits``: the PyTorch FP32 and simulated (fake-quant) W8A8
    logits over ``val_loader`` in its order (``max_batches`` batches of it, if given).
    Latency is measured interleaved in this process (:func:`measure_interleaved`), ORT with
    ``threads`` intra-op threads (default: torch's thread count, so both runtimes get the same).

    Returns a JSON-serialisable dict:

    - ``files``: variant -> path of the .onnx file (``fp32``, ``w8a8``, ``w8a8_fused`` (the
      same W8A8 Linears, each block's qkv + attention one QAttention node, attention in float:
      the fastest file), ``w4`` when exported)
    - ``size_bytes``: variant -> file size; ``size_ratio_to_fp32``: variant -> size / fp32 size
    - ``accuracy``: variant (``pytorch_fp32``, ``pytorch_w8a8_sim``, ``ort_fp32``, ``ort_w8a8``,
      ``ort_w8a8_fused``, ``ort_w4``) -> ``{"top1", "agreement"}`` (percent, agreement with FP32),
      ``lost_vs_fp32`` / ``gained_vs_fp32`` (images) and ``drop_p_value`` (McNemar); ort_w8a8 adds
      ``agreement_with_sim`` and ``sqnr_db_vs_sim``, ort_fp32 ``max_abs_diff_vs_pytorch``
    - ``checks``: ``fp32_top1_delta`` (ORT - PyTorch, points), ``fp32_within_0.01``,
      ``w8a8_top1_delta_vs_sim``, ``w8a8_within_0.3``, ``w8a8_integer_ops`` (bool)
    - ``integer_ops``: :func:`integer_op_report` of the W8A8 graph as ORT optimized it
    - ``w4``: ``{"exported": bool, "error": str | None, "integer_ops": {...}}``; ``w8a8_fused``:
      ``{"exported": bool, "error": str | None, "integer_ops": {...}}``
    - ``latency`` (empty with ``measure_latency=False``): list of rows ``{"name", "batch_size", "median_ms", "p90_ms", "runs",
      "warmup", "speedup_vs_pytorch_fp32", "speedup_vs_ort_fp32"}``; names are
      ``pytorch_fp32``, ``ort_fp32``, ``ort_w8a8`` (, ``ort_w8a8_fused``, ``ort_w4``)
    - ``threads``: ``{"torch", "onnxruntime"}``; ``system``: :func:`system_info`;
      ``num_images``; ``onnxruntime_version``; ``exporter``
    """
    onnx_dir = Path(out_dir) / "onnx"
    threads = int(threads or torch.get_num_threads())
    files = {"fp32": onnx_dir / "vit_fp32.onnx", "w8a8": onnx_dir / "vit_w8a8.onnx"}
    export_float_onnx(fp_model, files["fp32"], preprocessing, class_names)
    export_qdq_onnx(qmodel_w8a8, files["w8a8"], preprocessing, class_names)
    fused: dict[str, Any] = {"exported": False, "error": None}
    try:
        files["w8a8_fused"] = export_qdq_onnx(qmodel_w8a8, onnx_dir / "vit_w8a8_fused_attention.onnx",
                                              preprocessing, class_names, attention="fused")
        fused["exported"] = True
    except BVViTError as exc:
        fused["error"] = str(exc)
    w4: dict[str, Any] = {"exported": False, "error": None}
    if qmodel_w4 is not None:
        w4["error"] = matmul_nbits_error()
    if qmodel_w4 is not None and w4["error"] is None:
        try:
            files["w4"] = export_w4_weight_only_onnx(qmodel_w4, onnx_dir / "vit_w4_weight_only.onnx",
                                                     preprocessing, class_names)
            w4["exported"] = True
        except BVViTError as exc:
            w4["error"] = str(exc)

    # No spinning: a pool spinning after its run steals the cores from the next variant.
    sessions = {name: make_session(path, threads=threads, allow_spinning=False)
                for name, path in files.items()}
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "w8a8_optimized.onnx"
        make_session(files["w8a8"], threads=threads, optimized_model_path=optimized)
        int_report = integer_op_report(optimized)
        if "w8a8_fused" in files:
            fused_optimized = Path(folder) / "w8a8_fused_optimized.onnx"
            make_session(files["w8a8_fused"], threads=threads, optimized_model_path=fused_optimized)
            fused["integer_ops"] = integer_op_report(fused_optimized)["integer_ops"]
        if "w4" in files:
            w4_optimized = Path(folder) / "w4_optimized.onnx"
            make_session(files["w4"], threads=threads, optimized_model_path=w4_optimized)
            w4["integer_ops"] = integer_op_report(w4_optimized)["integer_ops"]

    logits = {}
    labels = None
    for name, session in sessions.items():
        logits[name], labels = collect_logits(session_fn(session), val_loader, max_batches=max_batches)
    fp_logits, sim_logits = torch.as_tensor(fp_logits).float(), torch.as_tensor(sim_w8a8_logits).float()
    if fp_logits.shape != logits["fp32"].shape or sim_logits.shape != logits["fp32"].shape:
        raise ValueError(f"fp_logits {tuple(fp_logits.shape)} / sim_w8a8_logits "
                         f"{tuple(sim_logits.shape)} do not match the loader's "
                         f"{tuple(logits['fp32'].shape)}")
    accuracy = {
        "pytorch_fp32": _vs_fp32(fp_logits, fp_logits, labels),
        "pytorch_w8a8_sim": _vs_fp32(sim_logits, fp_logits, labels),
    }
    for name in files:
        accuracy[f"ort_{name}"] = _vs_fp32(logits[name], fp_logits, labels)
    accuracy["ort_fp32"]["max_abs_diff_vs_pytorch"] = float((logits["fp32"] - fp_logits).abs().max())
    accuracy["ort_w8a8"]["agreement_with_sim"] = agreement(sim_logits, logits["w8a8"])
    accuracy["ort_w8a8"]["sqnr_db_vs_sim"] = _finite(sqnr_db(sim_logits, logits["w8a8"]))
    fp_delta = accuracy["ort_fp32"]["top1"] - accuracy["pytorch_fp32"]["top1"]
    w8_delta = accuracy["ort_w8a8"]["top1"] - accuracy["pytorch_w8a8_sim"]["top1"]

    sizes = {name: path.stat().st_size for name, path in files.items()}
    latency = _interleaved_latency(fp_model, sessions, val_loader, batch_sizes, warmup,
                                   latency_runs) if measure_latency else []
    return {
        "files": {name: str(path) for name, path in files.items()},
        "size_bytes": sizes,
        "size_ratio_to_fp32": {name: size / sizes["fp32"] for name, size in sizes.items()},
        "accuracy": accuracy,
        "num_images": int(labels.numel()),
        "checks": {"fp32_top1_delta": fp_delta, "fp32_within_0.01": abs(fp_delta) <= 0.01,
                   "w8a8_top1_delta_vs_sim": w8_delta, "w8a8_within_0.3": abs(w8_delta) <= 0.3,
                   "w8a8_integer_ops": bool(int_report["ok"])},
        "integer_ops": int_report,
        "w4": w4,
        "w8a8_fused": fused,
        "latency": latency,
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": threads},
        "system": system_info(),
        "onnxruntime_version": ort.__version__,
        "exporter": "torch.onnx.export (TorchScript, dynamo=False), opset 17, QDQ",
    }


def _interleaved_latency(fp_model: torch.nn.Module, sessions: Mapping[str, ort.InferenceSession],
                         loader: Iterable, batch_sizes: Sequence[int], warmup: int,
                         runs: int) -> list[dict[str, Any]]:
    fp_model = fp_model.eval()
    fns: dict[str, Callable[[Any], Any]] = {"pytorch_fp32": fp_model}
    to_input: dict[str, Callable[[torch.Tensor], Any]] = {}
    for name, session in sessions.items():
        fns[f"ort_{name}"] = numpy_fn(session)
        to_input[f"ort_{name}"] = lambda x: np.ascontiguousarray(x.numpy(), dtype=np.float32)
    inputs = {int(b): _batch_of(loader, int(b)) for b in batch_sizes}
    kinds = {"pytorch_fp32": "float", "ort_fp32": "float", "ort_w8a8": "integer",
             "ort_w8a8_fused": "integer", "ort_w4": "weight_only_int4"}
    results = measure_interleaved(fns, inputs, warmup=warmup, runs=max(10, runs),
                                  kinds={k: v for k, v in kinds.items() if k in fns}, to_input=to_input)
    base = {(r.name, r.batch_size): r.median_ms for r in results}
    return [{"name": r.name, "kind": r.kind, "batch_size": r.batch_size, "median_ms": r.median_ms,
             "p90_ms": r.p90_ms, "runs": r.runs, "warmup": r.warmup,
             "speedup_vs_pytorch_fp32": base[("pytorch_fp32", r.batch_size)] / r.median_ms,
             "speedup_vs_ort_fp32": base[("ort_fp32", r.batch_size)] / r.median_ms}
            for r in results]


def _finite(value: float) -> float | str:
    return value if np.isfinite(value) else ("inf" if value > 0 else "-inf")


__all__ = ["onnx_int8", "export_and_measure"]
