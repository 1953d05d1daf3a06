"""Packed quantized model files (``.safetensors``, no pickle) and their loader.

Layout of ``vit_w{W}a{A}.safetensors``:

=================================  ==========================================================
tensor                             contents
=================================  ==========================================================
``<layer>.weight.packed``          uint8, the integer codes bit-packed at their width
                                   (4-bit: two per byte, 6-bit: four per three bytes, ...)
``<layer>.weight.scale``           per-channel (or per-group / per-tensor) scales: bfloat16
                                   (weight scales are bfloat16 values, see
                                   ``primitives.bf16_ceil``), float32 for older models
``<layer>.weight.zero_point``      int32, only for asymmetric weights
every other model tensor           float32 (or float16 with ``float_dtype="fp16"``):
                                   biases, LayerNorms, class token, positional embedding
                                   (:func:`round_float_parts` makes the in-memory model
                                   compute with exactly these values)
=================================  ==========================================================

The safetensors metadata entry ``bvvit`` is JSON: format version, model config, class
names, preprocessing, the full QuantConfig, each packed weight's shape/bits/range, every
calibrated activation quantizer's qparams, and (format 3) ``tensors_sha256``, the content
hash of the tensors (:func:`tensors_sha256`). :func:`load_quantized_model` checks that hash
and rebuilds the quantized model from the file alone; its logits equal the saved model's
bit for bit. Files of formats 1 and 2 (no hash) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from bvvit.config import ModelConfig, Preprocessing
from bvvit.errors import CheckpointError
from bvvit.io import atomic_path
from bvvit.model import VisionTransformer
from bvvit.quant.config import QuantConfig
from bvvit.quant.modules import act_quantizers, weight_modules
from bvvit.quant.log2 import qparams_from_dict
from bvvit.quant.packing import from_unsigned, pack_bits, to_unsigned, unpack_bits
from bvvit.quant.primitives import QParams, granularity_from_dict, granularity_to_dict

FORMAT = "bvvit-quantized"
FORMAT_VERSION = 3  # 3: tensors_sha256; 2: per-layer metadata factored (common + each); 1, 2 load
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def round_float_parts(qmodel: nn.Module, float_dtype: str) -> nn.Module:
    """Round the float parts of ``qmodel`` (every parameter and buffer but the quantized
    weights: biases, LayerNorms, class token, positional embedding) through ``float_dtype``
    (``fp16`` or ``fp32``: unchanged) in place, so that it computes exactly what a file saved
    with that ``float_dtype`` reloads. Returns ``qmodel``."""
    dtype = _float_dtype(float_dtype)
    if dtype != torch.float32:
        for tensor in _float_tensors(qmodel).values():
            tensor.data.copy_(tensor.data.to(dtype).to(torch.float32))
    return qmodel


def _float_dtype(name: str) -> torch.dtype:
    if name not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {list(FLOAT_DTYPES)}, got {name!r}")
    return FLOAT_DTYPES[name]


def _float_tensors(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter/buffer except quantized weights (and their integer codes)."""
    quantized = {f"{name}.weight" for name, _ in weight_modules(qmodel)}
    quantized |= {f"{name}.weight_codes" for name, _ in weight_modules(qmodel)}
    state = dict(qmodel.named_parameters())
    state.update({n: b for n, b in qmodel.named_buffers() if b is not None})
    return {k: v for k, v in state.items() if k not in quantized and v.is_floating_point()}


def _compact_scale(scale: torch.Tensor) -> torch.Tensor:
    """bfloat16 when that holds ``scale`` exactly (weight scales are rounded to bfloat16
    values when quantized, see primitives.bf16_ceil), else float32."""
    scale = scale.detach().to(torch.float32).contiguous()
    half = scale.to(torch.bfloat16)
    return half if torch.equal(half.to(torch.float32), scale) else scale


