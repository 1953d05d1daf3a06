"""Which data set a run uses (:class:`DataSource`), found from ``--data-path``, and the
datasets built from it.

``resolve_data`` only checks the layout (cheap); ``build_dataset`` reads the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from bvvit.config import Preprocessing
from bvvit.data import fashion_mnist, folder
from bvvit.data.folder_walk import unreadable_error
from bvvit.errors import DataError

FASHION_MNIST = "fashion-mnist"
FOLDER = "folder"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
SUBSET_SEED = 0


@dataclass(frozen=True)
class DataSource:
    """A resolved data set: what it is and where, never the images themselves."""

    kind: str  # FASHION_MNIST or FOLDER
    root: Path  # folder holding the IDX files, or the ImageNet-style root
    class_names: tuple[str, ...]
    in_chans: int  # 1 for Fashion-MNIST; folders: 1 if every sampled image is grayscale
    native_size: Optional[int]  # 28 for Fashion-MNIST; None for folders (sizes vary)
    val_split: str  # "test" for Fashion-MNIST (t10k); "val" or "test" for folders

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def default_preprocessing(self, img_size: int) -> Preprocessing:
        """The mean/std/resize a model trained on this data at ``img_size`` should use."""
        if self.kind == FASHION_MNIST:
            return Preprocessing(mean=FMNIST_MEAN, std=FMNIST_STD, img_size=img_size,
                                 in_chans=1, interpolation="bilinear", crop_pct=1.0)
        crop_pct = 1.0 if img_size <= 64 else 0.875  # small images: cropping loses too much
        if self.in_chans == 1:
            return Preprocessing(mean=(0.5,), std=(0.5,), img_size=img_size, in_chans=1,
                                 interpolation="bilinear", crop_pct=crop_pct)
        return Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, img_size=img_size,
                             in_chans=3, interpolation="bicubic", crop_pct=crop_pct)

    def describe(self) -> str:
        """One line for logs, e.g. "fashion-mnist (/usr/share/datasets/fashion-mnist, 10
        classes)"."""
        if self.kind == FASHION_MNIST:
            return f"{self.kind} ({self.root}, {self.num_classes} classes)"
        colour = "grayscale" if self.in_chans == 1 else "RGB"
        return (f"{self.kind} ({self.root}, {self.num_classes} classes, {colour}, "
                f"validation from {self.val_split}/)")


def _fashion_mnist_source(idx_dir: Path) -> DataSource:
    return DataSource(kind=FASHION_MNIST, root=idx_dir, class_names=fashion_mnist.CLASS_NAMES,
                      in_chans=1, native_size=fashion_mnist.NATIVE_SIZE, val_split="test")


def _search_fashion_mnist() -> DataSource:
    searched = []
    for candidate in fashion_mnist.search_dirs():
        idx_dir = fashion_mnist.find_idx_dir(candidate)
        if idx_dir is not None:
            return _fashion_mnist_source(idx_dir.resolve())
        searched.append(str(candidate))
    if not os.environ.get(fashion_mnist.ENV_VAR):
        searched.insert(0, f"${fashion_mnist.ENV_VAR} (unset)")
    raise DataError(f"Fashion-MNIST not found (searched {', '.join(searched)}); install it "
                    f"with `{fashion_mnist.APT_HINT}` or point --data-path at a folder with "
                    f"the four IDX files (train-images-idx3-ubyte.gz ...)")


def resolve_data(data_path: Optional[str] = FASHION_MNIST) -> DataSource:
    """Find the data set named by ``--data-path``.

    - "fashion-mnist" (any case) or None: search $BVVIT_FASHION_MNIST,
      /usr/share/datasets/fashion-mnist, ~/.cache/bvvit/fashion-mnist, ./data/fashion-mnist;
    - a folder with the four IDX files (.gz or not): Fashion-MNIST from there;
    - a folder with train/ and val/ (or test/), one sub-folder per class: an image folder.

    Raises DataError (one line: the path, what is wrong, what to do) otherwise.
    """
    if data_path is not None and not str(data_path).strip():
        raise DataError("--data-path is empty (an unset shell variable?); pass 'fashion-mnist' or "
                        "a folder with train/ and val/ class folders")
    if data_path is None or str(data_path).strip().lower() == FASHION_MNIST:
        return _search_fashion_mnist()
    root = Path(data_path).expanduser()
    if not root.exists():
        raise DataError(f"--data-path {root} does not exist; pass 'fashion-mnist' or a "
                        f"folder with train/ and val/ class folders")
    if not root.is_dir():
        hint = "a folder with the four Fashion-MNIST IDX files or with train/ and val/"
        if any(root.name.startswith(stem) for pair in fashion_mnist.IDX_STEMS.values()
               for stem in pair):
            hint = f"the folder that holds it ({root.parent.resolve()})"
        raise DataError(f"--data-path {root} is a file, not a folder; point it at {hint}")
    root = root.resolve()
    try:
        idx_dir = fashion_mnist.find_idx_dir(root)
    except PermissionError as exc:  # the root itself cannot be listed or entered
        raise unreadable_error(root, exc) from exc
    if idx_dir is not None:
        return _fashion_mnist_source(idx_dir)
    missing = fashion_mnist.missing_idx_files(root)
    if len(missing) < 4 and not (root / "train").is_dir():
        raise DataError(f"--data-path {root} has only some Fashion-MNIST IDX files (missing "
                        f"{', '.join(missing)}); add them (.gz or uncompressed)")
    class_names, val_split, in_chans = folder.inspect_root(root)
    return DataSource(kind=FOLDER, root=root, class_names=class_names, in_chans=in_chans,
                      native_size=None, val_split=val_split)


def build_dataset(source: DataSource, split: str, transform: Optional[Callable] = None,
                  subset: Optional[int] = None) -> Dataset:
    """The "train" or "val" split of ``source``; items are ``(image, label)``.

    Without ``transform`` images are uint8 ``(C, H, W)``. ``subset=N`` keeps N items
    chosen by a fixed permutation (seed 0), so classes are mixed and the subset of N is
    a prefix of the subset of N+1. The dataset has ``targets`` (int64 tensor),
    ``class_names`` and ``ignored_files``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if source.kind == FASHION_MNIST:
        images, targets = fashion_mnist.load_split(source.root,
                                                   "train" if split == "train" else "test")
        dataset = fashion_mnist.FashionMNIST(images, targets, transform)
    elif source.kind == FOLDER:
        split_dir = source.root / ("train" if split == "train" else source.val_split)
        # the train scan also walks the validation split, to warn if they share files
        compare_with = source.root / source.val_split if split == "train" else None
        samples, ignored = folder.scan_split(split_dir, source.class_names, compare_with)
        dataset = folder.ImageFolderDataset(split_dir, samples, source.class_names,
                                            source.in_chans, transform, ignored)
    else:
        raise ValueError(f"unknown data source kind {source.kind!r}")
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset must be positive, got {subset}")
        generator = torch.Generator().manual_seed(SUBSET_SEED)
        order = torch.randperm(len(dataset), generator=generator)[:subset]
        dataset = dataset.select(order.tolist())
    return dataset


__all__ = ["DataSource", "resolve_data", "build_dataset", "FASHION_MNIST"]
