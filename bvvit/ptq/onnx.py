"""The deployment stage of a PTQ job: the FP32 and W8A8 models (and W4 weight-only when ONNX
Runtime can run it) exported with our scales (:mod:`bvvit.quant.export`, and for OpenVINO
:mod:`bvvit.quant.export_openvino`), evaluated and timed in each installed runtime's real
kernels (:mod:`bvvit.runtime.onnxruntime`, :mod:`bvvit.runtime.openvino`) beside PyTorch
FP32 (:func:`export_and_measure`).
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import onnxruntime as ort
import torch

from bvvit.config import Preprocessing
from bvvit.distributed import DistInfo
from bvvit.errors import BVViTError, ConfigError, WriteError
from bvvit.evaluate.classification import classification_metrics, collect_logits
from bvvit.evaluate.latency import measure_interleaved
from bvvit.io import WRITE_ERRNOS
from bvvit.metrics import agreement, sqnr_db
from bvvit.model_file import LoadedModel
from bvvit.ptq.variants import Variant
from bvvit.quant.export import export_float_onnx, export_qdq_onnx, export_w4_weight_only_onnx
from bvvit.quant.export_openvino import export_openvino_ir, float_attention_model
from bvvit.runtime.onnxruntime import integer_op_report, make_session, matmul_nbits_error, numpy_fn, session_fn
from bvvit.runtime.openvino import exec_graph_report, openvino_error, openvino_version
from bvvit.runtime.openvino import inference_precision as ov_inference_precision
from bvvit.runtime.openvino import make_session as ov_make_session
from bvvit.runtime.openvino import numpy_fn as ov_numpy_fn
from bvvit.runtime.openvino import session_fn as ov_session_fn
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
                                    measure_latency=info.is_main,
                                    runtimes=job.runtimes or installed_runtimes())
    except (BVViTError, OSError) as exc:
        failure = _write_failure(exc)
        if failure is None and not isinstance(exc, BVViTError):
            raise
        log.info(f"ONNX int8: skipped: {failure or exc}" + (f" ({exc})" if failure else ""))
        # a full disk is a failure of the run (reported at its end), not a limitation of the model
        return {"failed": True, "error": failure, "detail": str(exc)} if failure else None
    _log_accuracy(result, time.perf_counter() - start)
    return result


def _log_accuracy(result: Mapping[str, Any], seconds: float) -> None:
    """One line per runtime: top-1 of each file against the simulated model it executes."""
    acc = result["accuracy"]
    if "ort_fp32" in acc:
        line = f"ONNX Runtime: fp32 top-1 {acc['ort_fp32']['top1']:.2f}%"
        if "ort_w8a8" in acc:
            line += (f", int8 W8A8 top-1 {acc['ort_w8a8']['top1']:.2f}% (simulated "
                     f"{acc['pytorch_w8a8_sim']['top1']:.2f}%), integer ops in the optimized graph: "
                     f"{result['checks'].get('w8a8_integer_ops')}")
        if "ort_w8a8_fused" in acc:
            line += f", fused attention {acc['ort_w8a8_fused']['top1']:.2f}%"
        log.info(line)
        for key, what in (("w8a8", "int8 attention"), ("w8a8_fused", "fused attention")):
            if result[key]["error"]:
                log.info(f"ONNX {what}: not exported ({result[key]['error']})")
    ov = result.get("openvino") or {}
    if "ov_fp32" in acc:
        line = f"OpenVINO {ov.get('version')}: fp32 file top-1 {acc['ov_fp32']['top1']:.2f}% ({ov.get('precision')})"
        if "ov_w8a8" in acc:
            line += (f", int8 IR top-1 {acc['ov_w8a8']['top1']:.2f}% (its simulated twin with float "
                     f"attention {acc['pytorch_w8a8_sim_float_attention']['top1']:.2f}%), int8 matmuls: "
                     f"{ov['exec_graph']['integer_matmuls']}")
        log.info(line)
    if ov.get("error"):
        log.info(f"OpenVINO int8: not exported ({ov['error']})")
    log.info(f"deployment files measured in {seconds:.1f}s")


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


RUNTIMES = ("onnxruntime", "openvino")


def installed_runtimes() -> tuple[str, ...]:
    """The runtimes this machine can measure: ONNX Runtime (a core dependency) and OpenVINO
    when its optional package imports."""
    return tuple(r for r in RUNTIMES if r == "onnxruntime" or openvino_error() is None)


def resolve_runtimes(choice: Optional[str]) -> tuple[str, ...]:
    """``--runtime``: None = every installed runtime; ``all`` = both (each must be
    installed); else the one named. ConfigError (one line) when a named one is missing."""
    if choice is None:
        return installed_runtimes()
    wanted = RUNTIMES if choice == "all" else (choice,)
    if any(r not in RUNTIMES for r in wanted):
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)} or all, got {choice!r}")
    if "openvino" in wanted and openvino_error():
        raise ConfigError(f"--runtime {choice}: {openvino_error()} (or leave --runtime out to measure "
                          "the installed runtimes only)")
    return wanted


def export_and_measure(fp_model: torch.nn.Module, qmodel_w8a8: torch.nn.Module, val_loader: Iterable,
                       out_dir: str | os.PathLike, preprocessing: Preprocessing | Mapping[str, Any],
                       class_names: Sequence[str], fp_logits: torch.Tensor,
                       sim_w8a8_logits: torch.Tensor, latency_runs: int = 20,
                       batch_sizes: Sequence[int] = (1, 64),
                       qmodel_w4: Optional[torch.nn.Module] = None, warmup: int = 5,
                       threads: Optional[int] = None,
                       max_batches: Optional[int] = None,
                       measure_latency: bool = True,
                       runtimes: Sequence[str] = ("onnxruntime",)) -> dict[str, Any]:
    """Export FP32 / W8A8 (/ W4) files into ``OUT/onnx/``, evaluate and time them in
    ``runtimes`` (``onnxruntime``, ``openvino``).

    ``fp_logits`` / ``sim_w8a8_logits``: the PyTorch FP32 and simulated (fake-quant) W8A8
    logits over ``val_loader`` in its order (``max_batches`` batches of it, if given).
    Latency is measured interleaved in this process (:func:`measure_interleaved`), every
    runtime with ``threads`` threads (default: torch's thread count, so all get the same).

    Returns a JSON-serialisable dict:

    - ``files``: variant -> path (``fp32``; ONNX Runtime: ``w8a8``, ``w8a8_fused`` (the
      same W8A8 Linears, each block's qkv + attention one QAttention node, attention in float:
      its fastest file), ``w4`` when exported; OpenVINO: ``ov_w8a8``, the IR ``.xml`` of
      :func:`bvvit.quant.export_openvino.export_openvino_ir`)
    - ``size_bytes``: variant -> file size (an IR: .xml + .bin); ``size_ratio_to_fp32``
    - ``accuracy``: ``pytorch_fp32``, ``pytorch_w8a8_sim`` and each measured session
      (``ort_fp32``, ``ort_w8a8``, ``ort_w8a8_fused``, ``ort_w4``; ``ov_fp32`` at OpenVINO's
      default precision, ``ov_fp32_f32`` when that default is not f32, ``ov_w8a8``, and its
      reference ``pytorch_w8a8_sim_float_attention``) -> ``{"top1", "agreement"}`` (percent,
      agreement with FP32), ``lost_vs_fp32`` / ``gained_vs_fp32`` (images) and ``drop_p_value``
      (McNemar); the int8 sessions add ``compared_to`` (the simulated model with the same
      quantizers), ``agreement_with_sim`` and ``sqnr_db_vs_sim``; float sessions
      ``max_abs_diff_vs_pytorch``
    - ``checks``: ONNX Runtime ``fp32_top1_delta``, ``fp32_within_0.01``,
      ``w8a8_top1_delta_vs_sim``, ``w8a8_within_0.3``, ``w8a8_integer_ops``; OpenVINO
      ``ov_w8a8_top1_delta_vs_sim``, ``ov_w8a8_within_0.1``, ``ov_w8a8_integer_ops``
    - ``integer_ops``: :func:`integer_op_report` of the W8A8 graph as ORT optimized it (empty
      when it was not exported)
    - ``w8a8`` / ``w4`` / ``w8a8_fused``: ``{"exported": bool, "error": str | None}`` (the
      latter two with ``"integer_ops": {...}``). The W8A8 file with int8 attention is refused
      when only its attention quantizers are not 8-bit uniform (a log-grid softmax forced at 8
      bits); the fused and OpenVINO files, which drop them, are still made. When neither ONNX
      Runtime W8A8 file can be made, ConfigError says why;
      ``openvino``: ``{"exported", "error", "precision" (of its float layers), "exec_graph"
      (:func:`bvvit.runtime.openvino.exec_graph_report` of the int8 IR), "version"}``
    - ``latency`` (empty with ``measure_latency=False``): rows ``{"name", "kind", "batch_size",
      "median_ms", "p90_ms", "runs", "warmup", "speedup_vs_pytorch_fp32", "speedup_vs_ort_fp32",
      "timing_group"}`` for ``pytorch_fp32`` and each session above (sessions whose files
      together exceed :data:`SESSION_BYTES` are timed in groups, :func:`timing_groups`; the
      ratios of a row are within its group's interleaved run)
    - ``runtimes``; ``threads``: ``{"torch", "onnxruntime", "openvino"}``; ``system``:
      :func:`system_info`; ``num_images``; ``onnxruntime_version``; ``exporter``
    """
    onnx_dir = Path(out_dir) / "onnx"
    threads = int(threads or torch.get_num_threads())
    use_ort, use_ov = "onnxruntime" in runtimes, "openvino" in runtimes
    files = {"fp32": onnx_dir / "vit_fp32.onnx"}
    export_float_onnx(fp_model, files["fp32"], preprocessing, class_names)
    w8a8: dict[str, Any] = {"exported": False, "error": None}
    fused: dict[str, Any] = {"exported": False, "error": None}
    w4: dict[str, Any] = {"exported": False, "error": None}
    ov: dict[str, Any] = {"exported": False, "error": None}
    if use_ort:
        w8a8 = _export_optional(lambda: export_qdq_onnx(qmodel_w8a8, onnx_dir / "vit_w8a8.onnx", preprocessing,
                                                        class_names), files, "w8a8")
        fused = _export_optional(lambda: export_qdq_onnx(qmodel_w8a8, onnx_dir / "vit_w8a8_fused_attention.onnx",
                                                         preprocessing, class_names, attention="fused"),
                                 files, "w8a8_fused")
        if not (w8a8["exported"] or fused["exported"]):  # nothing of the model runs on ORT's int8 kernels
            raise ConfigError(w8a8["error"])
        w4["error"] = matmul_nbits_error() if qmodel_w4 is not None else None
        if qmodel_w4 is not None and w4["error"] is None:
            w4 = _export_optional(lambda: export_w4_weight_only_onnx(qmodel_w4, onnx_dir / "vit_w4_weight_only.onnx",
                                                                     preprocessing, class_names), files, "w4")
    if use_ov:
        ov = _export_optional(lambda: export_openvino_ir(qmodel_w8a8, onnx_dir / "vit_w8a8_openvino.xml",
                                                         preprocessing, class_names), files, "ov_w8a8")

    sessions = _session_specs(files, threads, use_ort, use_ov)
    if not sessions:
        raise ValueError(f"no runtime to measure in {list(runtimes)}; choose from {RUNTIMES}")
    int_report = _ort_integer_reports(files, threads, fused, w4) if use_ort else {}
    # One session open at a time: at 224 px each holds its weights and an arena sized by the
    # evaluation batch, GBs together (ViT-B/16).
    logits = {}
    for name in list(sessions):
        if name == "ov_fp32_f32" and ov.get("precision") == "f32":
            del sessions[name]  # OpenVINO's default already is f32: nothing to add
            continue
        session = sessions[name].open()
        if name == "ov_fp32":
            ov["precision"], ov["version"] = ov_inference_precision(session), openvino_version()
        if name == "ov_w8a8":
            ov["exec_graph"] = exec_graph_report(session)
        logits[name], labels = collect_logits(_in_chunks(sessions[name].torch_fn(session), RUNTIME_EVAL_BATCH),
                                              val_loader, max_batches=max_batches)
        del session
        gc.collect()
    fp_logits, sim_logits = torch.as_tensor(fp_logits).float(), torch.as_tensor(sim_w8a8_logits).float()
    shape = next(iter(logits.values())).shape
    if fp_logits.shape != shape or sim_logits.shape != shape:
        raise ValueError(f"fp_logits {tuple(fp_logits.shape)} / sim_w8a8_logits "
                         f"{tuple(sim_logits.shape)} do not match the loader's {tuple(shape)}")
    accuracy = {
        "pytorch_fp32": _vs_fp32(fp_logits, fp_logits, labels),
        "pytorch_w8a8_sim": _vs_fp32(sim_logits, fp_logits, labels),
    }
    references = {"ort_w8a8": ("pytorch_w8a8_sim", sim_logits)}
    if "ov_w8a8" in logits:
        twin_logits = collect_logits(float_attention_model(qmodel_w8a8), val_loader, max_batches=max_batches)[0]
        accuracy["pytorch_w8a8_sim_float_attention"] = _vs_fp32(twin_logits, fp_logits, labels)
        references["ov_w8a8"] = ("pytorch_w8a8_sim_float_attention", twin_logits)
    for name, values in logits.items():
        accuracy[name] = _vs_fp32(values, fp_logits, labels)
        if name in ("ort_fp32", "ov_fp32", "ov_fp32_f32"):
            accuracy[name]["max_abs_diff_vs_pytorch"] = float((values - fp_logits).abs().max())
        if name in references:
            reference, ref_logits = references[name]
            accuracy[name]["compared_to"] = reference
            accuracy[name]["agreement_with_sim"] = agreement(ref_logits, values)
            accuracy[name]["sqnr_db_vs_sim"] = _finite(sqnr_db(ref_logits, values))
    checks = _checks(accuracy, int_report, ov)

    sizes = {name: _file_bytes(path) for name, path in files.items()}
    latency = _grouped_latency(fp_model, sessions, val_loader, batch_sizes, warmup,
                               latency_runs) if measure_latency else []
    return {
        "files": {name: str(path) for name, path in files.items()},
        "size_bytes": sizes,
        "size_ratio_to_fp32": {name: size / sizes["fp32"] for name, size in sizes.items()},
        "accuracy": accuracy,
        "num_images": int(labels.numel()),
        "checks": checks,
        "integer_ops": int_report,
        "w4": w4,
        "w8a8": w8a8,
        "w8a8_fused": fused,
        "openvino": ov,
        "latency": latency,
        "runtimes": list(runtimes),
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": threads if use_ort else None,
                    "openvino": threads if use_ov else None},
        "system": system_info(),
        "onnxruntime_version": ort.__version__,
        "exporter": "torch.onnx.export (TorchScript, dynamo=False), opset 17, QDQ",
    }


def _export_optional(export: Callable[[], Path], files: dict[str, Path], key: str) -> dict[str, Any]:
    """Run one export whose refusal (a BVViTError: the model does not fit that form) is
    recorded, not raised: ``{"exported", "error"}``; the file goes into ``files[key]``. A failed
    write (a full disk) is raised: it is a failure of the run, not a limit of the model."""
    try:
        files[key] = export()
    except WriteError:
        raise
    except BVViTError as exc:
        return {"exported": False, "error": str(exc)}
    return {"exported": True, "error": None}


def _ort_integer_reports(files: Mapping[str, Path], threads: int, fused: dict[str, Any],
                         w4: dict[str, Any]) -> dict[str, Any]:
    """The W8A8 graph's :func:`integer_op_report` as ORT optimized it, empty when that file was
    not exported (the fused and W4 files' integer ops go into ``fused`` / ``w4``)."""
    with tempfile.TemporaryDirectory() as folder:
        reports = {}
        for name in ("w8a8", "w8a8_fused", "w4"):
            if name in files:
                optimized = Path(folder) / f"{name}_optimized.onnx"
                make_session(files[name], threads=threads, optimized_model_path=optimized)
                reports[name] = integer_op_report(optimized)
    for name, record in (("w8a8_fused", fused), ("w4", w4)):
        if name in reports:
            record["integer_ops"] = reports[name]["integer_ops"]
    return reports.get("w8a8", {})


@dataclass
class SessionSpec:
    """How to open one runtime session of an exported file, and call it."""

    open: Callable[[], Any]  # -> the session (ORT InferenceSession / OpenVINO CompiledModel)
    torch_fn: Callable[[Any], Callable[[torch.Tensor], torch.Tensor]]  # evaluation callable
    numpy_fn: Callable[[Any], Callable[[np.ndarray], Any]]  # timing callable
    file_bytes: int  # its file's size: what holding it open costs, roughly


def _session_specs(files: Mapping[str, Path], threads: int, use_ort: bool, use_ov: bool) -> dict[str, SessionSpec]:
    """Session name -> spec, in measuring order: ONNX Runtime's FP32 / W8A8 / fused / W4
    files (no spinning: a pool spinning after its run steals the cores from the next
    variant), then OpenVINO's FP32 file at the CPU's default precision (``ov_fp32``) and at
    f32 (``ov_fp32_f32``, dropped when that default is f32) and our int8 IR (``ov_w8a8``)."""
    specs: dict[str, SessionSpec] = {}
    if use_ort:
        for name in ("fp32", "w8a8", "w8a8_fused", "w4"):
            if name in files:
                specs[f"ort_{name}"] = SessionSpec(
                    lambda path=files[name]: make_session(path, threads=threads, allow_spinning=False),
                    session_fn, numpy_fn, _file_bytes(files[name]))
    if use_ov:
        for name, key, precision in (("ov_fp32", "fp32", None), ("ov_fp32_f32", "fp32", "f32"),
                                     ("ov_w8a8", "ov_w8a8", None)):
            if key in files:
                specs[name] = SessionSpec(
                    lambda path=files[key], p=precision: ov_make_session(path, threads=threads, precision=p),
                    ov_session_fn, ov_numpy_fn, _file_bytes(files[key]))
    return specs


RUNTIME_EVAL_BATCH = 64  # images per runtime call when evaluating (bounds each session's arena)
SESSION_BYTES = 1 << 30  # files' bytes held open at once while timing (224-px models: in groups)


def _in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` applied to at most ``size`` images at a time (the same logits: every image is
    computed on its own in these static graphs)."""
    return lambda images: torch.cat([fn(part) for part in images.split(size)]) if len(images) > size else fn(images)


def timing_groups(sizes: Mapping[str, int], budget: int = SESSION_BYTES,
                  reference: str = "ort_fp32") -> list[list[str]]:
    """Sessions (name -> file bytes, in order) split into groups timed one after another, each
    holding at most ``budget`` file bytes (a single larger session gets a group of its own),
    with ``reference`` in every group so that every ratio is taken within one interleaved run.
    Small models: one group, everything interleaved."""
    names = [n for n in sizes if n != reference]
    base = [reference] if reference in sizes else []
    groups: list[list[str]] = []
    current, used = list(base), sum(sizes[n] for n in base)
    for name in names:
        if len(current) > len(base) and used + sizes[name] > budget:
            groups.append(current)
            current, used = list(base), sum(sizes[n] for n in base)
        current.append(name)
        used += sizes[name]
    if len(current) > len(base) or not groups:
        groups.append(current)
    return groups


def _grouped_latency(fp_model: torch.nn.Module, sessions: Mapping[str, SessionSpec], loader: Iterable,
                     batch_sizes: Sequence[int], warmup: int, runs: int) -> list[dict[str, Any]]:
    """:func:`_interleaved_latency` per :func:`timing_groups` group, each group's sessions open
    only while it is timed. PyTorch FP32 and the reference are timed in every group (their
    rows are the first group's); each row's ``timing_group`` says which run it comes from."""
    rows: list[dict[str, Any]] = []
    for index, group in enumerate(timing_groups({n: s.file_bytes for n, s in sessions.items()}, SESSION_BYTES)):
        opened = {name: sessions[name].open() for name in group}
        fns = {name: sessions[name].numpy_fn(session) for name, session in opened.items()}
        for row in _interleaved_latency(fp_model, fns, loader, batch_sizes, warmup, runs):
            if index == 0 or row["name"] not in ("pytorch_fp32", "ort_fp32"):
                rows.append({**row, "timing_group": index})
        del opened, fns
        gc.collect()
    return rows


def _checks(accuracy: Mapping[str, Any], int_report: Mapping[str, Any], ov: Mapping[str, Any]) -> dict[str, Any]:
    """Each real runtime against the PyTorch model it executes."""
    checks: dict[str, Any] = {}
    if "ort_fp32" in accuracy:
        fp_delta = accuracy["ort_fp32"]["top1"] - accuracy["pytorch_fp32"]["top1"]
        checks.update({"fp32_top1_delta": fp_delta, "fp32_within_0.01": abs(fp_delta) <= 0.01})
    if "ort_w8a8" in accuracy:
        w8_delta = accuracy["ort_w8a8"]["top1"] - accuracy["pytorch_w8a8_sim"]["top1"]
        checks.update({"w8a8_top1_delta_vs_sim": w8_delta, "w8a8_within_0.3": abs(w8_delta) <= 0.3,
                       "w8a8_integer_ops": bool(int_report.get("ok"))})
    if "ov_w8a8" in accuracy:
        delta = accuracy["ov_w8a8"]["top1"] - accuracy["pytorch_w8a8_sim_float_attention"]["top1"]
        checks.update({"ov_w8a8_top1_delta_vs_sim": delta, "ov_w8a8_within_0.1": abs(delta) <= 0.1,
                       "ov_w8a8_integer_ops": bool((ov.get("exec_graph") or {}).get("ok"))})
    return checks


def _file_bytes(path: Path) -> int:
    """Size of an exported file (an OpenVINO IR counts its .xml and .bin)."""
    size = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        size += path.with_suffix(".bin").stat().st_size
    return size


TIMING_PAUSE_S = 0.02  # untimed sleep before each timed call when OpenVINO is among the runtimes
KINDS = {"pytorch_fp32": "float", "ort_fp32": "float", "ort_w8a8": "integer", "ort_w8a8_fused": "integer",
         "ort_w4": "weight_only_int4", "ov_fp32": "float", "ov_fp32_f32": "float", "ov_w8a8": "integer"}


def _interleaved_latency(fp_model: torch.nn.Module, sessions: Mapping[str, Callable[[np.ndarray], Any]],
                         loader: Iterable, batch_sizes: Sequence[int], warmup: int,
                         runs: int) -> list[dict[str, Any]]:
    """Every session (numpy callables) and PyTorch FP32, timed round-robin."""
    fp_model = fp_model.eval()
    fns: dict[str, Callable[[Any], Any]] = {"pytorch_fp32": fp_model, **sessions}
    to_input = {name: (lambda x: np.ascontiguousarray(x.numpy(), dtype=np.float32)) for name in sessions}
    inputs = {int(b): _batch_of(loader, int(b)) for b in batch_sizes}
    # OpenVINO's threads spin after a run: a pause lets them idle before the next callable
    pause = TIMING_PAUSE_S if any(name.startswith("ov_") for name in fns) else 0.0
    results = measure_interleaved(fns, inputs, warmup=warmup, runs=max(10, runs),
                                  kinds={k: v for k, v in KINDS.items() if k in fns}, to_input=to_input,
                                  pause_s=pause)
    base = {(r.name, r.batch_size): r.median_ms for r in results}
    rows = []
    for r in results:
        ort_fp32 = base.get(("ort_fp32", r.batch_size))
        rows.append({"name": r.name, "kind": r.kind, "batch_size": r.batch_size, "median_ms": r.median_ms,
                     "p90_ms": r.p90_ms, "runs": r.runs, "warmup": r.warmup,
                     "speedup_vs_pytorch_fp32": base[("pytorch_fp32", r.batch_size)] / r.median_ms,
                     "speedup_vs_ort_fp32": ort_fp32 / r.median_ms if ort_fp32 else None})
    return rows


def _finite(value: float) -> float | str:
    return value if np.isfinite(value) else ("inf" if value > 0 else "-inf")


__all__ = ["onnx_int8", "export_and_measure", "installed_runtimes", "resolve_runtimes", "timing_groups",
           "SessionSpec", "RUNTIMES", "KINDS", "RUNTIME_EVAL_BATCH", "SESSION_BYTES"]
