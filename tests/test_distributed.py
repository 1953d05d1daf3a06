"""Sharded evaluation: ShardSampler's shards, padded and interleaved, give back every
dataset row exactly once and in order (the arithmetic behind gather_shards)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bvvit.distributed import DistInfo, ShardSampler, interleave_shards


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(1, 200), world=st.integers(1, 8))
def test_shards_interleave_back_to_dataset_order(num_samples, world):
    world = min(world, num_samples)
    per_rank = -(-num_samples // world)
    parts = []
    for rank in range(world):
        indices = list(ShardSampler(num_samples, DistInfo(world, rank), gather=True))
        assert len(indices) in (per_rank, per_rank - 1)
        padded = torch.full((per_rank, 2), -1, dtype=torch.long)  # padding must not survive
        padded[:len(indices)] = torch.tensor(indices).unsqueeze(1).expand(-1, 2)
        parts.append(padded)
    rows = interleave_shards(parts, num_samples)
    assert torch.equal(rows[:, 0], torch.arange(num_samples)) and torch.equal(rows[:, 1], rows[:, 0])
