#!/usr/bin/env python3
"""Training throughput of BV-ViT's VisionTransformer against timm's, same hyperparameters,
same loop, interleaved in one process (so machine noise hits both equally).

    python benchmarks/train_throughput.py                      # the demo-sized model
    python benchmarks/train_throughput.py --embed-dim 192 --patch-size 7 --amp

Prints images/s of each (median over rounds) and the ratio ours / timm (>= 1.0: not slower).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bvvit.config import ModelConfig  # noqa: E402
from bvvit.model import VisionTransformer  # noqa: E402


def make_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="training steps per round and model")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(0)
    cfg = ModelConfig(img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
                      num_classes=10, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads)
    ours = VisionTransformer(cfg)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans, num_classes=10,
        embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads)
    reference.load_state_dict(ours.state_dict())  # identical starting weights
    images = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    steps = {"bvvit": make_step(ours, images, labels, args.amp),
             "timm": make_step(reference, images, labels, args.amp)}
    for step in steps.values():  # warm-up
        step(); step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
    med = {name: statistics.median(values) for name, values in rates.items()}
    print(f"model: ViT depth {args.depth}, dim {args.embed_dim}, heads {args.num_heads}, patch "
          f"{args.patch_size}, img {args.img_size}; batch {args.batch_size}; "
          f"{'bf16 autocast' if args.amp else 'float32'}; {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds x {args.steps} steps, interleaved")
    for name, value in med.items():
        print(f"  {name:<6} {value:8.1f} images/s (median; min {min(rates[name]):.1f}, max {max(rates[name]):.1f})")
    print(f"ratio bvvit/timm = {med['bvvit'] / med['timm']:.3f}")


if __name__ == "__main__":
    main()