def quantized_tensors(qmodel: nn.Module, float_dtype: str = "fp32") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to store and the per-weight metadata."""
    tensors: dict[str, torch.Tensor] = {}
    weights_meta: dict[str, Any] = {}
    for name, module in weight_modules(qmodel):
        qp: QParams = module.weight_qparams
        codes = module.weight_codes.to(torch.int32).flatten()
        tensors[f"{name}.weight.packed"] = pack_bits(to_unsigned(codes, qp.qmin), qp.bits)
        tensors[f"{name}.weight.scale"] = _compact_scale(qp.scale)
        if not qp.symmetric:
            tensors[f"{name}.weight.zero_point"] = qp.zero_point.detach().to(torch.int32).contiguous()
        # the scale's shape is the stored tensor's; a symmetric zero point has the same shape
        weights_meta[name] = {"shape": list(module.weight_codes.shape), "bits": qp.bits,
                              "symmetric": qp.symmetric, "qmin": qp.qmin,
                              "granularity": granularity_to_dict(qp.granularity)}
    dtype = _float_dtype(float_dtype)
    for name, tensor in _float_tensors(qmodel).items():
        tensors[name] = tensor.detach().to(dtype).contiguous()
    return tensors, weights_meta


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of ``tensors``, independent of any file layout: for each name in sorted
    order its name, dtype and shape (length-prefixed JSON), then its bytes (C order, the
    machine's little-endian layout that safetensors stores). Hashes each tensor's own memory
    (a contiguous CPU tensor is not copied), so ViT-B's tensors hash at disk-read speed."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        header = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        if tensor.numel():
            flat = tensor.cpu().contiguous().reshape(-1)  # views when already contiguous on the CPU
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def save_quantized_model(path: str | os.PathLike, qmodel: nn.Module, cfg: QuantConfig, loaded: Any,
                         report: Any = None, float_dtype: str = "fp32") -> dict[str, Any]:
    """Write the packed file; returns its real size and a breakdown by part. ``qmodel`` is
    not changed.

    With ``float_dtype="fp16"`` the file holds the float parts rounded to float16: call
    :func:`round_float_parts` first to evaluate exactly what the file holds.
    """
    from safetensors.torch import save_file

    tensors, weights_meta = quantized_tensors(qmodel, float_dtype)
    activations = {name: _short_floats(q.qparams.to_dict()) for name, q in act_quantizers(qmodel)
                   if q.qparams is not None}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_config": loaded.config.to_dict(), "class_names": list(loaded.class_names),
        "preprocessing": loaded.preprocessing.to_dict(), "quant_config": cfg.to_dict(),
        "weights": _factor(weights_meta), "activations": _factor(activations),
        "float_dtype": float_dtype, "tensors_sha256": tensors_sha256(tensors),
    }
    metadata = {"bvvit": json.dumps(meta, separators=(",", ":"))}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return {**file_breakdown(path, tensors, metadata, qmodel), "tensors_sha256": meta["tensors_sha256"]}


def _factor(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-layer dicts as ``{"common": what every entry shares, "each": {name: the rest}}``:
    the metadata then states the bit width, range and granularity once, not per layer."""
    items = list(entries.values())
    common = {k: v for k, v in (items[0] if items else {}).items()
              if all(k in e and e[k] == v for e in items[1:])}
    return {"common": common, "each": {name: {k: v for k, v in e.items() if k not in common}
                                       for name, e in entries.items()}}


def _unfactor(block: dict[str, Any], version: int) -> dict[str, dict[str, Any]]:
    if version < 2:  # format 1: one full dict per layer
        return block
    return {name: {**block["common"], **rest} for name, rest in block["each"].items()}


def _short_floats(value: Any) -> Any:
    """Floats (float32 values) written with the fewest digits that read back to the same
    float32: '0.01110926', not '0.01110925991088152'."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    if isinstance(value, list):
        return [_short_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _short_floats(v) for k, v in value.items()}
    return value


def file_breakdown(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                   qmodel: nn.Module) -> dict[str, Any]:
    """Real file size, split into packed weights / scales / float parameters / header."""
    def nbytes(keys: list[str]) -> int:
        return sum(tensors[k].numel() * tensors[k].element_size() for k in keys)

    packed = [k for k in tensors if k.endswith(".weight.packed")]
    scales = [k for k in tensors if k.endswith(".weight.scale") or k.endswith(".weight.zero_point")]
    floats = [k for k in tensors if k not in packed and k not in scales]
    size = path.stat().st_size
    parts = {"packed_weights": nbytes(packed), "scales": nbytes(scales),
             "float_parameters": nbytes(floats)}
    parts["header_and_metadata"] = size - sum(parts.values())
    ideal = sum(m.weight_codes.numel() * m.weight_qparams.bits for _, m in weight_modules(qmodel)) / 8
    return {"path": str(path), "size_bytes": size, "breakdown": parts,
            "ideal_bytes": int(ideal),  # the quantized weights alone at exactly bits/8 bytes
            "metadata_json_bytes": len(metadata["bvvit"])}


def save_float_model(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """The FP32 reference as a real file: the float32 state dict in safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    params = sum(t.numel() * 4 for t in tensors.values())
    return {"path": str(path), "size_bytes": path.stat().st_size,
            "breakdown": {"float_parameters": params,
                          "header_and_metadata": path.stat().st_size - params}}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"quantized model {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("bvvit")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"quantized model {path} is not a readable .safetensors file "
                              f"({first[:120]}); it may be truncated or corrupt") from None
    if not raw:
        raise CheckpointError(f"{path} has no BV-ViT metadata; it was not written by post_training.py")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt BV-ViT metadata") from None
    if meta.get("format") != FORMAT or meta.get("format_version", 99) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a BV-ViT quantized model of a supported version")
    try:  # callers see one full dict per layer whatever the format version
        version = int(meta["format_version"])
        meta["weights"] = _unfactor(meta["weights"], version)
        meta["activations"] = _unfactor(meta["activations"], version)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{path} has incomplete BV-ViT metadata") from None
    return meta


