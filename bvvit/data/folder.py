"""ImageNet-style folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/...``
(or ``root/test/<class>/...``).

Class names are the sorted sub-folder names of ``train/`` (label = position); ``val/``
(or ``test/``) must have the same set. Images may sit in nested folders below a class
folder. Files whose extension Pillow is not asked to read (see IMAGE_EXTENSIONS) and hidden
files are skipped and counted in ``ignored_files``.

An image that cannot be decoded raises ``DataError("cannot read image PATH: REASON;
remove or replace the file")`` when it is first read: we fail fast rather than skip it,
because silently training or evaluating on different data than the folder holds is worse
than stopping. Every image is converted to "L" (in_chans 1) or "RGB" (in_chans 3), so a
folder may mix modes and sizes; the transforms bring everything to one size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bvvit.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm")
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N",
                             "F"})
VAL_SPLITS = ("val", "test")  # first one present is the validation split
LAYOUT_HINT = "expected ROOT/train/<class>/<images> and ROOT/val/<class>/<images> (or test/)"
_MODE_SAMPLE_PER_CLASS = 2  # images per class whose header decides in_chans
_MODE_SAMPLE_MAX = 64


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _listing(names: Sequence[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``split_dir``."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def walk_files(class_dir: Path) -> Iterator[str]:
    """Every file below ``class_dir`` (following links), in sorted order, lazily."""
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _first_images(class_dir: Path, count: int) -> list[str]:
    found = []
    for path in walk_files(class_dir):
        if is_image_file(os.path.basename(path)):
            found.append(path)
            if len(found) == count:
                break
    return found


def _no_images_error(class_dir: Path) -> DataError:
    return DataError(f"class folder {class_dir} has no images (looked for "
                     f"{' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")


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
        for name in classes["train"]:
            first = _first_images(root / split / name, _MODE_SAMPLE_PER_CLASS)
            if not first:
                raise _no_images_error(root / split / name)
            samples.extend(first)
    in_chans = _detect_in_chans(samples)
    return tuple(classes["train"]), val_split, in_chans


def _no_train_message(root: Path) -> str:
    with os.scandir(root) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith("."))
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


def scan_split(split_dir: Path, class_names: Sequence[str]) -> tuple[list[tuple[str, int]], int]:
    """All ``(image_path, label)`` pairs below ``split_dir`` and the number of ignored
    (non-image or hidden) files."""
    found = class_folders(split_dir) if split_dir.is_dir() else []
    if found != list(class_names):
        raise DataError(f"{split_dir} no longer has the class folders it had when the data "
                        f"set was resolved ({len(found)} vs {len(class_names)}); restart")
    samples, ignored = [], 0
    for label, name in enumerate(class_names):
        count = 0
        for path in walk_files(split_dir / name):
            if is_image_file(os.path.basename(path)):
                samples.append((path, label))
                count += 1
            else:
                ignored += 1
        if count == 0:
            raise _no_images_error(split_dir / name)
    return samples, ignored


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


def _to_array(img: Image.Image, mode: str) -> np.ndarray:
    """uint8 (H, W) for mode "L", (H, W, 3) for "RGB"."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16/32-bit grayscale: Pillow's convert("L") clips at 255, so scale 16-bit range
        gray = np.asarray(img, dtype=np.float64)
        if gray.max(initial=0) > 255:
            gray = gray / 257.0
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
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
