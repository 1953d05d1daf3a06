"""ONNX export: the float ViT, our calibrated W8A8 model as a QDQ graph, and W4 weight-only.

How the W8A8 graph is made (the approach that measured best; ``benchmarks/ptq_speed.py``):

1. an *export twin* of the quantized model is built in PyTorch: every calibrated
   :class:`ActQuantizer` becomes ``torch.fake_quantize_per_tensor_affine`` with OUR frozen
   scale / zero point, every :class:`QuantLinear` ``x @ W^T + b`` whose (in, out) weight
   goes through ``torch.fake_quantize_per_channel_affine`` with OUR per-output-channel
   scales (axis 1: ONNX MatMul's weight is torch's transposed), and the patch embedding's
   kernel = stride convolution a matmul over flattened patches (ONNX Runtime has no
   integer fusion for a QDQ Conv whose output is float; as a matmul it runs on integers);
2. the TorchScript exporter (``dynamo=False``: the dynamo exporter fails on the fake-quant
   ops; for the float model both gave equally fast graphs and TorchScript exports in 0.2 s
   instead of 4 s) writes each fake-quant as a ``QuantizeLinear -> DequantizeLinear`` pair;
3. :func:`fold_constant_quantize` turns each weight's ``QuantizeLinear`` into an int8
   initializer holding our integer codes: the file stores 8-bit weights.

ONNX Runtime (optimization level >= EXTENDED) fuses ``DequantizeLinear -> MatMul`` into
``MatMulIntegerToFloat`` / ``QLinearMatMul``: uint8 activations x int8 weights, its fast
U8S8 kernels (AVX512-VNNI). LayerNorm, GELU, softmax and the residual adds stay float.
Only 8-bit per-tensor uniform activations and 8-bit per-tensor / per-channel weights map to
integer kernels; anything else raises :class:`ConfigError` naming the layers.

W4 weight-only: every <= 4-bit Linear becomes ONNX Runtime's ``MatMulNBits`` built from
OUR codes and scales (stored code = code + 8, the op's default zero point); activations
stay float.

Every file carries ``metadata_props``: ``bvvit.format``, ``bvvit.variant``, ``mean``,
``std``, ``img_size``, ``in_chans``, ``preprocessing`` and ``class_names`` (JSON values),
and its input ``image`` is the NORMALISED image ``(B, C, H, W)``:
``(pixel / 255 - mean) / std``; its output ``logits`` is ``(B, num_classes)``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from bvvit.config import Preprocessing
from bvvit.errors import ConfigError
from bvvit.io import atomic_path
from bvvit.model import PatchEmbed, VisionTransformer
from bvvit.quant.modules import QUANTIZE, ActQuantizer, QuantConv2d, QuantLinear
from bvvit.quant.primitives import PerGroup

DEFAULT_OPSET = 17  # LayerNormalization is an ONNX op from 17 on
INPUT_NAME, OUTPUT_NAME = "image", "logits"
ONNX_FORMAT = "bvvit-onnx"
ONNX_FORMAT_VERSION = 1


# ------------------------------------------------------------------------ export twin

class _QDQ(nn.Module):
    """One activation quantizer as a fake-quant op the exporter writes as Q -> DQ."""

    def __init__(self, quantizer: ActQuantizer):
        super().__init__()
        qp = quantizer.qparams
        self.scale = float(qp.scale.reshape(()))
        self.zero_point = int(qp.zero_point.reshape(()))
        self.qmin, self.qmax = qp.qmin, qp.qmax

    def forward(self, x: Tensor) -> Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point,
                                                     self.qmin, self.qmax)


def _weight_fake_quant(codes: Tensor, module: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """(float weight (in, out), per-out-channel scale (out,), zero point (out,)) of a
    quantized weight whose codes are ``(out, fan_in)``."""
    qp = module.weight_qparams
    out_features = codes.shape[0]
    scale = qp.scale.detach().cpu().reshape(-1).float().expand(out_features).contiguous()
    zero_point = qp.zero_point.cpu().reshape(-1).to(torch.int32).expand(out_features).contiguous()
    weight = (codes.cpu().float() - zero_point[:, None].float()) * scale[:, None]  # (out, fan_in)
    return weight.t().contiguous(), scale, zero_point


class _QDQLinear(nn.Module):
    """``x @ W^T + b`` with Q/DQ on the input and the (in, out) weight (per-channel axis 1)."""

    def __init__(self, layer: QuantLinear | QuantConv2d, input_qdq: Optional[nn.Module]):
        super().__init__()
        codes = layer.weight_codes.reshape(layer.weight_codes.shape[0], -1)  # (out, fan_in)
        weight_t, scale, zero_point = _weight_fake_quant(codes, layer)
        self.register_buffer("weight_t", weight_t)  # (in, out)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.qmin, self.qmax = layer.weight_qparams.qmin, layer.weight_qparams.qmax
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.input_qdq = input_qdq if input_qdq is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        weight = torch.fake_quantize_per_channel_affine(
            self.weight_t, self.weight_scale, self.weight_zero_point, 1, self.qmin, self.qmax)
        x = self.input_qdq(x)
        # A 2-D MatMul + Add is fused into a float Gemm by ONNX Runtime before its QDQ
        # fusions run; a 3-D MatMul becomes MatMulIntegerToFloat.
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)  # (B, 1, in)
        y = torch.matmul(x, weight)  # (..., out)
        if squeeze:
            y = y.squeeze(1)
        return y if self.bias is None else y + self.bias


class _PatchMatMulEmbed(nn.Module):
    """PatchEmbed with a kernel = stride conv as a matmul over flattened patches."""

    def __init__(self, patch_embed: PatchEmbed, linear: nn.Module):
        super().__init__()
        self.patch_size = patch_embed.patch_size
        self.grid_size = patch_embed.grid_size
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        B, C, _, _ = x.shape
        g, p = self.grid_size, self.patch_size
        x = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, P, P)
        x = x.reshape(B, g * g, C * p * p)  # (B, N, C*P*P), the conv weight's fan-in order
        return self.linear(x)  # (B, N, D)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def unsupported_for_int8(qmodel: nn.Module) -> list[str]:
    """Why each quantized tensor of ``qmodel`` cannot run on 8-bit integer kernels
    (empty when the whole model can)."""
    problems = []
    for name, module in qmodel.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_qparams is not None:
            qp = module.weight_qparams
            if qp.bits != 8:
                problems.append(f"{name} weight is {qp.bits}-bit")
            elif isinstance(qp.granularity, PerGroup):
                problems.append(f"{name} weight is per-group")
        if isinstance(module, ActQuantizer) and module.state == QUANTIZE:
            spec, qp = module.spec, module.qparams
            if qp.bits != 8:
                problems.append(f"{name} ({module.kind}) is {qp.bits}-bit")
            elif qp.scale.numel() != 1:
                problems.append(f"{name} ({module.kind}) is not per-tensor")
            elif spec.method != "uniform":
                problems.append(f"{name} ({module.kind}) uses the {spec.method} quantizer")
        elif isinstance(module, ActQuantizer) and module.state != "off":
            problems.append(f"{name} ({module.kind}) is not calibrated")
    return problems


def export_twin(qmodel: VisionTransformer) -> VisionTransformer:
    """A copy of ``qmodel`` whose quantizers are fake-quant ops the ONNX exporter writes
    as QuantizeLinear/DequantizeLinear pairs (same logits as ``qmodel`` up to float
    rounding). Raises ConfigError when a tensor is not 8-bit per-tensor/per-channel."""
    problems = unsupported_for_int8(qmodel)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else "")
        raise ConfigError(f"only 8-bit models run on ONNX Runtime's integer kernels: {shown}; "
                          "export other widths with the packed .safetensors file instead")
    twin = copy.deepcopy(qmodel).eval().cpu()
    for name, module in list(twin.named_modules()):
        if isinstance(module, PatchEmbed) and isinstance(module.proj, QuantConv2d):
            conv = module.proj
            if conv.weight_qparams is not None and tuple(conv.kernel_size) == (module.patch_size,) * 2 \
                    and tuple(conv.stride) == tuple(conv.kernel_size) and _no_padding(conv.padding):
                _set_child(twin, name, _PatchMatMulEmbed(module, _QDQLinear(conv, _qdq_of(conv))))
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantLinear) and module.weight_qparams is not None:
            _set_child(twin, name, _QDQLinear(module, _qdq_of(module)))
    for name, module in list(twin.named_modules()):
        if isinstance(module, ActQuantizer):
            _set_child(twin, name, _QDQ(module) if module.state == QUANTIZE else nn.Identity())
    return twin


def _qdq_of(layer: nn.Module) -> Optional[nn.Module]:
    quantizer = layer.input_quantizer
    if quantizer is None or quantizer.state != QUANTIZE:
        return None
    return _QDQ(quantizer)


def _no_padding(padding: Any) -> bool:
    return padding in (0, "valid") or (isinstance(padding, tuple) and all(p == 0 for p in padding))


# ------------------------------------------------------------------------ export

def _torch_export(model: nn.Module, opset: int) -> onnx.ModelProto:
    """The TorchScript exporter's graph of ``model`` (dynamic batch axis)."""
    c = model.config
    example = torch.randn(2, c.in_chans, c.img_size, c.img_size)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation / tracer warnings
        path = Path(folder) / "raw.onnx"
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                          do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return onnx.load(str(path))


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


