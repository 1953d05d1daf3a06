"""Quantized stand-ins for the model's modules (simulated, "fake-quant", execution).

Each wrapper keeps the float module's interface and adds quantizers:

=============  ==============================================  ========================
wrapper        quantizes                                       replaces
=============  ==============================================  ========================
QuantLinear    weight (integer codes kept) + input activation  qkv, proj, fc1, fc2, head
QuantConv2d    weight + input image                            patch_embed.proj
QuantMatMul    both operands (q and k^T; v)                    attn.matmul_qk/matmul_av
QuantSoftmax   output probabilities                            attn.softmax
QuantAdd       output (the residual stream)                    block.residual1/2
=============  ==============================================  ========================

An :class:`ActQuantizer` has three states: ``observe`` (collect statistics, pass the float
tensor through), ``quantize`` (fake-quantize with frozen qparams) and ``off``. Calibration
is the explicit step that moves it from the first to the second (see
:func:`bvvit.quant.quantize.calibrate`); quantizing before calibration is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bvvit.quant.config import TensorQuantSpec
from bvvit.quant.observers import Observer, make_observer
from bvvit.quant.primitives import (Granularity, PerChannel, PerGroup, PerTensor, QParams, bf16_ceil)

OBSERVE, QUANTIZE, OFF = "observe", "quantize", "off"


class NotCalibratedError(RuntimeError):
    pass


def granularity_for(spec: TensorQuantSpec, role: str) -> Granularity:
    """``tensor``/``channel``/``group:N`` -> granularity; channels are dim 0 of weights and
    the last dim of activations."""
    if spec.granularity == "tensor":
        return PerTensor()
    if spec.granularity == "channel":
        return PerChannel(axis=0 if role == "weight" else -1)
    size = int(spec.granularity.split(":", 1)[1])
    return PerGroup(size, axis=-1)


def observer_for(spec: TensorQuantSpec, role: str) -> Observer:
    if spec.method == "log2":
        from bvvit.quant.log2 import Log2Observer

        return Log2Observer()
    kwargs = {"percentile": spec.percentile} if spec.observer == "percentile" else {}
    # Activation groups share one range across batch and tokens (shapes vary per batch).
    return make_observer(spec.observer, granularity=granularity_for(spec, role),
                         symmetric=spec.symmetric, reduce_other_dims=(role == "activation"), **kwargs)


class ActQuantizer(nn.Module):
    """Fake-quantizes one activation tensor with qparams frozen after calibration."""

    def __init__(self, spec: TensorQuantSpec, kind: str):
        super().__init__()
        self.spec = spec
        self.kind = kind  # e.g. "linear_input", "q", "k", "v", "softmax", "residual"
        self.state = OFF
        self.observer: Optional[Observer] = None
        self.qparams: Optional[QParams] = None

    @property
    def bits(self) -> int:
        return self.spec.bits

    def start_observing(self) -> None:
        self.observer = observer_for(self.spec, "activation")
        self.qparams = None
        self.state = OBSERVE

    def freeze(self) -> None:
        """Turn the collected statistics into qparams and start quantizing."""
        if self.observer is None or self.observer.num_batches == 0:
            raise NotCalibratedError(f"{self.kind} quantizer saw no data during calibration")
        self.qparams = self.observer.compute_qparams(self.spec.bits)
        self.observer = None  # statistics are not needed any more
        self.state = QUANTIZE

    def set_qparams(self, qparams: QParams) -> None:
        """Quantize with ``qparams`` from now on; the spec then names the grid they use (a
        softmax spec of method "auto" becomes "uniform" or "log2" once its grid is chosen)."""
        from bvvit.quant.log2 import LogQParams

        method = "log2" if isinstance(qparams, LogQParams) else "uniform"
        if self.spec.method != method:
            self.spec = dataclasses.replace(self.spec, method=method)
        self.qparams = qparams
        self.state = QUANTIZE

    def forward(self, x: Tensor) -> Tensor:
        if self.state == QUANTIZE:
            return self.qparams.fake_quantize(x)  # type: ignore[union-attr]
        if self.state == OBSERVE:
            self.observer.update(x.detach())  # type: ignore[union-attr]
            return x
        return x

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, bits={self.spec.bits}, {self.spec.granularity}, "
                f"{'sym' if self.spec.symmetric else 'asym'}, {self.spec.observer}, state={self.state}")


def quantize_weight(weight: Tensor, spec: TensorQuantSpec) -> tuple[Tensor, QParams]:
    """Integer codes (int32, weight's shape) and qparams of a weight; conv kernels are
    quantized as their (out, in*kh*kw) matrix."""
    matrix = weight.detach().float().reshape(weight.shape[0], -1)  # (out, fan_in)
    observer = observer_for(spec, "weight")
    observer.update(matrix)
    qparams = observer.compute_qparams(spec.bits)
    qparams = dataclasses.replace(qparams, scale=bf16_ceil(qparams.scale))  # 2-byte scales in files
    codes = qparams.quantize(matrix)
    return codes.reshape(weight.shape), qparams


class _WeightQuantMixin:
    """Shared by QuantLinear/QuantConv2d: integer weight codes and their float image."""

    weight_qparams: Optional[QParams]

    def _init_weight(self, weight: Tensor, spec: Optional[TensorQuantSpec]) -> None:
        if spec is None:
            self.weight_qparams = None
            self.register_buffer("weight_codes", None)
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            return
        codes, qparams = quantize_weight(weight, spec)
        self.weight_qparams = qparams
        codes_dtype = torch.int8 if spec.bits <= 8 else torch.int16 if spec.bits <= 16 else torch.int32
        if not spec.symmetric:
            codes_dtype = torch.int16 if spec.bits <= 15 else torch.int32  # unsigned range
        self.register_buffer("weight_codes", codes.to(codes_dtype))
        self.refresh_weight()

    def refresh_weight(self) -> None:
        """Recompute the float weight used in forward from the integer codes."""
        qp = self.weight_qparams
        codes = self.weight_codes
        matrix = qp.dequantize(codes.reshape(codes.shape[0], -1).to(torch.int32))
        self.weight = nn.Parameter(matrix.reshape(codes.shape), requires_grad=False)

    @property
    def weight_bits(self) -> Optional[int]:
        return None if self.weight_qparams is None else self.weight_qparams.bits


class QuantLinear(_WeightQuantMixin, nn.Module):
    def __init__(self, linear: nn.Linear, weight_spec: Optional[TensorQuantSpec],
                 act_spec: Optional[TensorQuantSpec], kind: str = "linear_input"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_weight(linear.weight, weight_spec)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                 requires_grad=False)
        self.input_quantizer = ActQuantizer(act_spec, kind) if act_spec is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.weight_bits}"


class QuantConv2d(_WeightQuantMixin, nn.Module):
    def __init__(self, conv: nn.Conv2d, weight_spec: Optional[TensorQuantSpec],
                 act_spec: Optional[TensorQuantSpec], kind: str = "image"):
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self._init_weight(conv.weight, weight_spec)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                               requires_grad=False)
        self.input_quantizer = ActQuantizer(act_spec, kind) if act_spec is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, w_bits={self.weight_bits}"


class QuantMatMul(nn.Module):
    def __init__(self, spec_a: Optional[TensorQuantSpec], spec_b: Optional[TensorQuantSpec],
                 kind_a: str, kind_b: str):
        super().__init__()
        self.quantizer_a = ActQuantizer(spec_a, kind_a) if spec_a is not None else None
        self.quantizer_b = ActQuantizer(spec_b, kind_b) if spec_b is not None else None

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.quantizer_a is not None:
            a = self.quantizer_a(a)
        if self.quantizer_b is not None:
            b = self.quantizer_b(b)
        return a @ b


def renormalize_rows(p: Tensor, dim: int = -1) -> Tensor:
    """``p`` divided by its sum along ``dim``, so each row of quantized probabilities sums
    to 1 again (a row quantized to all zeros stays zero)."""
    total = p.sum(dim, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))


class QuantSoftmax(nn.Module):
    """Softmax with quantized output probabilities. With ``renormalize`` each quantized row
    is divided by its sum: rounding a row's probabilities to a few levels changes its total
    (by up to tens of percent at 3 bits), which scales that token's ``attn @ v`` output. In
    integer arithmetic it is one sum per row (of the codes on a uniform grid, of powers of two
    on a log grid) whose reciprocal joins the requantization scale of that row of
    ``attn @ v``'s int32 outputs."""

    def __init__(self, softmax: nn.Module, spec: TensorQuantSpec, renormalize: bool = False):
        super().__init__()
        self.dim = softmax.dim
        self.output_quantizer = ActQuantizer(spec, "softmax")
        self.renormalize = renormalize

    def forward(self, x: Tensor) -> Tensor:
        quantizer = self.output_quantizer
        p = quantizer(x.softmax(dim=self.dim))
        # only rows this quantizer rounded (export twins may replace it by a QDQ op or drop it)
        if self.renormalize and isinstance(quantizer, ActQuantizer) and quantizer.state == QUANTIZE:
            p = renormalize_rows(p, self.dim)
        return p

    def extra_repr(self) -> str:
        return "renormalize=True" if self.renormalize else ""


class QuantAdd(nn.Module):
    def __init__(self, spec: TensorQuantSpec):
        super().__init__()
        self.output_quantizer = ActQuantizer(spec, "residual")

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.output_quantizer(a + b)


def act_quantizers(model: nn.Module) -> list[tuple[str, ActQuantizer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ActQuantizer)]


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_qparams is not None]


__all__ = ["ActQuantizer", "QuantLinear", "QuantConv2d", "QuantMatMul", "QuantSoftmax", "renormalize_rows",
           "QuantAdd", "act_quantizers", "weight_modules", "quantize_weight", "granularity_for",
           "NotCalibratedError", "OBSERVE", "QUANTIZE", "OFF"]
