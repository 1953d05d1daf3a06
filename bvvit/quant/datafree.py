"""Data-free calibration images (``--calib-data synthetic``): inputs made from the model
itself, in the spirit of PSAQ-ViT (Li et al., ECCV 2022), for users with no images at all.

Each image starts as Gaussian noise in the model's normalised input space and is optimised
with Adam so that

* the float model classifies it as its target class (cross-entropy; targets cycle over the
  classes, so every class is represented),
* the patch tokens of a middle block are diverse: PSAQ-ViT's patch-similarity entropy (the
  entropy of the distribution of pairwise cosine similarities between the tokens, estimated
  with a Gaussian kernel on a grid; maximised), and
* the image is smooth (total variation, a small weight).

Measured on the demo model (BENCHMARKS): W4A4 calibrated on 256 such images comes much closer
to calibration on real training images than Gaussian noise or out-of-domain photographs.
Cost: ``steps`` forward+backward passes of the whole model per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SyntheticOptions:
    steps: int = 100  # Adam steps per batch
    batch_size: int = 64
    lr: float = 0.1
    entropy_weight: float = 1.0  # patch-similarity entropy (maximised)
    tv_weight: float = 0.05  # total variation (smoothness)
    seed: int = 0


def similarity_entropy(tokens: Tensor, bins: int = 64, bandwidth: float = 0.05,
                       max_pairs: int = 4096, generator: torch.Generator | None = None) -> Tensor:
    """Mean over images of the entropy of the pairwise cosine similarities of (B, N, D) tokens."""
    unit = F.normalize(tokens, dim=-1)
    n = unit.shape[1]
    rows, cols = torch.triu_indices(n, n, 1, device=tokens.device)
    if rows.numel() > max_pairs:  # 197 tokens have 19,306 pairs: a fixed random subset is enough
        keep = torch.randperm(rows.numel(), generator=generator)[:max_pairs].to(tokens.device)
        rows, cols = rows[keep], cols[keep]
    similarity = (unit[:, rows] * unit[:, cols]).sum(-1)  # (B, P)
    grid = torch.linspace(-1.0, 1.0, bins, device=tokens.device)
    density = torch.exp(-(similarity.unsqueeze(-1) - grid).pow(2) / (2 * bandwidth ** 2)).mean(1)
    p = density / density.sum(-1, keepdim=True)
    return -(p * torch.log(p + 1e-12)).sum(-1).mean()


def _total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@torch.inference_mode(False)
@torch.enable_grad()
def synthetic_batch(model: nn.Module, targets: Tensor, image_shape: tuple[int, int, int],
                    options: SyntheticOptions, generator: torch.Generator) -> Tensor:
    """(len(targets), C, H, W) images optimised for ``targets`` (the model is not changed)."""
    x = torch.randn((len(targets), *image_shape), generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=options.lr)
    tokens: dict[str, Tensor] = {}
    middle = model.blocks[len(model.blocks) // 2]
    handle = middle.register_forward_hook(lambda module, inputs, output: tokens.__setitem__("t", output))
    try:
        for _ in range(options.steps):
            loss = F.cross_entropy(model(x), targets) + options.tv_weight * _total_variation(x)
            if options.entropy_weight:
                patches = tokens["t"][:, model.num_prefix_tokens:]
                loss = loss - options.entropy_weight * similarity_entropy(patches, generator=generator)
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad
            optimizer.step()
    finally:
        handle.remove()
    return x.detach()


def synthetic_calibration_batches(model: nn.Module, n: int, options: SyntheticOptions = SyntheticOptions()
                                  ) -> list[tuple[Tensor, Tensor]]:
    """``n`` synthetic images as loader-like batches ``(images, targets)``; deterministic for
    a seed (on one thread count)."""
    config = model.config
    shape = (config.in_chans, config.img_size, config.img_size)
    generator = torch.Generator().manual_seed(options.seed)
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        batches = []
        for start in range(0, n, options.batch_size):
            targets = torch.arange(start, min(n, start + options.batch_size)) % config.num_classes
            batches.append((synthetic_batch(model, targets, shape, options, generator), targets))
        return batches
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
