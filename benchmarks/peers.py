"""What a user would pick instead of BV-ViT's PTQ: the peer quantizers the benchmarks run.

Shared by ``ptq_speed.py`` (latency, size, W8A8 accuracy) and ``ptq_peers.py`` (accuracy
at W8A8 and W4A8). Each builder quantizes with the peer's OWN calibration, fed with the
same calibration images we use, so only the methods differ.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

ORT_STATIC_METHODS = ("MinMax", "Percentile", "Entropy")


class OrtCalibReader:
    """ORT ``CalibrationDataReader`` over our calibration batches ``(images, labels, ...)``."""

    def __init__(self, calib: Iterable, input_name: str = "image"):
        self.batches = [{input_name: b[0].numpy().astype(np.float32)} for b in calib]
        self.index = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return self.batches[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


def ort_prepare(fp_path: Path, folder: Path) -> Path:
    """ORT's recommended pre-processing (shape inference, graph clean-up) before quantize_static."""
    from onnxruntime.quantization import quant_pre_process
    prepped = folder / "fp32_prepped.onnx"
    if not prepped.exists():
        quant_pre_process(str(fp_path), str(prepped))
    return prepped


def ort_quantize_static(prepped: Path, out: Path, calib: Iterable, method: str = "MinMax",
                        weight_bits: int = 8, unsigned_activations: bool = True) -> Path:
    """``onnxruntime.quantization.quantize_static``: QDQ, per-channel weights (int8, or
    int4 for ``weight_bits=4``), uint8 (U8S8) or int8 activations, ``method`` calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    if weight_bits not in (4, 8):
        raise ValueError(f"ORT quantize_static has 4- and 8-bit weights, not {weight_bits}")
    quantize_static(str(prepped), str(out), OrtCalibReader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8 if unsigned_activations else QuantType.QInt8,
                    weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
                    calibrate_method=getattr(CalibrationMethod, method))
    return out


def ort_quantize_dynamic(fp_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(fp_path), str(out), weight_type=QuantType.QInt8)
    return out


def openvino_file_bytes(path: Path) -> int:
    """Bytes of a model file OpenVINO reads (an IR counts its .xml and .bin)."""
    path = Path(path)
    extra = path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0
    return path.stat().st_size + extra


def nncf_quantize(fp_path: Path, out: Path, calib: Iterable, model_type: Optional[str] = None) -> Path:
    """NNCF post-training int8 (``nncf.quantize``) of the FP32 ONNX read by OpenVINO, on our
    calibration images (every one: ``subset_size`` = their count); ``model_type="transformer"``
    is NNCF's ViT/BERT preset (``nncf.ModelType.TRANSFORMER``: SmoothQuant, int8 q@k), None
    its default. Saved as OpenVINO IR ``out`` (.xml + .bin)."""
    import nncf
    import openvino as ov
    batches = [b[0].numpy().astype(np.float32) for b in calib]
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
    if model_type not in (None, "transformer"):
        raise ValueError(f"model_type must be None or 'transformer', got {model_type!r}")
    quantized = nncf.quantize(ov.Core().read_model(str(fp_path)), nncf.Dataset(batches),
                              subset_size=sum(len(b) for b in batches), **kwargs)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def pt2e_convert(model: nn.Module, calib: Iterable, batch: int) -> nn.Module:
    """PT2E static int8 with ``X86InductorQuantizer`` (PyTorch's CPU int8 recipe): export at a
    fixed batch size, calibrate on our images in chunks of that size, convert. The result
    runs eagerly (reference quantized ops) or under ``torch.compile`` (oneDNN int8)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    images = torch.cat([b[0] for b in calib])
    if images.shape[0] < batch:  # fewer calibration images than one exported batch: repeat them
        images = images.repeat(-(-batch // images.shape[0]), 1, 1, 1)[:batch]
    with torch.no_grad():
        exported = torch.export.export(copy.deepcopy(model).eval(), (images[:batch],)).module()
        prepared = prepare_pt2e(exported, quantizer)
        for start in range(0, images.shape[0] - batch + 1, batch):
            prepared(images[start:start + batch])
        return convert_pt2e(prepared)


def padded(fn: Callable[[torch.Tensor], torch.Tensor], batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run ``fn`` (a model exported at one batch size) on any batch: chunks of ``batch``
    rows, the last one padded with copies of its first image."""
    def run(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in x.split(batch):
            n = chunk.shape[0]
            if n < batch:
                chunk = torch.cat([chunk, chunk[:1].expand(batch - n, *chunk.shape[1:])])
            outs.append(fn(chunk)[:n])
        return torch.cat(outs)
    return run


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the peers' harmless warnings (ORT's per-tensor logs, deprecations)."""
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root_logger.setLevel(level)


def try_build(label: str, build: Callable[[], Any], skipped: dict[str, str]) -> Optional[Any]:
    """Build one peer; one that fails here is reported with its reason, not fatal."""
    start = time.perf_counter()
    try:
        with quiet():
            result = build()
    except Exception as exc:  # noqa: BLE001 - any failure means "does not work here"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        skipped[label] = f"{type(exc).__name__}: {first[:200]}"
        print(f"  skipped {label}: {skipped[label]}", flush=True)
        return None
    print(f"  built {label} in {time.perf_counter() - start:.1f} s", flush=True)
    return result
