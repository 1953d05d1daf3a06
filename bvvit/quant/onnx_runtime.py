"""ONNX Runtime: sessions, evaluation through our loaders, the integer-op check, and
``export_and_measure`` (export + accuracy + size + interleaved latency) for the
post-training pipeline.

Sessions use graph optimization level ALL (QDQ fusions into integer kernels need at
least EXTENDED). ``integer_op_report`` reads the graph ORT actually runs (saved through
``optimized_model_path``) to check that the W8A8 export really executes on integer ops.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bvvit.config import Preprocessing
from bvvit.errors import BVViTError, CheckpointError
from bvvit.evaluate.classification import classification_metrics, collect_logits, sqnr_db
from bvvit.evaluate.latency import measure_interleaved
from bvvit.io import atomic_path
from bvvit.system import system_info
from bvvit.quant.export import (DEFAULT_OPSET, export_float_onnx, export_qdq_onnx,
                                export_w4_weight_only_onnx)

# Ops that compute on integers (ONNX standard and com.microsoft contrib ops).
INTEGER_OPS = frozenset({
    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QLinearConv", "ConvInteger", "QGemm", "QAttention", "QLinearAdd", "QLinearMul",
    "QLinearSoftmax", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearReduceMean", "QLinearWhere",
    "MatMulNBits", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
})
# Float ops that multiply matrices: on a quantized path they mean a missed QDQ fusion.
FLOAT_MATMUL_OPS = frozenset({
    "MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv", "NhwcFusedConv",
    "ConvTranspose", "Attention", "MultiHeadAttention",
})


# ------------------------------------------------------------------------ files

def load_onnx(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file; a missing, empty or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file {path} does not exist; export it first")
    if path.stat().st_size == 0:
        raise CheckpointError(f"ONNX file {path} is empty (0 bytes); it was not written completely")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf raises its own DecodeError; onnx wraps others
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"ONNX file {path} is not a readable ONNX model ({first[:160]}); "
                              "it may be truncated or corrupt") from None


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``metadata_props`` of an exported file, JSON values decoded (``mean``, ``std``,
    ``img_size``, ``class_names``, ``preprocessing``, ``bvvit.variant``...)."""
    meta: dict[str, Any] = {}
    for prop in load_onnx(path, load_weights=False).metadata_props:
        try:
            meta[prop.key] = json.loads(prop.value)
        except ValueError:
            meta[prop.key] = prop.value
    return meta


# ------------------------------------------------------------------------ sessions

def make_session(path: str | os.PathLike, threads: Optional[int] = None,
                 optimized_model_path: Optional[str | os.PathLike] = None,
                 allow_spinning: bool = True) -> ort.InferenceSession:
    """A CPU InferenceSession with graph optimizations ALL and sequential execution.

    ``threads``: intra-op threads (None: ORT's default, one per physical core).
    ``optimized_model_path``: also save the optimized graph there (for
    :func:`integer_op_report`). A missing or corrupt file raises CheckpointError.
    """
    path = Path(path)
    load_onnx(path, load_weights=False)  # one-line CheckpointError for missing/corrupt files
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # the "optimized model is hardware specific" warning
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        if optimized_model_path is None:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        with atomic_path(optimized_model_path) as tmp:
            options.optimized_model_filepath = str(tmp)
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except BVViTError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"ONNX Runtime cannot load {path} ({first[:200]}); the file may be "
                              "corrupt or need a newer onnxruntime") from None


def run_session(session: ort.InferenceSession, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logits (B, classes) float32 of one batch of normalised images (B, C, H, W)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.ascontiguousarray(images, dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def session_fn(session: ort.InferenceSession) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch-in, torch-out callable around ``session`` (for ``collect_logits``)."""
    return lambda images: torch.from_numpy(run_session(session, images))


def numpy_fn(session: ort.InferenceSession) -> Callable[[np.ndarray], Any]:
    """The cheapest call for timing: numpy in, ORT's outputs out."""
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})


def evaluate_onnx(session: ort.InferenceSession, loader: Iterable,
                  max_batches: Optional[int] = None) -> torch.Tensor:
    """Logits (N, classes) float32 of ``session`` over ``loader`` (same order as the loader)."""
    logits, _ = collect_logits(session_fn(session), loader, max_batches=max_batches)
    return logits


