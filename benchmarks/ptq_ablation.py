#!/usr/bin/env python3
"""Ablation of the ViT-aware PTQ techniques on a trained model (simulated accuracy).

    python benchmarks/ptq_ablation.py --model-path output/demo/vit_model.pth

For W4A4, W4A8, W6A6 and W8A8: naive minmax, the mse recipe, then mse plus each technique
alone (log2 softmax, LayerNorm reparameterization, GPTQ), the vit recipe (reparam + GPTQ),
the vit recipe with the log2 softmax and vit + block-wise reconstruction (vit-recon).
Prints top-1, drop vs FP32, calibration time (all of quantize_model) and the part of it
spent in reconstruction; --json writes the table. --variants picks rows by name.

Issue 17's rows (residual-stream rotation, the softmax grid chosen by calibration error,
the image at 8 bits, 100 vs 300 reconstruction steps) start with ``17:``. ``--heldout N``
evaluates on N images of the TRAINING split that no calibration set of the seed uses (the
slice defaults are chosen on) instead of the test split. ``--softmax-candidates`` limits the
grids the softmax choice may pick (``uniform,log2,log-sqrt2``: the choice before the finer log
grids were added). ``--error-sources`` then measures where each row's error comes from: the
logit KL with one group of activation quantizers switched off (kept float) at a time (each
kind across all blocks, then each block's), and with every activation float (weights only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bvvit.data import (build_dataset, build_loader, build_transform, calibration_indices,  # noqa: E402
                        calibration_loader, resolve_data)
from bvvit.evaluate.classification import evaluate_classifier  # noqa: E402
from bvvit.model_file import load_model_file  # noqa: E402
from bvvit.quant import make_quant_config, quantize_model  # noqa: E402
from bvvit.quant import softmax_grid  # noqa: E402
from bvvit.quant.config import TensorQuantSpec  # noqa: E402
from bvvit.quant.modules import OFF, act_quantizers  # noqa: E402
from bvvit.quant.softmax_grid import grid_summary  # noqa: E402

PAIRS = [(4, 4), (4, 8), (6, 6), (8, 8)]


def variants(w: int, a: int):
    mse = make_quant_config("mse", w, a)
    log2 = TensorQuantSpec(a, symmetric=False, observer="mse", method="log2")
    yield "minmax", make_quant_config("minmax", w, a)
    yield "mse", mse
    yield "mse+log2", dataclasses.replace(mse, softmax=log2)
    yield "mse+reparam", make_quant_config("mse", w, a, reparam={"enabled": True})
    yield "mse+gptq", make_quant_config("mse", w, a, gptq={"enabled": True})
    # the vit recipe reconstructs at <= 4 bits; these rows show it without, then with
    yield "vit (reparam+gptq)", make_quant_config("vit", w, a, reconstruct={"enabled": False})
    yield "vit + log2", make_quant_config("vit", w, a, softmax_method="log2", reconstruct={"enabled": False})
    yield "vit-recon", make_quant_config("vit-recon", w, a)
    # issue 17: each technique alone on the vit recipe of before, then together (the default)
    # (100 reconstruction steps in every "before" row: the recipe's count before it took 300 at <= 3 bits)
    before = {"softmax_method": "uniform", "image_bits": None, "softmax_renorm": False}
    steps = {"reconstruct": {"iters": 100}}
    yield "17:vit before (recon 300)", make_quant_config("vit", w, a, **before, reconstruct={"iters": 300})
    yield "17:vit before (recon 100)", make_quant_config("vit", w, a, **before, **steps)
    yield "17:+ softmax auto", make_quant_config("vit", w, a, image_bits=None, softmax_renorm=False, **steps)
    yield "17:+ image 8 bit", make_quant_config("vit", w, a, softmax_method="uniform", softmax_renorm=False, **steps)
    yield "17:+ softmax renorm", make_quant_config("vit", w, a, **{**before, "softmax_renorm": True}, **steps)
    yield "17:+ rotation", make_quant_config("vit", w, a, **before, rotation={"enabled": True}, **steps)
    yield "17:mse + rotation", make_quant_config("mse", w, a, rotation={"enabled": True})
    yield "17:vit default (recon 100)", make_quant_config("vit", w, a, **steps)
    yield "17:vit default", make_quant_config("vit", w, a)
    yield "17:vit default - softmax renorm", make_quant_config("vit", w, a, softmax_renorm=False)
    yield "17:vit default + w scales", make_quant_config("vit", w, a, reconstruct={"learn_weight_scale": True})
    yield "17:vit default + rotation", make_quant_config("vit", w, a, rotation={"enabled": True})


VARIANTS = [name for name, _ in variants(8, 8)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--data-path", default=None)
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--eval-subset", type=int, default=None)
    p.add_argument("--pairs", default=",".join(f"{w}/{a}" for w, a in PAIRS),
                   help="W/A pairs, e.g. 4/4,4/8,6/6,8/8,3/3")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated rows to run (default all): {', '.join(VARIANTS)}")
    p.add_argument("--heldout", type=int, default=None,
                   help="evaluate on this many held-out TRAINING images (not in any calibration "
                        "subset of up to 1,024 images of seed 0) instead of the test split")
    p.add_argument("--seeds", default="0",
                   help="comma-separated recipe seeds (the Hessian row sample, the reconstruction's "
                        "batches); each row runs once per seed")
    p.add_argument("--softmax-candidates", default=None,
                   help=f"comma-separated grids the softmax choice may pick (default all: "
                        f"{', '.join(softmax_grid.SOFTMAX_GRIDS)})")
    p.add_argument("--error-sources", action="store_true",
                   help="after each row, the KL with each group of activation quantizers kept float")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.softmax_candidates:
        keep = [g.strip() for g in args.softmax_candidates.split(",")]
        if not keep or set(keep) - set(softmax_grid.SOFTMAX_GRIDS):
            p.error(f"--softmax-candidates: choose from {', '.join(softmax_grid.SOFTMAX_GRIDS)}")
        for grid in [g for g in softmax_grid.SOFTMAX_GRIDS if g not in keep]:
            del softmax_grid.SOFTMAX_GRIDS[grid]  # this process only: the choice reads the dict
    wanted = VARIANTS if args.variants is None else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    loaded = load_model_file(args.model_path)
    source = resolve_data(args.data_path or loaded.data.get("data_path") or "fashion-mnist")
    pre = loaded.preprocessing
    if args.heldout:
        val = build_loader(heldout_training_images(source, pre, args.heldout), 256, shuffle=False)
    else:
        val = build_loader(build_dataset(source, "val", build_transform(pre, train=False),
                                         subset=args.eval_subset), 256, shuffle=False)
    calib, _ = calibration_loader(source, pre, args.calib_size, seed=0)
    fp, fp_logits = evaluate_classifier(loaded.model, val)
    print(f"FP32 top-1 {fp['top1']:.2f}% on {fp['num_images']} {'held-out training' if args.heldout else 'test'} "
          f"images; calibration {args.calib_size} "
          f"training images; threads {torch.get_num_threads()}")
    print(f"{'W/A':<6}{'variant':<28}{'seed':>5}{'top-1':>8}{'drop':>8}{'agree':>8}{'KL':>9}{'calib s':>9}"
          f"{'recon s':>9}  grid")
    rows = []
    seeds = [int(v) for v in args.seeds.split(",")]
    for pair in args.pairs.split(","):
        w, a = (int(v) for v in pair.split("/"))
        for name, recipe_cfg in variants(w, a):
            if name not in wanted:
                continue
            for seed in seeds:
                cfg = dataclasses.replace(recipe_cfg, seed=seed)
                start = time.perf_counter()
                qmodel, report = quantize_model(loaded.model, cfg, calib)
                metrics, _ = evaluate_classifier(qmodel, val, reference_logits=fp_logits)
                row = {"w_bits": w, "a_bits": a, "variant": name, "seed": seed, "top1": metrics["top1"],
                       "drop": metrics["top1_drop"], "agreement": metrics["agreement"], "kl": metrics["kl_div"],
                       "softmax_grid": grid_summary(report.extras["softmax_grids"])
                       if report.extras.get("softmax_grids") else cfg.softmax.method,
                       "calibration_s": report.calibration_time_s, "total_s": time.perf_counter() - start,
                       "reconstruction_s": report.extras.get("reconstruct", {}).get("time_s", 0.0)}
                rows.append(row)
                print(f"W{w}A{a:<4}{name:<28}{seed:>5}{row['top1']:>8.2f}{row['drop']:>+8.2f}{row['agreement']:>8.2f}"
                      f"{row['kl']:>9.5f}{row['calibration_s']:>9.1f}{row['reconstruction_s']:>9.1f}  "
                      f"{row['softmax_grid']}", flush=True)
                if args.error_sources:
                    row["error_sources"] = error_sources(qmodel, val, fp_logits)
    if args.json:
        Path(args.json).write_text(json.dumps({"fp32_top1": fp["top1"], "rows": rows}, indent=2))


def error_sources(qmodel, loader, fp_logits) -> dict[str, dict[str, float]]:
    """{group: {"kl", "agreement"}} with that group of activation quantizers kept float: each
    kind across blocks (``blocks.*.mlp.fc2.input_quantizer``), each block's, then all."""
    quantizers = act_quantizers(qmodel)
    groups: dict[str, list] = {}
    for name, quantizer in quantizers:
        groups.setdefault(re.sub(r"^blocks\.\d+\.", "blocks.*.", name), []).append(quantizer)
    for name, quantizer in quantizers:
        block = re.match(r"^blocks\.(\d+)\.", name)
        if block:
            groups.setdefault(f"block {block.group(1)}, every activation", []).append(quantizer)
    groups["every activation (weights only)"] = [quantizer for _, quantizer in quantizers]
    out = {}
    for group, members in groups.items():
        states = [q.state for q in members]
        for q in members:
            q.state = OFF
        metrics, _ = evaluate_classifier(qmodel, loader, reference_logits=fp_logits)
        for q, state in zip(members, states):
            q.state = state
        out[group] = {"kl": metrics["kl_div"], "agreement": metrics["agreement"]}
        print(f"      kept float: {group:<48} KL {metrics['kl_div']:.5f}  agree {metrics['agreement']:.2f}",
              flush=True)
    return out


def heldout_training_images(source, pre, n: int, seed: int = 12345):
    """``n`` training images outside every calibration subset of seed 0 up to 1,024 images
    (the subsets are nested), in a fixed random order."""
    train = build_dataset(source, "train", build_transform(pre, train=False))
    taken = set(calibration_indices(len(train), min(1024, len(train)), 0))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return train.select([i for i in order if i not in taken][:n])


if __name__ == "__main__":
    main()
