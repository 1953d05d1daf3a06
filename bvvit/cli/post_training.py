"""``post_training.py`` / ``bvvit-ptq``: quantize a trained model at several bit depths."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from bvvit.cli.common import OneLineParser, positive_int, run_cli
from bvvit.errors import ConfigError

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised where the main thread is, so every open atomic
    write removes its temporary file on the way out. Exit code 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the block (SIGTERM would otherwise
    end the process on the spot, leaving temporary files and no message)."""
    def handle(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def unique_pairs(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``pairs`` without repeats, first occurrences in order; a note when some repeat."""
    unique = list(dict.fromkeys(pairs))
    if len(unique) < len(pairs):
        log.info(f"note: repeated bit depths run once: {' '.join(f'w{w}a{a}' for w, a in unique)}")
    return unique


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (``--time-budget``)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def bits_value(text: str) -> int:
    import argparse

    from bvvit.quant.config import check_bits

    try:
        return check_bits(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit-width, got {text!r}") from None
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> OneLineParser:
    from bvvit.quant.config import DEFAULT_BITS, DEFAULT_CALIB_SIZE
    from bvvit.quant.recipes import DEFAULT_RECIPE, RECIPES
    from bvvit.config import OVERRIDABLE_PREPROCESSING
    from bvvit.formats import MODEL_FORMATS

    p = OneLineParser(prog="post_training.py",
                      description="Post-training quantization of a trained ViT at several bit "
                                  "depths (weights AND activations), evaluated against the original.")
    p.add_argument("--model-path", required=True, metavar="FILE|FOLDER",
                   help="vit_model.pth written by run.py, or a timm / Hugging Face / torchvision "
                        "ViT checkpoint (file or folder; the format is detected)")
    p.add_argument("--model-format", choices=MODEL_FORMATS, default="auto",
                   help="read --model-path as this format instead of detecting it (default auto)")
    p.add_argument("--preprocessing", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change the evaluation transform the checkpoint brings: "
                        f"{', '.join(OVERRIDABLE_PREPROCESSING)} (e.g. mean=0.5,0.5,0.5 "
                        "std=0.5,0.5,0.5 crop_pct=0.9 interpolation=bicubic crop_mode=squash)")
    p.add_argument("--data-path", default=None,
                   help="data set (default: the one the model was trained on)")
    p.add_argument("--output-dir", default=None,
                   help="where results go (default: MODEL_DIR/quantization); a rerun of the same "
                        "model continues there, reusing finished bit depths")
    p.add_argument("--overwrite", action="store_true",
                   help="the output folder holds earlier results: move them aside whole (to "
                        "OUTPUT.previous-DATE-TIME) and start afresh")
    p.add_argument("--bits", type=bits_value, nargs="+", default=list(DEFAULT_BITS),
                   help="bit depths, each used for weights and activations (default: "
                        f"{' '.join(map(str, DEFAULT_BITS))})")
    p.add_argument("--w-bits", type=bits_value, nargs="+", default=None,
                   help="weight bits (with --a-bits: decoupled pairs such as W4A8; replaces --bits)")
    p.add_argument("--a-bits", type=bits_value, nargs="+", default=None, help="activation bits")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help=f"quantization recipe (default: {DEFAULT_RECIPE})")
    p.add_argument("--baseline", default="minmax",
                   help="also run this recipe at each bit depth for comparison ('none' to skip)")
    p.add_argument("--calib-size", type=positive_int, default=DEFAULT_CALIB_SIZE,
                   help=f"calibration images, a seeded subset of the TRAINING split (default {DEFAULT_CALIB_SIZE}: "
                        "block reconstruction at <= 4 bits needs them; 256 is enough above)")
    p.add_argument("--calib-path", default=None, metavar="FOLDER",
                   help="calibrate on the images of FOLDER (any images: flat, class sub-folders or "
                        "train/val; converted to the model's channels and size) instead of the "
                        "training split; the report gives their distance from the evaluation data")
    p.add_argument("--calib-data", choices=["train", "synthetic"], default="train",
                   help="train (default): a seeded subset of the training split; synthetic: no "
                        "images, inputs optimised from the float model (PSAQ-ViT-style, ~100 "
                        "forward+backward passes per 64 images: use --calib-size 256)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="evaluation batch size")
    p.add_argument("--eval-subset", type=positive_int, default=None,
                   help="evaluate on only the first N validation images (quick looks)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--latency-runs", type=positive_int, default=20,
                   help="timed runs per variant and batch size (after warm-up)")
    p.add_argument("--latency-batches", type=positive_int, nargs="+", default=[1, 64],
                   help="batch sizes the latency is measured at (default 1 64; summary.csv's columns "
                        "show 1 and 64, summary.json every size; e.g. 1 8 for a ViT-B/16 on a small CPU)")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=BITS|float",
                   help="per-layer exception by module name pattern, e.g. 'blocks.0.*=8' or "
                        "'head=float' (repeatable)")
    p.add_argument("--num-heads", type=positive_int, default=None,
                   help="attention heads of a timm or torchvision state dict (default: embed_dim / "
                        "64, the ViT convention); BV-ViT files, HF and timm folders carry their own")
    p.add_argument("--float-dtype", choices=["fp32", "fp16"], default="fp16",
                   help="dtype of the float parts (norms, biases, embeddings) in packed files; the "
                        "evaluation uses exactly the stored values (default fp16: half their bytes, "
                        "no measurable accuracy change on the demo model)")
    p.add_argument("--no-onnx", action="store_true",
                   help="skip the deployment files (ONNX, OpenVINO IR) and their runtime measurements")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino", "all"], default=None,
                   help="runtimes that evaluate and time the deployment files: onnxruntime, openvino "
                        "(optional package; our W8A8 as OpenVINO IR) or all (default: every installed one)")
    p.add_argument("--analysis", choices=["none", "basic", "full"], default="basic",
                   help="basic (default): accuracy, size, time, per-class, confusion, histograms, "
                        "per-layer SQNR and report.html; full: also per-layer sensitivity; none: "
                        "summary files only")
    g = p.add_argument_group("mixed precision")
    g.add_argument("--avg-bits", type=float, default=None,
                   help="also build a mixed-precision model whose weights average this many bits, "
                        "per-layer widths chosen from measured sensitivity")
    g.add_argument("--max-weight-bytes", type=positive_int, default=None,
                   help="... or whose packed weights fit in this many bytes")
    g.add_argument("--mp-candidates", type=bits_value, nargs="+", default=[4, 6, 8],
                   help="widths the mixed-precision search may give a layer (default 4 6 8)")
    g = p.add_argument_group("what gets quantized")
    g.add_argument("--no-linear", action="store_true", help="keep qkv/proj/fc1/fc2 float")
    g.add_argument("--no-attention-matmul", action="store_true", help="keep q, k, v float")
    g.add_argument("--no-softmax", action="store_true", help="keep attention probabilities float")
    g.add_argument("--residual", action="store_true", help="also quantize the residual additions")
    g.add_argument("--softmax-grid", choices=["auto", "uniform", "log2"], default=None,
                   help="grid of the attention probabilities: auto (the vit recipes' default: per "
                        "block, whichever has the lowest attn @ v error on calibration images: below 8 "
                        "bits uniform or a log grid of base 2^(1/k), k = 1, 2, 4, 8, 16; from 8 bits "
                        "uniform grids of 15 ranges, which integer runtimes run), uniform, or log2 (the "
                        "base by MSE). A log grid at 8 bits has no int8 attention kernel: only the "
                        "fused-attention ONNX file and OpenVINO's IR (attention in float) are made")
    g.add_argument("--softmax-log2", action="store_true", help="same as --softmax-grid log2")
    g.add_argument("--no-softmax-renorm", action="store_true",
                   help="keep each row of quantized attention probabilities as rounded (the vit "
                        "recipes rescale it to sum to 1 when the softmax has fewer than 8 bits)")
    rec = g.add_mutually_exclusive_group()
    rec.add_argument("--reconstruct", action="store_true",
                     help="after calibration, reconstruct block by block (learned weight rounding "
                          "and activation step sizes, BRECQ/QDrop) at every width; the vit recipe "
                          "already does at <= 4 bits")
    rec.add_argument("--no-reconstruct", action="store_true",
                     help="never reconstruct (faster calibration, less accurate at <= 4 bits)")
    g.add_argument("--reconstruct-iters", type=positive_int, default=None,
                   help="Adam steps per reconstruction unit (default 100 at 4 bits, as accurate as 300 "
                        "there at a third of the time; 300 at <= 3 bits, where they help)")
    g.add_argument("--learn-weight-scales", action="store_true",
                   help="reconstruction also learns the weight step sizes (one factor per output "
                        "channel or group, stored as bfloat16): at W3A3 it helped the demo model on "
                        "every seed tried but not the 197-token one, so it is off by default")
    g.add_argument("--time-budget", type=positive_seconds, default=None, metavar="SECONDS",
                   help="seconds the reconstruction of one variant may take, its passes over the "
                        "calibration images included: from measured costs, each unit gets fewer steps "
                        "(at least 10), then fewer images (at least 64) when the rest would not fit")
    g.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream by a randomized Hadamard matrix folded into the "
                        "weights (exact in float, no extra op) before GPTQ/reconstruction")
    g.add_argument("--no-patch-embed", action="store_true", help="keep the patch embedding float")
    g.add_argument("--no-head", action="store_true", help="keep the classifier head float")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bvvit.ptq.job import PTQJob, run
    from bvvit.ptq.onnx import resolve_runtimes
    from bvvit.quant.config import MAX_BITS, LayerOverride
    from bvvit.quant.recipes import RECIPES
    from bvvit.system import resolve_device

    if args.data_path is not None and not args.data_path.strip():
        raise ConfigError("--data-path is empty (an unset shell variable?); leave it out to use the "
                          "data the model was trained on, or pass a folder")
    if args.calib_path is not None and args.calib_data != "train":
        raise ConfigError("--calib-path and --calib-data synthetic exclude each other: pass one")
    if args.calib_path is not None and not args.calib_path.strip():
        raise ConfigError("--calib-path is empty (an unset shell variable?); leave it out to calibrate "
                          "on the training split, or pass a folder of images")
    if (args.w_bits is None) != (args.a_bits is None):
        raise ConfigError("--w-bits and --a-bits go together (e.g. --w-bits 4 --a-bits 8)")
    if args.w_bits is not None:
        if len(args.w_bits) != len(args.a_bits):
            raise ConfigError(f"--w-bits has {len(args.w_bits)} values but --a-bits has "
                              f"{len(args.a_bits)}; give one activation width per weight width")
        pairs = unique_pairs(list(zip(args.w_bits, args.a_bits)))
    else:
        pairs = unique_pairs([(b, b) for b in args.bits])
    baseline = None if args.baseline.lower() == "none" else args.baseline
    if baseline is not None and baseline not in RECIPES:
        raise ConfigError(f"--baseline {baseline!r} is not a recipe; choose one of "
                          f"{', '.join(RECIPES)} or none")
    output_dir = args.output_dir or str(Path(args.model_path).resolve().parent / "quantization")
    switches = {"linear": not args.no_linear, "attention_matmul": not args.no_attention_matmul,
                "softmax_output": not args.no_softmax, "residual": args.residual,
                "patch_embed": not args.no_patch_embed, "head": not args.no_head}
    if args.no_softmax_renorm:
        switches["softmax_renorm"] = False
    if args.softmax_log2 or args.softmax_grid:
        switches["softmax_method"] = "log2" if args.softmax_log2 else args.softmax_grid
    reconstruct: dict[str, Any] = {}  # the recipe's other reconstruction settings stay
    if args.reconstruct or args.no_reconstruct:
        reconstruct["enabled"] = bool(args.reconstruct)
    if args.reconstruct_iters is not None:
        reconstruct["iters"] = args.reconstruct_iters
    if args.time_budget is not None:
        reconstruct["time_budget"] = args.time_budget
    if args.learn_weight_scales:
        reconstruct["learn_weight_scale"] = True
    if reconstruct:
        switches["reconstruct"] = reconstruct
    if args.rotate:
        switches["rotation"] = {"enabled": True}
    job = PTQJob(model_path=args.model_path, output_dir=output_dir, data_path=args.data_path,
                 bit_pairs=pairs, recipe=args.recipe, baseline=baseline,
                 calib_size=args.calib_size, calib_data=args.calib_data, calib_path=args.calib_path,
                 batch_size=args.batch_size,
                 device=str(resolve_device(args.device)), seed=args.seed,
                 progress=not args.no_progress, eval_subset=args.eval_subset,
                 latency_runs=args.latency_runs, latency_batches=tuple(dict.fromkeys(args.latency_batches)),
                 overrides=[LayerOverride.parse(text) for text in args.override],
                 switches=switches, float_dtype=args.float_dtype, analysis=args.analysis,
                 avg_bits=args.avg_bits, max_weight_bytes=args.max_weight_bytes,
                 mp_candidates=tuple(args.mp_candidates), num_heads=args.num_heads,
                 model_format=args.model_format, preprocessing=tuple(args.preprocessing),
                 onnx=not args.no_onnx, runtimes=resolve_runtimes(args.runtime), overwrite=args.overwrite)
    if args.avg_bits is not None and args.max_weight_bytes is not None:
        raise ConfigError("give one mixed-precision budget: --avg-bits or --max-weight-bytes")
    if args.avg_bits is not None and not min(args.mp_candidates) <= args.avg_bits <= MAX_BITS:
        raise ConfigError(f"--avg-bits {args.avg_bits} must lie between the smallest candidate "
                          f"width ({min(args.mp_candidates)}) and {MAX_BITS}")
    try:
        with signals_interrupt():
            run(job)
    except Interrupted as stop:
        log.error(f"post_training.py: interrupted ({stop}); finished bit depths are kept and reused "
                  "by a rerun")
        return stop.exit_code
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main, prog="post_training.py"))


if __name__ == "__main__":
    entry_point()
