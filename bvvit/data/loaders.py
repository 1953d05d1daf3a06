"""DataLoaders with a reproducible order, and the calibration subset for quantization.

Every loader owns a ``torch.Generator``: the shuffle order (and the workers' base seed)
come from it, never from the global RNG, so iterating a validation loader does not
change the training augmentations. ``set_epoch(loader, epoch)`` reseeds it from
``(seed, epoch)``: an epoch's order depends on nothing else, which is what exact resume
needs. Augmentation randomness comes from the global RNG in the main process
(workers=0) or from each worker's own RNG (workers>0, seeded from the base seed).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bvvit.config import Preprocessing
from bvvit.data.source import DataSource, build_dataset
from bvvit.data.transforms import build_transform
from bvvit.errors import BVViTError, ConfigError, DataError


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch)`` (seed + epoch would collide)."""
    words = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF]).generate_state(2)
    return (int(words[0]) << 31) ^ int(words[1])


class SeededLoader(DataLoader):
    """A DataLoader whose generator is reseeded per epoch by :func:`set_epoch`, and whose
    user errors raised in worker processes stay one-line :class:`BVViTError`."""

    def __init__(self, dataset: Dataset, *, seed: int = 0, **kwargs) -> None:
        self.seed = seed
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(seed, 0))
        super().__init__(dataset, generator=generator, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        if hasattr(self.sampler, "set_epoch"):  # DistributedSampler
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except BVViTError as exc:
                one_line = _worker_error_one_line(exc)
                if one_line is None:
                    raise
                raise one_line from exc
            yield batch


def _worker_error_one_line(exc: BVViTError) -> BVViTError | None:
    """DataLoader re-raises a worker's exception as ``type(exc)("Caught X in DataLoader
    worker...\\nOriginal Traceback ...")``; recover the original one-line message."""
    message = str(exc)
    if "\n" not in message:
        return None
    cls = type(exc)
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    start = message.rfind(marker)
    if start < 0:
        return None
    original = message[start + len(marker):].split("\n", 1)[0].strip()
    try:
        return cls(original)
    except Exception:  # noqa: BLE001 - a subclass with another signature: keep the original
        return None


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0,
                 seed: int = 0, drop_last: bool = False, sampler=None) -> SeededLoader:
    """A loader over ``dataset``; call ``set_epoch(loader, epoch)`` before each epoch.

    ``sampler`` (e.g. a rank-sharded sampler for distributed training) replaces
    ``shuffle``; its ``set_epoch`` is called by :func:`set_epoch`. Worker processes
    persist across epochs when ``workers > 0``; memory is pinned only when CUDA is available.
    """
    return SeededLoader(dataset, seed=seed, batch_size=batch_size,
                        shuffle=shuffle if sampler is None else None, sampler=sampler,
                        num_workers=workers, drop_last=drop_last,
                        persistent_workers=workers > 0,
                        pin_memory=torch.cuda.is_available())


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make ``loader``'s next pass use the order of ``epoch``, whatever came before."""
    if isinstance(loader, SeededLoader):
        loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    else:
        raise TypeError("set_epoch needs a loader from build_loader")


def calibration_indices(num_train: int, n: int, seed: int) -> list[int]:
    """``n`` distinct training-split indices, sorted, fixed by ``seed``.

    The same seed gives nested sets: the first 128 chosen are among the first 256.
    """
    if n < 1:
        raise ConfigError(f"--calib-size must be positive, got {n}")
    if n > num_train:
        raise DataError(f"--calib-size {n} is larger than the training split ({num_train} "
                        f"images); choose at most {num_train}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_train, generator=generator)[:n].tolist())


def calibration_loader(source: DataSource, pre: Preprocessing, n: int = 256, seed: int = 0,
                       batch_size: int = 64) -> tuple[DataLoader, list[int]]:
    """Eval-transformed images from a fixed subset of the training split, in index order.

    Returns the loader (batches of ``(images (B, C, S, S) float32, labels (B,))``) and
    the training indices it covers.
    """
    dataset = build_dataset(source, "train", transform=build_transform(pre, train=False))
    indices = calibration_indices(len(dataset), n, seed)
    loader = build_loader(dataset.select(indices), batch_size, shuffle=False, seed=seed)
    return loader, indices


__all__ = ["SeededLoader", "build_loader", "set_epoch", "calibration_indices",
           "calibration_loader", "epoch_seed"]