def _save(model: onnx.ModelProto, path: Path, metadata: Mapping[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "bvvit"
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def export_float_onnx(model: VisionTransformer, path: str | os.PathLike,
                      preprocessing: Preprocessing | Mapping[str, Any], class_names: Sequence[str],
                      opset: int = DEFAULT_OPSET) -> Path:
    """Export the FP32 ViT (explicit attention path; same math as the fused one) with a
    dynamic batch axis. Input ``image`` (B, C, H, W) normalised, output ``logits`` (B, classes)."""
    path = Path(path)
    float_model = copy.deepcopy(model).float().eval().cpu()
    float_model.set_fused_attn(False)
    onnx_model = _torch_export(float_model, opset)
    _save(onnx_model, path, metadata_for(preprocessing, class_names, "fp32"))
    return path


def export_qdq_onnx(qmodel: VisionTransformer, path: str | os.PathLike,
                    preprocessing: Preprocessing | Mapping[str, Any], class_names: Sequence[str],
                    opset: int = DEFAULT_OPSET, quant_config: Optional[Mapping[str, Any]] = None) -> Path:
    """Export a calibrated W8A8 ``qmodel`` as a QDQ graph carrying our scales.

    Weights are int8 initializers (our codes) + DequantizeLinear (per output channel);
    every quantized activation (Linear/patch inputs, q, k, v, softmax output, and residual
    sums when quantized) gets QuantizeLinear -> DequantizeLinear with our scale / zero point.
    Raises ConfigError if a quantized tensor is not 8-bit (see :func:`unsupported_for_int8`).
    """
    path = Path(path)
    twin = export_twin(qmodel)
    onnx_model = _torch_export(twin, opset)
    folded = fold_constant_quantize(onnx_model)
    extra = {"weights_folded": str(folded)}
    if quant_config is not None:
        extra["quant_config"] = dict(quant_config)
    _save(onnx_model, path, metadata_for(preprocessing, class_names, "w8a8", extra))
    return path


# ------------------------------------------------------------------------ graph passes

def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers, Constant-node outputs and Identity nodes of those (the
    exporter shares equal initializers through Identity nodes), by tensor name."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # topological order: an Identity's input is known before it
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def fold_constant_quantize(model: onnx.ModelProto) -> int:
    """Replace every ``QuantizeLinear`` of a constant (a weight) by an integer initializer
    of its codes: ``clamp(round(w / scale) + zero_point)``. The float weights in the graph
    are exactly ``(code - zp) * scale``, so these are our codes. Returns how many were folded."""
    graph = model.graph
    constants = _constants(graph)
    keep, folded = [], 0
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(i in constants for i in node.input if i):
            keep.append(node)
            continue
        weight, scale = constants[node.input[0]].astype(np.float32), constants[node.input[1]]
        zero_point = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.uint8(0)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis % weight.ndim] = scale.size
        info = np.iinfo(zero_point.dtype)
        codes = np.rint(weight / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.float32)
        codes = np.clip(codes, info.min, info.max).astype(zero_point.dtype)
        graph.initializer.append(numpy_helper.from_array(codes, node.output[0]))
        users[node.input[0]] -= 1
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    unused = {name for name, count in users.items() if count == 0}
    for init in [i for i in graph.initializer if i.name in unused]:
        graph.initializer.remove(init)
    return folded


# ------------------------------------------------------------------------ W4 weight-only

W4_BLOCK_SIZES = (128, 64, 32, 16)  # per-channel scales: the largest that divides K


class _DequantLinear(nn.Module):
    """``x @ W^T + b`` with the dequantized float weight stored as ``weight_t`` (in, out)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.register_buffer("weight_t", layer.weight.detach().t().contiguous().float())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def _nbits_block(qmodule: QuantLinear) -> int:
    qp, in_features = qmodule.weight_qparams, qmodule.in_features
    if isinstance(qp.granularity, PerGroup):
        size = qp.granularity.group_size
        if size < 16 or size & (size - 1):
            raise ConfigError(f"group size {size} cannot be a MatMulNBits block (ONNX Runtime "
                              "needs a power of two >= 16); use group:16/32/64/128 or channel")
        return size
    return next((b for b in W4_BLOCK_SIZES if in_features % b == 0), 16)


def matmul_nbits_tensors(qmodule: QuantLinear, block_size: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(packed B (N, k_blocks, block/2) uint8, scales (N * k_blocks,) float32, zero points
    or None) of MatMulNBits from OUR <= 4-bit codes; a per-channel scale is repeated per block."""
    qp = qmodule.weight_qparams
    codes = qmodule.weight_codes.cpu().to(torch.int32).numpy()  # (N, K)
    n, k = codes.shape
    k_blocks = math.ceil(k / block_size)
    # signed [-2^(b-1), 2^(b-1)-1] fits [-8, 7]: stored = code + 8 (the op's default zp)
    stored = codes + 8 if qp.symmetric else codes
    zero_points = None
    pad = k_blocks * block_size - k
    scale = qp.scale.detach().cpu().float().numpy()
    if isinstance(qp.granularity, PerGroup):
        scales = scale.reshape(n, k_blocks)
        zps = None if qp.symmetric else qp.zero_point.cpu().numpy().reshape(n, k_blocks)
    else:
        scales = np.broadcast_to(scale.reshape(-1, 1), (n, k_blocks))
        zps = None if qp.symmetric else np.broadcast_to(qp.zero_point.cpu().numpy().reshape(-1, 1),
                                                        (n, k_blocks))
    fill = 8 if qp.symmetric else 0
    stored = np.pad(stored, ((0, 0), (0, pad)), constant_values=fill).astype(np.uint8)
    if pad and zps is not None:  # padded codes must dequantize to 0
        stored[:, k:] = zps[:, -1:].astype(np.uint8)
    stored = stored.reshape(n, k_blocks, block_size)
    packed = (stored[..., 0::2] | (stored[..., 1::2] << 4)).astype(np.uint8)
    if zps is not None:
        zp = np.pad(zps.astype(np.uint8), ((0, 0), (0, k_blocks % 2)))
        zero_points = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return packed, np.ascontiguousarray(scales, dtype=np.float32).reshape(-1), zero_points


def export_w4_weight_only_onnx(qmodel_w4: VisionTransformer, path: str | os.PathLike,
                               preprocessing: Preprocessing | Mapping[str, Any],
                               class_names: Sequence[str], opset: int = DEFAULT_OPSET,
                               accuracy_level: int = 4) -> Path:
    """Export the <= 4-bit Linear weights of ``qmodel_w4`` as ONNX Runtime ``MatMulNBits``
    (weight-only: activations, the patch conv and attention matmuls stay float; the conv
    uses its dequantized weight). ``accuracy_level`` 4 lets the op quantize activations to
    int8 per block for VNNI kernels, 0 computes in float32 (bit-faithful to the weights)."""
    path = Path(path)
    layers = {name: m for name, m in qmodel_w4.named_modules()
              if isinstance(m, QuantLinear) and m.weight_qparams is not None}
    wide = [name for name, m in layers.items() if m.weight_qparams.bits > 4]
    if not layers or wide:
        raise ConfigError("W4 weight-only export needs every quantized Linear at <= 4 bits"
                          + (f"; {', '.join(wide[:3])} are wider" if wide else "; none found"))
    twin = copy.deepcopy(qmodel_w4).eval().cpu()
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantLinear) and module.weight_qparams is not None:
            _set_child(twin, name, _DequantLinear(module))
        elif isinstance(module, ActQuantizer):
            _set_child(twin, name, nn.Identity())  # weight-only: float activations
    onnx_model = _torch_export(twin, opset)
    replaced = _replace_matmuls_with_nbits(onnx_model, layers, accuracy_level)
    if replaced != len(layers):
        raise RuntimeError(f"found {replaced} of {len(layers)} quantized Linear weights in the graph")
    onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save(onnx_model, path, metadata_for(preprocessing, class_names, "w4_weight_only",
                                         {"accuracy_level": str(accuracy_level)}))
    return path


