"""Pure-tensor quantization primitives: granularity, qparams, (fake-)quantize.

Plain functions in the style of torchao's ``choose_qparams_affine`` /
``quantize_affine`` / ``dequantize_affine``; nothing here knows about models.

Affine quantization of a float ``x`` with ``scale`` and integer ``zero_point``::

    q  = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)     # int32
    x' = (q - zero_point) * scale                                    # dequantize

``round`` is round-half-to-even (``torch.round``), and ``x`` is multiplied by the
float32 reciprocal of ``scale`` exactly as torch's ``fake_quantize_*`` kernels do, so
results are bit-identical to ``torch.fake_quantize_per_{tensor,channel}_affine``.

Granularity is data (a frozen dataclass); it decides the shape of ``scale`` /
``zero_point``, which always broadcast against ``x`` (``PerTensor``/``PerChannel``) or
against ``to_groups(x, granularity)`` (``PerGroup``):

======================  =================  =====================  ====================
granularity             x                  scale / zero_point     torchao block_size
======================  =================  =====================  ====================
PerTensor()             (out, in)          ()  (0-d)              (out, in)
PerChannel(axis=0)      (out, in)          (out, 1)               (1, in)
PerChannel(axis=-1)     (B, N, C)          (1, 1, C)              (B, N, 1)
PerGroup(32, axis=-1)   (out, in)          (out, in/32, 1)        (1, 32)
                        grouped: (out, in/32, 32)
PerGroup(8, axis=-1)    (B, N, C)          (B, N, C/8, 1)         (1, 1, 8)
PerGroup(8) + reduce    (B, N, C)          (1, 1, C/8, 1)         (B, N, 8)
======================  =================  =====================  ====================

``PerGroup`` keeps every dimension except the grouped one (like torchao): groups are
runs of ``group_size`` consecutive elements along ``axis``.  ``PerChannel`` reduces every
dimension except ``axis``; ``reduce_minmax(..., reduce_other_dims=True)`` gives
``PerGroup`` the same rule (one range per channel group shared by every token: static
activation ranges, last row of the table).  Use :func:`to_groups` / :func:`from_groups` (or the
``*_tensor`` functions, which take the granularity) instead of reshaping by hand.

Symmetric quantization uses the signed range ``[-2^(b-1), 2^(b-1)-1]`` with
``zero_point = 0`` and ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, the formula
of torch's ``MinMaxObserver`` (``per_tensor_symmetric`` / ``qint8``): the full range is
used and the single value ``+max`` is clipped by half a step.  Asymmetric quantization
uses the unsigned range ``[0, 2^b-1]``, a range widened to contain 0 and an integer
``zero_point`` clamped into the range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from bvvit.quant.config import check_bits

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "Granularity",
    "granularity_to_dict",
    "granularity_from_dict",
    "qrange",
    "to_groups",
    "from_groups",
    "to_rows",
    "reduce_minmax",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_tensor",
    "dequantize_tensor",
    "fake_quantize_tensor",
    "QParams",
    "bf16_ceil",
]


# --------------------------------------------------------------------------- granularity


@dataclass(frozen=True)
class PerTensor:
    """One scale / zero point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale / zero point per index along ``axis``; all other dims are reduced."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale / zero point per run of ``group_size`` consecutive elements on ``axis``.

    All other dimensions are kept: a Linear weight ``(out, in)`` with ``axis=-1`` gets
    ``(out, in // group_size)`` scales.
    """

    group_size: int
    axis: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")


Granularity = Union[PerTensor, PerChannel, PerGroup]


def granularity_to_dict(granularity: Granularity) -> dict[str, Any]:
    """JSON-friendly dict, e.g. ``{"type": "per_group", "group_size": 32, "axis": -1}``."""
    if isinstance(granularity, PerTensor):
        return {"type": "per_tensor"}
    if isinstance(granularity, PerChannel):
        return {"type": "per_channel", "axis": granularity.axis}
    if isinstance(granularity, PerGroup):
        return {"type": "per_group", "group_size": granularity.group_size, "axis": granularity.axis}
    raise TypeError(f"not a granularity: {granularity!r}")


def granularity_from_dict(data: dict[str, Any]) -> Granularity:
    """Inverse of :func:`granularity_to_dict`."""
    kind = data.get("type")
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_channel":
        return PerChannel(axis=int(data.get("axis", 0)))
    if kind == "per_group":
        return PerGroup(group_size=int(data["group_size"]), axis=int(data.get("axis", -1)))
    raise ValueError(f"unknown granularity type {kind!r}; expected per_tensor, per_channel or per_group")


def _check_granularity(granularity: Any) -> None:
    if not isinstance(granularity, (PerTensor, PerChannel, PerGroup)):
        raise TypeError(f"granularity must be PerTensor, PerChannel or PerGroup, got {granularity!r}")


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-d tensor")
    return axis % ndim


# --------------------------------------------------------------------------- ranges


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``, for
    :data:`~bvvit.quant.config.MIN_BITS` <= bits <= :data:`~bvvit.quant.config.MAX_BITS`."""
    bits = check_bits(bits, error=ValueError)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


# --------------------------------------------------------------------------- reshapes


def to_groups(x: Tensor, granularity: PerGroup) -> Tensor:
    """View ``x`` with ``axis`` (size n) split into ``(n // group_size, group_size)``.

    ``(out, in)`` with ``PerGroup(g, -1)`` -> ``(out, in // g, g)``.  Raises ValueError
    when n is not divisible by ``group_size``.
    """
    axis = _norm_axis(granularity.axis, x.dim())
    n = x.shape[axis]
    size = granularity.group_size
    if n % size:
        raise ValueError(f"dim {granularity.axis} of size {n} is not divisible by group_size {size}")
    return x.reshape(*x.shape[:axis], n // size, size, *x.shape[axis + 1 :])


def from_groups(x_grouped: Tensor, granularity: PerGroup) -> Tensor:
    """Inverse of :func:`to_groups`: merge the (groups, group_size) dims back into one."""
    axis = _norm_axis(granularity.axis, x_grouped.dim() - 1)
    shape = x_grouped.shape
    return x_grouped.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2 :])


