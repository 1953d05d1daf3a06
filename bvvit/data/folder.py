"""ImageNet-style folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/...``
(or ``root/test/<class>/...``).

Class names are the sorted sub-folder names of ``train/`` (label = position); ``val/``
(or ``test/``) must have the same set. Images may sit in nested folders below a class
folder. Which files are images, how links are followed and what is reported is decided in
one place, :mod:`bvvit.data.folder_walk`, for the layout check and the full scan alike.

An image that cannot be decoded raises ``DataError("cannot read image PATH: REASON;
remove or replace the file")`` when it is first read: we fail fast rather than skip it,
because silently training or evaluating on different data than the folder holds is worse
than stopping. Every image is converted to "L" (in_chans 1) or "RGB" (in_chans 3), so a
folder may mix modes and sizes; the transforms bring everything to one size.

Images deeper than 8 bits are scaled by the range of their mode, never by their own
values, so two similar images always come out similar: "I;16*" (16-bit PNG and TIFF) and
"I" (32-bit integers, which older Pillow versions make of 16-bit PNGs) are taken as
0..65535 and divided by 257, "F" (float TIFF) as 0..1 and multiplied by 255; values
outside the range are clipped, NaN becomes 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bvvit.data.folder_walk import (IMAGE_EXTENSIONS, SplitWalker, class_folders,
                                    first_images, no_images_error, scan_split,
                                    sorted_entries)
from bvvit.errors import DataError

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N",
                             "F"})
VAL_SPLITS = ("val", "test")  # first one present is the validation split
LAYOUT_HINT = "expected ROOT/train/<class>/<images> and ROOT/val/<class>/<images> (or test/)"
_MODE_SAMPLE_PER_CLASS = 2  # images per class whose header decides in_chans
_MODE_SAMPLE_MAX = 64


def _listing(names: Sequence[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def inspect_root(root: Path) -> tuple[tuple[str, ...], str, int]:
    """Check the layout below ``root``; return (class_names, val_split, in_chans).

    Cheap: lists the class folders and opens the headers of a few images per class; the
    full scan happens in :func:`scan_split`. Raises DataError on every layout problem.
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(_no_train_message(root))
    val_split = next((s for s in VAL_SPLITS if (root / s).is_dir()), None)
    if val_split is None:
        raise DataError(f"--data-path {root} has train/ but no val/ or test/ folder; add a "
                        f"validation split ({LAYOUT_HINT})")
    classes = {}
    for split in ("train", val_split):
        names = class_folders(root / split)
        if not names:
            raise DataError(f"{root / split} has no class folders; put each class's images "
                            f"in its own sub-folder ({LAYOUT_HINT})")
        classes[split] = names
    only_train = set(classes["train"]) - set(classes[val_split])
    only_val = set(classes[val_split]) - set(classes["train"])
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append(f"only in train/: {_listing(only_train)}")
        if only_val:
            parts.append(f"only in {val_split}/: {_listing(only_val)}")
        raise DataError(f"--data-path {root}: train/ and {val_split}/ have different class "
                        f"folders ({'; '.join(parts)}); both splits need the same classes")
    samples = []
    for split in ("train", val_split):
        walker = SplitWalker(root / split, classes["train"])
        for label, name in enumerate(classes["train"]):
            first = first_images(walker, label, _MODE_SAMPLE_PER_CLASS)
            if not first:
                raise no_images_error(root / split / name)
            samples.extend(first)
    in_chans = _detect_in_chans(samples)
    return tuple(classes["train"]), val_split, in_chans


def _no_train_message(root: Path) -> str:
    names = [entry.name for entry in sorted_entries(root) if not entry.name.startswith(".")]
    if not names:
        return (f"--data-path {root} is an empty folder; fill it ({LAYOUT_HINT}) or pass "
                f"'fashion-mnist'")
    hint = ""
    if root.name in ("train", *VAL_SPLITS):
        hint = f" (did you mean its parent {root.parent}?)"
    return (f"--data-path {root} has neither the four Fashion-MNIST IDX files nor a train/ "
            f"folder{hint}; found {_listing(names)}; {LAYOUT_HINT}")


def _detect_in_chans(paths: Sequence[str]) -> int:
    """1 if every sampled image is grayscale, else 3; reads headers only."""
    if len(paths) > _MODE_SAMPLE_MAX:  # spread the sample evenly over all classes
        step = len(paths) / _MODE_SAMPLE_MAX
        paths = [paths[int(i * step)] for i in range(_MODE_SAMPLE_MAX)]
    for path in paths:
        try:
            with Image.open(path) as img:
                mode = img.mode
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
            raise _read_error(path, exc) from exc
        if mode not in GRAYSCALE_MODES:
            return 3
    return 1


def _read_error(path: str, exc: BaseException) -> DataError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(f"cannot read image {path}: {reason}; remove or replace the file")


def load_image(path: str, in_chans: int) -> torch.Tensor:
    """Decode ``path`` to uint8 ``(in_chans, H, W)``; DataError naming the file if it
    cannot be decoded."""
    try:
        with Image.open(path) as img:
            array = _to_array(img, "L" if in_chans == 1 else "RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise _read_error(path, exc) from exc
    tensor = torch.from_numpy(array)
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)  # (1, H, W)
    return tensor.permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


# the value range of each mode deeper than 8 bits: (lowest, highest) -> 0..255
_HIGH_DEPTH_RANGES = {"I": (0.0, 65535.0), "F": (0.0, 1.0)}
_SIXTEEN_BIT_RANGE = (0.0, 65535.0)  # every "I;16..." mode


def _high_depth_range(mode: str) -> Optional[tuple[float, float]]:
    if mode.startswith("I;16"):
        return _SIXTEEN_BIT_RANGE
    return _HIGH_DEPTH_RANGES.get(mode)


def _to_array(img: Image.Image, mode: str) -> np.ndarray:
    """uint8 (H, W) for mode "L", (H, W, 3) for "RGB"; deep modes scaled by their range."""
    value_range = _high_depth_range(img.mode)
    if value_range is not None:  # Pillow's convert("L") would clip at 255 instead
        low, high = value_range
        gray = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=low)
        gray = np.clip(np.rint((gray - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
        return gray if mode == "L" else np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return np.array(img.convert(mode), dtype=np.uint8)


class ImageFolderDataset(Dataset):
    """One split of an ImageNet-style folder; items are ``(image, label)`` where image is
    uint8 ``(in_chans, H, W)`` or whatever ``transform`` returns."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], class_names: Sequence[str],
                 in_chans: int, transform: Optional[Callable] = None,
                 ignored_files: int = 0) -> None:
        self.root = root  # the split folder
        self.samples = samples
        self.class_names = tuple(class_names)
        self.in_chans = in_chans
        self.transform = transform
        self.ignored_files = ignored_files
        self.targets = torch.tensor([label for _, label in samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = load_image(path, self.in_chans)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def select(self, indices: Sequence[int]) -> "ImageFolderDataset":
        """A dataset of the items at ``indices``, in that order."""
        return ImageFolderDataset(self.root, [self.samples[i] for i in indices],
                                  self.class_names, self.in_chans, self.transform,
                                  self.ignored_files)


__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "inspect_root", "scan_split",
           "load_image"]
