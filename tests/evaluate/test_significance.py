"""Paired accuracy comparison (McNemar exact) and the accuracy of batch-dependent models."""

import math

import numpy as np
import pytest
import torch

from bvvit.evaluate.significance import (accuracy_over_batch_orders, mcnemar_exact_p,
                                         paired_comparison, predict_in_order)


@pytest.mark.parametrize("only_a, only_b, expected", [
    (0, 0, 1.0),             # never disagree: no evidence
    (0, 5, 2 / 32),          # 5 of 5 one way: 2 * 0.5^5
    (1, 9, 2 * 11 / 1024),   # 2 * (C(10,0) + C(10,1)) / 2^10
    (5, 5, 1.0),
    (11, 14, 0.690),         # the 89.16 vs 89.19 case of docs/BENCHMARKS.md
])
def test_mcnemar_exact_by_hand(only_a, only_b, expected):
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, abs=5e-4)
    assert mcnemar_exact_p(only_b, only_a) == mcnemar_exact_p(only_a, only_b)


def test_mcnemar_exact_large_counts_match_the_normal_approximation():
    # 2,000 discordant images (2^2000 overflows a float: the exact division must still work)
    p = mcnemar_exact_p(950, 1050)
    z = (1050 - 950) / math.sqrt(2000)
    normal = math.erfc(abs(z) / math.sqrt(2))
    assert 0.0 < p < 1.0 and p == pytest.approx(normal, rel=0.1)
    assert mcnemar_exact_p(0, 2000) == pytest.approx(0.0, abs=1e-300)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact_p(-1, 3)


def test_paired_comparison_counts_the_discordant_images():
    a = [True, True, False, False, True, True]
    b = [True, False, True, False, False, True]
    result = paired_comparison(a, b)
    assert (result.num_images, result.only_a, result.only_b) == (6, 2, 1)
    assert result.diff_points == pytest.approx(100 / 6)
    assert result.p_value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same images"):
        paired_comparison(a, b[:3])


def _static(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[:, 0], -x[:, 0]], dim=1)


def _batch_dependent(x: torch.Tensor) -> torch.Tensor:
    """Predicts 1 for images below their batch's mean, as a per-batch range would."""
    centred = x[:, 0] - x[:, 0].mean()
    return torch.stack([centred, -centred], dim=1)


def test_predictions_come_back_in_image_order_whatever_the_feed_order():
    images = torch.arange(10, dtype=torch.float32).reshape(10, 1) - 4.5
    in_order = predict_in_order(_static, images, 3)
    shuffled = predict_in_order(_static, images, 3, np.random.default_rng(1).permutation(10))
    assert torch.equal(in_order, shuffled)
    assert in_order.tolist() == [1] * 5 + [0] * 5
    with pytest.raises(ValueError, match="permutation"):
        predict_in_order(_static, images, 3, np.zeros(10, dtype=int))


def test_accuracy_over_orders_is_constant_only_for_a_batch_independent_model():
    torch.manual_seed(0)
    images = torch.randn(256, 1)
    labels = (images[:, 0] < 0).long()
    static = accuracy_over_batch_orders(_static, images, labels, 16, orders=5)
    assert static == [100.0] * 5
    dependent = accuracy_over_batch_orders(_batch_dependent, images, labels, 16, orders=5)
    assert len(dependent) == 5 and len(set(dependent)) > 1 and max(dependent) < 100.0
    # the same seed gives the same orders
    assert dependent == accuracy_over_batch_orders(_batch_dependent, images, labels, 16, orders=5)
    with pytest.raises(ValueError, match="orders"):
        accuracy_over_batch_orders(_static, images, labels, 16, orders=0)