def to_rows(
    x: Tensor, granularity: Granularity, reduce_other_dims: bool = False
) -> tuple[Tensor, tuple[int, ...]]:
    """Lay ``x`` out as ``rows`` of shape (R, M), one row per scale, and the stat shape.

    A per-row result ``r`` of shape (R,) becomes a qparam-shaped tensor with
    ``r.reshape(stat_shape)`` (the shape :func:`reduce_minmax` returns).  Used by
    observers that need whole rows (percentiles, MSE search).  ``reduce_other_dims``
    as in :func:`reduce_minmax`.
    """
    _check_granularity(granularity)
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1), ()
    if isinstance(granularity, PerChannel):
        axis = _norm_axis(granularity.axis, x.dim())
        stat_shape = tuple(s if d == axis else 1 for d, s in enumerate(x.shape))
        return x.movedim(axis, 0).reshape(x.shape[axis], -1), stat_shape
    xg = to_groups(x, granularity)
    outer = _norm_axis(granularity.axis, x.dim())  # the group index dim
    inner = outer + 1  # the group_size dim
    if reduce_other_dims:
        stat_shape = tuple(s if d == outer else 1 for d, s in enumerate(xg.shape))
        return xg.movedim(outer, 0).reshape(xg.shape[outer], -1), stat_shape
    stat_shape = tuple(1 if d == inner else s for d, s in enumerate(xg.shape))
    return xg.movedim(inner, -1).reshape(-1, granularity.group_size), stat_shape


def _reduce_dims(x: Tensor, granularity: Granularity, reduce_other_dims: bool) -> tuple[Tensor, tuple[int, ...]]:
    """The tensor to reduce (grouped for PerGroup) and the dims to reduce over."""
    _check_granularity(granularity)
    if isinstance(granularity, PerTensor):
        return x, tuple(range(x.dim()))
    if isinstance(granularity, PerChannel):
        axis = _norm_axis(granularity.axis, x.dim())
        return x, tuple(d for d in range(x.dim()) if d != axis)
    outer = _norm_axis(granularity.axis, x.dim())
    if reduce_other_dims:
        return to_groups(x, granularity), tuple(d for d in range(x.dim() + 1) if d != outer)
    return to_groups(x, granularity), (outer + 1,)


