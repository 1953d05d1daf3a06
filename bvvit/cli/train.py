"""``run.py`` / ``bvvit-train``: parse flags, build the configs, call :func:`bvvit.train.runner.fit`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional, Sequence

from bvvit.cli.common import OneLineParser, positive_int, run_cli
from bvvit.config import TrainConfig

if TYPE_CHECKING:
    from bvvit.train.runner import TrainHooks


def build_parser() -> OneLineParser:
    from bvvit.formats import MODEL_FORMATS

    d = TrainConfig()
    p = OneLineParser(prog="run.py", description="Train a Vision Transformer (ViT) classifier.")
    g = p.add_argument_group("data and output")
    g.add_argument("--data-path", default=d.data_path,
                   help="'fashion-mnist' (default; Debian package dataset-fashion-mnist), a folder "
                        "with the Fashion-MNIST IDX files, or an ImageNet-style folder with "
                        "train/ and val/ (or test/), one sub-folder per class")
    g.add_argument("--output-dir", default=d.output_dir, help="where checkpoints, logs and plots go")
    g.add_argument("--train-subset", type=positive_int, default=None,
                   help="use only N training images (quick experiments)")
    g.add_argument("--val-subset", type=positive_int, default=None, help="use only N validation images")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    g.add_argument("--augment", choices=["none", "flip", "light", "strong"], default=d.augment,
                   help="train augmentation: flip = horizontal flip only, light = crop with "
                        "padding + flip (default), strong = random-resized-crop + flip")
    g = p.add_argument_group("model")
    g.add_argument("--img-size", type=positive_int, default=None,
                   help="input size (default: the data's native size, 28 for Fashion-MNIST; 224 for folders)")
    g.add_argument("--patch-size", type=positive_int, default=7)
    g.add_argument("--embed-dim", type=positive_int, default=192)
    g.add_argument("--depth", type=positive_int, default=6)
    g.add_argument("--num-heads", type=positive_int, default=3)
    g.add_argument("--mlp-ratio", type=float, default=4.0)
    g.add_argument("--num-classes", type=positive_int, default=None,
                   help="checked against the data (classes come from the data)")
    g.add_argument("--no-qkv-bias", action="store_true")
    g.add_argument("--drop-rate", type=float, default=0.0)
    g.add_argument("--attn-drop-rate", type=float, default=0.0)
    g.add_argument("--drop-path-rate", type=float, default=0.0)
    g.add_argument("--pretrained-path", default=None, metavar="FILE|FOLDER",
                   help="start from a local BV-ViT, timm, Hugging Face or torchvision ViT checkpoint "
                        "(file or folder): its tokens, pooling, norms and activation are kept, the "
                        "dimensions must match the flags, pos_embed is resized, a head for other "
                        "classes is replaced")
    g.add_argument("--pretrained-format", choices=MODEL_FORMATS, default="auto",
                   help="read --pretrained-path as this format instead of detecting it (default auto)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=d.epochs)
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm; 0 disables")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bfloat16 autocast (CPU with AVX512-BF16/AMX, recent GPUs), "
                        "else float16 with a gradient scaler")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (falls back to eager with a warning if it fails)")
    g = p.add_argument_group("run control")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' = OUTPUT/checkpoints/last.pth (or its backup)")
    g.add_argument("--overwrite", action="store_true",
                   help="the output folder holds another run: move it aside whole (to "
                        "OUTPUT.previous-DATE-TIME) and start a new run")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT/tensorboard")
    return p


def main(argv: Optional[Sequence[str]] = None, hooks: Optional["TrainHooks"] = None) -> int:
    """run.py: train with the flags in ``argv``; ``hooks`` reach the training loop (tests)."""
    args = build_parser().parse_args(argv)
    # Heavy imports after parsing so that --help is instant.
    from bvvit.data import resolve_data
    from bvvit.distributed import shutdown_distributed
    from bvvit.train.runner import TrainingInterrupted, fit, model_config_for_data

    cfg = TrainConfig(
        data_path=args.data_path, output_dir=args.output_dir, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad, seed=args.seed, workers=args.workers, device=args.device,
        amp=args.amp, compile=args.compile, resume=args.resume, pretrained_path=args.pretrained_path,
        pretrained_format=args.pretrained_format,
        progress=not args.no_progress, tensorboard=args.tensorboard,
        train_subset=args.train_subset, val_subset=args.val_subset, augment=args.augment)
    source = resolve_data(cfg.data_path)
    model_cfg = model_config_for_data(
        source, args.img_size, args.num_classes, patch_size=args.patch_size,
        embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
        mlp_ratio=args.mlp_ratio, qkv_bias=not args.no_qkv_bias, drop_rate=args.drop_rate,
        attn_drop_rate=args.attn_drop_rate, drop_path_rate=args.drop_path_rate)
    try:
        fit(model_cfg, cfg, source, argv=list(sys.argv if argv is None else argv),
            overwrite=args.overwrite, hooks=hooks)
    except TrainingInterrupted as stopped:
        return stopped.exit_code
    finally:
        shutdown_distributed()
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main, prog="run.py"))


if __name__ == "__main__":
    entry_point()
