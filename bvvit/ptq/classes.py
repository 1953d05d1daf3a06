"""Which output of the model's head each class folder of the data is.

- the data's classes are the checkpoint's (same names, same order): identity, as today;
- they are some of the checkpoint's class names: each folder at its name's index;
- they are ImageNet synsets (``n01440764`` ...) and the head has 1,000 outputs: each folder
  at its synset's index in the sorted ImageNet-1k list (torchvision's ImageFolder order,
  the order of every ImageNet-1k checkpoint), whatever names the checkpoint uses;
- the checkpoint names no classes: the folders in sorted order are its outputs (the
  ImageFolder convention), so their count must be the head's.

A partial folder (some classes only) is evaluated against the FULL head: predictions are
the argmax over every output; per-class figures cover the classes present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch.utils.data import Dataset

from bvvit.data.imagenet import NUM_CLASSES, imagenet1k_wnids, is_wnid
from bvvit.errors import DataError


@dataclass(frozen=True)
class ClassMap:
    """Folder class i is head output ``head_indices[i]``; ``head_names`` name every output."""

    head_indices: tuple[int, ...]
    head_names: tuple[str, ...]
    how: str  # "same" | "names" | "synsets" | "order"

    @property
    def is_identity(self) -> bool:
        return self.head_indices == tuple(range(len(self.head_names)))

    def describe(self) -> Optional[str]:
        """One console line when the folder is not simply the head's classes (else None)."""
        if self.is_identity:
            return None
        how = {"names": "by the checkpoint's class names",
               "synsets": "by ImageNet-1k synset (sorted wnid order)"}.get(self.how, self.how)
        return (f"classes: the data has {len(self.head_indices)} of the head's "
                f"{len(self.head_names)} classes, mapped {how}; evaluated against the full head "
                "(argmax over all outputs), per-class figures for the classes present")


def map_classes(data_classes: Sequence[str], head_names: Sequence[str], num_outputs: int,
                data_desc: str, model_desc: str) -> ClassMap:
    """How ``data_classes`` (sorted folder names) index a head of ``num_outputs`` whose
    classes are ``head_names`` ([] when the checkpoint names none). DataError (one line)
    when no rule applies."""
    data = list(data_classes)
    names = list(head_names)
    if names and data == names:
        return ClassMap(tuple(range(len(names))), tuple(names), "same")
    if names and set(data) <= set(names):
        return ClassMap(tuple(names.index(c) for c in data), tuple(names), "names")
    if num_outputs == NUM_CLASSES and data and all(is_wnid(c) for c in data):
        wnids = imagenet1k_wnids()
        unknown = [c for c in data if c not in wnids]
        if unknown:
            raise DataError(f"{data_desc} has folders {_short(unknown)} that are not ImageNet-1k "
                            f"synsets, so they name none of {model_desc}'s 1000 outputs")
        return ClassMap(tuple(wnids.index(c) for c in data), tuple(names) or wnids, "synsets")
    if not names and len(data) == num_outputs:
        return ClassMap(tuple(range(num_outputs)), tuple(data), "order")
    if not names:
        raise DataError(f"{data_desc} has {len(data)} classes but the head of {model_desc} has "
                        f"{num_outputs} and the checkpoint names none; pass a folder with one "
                        "sub-folder per output (sorted), or ImageNet synset folders for a 1000-class head")
    raise DataError(f"{data_desc} has classes {_short(data)} that match neither {model_desc}'s "
                    f"class names {_short(names)} nor ImageNet synsets; pass the --data-path it "
                    "was trained on")


class HeadLabels(Dataset):
    """``dataset`` with each label ``y`` (a data class) replaced by ``head_indices[y]`` (the
    head output it is), so that a partial data set is scored against the full head."""

    def __init__(self, dataset: Dataset, head_indices: Sequence[int]):
        self.dataset, self.head_indices = dataset, tuple(head_indices)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, label, *rest = self.dataset[index]
        return (image, self.head_indices[int(label)], *rest)

    def select(self, indices: Sequence[int]) -> "HeadLabels":
        """These images only (as the data sets' ``select``), labels still head outputs."""
        return HeadLabels(self.dataset.select(indices), self.head_indices)  # type: ignore[attr-defined]


def _short(names: Sequence[str]) -> str:
    return "[" + ", ".join(list(names)[:4]) + (", ..." if len(names) > 4 else "") + f"] ({len(names)})"


__all__ = ["ClassMap", "HeadLabels", "map_classes"]
