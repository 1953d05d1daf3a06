"""Data-free calibration images (PSAQ-ViT-style): diverse patch tokens, classified as their
targets, deterministic, the model untouched."""

import torch

from bvvit.quant.datafree import SyntheticOptions, similarity_entropy, synthetic_calibration_batches


def test_similarity_entropy_is_higher_for_diverse_tokens():
    torch.manual_seed(0)
    same = torch.randn(2, 1, 8).expand(2, 20, 8) + 0.01 * torch.randn(2, 20, 8)
    diverse = torch.randn(2, 20, 8)
    assert similarity_entropy(diverse) > similarity_entropy(same) + 1.0


def test_synthetic_images_are_classified_as_their_targets(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = SyntheticOptions(steps=30, batch_size=10, seed=0, entropy_weight=0.0)  # random model: tiny logits
    batches = synthetic_calibration_batches(model, 20, options)
    images = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert images.shape == (20, 1, 16, 16) and torch.isfinite(images).all()
    assert targets.tolist() == [i % 5 for i in range(20)]
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == targets).float().mean()
    assert accuracy >= 0.8
    again = synthetic_calibration_batches(model, 20, options)
    assert torch.equal(torch.cat([b[0] for b in again]), images)  # deterministic for a seed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
