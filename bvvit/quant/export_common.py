"""What every ONNX export here shares: the file's conventions (opset, input / output names,
the ``metadata_props`` described in :mod:`bvvit.quant.export`), the TorchScript export of a
model with a dynamic batch axis (quiet about what the exporter says that no user can act
on), and the checked atomic save. (Submodules of the twin being exported are swapped with
torch's ``nn.Module.set_submodule``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import onnx
import torch
from torch import nn

from bvvit.config import Preprocessing
from bvvit.io import atomic_path

DEFAULT_OPSET = 17  # LayerNormalization is an ONNX op from 17 on
INPUT_NAME, OUTPUT_NAME = "image", "logits"
ONNX_FORMAT = "bvvit-onnx"
ONNX_FORMAT_VERSION = 1
# What torch's C++ exporter prints to the process's stderr (out of reach of Python's warnings
# filters) that is known benign here. QAttention (export.py, attention="fused") is an ONNX
# Runtime contrib op torch has no shape inference for; its output has its input's shape, and
# ONNX Runtime infers it when it loads the file.
BENIGN_EXPORTER_LINES = ("The shape inference of com.microsoft::QAttention type is missing",)


def torch_export(model: nn.Module, opset: int) -> onnx.ModelProto:
    """The TorchScript exporter's graph of ``model`` (dynamic batch axis)."""
    c = model.config
    example = torch.randn(2, c.in_chans, c.img_size, c.img_size)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), \
            stderr_without(BENIGN_EXPORTER_LINES):
        warnings.simplefilter("ignore")  # exporter deprecation / tracer warnings
        path = Path(folder) / "raw.onnx"
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                          do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return onnx.load(str(path))


@contextlib.contextmanager
def stderr_without(benign: Sequence[str]) -> Iterator[None]:
    """Run the block with the process's stderr (file descriptor 2, where C++ code writes)
    captured, then write every captured line that contains none of ``benign`` back to stderr:
    what is known benign is dropped, everything else is said, after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                capture.seek(0)
                kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                        if not any(text in line for text in benign)]
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    finally:
        os.close(saved)


def metadata_for(preprocessing: Preprocessing | Mapping[str, Any], class_names: Sequence[str],
                 variant: str, extra: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """The ``metadata_props`` written into every exported file (all values strings)."""
    pre = preprocessing.to_dict() if isinstance(preprocessing, Preprocessing) else dict(preprocessing)
    meta = {
        "bvvit.format": ONNX_FORMAT,
        "bvvit.format_version": str(ONNX_FORMAT_VERSION),
        "bvvit.variant": variant,
        "input": f"{INPUT_NAME}: normalised float32 (B, C, H, W) = (pixel / 255 - mean) / std",
        "mean": json.dumps(list(pre.get("mean", []))),
        "std": json.dumps(list(pre.get("std", []))),
        "img_size": str(pre.get("img_size", "")),
        "in_chans": str(pre.get("in_chans", "")),
        "preprocessing": json.dumps(pre),
        "class_names": json.dumps(list(class_names)),
    }
    for key, value in (extra or {}).items():
        meta[f"bvvit.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_onnx(model: onnx.ModelProto, path: Path, metadata: Mapping[str, str]) -> None:
    """Write ``model`` to ``path`` (checked by ``onnx.checker``, atomically) with ``metadata``
    as its ``metadata_props`` and ``bvvit`` as its producer."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "bvvit"
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


__all__ = ["torch_export", "metadata_for", "save_onnx", "stderr_without", "BENIGN_EXPORTER_LINES", "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME",
           "ONNX_FORMAT", "ONNX_FORMAT_VERSION"]
