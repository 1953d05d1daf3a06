"""The order in which a training run sees its images, on any number of processes.

:class:`ShardedEpochSampler` defines each epoch's order ONCE, globally, from
``(seed, epoch)``; rank ``r`` of ``W`` takes ``perm[r::W]``. With a per-rank batch of
``B / W``, step ``s`` of all ranks together covers exactly ``perm[s*B:(s+1)*B]`` — the
same images a single process with batch ``B`` sees at step ``s``. So a 2-process run
matches a 1-process run with the same global batch, and a resume may use any number of
ranks. ``set_start_step`` skips the batches an interrupted epoch already trained on.
It yields ``(epoch, index)`` keys, from which :class:`bvvit.data.loaders.SeededAugmentation`
seeds each image's augmentation: a sample looks the same on any rank and in any worker.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from bvvit.data.loaders import epoch_seed
from bvvit.distributed import DistInfo
from bvvit.errors import ConfigError


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    """Images per process and step for the global ``--batch-size`` (one-line error when
    the processes cannot share it equally)."""
    if global_batch % info.world_size:
        raise ConfigError(f"--batch-size {global_batch} (the global batch) is not divisible by the "
                          f"{info.world_size} processes; choose a multiple of {info.world_size}")
    return global_batch // info.world_size


class ShardedEpochSampler(Sampler[tuple[int, int]]):
    """Shuffled, rank-sharded ``(epoch, index)`` keys; whole global batches only (drop_last)."""

    def __init__(self, num_samples: int, global_batch: int, info: DistInfo, seed: int = 0):
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.info = info
        self.seed = seed
        self.epoch = 0
        self.start_step = 0
        self.local_batch = per_rank_batch(global_batch, info)
        self.steps_per_epoch = num_samples // global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_step = 0

    def set_start_step(self, step: int) -> None:
        """Skip the first ``step`` batches of the current epoch (mid-epoch resume)."""
        self.start_step = step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=generator)
        used = perm[: self.steps_per_epoch * self.global_batch]  # whole global batches
        mine = used[self.info.rank :: self.info.world_size]
        epoch = self.epoch
        return ((epoch, index) for index in mine[self.start_step * self.local_batch :].tolist())


__all__ = ["ShardedEpochSampler", "per_rank_batch"]
