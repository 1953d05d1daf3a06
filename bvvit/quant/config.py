"""What a quantization run does: :class:`QuantConfig` and its parts.

=====================  =====================================================================
class                  what it says
=====================  =====================================================================
TensorQuantSpec        how one kind of tensor is quantized: bits, symmetric, granularity,
                       observer, quantizer method
LayerOverride          a per-layer exception (``blocks.0.*=8``, ``head=float``)
ReparamOptions         post-LayerNorm reparameterization (:mod:`bvvit.quant.reparam`)
GPTQOptions            GPTQ weight rounding (:mod:`bvvit.quant.gptq`)
ReconstructOptions     block-wise reconstruction (:mod:`bvvit.quant.reconstruct`)
RotationOptions        orthogonal rotation of the residual stream (:mod:`bvvit.quant.rotation`)
QuantConfig            the specs of weights, activations and attention probabilities, which op
                       types are quantized, the overrides, the three techniques, calibration
=====================  =====================================================================

Each validates its own fields in ``__post_init__`` (one-line :class:`ConfigError`). The
bit-widths live in the specs only: ``QuantConfig.w_bits`` / ``a_bits`` read them. Every
width is checked by :func:`check_bits` against :data:`MIN_BITS` .. :data:`MAX_BITS`.
:meth:`QuantConfig.from_dict` also reads the flat layout written before the techniques were
nested (packed files and result records of earlier versions).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

from bvvit.config import DictConfig, dataclass_from_dict
from bvvit.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 16  # the widths every quantizer, override and flag accepts
DEFAULT_BITS = (4, 6, 8, 10, 12, 16)  # the widths post_training.py sweeps by default
DEFAULT_CALIB_SIZE = 1024  # calibration images (block reconstruction at <= 4 bits needs them)
GRANULARITIES = ("tensor", "channel")  # plus "group:<size>"
OBSERVER_NAMES = ("minmax", "ema_minmax", "percentile", "mse")
QUANTIZER_METHODS = ("uniform", "log2", "auto")  # auto: chosen after calibration (softmax)


def check_bits(value: Any, name: str = "bits", error: type[Exception] = ConfigError) -> int:
    """``value`` as an int when it is a whole number from :data:`MIN_BITS` to
    :data:`MAX_BITS`, else ``error`` (a one-line ConfigError for what users set; primitives
    pass ValueError, a programming error): ``"{name} must be between 2 and 16, got {value}"``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not MIN_BITS <= value <= MAX_BITS:
        raise error(f"{name} must be between {MIN_BITS} and {MAX_BITS}, got {value}")
    return int(value)


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _require_fraction(name: str, value: Any, low: float, high: float, high_included: bool) -> None:
    """A real number in [low, high] (or [low, high))."""
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (low <= value <= high if high_included else low <= value < high)
    if not inside:
        raise ConfigError(f"{name} must be in [{low:g}, {high:g}{']' if high_included else ')'}, got {value!r}")


