"""DataLoaders with a reproducible order, and the calibration subset for quantization.

Every loader owns a ``torch.Generator``: the shuffle order (and the workers' base seed)
come from it, never from the global RNG, so iterating a validation loader does not
change the training augmentations. ``set_epoch(loader, epoch)`` reseeds it from
``(seed, epoch)``: an epoch's order depends on nothing else, which is what exact resume
needs. Training augmentation (:class:`SeededAugmentation`) draws from a generator seeded
per sample from ``(seed, epoch, index)``, never from a worker's RNG: the images a run
trains on are the same for any number of workers, and after a mid-epoch resume.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bvvit.config import Preprocessing
from bvvit.data.source import DataSource, build_dataset
from bvvit.data.transforms import build_transform
from bvvit.errors import BVViTError, ConfigError, DataError


_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=64)
def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch)`` (seed + epoch would collide)."""
    # The whole seed (0..2**63-1) as entropy: seeds 2**32 apart must not share an order.
    # Below 2**32 this is the same entropy as before, so existing runs keep their orders.
    words = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return (int(words[0]) << 31) ^ int(words[1])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 of the epoch's
    seed and the index: a few integer operations, so it is cheap enough per image)."""
    z = (epoch_seed(seed, epoch) + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class SeededAugmentation(Dataset):
    """Training items whose random augmentation is a pure function of ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs (as :class:`bvvit.train.sampler.
    ShardedEpochSampler` yields them): ``dataset[(epoch, index)]`` reads the raw uint8
    image ``index`` of ``images`` and applies ``transform(image, generator)`` with a
    generator seeded by :func:`sample_seed`. Which process reads an item, and what it
    read before, cannot change the result.
    """

    def __init__(self, images: Dataset, transform: Callable, seed: int) -> None:
        self.images = images  # items (uint8 (C, H, W), label)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        image, label = self.images[index]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return self.transform(image, generator), label


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


__all__ = ["SeededLoader", "SeededAugmentation", "sample_seed", "build_loader", "set_epoch", "calibration_indices",
           "calibration_loader", "epoch_seed"]
