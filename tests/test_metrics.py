"""bvvit.metrics: one function per quantity (SQNR, KL, top-1, agreement), the one every stage uses."""

import math

import pytest
import torch
import torch.nn.functional as F

from bvvit.metrics import agreement, kl_divergence, sqnr_db, top1_accuracy
from bvvit.quant.primitives import PerTensor, QParams, choose_qparams, reduce_minmax


def _weight(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_sqnr_values():
    x = _weight(1, (100,))
    assert sqnr_db(x, x) == math.inf
    noise = 0.1 * x
    assert sqnr_db(x, x + noise) == pytest.approx(20.0)
    qp = QParams(*choose_qparams(*reduce_minmax(x, PerTensor()), 8, True), 8, True)
    assert sqnr_db(x, qp.fake_quantize(x)) > 30


def test_kl_divergence_of_logits():
    ref = _weight(2, (6, 10))
    assert kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-12)
    test = ref + _weight(3, (6, 10))
    expected = F.kl_div(F.log_softmax(test, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
    assert kl_divergence(ref, test) == pytest.approx(float(expected), rel=1e-5)
    assert kl_divergence(ref, test) > 0
    # a class with zero probability under ref contributes nothing
    ref_inf = torch.tensor([[0.0, float("-inf")]])
    assert kl_divergence(ref_inf, torch.tensor([[0.0, 3.0]])) == pytest.approx(math.log1p(math.exp(3.0)))


def test_top1_and_agreement_count_whole_images():
    reference = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 5.0, 1.0]])  # predicts 0, 2, 1
    test = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 2.0], [0.0, 5.0, 1.0]])  # predicts 0, 1, 1
    labels = torch.tensor([0, 1, 2])
    assert top1_accuracy(reference, labels) == 100.0 / 3  # exactly count / images, no float32 mean
    assert top1_accuracy(test, labels) == 200.0 / 3
    assert agreement(reference, test) == 200.0 / 3 == agreement(test, reference)
    assert agreement(reference, reference) == 100.0


def test_frechet_distance_of_gaussians():
    from bvvit.metrics import frechet_distance
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-9
    shifted = a + torch.tensor([2.0, 0.0, 0.0])
    assert abs(frechet_distance(a, shifted) - 4.0) < 1e-6  # only the means differ
    wide = torch.randn(4000, 3, generator=g) * 3.0  # (3 - 1)^2 per dimension
    assert abs(frechet_distance(a, wide) - 12.0) < 1.0
