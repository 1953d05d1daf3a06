"""Typed configuration of the model, training and preprocessing (quantization's is
:mod:`bvvit.quant.config`).

Each config validates its own fields in ``__post_init__`` (raising :class:`ConfigError`,
which the CLI prints as one line) and round-trips through plain dicts so that it can be
stored in checkpoints and ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, TypeVar

from bvvit.errors import ConfigError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, ignoring unknown keys (forward compatibility)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


class DictConfig:
    """``to_dict`` / ``from_dict`` of a config dataclass: plain dicts for checkpoints, JSON
    and packed files; keys a dict has that the class does not are ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return dataclass_from_dict(cls, data)


MAX_IMG_SIZE = 4096  # pixels per side: each image is decoded and resized at this size
MAX_TOKENS = 4096  # patches per image: attention holds tokens² scores per head and image
MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes 64-bit seeds
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")
CROP_MODES = ("center", "squash")  # timm's names: resize the shorter side to S/crop_pct, or both sides
OVERRIDABLE_PREPROCESSING = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
ACTIVATIONS = ("gelu", "gelu_tanh")
GLOBAL_POOLS = ("token", "avg")


def flag_name(name: str) -> str:
    """The command-line flag of a config field: ``min_lr`` -> ``--min-lr``."""
    return f"--{name.replace('_', '-')}"


def _require_number(name: str, value: Any) -> None:
    """A real, finite number (bools and strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{flag_name(name)} must be a finite number, got {value!r}")


def _require_whole(name: str, value: Any) -> None:
    """A positive whole number."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{flag_name(name)} must be a positive whole number, got {value!r}")


def _require_positive(name: str, value: Any) -> None:
    _require_number(name, value)
    if value <= 0:
        raise ConfigError(f"{flag_name(name)} must be positive, got {value}")


def _require_non_negative(name: str, value: Any) -> None:
    _require_number(name, value)
    if value < 0:
        raise ConfigError(f"{flag_name(name)} must be >= 0, got {value}")


def _require_rate(name: str, value: Any) -> None:
    _require_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{flag_name(name)} must be in [0, 1), got {value}")


def _bytes_text(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.0f} TB"


@dataclass
class ModelConfig(DictConfig):
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
    # Architecture variants of imported checkpoints (the defaults are timm's plain ViT):
    norm_eps: float = 1e-6  # LayerNorm epsilon (Hugging Face ViT: 1e-12)
    activation: str = "gelu"  # MLP activation: gelu (erf) | gelu_tanh
    class_token: bool = True
    dist_token: bool = False  # DeiT's distillation token (a second prefix token)
    head_dist: bool = False  # DeiT's distillation head; logits = mean of both heads
    global_pool: str = "token"  # token (class token) | avg (mean of the patch tokens)
    fc_norm: bool = False  # final LayerNorm after pooling (timm's avg-pool default)

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim",
                     "depth", "num_heads"):
            _require_whole(name, getattr(self, name))
        _require_positive("mlp_ratio", self.mlp_ratio)
        if self.mlp_hidden_dim < 1:
            raise ConfigError(
                f"--mlp-ratio {self.mlp_ratio} gives an MLP hidden width of int({self.embed_dim} "
                f"* {self.mlp_ratio}) = {self.mlp_hidden_dim}; it must be at least 1: raise "
                "--mlp-ratio (4 is usual)")
        for name in ("drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate"):
            _require_rate(name, getattr(self, name))
        if self.img_size > MAX_IMG_SIZE:
            raise ConfigError(
                f"--img-size {self.img_size} is above the supported {MAX_IMG_SIZE} pixels (every "
                f"image is decoded and resized at this size, {_bytes_text(4 * 3 * self.img_size ** 2)} "
                "per RGB image in float32); lower --img-size")
        if self.img_size % self.patch_size != 0:
            raise ConfigError(
                f"--img-size {self.img_size} is not divisible by --patch-size "
                f"{self.patch_size}; choose a patch size that divides the image size "
                f"(e.g. {', '.join(str(p) for p in _divisors(self.img_size))})")
        if self.num_patches > MAX_TOKENS:
            raise ConfigError(
                f"--img-size {self.img_size} with --patch-size {self.patch_size} gives "
                f"{self.grid_size}x{self.grid_size} = {self.num_patches} tokens, at most "
                f"{MAX_TOKENS} are supported (attention holds tokens² scores: "
                f"{_bytes_text(4 * self.num_patches ** 2)} per image and head in float32); raise "
                "--patch-size or lower --img-size")
        if self.embed_dim % self.num_heads != 0:
            raise ConfigError(
                f"--embed-dim {self.embed_dim} is not divisible by --num-heads "
                f"{self.num_heads}; each head needs an equal share of the embedding")
        self._check_variant()

    def _check_variant(self) -> None:
        """ConfigError for an architecture variant the model cannot build."""
        _require_positive("norm_eps", self.norm_eps)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model activation {self.activation!r} is not supported; use one of "
                              f"{', '.join(ACTIVATIONS)}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"model global_pool {self.global_pool!r} is not supported; use one of "
                              f"{', '.join(GLOBAL_POOLS)}")
        for name in ("qkv_bias", "class_token", "dist_token", "head_dist", "fc_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model {name} must be true or false, got {getattr(self, name)!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("model global_pool 'token' needs the class token (class_token true)")
        if self.dist_token and not self.class_token:
            raise ConfigError("model dist_token needs the class token before it (class_token true)")
        if self.head_dist and not (self.dist_token and self.global_pool == "token"):
            raise ConfigError("model head_dist reads the distillation token: it needs dist_token "
                              "true and global_pool 'token'")

    @property
    def mlp_hidden_dim(self) -> int:
        """Width of each block's MLP (as :class:`bvvit.model.MLP` builds it)."""
        return int(self.embed_dim * self.mlp_ratio)

    def estimated_parameters(self) -> int:
        """Parameter count of the model this config builds (patch embedding, tokens,
        blocks, final norm, head), without building it."""
        dim, hidden = self.embed_dim, self.mlp_hidden_dim
        prefix = int(self.class_token) + int(self.dist_token)
        embed = dim * (self.in_chans * self.patch_size ** 2 + 1) + dim * (self.num_patches + 2 * prefix)
        block = (4 * dim + 3 * dim * dim + (3 * dim if self.qkv_bias else 0) + dim * dim + dim
                 + 2 * dim * hidden + hidden + dim)
        heads = 2 if self.head_dist else 1
        return embed + self.depth * block + 2 * dim + heads * (dim + 1) * self.num_classes

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2



def _divisors(n: int) -> list[int]:
    return [d for d in range(2, min(n, 32) + 1) if n % d == 0][:5]


@dataclass
class TrainConfig(DictConfig):
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
    pretrained_format: str = "auto"  # bvvit | timm | hf | torchvision (bvvit.formats); auto: detected
    progress: bool = True
    tensorboard: bool = False
    train_subset: Optional[int] = None  # use the first N training images (smoke tests)
    val_subset: Optional[int] = None
    augment: str = "light"  # none | flip | light (crop+flip) | strong (random-resized-crop+flip)
    eval_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        _require_whole("epochs", self.epochs)
        _require_whole("batch_size", self.batch_size)
        _require_positive("lr", self.lr)
        for name in ("min_lr", "weight_decay", "warmup_epochs"):
            _require_non_negative(name, getattr(self, name))
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}, so the schedule "
                              "would rise instead of decay; choose a --min-lr below --lr")
        _require_rate("label_smoothing", self.label_smoothing)
        if self.clip_grad is not None:
            _require_number("clip_grad", self.clip_grad)
            if self.clip_grad <= 0:
                self.clip_grad = None  # 0 or negative disables clipping, as in timm
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"--workers must be a whole number >= 0, got {self.workers!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("train_subset", "val_subset", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None:
                _require_whole(name, value)
        if self.augment not in ("none", "flip", "light", "strong"):
            raise ConfigError(f"--augment must be none, flip, light or strong, got {self.augment!r}")



