"""OpenVINO (CPU): compiling exported files (ONNX or IR), running them through our loaders,
and reading what the runtime really executes (which layers run int8, which bf16/f32).

``openvino`` is an optional package: it is imported inside the functions, and
:func:`openvino_error` says in one line why it cannot be used. What a runtime module offers
is described in :mod:`bvvit.runtime`.

Settings: ``PERFORMANCE_HINT=LATENCY``, one stream and ``threads`` inference threads (the
same count as every other runtime in a comparison). ``precision`` is OpenVINO's
``INFERENCE_PRECISION_HINT`` for the layers that are not quantized; without it OpenVINO picks
the CPU's default (bf16 on CPUs with AVX512-BF16 or AMX, else f32).

Inputs are always copied into the request (``share_inputs=False``): with OpenVINO 2026.4,
a request that shares the caller's array lets a second request of the same compiled model
write ITS input into that array, silently changing images the caller still holds.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from bvvit.errors import CheckpointError, ConfigError
from bvvit.evaluate.classification import collect_logits

IR_METADATA_SECTION = "bvvit"  # rt_info section the IR export (bvvit.quant.export_openvino) writes
# Layers of the runtime (exec) graph that multiply matrices.
MATMUL_LAYERS = frozenset({"FullyConnected", "MatMul", "Convolution", "ScaledDotProductAttention"})
INTEGER_PRECISIONS = frozenset({"i8", "u8", "I8", "U8"})
# OpenVINO's names of its float precisions -> ours (the kernel column of summary.csv).
PRECISION_NAMES = {"bf16": "bf16", "f32": "f32", "f16": "f16", "bfloat16": "bf16", "float32": "f32",
                   "float16": "f16"}


def openvino_error() -> Optional[str]:
    """None when the optional ``openvino`` package can be used, else a one-line reason."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"the openvino package is not installed ({exc}); pip install openvino"
    return None


def openvino_version() -> Optional[str]:
    """The installed OpenVINO's version, or None when it is absent."""
    if openvino_error():
        return None
    import openvino as ov
    return ov.get_version()


def _core() -> Any:
    reason = openvino_error()
    if reason:
        raise ConfigError(f"cannot run OpenVINO: {reason}")
    import openvino as ov
    return ov.Core()


def make_session(path: str | os.PathLike, threads: Optional[int] = None, precision: Optional[str] = None,
                 perf_count: bool = False) -> Any:
    """A CPU ``CompiledModel`` of an ONNX or IR (``.xml``) file, dynamic batch kept.

    ``threads``: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default); ``precision``:
    ``INFERENCE_PRECISION_HINT`` (``"f32"``, ``"bf16"``; None: the CPU's default);
    ``perf_count``: collect per-layer times (``PERF_COUNT``). A missing or unreadable file
    raises CheckpointError, a missing openvino package ConfigError.
    """
    path = Path(path)
    core = _core()
    if not path.is_file() or path.stat().st_size == 0:
        raise CheckpointError(f"OpenVINO model file {path} does not exist or is empty; export it first")
    if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"OpenVINO IR {path} has no weights file {path.with_suffix('.bin').name} beside it")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    if perf_count:
        config["PERF_COUNT"] = "YES"
    try:
        return core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError / its own exceptions with long texts
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"OpenVINO cannot load {path} ({first[:200]}); the file may be corrupt "
                              "or need a newer openvino") from None


def inference_precision(session: Any) -> str:
    """The float precision ``session`` runs its non-quantized layers in (``bf16``, ``f32``)."""
    value = session.get_property("INFERENCE_PRECISION_HINT")
    name = (value.to_string() if hasattr(value, "to_string") else str(value)).lower()  # an ov.Type
    return PRECISION_NAMES.get(name, name)


