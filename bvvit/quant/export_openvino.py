"""OpenVINO export of our calibrated W8A8 model: the graph form OpenVINO runs as int8 kernels.

OpenVINO reads ONNX QDQ graphs and its low-precision transformations (LPT) turn each
``FakeQuantize -> MatMul(int8 weight constant, per-channel dequantization)`` into one int8
``FullyConnected`` (u8 activations x i8 weights, zero point and scales folded into the
bias and the output). What decides the speed is what ELSE the graph holds (measured on the
demo model with the exec graph and ``PERF_COUNT``; docs/BENCHMARKS.md):

1. the attention operands stay float (no Q/DQ on q, k, v or the softmax output): quantizing
   them stops OpenVINO from fusing ``MatMul -> Softmax -> MatMul`` into one attention kernel
   and adds a float FakeQuantize with reorders around each (about 2x slower at batch 1). Our
   default file quantizes them, so this export follows the simulated *float-attention twin*
   (:func:`float_attention_model`: the same model with those four quantizers off), which is
   what its accuracy is compared with;
2. ``head_dim ** -0.5`` is folded into the q rows of the qkv weight scales and bias (the
   integer codes are unchanged), dropping one multiply per block;
3. the proj input's Q/DQ sits right after ``attn @ v`` (per tensor, so the same values):
   OpenVINO fuses it into the attention kernel, which then writes u8;
4. the prefix-token rows (class, distillation) are made by padding the patch tokens with zero
   patches (their projection is exactly the patch bias, 0 being on every activation grid)
   and each token, its positional embedding and minus that bias are folded into one
   constant; with a class-token head, only that token goes through the final LayerNorm (it is
   per token). No Concat/Broadcast/ShapeOf.

The file users deploy is OpenVINO IR (``.xml`` + ``.bin``: int8 weight constants, float
biases/LayerNorm/positions) converted from that QDQ ONNX graph, with the same metadata as
every ONNX file (:func:`bvvit.quant.export_common.metadata_for`) in its ``rt_info`` under
``bvvit``. ``openvino`` is an optional package, imported only here and only when exporting.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bvvit.config import Preprocessing
from bvvit.errors import ConfigError
from bvvit.model import Attention, VisionTransformer
from bvvit.quant.export import ATTENTION_KINDS, QDQ, fold_constant_quantize, unsupported_for_int8, weight_fake_quant
from bvvit.quant.export_common import DEFAULT_OPSET, metadata_for, save_onnx, torch_export
from bvvit.quant.modules import OFF, QUANTIZE, ActQuantizer, QuantConv2d, QuantLinear

IR_METADATA_SECTION = "bvvit"  # rt_info section of the IR that holds the file's metadata
VARIANT = "w8a8-openvino"


def float_attention_model(qmodel: VisionTransformer) -> VisionTransformer:
    """A copy of ``qmodel`` with the attention operands' quantizers (q, k, v, softmax
    output) off: the simulated model the OpenVINO file computes (its *twin*)."""
    twin = copy.deepcopy(qmodel).eval()
    for module in twin.modules():
        if isinstance(module, ActQuantizer) and module.kind in ATTENTION_KINDS:
            module.state = OFF
    return twin


def _qdq(quantizer: Optional[ActQuantizer]) -> nn.Module:
    return QDQ(quantizer) if quantizer is not None and quantizer.state == QUANTIZE else nn.Identity()


class _Linear(nn.Module):
    """``qdq(x) @ W + b``: an int8 per-channel weight (Q/DQ on the (in, out) weight, axis 1)
    when the layer's weight is quantized, else the float weight. ``row_scale`` multiplies
    output channels (folded into the weight scale and bias; the codes stay the same)."""

    def __init__(self, layer: nn.Module, input_qdq: nn.Module, row_scale: Optional[Tensor] = None):
        super().__init__()
        self.input_qdq = input_qdq
        quantized = isinstance(layer, (QuantLinear, QuantConv2d)) and layer.weight_qparams is not None
        bias = None if layer.bias is None else layer.bias.detach().clone().float()
        row = torch.ones(1) if row_scale is None else row_scale
        if quantized:
            codes = layer.weight_codes.reshape(layer.weight_codes.shape[0], -1)  # (out, fan_in)
            _, scale, zero_point = weight_fake_quant(codes, layer)
            scale = (scale * row).contiguous()
            weight_t = ((codes.float() - zero_point[:, None].float()) * scale[:, None]).t()
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zero_point)
            self.qmin, self.qmax = layer.weight_qparams.qmin, layer.weight_qparams.qmax
        else:
            weight_t = (layer.weight.detach().float().reshape(layer.weight.shape[0], -1) * row[:, None]).t()
        self.quantized = quantized
        self.register_buffer("weight_t", weight_t.contiguous())  # (in, out)
        self.register_buffer("bias", None if bias is None else bias * row)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_t
        if self.quantized:
            weight = torch.fake_quantize_per_channel_affine(weight, self.weight_scale, self.weight_zero_point,
                                                            1, self.qmin, self.qmax)
        y = torch.matmul(self.input_qdq(x), weight)
        return y if self.bias is None else y + self.bias


class _Attention(nn.Module):
    """Float attention between int8 Linears; q scale folded into qkv; proj Q/DQ after attn @ v."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        dim = self.num_heads * self.head_dim
        row = torch.ones(3 * dim)
        row[:dim] = attn.scale
        self.qkv = _Linear(attn.qkv, _qdq(getattr(attn.qkv, "input_quantizer", None)), row)
        self.av_qdq = _qdq(getattr(attn.proj, "input_quantizer", None))
        self.proj = _Linear(attn.proj, nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        _, N, C = x.shape
        qkv = self.qkv(x).reshape(-1, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each; q already scaled
        out = self.av_qdq(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)
        return self.proj(out.permute(0, 2, 1, 3).reshape(-1, N, C))


class _Block(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.attn = _Attention(block.attn)
        mlp = block.mlp
        self.fc1 = _Linear(mlp.fc1, _qdq(getattr(mlp.fc1, "input_quantizer", None)))
        self.fc2 = _Linear(mlp.fc2, _qdq(getattr(mlp.fc2, "input_quantizer", None)))
        self.act = mlp.act
        self.res1 = _qdq(getattr(block.residual1, "output_quantizer", None))
        self.res2 = _qdq(getattr(block.residual2, "output_quantizer", None))

    def forward(self, x: Tensor) -> Tensor:
        x = self.res1(x + self.attn(self.norm1(x)))
        return self.res2(x + self.fc2(self.act(self.fc1(self.norm2(x)))))


class OpenVINOTwin(nn.Module):
    """The graph exported for OpenVINO; same logits as :func:`float_attention_model` of the
    model it is built from, up to float rounding."""

    def __init__(self, qmodel: VisionTransformer):
        super().__init__()
        self.config = qmodel.config
        embed = qmodel.patch_embed
        conv = embed.proj
        if tuple(conv.kernel_size) != (embed.patch_size,) * 2 or tuple(conv.stride) != tuple(conv.kernel_size):
            raise ConfigError("the OpenVINO export needs a patch embedding whose kernel equals its stride")
        self.grid, self.patch, self.in_chans = embed.grid_size, embed.patch_size, qmodel.config.in_chans
        self.image_qdq = _qdq(getattr(conv, "input_quantizer", None))
        self.patch_linear = _Linear(conv, nn.Identity())
        # Rows 0..P-1 of the padded patch matrix are zero patches: their projection is exactly
        # the bias, so each prefix token (class, distillation) + its position - bias is a constant.
        self.num_prefix = qmodel.num_prefix_tokens
        pos = qmodel.pos_embed.detach().clone().float()
        prefix = [t for t in (qmodel.cls_token, qmodel.dist_token) if t is not None]
        for i, token in enumerate(prefix):
            pos[:, i] += token.detach().reshape(-1).float()
            if self.patch_linear.bias is not None:
                pos[:, i] -= self.patch_linear.bias
        self.register_buffer("pos", pos)
        self.blocks = nn.Sequential(*[_Block(block) for block in qmodel.blocks])
        self.norm, self.fc_norm = qmodel.norm, qmodel.fc_norm  # one of them is an Identity
        self.global_pool = qmodel.config.global_pool
        self.heads = nn.ModuleList(_Linear(head, _qdq(getattr(head, "input_quantizer", None)))
                                   for head in (getattr(qmodel, name) for name in qmodel.head_names))

    def forward(self, x: Tensor) -> Tensor:
        g, p, c = self.grid, self.patch, self.in_chans
        x = self.image_qdq(x).reshape(-1, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, g * g, c * p * p)
        if self.num_prefix:
            x = F.pad(x, (0, 0, self.num_prefix, 0))
        tokens = self.blocks(self.patch_linear(x) + self.pos)  # (B, P + N, D)
        if len(self.heads) == 2:  # distilled: class and distillation token, the mean of both heads
            pooled = self.fc_norm(self.norm(tokens[:, :2]))
            return (self.heads[0](pooled[:, 0]) + self.heads[1](pooled[:, 1])) / 2
        if self.global_pool == "avg":  # the final norm is per token: before the mean unless fc_norm
            return self.heads[0](self.fc_norm(self.norm(tokens)[:, self.num_prefix:].mean(dim=1)))
        return self.heads[0](self.fc_norm(self.norm(tokens[:, 0])))  # per token: only the class token


def openvino_twin(qmodel: VisionTransformer) -> OpenVINOTwin:
    """The export graph of ``qmodel``; ConfigError when a tensor it keeps quantized is not
    8-bit per-tensor (activations) / per-channel (weights)."""
    simulated = float_attention_model(qmodel).cpu()
    problems = unsupported_for_int8(simulated)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else "")
        raise ConfigError(f"only 8-bit models run on OpenVINO's int8 kernels: {shown}")
    return OpenVINOTwin(simulated).eval()


def export_openvino_qdq_onnx(qmodel: VisionTransformer, path: str | os.PathLike,
                             preprocessing: Preprocessing | Mapping[str, Any], class_names: Sequence[str],
                             opset: int = DEFAULT_OPSET) -> Path:
    """The OpenVINO-shaped QDQ graph of ``qmodel`` as an ONNX file (int8 weight initializers)."""
    path = Path(path)
    model = torch_export(openvino_twin(qmodel), opset)
    folded = fold_constant_quantize(model)
    save_onnx(model, path, metadata_for(preprocessing, class_names, VARIANT,
                                        {"weights_folded": str(folded), "attention": "float"}))
    return path


def export_openvino_ir(qmodel: VisionTransformer, path: str | os.PathLike,
                       preprocessing: Preprocessing | Mapping[str, Any], class_names: Sequence[str]) -> Path:
    """Write ``path`` (``.xml``) and its ``.bin``: OpenVINO IR of our W8A8 in the form above,
    int8 weight constants, metadata in ``rt_info['bvvit']``. Both files appear atomically
    (written under temporary names in the same folder, then renamed: .bin first)."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise ConfigError(f"cannot export for OpenVINO: the openvino package is not installed ({exc}); "
                          "pip install openvino") from None
    import onnx

    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as folder:
        onnx_path = export_openvino_qdq_onnx(qmodel, Path(folder) / "model.onnx", preprocessing, class_names)
        try:
            model = ov.convert_model(str(onnx_path))
        except RuntimeError as exc:  # OpenVINO's frontend errors; our graph should always convert
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"OpenVINO {ov.get_version()} cannot convert the W8A8 graph ({first[:200]}); "
                              "use the ONNX files instead") from None
        for prop in onnx.load(str(onnx_path), load_external_data=False).metadata_props:
            model.set_rt_info(prop.value, [IR_METADATA_SECTION, prop.key])
        staged = Path(folder) / path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)
    return path


__all__ = ["float_attention_model", "openvino_twin", "OpenVINOTwin", "export_openvino_qdq_onnx",
           "export_openvino_ir", "IR_METADATA_SECTION", "VARIANT"]
