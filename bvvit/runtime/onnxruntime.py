"""ONNX Runtime: loading exported files, sessions, evaluation through our loaders, and the
check that an int8 graph really runs on integer kernels.

Sessions use graph optimization level ALL (QDQ fusions into integer kernels need at
least EXTENDED). ``integer_op_report`` reads the graph ORT actually runs (saved through
``optimized_model_path``) to check that the W8A8 export really executes on integer ops.
What a runtime module offers is described in :mod:`bvvit.runtime`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bvvit.errors import BVViTError, CheckpointError
from bvvit.evaluate.classification import collect_logits
from bvvit.io import atomic_path

PROBE_OPSET = 17  # the MatMulNBits probe graph's opset (any ONNX Runtime runs it)

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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PROBE_OPSET),
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


__all__ = ["load_onnx", "read_onnx_metadata", "make_session", "run_session", "session_fn", "numpy_fn",
           "evaluate_onnx", "integer_op_report", "optimized_op_report", "matmul_nbits_error", "INTEGER_OPS",
           "FLOAT_MATMUL_OPS"]
