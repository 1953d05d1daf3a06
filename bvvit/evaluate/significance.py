"""Is an accuracy difference real? Paired comparison of two classifiers on the same images.

Two models evaluated on the same test set differ only on the images one gets right and
the other wrong (the discordant pairs); McNemar's exact test asks whether those split
unevenly by more than chance. At 8 bits every quantizer lands within a few images of
FP32, so "89.16 vs 89.19" needs this before it means anything.

Also the accuracy of a batch-dependent model: a quantizer with DYNAMIC per-tensor
activation ranges (ONNX Runtime's ``quantize_dynamic``, ``torch.ao`` ``quantize_dynamic``)
scales each batch by that batch's own range, so one image's prediction depends on the
images it is batched with, and the test-set accuracy on the batch order.
:func:`accuracy_over_batch_orders` measures that spread; a static model gives one number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class PairedComparison:
    """``a`` against ``b`` on the same images: ``only_a`` images only ``a`` gets right,
    ``only_b`` only ``b``; ``diff_points`` = top-1 of a - top-1 of b (percent points);
    ``p_value``: two-sided McNemar exact test (1.0 when they never disagree)."""

    num_images: int
    only_a: int
    only_b: int
    diff_points: float
    p_value: float


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven) under Binomial(n, 1/2)
    of the ``n = only_a + only_b`` discordant images."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be non-negative, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact: Python divides big integers correctly rounded


def paired_comparison(a_correct: Sequence[bool] | np.ndarray | torch.Tensor,
                      b_correct: Sequence[bool] | np.ndarray | torch.Tensor) -> PairedComparison:
    """Compare two per-image correctness vectors over the same images in the same order."""
    a = np.asarray(a_correct, dtype=bool).reshape(-1)
    b = np.asarray(b_correct, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} and {b.size} images: compare the same images")
    if a.size == 0:
        raise ValueError("no images to compare")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return PairedComparison(int(a.size), only_a, only_b, 100.0 * (only_a - only_b) / a.size,
                            mcnemar_exact_p(only_a, only_b))


def predict_in_order(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     batch_size: int, order: np.ndarray | None = None) -> torch.Tensor:
    """Top-1 predictions of ``fn`` for ``images`` (N, ...), fed in batches of ``batch_size``
    taken along ``order`` (a permutation of N; default 0..N-1), returned in image order."""
    n = images.shape[0]
    order = np.arange(n) if order is None else np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError("order must be a permutation of the image indices")
    predictions = torch.empty(n, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            index = torch.as_tensor(order[start:start + batch_size])
            predictions[index] = torch.as_tensor(fn(images[index].contiguous())).argmax(1)
    return predictions


def accuracy_over_batch_orders(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                               labels: torch.Tensor, batch_size: int, orders: int,
                               seed: int = 0) -> list[float]:
    """Top-1 (percent) with the images in their own order, then in ``orders - 1`` random
    orders (seeded): the spread is how much the accuracy depends on which images share a
    batch. A batch-independent model returns the same number ``orders`` times."""
    if orders < 1:
        raise ValueError(f"orders must be >= 1, got {orders}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(orders):
        order = None if i == 0 else rng.permutation(images.shape[0])
        predictions = predict_in_order(fn, images, batch_size, order)
        out.append(100.0 * float((predictions == labels).double().mean()))
    return out


__all__ = ["PairedComparison", "mcnemar_exact_p", "paired_comparison", "predict_in_order",
           "accuracy_over_batch_orders"]