def check_content_hash(path: str | os.PathLike, meta: dict[str, Any],
                       tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointError (one line) when ``tensors`` do not hash to the metadata's
    ``tensors_sha256`` (format >= 3; older files carry no hash and are not checked)."""
    if int(meta.get("format_version", 1)) < 3:
        return
    expected = meta.get("tensors_sha256")
    if not isinstance(expected, str):
        raise CheckpointError(f"quantized model {path} has no content hash in its metadata; "
                              "re-create it with post_training.py")
    actual = tensors_sha256(tensors)
    if actual != expected:
        raise CheckpointError(f"quantized model {path} was modified or damaged after it was written "
                              f"(its tensors hash to {actual[:12]}..., it records {expected[:12]}...); "
                              "re-create it with post_training.py")


def load_quantized_model(path: str | os.PathLike) -> tuple[VisionTransformer, dict[str, Any]]:
    """Rebuild the quantized model from the file alone. Returns (model, metadata)."""
    from safetensors.torch import load_file

    from bvvit.quant.quantize import convert

    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"quantized model {path} cannot be read ({first[:120]}); "
                              "it may be truncated or corrupt") from None
    check_content_hash(path, meta, tensors)
    try:
        model_cfg = ModelConfig.from_dict(meta["model_config"])
        cfg = QuantConfig.from_dict(meta["quant_config"])
        # Build the structure; its weights are placeholders replaced below.
        qmodel, _ = convert(VisionTransformer(model_cfg), cfg)
        for name, module in weight_modules(qmodel):
            info = meta["weights"][name]
            scale = tensors[f"{name}.weight.scale"].to(torch.float32)
            numel = int(torch.tensor(info["shape"]).prod())
            codes = from_unsigned(unpack_bits(tensors[f"{name}.weight.packed"], info["bits"], numel),
                                  info["qmin"]).reshape(info["shape"])
            zp_key = f"{name}.weight.zero_point"
            zero_point = tensors[zp_key] if zp_key in tensors else \
                torch.zeros(info.get("zero_point_shape", scale.shape), dtype=torch.int32)
            module.weight_qparams = QParams(scale, zero_point, info["bits"],
                                            info["symmetric"], granularity_from_dict(info["granularity"]))
            module.weight_codes = codes.to(module.weight_codes.dtype)
            module.refresh_weight()
        floats = _float_tensors(qmodel)
        missing = [k for k in floats if k not in tensors]
        if missing:
            raise KeyError(f"missing tensors {missing[:3]}")
        with torch.no_grad():
            for name, tensor in floats.items():
                tensor.copy_(tensors[name].to(torch.float32))
        quantizers = dict(act_quantizers(qmodel))
        for name, qdict in meta["activations"].items():
            quantizers[name].set_qparams(qparams_from_dict(qdict))
        uncalibrated = [n for n, q in quantizers.items() if q.qparams is None]
        if uncalibrated:
            raise KeyError(f"no qparams for {uncalibrated[:3]}")
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path} does not hold a consistent quantized model ({exc})"[:300]) from None
    meta["preprocessing"] = Preprocessing.from_dict(meta["preprocessing"]).to_dict()
    return qmodel.eval(), meta


__all__ = ["save_quantized_model", "load_quantized_model", "read_metadata", "save_float_model",
           "round_float_parts", "quantized_tensors", "tensors_sha256", "check_content_hash", "file_breakdown",
           "FLOAT_DTYPES", "FORMAT", "FORMAT_VERSION"]
