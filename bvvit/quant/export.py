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

``attention="fused"`` (the fastest file, ``vit_w8a8_fused_attention.onnx``): each attention
block's qkv Linear AND its attention become ONE ``com.microsoft.QAttention`` node (uint8 input
with our static scale, our int8 per-channel qkv codes, the attention itself in float inside
the kernel: q, k, v and the softmax output are not quantized, as in ONNX Runtime's and
PyTorch's dynamic quantization); every other Linear stays a static W8A8
``MatMulIntegerToFloat``. It drops about fifteen reshape/split/transpose nodes per block,
which is what batch-1 latency is made of here.

W4 weight-only (every <= 4-bit Linear as ONNX Runtime's ``MatMulNBits``) lives in
:mod:`bvvit.quant.export_w4`, and the file conventions and writing steps every export
shares in :mod:`bvvit.quant.export_common`; their public names are re-exported here.

Every file carries ``metadata_props``: ``bvvit.format``, ``bvvit.variant``, ``mean``,
``std``, ``img_size``, ``in_chans``, ``preprocessing`` and ``class_names`` (JSON values),
and its input ``image`` is the NORMALISED image ``(B, C, H, W)``:
``(pixel / 255 - mean) / std``; its output ``logits`` is ``(B, num_classes)``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from bvvit.config import Preprocessing
from bvvit.errors import ConfigError
from bvvit.model import Attention, PatchEmbed, VisionTransformer
# Also re-exported: callers import the constants, metadata_for and the W4 export from here.
from bvvit.quant.export_common import (DEFAULT_OPSET, INPUT_NAME, ONNX_FORMAT, OUTPUT_NAME,
                                       metadata_for, save_onnx, torch_export)
from bvvit.quant.export_w4 import export_w4_weight_only_onnx, matmul_nbits_tensors
from bvvit.quant.modules import QUANTIZE, ActQuantizer, QuantConv2d, QuantLinear
from bvvit.quant.primitives import PerGroup


# ------------------------------------------------------------------------ export twin

class QDQ(nn.Module):
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


def weight_fake_quant(codes: Tensor, module: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
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
        weight_t, scale, zero_point = weight_fake_quant(codes, layer)
        self.register_buffer("weight_t", weight_t)  # (in, out)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.qmin, self.qmax = layer.weight_qparams.qmin, layer.weight_qparams.qmax
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.input_qdq = input_qdq if input_qdq is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        weight = torch.fake_quantize_per_channel_affine(
            self.weight_t, self.weight_scale, self.weight_zero_point, 1, self.qmin, self.qmax)
        # A 2-D MatMul + Add is fused into a float Gemm by ONNX Runtime before its QDQ
        # fusions run; a 3-D MatMul becomes MatMulIntegerToFloat. Q -> DQ -> MatMul -> Add
        # must stay adjacent for fuse_integer_linears.
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)  # (B, 1, in)
        y = torch.matmul(self.input_qdq(x), weight)  # (..., out)
        if self.bias is not None:
            y = y + self.bias
        return y.squeeze(1) if squeeze else y


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


def _absent_input(g: Any) -> Any:
    """An omitted optional input of an ONNX node (the exporter writes an empty name)."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


class _QAttentionOp(torch.autograd.Function):
    """Quantize ``x`` then multi-head self-attention with an int8 qkv weight; exported as
    ``QuantizeLinear`` + ``com.microsoft.QAttention``, run in PyTorch as the same float math."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, codes: Tensor, bias: Tensor, x_scale: Tensor, x_zero_point: Tensor,
                w_scale: Tensor, w_zero_point: Tensor, num_heads: int) -> Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, float(x_scale), int(x_zero_point), 0, 255)
        weight = (codes.float() - w_zero_point.float()) * w_scale  # (C, 3C): columns q | k | v
        B, N, C = x.shape
        head_dim = C // num_heads
        qkv = (x @ weight + bias).reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = torch.softmax((q * head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
        return (attn @ v).transpose(1, 2).reshape(B, N, C)

    @staticmethod
    def symbolic(g: Any, x: Any, codes: Any, bias: Any, x_scale: Any, x_zero_point: Any,
                 w_scale: Any, w_zero_point: Any, num_heads: int) -> Any:
        quantized = g.op("QuantizeLinear", x, x_scale, x_zero_point)
        return g.op("com.microsoft::QAttention", quantized, codes, bias, x_scale, w_scale,
                    _absent_input(g), x_zero_point, w_zero_point, num_heads_i=num_heads)


class _QAttention(nn.Module):
    """An attention block whose qkv Linear and attention are one QAttention node; ``proj``
    (a quantized Linear) follows as usual."""

    def __init__(self, attention: nn.Module, qkv: QuantLinear):
        super().__init__()
        qp, act = qkv.weight_qparams, qkv.input_quantizer.qparams
        out_features = qkv.weight_codes.shape[0]
        self.num_heads = attention.num_heads
        self.register_buffer("codes", qkv.weight_codes.to(torch.int8).t().contiguous())  # (C, 3C)
        self.register_buffer("bias", qkv.bias.detach().clone().float() if qkv.bias is not None
                             else torch.zeros(out_features))
        self.register_buffer("x_scale", act.scale.detach().reshape(()).float().clone())
        self.register_buffer("x_zero_point", act.zero_point.reshape(()).to(torch.uint8).clone())
        self.register_buffer("w_scale", qp.scale.detach().reshape(-1).float().expand(out_features).contiguous())
        self.register_buffer("w_zero_point", qp.zero_point.reshape(-1).to(torch.int8).expand(out_features).contiguous())
        self.proj = attention.proj

    def forward(self, x: Tensor) -> Tensor:
        y = _QAttentionOp.apply(x, self.codes, self.bias, self.x_scale, self.x_zero_point,
                                self.w_scale, self.w_zero_point, self.num_heads)
        return self.proj(y)


def _qattention_problem(attention: Attention) -> Optional[str]:
    """Why ``attention`` cannot become a QAttention node (None when it can)."""
    qkv = attention.qkv
    if not isinstance(qkv, QuantLinear) or qkv.weight_qparams is None:
        return "its qkv Linear is not quantized"
    qp = qkv.weight_qparams
    if qp.bits != 8 or not qp.symmetric or isinstance(qp.granularity, PerGroup):
        return "its qkv weight is not signed 8-bit per-tensor/per-channel"
    act = qkv.input_quantizer
    if act is None or act.state != QUANTIZE or act.qparams is None or act.qparams.scale.numel() != 1 \
            or (act.qparams.qmin, act.qparams.qmax) != (0, 255):
        return "its qkv input is not quantized to uint8 per tensor"
    return None


ATTENTION_KINDS = ("q", "k", "v", "softmax")
ATTENTION_MODES = ("int8", "float", "fused")


def unsupported_for_int8(qmodel: nn.Module, attention: str = "int8") -> list[str]:
    """Why each quantized tensor of ``qmodel`` cannot run on 8-bit integer kernels
    (empty when the whole model can). With ``attention`` "float" or "fused" the attention
    operands' quantizers (q, k, v, softmax output) are not checked: those files drop them
    (:func:`export_twin`)."""
    problems = []
    for name, module in qmodel.named_modules():
        if attention != "int8" and isinstance(module, ActQuantizer) and module.kind in ATTENTION_KINDS:
            continue
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


def export_twin(qmodel: VisionTransformer, attention: str = "int8") -> VisionTransformer:
    """A copy of ``qmodel`` whose quantizers are fake-quant ops the ONNX exporter writes
    as QuantizeLinear/DequantizeLinear pairs (same logits as ``qmodel`` up to float
    rounding). Raises ConfigError when a tensor it keeps is not 8-bit per-tensor/per-channel
    (or uniform: a log-grid softmax runs only where the attention is not integer).

    ``attention="float"`` drops the quantizers of the attention operands (q, k, v and the
    softmax output): ``q @ k^T`` and ``attn @ v`` then run in float, as in ONNX Runtime's
    and PyTorch's dynamic quantization; every Linear stays W8A8.
    """
    if attention not in ATTENTION_MODES:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    problems = unsupported_for_int8(qmodel, attention)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else "")
        if unsupported_for_int8(qmodel, "float"):
            raise ConfigError(f"only 8-bit models run on ONNX Runtime's integer kernels: {shown}; "
                              "export other widths with the packed .safetensors file instead")
        raise ConfigError(f"int8 attention needs uniform 8-bit per-tensor q, k, v and softmax quantizers: {shown}; "
                          "export with attention='fused' or 'float' instead (they keep attention in float)")
    twin = copy.deepcopy(qmodel).eval().cpu()
    if attention == "fused":
        blocks = [(name, m) for name, m in twin.named_modules() if isinstance(m, Attention)]
        problems = [f"{name}: {why}" for name, m in blocks if (why := _qattention_problem(m))]
        if problems:
            raise ConfigError(f"attention='fused' needs QAttention-compatible blocks: {'; '.join(problems[:3])}; "
                              "export with attention='float' or 'int8' instead")
        for name, module in blocks:
            twin.set_submodule(name, _QAttention(module, module.qkv))
    for name, module in list(twin.named_modules()):
        if isinstance(module, PatchEmbed) and isinstance(module.proj, QuantConv2d):
            conv = module.proj
            if conv.weight_qparams is not None and tuple(conv.kernel_size) == (module.patch_size,) * 2 \
                    and tuple(conv.stride) == tuple(conv.kernel_size) and _no_padding(conv.padding):
                twin.set_submodule(name, _PatchMatMulEmbed(module, _QDQLinear(conv, _qdq_of(conv))))
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantLinear) and module.weight_qparams is not None:
            twin.set_submodule(name, _QDQLinear(module, _qdq_of(module)))
    for name, module in list(twin.named_modules()):
        if isinstance(module, ActQuantizer):
            keep = module.state == QUANTIZE and not (attention != "int8" and module.kind in ATTENTION_KINDS)
            twin.set_submodule(name, QDQ(module) if keep else nn.Identity())
    return twin


