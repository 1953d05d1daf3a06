"""W4 weight-only ONNX export: every <= 4-bit Linear becomes ONNX Runtime's ``MatMulNBits``
built from OUR codes and scales (stored code = code + 8, the op's default zero point);
activations, the patch conv and attention matmuls stay float.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from bvvit.config import Preprocessing
from bvvit.errors import ConfigError
from bvvit.model import VisionTransformer
from bvvit.quant.export_common import DEFAULT_OPSET, metadata_for, save_onnx, torch_export
from bvvit.quant.modules import ActQuantizer, QuantLinear
from bvvit.quant.primitives import PerGroup

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
            twin.set_submodule(name, _DequantLinear(module))
        elif isinstance(module, ActQuantizer):
            twin.set_submodule(name, nn.Identity())  # weight-only: float activations
    onnx_model = torch_export(twin, opset)
    replaced = _replace_matmuls_with_nbits(onnx_model, layers, accuracy_level)
    if replaced != len(layers):
        raise RuntimeError(f"found {replaced} of {len(layers)} quantized Linear weights in the graph")
    onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_onnx(onnx_model, path, metadata_for(preprocessing, class_names, "w4_weight_only",
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
