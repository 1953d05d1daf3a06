"""The calibration set's distance reuses the FP32 evaluation's head features: the features
captured while evaluating are the ones a separate pass computes, and the distance is the same."""

import torch

from bvvit.model import VisionTransformer
from bvvit.ptq.calibration import capture_head_features, head_features


def _batches(images: torch.Tensor, size: int):
    return [(images[i:i + size], torch.zeros(len(images[i:i + size]), dtype=torch.long))
            for i in range(0, len(images), size)]


def test_captured_head_features_equal_a_separate_pass(tiny_config):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config).eval()
    images = torch.randn(10, tiny_config.in_chans, tiny_config.img_size, tiny_config.img_size)
    expected = head_features(model, _batches(images, 4))
    with torch.no_grad(), capture_head_features(model, limit=7) as rows:
        for batch, _ in _batches(images, 4):  # 4 + 3 (cut) + nothing from the last batch
            model(batch)
    captured = torch.cat(rows)
    assert captured.shape == (7, tiny_config.embed_dim)
    assert torch.allclose(captured, expected[:7], atol=1e-6)
    model(images[:2])  # the hook is gone after the block
    assert sum(len(r) for r in rows) == 7


def test_the_distance_pass_shows_a_progress_bar(tiny_config, capsys):
    """At 224 px this pass takes minutes: it has its own progress bar (stderr)."""
    model = VisionTransformer(tiny_config).eval()
    images = torch.randn(6, tiny_config.in_chans, tiny_config.img_size, tiny_config.img_size)
    head_features(model, _batches(images, 2), progress=True, desc="distance: training images")
    assert "distance: training images" in capsys.readouterr().err
    head_features(model, _batches(images, 2))
    assert capsys.readouterr().err == ""
