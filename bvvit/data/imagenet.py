"""The ImageNet-1k class list: the 1,000 WordNet ids (``n01440764`` ...) in sorted order,
which is the order of every ImageNet-1k classifier head (torchvision's ImageFolder sorts the
synset folders; timm, torchvision and Hugging Face checkpoints use that order)."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

NUM_CLASSES = 1000
_WNID = re.compile(r"n\d{8}")


@lru_cache(maxsize=1)
def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids, sorted (index = class index of a 1000-class head)."""
    text = resources.files("bvvit.data").joinpath("imagenet1k_wnids.txt").read_text(encoding="ascii")
    wnids = tuple(text.split())
    if len(wnids) != NUM_CLASSES or list(wnids) != sorted(set(wnids)):
        raise RuntimeError("bvvit/data/imagenet1k_wnids.txt is damaged: reinstall bvvit")
    return wnids


def is_wnid(name: str) -> bool:
    """Whether ``name`` looks like a WordNet id (``n`` and eight digits)."""
    return bool(_WNID.fullmatch(name))


__all__ = ["NUM_CLASSES", "imagenet1k_wnids", "is_wnid"]
