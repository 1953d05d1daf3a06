"""Quality measures of a quantized tensor or model output against a float reference: one
function per quantity, used by every stage that reports it (the evaluation, the ONNX
Runtime measurement, per-layer sensitivity and analysis, the tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2).

    ``inf`` when the tensors are identical; computed in float64.
    """
    reference = torch.as_tensor(reference).double()
    noise_power = float(((reference - torch.as_tensor(test).double()) ** 2).sum())
    signal_power = float((reference ** 2).sum())
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of rows of ``logits`` (N, C) whose largest entry is at ``labels`` (N,)."""
    predictions = torch.as_tensor(logits).argmax(dim=-1)
    correct = int((predictions == torch.as_tensor(labels).reshape(-1).to(predictions.device)).sum())
    return 100.0 * correct / predictions.shape[0]


def agreement(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Percent of rows whose top-1 class is the same in ``test_logits`` as in
    ``reference_logits`` (both (N, C), rows in the same image order)."""
    reference = torch.as_tensor(reference_logits).argmax(dim=-1)
    test = torch.as_tensor(test_logits).argmax(dim=-1).to(reference.device)
    return 100.0 * int((reference == test).sum()) / reference.shape[0]


def kl_divergence(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(test)), in nats."""
    reference_log_probs = F.log_softmax(torch.as_tensor(reference_logits).double(), dim=-1)
    test_log_probs = F.log_softmax(torch.as_tensor(test_logits).double(), dim=-1)
    probs = reference_log_probs.exp()
    # classes with zero reference probability (logit -inf) contribute nothing
    terms = torch.where(probs > 0, probs * (reference_log_probs - test_log_probs), torch.zeros_like(probs))
    per_row = terms.sum(dim=-1)
    # KL >= 0; clamp the last-bit rounding of nearly identical rows.
    return max(0.0, float(per_row.mean()))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (the FID formula),
    computed in float64."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


__all__ = ["sqnr_db", "kl_divergence", "top1_accuracy", "agreement", "frechet_distance"]
