"""Training augmentation is a pure function of (seed, epoch, index): reading order, the
process that reads, and what it read before change nothing."""

import pickle

import torch
from torch.utils.data import Dataset

from bvvit.config import Preprocessing
from bvvit.data import build_transform
from bvvit.data.loaders import SeededAugmentation, sample_seed

PRE = Preprocessing(mean=(0.5,), std=(0.5,), img_size=16, in_chans=1)


class Images(Dataset):
    def __init__(self, n=12):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index % 3


def test_item_depends_only_on_seed_epoch_and_index():
    dataset = SeededAugmentation(Images(), build_transform(PRE, train=True, augment="light"), seed=4)
    forward = [dataset[(1, i)][0] for i in range(12)]
    torch.manual_seed(123)  # the global RNG plays no part
    backward = [dataset[(1, i)][0] for i in reversed(range(12))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    clone = pickle.loads(pickle.dumps(dataset))  # as a worker process receives it
    assert all(torch.equal(clone[(1, i)][0], forward[i]) for i in range(12))
    other_epoch = [dataset[(2, i)][0] for i in range(12)]
    assert sum(not torch.equal(a, b) for a, b in zip(forward, other_epoch)) >= 6
    assert dataset[(1, 5)][1] == 2 and len(dataset) == 12


def test_sample_seeds_are_distinct_and_63_bit():
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in range(4) for i in range(500)}
    assert len(seeds) == 2 * 4 * 500
    assert all(0 <= seed < 2 ** 63 for seed in seeds)


def test_epoch_seed_uses_the_whole_seed():
    """Seeds 2**32 apart are different runs (the seed used to be masked to 32 bits), while
    seeds below 2**32 keep the orders they always had."""
    from bvvit.data.loaders import epoch_seed

    assert epoch_seed(1, 0) != epoch_seed(1 + 2 ** 32, 0)
    assert epoch_seed(7, 3) == 0x674CFA2EC63E493C  # the value the 32-bit masking gave
