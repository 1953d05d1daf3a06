"""torchrun helpers shared by training and post-training: the process group, collective
sums and broadcasts, and sharded evaluation (:class:`ShardSampler`, :func:`gather_shards`).

``torchrun --nproc_per_node N run.py ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we then use
NCCL on CUDA and gloo on the CPU. Nothing here is home-made scale-out: DDP averages the
gradients, we only shard the data and reduce the metrics. Imports no stage of the package
(training's epoch sampler is :mod:`bvvit.train.sampler`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(world, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sums(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum each value across ranks (float64, so counts stay exact)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes indices r, r+W, ... — every image exactly once, no padding.

    ``gather=True`` asks :func:`bvvit.evaluate.classification.collect_logits` to gather
    every rank's logits back into the full, ordered set (see :func:`gather_shards`);
    training's validation leaves it False and all-reduces its sums instead.
    """

    def __init__(self, num_samples: int, info: DistInfo, gather: bool = False):
        self.num_samples, self.info, self.gather = num_samples, info, gather
        self.indices = list(range(info.rank, num_samples, info.world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def gather_shards(shard: torch.Tensor, info: DistInfo, num_samples: int) -> torch.Tensor:
    """The inverse of :class:`ShardSampler`: from each rank's rows (rank r holds dataset rows
    r, r+W, r+2W, ...) rebuild all ``num_samples`` rows in dataset order, on every rank.

    Shards differ in length by at most one; they are padded to the same length for
    ``all_gather`` and the padding (rows past ``num_samples``) is dropped: nothing is
    duplicated, nothing lost. Returns a CPU tensor.
    """
    if not info.enabled:
        return shard
    world = info.world_size
    per_rank = -(-num_samples // world)
    expected = len(range(info.rank, num_samples, world))
    if shard.shape[0] != expected:
        raise ValueError(f"rank {info.rank} holds {shard.shape[0]} rows, its shard of "
                         f"{num_samples} has {expected}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    padded = torch.zeros((per_rank, *shard.shape[1:]), dtype=shard.dtype, device=device)
    padded[:expected] = shard.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return interleave_shards(parts, num_samples).cpu()


def interleave_shards(parts: list[torch.Tensor], num_samples: int) -> torch.Tensor:
    """Equal-length shards (rank r's row j = dataset row j * W + r, padded at the end)
    back to the first ``num_samples`` dataset rows in order."""
    stacked = torch.stack(parts, dim=1)  # (per_rank, W, ...): row-major order is dataset order
    return stacked.reshape(-1, *parts[0].shape[1:])[:num_samples]


def broadcast_from_main(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank (a picklable Python object made by this program)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "barrier", "all_reduce_sums",
           "broadcast_from_main", "ShardSampler", "gather_shards", "interleave_shards"]