def _qdq_of(layer: nn.Module) -> Optional[nn.Module]:
    quantizer = layer.input_quantizer
    if quantizer is None or quantizer.state != QUANTIZE:
        return None
    return QDQ(quantizer)


def _no_padding(padding: Any) -> bool:
    return padding in (0, "valid") or (isinstance(padding, tuple) and all(p == 0 for p in padding))


# ------------------------------------------------------------------------ export

def export_float_onnx(model: VisionTransformer, path: str | os.PathLike,
                      preprocessing: Preprocessing | Mapping[str, Any], class_names: Sequence[str],
                      opset: int = DEFAULT_OPSET) -> Path:
    """Export the FP32 ViT (explicit attention path; same math as the fused one) with a
    dynamic batch axis. Input ``image`` (B, C, H, W) normalised, output ``logits`` (B, classes)."""
    path = Path(path)
    float_model = copy.deepcopy(model).float().eval().cpu()
    float_model.set_fused_attn(False)
    onnx_model = torch_export(float_model, opset)
    save_onnx(onnx_model, path, metadata_for(preprocessing, class_names, "fp32"))
    return path


def export_qdq_onnx(qmodel: VisionTransformer, path: str | os.PathLike,
                    preprocessing: Preprocessing | Mapping[str, Any], class_names: Sequence[str],
                    opset: int = DEFAULT_OPSET, quant_config: Optional[Mapping[str, Any]] = None,
                    attention: str = "int8", fuse: bool = True) -> Path:
    """Export a calibrated W8A8 ``qmodel`` as a QDQ graph carrying our scales.

    Weights are int8 initializers (our codes) + DequantizeLinear (per output channel);
    every quantized activation (Linear/patch inputs, q, k, v, softmax output, and residual
    sums when quantized) gets QuantizeLinear -> DequantizeLinear with our scale / zero point.
    ``fuse``: rewrite each quantized Linear as one ``com.microsoft.MatMulIntegerToFloat``
    with its bias (see :func:`fuse_integer_linears`). ``attention``: see :func:`export_twin`.
    Raises ConfigError if a quantized tensor is not 8-bit (see :func:`unsupported_for_int8`).
    """
    path = Path(path)
    twin = export_twin(qmodel, attention)
    onnx_model = torch_export(twin, opset)
    folded = fold_constant_quantize(onnx_model)
    extra = {"weights_folded": str(folded), "attention": attention}
    if fuse:
        extra["fused_linears"] = str(fuse_integer_linears(onnx_model))
    if quant_config is not None:
        extra["quant_config"] = dict(quant_config)
    save_onnx(onnx_model, path, metadata_for(preprocessing, class_names, "w8a8", extra))
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
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    _remove_dead_nodes(graph)  # the float weights (and Identity aliases of them) nothing reads now
    return folded


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def fuse_integer_linears(model: onnx.ModelProto) -> int:
    """Rewrite every quantized Linear ``Add(MatMul(DQ(Q(x)), DQ(W_int8)), bias)`` as ONE
    ``com.microsoft.MatMulIntegerToFloat(Q(x), W_int8, s_x, s_w, zp_x, zp_w, bias)``.

    ONNX Runtime's own QDQ fusion stops at the MatMul and leaves the bias Add (one more
    op and one more pass over the output per Linear); this is the op its dynamic
    quantization runs, fed with our static scales instead of a per-batch min/max.
    The math is unchanged: ``(q_x - zp_x)(q_w - zp_w) s_x s_w + b`` either way.
    Returns how many Linears were fused; the DequantizeLinear nodes left unused are removed.
    """
    graph = model.graph
    constants = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    users = _consumers(graph)
    replace: dict[int, onnx.NodeProto] = {}  # id(Add or MatMul node) -> fused node
    drop: set[int] = set()
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        a_dq, b_dq = (producers.get(name) for name in node.input)
        if a_dq is None or b_dq is None or a_dq.op_type != "DequantizeLinear" \
                or b_dq.op_type != "DequantizeLinear" or b_dq.input[0] not in constants:
            continue  # not a quantized activation x constant int8 weight
        a_q = producers.get(a_dq.input[0])
        if a_q is None or a_q.op_type != "QuantizeLinear" or a_dq.input[1] not in constants \
                or constants[a_dq.input[1]].size != 1 or b_dq.input[1] not in constants:
            continue  # MatMulIntegerToFloat takes a per-tensor activation scale
        weight = constants[b_dq.input[0]]
        if weight.ndim != 2 or weight.dtype not in (np.int8, np.uint8):
            continue
        out = node.output[0]
        bias, last = None, node
        after = users.get(out, [])
        if len(after) == 1 and after[0].op_type == "Add":
            other = [i for i in after[0].input if i != out]
            if len(other) == 1 and other[0] in constants and constants[other[0]].shape == (weight.shape[1],):
                bias, last = other[0], after[0]
        inputs = [a_dq.input[0], b_dq.input[0], a_dq.input[1], b_dq.input[1],
                  a_dq.input[2] if len(a_dq.input) > 2 else "",
                  b_dq.input[2] if len(b_dq.input) > 2 else "", bias or ""]
        while inputs and not inputs[-1]:
            inputs.pop()
        fused = onnx.helper.make_node("MatMulIntegerToFloat", inputs, [last.output[0]],
                                      name=(node.name or out) + "_integer", domain="com.microsoft")
        replace[id(last)] = fused
        if last is not node:
            drop.add(id(node))
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_dead_nodes(graph)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(replace)


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes (and then initializers) whose outputs nothing reads, until none is left."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        alive = [n for n in graph.node if any(o in used for o in n.output)]
        if len(alive) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(alive)
    used = {name for node in graph.node for name in node.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


__all__ = ["export_float_onnx", "fuse_integer_linears", "export_qdq_onnx", "export_w4_weight_only_onnx", "export_twin",
           "unsupported_for_int8", "QDQ", "weight_fake_quant", "ATTENTION_KINDS", "fold_constant_quantize", "matmul_nbits_tensors",
           "metadata_for", "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "ONNX_FORMAT"]