@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs; stored with every model file."""

    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    img_size: int = 28
    in_chans: int = 1
    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # eval: resize to img_size / crop_pct, then centre-crop img_size
    crop_mode: str = "center"  # center: resize the shorter side; squash: both sides (no aspect)

    def __post_init__(self) -> None:
        """ConfigError ("preprocessing FIELD ...") for a field no transform can use."""
        if isinstance(self.img_size, bool) or not isinstance(self.img_size, int) \
                or not 0 < self.img_size <= MAX_IMG_SIZE:
            raise ConfigError(f"preprocessing img_size must be a whole number from 1 to "
                              f"{MAX_IMG_SIZE}, got {self.img_size!r}")
        if self.in_chans not in (1, 3) or isinstance(self.in_chans, bool):
            raise ConfigError(f"preprocessing in_chans must be 1 or 3, got {self.in_chans!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or len(values) not in (1, self.in_chans) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in values):
                raise ConfigError(f"preprocessing {name} must be 1 or in_chans ({self.in_chans}) "
                                  f"finite numbers, got {values!r}")
        if len(self.std) != len(self.mean) or min(self.std) <= 0:
            raise ConfigError(f"preprocessing mean {self.mean} / std {self.std}: std must be "
                              "positive and as long as mean")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"preprocessing interpolation {self.interpolation!r} is not "
                              f"supported; use one of {', '.join(INTERPOLATIONS)}")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) \
                or not 0 < self.crop_pct <= 1:
            raise ConfigError(f"preprocessing crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.crop_mode not in CROP_MODES:
            raise ConfigError(f"preprocessing crop_mode {self.crop_mode!r} is not supported; use "
                              f"one of {', '.join(CROP_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    def overridden(self, items: Sequence[str]) -> "Preprocessing":
        """A copy with ``--preprocessing KEY=VALUE`` items applied (mean/std: comma lists;
        interpolation, crop_pct, crop_mode). ConfigError (one line) for a bad item."""
        changes: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in OVERRIDABLE_PREPROCESSING:
                raise ConfigError(f"--preprocessing {item!r}: expected KEY=VALUE with KEY one of "
                                  f"{', '.join(OVERRIDABLE_PREPROCESSING)}")
            try:
                if key in ("mean", "std"):
                    changes[key] = tuple(float(v) for v in value.split(","))
                elif key == "crop_pct":
                    changes[key] = float(value)
                else:
                    changes[key] = value.strip()
            except ValueError:
                raise ConfigError(f"--preprocessing {item!r}: {value!r} is not a number "
                                  "(mean/std take comma-separated numbers)") from None
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        data = dict(data)
        for key in ("mean", "std"):
            if isinstance(data.get(key), (list, tuple)):  # JSON and torch.save give lists
                data[key] = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                                  for v in data[key])
        return dataclass_from_dict(cls, data)


__all__ = ["ModelConfig", "TrainConfig", "Preprocessing", "DictConfig", "dataclass_from_dict", "flag_name", "MAX_IMG_SIZE",
           "MAX_TOKENS", "MAX_SEED", "INTERPOLATIONS", "CROP_MODES", "ACTIVATIONS", "GLOBAL_POOLS",
           "OVERRIDABLE_PREPROCESSING"]
