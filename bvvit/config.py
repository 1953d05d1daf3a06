"""Typed configuration for every stage.

Each config validates its own fields in ``__post_init__`` (raising :class:`ConfigError`,
which the CLI prints as one line) and round-trips through plain dicts so that it can be
stored in checkpoints and ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from bvvit.errors import ConfigError

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, ignoring unknown keys (forward compatibility)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def _require_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _require_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")


@dataclass
class ModelConfig:
    """Hyperparameters of a :class:`bvvit.model.VisionTransformer`."""

    img_size: int = 28
    patch_size: int = 7
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout after positional embedding and before the head
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0  # dropout after attention projection and MLP layers
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth
    fused_attn: bool = True  # F.scaled_dot_product_attention; False = explicit modules

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim",
                     "depth", "num_heads"):
            _require_positive(name, getattr(self, name))
        _require_positive("mlp_ratio", self.mlp_ratio)
        for name in ("drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate"):
            _require_rate(name, getattr(self, name))
        if self.img_size % self.patch_size != 0:
            raise ConfigError(
                f"--img-size {self.img_size} is not divisible by --patch-size "
                f"{self.patch_size}; choose a patch size that divides the image size "
                f"(e.g. {', '.join(str(p) for p in _divisors(self.img_size))})")
        if self.embed_dim % self.num_heads != 0:
            raise ConfigError(
                f"--embed-dim {self.embed_dim} is not divisible by --num-heads "
                f"{self.num_heads}; each head needs an equal share of the embedding")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data)


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, min(n, 32) + 1) if n % d == 0][:5]


@dataclass
class TrainConfig:
    """Everything ``run.py`` needs besides the model hyperparameters."""

    data_path: str = "fashion-mnist"
    output_dir: str = "output"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: Optional[float] = 1.0
    seed: int = 0
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # bf16 autocast (fp16 + GradScaler on GPUs without bf16)
    compile: bool = False  # torch.compile the model (falls back to eager with a warning)
    resume: Optional[str] = None  # PATH or "auto"
    pretrained_path: Optional[str] = None
    progress: bool = True
    tensorboard: bool = False
    train_subset: Optional[int] = None  # use the first N training images (smoke tests)
    val_subset: Optional[int] = None
    augment: str = "light"  # none | flip | light (crop+flip) | strong (random-resized-crop+flip)
    eval_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        _require_positive("epochs", self.epochs)
        _require_positive("batch_size", self.batch_size)
        _require_positive("lr", self.lr)
        if self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("--min-lr, --weight-decay and --warmup-epochs must be >= 0")
        _require_rate("label_smoothing", self.label_smoothing)
        if self.clip_grad is not None and self.clip_grad <= 0:
            self.clip_grad = None  # 0 or negative disables clipping, as in timm
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("train_subset", "val_subset", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None:
                _require_positive(name, value)
        if self.augment not in ("none", "flip", "light", "strong"):
            raise ConfigError(f"--augment must be none, flip, light or strong, got {self.augment!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs; stored with every model file."""

    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    img_size: int = 28
    in_chans: int = 1
    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # eval: resize to img_size / crop_pct, then centre-crop img_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return _from_dict(cls, data)


__all__ = ["ModelConfig", "TrainConfig", "Preprocessing", "TensorQuantSpec", "LayerOverride", "QuantConfig"]


# ------------------------------------------------------------------------- quantization

GRANULARITIES = ("tensor", "channel")  # plus "group:<size>"
OBSERVER_NAMES = ("minmax", "ema_minmax", "percentile", "mse")
QUANTIZER_METHODS = ("uniform", "log2")


