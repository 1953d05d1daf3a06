"""Image transforms: uint8 ``(C, H, W)`` in, normalised float32 ``(C, S, S)`` out.

Geometry uses ``torchvision.transforms.v2.functional`` (the random-resized crop calls
``torch.nn.functional.interpolate`` directly); the transform classes of v2 are not used
because their per-call dispatch costs 10-40 us each, more than the work on a 28x28
image. Random parameters come from the ``generator`` passed to the call (training draws
one per sample, seeded from (seed, epoch, index): see :class:`bvvit.data.loaders.
SeededAugmentation`), or from torch's global RNG without one. Normalisation is one ``addcmul`` on the uint8 image. Measured per
28x28 image on one CPU thread: eval ~6 us, light ~20 us, strong ~35 us.

Pipelines (S = img_size):

- eval (and train with augment "none"): resize the shorter side to
  ``int(S / crop_pct)``, centre-crop S (both skipped when already S x S), normalise;
- "flip": eval geometry and a horizontal flip with p = 0.5 (short schedules: the model
  fits the data faster than with crops);
- "light": eval geometry, then a random S crop of the image zero-padded by
  ``max(2, S // 14)`` pixels, then a horizontal flip with p = 0.5;
- "strong": RandomResizedCrop(S, scale=(0.35, 1), ratio=(3/4, 4/3)) and the flip.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from bvvit.config import Preprocessing
from bvvit.errors import ConfigError

AUGMENTS = ("none", "flip", "light", "strong")
STRONG_SCALE = (0.35, 1.0)
STRONG_RATIO = (3 / 4, 4 / 3)
_LOG_RATIO = (math.log(STRONG_RATIO[0]), math.log(STRONG_RATIO[1]))


class ImageTransform:
    """Picklable callable (DataLoader workers) built by :func:`build_transform`."""

    def __init__(self, pre: Preprocessing, train: bool, augment: str = "light") -> None:
        if augment not in AUGMENTS:
            raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got "
                              f"{augment!r}")
        self.pre = pre  # its fields were validated when it was built
        self.mode = augment if train else "none"
        self.size = pre.img_size
        # epsilon: 224 / 0.875 must give 256 even if the division lands just below it
        self.resize_to = int(math.floor(pre.img_size / pre.crop_pct + 1e-6))
        self.pad = max(2, pre.img_size // 14)
        self.interpolation = v2.InterpolationMode(pre.interpolation)
        channels = (pre.in_chans, 1, 1)
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1).expand(channels)
        std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1).expand(channels)
        # (x / 255 - mean) / std == x * scale + shift: one multiply-add on the uint8 input
        self._scale = (1.0 / (255.0 * std)).contiguous()
        self._shift = (-mean / std).contiguous()

    def __call__(self, image: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 ``(C, H, W)`` -> float32 ``(in_chans, S, S)``; random choices are drawn
        from ``generator`` (None: torch's global RNG)."""
        if image.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 (C, H, W) image, got {image.dtype}")
        if image.shape[-3] == 3 and self.pre.in_chans == 1:
            image = F.rgb_to_grayscale(image)  # before resizing: a third of the work
        if self.mode == "strong":
            image = self._random_resized_crop(image, generator)
            flip = torch.rand((), generator=generator).item() < 0.5
        else:
            image = self._resize_centre_crop(image)
            flip = False
            if self.mode == "light":
                image, flip = self._random_padded_crop(image, generator)
            elif self.mode == "flip":
                flip = torch.rand((), generator=generator).item() < 0.5
        if flip:
            image = F.horizontal_flip(image)
        if image.shape[-3] not in (1, self.pre.in_chans):
            raise ValueError(f"cannot turn a {image.shape[-3]}-channel image into "
                             f"{self.pre.in_chans} channels")
        # one out-of-place op; broadcasting (in_chans, 1, 1) repeats a gray channel to RGB
        return torch.addcmul(self._shift, image, self._scale)

    def _resize_centre_crop(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if height == width == self.size and self.resize_to == self.size:
            return image  # Fashion-MNIST at 28: nothing to do
        if self.pre.crop_mode == "squash" and (height, width) != (self.resize_to, self.resize_to):
            image = F.resize(image, [self.resize_to, self.resize_to],
                             interpolation=self.interpolation, antialias=True)
        elif min(height, width) != self.resize_to:
            image = F.resize(image, [self.resize_to], interpolation=self.interpolation,
                             antialias=True)
        if image.shape[-2:] != (self.size, self.size):
            image = F.center_crop(image, [self.size, self.size])
        return image

    def _random_padded_crop(self, image: torch.Tensor,
                            generator: Optional[torch.Generator]) -> tuple[torch.Tensor, bool]:
        """Crop S x S at a uniform offset from the image zero-padded by ``pad`` on each
        side (without building the padded image); also draws the flip coin."""
        size, pad = self.size, self.pad
        span = 2 * pad + 1
        # one RNG call for the row offset, column offset and flip (each uniform)
        draw = int(torch.randint(0, span * span * 2, (), generator=generator))
        flip, draw = draw % 2 == 1, draw // 2
        dy, dx = draw // span - pad, draw % span - pad
        if dy == 0 and dx == 0:
            return image, flip
        out = image.new_zeros(image.shape[0], size, size)
        out[:, max(0, -dy):size - max(0, dy), max(0, -dx):size - max(0, dx)] = \
            image[:, max(0, dy):size + min(0, dy), max(0, dx):size + min(0, dx)]
        return out, flip

    def _random_resized_crop(self, image: torch.Tensor,
                             generator: Optional[torch.Generator]) -> torch.Tensor:
        top, left, height, width = _resized_crop_box(*image.shape[-2:], generator)
        crop = image[None, :, top:top + height, left:left + width].to(torch.float32)
        # torch's interpolate in float: F.resize's dispatch and uint8 round trip cost
        # more than the resize itself at 28x28; antialiasing only matters when shrinking
        mode = self.pre.interpolation
        antialias = mode in ("bilinear", "bicubic") and max(height, width) > self.size
        out = torch.nn.functional.interpolate(
            crop, size=(self.size, self.size), mode=mode, antialias=antialias,
            align_corners=False if mode in ("bilinear", "bicubic") else None)
        if mode == "bicubic":
            out = out.clamp_(0, 255)  # bicubic overshoots; the uint8 eval path clamps too
        return out[0]  # (C, S, S) float32

    def __repr__(self) -> str:
        return (f"ImageTransform(mode={self.mode!r}, size={self.size}, "
                f"resize_to={self.resize_to}, interpolation={self.pre.interpolation!r}, "
                f"mean={self.pre.mean}, std={self.pre.std})")


def _resized_crop_box(height: int, width: int,
                      generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm): area fraction uniform in
    STRONG_SCALE, aspect ratio log-uniform in STRONG_RATIO, 10 tries, then the largest
    centre crop within the ratio range. All randomness is one draw from ``generator``
    (None: the global RNG)."""
    area = height * width
    draws = torch.rand(10, 4, dtype=torch.float64, generator=generator)
    for u_area, u_ratio, u_top, u_left in draws.tolist():
        target_area = area * (STRONG_SCALE[0] + u_area * (STRONG_SCALE[1] - STRONG_SCALE[0]))
        aspect = math.exp(_LOG_RATIO[0] + u_ratio * (_LOG_RATIO[1] - _LOG_RATIO[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < STRONG_RATIO[0]:
        w, h = width, int(round(width / STRONG_RATIO[0]))
    elif in_ratio > STRONG_RATIO[1]:
        h, w = height, int(round(height * STRONG_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def build_transform(pre: Preprocessing, train: bool, augment: str = "light") -> ImageTransform:
    """uint8 ``(C, H, W)`` -> float32 ``(pre.in_chans, S, S)`` normalised with pre.mean/std.

    ``train=False`` ignores ``augment``. 1-channel input is repeated for 3-channel
    preprocessing and 3-channel input turned to grayscale for 1-channel preprocessing.
    """
    return ImageTransform(pre, train, augment)


__all__ = ["AUGMENTS", "ImageTransform", "build_transform"]
