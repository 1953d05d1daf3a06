"""Fashion-MNIST from its four IDX files, parsed with numpy and kept in memory.

The IDX format (as used by MNIST and Fashion-MNIST) is a big-endian header followed by raw
bytes: a 4-byte magic number ``0x00 0x00 <type> <ndim>`` (type ``0x08`` = unsigned byte),
then ``ndim`` uint32 dimensions, then ``prod(dims)`` values. Files may be gzip-compressed
(detected by content, not by name). A whole split is one uint8 tensor ``(N, 1, 28, 28)``
(60,000 train / 10,000 test images, about 47 MB for both) plus an int64 label tensor
``(N,)``; the last two parsed splits are cached per file (path, size, mtime), so building
the train split twice (training, then calibration) parses it once.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from bvvit.errors import DataError

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
NATIVE_SIZE = 28
ENV_VAR = "BVVIT_FASHION_MNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
APT_HINT = "sudo apt-get install dataset-fashion-mnist"

# split -> (images stem, labels stem); each file may also carry a ".gz" suffix
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def search_dirs() -> list[Path]:
    """Where ``resolve_data("fashion-mnist")`` looks, in order."""
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs += [SYSTEM_DIR, Path.home() / ".cache" / "bvvit" / "fashion-mnist",
             Path.cwd() / "data" / "fashion-mnist"]
    return dirs


def idx_file(folder: Path, stem: str) -> Optional[Path]:
    """The IDX file ``stem`` in ``folder`` (uncompressed preferred over ``.gz``), or None."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def missing_idx_files(folder: Path) -> list[str]:
    """Stems of the four IDX files that ``folder`` lacks (empty: it holds them all)."""
    stems = [stem for pair in IDX_STEMS.values() for stem in pair]
    return [stem for stem in stems if idx_file(folder, stem) is None]


def find_idx_dir(folder: Path) -> Optional[Path]:
    """``folder`` itself, or torchvision's ``FashionMNIST/raw`` below it, if it holds all
    four IDX files; else None."""
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        if candidate.is_dir() and not missing_idx_files(candidate):
            return candidate
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (raw or gzip) into a uint8 array of the header's shape.

    Raises DataError naming the file when it is unreadable, truncated, corrupt or of the
    wrong kind (``magic`` is IMAGES_MAGIC or LABELS_MAGIC).
    """
    fix = "replace the file (e.g. " + APT_HINT.replace("install", "install --reinstall") + ")"
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        reason = str(exc).replace("\n", " ") or type(exc).__name__
        raise DataError(f"cannot read {path}: {reason}; {fix}") from exc
    ndim = magic & 0xFF
    header_bytes = 4 * (1 + ndim)
    if len(data) < header_bytes:
        raise DataError(f"{path} is truncated ({len(data)} bytes, shorter than the IDX "
                        f"header); {fix}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic number "
                        f"0x{found:08x}, expected 0x{magic:08x}); {fix}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_bytes + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path} is truncated or corrupt ({len(data)} bytes, the header "
                        f"{'x'.join(map(str, dims))} needs {expected}); {fix}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims)


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 ``(N, 1, 28, 28)`` and labels int64 ``(N,)`` of ``split``
    ("train" or "test") from the IDX files in ``folder``."""
    paths = []
    for stem in IDX_STEMS[split]:
        path = idx_file(folder, stem)
        if path is None:
            raise DataError(f"{folder} has no {stem}[.gz]; point --data-path at a folder "
                            f"with the four Fashion-MNIST IDX files or run {APT_HINT}")
        stat = path.stat()
        paths.append((str(path), stat.st_size, stat.st_mtime_ns))
    return _load_split_cached(*paths)


@functools.lru_cache(maxsize=2)
def _load_split_cached(images_key: tuple, labels_key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # keys are (path, size, mtime_ns): a rewritten file is parsed again
    images_path, labels_path = Path(images_key[0]), Path(labels_key[0])
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
        raise DataError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, "
                        f"Fashion-MNIST images are {NATIVE_SIZE}x{NATIVE_SIZE}; point "
                        f"--data-path at the Fashion-MNIST IDX files")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has "
                        f"{len(labels)} labels; replace the mismatched file")
    if len(labels) and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"{labels_path} has label {int(labels.max())}, Fashion-MNIST labels "
                        f"are 0..{len(CLASS_NAMES) - 1}; replace the file")
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    label_tensor = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return image_tensor, label_tensor


class FashionMNIST(Dataset):
    """In-memory Fashion-MNIST split; items are ``(image, label)``.

    ``image`` is a uint8 ``(1, 28, 28)`` view into the split tensor (do not modify it in
    place) or whatever ``transform`` returns.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor,
                 transform: Optional[Callable] = None,
                 class_names: Sequence[str] = CLASS_NAMES) -> None:
        self.images = images  # (N, 1, 28, 28) uint8
        self.targets = targets  # (N,) int64
        self.class_names = tuple(class_names)
        self.transform = transform
        self.ignored_files = 0  # same attribute as folder datasets
        self._labels = targets.tolist()  # Python ints: indexing a tensor costs more

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self._labels[index]

    def select(self, indices: Sequence[int]) -> "FashionMNIST":
        """A dataset of the items at ``indices``, in that order (copies those images)."""
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return FashionMNIST(self.images[index], self.targets[index], self.transform,
                            self.class_names)


__all__ = ["CLASS_NAMES", "FashionMNIST", "load_split", "read_idx", "search_dirs",
           "find_idx_dir", "missing_idx_files"]
