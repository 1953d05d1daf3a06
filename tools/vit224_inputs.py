#!/usr/bin/env python
"""Inputs for a 224-px run of ``post_training.py`` without downloading anything: a timm
ViT state dict from timm's own constructor (random weights: accuracy is meaningless, the
run shows memory and time at the real scale) and a small ImageNet-style folder of 224x224
RGB images (Fashion-MNIST upscaled, ``train/`` and ``val/`` with one folder per class).

    .venv/bin/python tools/vit224_inputs.py --arch vit_small_patch16_224 \\
        --model output/vit-s16/vit_s16.pth --data output/vit-s16/fmnist224

``make vit-s16`` runs this, then ``post_training.py`` on the two. Existing outputs are kept
(delete them to rebuild). Needs timm (a test dependency: requirements-dev.txt) and the
Fashion-MNIST IDX files (``make data``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bvvit.console import configure_console  # noqa: E402
from bvvit.data.fashion_mnist import CLASS_NAMES, find_idx_dir, load_split, search_dirs  # noqa: E402

log = logging.getLogger("bvvit.tools.vit224_inputs")


def build_model_file(arch: str, path: Path, num_classes: int, seed: int) -> None:
    """timm's ``arch`` with ``num_classes`` outputs, random weights (seeded), as a state dict."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    params = sum(p.numel() for p in model.parameters())
    log.info(f"wrote {path}: timm {arch}, {params / 1e6:.1f}M parameters, RANDOM weights "
             "(accuracy is meaningless; the run measures memory and time)")


def build_folder(root: Path, per_class: dict[str, int], size: int) -> None:
    """``root/{train,val}/<class>/NNNN.png``: the first images of each Fashion-MNIST class,
    upscaled to ``size`` px (bicubic) in three channels that differ (so RGB statistics are
    not those of one grey channel repeated)."""
    folder = next((d for d in map(find_idx_dir, search_dirs()) if d is not None), None)
    if folder is None:
        raise SystemExit("Fashion-MNIST IDX files not found: run 'make data' or set BVVIT_FASHION_MNIST")
    for split, source_split in (("train", "train"), ("val", "test")):
        images, labels = load_split(folder, source_split)
        for label, name in enumerate(CLASS_NAMES):
            target = root / split / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            target.mkdir(parents=True, exist_ok=True)
            chosen = torch.nonzero(labels == label).flatten()[:per_class[split]].tolist()
            for k, index in enumerate(chosen):
                grey = Image.fromarray(images[index, 0].numpy()).resize((size, size), Image.BICUBIC)
                g = np.asarray(grey, dtype=np.float32)
                rgb = np.stack([g, g * 0.8, 255.0 - g], axis=-1).clip(0, 255).astype(np.uint8)
                Image.fromarray(rgb).save(target / f"{k:04d}.png")
    log.info(f"wrote {root}: {per_class['train']} training and {per_class['val']} validation images per class, "
             f"{len(CLASS_NAMES)} classes, {size}x{size} RGB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224",
                   help="a timm model name, e.g. vit_small_patch16_224, vit_base_patch16_224, deit_small_patch16_224")
    p.add_argument("--model", type=Path, required=True, help="state dict to write (.pth)")
    p.add_argument("--data", type=Path, required=True, help="image folder to write")
    p.add_argument("--train-per-class", type=int, default=30)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    configure_console()
    if args.model.exists():
        log.info(f"keeping {args.model} (delete it to rebuild)")
    else:
        build_model_file(args.arch, args.model, len(CLASS_NAMES), args.seed)
    if (args.data / "val").is_dir():
        log.info(f"keeping {args.data} (delete it to rebuild)")
    else:
        build_folder(args.data, {"train": args.train_per_class, "val": args.val_per_class}, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
