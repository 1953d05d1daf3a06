"""Calibration images from any folder (``--calib-path``): the images users have, not
necessarily the training split, e.g. another data set of the same domain, or unlabeled
pictures from the deployment.

Every image below the folder counts (a flat folder, class sub-folders, or a whole
``train/``/``val/`` tree), found by the same walker and rules as the data folders
(:mod:`bvvit.data.folder_walk`); labels are not used. Each image is decoded to the model's
channels (grayscale or RGB) and brought to its size by its evaluation transform, exactly as
the evaluation images are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bvvit.config import Preprocessing
from bvvit.data.folder import ImageFolderDataset
from bvvit.data.folder_walk import IMAGE_EXTENSIONS, SplitWalker
from bvvit.data.loaders import build_loader
from bvvit.data.transforms import build_transform
from bvvit.errors import DataError

CALIBRATION_LABEL = "calibration"  # the one (unused) label of folder calibration images


def folder_images(path: str | Path) -> list[str]:
    """Every image below ``path`` (recursively, sorted, links followed by the walker's rules);
    DataError when ``path`` is not a folder or holds no image."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"--calib-path {path}: not a folder; pass a folder of images "
                        "(flat, or with class sub-folders)")
    folder = folder.resolve()
    walker = SplitWalker(folder.parent, [folder.name])
    images = [image for image, _ in walker.images(0)]
    if not images:
        raise DataError(f"--calib-path {path} holds no images (looked for "
                        f"{' '.join(IMAGE_EXTENSIONS)} in it and its sub-folders); add images")
    return images


def folder_calibration_loader(path: str | Path, pre: Preprocessing, n: int, seed: int = 0,
                              batch_size: int = 64) -> tuple[DataLoader, int]:
    """(loader of up to ``n`` eval-transformed images from ``path``, chosen at random by
    ``seed`` when it holds more; how many images the folder holds). Batches are
    ``(images (B, C, S, S) float32, zeros (B,))``."""
    images = folder_images(path)
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(len(images), generator=generator)[:n].tolist())
    dataset = ImageFolderDataset(Path(path), [(images[i], 0) for i in chosen], (CALIBRATION_LABEL,),
                                 pre.in_chans, build_transform(pre, train=False))
    return build_loader(dataset, batch_size, shuffle=False, seed=seed), len(images)