def reduce_minmax(x: Tensor, granularity: Granularity, reduce_other_dims: bool = False) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` per granularity, keepdim-style (see the module table).

    PerTensor -> 0-d tensors; PerChannel(axis) -> size 1 on every dim but ``axis``;
    PerGroup -> shape of ``to_groups(x)`` with the group_size dim reduced to 1, or with
    ``reduce_other_dims=True`` size 1 on every dim but the group index (one range per
    channel group shared by all tokens, for activations: (B, N, C) -> (1, 1, C/g, 1)).
    ``reduce_other_dims`` changes nothing for PerTensor / PerChannel.
    """
    if x.numel() == 0:
        raise ValueError("cannot reduce an empty tensor")
    xr, dims = _reduce_dims(x, granularity, reduce_other_dims)
    if isinstance(granularity, PerTensor):
        return torch.aminmax(xr)
    return torch.amin(xr, dim=dims, keepdim=True), torch.amax(xr, dim=dims, keepdim=True)


# --------------------------------------------------------------------------- qparams


def choose_qparams(
    min_val: Tensor, max_val: Tensor, bits: int, symmetric: bool, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) from a min/max range; shapes follow ``min_val``.

    symmetric: signed range, ``zero_point = 0``,
    ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)`` (torch's MinMaxObserver).
    asymmetric: unsigned range; the range is widened to contain 0,
    ``scale = (max - min) / (qmax - qmin)``, ``zero_point = clamp(qmin - round(min / scale))``.
    The scale is clamped to ``>= eps`` before the zero point is computed.
    """
    qmin, qmax = qrange(bits, signed=symmetric)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32, device=min_val.device)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    eps_t = torch.tensor(eps, dtype=torch.float32, device=min_val.device)
    if symmetric:
        scale = torch.maximum(-min_neg, max_pos) / (float(qmax - qmin) / 2)
        scale = torch.maximum(scale, eps_t)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.maximum(scale, eps_t)
        zero_point = qmin - torch.round(min_neg / scale).to(torch.int32)
        zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int32)
    return scale, zero_point


# --------------------------------------------------------------------------- (de)quantize


def bf16_ceil(scale: Tensor) -> Tensor:
    """The smallest bfloat16-representable float32 >= each (positive, finite) ``scale``.

    Weight scales are rounded UP to bfloat16 values so files can store them in 2 bytes
    losslessly. Rounding up (<= 0.4% coarser steps) never clips a weight the unrounded
    scale kept in range, and the codes are computed with the rounded scale, so the
    quantization error stays within half a step: no measurable accuracy cost.
    """
    bits = scale.detach().to(torch.float32).contiguous().view(torch.int32)
    rounded = ((bits.to(torch.int64) + 0xFFFF) & ~0xFFFF).to(torch.int32)  # ceil in the 16 low bits
    return rounded.view(torch.float32).reshape(scale.shape)


def _qvalues(x: Tensor, scale: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unclamped float ``zero_point + round(x / scale)`` plus float32 scale and zero point."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zp = torch.as_tensor(zero_point, device=x.device).to(torch.float32)
    inv_scale = 1.0 / scale  # torch's kernels multiply by the float32 reciprocal
    return torch.round(x.to(torch.float32) * inv_scale) + zp, scale, zp


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int32; qparams broadcast."""
    q, _, _ = _qvalues(x, scale, zero_point)
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``(q - zero_point) * scale`` as float32; qparams broadcast against ``q``."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    zp = torch.as_tensor(zero_point, device=q.device).to(torch.float32)
    return (q.to(torch.float32) - zp) * scale


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization with torch's straight-through estimator for ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        q, scale_f, zp = _qvalues(x, scale, zero_point)
        if ctx.needs_input_grad[0]:
            mask = (q >= qmin) & (q <= qmax)  # as torch: decided on the rounded, unclamped value
            ctx.save_for_backward(mask)
        out = (torch.clamp(q, qmin, qmax) - zp) * scale_f
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (mask,) = ctx.saved_tensors
        return grad_out * mask.to(grad_out.dtype), None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize then dequantize; computes in float32 and returns ``x.dtype``.

    Gradient w.r.t. ``x`` is 1 where ``zero_point + round(x / scale)`` lies in
    [qmin, qmax] and 0 elsewhere (torch's ``fake_quantize_*`` STE); no gradient flows
    to ``scale`` / ``zero_point``.  Qparams must broadcast against ``x``.
    """
    out = _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax)
    if out.shape != x.shape:  # a qparam larger than x would silently broadcast x up
        raise ValueError(f"qparams of shape {tuple(torch.as_tensor(scale).shape)} do not fit x {tuple(x.shape)}")
    return out


def quantize_tensor(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, granularity: Granularity
) -> Tensor:
    """:func:`quantize` with the reshapes ``granularity`` needs; result has ``x``'s shape."""
    if isinstance(granularity, PerGroup):
        return from_groups(quantize(to_groups(x, granularity), scale, zero_point, qmin, qmax), granularity)
    return quantize(x, scale, zero_point, qmin, qmax)


def dequantize_tensor(q: Tensor, scale: Tensor, zero_point: Tensor, granularity: Granularity) -> Tensor:
    """:func:`dequantize` with the reshapes ``granularity`` needs; result has ``q``'s shape."""
    if isinstance(granularity, PerGroup):
        return from_groups(dequantize(to_groups(q, granularity), scale, zero_point), granularity)
    return dequantize(q, scale, zero_point)


def fake_quantize_tensor(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, granularity: Granularity
) -> Tensor:
    """:func:`fake_quantize` with the reshapes ``granularity`` needs (differentiable)."""
    if isinstance(granularity, PerGroup):
        out = fake_quantize(to_groups(x, granularity), scale, zero_point, qmin, qmax)
        return from_groups(out, granularity)
    return fake_quantize(x, scale, zero_point, qmin, qmax)


# --------------------------------------------------------------------------- QParams


@dataclass(eq=False)
class QParams:
    """Quantization parameters of one tensor.

    ``scale`` (float32) and ``zero_point`` (int32) have the shapes in the module table
    for ``granularity``; the integer range is ``qrange(bits, signed=symmetric)``.
    """

    scale: Tensor
    zero_point: Tensor
    bits: int
    symmetric: bool
    granularity: Granularity = PerTensor()

    def __post_init__(self) -> None:
        qrange(self.bits, self.symmetric)  # validates bits
        _check_granularity(self.granularity)

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]

    def quantize(self, x: Tensor) -> Tensor:
        """int32 tensor of ``x``'s shape."""
        return quantize_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity)

    def dequantize(self, q: Tensor) -> Tensor:
        """float32 tensor of ``q``'s shape."""
        return dequantize_tensor(q, self.scale, self.zero_point, self.granularity)

    def fake_quantize(self, x: Tensor) -> Tensor:
        """Differentiable quantize-dequantize (STE), ``x``'s shape and dtype."""
        return fake_quantize_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity)

    def to(self, device: torch.device | str) -> "QParams":
        return QParams(self.scale.to(device), self.zero_point.to(device), self.bits, self.symmetric, self.granularity)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; float32 scales survive the round trip exactly."""
        return {
            "scale": self.scale.detach().cpu().to(torch.float32).tolist(),
            "zero_point": self.zero_point.detach().cpu().to(torch.int64).tolist(),
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": granularity_to_dict(self.granularity),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QParams":
        return cls(
            scale=torch.tensor(data["scale"], dtype=torch.float32),
            zero_point=torch.tensor(data["zero_point"], dtype=torch.int32),
            bits=int(data["bits"]),
            symmetric=bool(data["symmetric"]),
            granularity=granularity_from_dict(data["granularity"]),
        )