# ------------------------------------------------------------------------ integer-op check

def integer_op_report(optimized_model_path: str | os.PathLike) -> dict[str, Any]:
    """What ONNX Runtime runs after its optimizations.

    Keys: ``op_counts`` (op type -> count), ``integer_ops`` (the integer-kernel subset),
    ``float_matmuls`` (names of float MatMul/Gemm/Conv... nodes), ``unfused_qdq_matmuls``
    (float matmul nodes fed by a DequantizeLinear: a quantized path ORT did NOT run on
    integers), ``num_integer_ops``, ``has_integer_ops`` and ``ok`` (integer ops present
    and no unfused QDQ matmul).
    """
    graph = load_onnx(optimized_model_path).graph
    producers = {out: node for node in graph.node for out in node.output}
    counts = Counter(node.op_type for node in graph.node)
    float_matmuls, unfused = [], []
    for node in graph.node:
        if node.op_type in FLOAT_MATMUL_OPS:
            float_matmuls.append(node.name or node.op_type)
            if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                   for i in node.input):
                unfused.append(node.name or node.op_type)
    integer = {op: n for op, n in sorted(counts.items()) if op in INTEGER_OPS}
    num_integer = sum(integer.values())
    return {
        "op_counts": dict(sorted(counts.items())),
        "integer_ops": integer,
        "num_integer_ops": num_integer,
        "float_matmuls": float_matmuls,
        "unfused_qdq_matmuls": unfused,
        "has_integer_ops": num_integer > 0,
        "ok": num_integer > 0 and not unfused,
    }


def matmul_nbits_error() -> Optional[str]:
    """None when ONNX Runtime's MatMulNBits (4-bit weight-only) runs on this machine, else
    a one-line reason (checked on a 16x16 product)."""
    from onnx import TensorProto, helper, numpy_helper
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=16, N=16, bits=4, block_size=16)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        initializer=[numpy_helper.from_array(np.full((16, 1, 8), 0x99, np.uint8), "B"),
                     numpy_helper.from_array(np.ones(16, np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = session.run(None, {"x": np.ones((1, 16), np.float32)})[0]
    except Exception as exc:  # an old onnxruntime without the op, or no kernel for this CPU
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"ONNX Runtime {ort.__version__} cannot run MatMulNBits (4-bit weight-only) "
                f"here: {first[:200]}")
    if not np.allclose(y, 16.0):  # every stored code 9 = +1 after the default zero point 8
        return f"ONNX Runtime {ort.__version__} MatMulNBits gave wrong results on this CPU"
    return None


def optimized_op_report(path: str | os.PathLike, threads: Optional[int] = None) -> dict[str, Any]:
    """:func:`integer_op_report` of ``path`` after ORT's optimizations (via a temp file)."""
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        make_session(path, threads=threads, optimized_model_path=optimized)
        return integer_op_report(optimized)


# ------------------------------------------------------------------------ the pipeline call

def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * int((a.argmax(1) == b.argmax(1)).sum()) / a.shape[0]


def _vs_fp32(logits: torch.Tensor, fp_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Top-1 and the paired comparison with the float model on the same images."""
    m = classification_metrics(logits, labels, reference_logits=fp_logits)
    return {"top1": m["top1"], "agreement_with_fp32": m["agreement"], "lost_vs_fp32": m["lost_vs_reference"],
            "gained_vs_fp32": m["gained_vs_reference"], "drop_p_value": m["drop_p_value"]}


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
      ``ort_w8a8_fused``, ``ort_w4``) -> ``{"top1", "agreement_with_fp32"}`` (percent),
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
    accuracy["ort_w8a8"]["agreement_with_sim"] = _agreement(logits["w8a8"], sim_logits)
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


__all__ = ["load_onnx", "read_onnx_metadata", "matmul_nbits_error", "make_session", "run_session", "session_fn", "numpy_fn", "evaluate_onnx",
           "integer_op_report", "optimized_op_report", "export_and_measure", "INTEGER_OPS",
           "FLOAT_MATMUL_OPS"]