def read_ir_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata an IR file carries (the keys of the ONNX files' ``metadata_props``, JSON
    values decoded)."""
    import json
    model = _core().read_model(str(path))
    rt_info = model.get_rt_info()
    if IR_METADATA_SECTION not in rt_info:
        return {}
    meta: dict[str, Any] = {}
    for key in rt_info[IR_METADATA_SECTION]:
        value = model.get_rt_info([IR_METADATA_SECTION, key]).astype(str)
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    return meta


def numpy_fn(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The cheapest call for timing: numpy in, the logits array out (one infer request,
    inputs copied into it)."""
    request = session.create_infer_request()
    output = session.output(0)

    def run(images: np.ndarray) -> np.ndarray:
        request.infer({0: images}, share_inputs=False)
        return request.get_tensor(output).data
    return run


def run_session(session: Any, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logits (B, classes) float32 of one batch of normalised images (B, C, H, W)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    return numpy_fn(session)(np.ascontiguousarray(images, dtype=np.float32)).copy()


def session_fn(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch-in, torch-out callable around ``session`` (for ``collect_logits``)."""
    run = numpy_fn(session)
    return lambda images: torch.from_numpy(
        run(np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)).copy())


def evaluate_openvino(session: Any, loader: Iterable, max_batches: Optional[int] = None) -> torch.Tensor:
    """Logits (N, classes) float32 of ``session`` over ``loader`` (same order as the loader)."""
    logits, _ = collect_logits(session_fn(session), loader, max_batches=max_batches)
    return logits


def exec_graph_report(session: Any) -> dict[str, Any]:
    """What OpenVINO runs, from the compiled model's runtime (exec) graph.

    Keys: ``layer_counts`` ("layerType/precision" -> count, every executed layer),
    ``matmul_layers`` (the same for the layers that multiply matrices), ``integer_matmuls``
    (how many of those run on i8/u8), ``float_matmuls`` (names of those that run in float),
    ``num_layers`` and ``ok`` (integer matmuls present, no float FullyConnected).
    """
    counts: Counter[str] = Counter()
    matmuls: Counter[str] = Counter()
    integer, floats = 0, []
    for op in session.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer in ("Input", "Output", "Parameter", "Result", "Const", "Constant"):
            continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[f"{layer}/{precision}"] += 1
        if layer in MATMUL_LAYERS:
            matmuls[f"{layer}/{precision}"] += 1
            if precision in INTEGER_PRECISIONS:
                integer += 1
            elif layer == "FullyConnected":
                floats.append(op.get_friendly_name())
    return {"layer_counts": dict(sorted(counts.items())), "matmul_layers": dict(sorted(matmuls.items())),
            "integer_matmuls": integer, "float_matmuls": floats, "num_layers": sum(counts.values()),
            "ok": integer > 0 and not floats}


def optimized_op_report(path: str | os.PathLike, threads: Optional[int] = None,
                        precision: Optional[str] = None) -> dict[str, Any]:
    """:func:`exec_graph_report` of ``path`` compiled for this CPU."""
    return exec_graph_report(make_session(path, threads=threads, precision=precision))


def profile_by_layer_type(session: Any, images: np.ndarray, iters: int = 10) -> list[tuple[str, float]]:
    """Per ``"layer type/exec type"`` mean milliseconds per call (a ``perf_count=True``
    session), largest first: where the time goes."""
    request = session.create_infer_request()
    request.infer({0: images}, share_inputs=False)
    totals: Counter[str] = Counter()
    for _ in range(iters):
        request.infer({0: images}, share_inputs=False)
        for entry in request.profiling_info:
            if entry.status == entry.status.EXECUTED:
                totals[f"{entry.node_type}/{entry.exec_type}"] += entry.real_time.total_seconds() * 1e3 / iters
    return totals.most_common()


__all__ = ["openvino_error", "openvino_version", "make_session", "inference_precision", "read_ir_metadata",
           "numpy_fn", "run_session", "session_fn", "evaluate_openvino", "exec_graph_report",
           "optimized_op_report", "profile_by_layer_type", "MATMUL_LAYERS", "INTEGER_PRECISIONS",
           "IR_METADATA_SECTION"]