def _replace_matmuls_with_nbits(model: onnx.ModelProto, layers: Mapping[str, QuantLinear],
                                accuracy_level: int) -> int:
    """MatMul(x, W^T initializer) -> MatMulNBits for the weights of ``layers``, matched by
    value (the exporter may rename or share initializers)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_shape: dict[tuple[int, ...], list[tuple[str, QuantLinear]]] = {}
    for name, layer in layers.items():
        by_shape.setdefault((layer.in_features, layer.out_features), []).append((name, layer))
    replaced, nodes = 0, []
    for node in graph.node:
        match = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            weight_t = numpy_helper.to_array(inits[node.input[1]])
            for name, layer in by_shape.get(tuple(weight_t.shape), []):
                if np.array_equal(weight_t, layer.weight.detach().cpu().t().float().numpy()):
                    match = (name, layer)
                    break
        if match is None:
            nodes.append(node)
            continue
        name, layer = match
        block = _nbits_block(layer)
        packed, scales, zero_points = matmul_nbits_tensors(layer, block)
        inputs = [node.input[0], f"{name}.weight_nbits", f"{name}.weight_scales"]
        graph.initializer.extend([numpy_helper.from_array(packed, inputs[1]),
                                  numpy_helper.from_array(scales, inputs[2])])
        if zero_points is not None:
            inputs.append(f"{name}.weight_zero_points")
            graph.initializer.append(numpy_helper.from_array(zero_points, inputs[3]))
        nodes.append(helper.make_node(
            "MatMulNBits", inputs, list(node.output), name=f"{name}/MatMulNBits",
            domain="com.microsoft", K=layer.in_features, N=layer.out_features, bits=4,
            block_size=block, accuracy_level=accuracy_level))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return replaced


__all__ = ["export_float_onnx", "export_qdq_onnx", "export_w4_weight_only_onnx", "export_twin",
           "unsupported_for_int8", "fold_constant_quantize", "matmul_nbits_tensors",
           "metadata_for", "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "ONNX_FORMAT"]