@dataclass
class TensorQuantSpec:
    """How one kind of tensor is quantized (weights, activations or attention probabilities)."""

    bits: int = 8
    symmetric: bool = False
    granularity: str = "tensor"  # tensor | channel | group:<size>
    observer: str = "minmax"  # minmax | ema_minmax | percentile | mse
    percentile: float = 99.99
    method: str = "uniform"  # uniform | log2 (post-softmax)

    def __post_init__(self) -> None:
        if not 2 <= int(self.bits) <= 16:
            raise ConfigError(f"bits must be between 2 and 16, got {self.bits}")
        if self.granularity not in GRANULARITIES and not _is_group(self.granularity):
            raise ConfigError(f"granularity must be tensor, channel or group:<size>, got {self.granularity!r}")
        if self.observer not in OBSERVER_NAMES:
            raise ConfigError(f"observer must be one of {', '.join(OBSERVER_NAMES)}, got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.method not in QUANTIZER_METHODS:
            raise ConfigError(f"quantizer method must be one of {', '.join(QUANTIZER_METHODS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorQuantSpec":
        return _from_dict(cls, data)


def _is_group(text: str) -> bool:
    head, _, size = text.partition(":")
    return head == "group" and size.isdigit() and int(size) > 0


@dataclass
class LayerOverride:
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
        if self.bits is not None and not 2 <= int(self.bits) <= 16:
            raise ConfigError(f"override {self.pattern!r}: bits must be 2..16, got {self.bits}")

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class QuantConfig:
    """One quantization run: what gets quantized, how, and how it is calibrated."""

    recipe: str = "mse"
    w_bits: int = 8
    a_bits: int = 8
    weight: TensorQuantSpec = dataclasses.field(
        default_factory=lambda: TensorQuantSpec(symmetric=True, granularity="channel"))
    activation: TensorQuantSpec = dataclasses.field(default_factory=TensorQuantSpec)
    softmax: TensorQuantSpec = dataclasses.field(default_factory=TensorQuantSpec)
    # what gets quantized (per op type)
    linear: bool = True  # qkv, proj, fc1, fc2 weights and inputs
    attention_matmul: bool = True  # q, k, v operands of the two attention matmuls
    softmax_output: bool = True  # attention probabilities (input of attn @ v)
    residual: bool = False  # outputs of the residual additions
    patch_embed: bool = True
    head: bool = True
    overrides: list[LayerOverride] = dataclasses.field(default_factory=list)
    # ViT-aware techniques (see bvvit/quant/reparam.py and gptq.py)
    reparam_layernorm: bool = False  # fold per-channel post-LayerNorm ranges into LN + Linear
    reparam_alpha: float = 1.0  # 1 = equalise channel ranges fully, 0 = not at all
    gptq: bool = False  # GPTQ error-compensating rounding of Linear weights
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    # block-wise reconstruction after calibration (QDrop/BRECQ + AdaRound; reconstruct.py)
    reconstruct: bool = False
    reconstruct_iters: int = 300  # Adam steps per unit (patch embedding, each block, head)
    reconstruct_drop_prob: float = 0.0  # QDrop: chance of keeping an activation float (0: BRECQ)
    calib_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.reparam_alpha <= 1.0:
            raise ConfigError(f"reparam_alpha must be in [0, 1], got {self.reparam_alpha}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise ConfigError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if not isinstance(self.reconstruct, bool):
            raise ConfigError(f"reconstruct must be true or false, got {self.reconstruct!r}")
        if isinstance(self.reconstruct_iters, bool) or not isinstance(self.reconstruct_iters, int) \
                or self.reconstruct_iters <= 0:
            raise ConfigError(f"reconstruct_iters must be a positive integer, got {self.reconstruct_iters!r}")
        if isinstance(self.reconstruct_drop_prob, bool) \
                or not isinstance(self.reconstruct_drop_prob, (int, float)) \
                or not 0.0 <= self.reconstruct_drop_prob < 1.0:
            raise ConfigError(f"reconstruct_drop_prob must be in [0, 1), got {self.reconstruct_drop_prob!r}")
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 2 <= value <= 16:
                raise ConfigError(f"--{name.replace('_', '-')} must be between 2 and 16, got {value}")
        if self.calib_size <= 0:
            raise ConfigError(f"--calib-size must be positive, got {self.calib_size}")
        # The top-level bit-widths win over the specs' own.
        self.weight = dataclasses.replace(self.weight, bits=self.w_bits)
        self.activation = dataclasses.replace(self.activation, bits=self.a_bits)
        self.softmax = dataclasses.replace(self.softmax, bits=self.a_bits)

    @property
    def name(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        data = dict(data)
        for key in ("weight", "activation", "softmax"):
            if isinstance(data.get(key), dict):
                data[key] = TensorQuantSpec.from_dict(data[key])
        data["overrides"] = [o if isinstance(o, LayerOverride) else LayerOverride(**o)
                             for o in data.get("overrides", [])]
        return _from_dict(cls, data)