@dataclass
class TensorQuantSpec(DictConfig):
    """How one kind of tensor is quantized (weights, activations or attention probabilities)."""

    bits: int = 8
    symmetric: bool = False
    granularity: str = "tensor"  # tensor | channel | group:<size>
    observer: str = "minmax"  # minmax | ema_minmax | percentile | mse
    percentile: float = 99.99
    method: str = "uniform"  # uniform | log2 | auto (post-softmax: grid chosen by calibration error)

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits)
        if self.granularity not in GRANULARITIES and not _is_group(self.granularity):
            raise ConfigError(f"granularity must be tensor, channel or group:<size>, got {self.granularity!r}")
        if self.observer not in OBSERVER_NAMES:
            raise ConfigError(f"observer must be one of {', '.join(OBSERVER_NAMES)}, got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.method not in QUANTIZER_METHODS:
            raise ConfigError(f"quantizer method must be one of {', '.join(QUANTIZER_METHODS)}")


def _is_group(text: str) -> bool:
    head, _, size = text.partition(":")
    return head == "group" and size.isdigit() and int(size) > 0


@dataclass
class LayerOverride(DictConfig):
    """Per-layer exception, matched on module names with shell patterns (``blocks.0.*``).

    ``bits`` sets weight and activation bits of the matched layers; ``keep_float`` leaves
    them unquantized.
    """

    pattern: str
    bits: Optional[int] = None
    keep_float: bool = False

    def __post_init__(self) -> None:
        if self.bits is None and not self.keep_float:
            raise ConfigError(f"override {self.pattern!r} needs bits or keep_float")
        if self.bits is not None:
            self.bits = check_bits(self.bits, f"override {self.pattern!r}: bits")

    @classmethod
    def parse(cls, text: str) -> "LayerOverride":
        """``PATTERN=BITS`` or ``PATTERN=float``."""
        pattern, sep, value = text.partition("=")
        if not sep or not pattern:
            raise ConfigError(f"--override {text!r}: expected PATTERN=BITS or PATTERN=float")
        if value.lower() in ("float", "fp32", "none"):
            return cls(pattern, keep_float=True)
        if not value.isdigit():
            raise ConfigError(f"--override {text!r}: {value!r} is not a bit-width or 'float'")
        return cls(pattern, bits=int(value))


@dataclass(frozen=True)
class ReparamOptions:
    """Post-LayerNorm reparameterization (RepQ-ViT): fold per-channel ranges of the
    LayerNorm outputs into the LayerNorm and the next Linear (:mod:`bvvit.quant.reparam`)."""

    enabled: bool = False
    alpha: float = 1.0  # 1 = equalise channel ranges fully, 0 = not at all

    def __post_init__(self) -> None:
        _require_bool("reparam enabled", self.enabled)
        _require_fraction("reparam alpha", self.alpha, 0.0, 1.0, high_included=True)


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ error-compensating rounding of the Linear weights (:mod:`bvvit.quant.gptq`)."""

    enabled: bool = False
    damp: float = 0.01  # fraction of the mean Hessian diagonal added for stability
    act_order: bool = True  # columns with large Hessian diagonals first

    def __post_init__(self) -> None:
        _require_bool("gptq enabled", self.enabled)
        _require_bool("gptq act_order", self.act_order)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0.0 < self.damp < 1.0:
            raise ConfigError(f"gptq damp must be in (0, 1), got {self.damp!r}")


@dataclass(frozen=True)
class ReconstructOptions:
    """Block-wise reconstruction after calibration (BRECQ/QDrop with AdaRound and LSQ,
    :mod:`bvvit.quant.reconstruct`); the hyperparameter defaults were measured on the demo
    model."""

    enabled: bool = False
    iters: int = 100  # Adam steps per unit (patch embedding, each block, head); 300 was no better at 4 bits
    time_budget: Optional[float] = None  # seconds for the whole reconstruction (None: no limit)
    batch_size: int = 32  # images per step
    drop_prob: float = 0.0  # QDrop: chance of keeping an activation float (0 = BRECQ)
    weight_lr: float = 1e-2  # Adam rate of the AdaRound variables V
    act_lr: float = 1e-2  # Adam rate of log(activation scale)
    reg_weight: float = 10.0  # rounding regulariser (mean over weights) against the relative MSE
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # annealed regulariser exponent (start, end)
    init: str = "codes"  # "codes": start from the current codes; "floor": AdaRound's w/s
    learn_act: bool = True  # LSQ step sizes of the activation quantizers
    learn_weight_scale: bool = False  # learn the weight step sizes (per channel / group) too
    weight_scale_lr: float = 1e-3  # Adam rate of log(weight scale)
    units: str = "all"  # "all" (patch embedding, blocks, head) or "blocks"
    cache_mb: float = 128.0  # a cached set of per-image activations above this goes to a temporary file

    def __post_init__(self) -> None:
        _require_bool("reconstruct enabled", self.enabled)
        _require_bool("reconstruct learn_act", self.learn_act)
        _require_bool("reconstruct learn_weight_scale", self.learn_weight_scale)
        for name in ("iters", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"reconstruct {name} must be a positive integer, got {value!r}")
        budget = self.time_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise ConfigError(f"reconstruct time_budget must be a positive number of seconds, got {budget!r}")
        _require_fraction("reconstruct cache_mb", self.cache_mb, 0.0, math.inf, high_included=False)
        _require_fraction("reconstruct drop_prob", self.drop_prob, 0.0, 1.0, high_included=False)
        _require_fraction("reconstruct warmup", self.warmup, 0.0, 1.0, high_included=False)
        for name in ("weight_lr", "act_lr", "weight_scale_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"reconstruct {name} must be a positive learning rate, got {value!r}")
        if self.init not in ("codes", "floor") or self.units not in ("all", "blocks"):
            raise ConfigError(f"reconstruct init must be codes or floor and units all or blocks, got "
                              f"{self.init!r} / {self.units!r}")
        object.__setattr__(self, "beta", tuple(self.beta))  # JSON gives a list


@dataclass(frozen=True)
class RotationOptions:
    """A seeded, ones-preserving randomized Hadamard rotation of the residual stream, folded
    into the weights before anything else (:mod:`bvvit.quant.rotation`): exact in float, no
    extra op in the model."""

    enabled: bool = False
    seed: int = 0  # the random signs of the Hadamard matrix

    def __post_init__(self) -> None:
        _require_bool("rotation enabled", self.enabled)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"rotation seed must be a non-negative integer, got {self.seed!r}")


_OPTIONS = {"reparam": ReparamOptions, "gptq": GPTQOptions, "reconstruct": ReconstructOptions,
            "rotation": RotationOptions}


@dataclass
class QuantConfig(DictConfig):
    """One quantization run: what gets quantized, how, and how it is calibrated."""

    recipe: str = "custom"  # the recipe that made it (make_quant_config names it)
    weight: TensorQuantSpec = field(
        default_factory=lambda: TensorQuantSpec(symmetric=True, granularity="channel"))
    activation: TensorQuantSpec = field(default_factory=TensorQuantSpec)
    softmax: TensorQuantSpec = field(default_factory=TensorQuantSpec)
    # what gets quantized (per op type)
    linear: bool = True  # qkv, proj, fc1, fc2 weights and inputs
    attention_matmul: bool = True  # q, k, v operands of the two attention matmuls
    softmax_output: bool = True  # attention probabilities (input of attn @ v)
    residual: bool = False  # outputs of the residual additions
    patch_embed: bool = True
    head: bool = True
    image_bits: Optional[int] = None  # bits of the patch-embedding input (the image); None: a_bits
    softmax_renorm: bool = False  # quantized attention rows rescaled to sum to 1 (softmax below 8 bits)
    overrides: list[LayerOverride] = field(default_factory=list)
    # ViT-aware techniques, handed as they are to rotation.py, reparam.py, gptq.py and reconstruct.py
    rotation: RotationOptions = field(default_factory=RotationOptions)
    reparam: ReparamOptions = field(default_factory=ReparamOptions)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    reconstruct: ReconstructOptions = field(default_factory=ReconstructOptions)
    calib_size: int = DEFAULT_CALIB_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight", "activation", "softmax"):
            if not isinstance(getattr(self, name), TensorQuantSpec):
                raise ConfigError(f"{name} must be a TensorQuantSpec, got {getattr(self, name)!r}")
        for name, cls in _OPTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be {cls.__name__}, got {getattr(self, name)!r}")
        if self.image_bits is not None:
            self.image_bits = check_bits(self.image_bits, "image_bits")
        _require_bool("softmax_renorm", self.softmax_renorm)
        if isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int) or self.calib_size <= 0:
            raise ConfigError(f"--calib-size must be positive, got {self.calib_size}")

    @property
    def w_bits(self) -> int:
        """Weight bits (the weight spec's)."""
        return self.weight.bits

    @property
    def a_bits(self) -> int:
        """Activation bits (the activation spec's: linear inputs, q, k, v, residuals)."""
        return self.activation.bits

    @property
    def name(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """The config of ``data`` (``to_dict``'s layout, or the earlier flat one)."""
        data = _nested_layout(dict(data))
        for key in ("weight", "activation", "softmax"):
            if isinstance(data.get(key), dict):
                data[key] = TensorQuantSpec.from_dict(data[key])
        for key, options in _OPTIONS.items():
            if isinstance(data.get(key), dict):
                data[key] = dataclass_from_dict(options, data[key])
        data["overrides"] = [o if isinstance(o, LayerOverride) else LayerOverride(**o)
                             for o in data.get("overrides", [])]
        return dataclass_from_dict(cls, data)


_FLAT_OPTIONS = {"reparam": {"reparam_layernorm": "enabled", "reparam_alpha": "alpha"},
                 "gptq": {"gptq": "enabled", "gptq_damp": "damp", "gptq_act_order": "act_order"},
                 "reconstruct": {"reconstruct": "enabled", "reconstruct_iters": "iters",
                                 "reconstruct_drop_prob": "drop_prob"}}


def _nested_layout(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the flat technique fields of earlier versions (``gptq: true``,
    ``gptq_damp``, ``reconstruct_iters``, ...) nested into their options, and their
    top-level ``w_bits``/``a_bits``, which then overrode the specs' bits, written into the
    specs (weights; activations and softmax) as those versions did."""
    if not any(k in data for k in ("w_bits", "a_bits", "reparam_layernorm", "gptq_damp", "reconstruct_iters")) \
            and not isinstance(data.get("gptq"), bool) and not isinstance(data.get("reconstruct"), bool):
        return data
    for key, flat in _FLAT_OPTIONS.items():
        data[key] = {option: data.pop(old) for old, option in flat.items() if old in data}
    for spec, bits_key in (("weight", "w_bits"), ("activation", "a_bits"), ("softmax", "a_bits")):
        bits = data.get(bits_key)
        if bits is not None:
            data[spec] = {**(data.get(spec) or {}), "bits": bits}
    data.pop("w_bits", None)
    data.pop("a_bits", None)
    return data


__all__ = ["QuantConfig", "TensorQuantSpec", "LayerOverride", "ReparamOptions", "GPTQOptions",
           "ReconstructOptions", "RotationOptions", "check_bits", "MIN_BITS", "MAX_BITS", "DEFAULT_BITS", "DEFAULT_CALIB_SIZE",
           "GRANULARITIES", "OBSERVER_NAMES", "QUANTIZER_METHODS"]
